"""Operator CLI for API keys and tenant limits: ``python -m service.admin create-key --tenant acme``.

Why a CLI next to the HTTP admin endpoints: the first key has to come from somewhere, and operators with
Redis access should not need an admin token to bootstrap or to revoke a leaked key.
"""

from __future__ import annotations

import argparse
import sys

import redis
from pydantic import ValidationError

from service import redisconn
from service.auth import TENANT_RE, KeyStore
from service.config import Settings
from service.jobstore import JobStore
from service.limits import TenantLimitOverrides, tenant_limits, write_overrides
from service.webhooks.emit import emit as emit_webhook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.admin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-key", help="create an API key; it is printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--label")
    listing = sub.add_parser("list-keys", help="list key ids (never the keys)")
    listing.add_argument("--tenant")
    revoke = sub.add_parser("revoke-key", help="revoke a key by its id")
    revoke.add_argument("key_id")
    show = sub.add_parser("show-limits", help="a tenant's effective limits, overrides and usage (JSON)")
    show.add_argument("--tenant", required=True)
    set_limits = sub.add_parser("set-limits", help="replace a tenant's limit overrides (omitted: the default)")
    set_limits.add_argument("--tenant", required=True)
    set_limits.add_argument("--rps", type=float, help="requests/s (0: unlimited)")
    set_limits.add_argument("--burst", type=int)
    set_limits.add_argument("--max-queued", type=int)
    set_limits.add_argument("--max-concurrent", type=int)
    sub.add_parser("release-held", help="repair limit bookkeeping and release held edits (what the reaper runs)")
    args = parser.parse_args(argv)

    settings = Settings()
    connection = redisconn.rq_client(settings.redis_url)
    if args.command in ("show-limits", "set-limits", "release-held"):
        return limits_command(args, connection, settings)
    store = KeyStore(connection, settings)
    if args.command == "create-key":
        try:
            created = store.create_key(args.tenant, args.label)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"api_key: {created.key}")
        print(f"key_id: {created.key_id}")
        print(f"tenant: {created.tenant}")
        print(f"webhook_secret: {created.webhook_secret}")
        print("Store the API key now: it cannot be shown again.", file=sys.stderr)
        return 0
    if args.command == "list-keys":
        for info in store.list_keys(args.tenant):
            print(f"{info.key_id}\t{info.tenant}\t{info.created_at.isoformat()}\t{info.label or ''}")
        return 0
    if store.revoke_key(args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"error: no key with id {args.key_id}", file=sys.stderr)
    return 1


def limits_command(args: argparse.Namespace, connection: redis.Redis, settings: Settings) -> int:
    if args.command == "release-held":
        print(f"released {JobStore(connection, settings, listeners=[emit_webhook]).release_held()}")
        return 0
    if not TENANT_RE.match(args.tenant):
        print(f"error: invalid tenant name {args.tenant!r}", file=sys.stderr)
        return 2
    if args.command == "set-limits":
        try:
            overrides = TenantLimitOverrides(rps=args.rps, burst=args.burst, max_queued=args.max_queued,
                                             max_concurrent=args.max_concurrent)
        except ValidationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(write_overrides(connection, args.tenant, overrides, settings).model_dump_json(indent=2))
        return 0
    print(tenant_limits(connection, args.tenant, settings).model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Operator CLI for API keys: ``python -m service.admin create-key --tenant acme``.

Why a CLI next to the HTTP admin endpoints: the first key has to come from somewhere, and operators with
Redis access should not need an admin token to bootstrap or to revoke a leaked key.
"""

from __future__ import annotations

import argparse
import sys

import redis

from service.auth import KeyStore
from service.config import Settings


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
    args = parser.parse_args(argv)

    settings = Settings()
    store = KeyStore(redis.Redis.from_url(settings.redis_url), settings)
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


if __name__ == "__main__":
    sys.exit(main())

"""``python -m service.webhooks``: the delivery process; ``failed`` / ``replay ID...``: the failed list."""

from __future__ import annotations

import argparse
import json
import logging
import sys


from service import redisconn
from service.config import Settings, get_settings
from service.webhooks import delivery  # noqa: F401 (the code its jobs run: loaded before the first job)
from service.webhooks.failed import list_failed, replay_failed
from service.webhooks.sender import Sender


def _cli_failed(settings: Settings, limit: int, as_json: bool) -> int:
    entries = list_failed(redisconn.rq_client(settings.redis_url), limit, settings=settings)
    for entry in entries:
        row = entry.summary()
        if as_json:
            print(json.dumps(row))
        else:
            status = f" HTTP {row['status_code']}" if row["status_code"] else ""
            print(f"{row['failed_at']}  {row['webhook_id']}  edit {row['edit_id']}  {row['event']}  "
                  f"{row['outcome']}{status} after {row['attempts']} attempt(s)  {row['url']}  {row['error'] or ''}")
    if not as_json:
        print(f"{len(entries)} failed deliver{'y' if len(entries) == 1 else 'ies'}", file=sys.stderr)
    return 0


def _cli_replay(settings: Settings, idents: list[str]) -> int:
    connection = redisconn.rq_client(settings.redis_url)
    rc = 0
    for ident in idents:
        try:
            entry = replay_failed(connection, ident, settings=settings)
        except KeyError:
            print(f"no failed delivery {ident!r} (see: python -m service.webhooks failed)", file=sys.stderr)
            rc = 1
            continue
        print(f"queued again: {entry.msg_id} (edit {entry.delivery.edit_id}, {entry.delivery.event}) "
              f"to {entry.delivery.url}")
    return rc


def main(argv: list[str] | None = None) -> int:
    """``python -m service.webhooks``: deliver webhooks; ``failed`` / ``replay ID…``: the failed list."""
    parser = argparse.ArgumentParser(prog="python -m service.webhooks", description="Deliver webhooks for edits; `failed` / `replay ID...`: deliveries given up on.")
    parser.add_argument("--burst", action="store_true", help="deliver what is queued (and due), then exit")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", metavar="[failed | replay]")
    failed = commands.add_parser("failed", help="list deliveries given up on, newest first")
    failed.add_argument("--limit", type=int, default=100)
    failed.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = commands.add_parser("replay", help="queue failed deliveries again (same webhook-id; attempts restart)")
    replay.add_argument("ids", nargs="+", metavar="ID", help="a webhook-id (msg_…) or an entry id from `failed`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if args.command == "failed":
        return _cli_failed(settings, args.limit, args.json)
    if args.command == "replay":
        return _cli_replay(settings, args.ids)
    if settings.webhooks.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.webhooks.metrics_port)
    sender = Sender(settings, burst=args.burst, logging_level=args.log_level)
    sender.install_signal_handlers()
    return sender.run()


if __name__ == "__main__":
    raise SystemExit(main())

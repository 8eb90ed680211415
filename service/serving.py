"""Serving the gateway with read deadlines: ``python -m service.serving`` (uvicorn) or, under gunicorn,
``worker_class = "service.gunicorn_worker.GatewayWorker"`` (deploy/gunicorn.conf.py).

Why: uvicorn has a keep-alive timeout but no deadline for *reading* a request. Its keep-alive timer is
cancelled by every byte received, so a client sending one header byte every few seconds (slowloris), or
announcing a body and never sending it, holds a connection (and, for the body, a request task) forever; a few
thousand of them exhaust the process's sockets. Here the headers of each request must arrive within
``limits.header_timeout_seconds`` of its first byte (or of the connection), and its body within
``limits.body_timeout_seconds`` of the headers; otherwise the connection is closed (408 when nothing was
answered yet). The app sees a late body as a client disconnect, which it logs as one line, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import get_settings

log = logging.getLogger("editserve.serving")

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a read deadline per request (headers, then body)."""

    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 60.0
    _read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_seconds, "headers")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_seconds, "headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_seconds, "body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(seconds, self._read_timed_out, what, seconds)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self, what: str, seconds: float) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        log.info("closing a connection from %s: request %s not received within %.0fs", self.client, what, seconds)
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def deadline_protocol(header_timeout_seconds: float, body_timeout_seconds: float) -> type[DeadlineHttpProtocol]:
    """The protocol class uvicorn is given (``Config(http=...)``), with these deadlines."""
    return type("ConfiguredDeadlineHttpProtocol", (DeadlineHttpProtocol,),
                {"header_timeout_seconds": header_timeout_seconds, "body_timeout_seconds": body_timeout_seconds})


def configured_protocol() -> type[DeadlineHttpProtocol]:
    limits = get_settings().limits
    return deadline_protocol(limits.header_timeout_seconds, limits.body_timeout_seconds)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the editserve gateway (uvicorn with read deadlines).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    uvicorn.run("service.app:app", host=args.host, port=args.port, log_level=args.log_level,
                http=configured_protocol())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

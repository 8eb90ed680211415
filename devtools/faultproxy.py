"""A TCP forwarder in front of a real server (Redis, the S3 endpoint) that a test or bench can slow down or take
down (fault injection; never used by the service itself).

Why not stop the real server: Redis and SeaweedFS are shared by a whole test session, and a bench wants one
client's view of an outage (the workers' S3) while the rest keeps working. Taking the proxy down
closes every connection through it and refuses new ones, which is what clients see in an outage; ``latency``
delays each forwarded chunk, which makes requests pile up the way a loaded server does.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from devtools.devstack import free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, latency: float = 0.0):
        self.target = (target_host, target_port)
        self.latency = latency
        self.port = free_port()
        self._up = threading.Event()
        self._closed = False
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(512)
        self._listener = listener
        self._up.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut every open one."""
        self._up.clear()
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the other thread (close alone does not)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while self._up.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.latency:
                    time.sleep(self.latency)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()
            with self._lock:
                self._conns.discard(src)


Fault = str | int | None
"""What :class:`HttpFaultProxy` does with one request: None forwards it, ``"drop"`` cuts the connection without
an answer (a server gone mid-request), an int answers that HTTP status (e.g. 503 ``SlowDown``) itself."""


class HttpFaultProxy:
    """A loopback HTTP/1.1 proxy in front of an HTTP server (the S3 endpoint) that fails chosen requests.

    ``fault(method, path, n)`` decides per request (``n``: requests seen so far) and returns a :data:`Fault`.
    The Host header is forwarded unchanged, so SigV4 signatures made for the proxy's address still verify.
    Every request is logged as (monotonic time, method, path, outcome): "dropped", or the status answered.
    """

    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.fault: Callable[[str, str, int], Fault] = lambda method, path, n: None
        self.log: list[tuple[float, str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers Expect: 100-continue at once

            def handle_one(self):
                assert "chunked" not in (self.headers.get("transfer-encoding") or "")
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with proxy.lock:
                    n = len(proxy.log)
                    fault = proxy.fault(self.command, self.path, n)
                    outcome = "dropped" if fault == "drop" else str(fault) if fault is not None else "?"
                    proxy.log.append((time.monotonic(), self.command, self.path, outcome))
                if fault == "drop":  # the server unreachable mid-request: the connection dies, nothing comes back
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None:
                    data = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>"
                            b"injected fault</Message></Error>")
                    self.send_response_only(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in ("expect", "connection", "keep-alive"):
                        upstream.putheader(key, value)
                upstream.endheaders(body or None)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                with proxy.lock:
                    proxy.log[n] = proxy.log[n][:3] + (str(response.status),)
                self.send_response_only(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def requests(self, method: str, suffix: str) -> list[tuple[float, str]]:
        """(time, outcome) of every ``method`` request whose path ends with ``suffix``."""
        with self.lock:
            return [(t, outcome) for t, m, p, outcome in self.log if m == method and p.split("?")[0].endswith(suffix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

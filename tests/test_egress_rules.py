"""service/egress.py rule by rule: submit-time URL checks, IPv4 inside IPv6, the resolver, the pinned client.

Why a file of its own: the delivery tests reach egress through Redis, RQ and a receiver; these are the fast,
exact checks (messages included, since they reach API clients as 4xx details) that mutation testing showed
missing (bench/mutation.py).
"""

from __future__ import annotations

import http.server
import ipaddress
import threading

import httpx
import pytest

from service import egress
from service.egress import AllowList, DestinationRefused, check_url, check_url_syntax

NONE = AllowList.parse([])


@pytest.fixture(scope="module")
def server():
    """A loopback HTTP server: /big answers 2000 bytes, /redirect a 302 to /big."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self._answer()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer()

        def _answer(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/big")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b"y" * 2000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def refusal(url: str, allow: AllowList = NONE) -> str:
    with pytest.raises(DestinationRefused) as err:
        check_url_syntax(url, allow)
    return str(err.value)


# --- check_url_syntax: the submit-time checks -------------------------------------------------------

def test_public_names_and_addresses_pass_the_syntax_check():
    for url in ("https://example.com/hook", "http://8.8.8.8:8080/x", "https://[2606:4700::1111]/x",
                "http://hooks.example.org./"):
        assert check_url_syntax(url, NONE) is None


def test_localhost_names_are_loopback_unless_loopback_is_allowed():
    assert refusal("http://localhost/x") == "localhost is loopback"
    assert refusal("http://localhost./x") == "localhost. is loopback"
    assert refusal("http://api.localhost/x") == "api.localhost is loopback"
    assert refusal("http://a.localhost./x") == "a.localhost. is loopback"
    assert check_url_syntax("http://localhost:8080/x", AllowList.parse(["127.0.0.0/8"])) is None
    assert check_url_syntax("http://api.localhost/x", AllowList.parse(["127.0.0.1"])) is None
    # a loopback CIDR that does not hold 127.0.0.1 does not exempt "localhost"
    assert refusal("http://localhost/x", AllowList.parse(["127.0.0.2/32"])) == "localhost is loopback"
    # only the label "localhost" counts, not a name that merely ends in it
    assert check_url_syntax("http://notlocalhost/x", NONE) is None


def test_literal_addresses_are_refused_with_their_reason():
    assert refusal("http://10.0.0.1/x") == "10.0.0.1 is 10.0.0.1, which is private"
    assert refusal("http://0x7f000001/x") == "0x7f000001 is 127.0.0.1, which is loopback"
    assert refusal("http://2130706433/x") == "2130706433 is 127.0.0.1, which is loopback"
    assert refusal("http://[::1]/x") == "::1 is ::1, which is loopback"
    assert refusal("http://169.254.169.254/x") == "169.254.169.254 is 169.254.169.254, which is link-local"


def test_numeric_hosts_that_are_no_address_are_refused():
    assert refusal("http://0x1ffffffff/x") == "'0x1ffffffff' looks like an IPv4 address but is not one"


def test_allowed_hosts_and_networks_are_exempt_at_submit_time():
    assert check_url_syntax("http://localhost/x", AllowList.parse(["LOCALHOST"])) is None
    assert check_url_syntax("http://10.0.0.1/x", AllowList.parse(["10.0.0.0/8"])) is None
    assert refusal("http://10.0.0.1/x", AllowList.parse(["192.168.0.0/16"])) == \
        "10.0.0.1 is 10.0.0.1, which is private"


def test_the_syntax_check_refuses_what_parse_url_refuses():
    assert refusal("ftp://example.com/x") == "scheme 'ftp' is not allowed (http or https only)"
    assert refusal("http://user:pw@example.com/x") == "URL must not contain a user name or password"


# --- IPv4 addresses inside IPv6 --------------------------------------------------------------------

def v6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text)


def v4s(*texts: str) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(t) for t in texts]


def test_each_embedding_yields_exactly_its_ipv4():
    assert egress._embedded_ipv4(v6("::ffff:8.8.8.8")) == v4s("8.8.8.8")  # mapped
    assert egress._embedded_ipv4(v6("2002:808:808::1")) == v4s("8.8.8.8")  # 6to4
    assert egress._embedded_ipv4(v6("2001:0:4136:e378:8000:63bf:3fff:fdd2")) == \
        v4s("65.54.227.120", "192.0.2.45")  # Teredo: server, client
    assert egress._embedded_ipv4(v6("64:ff9b::808:808")) == v4s("8.8.8.8")  # NAT64
    assert egress._embedded_ipv4(v6("64:ff9b::7f00:1")) == v4s("127.0.0.1")
    assert egress._embedded_ipv4(v6("2606:4700::1111")) == []  # an ordinary address embeds nothing
    assert egress._embedded_ipv4(v6("64:ff9c::7f00:1")) == []  # next to the NAT64 prefix, not in it


def test_a_6to4_address_of_a_private_ipv4_is_refused_by_what_it_embeds():
    reason = egress.non_global_reason(v6("2002:a00:1::1"))
    assert reason == "embeds 10.0.0.1 (private)"
    assert egress.non_global_reason(v6("2002:808:808::1")) is None


# --- the system resolver ---------------------------------------------------------------------------

def test_the_system_resolver_returns_each_address_of_the_host_once():
    assert egress.system_resolver("10.1.2.3", 80) == ["10.1.2.3"]
    assert egress.system_resolver("2606:4700::1111", 443) == ["2606:4700::1111"]
    assert set(egress.system_resolver("localhost", 80)) <= {"127.0.0.1", "::1"}
    assert egress.system_resolver("fe80::1%1", 80) == ["fe80::1"]


def test_check_url_uses_the_resolver_answer():
    dest = check_url("http://hooks.example/x", NONE, resolver=lambda host, port: ["8.8.8.8", "8.8.4.4"])
    assert dest.ips == tuple(ipaddress.ip_address(a) for a in ("8.8.8.8", "8.8.4.4"))


# --- the pinned client -----------------------------------------------------------------------------

def test_the_reply_body_is_cut_at_512_bytes_by_default(server):
    dest = check_url(server + "/big", AllowList.parse(["127.0.0.1"]))
    with egress.new_client() as client:
        reply = egress.pinned_post(client, dest, b"{}", {"Content-Type": "application/json"}, timeout=10)
        assert reply.status_code == 200 and reply.body_prefix == b"y" * 512
        reply = egress.pinned_post(client, dest, b"{}", {}, timeout=10, max_body_bytes=7)
        assert reply.body_prefix == b"y" * 7


def test_the_client_follows_no_redirects(server):
    with egress.new_client() as client:
        response = client.get(server + "/redirect")
    assert response.status_code == 302


def test_the_client_ignores_proxy_settings_in_the_environment(server, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: a proxy that is not there
    with egress.new_client() as client:
        assert client.get(server + "/big").status_code == 200


def test_the_async_client_follows_no_redirects_and_ignores_proxy_settings(server, monkeypatch):
    """new_async_client (image_url fetches): the same two properties as the sync client."""
    import asyncio

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")

    async def get(path: str) -> int:
        async with egress.new_async_client() as client:
            return (await client.get(server + path)).status_code

    assert asyncio.run(get("/redirect")) == 302
    assert asyncio.run(get("/big")) == 200

"""service/egress.py edges that mutation testing (bench/mutation.py) showed unchecked: URL and allow-list parsing,
the resolver call, refusal messages (they reach API clients as 4xx details), the pinned request, and the bounded
GET (:func:`fetch_bounded`) hop by hop.

Why in process: httpx's ``MockTransport`` stands in for the network and a fake resolver for DNS, so each test sees
exactly which address was connected to, with which Host/SNI, and how much of a body was read, in milliseconds.
"""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest

from service import egress
from service.egress import AllowList, Destination, DestinationRefused, FetchFailed, check_url, parse_url

NONE = AllowList.parse([])
PUBLIC = "93.184.216.34"


def ip(text: str) -> egress.IPAddress:
    return ipaddress.ip_address(text)


def refused(url: str, allow: AllowList = NONE, resolver=None) -> DestinationRefused:
    with pytest.raises(DestinationRefused) as err:
        if resolver is None:
            parse_url(url)
        else:
            check_url(url, allow, resolver)
    return err.value


# --- parse_url ---------------------------------------------------------------------------------------

def test_urls_without_a_host_or_with_a_bad_one_are_refused_with_the_reason():
    assert str(refused("http:///x")) == "URL has no host"
    assert str(refused("http://[zz]/")) == "invalid URL: Invalid IPv6 address: '[zz]'"
    assert str(refused("http://-bad-.example/")) == "'-bad-.example' is not a valid host name"


def test_ports_1_to_65535_are_accepted_and_others_refused():
    assert parse_url("http://example.com:1/").port == 1
    assert parse_url("http://example.com:65535/").port == 65535
    assert str(refused("http://example.com:0/")) == "port 0 is out of range"
    assert str(refused("http://example.com:65536/")) == "port 65536 is out of range"


# --- literal addresses, reasons, allow lists -----------------------------------------------------------

def test_literal_ip_reads_bracketed_and_fully_qualified_forms():
    assert egress.literal_ip("[::1]") == ip("::1")
    assert egress.literal_ip("10.0.0.1.") == ip("10.0.0.1")
    assert egress.literal_ip("0x7f.1.") == ip("127.0.0.1")
    assert egress.literal_ip("example.com") is None


@pytest.mark.parametrize("address, reason", [
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("4000::1", "reserved"),
    ("100.64.0.1", "not globally routable"), ("127.0.0.1", "loopback"), ("8.8.8.8", None)])
def test_each_non_global_kind_is_named(address, reason):
    assert egress.non_global_reason(ip(address)) == reason


def test_allow_list_entries_are_trimmed_and_host_bits_of_a_cidr_ignored():
    allow = AllowList.parse(["", " [::1] ", "10.1.2.3/8", "Hooks.Example.", "192.168.0.0/16"])
    assert allow.allows_ip(ip("::1"))
    assert allow.allows_ip(ip("10.200.0.1"))  # "10.1.2.3/8" is read as 10.0.0.0/8
    assert allow.allows_ip(ip("192.168.1.1"))  # an empty entry skips itself, not the rest of the list
    assert not allow.allows_ip(ip("11.0.0.1"))
    assert allow.allows_host("hooks.example") and allow.allows_host("HOOKS.example.")
    assert not allow.allows_host(".hooks.example") and not allow.allows_host("hooks.example ")


# --- check_url: resolution and its refusals --------------------------------------------------------------

class Resolver:
    """A fake DNS: answers by name, records (host, port) of every question."""

    def __init__(self, **answers: list[str]):
        self.answers = {name.replace("_", "."): value for name, value in answers.items()}
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        answer = self.answers.get(host)
        if answer is None:
            raise OSError("Name or service not known")
        return answer


def test_the_resolver_is_asked_for_the_port_the_connection_will_use():
    dns = Resolver(hooks_example=[PUBLIC])
    for url in ("https://hooks.example/x", "http://hooks.example/x", "https://hooks.example:8443/x"):
        check_url(url, NONE, dns)
    assert dns.asked == [("hooks.example", 443), ("hooks.example", 80), ("hooks.example", 8443)]


def test_a_literal_address_is_checked_itself_never_resolved():
    dns = Resolver()  # any question would fail differently
    assert str(refused("http://10.0.0.1/x", resolver=dns)) == "10.0.0.1 resolves to 10.0.0.1, which is private"
    assert check_url(f"http://{PUBLIC}/x", NONE, dns).ips == (ip(PUBLIC),)
    assert str(refused("http://0x1ffffffff/x", resolver=dns)) == \
        "'0x1ffffffff' looks like an IPv4 address but is not one"
    assert dns.asked == []


def test_dns_failures_are_temporary_refusals_and_bad_answers_permanent():
    failed = refused("http://gone.example/x", resolver=Resolver())
    assert str(failed) == "cannot resolve 'gone.example': Name or service not known" and failed.permanent is False
    empty = refused("http://empty.example/x", resolver=Resolver(empty_example=[]))
    assert str(empty) == "'empty.example' has no addresses" and empty.permanent is False
    private = refused("http://rebound.example/x", resolver=Resolver(rebound_example=[PUBLIC, "10.0.0.5"]))
    assert str(private) == "rebound.example resolves to 10.0.0.5, which is private" and private.permanent is True


def test_an_allowed_name_or_network_exempts_what_it_covers_and_nothing_else():
    internal = Resolver(receiver_internal=["10.0.0.9", "192.168.1.1"])
    by_name = check_url("http://receiver.internal/x", AllowList.parse(["receiver.internal"]), internal)
    assert by_name.ips == (ip("10.0.0.9"), ip("192.168.1.1"))
    assert str(refused("http://receiver.internal/x", AllowList.parse(["10.0.0.0/8"]), internal)) == \
        "receiver.internal resolves to 192.168.1.1, which is private"
    both = AllowList.parse(["10.0.0.0/8", "192.168.0.0/16"])
    assert check_url("http://receiver.internal/x", both, internal).ips == by_name.ips


# --- the pinned request ------------------------------------------------------------------------------------

def test_a_pinned_request_goes_to_the_ip_with_the_urls_host_and_sni():
    dest = Destination(httpx.URL("https://hooks.example:8443/x?a=1"), (ip(PUBLIC),))
    with httpx.Client(timeout=7, transport=httpx.MockTransport(lambda r: httpx.Response(200))) as client:
        request = egress.pinned_request(client, dest, ip(PUBLIC), "GET", {"X-A": "1"})
        assert request.url == httpx.URL(f"https://{PUBLIC}:8443/x?a=1")
        assert request.headers["host"] == "hooks.example:8443" and request.headers["x-a"] == "1"
        assert request.extensions["sni_hostname"] == "hooks.example"
        assert request.extensions["timeout"] == httpx.Timeout(7).as_dict()  # no timeout given: the client's
        request = egress.pinned_request(client, dest, ip(PUBLIC), "GET", {}, timeout=2)
        assert request.extensions["timeout"] == httpx.Timeout(2).as_dict()


def counted_stream(chunks: list[bytes], pulled: list[bytes]):
    """A body as a real connection gives it: chunk by chunk, each recorded when the reader pulls it."""
    def stream():
        for chunk in chunks:
            pulled.append(chunk)
            yield chunk
    return stream()


def streamed(status: int = 200, chunks=(), headers=None, pulled: list[bytes] | None = None) -> httpx.Response:
    """An async streamed response (``fetch_bounded`` reads raw streams; a plain ``content=`` is pre-read)."""
    async def stream():
        for chunk in chunks:
            if pulled is not None:
                pulled.append(chunk)
            yield chunk
    return httpx.Response(status, headers=headers, content=stream())


def test_pinned_post_sends_the_body_with_its_timeout_and_keeps_the_reply_headers():
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(202, headers={"X-Receipt": "r1"}, content=counted_stream([b"ok"], []))

    dest = Destination(httpx.URL("http://hooks.example/x"), (ip(PUBLIC),))
    with httpx.Client(transport=httpx.MockTransport(handler), timeout=60) as client:
        reply = egress.pinned_post(client, dest, b'{"a": 1}', {"Content-Type": "application/json"}, timeout=3)
    assert (reply.status_code, reply.headers["x-receipt"], reply.body_prefix) == (202, "r1", b"ok")
    request = sent[0]
    assert request.method == "POST" and request.url == httpx.URL(f"http://{PUBLIC}/x")
    assert request.content == b'{"a": 1}' and request.headers["content-type"] == "application/json"
    assert request.extensions["timeout"] == httpx.Timeout(3).as_dict()


def test_pinned_post_keeps_a_prefix_over_several_chunks_and_stops_reading_there():
    pulled: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=counted_stream([b"ab", b"cd", b"ef", b"gh"], pulled))

    dest = Destination(httpx.URL("http://hooks.example/x"), (ip(PUBLIC),))
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        reply = egress.pinned_post(client, dest, b"{}", {}, timeout=5, max_body_bytes=5)
        assert reply.body_prefix == b"abcde" and pulled == [b"ab", b"cd", b"ef"]
        pulled.clear()
        reply = egress.pinned_post(client, dest, b"{}", {}, timeout=5, max_body_bytes=4)
        assert reply.body_prefix == b"abcd" and pulled == [b"ab", b"cd"]  # enough: the receiver is not read on


def test_pinned_post_never_follows_a_redirect_even_on_a_following_client():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(307, headers={"Location": "http://169.254.169.254/latest"},
                              content=counted_stream([], []))

    dest = Destination(httpx.URL("http://hooks.example/x"), (ip(PUBLIC),))
    with httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=True) as client:
        reply = egress.pinned_post(client, dest, b"{}", {}, timeout=5)
    assert reply.status_code == 307 and seen == ["/x"]


def test_pinned_post_tries_the_next_address_when_connecting_fails():
    tried: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tried.append(request.url.host)
        if request.url.host != "8.8.4.4":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(204, content=counted_stream([], []))

    dest = Destination(httpx.URL("http://hooks.example/x"), (ip("::1"), ip("8.8.4.4")))
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert egress.pinned_post(client, dest, b"{}", {}, timeout=5).status_code == 204
        assert tried == ["::1", "8.8.4.4"]
        with pytest.raises(httpx.ConnectError):
            egress.pinned_post(client, Destination(dest.url, (ip("::1"),)), b"{}", {}, timeout=5)


# --- fetch_bounded -----------------------------------------------------------------------------------------

class Site:
    """A fake web site behind MockTransport, routes by path; records (connected host, Host header, path)."""

    def __init__(self, routes):
        self.routes = routes
        self.requests: list[tuple[str, str, str]] = []
        self.headers: list[httpx.Headers] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.url.host, request.headers["host"], request.url.path))
        self.headers.append(request.headers)
        route = self.routes.get(request.url.path)
        return streamed(404) if route is None else route(request)


def fetch(site, url: str, *, dns: Resolver | None = None, max_bytes: int = 100, timeout: float = 5,
          following: bool = False, **options) -> egress.Fetched:
    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(site), follow_redirects=following) as client:
            return await egress.fetch_bounded(url, NONE, client=client, max_bytes=max_bytes, timeout=timeout,
                                              resolver=dns or Resolver(img_example=[PUBLIC]), **options)
    return asyncio.run(run())


def failure(site, url: str, **options) -> FetchFailed:
    with pytest.raises(FetchFailed) as err:
        fetch(site, url, **options)
    return err.value


def ok(body: bytes, content_type: str | None = None):
    return lambda request: streamed(200, [body], {"Content-Type": content_type} if content_type else {})


def moved(location: str | None, status: int = 302):
    return lambda request: streamed(status, headers={"Location": location} if location is not None else {})


def test_a_fetch_connects_to_the_checked_ip_and_returns_body_and_type():
    site = Site({"/a.png": ok(b"PNG", content_type="image/png")})
    fetched = fetch(site, "https://img.example/a.png", headers={"Accept": "image/*"})
    assert fetched == egress.Fetched(url="https://img.example/a.png", content_type="image/png", body=b"PNG")
    assert site.requests == [(PUBLIC, "img.example", "/a.png")] and site.headers[0]["accept"] == "image/*"


def test_only_the_given_schemes_are_fetched():
    site = Site({"/a.png": ok(b"PNG")})
    with pytest.raises(DestinationRefused) as err:
        fetch(site, "http://img.example/a.png")
    assert str(err.value) == "scheme 'http' is not allowed (https only)"
    assert fetch(site, "http://img.example/a.png", schemes=("http", "https")).body == b"PNG"
    with pytest.raises(DestinationRefused) as err:
        fetch(site, "https://img.example/a.png", schemes=("http", "ftp"))
    assert str(err.value) == "scheme 'https' is not allowed (http or ftp only)"
    assert site.requests == [(PUBLIC, "img.example", "/a.png")]


def test_redirects_are_followed_by_name_each_hop_resolved_and_checked():
    dns = Resolver(img_example=[PUBLIC], cdn_example=["8.8.8.8"])
    site = Site({"/a": moved("/b", 301), "/b": moved("https://cdn.example/c", 308), "/c": moved("d", 303),
                 "/d": ok(b"PNG")})
    fetched = fetch(site, "https://img.example/a", dns=dns)
    assert fetched.url == "https://cdn.example/d" and fetched.body == b"PNG"
    assert site.requests == [(PUBLIC, "img.example", "/a"), (PUBLIC, "img.example", "/b"),
                             ("8.8.8.8", "cdn.example", "/c"), ("8.8.8.8", "cdn.example", "/d")]
    assert [host for host, _ in dns.asked] == ["img.example", "img.example", "cdn.example", "cdn.example"]


def test_at_most_max_redirects_are_followed():
    site = Site({f"/{n}": moved(f"/{n + 1}", 307) for n in range(5)} | {"/5": ok(b"ok")})
    assert fetch(site, "https://img.example/2").body == b"ok"  # three redirects: the default limit
    assert str(failure(site, "https://img.example/1")) == "more than 3 redirects"
    assert str(failure(site, "https://img.example/4", max_redirects=0)) == "more than 0 redirects"
    assert fetch(site, "https://img.example/0", max_redirects=5).body == b"ok"


def test_a_redirect_without_location_fails():
    assert str(failure(Site({"/a": moved(None)}), "https://img.example/a")) == "redirect 302 without a Location"
    assert str(failure(Site({"/a": moved("")}), "https://img.example/a")) == "redirect 302 without a Location"


def test_a_redirect_to_a_private_address_is_refused_before_connecting():
    site = Site({"/a": moved("https://10.0.0.7/secret")})
    for following in (False, True):  # even a client set to follow redirects does not follow one by itself
        with pytest.raises(DestinationRefused, match="10.0.0.7 resolves to 10.0.0.7, which is private"):
            fetch(site, "https://img.example/a", following=following)
    assert [path for _, _, path in site.requests] == ["/a", "/a"]


def test_any_other_status_fails_with_it():
    assert str(failure(Site({}), "https://img.example/missing")) == "answered HTTP 404"
    assert str(failure(Site({"/a": lambda r: streamed(204)}), "https://img.example/a")) == "answered HTTP 204"


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    pulled: list[bytes] = []
    big = Site({"/a": lambda r: streamed(200, [b"x" * 50], {"Content-Length": "101"}, pulled)})
    err = failure(big, "https://img.example/a")
    assert str(err) == "is 101 bytes, larger than the limit of 100" and err.too_large is True and pulled == []
    exact = Site({"/a": lambda r: streamed(200, [b"x" * 100], {"Content-Length": "100"})})
    assert fetch(exact, "https://img.example/a").body == b"x" * 100


def test_an_unannounced_body_over_the_limit_is_cut_while_streaming():
    pulled: list[bytes] = []
    site = Site({"/a": lambda r: streamed(200, [b"x" * 60] * 5, pulled=pulled),
                 "/odd": lambda r: streamed(200, [b"y" * 40] * 2, {"Content-Length": "many"}),
                 "/full": lambda r: streamed(200, [b"z" * 50] * 2)})
    err = failure(site, "https://img.example/a")
    assert str(err) == "sent more than the limit of 100 bytes" and err.too_large is True
    assert len(pulled) == 2  # stopped at the chunk that crossed the limit
    assert fetch(site, "https://img.example/odd").body == b"y" * 80  # a non-numeric length is ignored
    assert fetch(site, "https://img.example/full").body == b"z" * 100  # exactly the limit is fine


def test_a_body_that_breaks_off_is_a_transfer_failure():
    async def broken():
        yield b"abc"
        raise httpx.ReadError("connection reset")

    site = Site({"/a": lambda r: httpx.Response(200, content=broken())})
    err = failure(site, "https://img.example/a")
    assert str(err) == "transfer failed: ReadError: connection reset" and err.too_large is False


def test_the_next_address_is_tried_when_connecting_fails_and_the_last_failure_is_reported():
    dns = Resolver(img_example=["8.8.8.8", "8.8.4.4"], down_example=["8.8.8.8"])

    def route(request):
        if request.url.host == "8.8.8.8":
            raise httpx.ConnectError("no route", request=request)
        return streamed(200, [b"ok"])

    site = Site({"/a": route})
    assert fetch(site, "https://img.example/a", dns=dns).body == b"ok"
    assert [host for host, _, _ in site.requests] == ["8.8.8.8", "8.8.4.4"]
    assert str(failure(site, "https://down.example/a", dns=dns)) == "could not connect: no route"


def test_failure_messages_are_cut_to_300_characters():
    """They reach API clients as 4xx details: a hostile server must not make them arbitrarily long."""
    def refuse(request):
        raise httpx.ConnectError("x" * 1000, request=request)

    def garbage(request):
        raise httpx.RemoteProtocolError("y" * 1000, request=request)

    async def broken():
        yield b"abc"
        raise httpx.ReadError("z" * 1000)

    for route, start in ((refuse, "could not connect: x"), (garbage, "request failed: RemoteProtocolError: y"),
                         (lambda r: httpx.Response(200, content=broken()), "transfer failed: ReadError: z")):
        message = str(failure(Site({"/a": route}), "https://img.example/a"))
        assert len(message) == 300 and message.startswith(start)


def test_other_request_errors_fail_at_once():
    tried: list[str] = []

    def route(request):
        tried.append(request.url.host)
        raise httpx.RemoteProtocolError("garbage", request=request)

    dns = Resolver(img_example=["8.8.8.8", "8.8.4.4"])
    err = failure(Site({"/a": route}), "https://img.example/a", dns=dns)
    assert str(err) == "request failed: RemoteProtocolError: garbage" and tried == ["8.8.8.8"]


def test_the_whole_fetch_is_bounded_in_time():
    async def hang(request):
        await asyncio.Event().wait()  # a server that never answers

    err = failure(hang, "https://img.example/a", timeout=0.05)
    assert str(err) == "no complete answer within 0.05 s" and err.too_large is False

"""Outbound HTTP to user-supplied URLs without SSRF: check the address we connect to, then pin it.

Why a module of its own: a webhook URL is attacker-controlled. Checking the *name* is useless (``localhost``,
``0x7f000001``, ``2130706433``, a DNS record pointing at 169.254.169.254, or one that changes between
check and connect: DNS rebinding). So at send time we resolve A and AAAA once, refuse the destination if
any address is not global (loopback, RFC 1918, link-local, 0/8, CGNAT, multicast, reserved, and IPv6
forms that embed such an IPv4: mapped, 6to4, Teredo, NAT64), then connect to the checked IP while keeping
the Host header and TLS SNI/certificate check on the original name. Redirects are never followed.
Hosts, IPs or CIDRs in ``allow_hosts`` are exempt (tests, internal receivers an operator trusts).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
ALLOWED_SCHEMES = ("http", "https")
_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)
_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_DNS_NAME = re.compile(r"(?=.{1,253}\.?$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                       r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?", re.IGNORECASE)


class DestinationRefused(Exception):
    """The URL may not be contacted (scheme, unresolvable name, or a non-global address)."""

    def __init__(self, message: str, *, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent
        """False when trying again later may help (e.g. a DNS failure)."""


@dataclass(frozen=True)
class AllowList:
    """Operator exemptions from the global-address rule: host names, IPs and CIDRs."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        hosts, networks = set(), []
        for raw in entries:
            entry = raw.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    embedded = []
    if ip.ipv4_mapped:
        embedded.append(ip.ipv4_mapped)
    if ip.sixtofour:
        embedded.append(ip.sixtofour)
    if ip.teredo:
        embedded.extend(ip.teredo)
    if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64 well-known prefix
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return embedded


def non_global_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None when it is an ordinary public address."""
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),  # CGNAT 100.64/10 and friends
    )
    for reason, hit in checks:
        if hit:
            return reason
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded_ipv4(ip):
            inner_reason = non_global_reason(inner)
            if inner_reason:
                return f"embeds {inner} ({inner_reason})"
    return None


def literal_ip(host: str) -> IPAddress | None:
    """The address a host written as a number denotes, as the OS resolver would read it, else None.

    Covers what ``ipaddress`` parses plus inet_aton's legacy IPv4 forms: ``127.1``, ``0x7f000001``,
    ``2130706433``, ``0177.0.0.1``. Raises ValueError for a numeric host that is no address at all.
    """
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not _NUMERIC_HOST.fullmatch(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        raise ValueError(f"{host!r} looks like an IPv4 address but is not one") from None


def parse_url(url: str) -> httpx.URL:
    """A URL we may send to: http(s), a host, no credentials. Raises :class:`DestinationRefused`."""
    try:
        parsed = httpx.URL(url)
        host = parsed.host  # decoded lazily: an invalid IDNA label (``xn--``) raises only here
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError) as exc:  # idna.IDNAError is a UnicodeError: a ValueError
        raise DestinationRefused(f"invalid URL: {exc}") from None
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise DestinationRefused(f"scheme {parsed.scheme!r} is not allowed (http or https only)")
    if not host:
        raise DestinationRefused("URL has no host")
    if parsed.userinfo:
        raise DestinationRefused("URL must not contain a user name or password")
    if not (":" in host or _DNS_NAME.fullmatch(host)):
        raise DestinationRefused(f"{host!r} is not a valid host name")
    if port is not None and not 0 < port < 65536:
        raise DestinationRefused(f"port {port} is out of range")
    return parsed


def check_url_syntax(url: str, allow: AllowList) -> None:
    """The checks that need no DNS, for refusing a webhook URL as soon as it is submitted.

    The same rules as :func:`check_url` at delivery, minus resolving names (a name may legitimately point
    somewhere else by then, and is re-checked on every attempt): scheme, credentials, literal addresses in
    any notation, and ``localhost``.
    """
    parsed = parse_url(url)
    host = parsed.host
    if allow.allows_host(host):
        return
    if host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost"):
        if not allow.allows_ip(_LOOPBACK):
            raise DestinationRefused(f"{host} is loopback")
        return
    try:
        ip = literal_ip(host)
    except ValueError as exc:
        raise DestinationRefused(str(exc)) from None
    if ip is None:
        return
    reason = non_global_reason(ip)
    if reason and not allow.allows_ip(ip):
        raise DestinationRefused(f"{host} is {ip}, which is {reason}")


def system_resolver(host: str, port: int) -> list[str]:
    """Every A and AAAA address of ``host`` (numeric forms like 0x7f000001 are decoded by the OS)."""
    infos = socket.getaddrinfo(host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


@dataclass(frozen=True)
class Destination:
    """A checked destination: the URL as given plus the addresses we promise to connect to (in order)."""

    url: httpx.URL
    ips: tuple[IPAddress, ...]

    def pinned_url(self, ip: IPAddress) -> httpx.URL:
        return self.url.copy_with(host=str(ip))

    @property
    def host_header(self) -> str:
        default_port = {"http": 80, "https": 443}[self.url.scheme]
        host = self.url.host if ":" not in self.url.host else f"[{self.url.host}]"
        return host if self.url.port in (None, default_port) else f"{host}:{self.url.port}"


def check_url(url: str, allow: AllowList, resolver: Resolver = system_resolver) -> Destination:
    """Resolve ``url`` and return the address to pin, or raise :class:`DestinationRefused`."""
    parsed = parse_url(url)
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        literal = literal_ip(host)
    except ValueError as exc:
        raise DestinationRefused(str(exc)) from None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = [ipaddress.ip_address(a) for a in resolver(host, port)]
        except (OSError, UnicodeError) as exc:
            raise DestinationRefused(f"cannot resolve {host!r}: {exc}", permanent=False) from None
        if not addresses:
            raise DestinationRefused(f"{host!r} has no addresses", permanent=False)
    host_allowed = allow.allows_host(host)
    for ip in addresses:
        reason = non_global_reason(ip)
        # Any bad address refuses the whole name: otherwise a mixed record set is a coin flip.
        if reason and not host_allowed and not allow.allows_ip(ip):
            raise DestinationRefused(f"{host} resolves to {ip}, which is {reason}")
    return Destination(url=parsed, ips=tuple(addresses))


@dataclass(frozen=True)
class Reply:
    """What we keep of a receiver's answer: never more than a short prefix of its body."""

    status_code: int
    headers: httpx.Headers
    body_prefix: bytes


def pinned_request(client: httpx.Client | httpx.AsyncClient, destination: Destination, ip: IPAddress, method: str,
                   headers: Mapping[str, str], *, content: bytes | None = None,
                   timeout: float | None = None) -> httpx.Request:
    """A request to the checked ``ip``; the Host header and the TLS SNI/certificate name stay the URL's."""
    extensions = {"sni_hostname": destination.url.host} if destination.url.scheme == "https" else {}
    return client.build_request(method, destination.pinned_url(ip), content=content,
                                headers={**headers, "Host": destination.host_header},
                                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                                extensions=extensions)


def pinned_post(
    client: httpx.Client,
    destination: Destination,
    content: bytes,
    headers: Mapping[str, str],
    timeout: float,
    max_body_bytes: int = 512,
) -> Reply:
    """POST to a checked IP; Host header and TLS SNI/certificate name stay those of the URL.

    Addresses are tried in resolver order while connecting fails (e.g. ::1 then 127.0.0.1). The reply body is read only up to ``max_body_bytes``: a receiver must not be able to stall or
    flood the sender. ``client`` must not follow redirects or trust proxy env vars (:func:`new_client`).
    """
    for index, ip in enumerate(destination.ips):
        request = pinned_request(client, destination, ip, "POST", headers, content=content, timeout=timeout)
        try:
            response = client.send(request, follow_redirects=False, stream=True)
            break
        except httpx.ConnectError:
            if index == len(destination.ips) - 1:
                raise
    try:
        prefix = b""
        for chunk in response.iter_raw():
            prefix += chunk
            if len(prefix) >= max_body_bytes:
                break
        return Reply(response.status_code, response.headers, prefix[:max_body_bytes])
    finally:
        response.close()


def new_client() -> httpx.Client:
    """An HTTP client fit for pinned sends: no redirects, no env proxies (they would bypass the pin)."""
    return httpx.Client(follow_redirects=False, trust_env=False)


# ------------------------------------------------------------------------------------------------ bounded GET

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class FetchFailed(Exception):
    """A guarded GET gave no acceptable body (refused destination, status, size, time or connection)."""

    def __init__(self, message: str, *, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class Fetched:
    url: str  # after redirects
    content_type: str | None
    body: bytes


async def fetch_bounded(url: str, allow: AllowList, *, client: httpx.AsyncClient, max_bytes: int, timeout: float,
                        max_redirects: int = 3, schemes: tuple[str, ...] = ("https",),
                        resolver: Resolver = system_resolver,
                        headers: Mapping[str, str] | None = None) -> Fetched:
    """GET ``url`` under the same guard as webhooks, with bounded cost: every hop (the URL, then each redirect's
    Location) is resolved, checked against non-global addresses and pinned (:func:`check_url`); at most
    ``max_redirects`` are followed; the body is streamed and refused past ``max_bytes`` (or at once from
    Content-Length); the whole exchange (DNS, connect, TLS, redirects, body) ends after ``timeout`` seconds.
    ``client`` must not follow redirects or trust proxy env vars. Raises :class:`DestinationRefused` or
    :class:`FetchFailed`.
    """
    try:
        async with asyncio.timeout(timeout):
            return await _fetch(url, allow, client, max_bytes, max_redirects, schemes, resolver, dict(headers or {}))
    except TimeoutError:
        raise FetchFailed(f"no complete answer within {timeout:g} s") from None


async def _fetch(url: str, allow: AllowList, client: httpx.AsyncClient, max_bytes: int, max_redirects: int,
                 schemes: tuple[str, ...], resolver: Resolver, headers: dict[str, str]) -> Fetched:
    for hop in range(max_redirects + 1):
        parsed = parse_url(url)
        if parsed.scheme not in schemes:
            raise DestinationRefused(f"scheme {parsed.scheme!r} is not allowed ({' or '.join(schemes)} only)")
        # DNS is blocking: off the event loop (the overall timeout still bounds the wait for it)
        destination = await asyncio.to_thread(check_url, url, allow, resolver)
        response = await _send_pinned(client, destination, headers)
        try:
            if response.status_code in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise FetchFailed(f"redirect {response.status_code} without a Location")
                if hop == max_redirects:
                    raise FetchFailed(f"more than {max_redirects} redirects")
                url = str(destination.url.join(location))
                continue
            if response.status_code != 200:
                raise FetchFailed(f"answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise FetchFailed(f"is {int(declared)} bytes, larger than the limit of {max_bytes}", too_large=True)
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > max_bytes:
                    raise FetchFailed(f"sent more than the limit of {max_bytes} bytes", too_large=True)
            return Fetched(url=str(destination.url), content_type=response.headers.get("content-type"),
                           body=bytes(body))
        except httpx.HTTPError as exc:
            raise FetchFailed(f"transfer failed: {type(exc).__name__}: {exc}"[:300]) from None
        finally:
            await response.aclose()
    raise FetchFailed(f"more than {max_redirects} redirects")  # not reached: the loop returns or raises


async def _send_pinned(client: httpx.AsyncClient, destination: Destination,
                       headers: Mapping[str, str]) -> httpx.Response:
    """Connect to the checked addresses in order (e.g. ::1 then 127.0.0.1) until one answers."""
    for index, ip in enumerate(destination.ips):
        request = pinned_request(client, destination, ip, "GET", headers)
        try:
            return await client.send(request, follow_redirects=False, stream=True)
        except httpx.ConnectError as exc:
            if index == len(destination.ips) - 1:
                raise FetchFailed(f"could not connect: {exc}"[:300]) from None
        except httpx.HTTPError as exc:
            raise FetchFailed(f"request failed: {type(exc).__name__}: {exc}"[:300]) from None
    raise FetchFailed("no address to connect to")


def new_async_client(verify: bool | str | object = True) -> httpx.AsyncClient:
    """:func:`new_client`'s async twin (no redirects, no env proxies); ``verify`` as httpx takes it."""
    return httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=verify)

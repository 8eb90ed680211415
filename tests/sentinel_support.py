"""A real Redis Sentinel group on loopback: one master, one replica, one sentinel (Debian's redis-sentinel).

Small on purpose (quorum 1): it proves that every client follows the master the sentinels name, through
a failover, not that Sentinel itself is highly available.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devtools.devstack import free_port

SERVICE_NAME = "editserve-master"


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class SentinelGroup:
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="editserve-sentinel-")))
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def url(self, db: int = 0, scheme: str = "redis+sentinel") -> str:
        return f"{scheme}://127.0.0.1:{self.ports['sentinel']}/{SERVICE_NAME}/{db}"

    def node(self, name: str, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.ports[name], db=db, socket_timeout=2)

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.ports["sentinel"], socket_timeout=2, decode_responses=True)

    def master_port(self) -> int:
        return int(self.sentinel().execute_command("SENTINEL", "get-master-addr-by-name", SERVICE_NAME)[1])

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.data_dir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir,
                                                start_new_session=True)

    def start(self) -> SentinelGroup:
        server = shutil.which("redis-server")
        sentinel = shutil.which("redis-sentinel")
        if not server or not sentinel:
            raise RuntimeError("redis-server and redis-sentinel are needed (apt-get install redis-server "
                               "redis-sentinel; scripts/bootstrap.sh does)")
        for name in ("a", "b", "sentinel"):
            self.ports[name] = free_port()
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
        self._spawn("a", [server, "--port", str(self.ports["a"]), "--dir", str(self.data_dir), *common])
        _wait(lambda: self.node("a").ping(), 20, "redis a")
        self._spawn("b", [server, "--port", str(self.ports["b"]), "--dir", str(self.data_dir), *common,
                          "--replicaof", "127.0.0.1", str(self.ports["a"])])
        _wait(lambda: self.node("b").info("replication")["master_link_status"] == "up", 30, "replica sync")
        conf = self.data_dir / "sentinel.conf"  # sentinel rewrites its config: it must be a writable file
        conf.write_text(f"port {self.ports['sentinel']}\nbind 127.0.0.1\nprotected-mode no\n"
                        f"dir {self.data_dir}\n"
                        f"sentinel monitor {SERVICE_NAME} 127.0.0.1 {self.ports['a']} 1\n"
                        f"sentinel down-after-milliseconds {SERVICE_NAME} 2000\n"
                        f"sentinel failover-timeout {SERVICE_NAME} 10000\n")
        self._spawn("sentinel", [sentinel, str(conf)])
        _wait(lambda: self.master_port() == self.ports["a"], 20, "sentinel to know the master")
        _wait(lambda: len(self.sentinel().execute_command("SENTINEL", "replicas", SERVICE_NAME)) >= 1, 30,
              "sentinel to discover the replica")
        return self

    def _request_failover(self) -> bool:
        """SENTINEL FAILOVER; False while Sentinel has not yet judged the in-sync replica promotable (it reads a
        replica's state every few seconds, so a failover asked right after the sync answers NOGOODSLAVE)."""
        try:
            self.sentinel().execute_command("SENTINEL", "FAILOVER", SERVICE_NAME)
        except redis.ResponseError as exc:
            if "NOGOODSLAVE" in str(exc):
                time.sleep(0.5)
                return False
            raise
        return True

    def failover(self, timeout: float = 60.0) -> int:
        """Promote the replica (as Sentinel does when the master dies) and wait until both nodes agree."""
        old = self.master_port()
        new_name = "b" if old == self.ports["a"] else "a"
        _wait(lambda: self.node(new_name).info("replication").get("master_link_status") == "up", 30, "sync")
        _wait(self._request_failover, 30, "sentinel to accept the failover")
        old_name = "a" if new_name == "b" else "b"
        _wait(lambda: self.master_port() == self.ports[new_name]
              and self.node(new_name).info("replication")["role"] == "master"
              and self.node(old_name).info("replication")["role"] == "slave", timeout, "failover")
        return self.ports[new_name]

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.data_dir, ignore_errors=True)

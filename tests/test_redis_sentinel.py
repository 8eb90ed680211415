"""Redis beyond one node: every client comes from service.redisconn, which follows a Sentinel master.

A real Sentinel group (redis-server master + replica, redis-sentinel) runs on loopback. The whole service
(uvicorn gateway, batching worker, webhook sender) is given only the sentinel's address; an edit goes
submit -> worker -> result, then Sentinel promotes the replica and the next edit still completes. A TLS-only
redis-server checks ``rediss://`` URLs (certificate verified against the CA given in the URL).
"""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from rq import Queue

from editserve import Client, EditStatus, verify_webhook
from service import redisconn
from service.config import Settings
from devtools.devstack import LocalStack, free_port
from sentinel_support import SentinelGroup

SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def group():
    g = SentinelGroup().start()
    yield g
    g.stop()


def test_settings_accept_sentinel_and_tls_urls_and_name_the_field_when_malformed():
    ok = ["redis://h:6379/0", "rediss://:pw@h:6380/1?ssl_cert_reqs=none",
          "redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3?sentinel_password=sp&socket_timeout=2",
          "rediss+sentinel://[::1]/mymaster"]
    for url in ok:
        assert Settings(redis_url=url).redis_url == url
    target = redisconn.parse_sentinel_url(ok[2])
    assert target.sentinels == (("s1", 26379), ("s2", 26380)) and target.service_name == "mymaster"
    assert (target.db, target.password, target.sentinel_password) == (3, "pw", "sp")
    assert target.options == {"socket_timeout": 2.0} and not target.tls
    assert redisconn.parse_sentinel_url(ok[3]).sentinels == (("::1", 26379),)
    assert redisconn.parse_sentinel_url(ok[3]).tls
    for bad, says in [("http://h", "must start with"), ("redis+sentinel:///m", "no sentinel host"),
                      ("redis+sentinel://h:x/m", "bad sentinel port"), ("redis+sentinel://h", "SERVICE_NAME"),
                      ("redis+sentinel://:secret@h/m/db", "not a number")]:
        with pytest.raises(ValueError) as err:
            Settings(redis_url=bad)
        assert "redis_url" in str(err.value) and says in str(err.value)
        assert "secret" not in str(err.value).split("input_value")[0]  # our message redacts the password


def test_sync_async_and_rq_clients_follow_the_master_through_a_failover(group):
    url = group.url(db=2)
    sync, rq_conn = redisconn.sync_client(url), redisconn.rq_client(url, decode_responses=True)
    sync.set("k", "before")
    assert redis.Redis(port=group.master_port(), db=2).get("k") == b"before"
    queue = Queue("sentinel-check", connection=rq_conn)
    job = queue.enqueue("builtins.len", "abc")
    assert rq_conn.get_connection_kwargs().get("decode_responses") is False  # RQ stores bytes

    async def roundtrip(value: str) -> bytes:
        client = redisconn.async_client(url)
        try:
            await client.set("a", value)
            return await client.get("a")
        finally:
            await client.aclose()

    assert asyncio.run(roundtrip("one")) == b"one"
    new_master = group.failover()
    # The same client objects now talk to the promoted node: a plain URL to the old one would get READONLY.
    for attempt in range(50):
        try:
            sync.set("k", "after")
            break
        except (redis.ConnectionError, redis.ReadOnlyError):  # the first command may meet a closed socket
            if attempt == 49:
                raise
    assert redis.Redis(port=new_master, db=2).get("k") == b"after"
    assert Queue("sentinel-check", connection=rq_conn).job_ids == [job.id]
    assert asyncio.run(roundtrip("two")) == b"two"
    assert redis.Redis(port=new_master, db=2).get("a") == b"two"


class _Receiver(BaseHTTPRequestHandler):
    events: list[tuple[str, str]] = []
    secret = Settings().webhooks.secret

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        event = verify_webhook(self.secret, dict(self.headers), body)
        self.events.append((event.data.id, event.type))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.e2e
def test_submit_worker_result_and_webhook_through_sentinel_across_a_failover(group, s3_server, tiny_models):
    url = group.url(db=5)
    hooks = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    stack = LocalStack(redis_url=url, s3=s3_server, models_dir=tiny_models["tiny-sd"].parent,
                       extra_env={"EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]',
                                  "EDITSERVE_WEBHOOKS__BACKOFF_SECONDS": "[0.2, 0.5, 1, 2, 4]",
                                  "EDITSERVE_WORKER__MAX_BATCH_WAIT_MS": "0"})
    try:
        stack.start_gateway()
        stack.start_worker("sentinel-worker", models="tiny-sd")
        stack.start_webhook_sender()
        with Client(stack.base_url, timeout=30) as client:
            def one_edit(seed: int):
                edit = client.submit_p2p("a photo of a cat", ["a photo of a dog"], edit="replace", steps=STEPS,
                                         height=SIZE, width=SIZE, seed=seed,
                                         webhook={"url": hook_url, "events": ["completed"]})
                return client.wait(edit.id, timeout=240, progress=False)

            first = one_edit(1)
            assert first.status == EditStatus.succeeded, first
            old_master = group.master_port()
            assert redis.Redis(port=old_master, db=5).exists(f"rq:job:{first.id}") or \
                redis.Redis(port=old_master, db=5).dbsize() > 0  # the data is on the master Sentinel named
            new_master = group.failover()
            second = one_edit(2)
            assert second.status == EditStatus.succeeded, second
            assert client.download(second, stack.log_dir)  # the result object is in S3
            assert redis.Redis(port=new_master, db=5).dbsize() > 0
            deadline_checks = 0
            while {first.id, second.id} - {i for i, t in _Receiver.events if t == "edit.completed"}:
                deadline_checks += 1
                assert deadline_checks < 600, f"webhooks not delivered: {_Receiver.events}"
                threading.Event().wait(0.1)
        for name in ("gateway", "sentinel-worker", "webhooks"):
            assert stack.processes[name].poll() is None, (name, stack.log(name).read_text()[-3000:])
    finally:
        stack.stop()
        hooks.shutdown()


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that speaks TLS only (self-signed certificate for 127.0.0.1, made with openssl)."""
    import shutil
    import subprocess

    from sentinel_support import _wait

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--tls-port", str(port), "--tls-cert-file",
                             str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                             "--tls-auth-clients", "no", "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        _wait(lambda: redisconn.sync_client(url, socket_timeout=2).ping(), 20, "TLS redis")
        yield port, cert, url
    finally:
        proc.terminate()
        proc.wait(10)


def test_tls_url_reaches_a_tls_only_redis_and_checks_its_certificate(tls_redis):
    port, cert, url = tls_redis
    assert Settings(redis_url=url).redis_url == url
    job = Queue("tls-check", connection=redisconn.rq_client(url)).enqueue("builtins.len", "abc")
    assert Queue("tls-check", connection=redisconn.sync_client(url)).job_ids == [job.id]

    async def roundtrip() -> bytes:
        client = redisconn.async_client(url)
        try:
            await client.set("t", "tls")
            return await client.get("t")
        finally:
            await client.aclose()

    assert asyncio.run(roundtrip()) == b"tls"
    with pytest.raises(redis.ConnectionError):  # the server's certificate is not trusted without the CA
        redisconn.sync_client(f"rediss://127.0.0.1:{port}/0", socket_timeout=2).ping()
    with pytest.raises(redis.ConnectionError):  # and it speaks no plain text
        redisconn.sync_client(f"redis://127.0.0.1:{port}/0", socket_timeout=2).ping()

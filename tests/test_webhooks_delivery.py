"""Webhook emission and delivery (service/webhooks.py, service/egress.py) against a real Redis and a real
HTTP receiver on 127.0.0.1; the retry flow runs the actual delivery process (``python -m service.webhooks``)."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from prometheus_client import REGISTRY
from rq import Queue, SimpleWorker
from rq.registry import ScheduledJobRegistry

from editserve.contract import Edit, EditStatus, Progress, WebhookDeliveryState, WebhookEventType
from editserve.webhooks import WebhookVerificationError, verify
from service import egress
from service.webhooks import delivery as wh_delivery
from service.webhooks import emit as wh_emit
from service.webhooks import events as wh_events
from service.webhooks import failed as wh_failed
from service.config import Settings, WebhookSettings

REPO = Path(__file__).resolve().parent.parent
E = WebhookEventType


# ---------------------------------------------------------------------------------------------- receiver

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class Receiver:
    """A real HTTP server in a thread; answers with scripted replies (then 200) and records every request."""

    def __init__(self, tls_context=None):
        receiver = self
        self.requests: list[Received] = []
        self.script: list[Reply] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                  body, time.monotonic()))
                reply = receiver.script.pop(0) if receiver.script else Reply()
                time.sleep(reply.delay)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def redis(redis_url):
    return redis_lib.Redis.from_url(redis_url)


def make_settings(redis_url: str, **webhooks) -> Settings:
    defaults = dict(allow_hosts=["127.0.0.1"], backoff_seconds=[0.05], timeout_seconds=2.0, max_attempts=3,
                    jitter_ratio=0.0, progress_min_interval_seconds=0.2, metrics_port=0)
    return Settings(redis_url=redis_url, webhooks=WebhookSettings(**{**defaults, **webhooks}))


def make_edit(edit_id: str, url: str, events=(E.started, E.completed), status=EditStatus.processing,
              step: int | None = None) -> Edit:
    return Edit(id=edit_id, kind="p2p", model="tiny-sd", status=status,
                created_at=dt.datetime.now(dt.timezone.utc), params={"seed": 7},
                progress=Progress(step=step, total=50) if step is not None else None,
                webhook=WebhookDeliveryState(url=url, events=list(events)))


def delivery(url: str, edit_id: str = "ed1", event: str = "completed", attempt: int = 1) -> wh_events.Delivery:
    body = json.dumps({"type": f"edit.{event}", "timestamp": "2026-01-01T00:00:00Z",
                       "data": json.loads(make_edit(edit_id, url).model_dump_json())})
    return wh_events.Delivery(msg_id=f"msg_{edit_id}_{event}", edit_id=edit_id, tenant="default", url=url, event=event,
                       body=body, attempt=attempt)


def state(redis, edit_id: str = "ed1") -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in redis.hgetall(wh_events.state_key(edit_id)).items()}


def queued_jobs(redis) -> list:
    return Queue(wh_events.QUEUE_NAME, connection=redis).get_jobs()


def scheduled_jobs(redis) -> list[tuple[str, float]]:
    registry = ScheduledJobRegistry(wh_events.QUEUE_NAME, connection=redis)
    return [(job_id, registry.get_expiration_time(registry.job_class.fetch(job_id, connection=redis)).timestamp())
            for job_id in registry.get_job_ids()]


def deliveries_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("editserve_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def use_settings(monkeypatch, settings) -> None:
    """The parts that read settings through get_settings (the RQ job, emit, the failed list) see ``settings``."""
    for module in (wh_delivery, wh_emit, wh_failed):
        monkeypatch.setattr(module, "get_settings", lambda: settings)


def run_queue_inline(redis, settings, monkeypatch) -> None:
    """Deliver everything queued now, in this process (the job reads settings via get_settings)."""
    use_settings(monkeypatch, settings)
    SimpleWorker([Queue(wh_events.QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)


# ---------------------------------------------------------------------------------------------- emission

def test_emit_and_deliver_signed_event_with_tenant_secret(redis, redis_url, receiver, monkeypatch):
    from service.auth import KeyStore

    settings = make_settings(redis_url)
    tenant_secret = KeyStore(redis, settings).ensure_tenant("acme")
    redis.hset("editserve:edit:ed1", mapping={"tenant": "acme", "status": "succeeded"})  # JobStore's record
    before = deliveries_total("delivered")

    edit = make_edit("ed1", receiver.url(), status=EditStatus.succeeded)
    wh_emit.emit(redis, edit, "completed", "acme", settings=settings)
    assert state(redis)["pending"] == "1"
    run_queue_inline(redis, settings, monkeypatch)

    [request] = receiver.requests
    event = verify(tenant_secret, request.headers, request.body)
    assert event.type == "edit.completed" and event.data.id == "ed1" and event.data.status is EditStatus.succeeded
    assert request.headers["webhook-id"] == "msg_ed1_completed"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    with pytest.raises(WebhookVerificationError):
        verify(settings.webhooks.secret, request.headers, request.body)  # not the global secret

    s = state(redis)
    assert (s["delivered"], s["pending"], s["attempts"], s["last_status"]) == ("1", "0", "1", "200")
    assert json.loads(s["events"]) == ["started", "completed"] and s["url"] == receiver.url()
    assert wh_events.read_state(redis, "ed1") == WebhookDeliveryState(url=receiver.url(), events=[E.started, E.completed],
                                                                delivered=1, failed=0)
    assert redis.hget("editserve:edit:ed1", "webhook_delivered") == b"1"  # mirrored for Edit.webhook
    assert deliveries_total("delivered") == before + 1
    assert 0 < redis.ttl(wh_events.state_key("ed1")) <= settings.webhooks.state_ttl_seconds


def test_default_tenant_without_secret_uses_global_secret(redis, redis_url, receiver, monkeypatch):
    settings = make_settings(redis_url)
    wh_emit.emit(redis, make_edit("ed1", receiver.url()), "started", "default", settings=settings)
    run_queue_inline(redis, settings, monkeypatch)
    [request] = receiver.requests
    assert verify(settings.webhooks.secret, request.headers, request.body).type == "edit.started"
    assert not redis.exists("editserve:edit:ed1")  # no partial edit record is created for unknown edits


def test_event_filter_and_at_most_once_emission(redis, redis_url):
    settings = make_settings(redis_url)
    only_completed = make_edit("ed1", "http://127.0.0.1:9/x", events=[E.completed])
    wh_emit.emit(redis, only_completed, "started", "t", settings=settings)
    wh_emit.emit(redis, only_completed.model_copy(update={"progress": Progress(step=1, total=5)}), "progress", "t",
            settings=settings)
    assert queued_jobs(redis) == []
    wh_emit.emit(redis, only_completed, "completed", "t", settings=settings)
    wh_emit.emit(redis, only_completed, "completed", "t", settings=settings)  # e.g. a duplicate status write
    assert len(queued_jobs(redis)) == 1

    no_webhook = make_edit("ed2", "http://x").model_copy(update={"webhook": None})
    wh_emit.emit(redis, no_webhook, "completed", "t", settings=settings)
    wh_emit.emit(redis, make_edit("ed3", "http://x"), "bogus", "t", settings=settings)  # logged, never raised
    assert len(queued_jobs(redis)) == 1
    assert not redis.exists(wh_events.state_key("ed2")) and not redis.exists(wh_events.state_key("ed3"))

    # Status names are accepted as aliases: processing → started, any terminal status → completed.
    wh_emit.emit(redis, make_edit("ed4", "http://x"), "processing", "t", settings=settings)
    wh_emit.emit(redis, make_edit("ed4", "http://x"), "canceled", "t", settings=settings)
    assert sorted(j.args[0]["msg_id"] for j in queued_jobs(redis)[1:]) == ["msg_ed4_completed", "msg_ed4_started"]


def test_progress_is_throttled_per_edit(redis, redis_url):
    # A window no loaded box outlasts; its end is then driven (the window is a Redis key that expires after the
    # interval, so expiring it now is the interval passing) instead of slept through.
    settings = make_settings(redis_url, progress_min_interval_seconds=60)
    events = [E.started, E.progress, E.completed]
    for step in range(1, 6):
        wh_emit.emit(redis, make_edit("ed1", "http://x", events=events, step=step), "progress", "t", settings=settings)
    wh_emit.emit(redis, make_edit("ed2", "http://x", events=events, step=1), "progress", "t", settings=settings)
    assert [j.args[0]["msg_id"] for j in queued_jobs(redis)] == ["msg_ed1_progress_1", "msg_ed2_progress_1"]
    assert 59_000 < redis.pttl(wh_events.throttle_key("ed1")) <= 60_000  # the window is the setting's interval
    redis.delete(wh_events.throttle_key("ed1"))  # the interval has passed for ed1
    wh_emit.emit(redis, make_edit("ed1", "http://x", events=events, step=9), "progress", "t", settings=settings)
    wh_emit.emit(redis, make_edit("ed1", "http://x", events=events, status=EditStatus.succeeded), "completed", "t",
            settings=settings)  # terminal events are never throttled
    ids = [j.args[0]["msg_id"] for j in queued_jobs(redis)]
    assert ids[2:] == ["msg_ed1_progress_9", "msg_ed1_completed"]
    body = json.loads(queued_jobs(redis)[2].args[0]["body"])
    assert body["type"] == "edit.progress" and body["data"]["progress"] == {"step": 9, "total": 50}


def test_emit_accepts_a_decoding_redis_client(redis_url, receiver):
    decoding = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    settings = make_settings(redis_url)
    wh_emit.emit(decoding, make_edit("ed1", receiver.url()), "started", "t", settings=settings)
    assert len(queued_jobs(redis_lib.Redis.from_url(redis_url))) == 1
    assert wh_events.read_state(decoding, "ed1").url == receiver.url()


# ---------------------------------------------------------------------------------------------- delivery outcomes

def test_retry_after_on_429_is_honoured_and_scheduled(redis, redis_url, receiver):
    settings = make_settings(redis_url, backoff_seconds=[0.05])
    receiver.script = [Reply(429, {"Retry-After": "30"})]
    result = wh_delivery.Deliverer(settings, redis).run(delivery(receiver.url()))
    assert result.outcome is wh_events.DeliveryOutcome.retrying and 30 <= result.retry_in <= 31
    [(_, when)] = scheduled_jobs(redis)
    assert 28 <= when - time.time() <= 32
    job = ScheduledJobRegistry(wh_events.QUEUE_NAME, connection=redis).job_class.fetch(
        ScheduledJobRegistry(wh_events.QUEUE_NAME, connection=redis).get_job_ids()[0], connection=redis)
    assert job.args[0]["attempt"] == 2 and job.args[0]["msg_id"] == "msg_ed1_completed"
    assert state(redis)["last_error"] == "HTTP 429: ok" and state(redis).get("failed") is None


def test_retry_delay_schedule_jitter_and_caps():
    config = WebhookSettings(backoff_seconds=[1, 5, 30], jitter_ratio=0.2, max_retry_after_seconds=60)
    assert wh_delivery.retry_delay(1, config, rand=lambda: 0.5) == 1
    assert wh_delivery.retry_delay(2, config, rand=lambda: 0.0) == pytest.approx(4.0)
    assert wh_delivery.retry_delay(3, config, rand=lambda: 1.0) == pytest.approx(36.0)
    assert wh_delivery.retry_delay(9, config, rand=lambda: 0.5) == 30  # past the list: its last entry
    assert wh_delivery.retry_delay(1, config, retry_after=10, rand=lambda: 0.5) == 10
    assert wh_delivery.retry_delay(1, config, retry_after=10_000, rand=lambda: 0.5) == 60
    assert wh_delivery.parse_retry_after("120") == 120
    future = email_date(time.time() + 100)
    assert 95 <= wh_delivery.parse_retry_after(future) <= 101
    assert wh_delivery.parse_retry_after("soon") is None and wh_delivery.parse_retry_after(None) is None


def email_date(ts: float) -> str:
    import email.utils

    return email.utils.formatdate(ts, usegmt=True)


def test_redirect_is_not_followed_and_counts_as_failure(redis, redis_url, receiver):
    settings = make_settings(redis_url, max_attempts=1)
    receiver.script = [Reply(302, {"Location": receiver.url("/elsewhere")})]
    before = deliveries_total("failed")
    result = wh_delivery.Deliverer(settings, redis).run(delivery(receiver.url()))
    assert result.outcome is wh_events.DeliveryOutcome.failed and result.status_code == 302
    assert [r.path for r in receiver.requests] == ["/hook"]  # /elsewhere never requested
    s = state(redis)
    assert s["failed"] == "1" and "redirect" in s["last_error"] and "/elsewhere" in s["last_error"]
    assert scheduled_jobs(redis) == [] and queued_jobs(redis) == []
    assert deliveries_total("failed") == before + 1

    # With attempts left, a redirect is retried like any other failure.
    receiver.script = [Reply(301, {"Location": "http://169.254.169.254/"})]
    retry = wh_delivery.Deliverer(make_settings(redis_url, max_attempts=3), redis).run(delivery(receiver.url(), "ed2"))
    assert retry.outcome is wh_events.DeliveryOutcome.retrying and len(scheduled_jobs(redis)) == 1


def test_410_gives_up_and_stops_later_events(redis, redis_url, receiver):
    settings = make_settings(redis_url)
    receiver.script = [Reply(410)]
    deliverer = wh_delivery.Deliverer(settings, redis)
    assert deliverer.run(delivery(receiver.url(), event="started")).outcome is wh_events.DeliveryOutcome.gone
    assert deliverer.run(delivery(receiver.url(), event="completed")).outcome is wh_events.DeliveryOutcome.gone
    assert len(receiver.requests) == 1
    s = state(redis)
    assert (s["failed"], s["gone"]) == ("2", "1") and scheduled_jobs(redis) == []


def test_progress_events_are_not_retried(redis, redis_url, receiver):
    receiver.script = [Reply(500)]
    result = wh_delivery.Deliverer(make_settings(redis_url), redis).run(delivery(receiver.url(), event="progress"))
    assert result.outcome is wh_events.DeliveryOutcome.failed and scheduled_jobs(redis) == []


def test_timeout_is_a_retryable_failure(redis, redis_url, receiver):
    receiver.script = [Reply(200, delay=1.0)]
    result = wh_delivery.Deliverer(make_settings(redis_url, timeout_seconds=0.2), redis).run(delivery(receiver.url()))
    assert result.outcome is wh_events.DeliveryOutcome.retrying and "timeout" in result.error


def test_connection_refused_is_a_retryable_failure(redis, redis_url, receiver):
    port = receiver.port
    receiver.close()
    result = wh_delivery.Deliverer(make_settings(redis_url), redis).run(delivery(f"http://127.0.0.1:{port}/hook"))
    assert result.outcome is wh_events.DeliveryOutcome.retrying and "connection error" in result.error


# ---------------------------------------------------------------------------------------------- SSRF guard

PRIVATE_FORMS = [
    "http://127.0.0.1:{port}/hook",
    "http://[::1]:{port}/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/hook",
    "http://192.168.1.1/hook",
    "http://172.16.0.1/hook",
    "http://100.64.0.1/hook",  # CGNAT
    "http://0.0.0.0:{port}/hook",
    "http://0x7f000001:{port}/hook",  # hex dword
    "http://2130706433:{port}/hook",  # decimal dword
    "http://0177.0.0.1:{port}/hook",  # octal
    "http://127.1:{port}/hook",  # short form
    "http://localhost:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",  # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/hook",  # mapped 169.254.169.254 in hex
    "http://[2002:7f00:1::]/hook",  # 6to4 embedding 127.0.0.1
    "http://[64:ff9b::a00:1]/hook",  # NAT64 embedding 10.0.0.1
    "http://[fe80::1]/hook",
    "http://[fd00::1]/hook",
    "http://224.0.0.1/hook",  # multicast
    "http://240.0.0.1/hook",  # reserved
    "https://127.0.0.1:{port}/hook",
]


@pytest.mark.parametrize("template", PRIVATE_FORMS)
def test_non_global_destinations_are_refused(redis, redis_url, receiver, template):
    settings = make_settings(redis_url, allow_hosts=[])
    before = deliveries_total("refused")
    result = wh_delivery.Deliverer(settings, redis).run(delivery(template.format(port=receiver.port)))
    assert result.outcome is wh_events.DeliveryOutcome.refused, result.error
    assert receiver.requests == [] and scheduled_jobs(redis) == []
    assert state(redis)["failed"] == "1" and state(redis)["last_error"].startswith("refused:")
    assert deliveries_total("refused") == before + 1


def test_hostnames_resolving_to_private_addresses_are_refused(redis, redis_url):
    records = {"rebind.example": ["10.1.2.3"], "mixed.example": ["93.184.216.34", "127.0.0.1"],
               "v6.example": ["2606:4700::1111", "::1"]}
    deliverer = wh_delivery.Deliverer(make_settings(redis_url, allow_hosts=[]), redis,
                             resolver=lambda host, port: records[host])
    for host in records:
        result = deliverer.run(delivery(f"http://{host}/hook", edit_id=host.split(".")[0]))
        assert result.outcome is wh_events.DeliveryOutcome.refused, host


def test_other_schemes_and_unresolvable_names():
    allow = egress.AllowList.parse([])
    for url in ["ftp://example.com/x", "file:///etc/passwd", "gopher://127.0.0.1/"]:
        with pytest.raises(egress.DestinationRefused, match="scheme"):
            egress.check_url(url, allow)

    def nxdomain(host, port):
        raise OSError("Name or service not known")

    with pytest.raises(egress.DestinationRefused) as info:
        egress.check_url("http://does-not-exist.invalid/", allow, nxdomain)
    assert info.value.permanent is False  # DNS may recover: retried, not refused


@pytest.mark.parametrize("allow, host", [
    (["127.0.0.1"], "127.0.0.1"),
    (["127.0.0.0/8"], "0x7f000001"),
    (["localhost"], "localhost"),
    (["LOCALHOST."], "localhost"),
])
def test_allow_list_admits_hosts_ips_and_cidrs(redis, redis_url, receiver, allow, host):
    result = wh_delivery.Deliverer(make_settings(redis_url, allow_hosts=allow), redis).run(delivery(receiver.url(host=host)))
    assert result.outcome is wh_events.DeliveryOutcome.delivered, result.error
    assert receiver.requests[0].headers["host"] == f"{host}:{receiver.port}"


def test_connects_to_the_checked_ip_and_keeps_the_host_header(redis, redis_url, receiver):
    """DNS rebinding: the name is resolved once, checked, and that very IP is used (never re-resolved)."""
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # a second lookup would rebind to metadata
    calls = []

    def resolver(host, port):
        calls.append(host)
        return next(answers)

    deliverer = wh_delivery.Deliverer(make_settings(redis_url, allow_hosts=["127.0.0.1"]), redis, resolver=resolver)
    result = deliverer.run(delivery(receiver.url(host="hooks.example.test")))
    assert result.outcome is wh_events.DeliveryOutcome.delivered
    assert calls == ["hooks.example.test"]  # the name the OS cannot even resolve was reached via the pin
    assert receiver.requests[0].headers["host"] == f"hooks.example.test:{receiver.port}"
    # The next attempt re-checks and, now that the name rebinds, refuses.
    assert deliverer.run(delivery(receiver.url(host="hooks.example.test"), "ed2")).outcome is wh_events.DeliveryOutcome.refused


def test_https_pinned_ip_keeps_sni_and_certificate_name(redis, redis_url, tmp_path):
    ssl_ctx = _tls_contexts(tmp_path, "hooks.example.test")
    server = Receiver(tls_context=ssl_ctx["server"])
    try:
        deliverer = wh_delivery.Deliverer(
            make_settings(redis_url), redis, resolver=lambda host, port: ["127.0.0.1"],
            client_factory=lambda: httpx.Client(verify=ssl_ctx["client"], follow_redirects=False, trust_env=False))
        ok = deliverer.run(delivery(server.url(host="hooks.example.test", scheme="https")))
        assert ok.outcome is wh_events.DeliveryOutcome.delivered, ok.error
        assert server.requests[0].headers["host"] == f"hooks.example.test:{server.port}"
        # A name the certificate does not cover fails verification, even though the IP is the same.
        bad = deliverer.run(delivery(server.url(host="other.example.test", scheme="https"), "ed2"))
        assert bad.outcome is wh_events.DeliveryOutcome.retrying and "connection error" in bad.error
    finally:
        server.close()


def _tls_contexts(tmp_path, hostname):
    import ssl

    from cryptography import x509  # a dev dependency (pyproject's `dev` extra): never skipped
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return {"server": server, "client": client}


# ---------------------------------------------------------------------------------------------- the process

def test_delivery_process_retries_with_backoff_then_delivers_once(redis, redis_url, receiver):
    settings = make_settings(redis_url, backoff_seconds=[0.5], max_attempts=5)
    receiver.script = [Reply(503), Reply(500)]
    env = {**os.environ, "EDITSERVE_REDIS_URL": redis_url, "EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]',
           "EDITSERVE_WEBHOOKS__BACKOFF_SECONDS": "[0.5]", "EDITSERVE_WEBHOOKS__MAX_ATTEMPTS": "5",
           "EDITSERVE_WEBHOOKS__JITTER_RATIO": "0", "EDITSERVE_WEBHOOKS__METRICS_PORT": "0"}
    process = subprocess.Popen([sys.executable, "-m", "service.webhooks", "--log-level", "WARNING"], cwd=REPO, env=env)
    try:
        wh_emit.emit(redis, make_edit("ed1", receiver.url(), status=EditStatus.succeeded), "completed", "t",
                settings=settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and state(redis).get("delivered") != "1":
            assert process.poll() is None, "delivery process exited"
            time.sleep(0.1)
        assert state(redis).get("delivered") == "1", state(redis)
        time.sleep(0.5)  # nothing else may arrive
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    assert len(receiver.requests) == 3
    assert {r.headers["webhook-id"] for r in receiver.requests} == {"msg_ed1_completed"}
    assert len({r.body for r in receiver.requests}) == 1  # same event body, freshly signed per attempt
    for request in receiver.requests:
        verify(settings.webhooks.secret, request.headers, request.body)
    gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:])]
    assert all(gap >= 0.5 for gap in gaps), gaps
    s = state(redis)
    assert (s["delivered"], s.get("failed", "0"), s["pending"], s["attempts"]) == ("1", "0", "0", "3")
    assert s["last_error"] == "HTTP 500: ok" and s["last_status"] == "200"


# ---------------------------------------------------------------------------------------------- with JobStore

def test_jobstore_status_changes_reach_the_receiver_and_edit_shows_the_outcome(redis, redis_url, receiver,
                                                                               monkeypatch):
    """The integration the gateway relies on: JobStore tells emit(); outcomes come back as Edit.webhook."""
    from gateway_support import p2p_payload

    from editserve.contract import WebhookSpec
    from service.jobstore import JobStore

    settings = make_settings(redis_url)
    use_settings(monkeypatch, settings)  # emit() as called by JobStore
    store = JobStore(redis, settings, listeners=[wh_emit.emit])  # as the gateway's and worker's mains wire it
    spec = WebhookSpec(url=receiver.url(), events=[E.started, E.progress, E.completed])
    edit, _ = store.create(p2p_payload("ed1edit"), webhook=spec, idempotency_key=None)
    assert store.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    for step in range(1, 5):
        store.set_progress(edit.id, step, 4)
    store.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=0.1)
    SimpleWorker([Queue(wh_events.QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)

    events = [verify(settings.webhooks.secret, r.headers, r.body) for r in receiver.requests]
    types = [e.type for e in events]
    assert types[0] == "edit.started" and types[-1] == "edit.completed"
    assert 1 <= types.count("edit.progress") <= 2  # throttled (0.2 s) from 4 steps
    assert events[-1].data.status is EditStatus.succeeded
    shown = store.get(edit.id).webhook
    assert shown.delivered == len(events) and shown.failed == 0

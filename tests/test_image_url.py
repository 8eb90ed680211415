"""IP2P inputs by https URL (``image_url``): the gateway fetches them under the webhook egress guard
(service/egress.py) — a real local HTTPS server (certificate made with ``cryptography``, trusted through
``image_urls.ca_bundle``), the real gateway, Redis, the S3 endpoint and an in-process worker with the tiny model.

Loopback is allow-listed for the test server only as ``127.0.0.1/32`` (the setting, as the webhook tests do), so
``127.0.0.2`` is still loopback to the guard: a "private address" that is really there.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import io
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from gateway_support import make_settings, png
from PIL import Image

from editserve.contract import EditStatus

LIMIT = 200_000  # limits.max_image_bytes for these tests
TIMEOUT = 1.5  # image_urls.timeout_seconds


def _certificate(tmp_path):
    from cryptography import x509  # a dev dependency (pyproject's `dev` extra): never skipped
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                                                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.2")),
                                                        x509.DNSName("images.example.test")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class ImageServer:
    """HTTPS on 127.0.0.1: a PNG, redirects, oversized and slow bodies. Logs every path it is asked for."""

    def __init__(self, cert_path, key_path):
        self.png = png(96, 64, (30, 160, 220))
        self.paths: list[str] = []
        self.hosts: list[str] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.paths.append(self.path)
                server.hosts.append(self.headers.get("host", ""))
                route = getattr(self, "route_" + self.path.strip("/").split("?")[0].replace("-", "_").replace(".", "_"), None)
                if route is None:
                    self.reply(404, b"not found", "text/plain")
                else:
                    route()

            def reply(self, status, body, content_type="image/png", **headers):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def route_cat_png(self):
                self.reply(200, server.png)

            def route_redirect_good(self):
                self.reply(302, b"", "text/plain", Location="/cat.png")

            def route_redirect_private(self):  # the same server, but named by an address the guard refuses
                self.reply(302, b"", "text/plain", Location=f"https://127.0.0.2:{server.port}/cat.png")

            def route_redirect_metadata(self):
                self.reply(301, b"", "text/plain", Location="http://169.254.169.254/latest/meta-data/")

            def route_big(self):  # announced: refused from Content-Length
                self.reply(200, server.png + b"\0" * LIMIT)

            def route_big_chunked(self):  # not announced: refused while streaming
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"\0" * 16384
                try:
                    for _ in range(4 * LIMIT // len(chunk)):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the gateway hung up once over the limit

            def route_drip(self):  # a byte every 0.1 s: each read is quick, the whole takes 6 s
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "60")
                self.end_headers()
                try:
                    for _ in range(60):
                        if server.stop.is_set():
                            break
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass

            def route_page_html(self):
                self.reply(200, b"<html>not a picture</html>", "text/html")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return _certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def images(tls):
    server = ImageServer(*tls)
    yield server
    server.close()


@pytest.fixture
def app(redis_url, s3, tls):
    from service.app import create_app

    settings = make_settings(redis_url, s3, image_urls={"allow_hosts": ["127.0.0.1/32"], "timeout_seconds": TIMEOUT,
                                                        "ca_bundle": str(tls[0])},
                             limits={"max_image_bytes": LIMIT})
    return create_app(settings, prepare_bucket=False)


@pytest.fixture
def client(app):
    with TestClient(app) as test_client:
        yield test_client


def submit(client, **fields):
    return client.post("/v1/edits", json={"kind": "ip2p", "instruction": "make it snowy", "resolution": 64,
                                          "steps": 2, "seed": 3, **fields})


def refused(response, status: int = 422) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == "image_url", error
    return error["message"]


@pytest.mark.parametrize("path", ["/cat.png", "/redirect-good"])
def test_an_https_image_is_fetched_and_edited(client, app, images, make_worker, path):
    response = submit(client, image_url=images.url(path))
    assert response.status_code == 202, response.text
    edit_id = response.json()["id"]
    services = app.state.services
    payload = services.jobstore.load_payload(edit_id)
    assert payload.request.image_url == images.url(path)
    stored = Image.open(io.BytesIO(services.storage.get_bytes(payload.input_image_key)))
    assert stored.size == (64, 64) and stored.getpixel((32, 32)) == (30, 160, 220)  # the served picture, resized
    assert images.paths[-1] == "/cat.png"

    report = make_worker().run_once(5.0)
    assert report is not None and report.outcomes == {edit_id: "succeeded"}
    edit = client.get(f"/v1/edits/{edit_id}").json()
    assert edit["status"] == EditStatus.succeeded.value and len(edit["results"]) == 1
    assert edit["params"]["image_url"] == images.url(path)


def test_private_addresses_are_refused_before_connecting(client, images):
    before = len(images.paths)
    assert "loopback" in refused(submit(client, image_url=images.url("/cat.png", host="127.0.0.2")))
    assert "private" in refused(submit(client, image_url="https://10.1.2.3/cat.png"))
    assert "link-local" in refused(submit(client, image_url="https://169.254.169.254/latest/meta-data/"))
    assert len(images.paths) == before  # nothing was asked of any of them


def test_a_redirect_to_a_private_address_is_refused(client, images):
    message = refused(submit(client, image_url=images.url("/redirect-private")))
    assert "127.0.0.2" in message and "loopback" in message
    assert images.paths[-1] == "/redirect-private"  # the redirect was never followed
    message = refused(submit(client, image_url=images.url("/redirect-metadata")))
    assert "http" in message  # a downgrade to http:// (to the metadata address) is refused too
    assert images.paths[-1] == "/redirect-metadata"


def test_only_https(client, images):
    assert "https" in refused(submit(client, image_url=f"http://127.0.0.1:{images.port}/cat.png"))
    assert "https" in refused(submit(client, image_url="ftp://example.com/cat.png"))
    refused(submit(client, image_url="not a url"))


def test_an_oversized_image_is_refused_announced_or_streamed(client, images):
    announced = refused(submit(client, image_url=images.url("/big")), 413)
    assert f"is {len(images.png) + LIMIT} bytes, larger than the limit of {LIMIT}" in announced  # from the header
    streamed = refused(submit(client, image_url=images.url("/big-chunked")), 413)
    assert f"sent more than the limit of {LIMIT} bytes" in streamed  # counted while reading, not after


def test_a_source_slower_than_the_time_cap_is_refused(client, images):
    """A byte every 0.1 s keeps every read alive; only a cap on the whole fetch ends it (without one, the 60 bytes
    arrive after 6 s and the answer is "not an image" instead)."""
    message = refused(submit(client, image_url=images.url("/drip")))
    assert f"within {TIMEOUT:g} s" in message


def test_what_is_not_an_image_is_named_as_image_url(client, images):
    assert "not a recognised image" in refused(submit(client, image_url=images.url("/page-html")))
    assert "404" in refused(submit(client, image_url=images.url("/missing.png")))
    both = submit(client, image_url=images.url("/cat.png"), image=base64.b64encode(images.png).decode())
    assert "once" in refused(both)
    p2p = client.post("/v1/edits", json={"kind": "p2p", "source_prompt": "a cat", "target_prompts": ["a dog"],
                                         "image_url": images.url("/cat.png")})
    assert p2p.status_code == 422 and p2p.json()["error"]["field"] == "image_url"


def test_an_untrusted_certificate_is_refused(redis_url, s3, images):
    from service.app import create_app

    settings = make_settings(redis_url, s3, image_urls={"allow_hosts": ["127.0.0.1/32"]})  # default trust store
    with TestClient(create_app(settings, prepare_bucket=False)) as client:
        assert "could not" in refused(submit(client, image_url=images.url("/cat.png")))


def test_sdk_and_cli_send_an_image_url(app, images, capsys):
    from gateway_support import start_live_server

    from editserve import Client, cli, errors

    live = start_live_server(app)
    try:
        with Client(live.url, timeout=10) as sdk:
            edit = sdk.submit_ip2p(None, "make it snowy", image_url=images.url("/cat.png"), resolution=64, steps=2)
            assert edit.params["image_url"] == images.url("/cat.png")
            with pytest.raises(errors.InvalidRequestError) as refusal:
                sdk.submit_ip2p(None, "make it snowy", image_url=images.url("/cat.png", host="127.0.0.2"))
            assert refusal.value.field == "image_url"
        assert cli.main(["--url", live.url, "edit", "ip2p", "--image-url", images.url("/redirect-good"),
                         "--instruction", "make it snowy", "--resolution", "64", "--steps", "2", "--no-wait"]) == 0
        edit_id = capsys.readouterr().out.strip()
        assert app.state.services.jobstore.load_payload(edit_id).request.image_url == images.url("/redirect-good")
        assert cli.main(["--url", live.url, "edit", "ip2p", "--image-url", images.url("/big"),
                         "--instruction", "x", "--no-wait"]) == 5
        assert "image_url" in capsys.readouterr().err
    finally:
        live.stop()


def test_an_inversion_photo_by_url(client, app, images):
    """P2P from a real photo: POST /v1/inversions takes the photo by image_url under the same guard."""
    body = {"caption": "a blue picture", "model": "tiny-sd", "steps": 2, "resolution": 64, "method": "ddim"}
    response = client.post("/v1/inversions", json={**body, "image_url": images.url("/redirect-good")})
    assert response.status_code == 202, response.text
    payload = app.state.services.jobstore.load_payload(response.json()["id"])
    stored = Image.open(io.BytesIO(app.state.services.storage.get_bytes(payload.input_image_key)))
    assert stored.size == (64, 64) and stored.getpixel((32, 32)) == (30, 160, 220)
    private = client.post("/v1/inversions", json={**body, "image_url": images.url("/redirect-private")})
    assert "loopback" in refused(private)
    assert "not a recognised image" in refused(client.post("/v1/inversions",
                                                           json={**body, "image_url": images.url("/page-html")}))


def test_a_name_is_resolved_once_checked_and_pinned_with_its_sni(images, tls):
    """The fetch path of the guard (service.egress.fetch_bounded): the name is resolved once, the checked IP is
    connected to, Host and the certificate check keep the name; a name resolving to a private address is refused."""
    from service import egress

    answers = {"images.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"],
               "rebound.example.test": ["10.0.0.5"]}
    asked: list[str] = []

    def resolver(host, port):
        asked.append(host)
        return answers[host]

    async def fetch(host: str):
        async with egress.new_async_client(ssl.create_default_context(cafile=str(tls[0]))) as client:
            return await egress.fetch_bounded(f"https://{host}:{images.port}/cat.png",
                                              egress.AllowList.parse(["127.0.0.1/32"]), client=client,
                                              max_bytes=LIMIT, timeout=5, resolver=resolver)

    fetched = asyncio.run(fetch("images.example.test"))  # a name the OS cannot resolve: reached via the pin
    assert fetched.body == images.png and asked == ["images.example.test"]
    assert images.hosts[-1] == f"images.example.test:{images.port}"
    with pytest.raises(egress.FetchFailed, match="could not connect"):  # same IP, a name the certificate lacks
        asyncio.run(fetch("other.example.test"))
    with pytest.raises(egress.DestinationRefused, match="private"):
        asyncio.run(fetch("rebound.example.test"))


def test_the_default_async_client_trusts_only_the_system_store(images):
    """new_async_client() verifies certificates against the system store: a self-signed server is not reached."""
    from service import egress

    async def fetch():
        async with egress.new_async_client() as client:
            return await egress.fetch_bounded(images.url("/cat.png"), egress.AllowList.parse(["127.0.0.1/32"]),
                                              client=client, max_bytes=LIMIT, timeout=5)

    before = len(images.paths)
    with pytest.raises(egress.FetchFailed, match="could not connect"):
        asyncio.run(fetch())
    assert len(images.paths) == before

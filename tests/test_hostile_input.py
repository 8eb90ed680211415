"""Hostile and broken input at POST /v1/edits: every case is a 4xx naming the problem, nothing is queued,
and nothing big is read or allocated on the way to the refusal."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import resource
import socket
import struct
import time
import zlib

import pytest
import redis
from fastapi.testclient import TestClient
from gateway_support import edit_queue_lengths, edit_records, make_settings, png, start_live_server
from PIL import Image

from service import egress
from service.app import create_app
from service.errors import ApiError
from service.imaging import official_resize_dims
from service.intake import read_body_limited

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"]}


@pytest.fixture
def conn(redis_url):
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def client(redis_url, s3):
    return TestClient(create_app(make_settings(redis_url, s3), prepare_bucket=False))


@pytest.fixture
def small_body_server(redis_url, s3):
    """A real uvicorn with a small body cap, so the cap is quick to hit."""
    settings = make_settings(redis_url, s3, limits={"max_image_bytes": 30_000})
    server = start_live_server(create_app(settings, prepare_bucket=False))
    yield server
    server.stop()


def p2p(**changes) -> dict:
    return {**P2P, **changes}


def ip2p(image: bytes, **changes) -> dict:
    return {"kind": "ip2p", "instruction": "make it blue", "image": base64.b64encode(image).decode(), **changes}


def post_raw(client, raw: bytes):
    return client.post("/v1/edits", content=raw, headers={"content-type": "application/json"})


def assert_refused(response, status: int, field: str | None, conn, contains: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"], error
    if contains:
        assert contains in error["message"], error
    assert edit_queue_lengths(conn) == 0 and edit_records(conn) == 0, "a refused request was queued"
    return error


def stored_input(s3, edit_id: str) -> Image.Image:
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"edits/{edit_id}/input.png")["Body"].read()
    return Image.open(io.BytesIO(body))


# ---------------------------------------------------------------------------------------------- body size

class EndlessRequest:
    """A request whose body never ends (or must never be read); counts what was pulled from it."""

    def __init__(self, headers: dict[str, str] | None = None, chunk: int = 64 * 1024, fail_on_read: bool = False):
        self.headers = headers or {}
        self.chunk = chunk
        self.fail_on_read = fail_on_read
        self.pulled = 0

    async def stream(self):
        while True:
            if self.fail_on_read:
                raise AssertionError("the body was read although Content-Length already refused it")
            self.pulled += self.chunk
            yield b"x" * self.chunk


def test_chunked_body_is_cut_off_at_the_limit():
    request = EndlessRequest()
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body_limited(request, 1_000_000))
    assert refused.value.status == 413 and "1000000" in refused.value.message
    assert request.pulled <= 1_000_000 + request.chunk


def test_content_length_is_refused_before_reading():
    request = EndlessRequest({"content-length": str(10**12)}, fail_on_read=True)
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body_limited(request, 1_000_000))
    assert refused.value.status == 413
    with pytest.raises(ApiError) as malformed:
        asyncio.run(read_body_limited(EndlessRequest({"content-length": "12abc"}, fail_on_read=True), 10))
    assert malformed.value.status == 400


def raw_http(port: int, head: bytes, body_chunks, *, timeout: float = 10) -> bytes:
    """Send a request head and as many body chunks as the server reads; return what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(timeout)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_oversize_bodies_get_413_over_real_http_without_being_read_to_the_end(small_body_server):
    port = int(small_body_server.url.rsplit(":", 1)[1])
    limit = 30_000 * 4 // 3 + 1024 * 1024
    # Chunked: no Content-Length; the server answers once the limit is passed, the body never ends.
    head = (b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(limit // len(piece) + 4))
    started = time.monotonic()
    answer = raw_http(port, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A Content-Length above the limit is refused from the header: nothing of the body is sent at all.
    head = (b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000000\r\n\r\n")
    answer = raw_http(port, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------- images

def png_declaring(width: int, height: int) -> bytes:
    """A tiny, truncated PNG whose header claims ``width``×``height`` RGB pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header(client, conn):
    bomb = png_declaring(50_000, 50_000)  # 7.5 GB of RGB if it were decoded
    assert len(bomb) < 200
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = assert_refused(client.post("/v1/edits", json=ip2p(bomb)), 422, "image", conn, contains="pixels")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB: < 200 MB
    assert "2500000000" in error["message"] or "50000x50000" in error["message"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_bomb_pillow_only_warns_about_is_refused_by_our_pixel_limit(client, conn):
    bomb = png_declaring(8000, 6000)  # 48 MP: Pillow raises only at twice its limit; ours (40 MP) refuses it
    assert_refused(client.post("/v1/edits", json=ip2p(bomb)), 422, "image", conn, contains="8000x6000")


FORMATS = [
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
     422, "not a recognised image"),
    ("tiff", png(fmt="TIFF"), 415, "TIFF"),
    ("ico", png(32, 32, fmt="ICO"), 415, "ICO"),
    ("ppm", png(fmt="PPM"), 415, "PPM"),
    ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 422, "not a recognised image"),
    ("html", b"<html><script>alert(1)</script></html>", 422, "not a recognised image"),
]


@pytest.mark.parametrize("name,data,status,contains", FORMATS, ids=[f[0] for f in FORMATS])
def test_formats_outside_the_allow_list_are_refused(client, conn, name, data, status, contains):
    assert_refused(client.post("/v1/edits", json=ip2p(data)), status, "image", conn, contains=contains)


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_images_are_refused(client, conn, fmt):
    image = Image.effect_noise((64, 64), 64).convert("RGB" if fmt != "GIF" else "L")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    assert_refused(client.post("/v1/edits", json=ip2p(truncated(buffer.getvalue()))), 422, "image", conn)


def test_multi_picture_jpeg_from_a_phone_is_accepted(client):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="MPO", save_all=True,
                                               append_images=[Image.new("RGB", (64, 64))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    assert client.post("/v1/edits", json=ip2p(buffer.getvalue())).status_code == 202


def test_exif_orientation_is_applied_to_the_stored_input(client, s3):
    image = Image.new("RGB", (120, 60), (220, 0, 0))
    image.paste((0, 0, 220), (60, 0, 120, 60))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: left becomes top
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    response = client.post("/v1/edits", json=ip2p(buffer.getvalue()))
    assert response.status_code == 202, response.text
    stored = stored_input(s3, response.json()["id"]).convert("RGB")
    assert stored.size == official_resize_dims(60, 120, 256)  # portrait now
    top, bottom = stored.getpixel((stored.width // 2, 5)), stored.getpixel((stored.width // 2, stored.height - 5))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0], (top, bottom)


def encoded(mode: str, color, fmt: str = "PNG", **save) -> bytes:
    image = Image.new(mode, (48, 32), color)
    if mode == "P":
        image.putpalette([200, 0, 0] * 256)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


MODES = [
    ("rgba transparent", encoded("RGBA", (0, 0, 0, 0)), (255, 255, 255)),
    ("la", encoded("LA", (0, 0)), (255, 255, 255)),
    ("palette", encoded("P", 0), (200, 0, 0)),
    ("palette with transparency", encoded("P", 0, transparency=0), (255, 255, 255)),
    ("grayscale", encoded("L", 128), (128, 128, 128)),
    ("bilevel", encoded("1", 1), (255, 255, 255)),
    ("16-bit grayscale", encoded("I;16", 65535), (255, 255, 255)),
    ("cmyk jpeg", encoded("CMYK", (0, 0, 0, 0), "JPEG"), (255, 255, 255)),
]


@pytest.mark.parametrize("name,data,center", MODES, ids=[m[0] for m in MODES])
def test_every_mode_is_stored_as_8_bit_rgb(client, s3, name, data, center):
    response = client.post("/v1/edits", json=ip2p(data))
    assert response.status_code == 202, response.text
    stored = stored_input(s3, response.json()["id"])
    assert stored.mode == "RGB"
    pixel = stored.getpixel((stored.width // 2, stored.height // 2))
    assert all(abs(a - b) <= 3 for a, b in zip(pixel, center)), (pixel, center)


# ---------------------------------------------------------------------------------------------- prompts

CONTROL = [("NUL", "\x00"), ("newline", "\n"), ("tab", "\t"), ("NEL (C1)", "\x85"), ("line separator", "\u2028"),
           ("right-to-left override", "\u202e"), ("lone surrogate", "\ud800")]


@pytest.mark.parametrize("name,char", CONTROL, ids=[c[0] for c in CONTROL])
@pytest.mark.parametrize("field", ["source_prompt", "target_prompts.0", "instruction"])
def test_control_characters_in_prompts_are_refused_naming_the_field(client, conn, name, char, field):
    text = f"a cat{char} riding a bike"
    if field == "instruction":
        body = ip2p(png(), instruction=text)
    elif field == "source_prompt":
        body = p2p(source_prompt=text, edit="none")
    else:
        body = p2p(target_prompts=[text], edit="none")
    response = post_raw(client, json.dumps(body).encode())  # json.dumps keeps "\ud800" as an escape
    assert_refused(response, 422, field, conn)


def test_prompt_length_and_tokens_are_capped(client, conn):
    assert_refused(client.post("/v1/edits", json=p2p(source_prompt="a" * 1001)), 422, "source_prompt", conn)
    many = " ".join(["cat"] * 100)
    assert_refused(client.post("/v1/edits", json=p2p(source_prompt=many, edit="none")), 422, "source_prompt",
                   conn, contains="tokens")


def test_unpaired_surrogates_anywhere_are_422_not_500(client, conn):
    raw = json.dumps(p2p(metadata={"note": "\udfff"})).encode()
    assert_refused(post_raw(client, raw), 422, "metadata.note", conn, contains="surrogate")


@pytest.mark.parametrize("depth", [900, 5000])
def test_deeply_nested_json_is_a_4xx(client, conn, depth):
    raw = json.dumps(p2p()).encode()[:-1] + b', "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    response = post_raw(client, raw)
    assert response.status_code in (400, 422) and response.json()["error"]["message"], response.text
    assert edit_records(conn) == 0


def test_metadata_is_bounded(client, conn):
    assert_refused(client.post("/v1/edits", json=p2p(metadata={"k": "v" * 513})), 422, "metadata.k", conn)
    assert_refused(client.post("/v1/edits", json=p2p(metadata={str(i): "v" for i in range(17)})), 422,
                   "metadata", conn)


# ---------------------------------------------------------------------------------------------- numbers

NON_FINITE = [
    ("guidance_scale", "NaN"), ("guidance_scale", "Infinity"), ("guidance_scale", "-Infinity"),
    ("guidance_scale", '"NaN"'), ("guidance_scale", '"inf"'), ("guidance_scale", "1e999"),
    ("cross_replace_steps", "NaN"), ("self_replace_steps", '"-inf"'),
]


@pytest.mark.parametrize("field,literal", NON_FINITE)
def test_nan_and_infinity_are_refused_naming_the_field(client, conn, field, literal):
    raw = json.dumps(p2p()).encode()[:-1] + f', "{field}": {literal}}}'.encode()
    assert_refused(post_raw(client, raw), 422, field, conn)


def test_nested_non_finite_numbers_name_their_path(client, conn):
    raw = json.dumps(p2p(edit="reweight", target_prompts=["a cat riding a bike"])).encode()[:-1]
    assert_refused(post_raw(client, raw + b', "reweight": {"cat": NaN}}'), 422, "reweight", conn)
    blend = b', "local_blend": {"source_words": ["cat"], "target_words": ["dog"], "threshold": Infinity}}'
    assert_refused(post_raw(client, json.dumps(p2p()).encode()[:-1] + blend), 422, "local_blend.threshold", conn)
    sweep = json.dumps(ip2p(png())).encode()[:-1] + b', "sweep": {"text_guidance": [7.5, NaN]}}'
    assert_refused(post_raw(client, sweep), 422, "sweep.text_guidance.1", conn)
    assert_refused(post_raw(client, json.dumps(ip2p(png())).encode()[:-1] + b', "image_guidance": "nan"}'), 422,
                   "image_guidance", conn)


HUGE = [("steps", "1e308"), ("steps", str(10**30)), ("seed", str(2**64)), ("height", "1e308"),
        ("width", "-1e308"), ("guidance_scale", "1e300"), ("attention_maps", f"[{10**20}]")]


@pytest.mark.parametrize("field,literal", HUGE)
def test_huge_numbers_are_refused_naming_the_field(client, conn, field, literal):
    raw = json.dumps(p2p()).encode()[:-1] + f', "{field}": {literal}}}'.encode()
    assert_refused(post_raw(client, raw), 422, field, conn)


def test_numbers_too_long_to_parse_are_400(client, conn):
    raw = json.dumps(p2p()).encode()[:-1] + b', "seed": ' + b"9" * 5000 + b"}"
    error = assert_refused(post_raw(client, raw), 400, None, conn)
    assert error["type"] == "malformed_json" and "digits" in error["message"]


# ---------------------------------------------------------------------------------------------- webhooks

REFUSED_AT_SUBMIT = [
    "http://127.0.0.1/hook", "http://127.1/hook", "http://0x7f000001/hook", "http://2130706433/hook",
    "http://0x7f.1/hook", "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://[::ffff:a9fe:a9fe]/hook",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook", "http://100.64.0.1/hook",
    "http://0.0.0.0/hook", "http://[fd00::1]/hook", "http://localhost:8080/hook", "http://api.localhost/hook",
    "http://user:secret@example.com/hook", "ftp://example.com/hook", "javascript:alert(1)", "http:///hook",
    "http://exa mple.com/hook", "http://example.com:99999/hook", "http://999.1.1.1/hook",
]


@pytest.mark.parametrize("url", REFUSED_AT_SUBMIT)
def test_webhook_urls_are_refused_at_submit(client, conn, url):
    assert_refused(client.post("/v1/edits", json=p2p(webhook={"url": url})), 422, "webhook.url", conn)


@pytest.mark.parametrize("url", [u for u in REFUSED_AT_SUBMIT if u.startswith("http")])
def test_delivery_refuses_whatever_submit_refused(url):
    """Submit-time and delivery-time rules agree (delivery additionally resolves names)."""
    with pytest.raises(egress.DestinationRefused):
        egress.check_url(url, egress.AllowList.parse([]), resolver=lambda host, port: ["127.0.0.1"])


def test_public_and_allow_listed_webhooks_are_accepted_and_names_resolve_only_at_delivery(redis_url, s3):
    settings = make_settings(redis_url, s3, webhooks={"allow_hosts": ["127.0.0.1", "hooks.internal"]})
    client = TestClient(create_app(settings, prepare_bucket=False))
    for url in ["https://hooks.example.com/x", "http://93.184.216.34:8080/x", "http://127.0.0.1:9/hook",
                "http://hooks.internal/x", "http://rebinds-later.example/x"]:
        response = client.post("/v1/edits", json=p2p(webhook={"url": url}))
        assert response.status_code == 202, (url, response.text)

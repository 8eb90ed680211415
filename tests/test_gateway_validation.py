"""POST /v1/edits input checks: every bad request is a 4xx naming the field, and nothing is queued.

TestClient is enough here (no waiting, no streaming); the HTTP-level behaviour is in test_gateway_api.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import redis
from fastapi.testclient import TestClient
from gateway_support import edit_queue_lengths, edit_records, make_settings, png
from PIL import Image

from service.app import create_app
from service.imaging import official_resize_dims

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"]}
LONG = " ".join(["photo"] * 80)


@pytest.fixture
def conn(redis_url):
    return redis.Redis.from_url(redis_url)


def client_for(redis_url, s3, **overrides) -> TestClient:
    settings = make_settings(redis_url, s3, **overrides)
    return TestClient(create_app(settings, prepare_bucket=False))


@pytest.fixture
def client(redis_url, s3):
    return client_for(redis_url, s3)


def p2p(**changes):
    body = dict(P2P)
    body.update(changes)
    return body


def ip2p_multipart(client, request: dict, image: bytes, content_type="image/png", **kw):
    return client.post("/v1/edits", data={"request": json.dumps(request)},
                       files={"image": ("in", image, content_type)}, **kw)


def assert_rejected(response, status: int, field: str | None, conn, *, contains: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "field"}
    assert error["field"] == field, error
    if contains:
        assert contains in error["message"], error
    assert edit_queue_lengths(conn) == 0 and edit_records(conn) == 0, "a rejected request reached the queue"


JSON_CASES = [
    ("empty target prompt", p2p(target_prompts=[""]), 422, "target_prompts.0", None),
    ("guidance not a number", p2p(guidance_scale="high"), 422, "guidance_scale", None),
    ("guidance out of range", p2p(guidance_scale=99), 422, "guidance_scale", None),
    ("unknown kind", {"kind": "inpaint"}, 422, "kind", None),
    ("missing kind", {"source_prompt": "x"}, 422, "kind", None),
    ("unknown field", p2p(foo=1), 422, "foo", None),
    ("unknown model", p2p(model="sd99"), 422, "model", "sd99"),
    ("p2p with an instruct model", p2p(model="tiny-ip2p"), 422, "model", "cannot run p2p"),
    ("source prompt over 77 tokens", p2p(source_prompt=LONG, target_prompts=[LONG], edit="refine"), 422,
     "source_prompt", "limit is 77"),
    ("second target over 77 tokens", p2p(target_prompts=["a dog riding a bike", LONG], edit="refine"), 422,
     "target_prompts.1", "tokens"),
    ("replace word counts differ", p2p(target_prompts=["a big dog riding a bike"]), 422, "target_prompts.0",
     "source prompt has 5 words, target 0 has 6"),
    ("reweight word not in target", p2p(edit="reweight", target_prompts=["a cat riding a bike"],
                                        reweight={"horse": 2.0}), 422, "reweight", "horse"),
    ("per-target reweight word missing", p2p(target_prompts=["a dog riding a bike", "a cow riding a bike"],
                                             reweight=[{"dog": 2.0}, {"dog": 2.0}]), 422, "reweight.1", "dog"),
    ("reweight factor out of range", p2p(reweight={"dog": 50.0}), 422, "reweight", None),
    ("local blend source word missing", p2p(local_blend={"source_words": ["horse"], "target_words": ["dog"]}), 422,
     "local_blend.source_words", "horse"),
    ("local blend target word missing", p2p(local_blend={"source_words": ["cat"], "target_words": ["horse"]}), 422,
     "local_blend.target_words", "horse"),
    ("height above the model maximum", p2p(height=512), 422, "height", "256"),
    ("width above the model maximum", p2p(width=320), 422, "width", None),
    ("height not a multiple of 64", p2p(height=100), 422, "height", None),
    ("control character in a prompt", p2p(source_prompt="a cat\x00 riding a bike"), 422, "source_prompt",
     "U+0000"),
    ("newline in a target", p2p(target_prompts=["a dog\nriding a bike"]), 422, "target_prompts.0", "U+000A"),
    ("attention map index out of range", p2p(attention_maps=[5]), 422, "attention_maps", None),
    ("overlay without attention maps", p2p(attention_maps_overlay=True), 422, "attention_maps_overlay", None),
    ("private webhook address", p2p(webhook={"url": "http://127.0.0.1:9/hook"}), 422, "webhook.url", None),
    ("webhook without http scheme", p2p(webhook={"url": "ftp://example.com/hook"}), 422, "webhook.url", None),
    ("p2p photo edit with another sampler", p2p(image=base64.b64encode(png()).decode(), scheduler="pndm"), 422,
     "scheduler", "ddim"),
    ("p2p photo edit that is not square", p2p(image=base64.b64encode(png()).decode(), height=64, width=128), 422,
     "width", "square"),
    ("p2p photo edit asking for several outputs", p2p(image=base64.b64encode(png()).decode(), num_outputs=2), 422,
     "num_outputs", "x_T"),
    ("p2p photo edit with a seeds list", p2p(image=base64.b64encode(png()).decode(), seeds=[1, 2]), 422,
     "seeds", "one output"),
    ("p2p inversion options without a photo", p2p(inversion={"method": "ddim"}), 422, "inversion", "photo"),
    ("ip2p without an image", {"kind": "ip2p", "instruction": "make it blue"}, 422, "image", None),
    ("ip2p with a text model", {"kind": "ip2p", "instruction": "x", "model": "tiny-sd",
                                "image": base64.b64encode(png()).decode()}, 422, "model", None),
    ("ip2p instruction over 77 tokens", {"kind": "ip2p", "instruction": LONG,
                                         "image": base64.b64encode(png()).decode()}, 422, "instruction", None),
    ("ip2p instruction with a tab", {"kind": "ip2p", "instruction": "make\tit blue",
                                     "image": base64.b64encode(png()).decode()}, 422, "instruction", None),
    ("base64 that is not base64", {"kind": "ip2p", "instruction": "x", "image": "!!!not base64!!!"}, 422, "image",
     None),
    ("base64 of a non-image", {"kind": "ip2p", "instruction": "x",
                               "image": base64.b64encode(b"hello world").decode()}, 422, "image",
     "not a recognised image"),
    ("negative prompt over 77 tokens", p2p(negative_prompt=LONG), 422, "negative_prompt", "limit is 77"),
    ("negative prompt with a newline", p2p(negative_prompt="blurry\nugly"), 422, "negative_prompt", None),
    ("ip2p negative prompt over 77 tokens", {"kind": "ip2p", "instruction": "x", "negative_prompt": LONG,
                                             "image": base64.b64encode(png()).decode()}, 422, "negative_prompt",
     None),
    ("sweep too large", {"kind": "ip2p", "instruction": "x", "image": base64.b64encode(png()).decode(),
                         "sweep": {"seeds": list(range(17))}}, 422, "sweep.seeds", "at most 16"),
]


@pytest.mark.parametrize("name,body,status,field,contains", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_json_request_rejected(client, conn, name, body, status, field, contains):
    assert_rejected(client.post("/v1/edits", json=body), status, field, conn, contains=contains)


def test_malformed_json_is_400(client, conn):
    response = client.post("/v1/edits", content=b'{"kind": "p2p",', headers={"content-type": "application/json"})
    assert_rejected(response, 400, None, conn)
    assert response.json()["error"]["type"] == "malformed_json"


def test_non_object_json_is_422(client, conn):
    assert_rejected(client.post("/v1/edits", json=[1, 2]), 422, None, conn)


def test_unsupported_content_type_is_415(client, conn):
    response = client.post("/v1/edits", content=b"hello", headers={"content-type": "text/plain"})
    assert_rejected(response, 415, None, conn)


def test_oversize_body_is_refused_from_content_length(redis_url, s3, conn):
    client = client_for(redis_url, s3, limits={"max_image_bytes": 1000})
    body = b"{" + b" " * (3 * 1024 * 1024) + b"}"
    assert_rejected(client.post("/v1/edits", content=body, headers={"content-type": "application/json"}),
                    413, None, conn)


def test_oversize_image_part_is_413_naming_image(redis_url, s3, conn):
    client = client_for(redis_url, s3, limits={"max_image_bytes": 2000})
    big = png(256, 256, color=None, mode="RGB")  # noise-free but > 2000 bytes? make sure it is
    big = png(200, 200) if len(big) > 2000 else big + b"\0" * 3000
    assert len(big) > 2000
    assert_rejected(ip2p_multipart(client, {"kind": "ip2p", "instruction": "x"}, big), 413, "image", conn)
    inline = {"kind": "ip2p", "instruction": "x", "image": base64.b64encode(big).decode()}
    assert_rejected(client.post("/v1/edits", json=inline), 413, "image", conn)


def test_format_outside_the_allow_list_is_415(redis_url, s3, conn):
    client = client_for(redis_url, s3, limits={"image_formats": ["PNG"]})
    jpeg = png(fmt="JPEG")
    assert_rejected(ip2p_multipart(client, {"kind": "ip2p", "instruction": "x"}, jpeg, "image/jpeg"), 415, "image",
                    conn, contains="JPEG")
    tiff = png(fmt="TIFF")
    assert_rejected(ip2p_multipart(client, {"kind": "ip2p", "instruction": "x"}, tiff), 415, "image", conn)


def test_too_many_pixels_is_refused_before_decoding(redis_url, s3, conn):
    client = client_for(redis_url, s3, limits={"max_image_pixels": 1000})
    assert_rejected(ip2p_multipart(client, {"kind": "ip2p", "instruction": "x"}, png(40, 40)), 422, "image", conn,
                    contains="1600 pixels")


def test_truncated_image_is_refused(client, conn):
    data = png(64, 64, color=(1, 2, 3))
    assert_rejected(ip2p_multipart(client, {"kind": "ip2p", "instruction": "x"}, data[: len(data) // 2]), 422,
                    "image", conn)


def test_multipart_without_request_part(client, conn):
    response = client.post("/v1/edits", files={"image": ("in.png", png(), "image/png")})
    assert_rejected(response, 422, "request", conn)


def test_multipart_with_bad_request_json(client, conn):
    response = client.post("/v1/edits", data={"request": "{nope"}, files={"image": ("in.png", png(), "image/png")})
    assert_rejected(response, 400, None, conn)


def test_idempotency_key_too_long(client, conn):
    response = client.post("/v1/edits", json=P2P, headers={"Idempotency-Key": "k" * 300})
    assert_rejected(response, 422, "Idempotency-Key", conn)


@pytest.mark.parametrize("query,field", [("limit=0", "limit"), ("limit=1000", "limit"), ("status=done", "status"),
                                         ("kind=xyz", "kind"), ("cursor=%21%21", "cursor")])
def test_list_query_validation(client, query, field):
    response = client.get(f"/v1/edits?{query}")
    assert response.status_code == 422 and response.json()["error"]["field"] == field


# ---------------------------------------------------------------------------------------------- accepted

def test_p2p_defaults_are_resolved(client, conn):
    response = client.post("/v1/edits", json=P2P)
    assert response.status_code == 202, response.text
    edit = response.json()
    assert response.headers["location"] == f"/v1/edits/{edit['id']}"
    params = edit["params"]
    assert (params["model"], params["steps"], params["scheduler"]) == ("tiny-sd", 50, "ddim")
    assert (params["height"], params["width"]) == (128, 128)
    assert len(params["seeds"]) == 1 and 0 <= params["seeds"][0] < 2**32 and params["seed"] == params["seeds"][0]
    assert edit["random_weights"] is True and edit["status"] == "queued"
    assert edit_queue_lengths(conn) == 1


def test_ip2p_multipart_is_normalised_resized_and_stored(client, s3, conn):
    response = ip2p_multipart(client, {"kind": "ip2p", "instruction": "make it blue", "resolution": 512},
                              png(300, 200, mode="RGBA", color=(0, 0, 255, 0)))
    assert response.status_code == 202, response.text
    edit = response.json()
    width, height = official_resize_dims(300, 200, 256)  # resolution capped at tiny-ip2p's max_size
    params = edit["params"]
    assert (params["width"], params["height"], params["resolution"]) == (width, height, 256)
    assert (params["steps"], params["scheduler"], params["model"]) == (100, "euler_a", "tiny-ip2p")
    stored = s3.client().get_object(Bucket=s3.bucket, Key=f"edits/{edit['id']}/input.png")["Body"].read()
    image = Image.open(io.BytesIO(stored))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (width, height)
    assert image.getpixel((width // 2, height // 2)) == (255, 255, 255)  # transparent → white


def test_exif_orientation_is_applied(client, s3):
    image = Image.new("RGB", (120, 60), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    data_url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/v1/edits", json={"kind": "ip2p", "instruction": "x", "image": data_url})
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert (params["width"], params["height"]) == official_resize_dims(60, 120, 256)  # portrait after EXIF


def test_sweep_seeds_follow_the_expansion_order(client):
    body = {"kind": "ip2p", "instruction": "x", "image": base64.b64encode(png()).decode(),
            "sweep": {"image_guidance": [1.0, 2.0], "text_guidance": [5.0, 7.5], "seeds": [11, 22]}}
    response = client.post("/v1/edits", json=body)
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert params["seeds"] == [11, 22] * 4
    cells = [(c["image_guidance"], c["text_guidance"], c["seed"]) for c in params["cells"]]
    assert cells == [(ig, tg, s) for ig in (1.0, 2.0) for tg in (5.0, 7.5) for s in (11, 22)]


def test_guidance_sweep_without_seeds_shares_one_seed(client):
    body = {"kind": "ip2p", "instruction": "x", "image": base64.b64encode(png()).decode(),
            "sweep": {"text_guidance": [3.0, 5.0, 7.0]}}
    seeds = client.post("/v1/edits", json=body).json()["params"]["seeds"]
    assert len(seeds) == 3 and len(set(seeds)) == 1


def test_full_global_queue_is_503_with_retry_after(redis_url, s3, conn):
    client = client_for(redis_url, s3, limits={"max_queue_depth": 1})
    assert client.post("/v1/edits", json=P2P).status_code == 202
    response = client.post("/v1/edits", json=P2P)
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "queue_full" and "max_queue_depth" in response.json()["error"]["message"]
    assert edit_queue_lengths(conn) == 1 and edit_records(conn) == 1

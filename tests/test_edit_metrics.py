"""`metrics: true` on edits: CLIP scores computed on the worker for a whole batch, returned per output and
kept in the edit record. Real Redis, S3, tiny diffusion models and the tiny random CLIP."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from worker_support import ip2p_payload, p2p_payload, submit

from editserve.contract import EditStatus, IP2PEditRequest
from service.keys import edit_key
from worker.scoring.clip import ClipScorer, pair_scores, to_chw

FOUR = {"image_image", "input_caption", "output_caption", "directional"}


def _image(storage, result) -> Image.Image:
    key = result.url.split("?")[0].split(f"/{storage.bucket}/", 1)[1]
    return Image.open(io.BytesIO(storage.get_bytes(key))).convert("RGB")


@pytest.fixture(scope="module")
def scorer(tiny_models):
    return ClipScorer(str(tiny_models["tiny-clip"]))


def test_p2p_and_ip2p_scores_in_one_batch_pass_kept_in_the_record(make_worker, scorer):
    worker = make_worker()
    store, storage = worker.store, worker.storage
    p2p = submit(store, p2p_payload(metrics=True, target_prompts=["a photo of a dog", "a photo of a tiger"]))
    plain = submit(store, p2p_payload(seed=9))
    with_captions = ip2p_payload(storage)
    with_captions.request = IP2PEditRequest(**{**with_captions.request.model_dump(), "metrics": True,
                                              "input_caption": "a photo", "output_caption": "a snowy photo"})
    ip2p_cap = submit(store, with_captions)
    no_captions = ip2p_payload(storage)
    no_captions.request = IP2PEditRequest(**{**no_captions.request.model_dump(), "metrics": True})
    ip2p_plain = submit(store, no_captions)
    while worker.run_once(2.0) is not None:
        pass

    edit = store.get(p2p)
    assert edit.status is EditStatus.succeeded
    assert edit.results[0].scores is None  # the source image
    images = [_image(storage, r) for r in edit.results]
    for index, prompt in ((1, "a photo of a dog"), (2, "a photo of a tiger")):
        scores = edit.results[index].scores
        assert scores is not None and all(v is not None for v in scores.model_dump().values())
        # the worker scored the float pixels; the stored PNGs are their 8-bit rounding: close, not equal
        img = scorer.encode_images(to_chw([images[0], images[index]]))
        txt = scorer.encode_texts(["a photo of a cat", prompt])
        expected = pair_scores(img[0:1], img[1:2], txt[0:1], txt[1:2])
        for name in FOUR:
            assert getattr(scores, name) == pytest.approx(expected[name].item(), abs=1e-2)
    record_results = json.loads(store.redis.hget(edit_key(p2p), "results"))
    assert set(record_results[1]["scores"]) == FOUR

    assert all(r.scores is None for r in store.get(plain).results)  # metrics not asked for

    cap = store.get(ip2p_cap)
    assert cap.status is EditStatus.succeeded and set(cap.results[0].scores.model_dump()) == FOUR
    assert all(v is not None for v in cap.results[0].scores.model_dump().values())
    only_image = store.get(ip2p_plain).results[0].scores
    assert only_image is not None and only_image.image_image is not None
    assert only_image.directional is None and only_image.input_caption is None


def test_scores_change_with_the_image(scorer):
    """Guards against scoring a constant: different outputs of one input give different image-image scores."""
    base = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    near, far = base * 0.98 + 0.01, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    feats = scorer.encode_images(torch.cat([base, near, far]))
    s_near = torch.nn.functional.cosine_similarity(feats[0:1], feats[1:2]).item()
    s_far = torch.nn.functional.cosine_similarity(feats[0:1], feats[2:3]).item()
    assert s_near > s_far
    assert np.isfinite([s_near, s_far]).all()

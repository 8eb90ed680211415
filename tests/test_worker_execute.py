"""Payload → core spec translation (no Redis, no S3: the input download is a stub)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from worker_support import p2p_payload

from editserve.contract import Sweep
from worker.editing.jobs import EditValidationError, IP2PJobSpec, P2PJobSpec
from worker.runtime.execute import ip2p_cells, run_single, to_job_spec


def _png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def test_p2p_contract_shortcuts_become_per_target_lists():
    payload = p2p_payload(target_prompts=["a photo of a dog", "a photo of a fox"], edit="reweight",
                          reweight={"photo": 2.0},
                          local_blend={"source_words": ["cat"], "target_words": ["dog"]}, attention_maps=True)
    spec = to_job_spec(payload)
    assert isinstance(spec, P2PJobSpec)
    assert spec.reweight == [{"photo": 2.0}, {"photo": 2.0}]
    assert spec.reweight[0] is not spec.reweight[1]
    assert spec.local_blend.target_words == [["dog"], ["dog"]]
    assert spec.attention_map_prompts == [0, 1, 2]
    assert spec.seed == 7 and spec.job_id == payload.id


def test_p2p_explicit_per_target_values_pass_through():
    payload = p2p_payload(target_prompts=["a photo of a dog", "a photo of a fox"],
                          reweight=[{"dog": 2.0}, {"fox": 0.5}],
                          local_blend={"source_words": ["cat"], "target_words": [["dog"], ["fox"]]},
                          attention_maps=[2])
    spec = to_job_spec(payload)
    assert spec.reweight == [{"dog": 2.0}, {"fox": 0.5}]
    assert spec.local_blend.target_words == [["dog"], ["fox"]]
    assert spec.attention_map_prompts == [2]


def test_ip2p_sweep_order_is_image_text_seed(tmp_path):
    from worker_support import ip2p_payload

    class FakeStorage:
        def put_bytes(self, *a):
            pass

    sweep = Sweep(image_guidance=[1.0, 2.0], text_guidance=[5.0, 7.5], seeds=[1, 2])
    payload = ip2p_payload(FakeStorage(), sweep=sweep, seeds=[1, 2] * 4)
    spec = to_job_spec(payload, fetch=lambda key: _png())
    assert isinstance(spec, IP2PJobSpec) and spec.image.mode == "RGB"
    cells = [(c.image_guidance, c.text_guidance, c.seed) for c in spec.cells]
    assert cells == [(1.0, 5.0, 1), (1.0, 5.0, 2), (1.0, 7.5, 1), (1.0, 7.5, 2),
                     (2.0, 5.0, 1), (2.0, 5.0, 2), (2.0, 7.5, 1), (2.0, 7.5, 2)]


def test_ip2p_seeds_per_cell_and_mismatch():
    from editserve.contract import IP2PEditRequest

    req = IP2PEditRequest(instruction="x", sweep=Sweep(text_guidance=[5.0, 7.5]))
    assert [c.seed for c in ip2p_cells(req, [3, 4])] == [3, 4]
    assert [c.seed for c in ip2p_cells(req, [3])] == [3, 3]  # one seed broadcast over guidance axes
    with pytest.raises(EditValidationError) as err:
        ip2p_cells(req, [1, 2, 3])
    assert err.value.field == "seeds"


def test_unreadable_input_names_the_image_field():
    from worker_support import ip2p_payload

    class FakeStorage:
        def put_bytes(self, *a):
            pass

    with pytest.raises(EditValidationError) as err:
        to_job_spec(ip2p_payload(FakeStorage()), fetch=lambda key: b"not a png")
    assert err.value.field == "image"


def test_run_single_refuses_to_run_outside_the_batching_worker():
    with pytest.raises(RuntimeError, match="worker.runtime.worker"):
        run_single("{}")


def test_negative_prompt_reaches_both_core_specs():
    from worker_support import ip2p_payload

    class FakeStorage:
        def put_bytes(self, *a):
            pass

    p2p = to_job_spec(p2p_payload(negative_prompt="blurry, watermark"))
    assert p2p.negative_prompt == "blurry, watermark"
    assert to_job_spec(p2p_payload()).negative_prompt == ""
    payload = ip2p_payload(FakeStorage())
    payload = payload.model_copy(update={"request": payload.request.model_copy(update={"negative_prompt": "dark"})})
    assert to_job_spec(payload, fetch=lambda key: _png()).negative_prompt == "dark"

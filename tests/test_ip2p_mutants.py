"""One IP2P job's state on a fake model (tests/editing_fakes.py): validation naming the field, the UNet rows per
cell, the three-way guidance per cell with its own scales, initial noise per cell, result and params, and the
empty-instruction job. Hand-computed values, no networks: the arithmetic the batch relies on, checked exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from editing_fakes import FakeModel, text_embedding
from PIL import Image

from worker.editing.base import SamplingContext
from worker.editing.ip2p import IP2PJobState, UnchangedImageJob, cell_scales, preprocess_image, validate_ip2p
from worker.editing.jobs import EditValidationError, IP2PCell, IP2PJobSpec

H, W = 32, 64  # non-square: width and height must not swap


def picture(size=(W, H), mode="RGB") -> Image.Image:
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def context(steps: int = 3, **model) -> SamplingContext:
    return SamplingContext(FakeModel(**model), H, W, steps, "euler_a")


def spec(cells=None, **kw) -> IP2PJobSpec:
    cells = [IP2PCell(7.5, 1.5, 1), IP2PCell(2.0, 0.5, 2)] if cells is None else cells
    return IP2PJobSpec(kw.pop("job_id", "j"), kw.pop("image", picture()), kw.pop("instruction", "make it snowy"),
                       cells, **kw)


def refused(job: IP2PJobSpec) -> EditValidationError:
    with pytest.raises(EditValidationError) as caught:
        IP2PJobState.create(job, context())
    return caught.value


def test_validation_names_the_field_and_what_to_do():
    assert refused(spec(cells=[])).field == "cells"
    assert "at least one" in refused(spec(cells=[])).message
    nan = refused(spec(cells=[IP2PCell(float("nan"), 1.5, 1)]))
    assert nan.field == "text_guidance" and "finite" in nan.message and "nan" in nan.message
    inf = refused(spec(cells=[IP2PCell(7.5, 1.5, 1), IP2PCell(7.5, float("inf"), 2)]))
    assert inf.field == "image_guidance" and "inf" in inf.message
    swapped = refused(spec(image=picture((H, W))))  # height × width: the wrong way round
    assert swapped.field == "image" and f"{(H, W)}" in swapped.message and f"{W}x{H}" in swapped.message
    assert "official_resize" in swapped.message
    missing = refused(spec(image=None))
    assert missing.field == "image"
    grey = refused(spec(image=picture(mode="L")))
    assert grey.field == "image" and "got L" in grey.message and "to_rgb" in grey.message
    validate_ip2p(spec(), context())  # the right size and mode pass


def test_cell_scales_one_cell_as_floats_several_per_cell_on_the_device():
    cells = [IP2PCell(7.5, 1.5, 1), IP2PCell(2.0, 0.5, 2), IP2PCell(3.0, 1.0, 3)]
    assert cell_scales(cells[1:2], "cpu", torch.float64) == (2.0, 0.5)
    assert all(type(s) is float for s in cell_scales(cells[1:2], "cpu", torch.float64))
    text, image = cell_scales(cells, "cpu", torch.float64)
    assert text.shape == image.shape == (3, 1, 1, 1) and text.dtype == image.dtype == torch.float64
    assert text.flatten().tolist() == [7.5, 2.0, 3.0] and image.flatten().tolist() == [1.5, 0.5, 1.0]
    assert cell_scales(cells, torch.device("meta"), torch.float16)[0].device.type == "meta"


def test_preprocess_goes_to_the_model_device_and_dtype_unless_told():
    model = FakeModel(dtype=torch.float16, device="meta")
    default = preprocess_image(model, picture())
    assert default.device.type == "meta" and default.dtype == torch.float16 and default.shape == (1, 3, H, W)
    told = preprocess_image(model, picture(), device=torch.device("cpu"), dtype=torch.float64)
    assert told.device.type == "cpu" and told.dtype == torch.float64
    assert -1.0 <= told.min() < 0 < told.max() <= 1.0  # [0, 255] → [−1, 1]


def test_rows_per_cell_image_and_text_channels():
    job = IP2PJobState.create(spec(negative_prompt="blurry"), context())
    assert isinstance(job, IP2PJobState)
    image = preprocess_image(job.ctx.model, picture(), dtype=torch.float64)
    latent = torch.nn.functional.avg_pool2d(image, 8)
    latent = torch.cat([latent, latent.mean(1, keepdim=True)], 1)[0]  # the fake VAE's posterior mode
    sample = job.model_input()
    assert sample.shape == (6, 8, H // 8, W // 8) and sample.dtype == torch.float64
    for cell in range(2):
        rows = sample[3 * cell:3 * cell + 3]
        torch.testing.assert_close(rows[0, 4:], latent, rtol=0, atol=0)  # [img, img, 0]
        torch.testing.assert_close(rows[1, 4:], latent, rtol=0, atol=0)
        assert torch.count_nonzero(rows[2, 4:]) == 0
        sigma = float(job.scheduler.sigmas[0])
        expected = job.latents[cell] / math.sqrt(sigma ** 2 + 1)  # Euler's input scaling, on the noisy half
        for row in rows:
            torch.testing.assert_close(row[:4], expected)
    text = job.text_rows()
    assert text.shape == (6, 77, 8)
    expected_text = [text_embedding(t) for t in ("make it snowy", "blurry", "blurry")] * 2
    torch.testing.assert_close(text, torch.stack(expected_text).double(), rtol=0, atol=0)


def test_initial_latents_are_each_cells_own_seeded_noise_at_sigma_max():
    job = IP2PJobState(spec(), context())
    assert job.latents.shape == (2, 4, H // 8, W // 8) and job.latents.dtype == torch.float64
    sigma = job.scheduler.init_noise_sigma
    for index, seed in enumerate((1, 2)):
        noise = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        torch.testing.assert_close(job.latents[index:index + 1], noise * sigma)


@pytest.mark.parametrize("cells", [[IP2PCell(7.5, 1.5, 1)], [IP2PCell(7.5, 1.5, 1), IP2PCell(2.0, 0.5, 2)]],
                         ids=["one cell", "two cells"])
def test_guide_combines_each_cells_triple_with_its_own_scales(cells):
    """Rows [c, i, u] = [3, 2, 1] and [30, 20, 10]: u + s_T·(c − i) + s_I·(i − u) per cell."""
    job = IP2PJobState(spec(cells=cells), context())
    values = torch.tensor([3.0, 2.0, 1.0, 30.0, 20.0, 10.0][:3 * len(cells)], dtype=torch.float64)
    noise_pred = values.view(-1, 1, 1, 1).expand(-1, 4, H // 8, W // 8)
    guided = job.guide(noise_pred)
    assert guided.shape == (len(cells), 4, H // 8, W // 8)
    expected = [1 + 7.5 * 1 + 1.5 * 1, 10 + 2.0 * 10 + 0.5 * 10][:len(cells)]
    assert [float(g.unique()) for g in guided] == expected


def test_result_and_params_name_every_cell():
    job = IP2PJobState(spec(), context())
    pixels, images = np.zeros((2, H, W, 3), np.float32), [picture(), picture()]
    result = job.result(pixels, images)
    assert result.ok and result.job_id == "j" and result.images is images and result.pixels is pixels
    assert result.labels == ["text 7.5 / image 1.5 / seed 1", "text 2 / image 0.5 / seed 2"]
    assert result.latents.dtype == torch.float32 and torch.equal(result.latents, job.latents.float())
    cells = [{"seed": 1, "text_guidance": 7.5, "image_guidance": 1.5},
             {"seed": 2, "text_guidance": 2.0, "image_guidance": 0.5}]
    assert result.params == job.params() == {"model": "fake-model", "height": H, "width": W, "steps": 3,
                                             "scheduler": "euler_a", "instruction": "make it snowy", "cells": cells}


def test_a_blank_instruction_returns_the_input_once_per_cell_without_diffusion():
    image = picture()
    job = IP2PJobState.create(spec(image=image, instruction=" \n"), context())
    assert isinstance(job, UnchangedImageJob) and job.finished and job.num_rows == 0
    for method in (job.text_rows, job.model_input, lambda: job.guide(torch.zeros(1))):
        with pytest.raises(RuntimeError, match="never enters the UNet batch"):
            method()
    pixels, images = job.final_images()
    assert pixels.shape == (2, H, W, 3) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[1], np.asarray(image, np.float32) / 255.0)
    assert [i.tobytes() for i in images] == [image.tobytes()] * 2 and images[0] is not image
    result = job.result(pixels, images)
    assert result.ok and result.job_id == "j" and result.images is images and result.pixels is pixels
    assert result.labels == ["unchanged (empty instruction)"] * 2
    assert result.params["diffusion"] is False and result.params["instruction"] == " \n"
    assert result.params["cells"][1] == {"seed": 2, "text_guidance": 2.0, "image_guidance": 0.5}
    assert result.params["width"] == W


def test_a_job_keeps_its_tensors_on_the_context_device():
    job = IP2PJobState(spec(), SamplingContext(FakeModel(device="meta"), H, W, 3, "ddim"))
    assert job.latents.device.type == "meta" and job.text_rows().device.type == "meta"
    assert job.model_input().device.type == "meta"

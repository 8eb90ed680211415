"""Fakes of a model and of jobs for the batch layers (``BatchState``, ``ContinuousBatch``): no diffusion, so
tests of membership, routing of rows and failures run in milliseconds."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from worker.editing.jobs import JobResult


class RecordingLinear(torch.nn.Linear):
    """A linear layer that records the row count of each call."""

    def __init__(self):
        super().__init__(1, 1)
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return super().forward(x)


class FakeUNet(torch.nn.Module):
    """Records each call's rows, text and timesteps; predicts the input plus its text value (row by row).

    Its ``time_embedding.linear_1`` sees one row per batch row, as the real timestep MLP does."""

    def __init__(self):
        super().__init__()
        self.time_embedding = torch.nn.ModuleDict({"linear_1": RecordingLinear()})
        self.calls: list[tuple[int, list[float]]] = []
        self.timesteps: list[list[int]] = []
        self.fail: Exception | None = None
        self.processors: list = []

    def forward(self, sample, timesteps, encoder_hidden_states=None, return_dict=True):
        if self.fail is not None:
            raise self.fail
        self.calls.append((sample.shape[0], encoder_hidden_states[:, 0, 0].tolist()))
        self.timesteps.append(timesteps.tolist())
        self.time_embedding["linear_1"](timesteps.float()[:, None])
        return (sample + encoder_hidden_states[:, :1, :1, None],)

    def set_attn_processor(self, processors):
        self.processors.append(processors)


class FakeJob:
    """A job of ``steps`` steps and ``rows`` UNet rows; ``text`` is its text rows' value."""

    def __init__(self, job_id: str, steps: int, rows: int = 2, text: float = 1.0):
        self.job_id, self.total_steps, self.num_rows, self.text = job_id, steps, rows, text
        self.step_index, self.latents, self.preview = 0, torch.zeros(1, 1, 1, 1), None
        self.controller, self.per_step_text = None, False
        self.predictions: list[torch.Tensor] = []
        self.text_calls = 0

    @property
    def finished(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def row_groups(self) -> list[int]:
        return [self.num_rows]

    def attention_segments(self):
        return [(self.num_rows, self.controller)]

    def text_rows(self):
        self.text_calls += 1
        return torch.full((self.num_rows, 1, 1), self.text)

    def model_input(self):
        return torch.full((self.num_rows, 4, 1, 1), float(self.step_index))

    def row_timesteps(self):
        return torch.full((self.num_rows,), self.step_index)

    def advance(self, rows):
        self.predictions.append(rows)
        self.step_index += 1

    def take_preview(self):
        preview, self.preview = self.preview, None
        return preview

    def params(self):
        return {"job": self.job_id}

    def result(self, pixels, images):
        return JobResult(job_id=self.job_id, pixels=pixels, images=images, params=self.params())


class FakeVAE:
    """Decodes latents to themselves, counting calls."""

    dtype = torch.float32
    config = SimpleNamespace(scaling_factor=1.0)

    def __init__(self):
        self.calls: list[int] = []

    def decode(self, latents, return_dict=True):
        self.calls.append(latents.shape[0])
        return (latents,)


def fake_model(unet: torch.nn.Module | None = None) -> SimpleNamespace:
    """What the batch layers read of a loaded model; ``encoded`` lists the prompts of each text-encoder call."""
    encoded: list = []
    return SimpleNamespace(
        unet=FakeUNet() if unet is None else unet, lock=threading.Lock(), vae_scale_factor=8,
        device=torch.device("cpu"), dtype=torch.float32, encoded=encoded,
        spec=SimpleNamespace(kind="text2image", name="fake", scheduler="ddim"),
        encode_text=lambda prompts: encoded.append(prompts) or torch.zeros(1, 77, 4), vae=FakeVAE(),
        pipe=SimpleNamespace(image_processor=SimpleNamespace(
            postprocess=lambda image, output_type: image.numpy(),
            numpy_to_pil=lambda pixels: [f"image{i}" for i in range(len(pixels))])))

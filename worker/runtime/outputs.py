"""Encode a job's result images as the request asked (png / webp / jpeg) and name their S3 objects.

Why the parameters go into every file: a downloaded picture outlives its edit record (which expires), and
tools people already use read AUTOMATIC1111's ``parameters`` text (PNG text chunk, EXIF UserComment for
jpeg and webp) to show or reproduce how an image was made.

Why names that say what they are (``output-0-source.webp``, ``output-2-target-2.webp``,
``output-1-ig1.5-tg7.5-seed2.png``; with several P2P outputs ``output-3-seed8-target-1.png``): a folder of downloads reads without the record. The ``output-{i}``
prefix keeps the result order and makes every key unique; the key is a pure function of the payload, so a
retried attempt overwrites the same objects.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from editserve.contract import JobPayload
from service.storage import EDITS_PREFIX
from worker.editing.jobs import IP2PJobSpec, JobSpec, P2PJobSpec

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"  # EXIF UserComment's character-code header (the text follows as UTF-16BE)


@dataclass(frozen=True)
class EncodedOutput:
    key: str
    data: bytes
    content_type: str
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class OutputPlan:
    """How one job's outputs are stored: format, quality and the parameters each file carries."""

    payload: JobPayload | None = None

    @property
    def format(self) -> str:
        return getattr(self.payload.request, "output_format", "png") if self.payload else "png"

    @property
    def quality(self) -> int:
        return getattr(self.payload.request, "output_quality", 90) if self.payload else 90

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) every output is resized to, or None to keep the model's size (IP2P ``output_size``)."""
        if self.payload is None or getattr(self.payload.request, "output_size", "model") != "input":
            return None
        return tuple(self.payload.input_size) if self.payload.input_size else None

    def resized(self, image: Image.Image) -> Image.Image:
        """``image`` at the plan's size (Lanczos, as the official resize), or unchanged."""
        size = self.size
        return image if size is None or image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def encode(self, spec: JobSpec, index: int, image: Image.Image) -> EncodedOutput:
        text = parameters_text(self.payload, spec, index) if self.payload else ""
        fmt = self.format
        key = f"{EDITS_PREFIX}{spec.job_id}/output-{index}-{output_name(spec, index)}.{EXTENSIONS[fmt]}"
        image = self.resized(image)
        return EncodedOutput(key, encode_image(image, fmt, self.quality, text), CONTENT_TYPES[fmt],
                             image.width, image.height)


def output_name(spec: JobSpec, index: int) -> str:
    """What output ``index`` is: P2P ``source`` / ``target-N`` (prefixed ``seed{seed}-`` when the job has several
    seeds); IP2P its cell ``ig{s_I}-tg{s_T}-seed{seed}``."""
    if isinstance(spec, P2PJobSpec):
        group, prompt = spec.group_of(index)
        name = "source" if prompt == 0 else f"target-{prompt}"
        seeds = spec.group_seeds
        return f"seed{seeds[group]}-{name}" if len(seeds) > 1 and group < len(seeds) else name
    if isinstance(spec, IP2PJobSpec) and 0 <= index < len(spec.cells):
        cell = spec.cells[index]
        return f"ig{cell.image_guidance:g}-tg{cell.text_guidance:g}-seed{cell.seed}"
    return "image"


def parameters_text(payload: JobPayload, spec: JobSpec, index: int) -> str:
    """AUTOMATIC1111's ``parameters`` layout: prompt, ``Negative prompt:`` line, then ``Key: value`` pairs."""
    request, key = payload.request, payload.batch_key
    pairs: list[tuple[str, object]] = [("Steps", key.steps), ("Sampler", key.scheduler)]
    if isinstance(spec, P2PJobSpec):
        group, at = spec.group_of(index)
        prompt = spec.prompts[at] if index >= 0 else spec.source_prompt
        pairs += [("CFG scale", f"{spec.guidance_scale:g}"), ("Seed", spec.image_params(index)["seed"])]
    else:
        prompt = getattr(spec, "instruction", "")
        cell = spec.cells[index] if isinstance(spec, IP2PJobSpec) and 0 <= index < len(spec.cells) else None
        if cell is not None:
            pairs += [("CFG scale", f"{cell.text_guidance:g}"), ("Image CFG scale", f"{cell.image_guidance:g}"),
                      ("Seed", cell.seed)]
    size = OutputPlan(payload).size or (key.width, key.height)
    pairs += [("Size", f"{size[0]}x{size[1]}"), ("Model", key.model), ("Editor", request.kind)]
    if isinstance(spec, P2PJobSpec):
        pairs += [("Source prompt", _quoted(spec.source_prompt)), ("Edit", spec.edit)]
    lines = [prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs))
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_image(image: Image.Image, fmt: str, quality: int, parameters: str) -> bytes:
    buf = io.BytesIO()
    rgb = image.convert("RGB")
    if fmt == "png":
        info = PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        rgb.save(buf, format="PNG", pnginfo=info)
    elif fmt in ("webp", "jpeg"):
        exif = Image.Exif()
        if parameters:
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
        rgb.save(buf, format=fmt.upper(), quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"output_format: unsupported {fmt!r}")
    return buf.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The ``parameters`` text of an encoded output (PNG text chunk or EXIF UserComment), or None."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return image.info.get("parameters")
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX):].decode("utf-16-be")
    return comment if isinstance(comment, str) else None

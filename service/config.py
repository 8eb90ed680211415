"""Settings shared by the gateway, the GPU workers and the webhook sender.

Everything comes from the environment (prefix ``EDITSERVE_``) with defaults that run on one machine:
Redis on 127.0.0.1:6379, a local S3 endpoint on 127.0.0.1:8333, and the tiny random-weight models
under ``.models/``. Nested fields use ``__`` (e.g. ``EDITSERVE_LIMITS__MAX_IMAGE_BYTES``).
This module must stay importable without torch: the gateway validates model names against it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ModelKind = Literal["text2image", "instruct"]
REPO_ROOT = Path(__file__).resolve().parent.parent


class ModelSpec(BaseModel):
    """One servable model: where its weights come from and how the worker runs it."""

    name: str
    kind: ModelKind
    source: str = Field(description="Hub id (e.g. CompVis/stable-diffusion-v1-4) or local diffusers folder")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    scheduler: Literal["ddim", "euler_a", "pndm"] = "ddim"
    default_size: int = Field(512, description="default height/width in pixels for this model")
    max_size: int = Field(768, description="largest height/width in pixels a request may ask for")
    random_weights: bool = Field(False, description="True for the tiny test models: outputs are noise")


def default_models(models_dir: Path) -> list[ModelSpec]:
    """Production models plus the tiny local builds used by tests, CI and the demo."""
    return [
        ModelSpec(name="sd14", kind="text2image", source="CompVis/stable-diffusion-v1-4", dtype="float16",
                  device="cuda", scheduler="ddim"),
        ModelSpec(name="ip2p", kind="instruct", source="timbrooks/instruct-pix2pix", dtype="float16",
                  device="cuda", scheduler="euler_a"),
        ModelSpec(name="tiny-sd", kind="text2image", source=str(models_dir / "tiny-sd"), scheduler="ddim",
                  default_size=128, max_size=256, random_weights=True),
        ModelSpec(name="tiny-ip2p", kind="instruct", source=str(models_dir / "tiny-ip2p"), scheduler="euler_a",
                  default_size=128, max_size=256, random_weights=True),
    ]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDITSERVE_", env_nested_delimiter="__", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    models_dir: Path = REPO_ROOT / ".models"
    models: list[ModelSpec] | None = Field(None, description="JSON list; default: default_models(models_dir)")
    enabled_models: list[str] | None = Field(None, description="names a worker loads; default: all local ones")

    def model_catalog(self) -> dict[str, ModelSpec]:
        specs = self.models if self.models is not None else default_models(self.models_dir)
        return {m.name: m for m in specs}


@lru_cache
def get_settings() -> Settings:
    return Settings()

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

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from editserve.contract import ModelKind, SchedulerName
REPO_ROOT = Path(__file__).resolve().parent.parent


class ModelSpec(BaseModel):
    """One servable model: where its weights come from and how the worker runs it."""

    name: str
    kind: ModelKind
    source: str = Field(description="Hub id (e.g. CompVis/stable-diffusion-v1-4) or local diffusers folder")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    scheduler: SchedulerName = "ddim"
    default_size: int = Field(512, description="default height/width in pixels for this model")
    max_size: int = Field(768, description="largest height/width in pixels a request may ask for")
    random_weights: bool = Field(False, description="True for the tiny test models: outputs are noise")
    tokenizer: str | None = Field(None, description="where the gateway reads the CLIP tokenizer when neither the "
                                  "source nor models_dir has a tokenizer/ folder: a folder, or a hub id whose "
                                  "tokenizer/ subfolder is fetched; default: the source when it is a hub id")
    require_live_worker: bool = Field(False, description="refuse (503 + Retry-After) an edit for this model while "
                                      "no live worker serves it; default: accept it (an autoscaler may scale "
                                      "from zero)")


TINY_MODELS_TOKENIZER = "timbrooks/instruct-pix2pix"
"""The tiny models are built with the real CLIP BPE tokenizer (worker/models/tokenizer.py), the one of SD-1.x and
IP2P: a gateway without the models folder (its image has no models) fetches that tokenizer/ from the hub."""


@lru_cache(maxsize=16)
def default_models(models_dir: Path) -> tuple[ModelSpec, ...]:
    """Production models plus the tiny local builds used by tests, CI and the demo (built once per folder:
    every submit resolves its model here)."""
    return (
        ModelSpec(name="sd14", kind="text2image", source="CompVis/stable-diffusion-v1-4", dtype="float16",
                  device="cuda", scheduler="ddim"),
        ModelSpec(name="ip2p", kind="instruct", source="timbrooks/instruct-pix2pix", dtype="float16",
                  device="cuda", scheduler="euler_a"),
        ModelSpec(name="tiny-sd", kind="text2image", source=str(models_dir / "tiny-sd"), scheduler="ddim",
                  default_size=128, max_size=256, random_weights=True, tokenizer=TINY_MODELS_TOKENIZER),
        ModelSpec(name="tiny-sd-smooth", kind="text2image", source=str(models_dir / "tiny-sd-smooth"),
                  scheduler="ddim", default_size=64, max_size=256, random_weights=True,
                  tokenizer=TINY_MODELS_TOKENIZER),
        ModelSpec(name="tiny-ip2p", kind="instruct", source=str(models_dir / "tiny-ip2p"), scheduler="euler_a",
                  default_size=128, max_size=256, random_weights=True, tokenizer=TINY_MODELS_TOKENIZER),
    )


class ClipSettings(BaseModel):
    """The CLIP model of the edit metrics and the dataset filter (IP2P used ViT-L/14)."""

    source: str | None = Field(None, description="hub id (openai/clip-vit-large-patch14) or folder; "
                                                 "default: the tiny random CLIP in models_dir")
    device: str = "cuda"
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"


class S3Settings(BaseModel):
    """Results, attention maps and inputs live here (MinIO in docker-compose, SeaweedFS in tests)."""

    endpoint_url: str | None = "http://127.0.0.1:8333"
    public_endpoint_url: str | None = Field(None, description="endpoint used in presigned URLs, if different")
    access_key_id: str = "editserve-dev"
    secret_access_key: str = "editserve-dev-secret"
    bucket: str = "editserve"
    region: str = "us-east-1"
    presign_expiry_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)
    retention_days: int = Field(7, ge=1, description="objects under edits/ expire after this (lifecycle rule)")
    max_attempts: int = Field(5, ge=1, le=20, description="attempts per S3 call, the first included: botocore's "
                              "retry mode (jittered exponential backoff) retries connection errors, timeouts, "
                              "5xx and throttling; other 4xx fail at once")
    retry_mode: Literal["standard", "adaptive"] = Field("standard", description="botocore retry mode; adaptive "
                                                        "also rate-limits the client when S3 throttles")


class LimitsSettings(BaseModel):
    """What the gateway accepts (checked before anything is queued), and how much each tenant may ask for.

    The tenant_* values are defaults; an operator overrides them per tenant (``PUT /v1/admin/tenants/{t}/limits``
    or ``python -m service.admin set-limits``).
    """

    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    image_formats: list[str] = ["PNG", "JPEG", "WEBP", "GIF", "BMP"]
    max_prompt_tokens: int = 77
    header_timeout_seconds: float = Field(10.0, gt=0, description="a request's headers must arrive within this "
                                          "(service.serving; slowloris)")
    body_timeout_seconds: float = Field(60.0, gt=0, description="a request's body must arrive within this after "
                                        "its headers (service.serving)")
    max_concurrent_decodes: int = Field(2, ge=1, description="images decoded at once per gateway process; the "
                                        "memory worst case is this many decodes of max_image_pixels")
    decode_wait_seconds: float = Field(10.0, ge=0, description="how long an upload waits for a decode slot "
                                       "before 503 + Retry-After")
    max_wait_seconds: int = 60
    default_wait_seconds: int = Field(60, ge=0, description="how long a bare `Prefer: wait` (no number) holds "
                                      "POST /v1/edits; capped by max_wait_seconds")
    max_queue_depth: int = Field(10_000, ge=0, description="queued edits of all tenants together; beyond it "
                                 "POST /v1/edits answers 503 + Retry-After")
    queue_full_retry_after_seconds: int = Field(30, ge=1, description="Retry-After of a 503/429 for a full queue")
    tenant_rps: float = Field(20.0, ge=0, allow_inf_nan=False, description="sustained requests/s per tenant on "
                              "authenticated /v1 routes (0: unlimited); beyond it 429 + Retry-After")
    tenant_burst: int = Field(100, ge=1, description="requests a tenant may make at once above tenant_rps")
    tenant_max_queued: int = Field(500, ge=0, description="queued (not yet started) edits per tenant; beyond "
                                   "it POST /v1/edits answers 429")
    tenant_max_concurrent: int = Field(16, ge=1, description="edits per tenant released to the worker queues at "
                                       "once (queued there or running); the rest wait, held, in submission "
                                       "order. Keep it >= worker.max_batch_size or one tenant cannot fill a batch")


class WorkerSettings(BaseModel):
    """The GPU worker's batching and recovery knobs."""

    max_batch_size: int = Field(8, ge=1)
    preview_decoder: str | None = Field(
        None, description="a tiny decoder (TAESD, diffusers AutoencoderTiny: folder or hub id) for previews; "
                          "unset: the linear latent→RGB approximation")
    max_batch_wait_ms: int = Field(50, ge=0)
    heartbeat_ttl_seconds: int = Field(30, ge=5, description="a job whose worker stops renewing is abandoned")
    reaper_interval_seconds: float = Field(10.0, gt=0)
    max_retries: int = Field(2, ge=0)
    job_timeout_seconds: int = 1800
    result_ttl_seconds: int = 7 * 24 * 3600
    metrics_port: int = Field(9101, description="0 disables the worker's own /metrics server")
    progress_min_interval_seconds: float = 0.25
    heartbeat_interval_seconds: float = Field(5.0, gt=0, description="renew running jobs' heartbeats this often "
                                              "(capped at a third of heartbeat_ttl_seconds)")
    cancel_check_interval_seconds: float = Field(0.25, ge=0, description="how often each running job's cancel "
                                                 "flag is read between denoising steps")
    poll_interval_ms: int = Field(20, ge=1, description="idle poll period: Redis cannot block on several "
                                  "queues with an atomic move, so the worker polls an atomic claim")
    stranded_claim_seconds: float = Field(60.0, gt=0, description="a claimed id that never started (worker died "
                                          "between claim and start) goes back to its queue after this long")
    torch_threads: int = Field(0, ge=0, description="intra-op CPU threads for torch (0: torch's default); 1 avoids "
                               "oversubscription when CPU workers share cores")
    result_upload_window_seconds: float = Field(600.0, ge=0, description="a finished result whose upload fails "
                                                "(storage outage) is kept and retried this long: the edit stays "
                                                "processing, heartbeats alive, and fails only after")
    hung_batch_seconds: float = Field(1800.0, gt=0, description="a batch that makes no progress (no denoising "
                                      "step ends, no job is settled, no upload is retried) for this long counts as "
                                      "hung: its heartbeats stop and the reaper re-runs its jobs")
    debug_step_delay_seconds: float = Field(0.0, ge=0, description="fault-injection tests only: sleep per step")
    batching: Literal["request", "step"] = Field(
        "request", description="request: a gathered batch starts and ends together; step: jobs join and leave "
        "one running batch per model between denoising steps (docs/continuous-batching.md)")
    row_budget: int = Field(32, ge=1, description="step batching: UNet rows per model's running batch "
                            "(P2P with n targets = 2(n+1) rows per output, IP2P = 3 per sweep cell and output)")
    high_priority_overflow_rows: int = Field(16, ge=0, description="step batching: rows a high-priority job may "
                                             "exceed row_budget by, so it joins at the next step even when full")
    row_buckets: str = Field("auto", description="UNet row counts a step is padded up to, e.g. '1,2,4,8,16,32'; "
                             "'auto': powers of two up to 128 when compiling, none when eager; '' never pads")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the UNet step; auto: on "
                                                  "CUDA devices only (CPU stays eager)")
    compile_mode: str = Field("max-autotune-no-cudagraphs", description="torch.compile mode without CUDA graphs")
    cuda_graphs: bool = Field(True, description="with compile on a CUDA device: capture steps as CUDA graphs "
                              "(mode reduce-overhead)")
    inductor_cache_dir: str = Field(str(REPO_ROOT / ".cache" / "inductor"), description="compiled kernels cached "
                                    "on disk, so a restarted worker warms up fast")
    warmup: bool = Field(True, description="compile every row bucket of every loaded model at worker start")


class WebhookSettings(BaseModel):
    """Signed delivery of edit events (Standard Webhooks)."""

    secret: str = Field("whsec_ZWRpdHNlcnZlLWRldmVsb3BtZW50LXNlY3JldC0zMmI=",
                        description="signing secret when auth is off; tenants get their own otherwise")
    allow_hosts: list[str] = Field(default_factory=list, description="hosts/CIDRs allowed despite being private")
    timeout_seconds: float = 15.0
    max_attempts: int = 8
    backoff_seconds: list[float] = [1, 5, 30, 120, 600, 1800, 3600]
    progress_min_interval_seconds: float = 0.5
    jitter_ratio: float = Field(0.2, ge=0.0, le=1.0, description="each retry delay is scaled by 1 ± this, at random")
    max_retry_after_seconds: float = Field(3600.0, ge=0.0, description="cap on a receiver's Retry-After")
    state_ttl_seconds: int = Field(7 * 24 * 3600, ge=1, description="lifetime of editserve:webhook:{id} keys")
    metrics_port: int = Field(9102, description="the delivery process's own /metrics; 0 disables")


class ImageUrlSettings(BaseModel):
    """Inputs by URL (``image_url``): fetched by the gateway through the egress guard (service/egress.py: resolve,
    refuse non-global addresses, pin the checked IP, SNI on the name), redirects re-checked hop by hop."""

    enabled: bool = Field(True, description="false: requests with image_url are refused (422)")
    allow_hosts: list[str] = Field(default_factory=list, description="hosts/CIDRs allowed despite being private "
                                   "(tests, an internal image store)")
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="the whole fetch: DNS, connect, TLS, "
                                   "redirects and body; a slower source is refused (422 image_url)")
    max_redirects: int = Field(3, ge=0, le=10, description="redirects followed, each target checked like the URL")
    ca_bundle: str | None = Field(None, description="PEM file of CA certificates to trust instead of the "
                                  "default store (a private CA)")


class DatasetSettings(BaseModel):
    """Dataset jobs (IP2P data engine): per-tenant size limits and how the driver feeds the edit queues."""

    max_triplets: int = Field(10_000, ge=1, description="caption triplets per dataset job")
    max_samples: int = Field(200_000, ge=1, description="triplets × samples_per_triplet per dataset job")
    max_active_per_tenant: int = Field(2, ge=1, description="queued or running dataset jobs per tenant")
    max_triplets_object_bytes: int = Field(16 * 1024 * 1024, ge=1, description="size of a triplets JSONL object")
    window_samples: int = Field(32, ge=1, description="a job's samples queued or running at once (at least one "
                                "triplet's); bounds what an interactive edit can find ahead of it")
    driver_interval_seconds: float = Field(0.5, gt=0, description="how often a worker's driver advances jobs")
    lease_seconds: float = Field(30.0, gt=0, description="a driver's hold on one job; a dead driver's expires")


class RetentionSettings(BaseModel):
    """How long what a workload writes to Redis lives (README "Retention"): every key expires or is swept."""

    record_ttl_seconds: int | None = Field(None, ge=1, description="terminal edit records (and their RQ jobs' "
                                           "lifetime floor); default: s3.retention_days, like the images")
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=1, description="an Idempotency-Key's claim")
    stats_ttl_seconds: int = Field(30 * 24 * 3600, ge=1, description="ETA statistics of a batch shape unused "
                                   "this long are dropped")
    sweep_batch: int = Field(1000, ge=1, description="entries one sweep pass examines per key (bounded work)")


class AuthSettings(BaseModel):
    """API keys (hashes stored) bound to tenants; the admin token guards key management."""

    required: bool = False
    admin_token: str | None = None
    default_tenant: str = "default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDITSERVE_", env_nested_delimiter="__", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss:// (TLS) or "
                           "redis+sentinel://host:26379[,host2:26379]/MASTER_NAME/DB (service/redisconn.py)")
    redis_pool_size: int = Field(100, ge=1, description="the gateway's asyncio Redis connections per process")
    redis_pool_wait_seconds: float = Field(5.0, ge=0, description="how long a request waits for a free pooled "
                                           "connection before 503 + Retry-After")
    models_dir: Path = REPO_ROOT / ".models"
    models: list[ModelSpec] | None = Field(None, description="JSON list; default: default_models(models_dir)")
    enabled_models: list[str] | None = Field(None, description="names a worker loads; default: all local ones")
    default_p2p_model: str = "tiny-sd"
    default_ip2p_model: str = "tiny-ip2p"
    require_live_worker: list[str] = Field(default_factory=list, description="models whose edits are refused "
                                           "(503 + Retry-After) while no live worker serves them, e.g. "
                                           "EDITSERVE_REQUIRE_LIVE_WORKER='[\"sd14\"]' (or a model's own "
                                           "require_live_worker)")
    no_worker_retry_after_seconds: int = Field(30, ge=1, description="Retry-After of that 503")
    throughput_window_seconds: int = Field(300, ge=60, le=3600, description="/v1/models reports throughput "
                                           "over this many recent seconds (whole minutes)")
    s3: S3Settings = Field(default_factory=S3Settings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    image_urls: ImageUrlSettings = Field(default_factory=ImageUrlSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    datasets: DatasetSettings = Field(default_factory=DatasetSettings)

    def clip_source(self) -> str:
        return self.clip.source or str(self.models_dir / "tiny-clip")

    @field_validator("redis_url")
    @classmethod
    def _openable_redis_url(cls, url: str) -> str:
        from service.redisconn import validate_url  # lazy: the settings import nothing heavy

        return validate_url(url)

    def requires_live_worker(self, model: str) -> bool:
        spec = self.model_catalog().get(model)
        return model in self.require_live_worker or bool(spec and spec.require_live_worker)

    def model_catalog(self) -> dict[str, ModelSpec]:
        specs = self.models if self.models is not None else default_models(self.models_dir)
        return {m.name: m for m in specs}


@lru_cache
def get_settings() -> Settings:
    return Settings()

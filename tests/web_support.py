"""The live stack the web-client tests share: gateway (auth on), one worker, webhook sender, Redis, S3.

Why auth on: the playground and the TypeScript client must work with a typed API key, exactly as a user
would; the key is created through the admin API. The worker sleeps a little per denoising step so that
progress is observable (a few SSE progress events per edit) on a fast machine too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from devtools.devstack import LocalStack

REPO = Path(__file__).resolve().parent.parent
TS_DIR = REPO / "clients" / "typescript"
PLAYGROUND_DIR = REPO / "service" / "static" / "playground"
SCREENSHOT_DIR = Path(os.environ.get("EDITSERVE_SCREENSHOT_DIR", REPO / ".run" / "playground-screenshots"))
WEB_REDIS_DB = 12
STEP_DELAY_SECONDS = "0.15"


@dataclass
class WebStack:
    stack: LocalStack
    api_key: str
    webhook_secret: str

    @property
    def base_url(self) -> str:
        return self.stack.base_url


def start_web_stack(redis_server, s3_server, models_dir: Path) -> WebStack:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{WEB_REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    admin_token = secrets.token_urlsafe(24)
    stack = LocalStack(redis_url=url, s3=s3_server, models_dir=models_dir, extra_env={
        "EDITSERVE_AUTH__REQUIRED": "true",
        "EDITSERVE_AUTH__ADMIN_TOKEN": admin_token,
        "EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]',
        "EDITSERVE_WEBHOOKS__METRICS_PORT": "0",  # no fixed port: parallel stacks would collide
        "EDITSERVE_WORKER__MAX_BATCH_WAIT_MS": "50",
        "EDITSERVE_WORKER__DEBUG_STEP_DELAY_SECONDS": STEP_DELAY_SECONDS,
        "EDITSERVE_WORKER__PROGRESS_MIN_INTERVAL_SECONDS": "0.1",
        "EDITSERVE_WORKER__TORCH_THREADS": "1",
    })
    try:
        stack.start_webhook_sender()  # the slow starters first: they load while the gateway comes up
        stack.start_worker("web-worker")
        stack.start_gateway()
        created = httpx.post(f"{stack.base_url}/v1/admin/keys", json={"tenant": "web", "label": "web tests"},
                             headers={"Authorization": f"Bearer {admin_token}"}, timeout=30)
        created.raise_for_status()
    except BaseException:
        stack.stop()
        raise
    body = created.json()
    return WebStack(stack=stack, api_key=body["key"], webhook_secret=body["webhook_secret"])


def node_bin(name: str) -> str:
    """A dev tool installed by `npm ci` in clients/typescript (scripts/bootstrap.sh runs it)."""
    path = TS_DIR / "node_modules" / ".bin" / name
    assert path.exists(), f"{path} missing: run `npm ci` in clients/typescript (scripts/bootstrap.sh does)"
    return str(path)


def run(args: list[str], *, cwd: Path = TS_DIR, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def generate_command(output: Path) -> str:
    """package.json's `generate` script, writing to ``output`` instead of src/openapi.ts."""
    script = json.loads((TS_DIR / "package.json").read_text())["scripts"]["generate"]
    assert "src/openapi.ts" in script
    return script.replace("openapi-typescript", node_bin("openapi-typescript"), 1).replace(
        "src/openapi.ts", str(output))


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is missing: apt-get install chromium (scripts/bootstrap.sh does)"
    return path

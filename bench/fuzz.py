"""Fuzz the gateway with many schemathesis cases: ``python bench/fuzz.py --examples 300``.

The long version of tests/test_fuzz.py: same harness (tests/fuzz_support.py), random seeds by default, its
own Redis (a free port) and SeaweedFS S3. Prints counts by status and by operation, then each distinct
problem once with a reproducing request; exits 1 when there is any problem.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fuzz_support import run_fuzz
from schemathesis.generation import GenerationMode

ADMIN_TOKEN = "fuzz-admin-token"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="cases per operation and generation mode")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default: random)")
    parser.add_argument("--deterministic", action="store_true", help="derandomize (the CI test's cases)")
    parser.add_argument("--mode", choices=["both", "positive", "negative"], default="both")
    parser.add_argument("--only", help="fuzz only operations whose label contains this, e.g. 'POST /v1/edits'")
    args = parser.parse_args(argv)

    from service.app import create_app
    from service.config import S3Settings, Settings
    from devtools.devstack import ensure_redis, free_port, start_seaweedfs

    redis_server = ensure_redis(f"redis://127.0.0.1:{free_port()}/0")
    s3 = start_seaweedfs(bucket="editserve-fuzz")
    try:
        settings = Settings(
            redis_url=redis_server.url,
            s3=S3Settings(endpoint_url=s3.endpoint_url, access_key_id=s3.access_key, secret_access_key=s3.secret_key,
                          bucket=s3.bucket, region=s3.region),
            auth={"admin_token": ADMIN_TOKEN},
            limits={"tenant_rps": 0, "max_wait_seconds": 1, "tenant_max_queued": 1_000_000},
        )
        app = create_app(settings, prepare_bucket=False)
        app.state.services.sse_keepalive_seconds = 0.2
        key = app.state.services.keys.create_key("fuzz").key
        edit_ids = tuple(submit_sample_edit(app, key) for _ in range(3))
        modes = {"both": (GenerationMode.POSITIVE, GenerationMode.NEGATIVE), "positive": (GenerationMode.POSITIVE,),
                 "negative": (GenerationMode.NEGATIVE,)}[args.mode]
        started = time.monotonic()
        report = run_fuzz(app, max_examples=args.examples, tenant_key=key, admin_token=ADMIN_TOKEN,
                          derandomize=args.deterministic, modes=modes, seed=args.seed,
                          skip=lambda label: bool(args.only) and args.only not in label, edit_ids=edit_ids)
        print(f"{report.summary()} in {time.monotonic() - started:.0f} s")
        for (operation, status), count in sorted(report.by_operation.items()):
            print(f"  {operation:45s} {status}  {count}")
        seen: set[tuple[str, int, str]] = set()
        for finding in report.findings:
            key_ = (finding.operation, finding.status, finding.problem)
            if key_ in seen:
                continue
            seen.add(key_)
            print(f"\nPROBLEM {finding.operation} → {finding.status}: {finding.problem}\n  request: {finding.request}"
                  f"\n  response: {finding.response}")
        return 1 if report.findings else 0
    finally:
        s3.stop()
        redis_server.stop()


def submit_sample_edit(app, key: str) -> str:
    """One real edit of the fuzzing tenant, so GET/cancel cases can hit an existing record."""
    from fastapi.testclient import TestClient

    body = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"]}
    response = TestClient(app).post("/v1/edits", json=body, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return response.json()["id"]


if __name__ == "__main__":
    raise SystemExit(main())

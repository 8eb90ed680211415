"""The TypeScript client (clients/typescript): its generated types and compiled JS are current, and its
node:test suite passes against a live stack (gateway, worker, webhook sender, Redis, S3, tiny models)."""

from __future__ import annotations

import filecmp
import re

import pytest
from web_support import PLAYGROUND_DIR, TS_DIR, generate_command, node_bin, run, start_web_stack


def test_generated_types_match_the_committed_openapi(tmp_path):
    fresh = tmp_path / "openapi.ts"
    result = run(["bash", "-c", generate_command(fresh)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert fresh.read_text() == (TS_DIR / "src" / "openapi.ts").read_text(), (
        "clients/typescript/src/openapi.ts is stale: run `npm run generate && npm run build` in clients/typescript")


def test_compiled_client_and_playground_copy_match_the_sources(tmp_path):
    result = run([node_bin("tsc"), "-p", "tsconfig.json", "--outDir", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(p.name for p in (TS_DIR / "dist").iterdir()), "dist/ has other files than a fresh build"
    stale = [name for name in built if not filecmp.cmp(tmp_path / name, TS_DIR / "dist" / name, shallow=False)]
    browser = [name for name in built if name.endswith(".js") and not name.startswith("webhooks")]
    assert sorted(p.name for p in (PLAYGROUND_DIR / "lib").iterdir()) == browser
    stale += [f"playground/{name}" for name in browser
              if not filecmp.cmp(tmp_path / name, PLAYGROUND_DIR / "lib" / name, shallow=False)]
    assert not stale, f"stale compiled files {stale}: run `npm run build` in clients/typescript"


def test_browser_half_of_the_client_uses_no_node_module():
    for path in (PLAYGROUND_DIR / "lib").iterdir():
        assert not re.search(r"""from\s+["']node:|require\(""", path.read_text()), path.name


@pytest.mark.e2e
def test_node_suite_against_a_live_stack(redis_server, s3_server, tiny_models):
    web = start_web_stack(redis_server, s3_server, tiny_models["tiny-sd"].parent)
    try:
        result = run(["node", "--test", "--test-reporter=spec", "test/live.test.mjs"], timeout=240, env={
            "EDITSERVE_URL": web.base_url, "EDITSERVE_API_KEY": web.api_key,
            "EDITSERVE_WEBHOOK_SECRET": web.webhook_secret})
    finally:
        web.stack.stop()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^\S*\s*pass (\d+)", output, re.M) and not re.search(r"^\S*\s*fail [1-9]", output, re.M), output

"""The web clients on one live stack (gateway with API keys, worker, webhook sender, Redis, S3, tiny models):
the TypeScript client's generated types and compiled JS are current and its node:test suite passes, and the
playground page works in headless Chromium (Debian's, driven by Playwright): P2P and IP2P edits submitted
from the page, progress advancing, results loaded from presigned URLs, attention maps on hover, API errors
next to their field. Screenshots of finished edits go to ``.run/playground-screenshots/`` (or
``$EDITSERVE_SCREENSHOT_DIR``)."""

from __future__ import annotations

import base64
import filecmp
import re
import sys

import httpx
import pytest
from web_support import (
    PLAYGROUND_DIR,
    REPO,
    SCREENSHOT_DIR,
    TS_DIR,
    chromium_path,
    generate_command,
    node_bin,
    run,
    start_web_stack,
)


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


@pytest.fixture(scope="module")
def web(redis_server, s3_server, tiny_models):
    web = start_web_stack(redis_server, s3_server, tiny_models["tiny-sd"].parent)
    yield web
    web.stack.stop()


@pytest.mark.e2e
def test_node_suite_against_a_live_stack(web):
    result = run(["node", "--test", "--test-reporter=spec", "test/sse.test.mjs", "test/live.test.mjs"], timeout=240, env={
        "EDITSERVE_URL": web.base_url, "EDITSERVE_API_KEY": web.api_key,
        "EDITSERVE_WEBHOOK_SECRET": web.webhook_secret})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^\S*\s*pass (\d+)", output, re.M) and not re.search(r"^\S*\s*fail [1-9]", output, re.M), output


def test_playground_fetches_nothing_from_the_internet():
    """Every script, style and image the page loads is its own (the CSP enforces it in the browser too)."""
    for path in PLAYGROUND_DIR.rglob("*"):
        if path.is_file():
            text = path.read_text()
            external = re.findall(r"https?://(?!127\.0\.0\.1)[\w.-]+", text)
            assert not external, (path.name, external)


@pytest.mark.e2e
def test_playground_is_served_with_a_strict_policy(web):
    assert httpx.get(f"{web.base_url}/playground").headers["location"] == "/playground/"
    page = httpx.get(f"{web.base_url}/playground/")
    assert page.status_code == 200 and "editserve playground" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy
    assert httpx.get(f"{web.base_url}/playground/lib/index.js").status_code == 200
    assert "/playground" not in httpx.get(f"{web.base_url}/openapi.json").text


# ------------------------------------------------------------------------------------------------ the browser

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path())
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, web):
    """The playground with the API key typed in; records every request so tests can check where the key went."""
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.requests = []
    page.errors = []
    page.on("request", lambda request: page.requests.append(request))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(f"{web.base_url}/playground/")
    page.wait_for_selector("body[data-ready]")
    page.fill("#api-key", web.api_key)
    yield page
    assert not page.errors, page.errors
    for request in page.requests:
        assert web.api_key not in request.url, "the API key leaked into a URL"
        if "X-Amz-Signature" in request.url:
            assert "authorization" not in request.headers, "the API key was sent to the storage host"
    assert web.api_key not in page.url
    context.close()


def set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', "
                                    "{bubbles: true})); }", value)


def record_progress(page) -> None:
    """Collects every step value the page's progress bars show (MutationObserver, in the page)."""
    page.evaluate("""() => {
        window.stepsSeen = [];
        new MutationObserver((records) => {
            for (const r of records) if (r.attributeName === 'aria-valuenow') window.stepsSeen.push(Number(r.target.getAttribute('aria-valuenow')));
        }).observe(document.querySelector('#jobs'), {subtree: true, attributes: true, attributeFilter: ['aria-valuenow']});
    }""")


def wait_finished(page, card_selector: str):
    page.wait_for_selector(f'{card_selector}[data-status="succeeded"], {card_selector}[data-status="failed"], '
                           f'{card_selector}[data-status="canceled"]', timeout=120_000)
    card = page.locator(card_selector).first
    assert card.get_attribute("data-status") == "succeeded", card.inner_text()
    return card


def images_loaded(page, card) -> list[str]:
    """The card's result images, once every one has loaded (naturalWidth > 0): their URLs."""
    card.locator(".result img").first.wait_for()
    page.wait_for_function("(card) => [...card.querySelectorAll('.result img')].every((i) => i.complete && "
                           "i.naturalWidth > 0)", arg=card.element_handle(), timeout=30_000)
    return card.locator(".result:not(.input) img").evaluate_all("(imgs) => imgs.map((i) => i.src)")


@pytest.mark.e2e
def test_p2p_edit_from_the_page(page, web, tmp_path):
    page.fill("#p2p-source", "a photo of a cat riding a bicycle")
    page.fill("#p2p-target-0", "a photo of a dog riding a bicycle")
    page.click("#add-target")
    page.fill("#p2p-target-1", "a photo of a bird riding a bicycle")
    # the diff shows the edit that will run: a swap per target
    assert page.locator("#p2p-diff").inner_text().startswith("will run: replace")
    assert page.locator('#p2p-diff [data-target="1"] .swap').inner_text() == "cat→bird"
    page.fill("#p2p-steps", "8")
    page.fill("#p2p-size", "64")
    page.fill("#p2p-seed", "21")
    set_range(page, "#p2p-cross", 0.6)
    set_range(page, '#p2p-reweight [data-field="reweight.0"] input[data-word="dog"]', 2)
    page.click('#lb-source [data-word="cat"]')
    page.click('#lb-target [data-target="0"][data-word="dog"]')
    page.click('#lb-target [data-target="1"][data-word="bird"]')
    record_progress(page)
    page.click("#p2p-submit")

    card = wait_finished(page, '.job[data-kind="p2p"]')
    steps = page.evaluate("window.stepsSeen")
    assert len(set(steps)) >= 2 and steps == sorted(steps) and steps[-1] == 8, steps
    urls = images_loaded(page, card)
    assert len(urls) == 3 and all("X-Amz-Signature" in u for u in urls), urls
    edit_id = card.get_attribute("data-edit-id")
    done = httpx.get(f"{web.base_url}/v1/edits/{edit_id}", headers={"Authorization": f"Bearer {web.api_key}"}).json()
    assert done["params"]["reweight"] == [{"dog": 2.0}, {}]
    assert done["params"]["local_blend"]["target_words"] == [["dog"], ["bird"]]
    assert done["params"]["cross_replace_steps"] == 0.6 and done["params"]["seed"] == 21

    # hovering a word shows its attention map over the image it belongs to
    overlay = card.locator('.result[data-index="1"] .overlay')
    card.locator('.map-row[data-prompt="1"] .token', has_text="dog").hover()
    page.wait_for_function("(el) => el.classList.contains('shown') && el.dataset.token === 'dog'",
                           arg=overlay.element_handle(), timeout=15_000)
    painted = overlay.evaluate("(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
                               "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n / (d.length / 4); }")
    assert painted > 0.5, painted
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "playground-p2p.png"), full_page=True)
    card.locator('.map-row[data-prompt="1"] .token', has_text="dog").blur()
    page.mouse.move(0, 0)
    page.wait_for_function("(el) => !el.classList.contains('shown')", arg=overlay.element_handle())

    # copy as code: the same request as curl and Python, never with the key, and both run as they are
    env = {"EDITSERVE_API_KEY": web.api_key, "PYTHONPATH": str(REPO)}
    page.click('#p2p-form [data-copy="curl"]')
    curl = page.locator("#snippet").inner_text()
    assert "$EDITSERVE_API_KEY" in curl and web.api_key not in curl and '"reweight":[{"dog":2},{}]' in curl
    answer = run(["bash", "-c", curl], cwd=tmp_path, env=env, timeout=60)
    assert answer.returncode == 0 and '"status":"queued"' in answer.stdout, answer.stdout + answer.stderr
    page.click('#p2p-form [data-copy="python"]')
    python = page.locator("#snippet").inner_text()
    assert web.api_key not in python and "submit_p2p(" in python
    ran = run([sys.executable, "-c", python], cwd=tmp_path, env=env, timeout=180)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert len(list((tmp_path / "out").glob("*-output-*.png"))) == 3


@pytest.mark.e2e
def test_ip2p_edit_from_the_page_with_a_sweep_by_keyboard(page, tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(photo)
    page.focus("#tab-p2p")
    page.keyboard.press("ArrowRight")
    assert page.locator("#panel-ip2p").is_visible() and page.evaluate("document.activeElement.id") == "tab-ip2p"
    page.evaluate("""(b64) => {  // drag and drop, as a person would
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'photo.png', {type: 'image/png'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }""", base64.b64encode(photo.read_bytes()).decode())
    page.wait_for_selector("#ip2p-preview:not([hidden])")
    page.fill("#ip2p-instruction", "make it snowy")
    set_range(page, "#ip2p-text", 6)
    page.fill("#ip2p-steps", "6")
    page.fill("#ip2p-resolution", "64")
    page.fill("#ip2p-seed", "4")
    page.fill("#sweep-image", "1, 1.5")
    page.fill("#sweep-text", "5, 7.5")
    page.focus("#ip2p-instruction")
    page.keyboard.press("Control+Enter")

    card = wait_finished(page, '.job[data-kind="ip2p"]')
    urls = images_loaded(page, card)
    assert len(urls) == 4 and all("X-Amz-Signature" in u for u in urls)
    assert card.locator(".result.input img").get_attribute("src").startswith("blob:")  # the photo, beside them
    captions = card.locator(".result figcaption span").all_inner_texts()
    assert captions[:2] == ["s_I 1 · s_T 5 · seed 4", "s_I 1 · s_T 7.5 · seed 4"], captions
    columns = card.locator(".results").evaluate("(el) => getComputedStyle(el).gridTemplateColumns.split(' ').length")
    assert columns == 2
    page.screenshot(path=str(SCREENSHOT_DIR / "playground-ip2p.png"), full_page=True)


@pytest.mark.e2e
def test_api_errors_are_shown_next_to_the_field_they_name(page, web):
    page.fill("#api-key", "esk_not_a_key")
    page.fill("#p2p-steps", "4")
    page.click("#p2p-submit")
    page.locator("#key-form .field-error").wait_for(timeout=15_000)
    assert "invalid" in page.locator("#key-form .field-error").inner_text()
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", web.api_key)

    page.fill("#p2p-target-0", "a photo of a dog riding a bicycle")
    page.click("#add-target")
    page.fill("#p2p-target-1", "a photo of a big bird riding a red bicycle")
    page.select_option("#p2p-edit", "replace")  # a swap needs equal word counts: the server names target 1
    page.fill("#p2p-steps", "4")
    page.click("#p2p-submit")
    error = page.locator('[data-field="target_prompts.1"] .field-error')
    error.wait_for(timeout=15_000)
    assert "same number" in error.inner_text()
    assert page.locator("#p2p-target-1").get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "p2p-target-1"
    assert page.locator(".job").count() == 0

    page.select_option("#p2p-edit", "auto")
    page.fill("#p2p-steps", "0")
    page.click("#p2p-submit")
    steps_error = page.locator('[data-field="steps"] .field-error')
    steps_error.wait_for(timeout=15_000)
    assert page.locator('[data-field="target_prompts.1"] .field-error').count() == 0
    assert page.locator(".job").count() == 0

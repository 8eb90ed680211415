"""The hostile parts of ``bench/chaos.py``: an attacker with a valid key beside the normal traffic, a health
probe timing the gateway meanwhile, and the gateway's peak memory.

- ``HostileClient``: huge mappings of valid words (case variants CLIP reads as one word), huge lists,
  aspect-ratio bombs (1000x1 PNGs), small-file large-picture PNGs (one colour, near the pixel limit), and
  bursts of 220 concurrent connections; it counts the answers by status (any 5xx is a finding).
- ``HealthProbe``: ``GET /healthz`` every 50 ms; p50/p99/max while the attack runs (goal p99 < 100 ms).
- ``peak_rss_mb``: the gateway process's VmHWM (the kernel's peak resident set).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import threading
import time
from collections import Counter
from pathlib import Path


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def case_variants(phrase: str, count: int) -> list[str]:
    letters = [i for i, ch in enumerate(phrase) if ch.isalpha()]
    out = []
    for flips in itertools.product((False, True), repeat=len(letters)):
        chars = list(phrase)
        for i, flip in zip(letters, flips):
            if flip:
                chars[i] = chars[i].upper()
        out.append("".join(chars))
        if len(out) == count:
            break
    return out


def png_b64(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 90)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class HealthProbe:
    def __init__(self, base_url: str, interval: float = 0.05):
        self.base_url = base_url
        self.interval = interval
        self.samples: list[float] = []
        self.timed: list[tuple[float, float]] = []  # (monotonic start, seconds)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> HealthProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self._stop.wait(self.interval):
                t0 = time.perf_counter()
                try:
                    ok = client.get("/healthz").status_code == 200
                except Exception:  # noqa: BLE001 — a gateway restart, or a timeout: counted
                    ok = False
                if ok:
                    self.samples.append(time.perf_counter() - t0)
                    self.timed.append((time.monotonic(), self.samples[-1]))
                else:
                    self.errors += 1

    def summary(self) -> str:
        if not self.samples:
            return f"no samples ({self.errors} errors)"
        s = sorted(self.samples)
        pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1000  # noqa: E731
        return (f"p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {s[-1] * 1000:.0f} ms over {len(s)} probes"
                f" ({self.errors} failed)")

    def split_by(self, windows: list[tuple[float, float]]) -> str:
        """p99 of the probes that started inside ``windows`` (e.g. the attacker's 220-connection bursts) and of
        the others: tells a loop stalled by one request from requests queueing behind a burst."""
        def p99(values: list[float]) -> str:
            if not values:
                return "-"
            values = sorted(values)
            return f"{values[min(len(values) - 1, int(0.99 * len(values)))] * 1000:.0f} ms ({len(values)} probes)"

        inside = [s for t, s in self.timed if any(a <= t <= b for a, b in windows)]
        outside = [s for t, s in self.timed if not any(a <= t <= b for a, b in windows)]
        return f"p99 during the attacker's bursts {p99(inside)}, outside them {p99(outside)}"

    def p99_ms(self) -> float | None:
        if not self.samples:
            return None
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(0.99 * len(s)))] * 1000


class HostileClient:
    """One attacker thread; ``answers`` counts (attack, status) pairs."""

    PROMPT = {"kind": "p2p", "source_prompt": "a cat riding a bicycle over a mountain",
              "target_prompts": ["a dog riding a bicycle over a mountain"], "steps": 4, "height": 64, "width": 64}

    def __init__(self, base_url: str, *, max_image_pixels: int, rounds: int = 4, pause: float = 2.0):
        self.base_url = base_url
        self.rounds = rounds
        self.pause = pause
        self.answers: Counter = Counter()
        self.accepted_ids: list[str] = []  # the large-picture uploads are valid edits: they run like any other
        self.bursts: list[tuple[float, float]] = []  # (monotonic start, end) of each round's requests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile", daemon=True)
        side = int((max_image_pixels * 0.9) ** 0.5)
        self._bodies = {
            "huge mapping (100k valid words)": {**self.PROMPT, "reweight": {w: 1.5 for w in
                                                                            case_variants("bicycle over a mountain",
                                                                                          100_000)}},
            "huge list (attention_maps 40k)": {**self.PROMPT, "attention_maps": [0] * 40_000},
            "huge word list (local_blend 40k)": {**self.PROMPT, "local_blend": {
                "source_words": ["cat"], "target_words": ["dog"] * 40_000}},
            "aspect-ratio bomb (1000x1)": {"kind": "ip2p", "instruction": "make it red", "steps": 4,
                                           "image": png_b64(1000, 1)},
            f"large picture, small file ({side}x{side})": {"kind": "ip2p", "instruction": "make it red", "steps": 4,
                                                          "resolution": 64, "image": png_b64(side, side)},
        }

    def start(self) -> HostileClient:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        for _ in range(self.rounds):
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                asyncio.run(self._round())
            except Exception as exc:  # noqa: BLE001 — a gateway restart mid-round
                self.answers[("round", type(exc).__name__)] += 1
            self.bursts.append((started, time.monotonic()))
            self._stop.wait(self.pause)

    async def _round(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=120, limits=limits) as client:
            async def post(name: str, body: dict) -> None:
                try:
                    response = await client.post("/v1/edits", json=body)
                    status = response.status_code
                    if status in (200, 202):
                        self.accepted_ids.append(response.json()["id"])
                except Exception as exc:  # noqa: BLE001
                    status = type(exc).__name__
                self.answers[(name, status)] += 1

            async def get(name: str, path: str) -> None:
                try:
                    status = (await client.get(path)).status_code
                except Exception as exc:  # noqa: BLE001
                    status = type(exc).__name__
                self.answers[(name, status)] += 1

            big = [post(name, body) for name, body in self._bodies.items()]
            # 220 connections at once beside the big bodies: invalid edits and listings (Redis reads)
            burst = [post("220 concurrent: invalid edit", {**self.PROMPT, "steps": "2"}) for _ in range(110)]
            burst += [get("220 concurrent: GET /v1/edits", "/v1/edits?limit=5") for _ in range(110)]
            await asyncio.gather(*big, *burst)

    def five_xx(self) -> int:
        return sum(n for (_, status), n in self.answers.items() if isinstance(status, int) and status >= 500
                   and status != 503)

    def lines(self) -> list[str]:
        by_attack: dict[str, Counter] = {}
        for (name, status), n in sorted(self.answers.items(), key=lambda kv: str(kv[0])):
            by_attack.setdefault(name, Counter())[status] += n
        return [f"      {name:<42} {dict(statuses)}" for name, statuses in by_attack.items()]

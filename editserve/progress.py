"""A one-line progress display for ``wait()``: status, queue position, steps, ETA (tqdm-like, no dependency).

Why not tqdm: the SDK's only dependencies are pydantic and httpx. The bar draws only on an interactive
stderr, so logs and CI output stay clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from editserve.contract import Edit, EditStatus, Inversion

BAR_WIDTH = 24
ProgressCallback = Callable[[Edit], None]
InversionProgressCallback = Callable[[Inversion], None]


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


SNIPPET_CHARS = 24


def short_id(edit_id: str) -> str:
    """The id's last 8 characters: its random part. The first characters are a millisecond timestamp, so edits
    submitted within a second share them and a prefix cannot tell them apart."""
    return edit_id[-8:]


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def label(edit: Edit, *, full_id: bool = False) -> str:
    """Names one edit among several followed at once: short id (``full_id``: the whole id), kind and a prompt
    snippet (P2P: the first target, ``+N`` more), e.g. ``k3j9x2ab p2p "a dog on a mat"`` or
    ``7qk2m0zd ip2p "make it snowy"``."""
    params = edit.params or {}
    more = ""
    if edit.kind == "p2p":
        targets = params.get("target_prompts") or []
        text = targets[0] if targets else params.get("source_prompt", "")
        more = f" +{len(targets) - 1}" if len(targets) > 1 else ""
    else:
        text = params.get("instruction", "")
    name = f"{edit.id if full_id else short_id(edit.id)} {edit.kind}"
    return f'{name} "{_snippet(text)}"{more}' if text else name


def _bar(done: int, total: int) -> str:
    filled = int(BAR_WIDTH * min(1.0, done / total)) if total else 0
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]"


def render_inversion(inversion: Inversion, elapsed: float) -> str:
    """One inversion update: the DDIM walk's steps, then each null-text step with the inner iterations it ran (of
    the most possible), e.g. ``ab12cd34 inversion "a cat on a sofa" processing [######------] null-text step 4/10 inner 7/10 (7s)``."""
    caption = (inversion.request or {}).get("caption", "")
    name = f'{short_id(inversion.id)} inversion "{_snippet(caption)}"' if caption else f"{short_id(inversion.id)} inversion"
    parts = [name, f"{inversion.status.value:<10}"]
    progress = inversion.progress
    if progress is not None and progress.total:
        phase = f"{progress.phase} " if progress.phase else ""
        parts.append(f"{_bar(progress.step, progress.total)} {phase}step {progress.step}/{progress.total}")
        if progress.inner_total:
            parts.append(f"inner {progress.inner_iterations}/{progress.inner_total}")
    parts.append(f"({_duration(elapsed)})")
    return " ".join(parts)


def render(edit: Edit | Inversion, elapsed: float) -> str:
    """The text of one update, e.g. ``k3j9x2ab p2p "a dog on a mat" processing [######------] 12/50 eta 3s (7s)``."""
    if isinstance(edit, Inversion):
        return render_inversion(edit, elapsed)
    parts = [label(edit), f"{edit.status.value:<10}"]
    if edit.status is EditStatus.queued and edit.queue_position is not None:
        parts.append(f"position {edit.queue_position}")
    if edit.progress is not None and edit.progress.total:
        parts.append(f"{_bar(edit.progress.step, edit.progress.total)} {edit.progress.step}/{edit.progress.total}")
    if edit.eta_seconds is not None and not edit.status.terminal:
        parts.append(f"eta {_duration(edit.eta_seconds)}")
    parts.append(f"({_duration(elapsed)})")
    return " ".join(parts)


class ProgressLine:
    """Redraws one line in place on a TTY; does nothing elsewhere."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._width = 0

    def __call__(self, edit: Edit | Inversion) -> None:
        if not self.enabled:
            return
        text = render(edit, time.monotonic() - self.started)
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)
        if edit.status.terminal:
            self.stream.write("\n")
        self.stream.flush()


def progress_callback(progress: bool | Callable) -> Callable | None:
    """``True`` → a bar on an interactive stderr; ``False`` → nothing; a callable is called per update."""
    if callable(progress):
        return progress
    return ProgressLine() if progress else None

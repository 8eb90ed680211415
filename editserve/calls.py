"""The SDK's request plumbing shared by the client and its mixins (datasets): a request as sent on every retry,
the webhook shorthand, atomic downloads. Below ``client.py``, so the mixins need not import the client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editserve.contract import WebhookSpec


@dataclass
class Call:
    """One API request, sent identically on every retry."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json_body: Any = None
    form: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None


def webhook_spec(webhook: str | WebhookSpec | Mapping[str, Any] | None) -> Any:
    """A bare URL means "every event" (the server's defaults); a spec or mapping is sent as it is."""
    return {"url": webhook} if isinstance(webhook, str) else webhook


def write_atomically(path: Path, content: bytes) -> None:
    """A download never leaves a half-written file under its final name."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(content)
    tmp.replace(path)

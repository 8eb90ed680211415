"""The browser playground: static files under ``service/static/playground`` served at ``/playground/``.

Why static and same-origin: the page talks only to the public ``/v1`` API with the key the user types (kept in
memory or sessionStorage, sent as a header, never in a URL), through the TypeScript client compiled into
``lib/``. Nothing is fetched from the internet at run time; the Content-Security-Policy makes the browser
enforce that for scripts and styles. Result images and attention arrays come from presigned storage URLs,
hence the wider ``img-src``/``connect-src``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static" / "playground"
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob: http: https:",
    "connect-src 'self' http: https:",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class PlaygroundFiles(StaticFiles):
    """StaticFiles plus the security headers above on every answer."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_playground(app: FastAPI) -> None:
    """Serve the playground at ``/playground/`` (``/playground`` redirects there); absent from the OpenAPI."""

    @app.get("/playground", include_in_schema=False)
    def playground_redirect() -> RedirectResponse:
        return RedirectResponse("/playground/", status_code=308)

    app.mount("/playground", PlaygroundFiles(directory=STATIC_DIR, html=True), name="playground")

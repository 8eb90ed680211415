"""gunicorn's uvicorn worker serving the gateway with the read deadlines of ``service.serving``.

A module of its own because gunicorn and uvicorn-worker are installed only where the gateway runs under
gunicorn (the Docker image, the dev setup); ``python -m service.serving`` needs neither.
"""

from __future__ import annotations

from uvicorn_worker import UvicornWorker

from service.serving import configured_protocol


class GatewayWorker(UvicornWorker):
    """``UvicornWorker`` whose HTTP protocol enforces the header and body read deadlines (``EDITSERVE_LIMITS__*``)."""

    CONFIG_KWARGS = {"loop": "auto", "http": configured_protocol()}

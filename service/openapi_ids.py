"""OpenAPI operation ids that read well in generated clients (``createEdit``, ``getEdit``).

FastAPI's default ids join the function name, path and method (``create_edit_v1_edits_post``), which
becomes the method name in every generated SDK. Ours are the route function's name in camelCase, with a
few renamed where the Python name reads badly as a client method.
"""

from __future__ import annotations

from fastapi.routing import APIRoute

RENAMED = {
    "edit_event_stream": "streamEditEvents",
    "prometheus_metrics": "getMetrics",
    "healthz": "getHealth",
    "readyz": "getReadiness",
    "put_tenant_limits": "setTenantLimits",
}


def camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def operation_id(route: APIRoute) -> str:
    """FastAPI's ``generate_unique_id_function``: the route function's name, camelCased."""
    return RENAMED.get(route.name) or camel_case(route.name)

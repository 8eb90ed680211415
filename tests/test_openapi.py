"""The committed OpenAPI document must match the app (SDK and docs are generated from it)."""

from __future__ import annotations

import importlib.util
import json

from gateway_support import REPO_ROOT


def load_exporter():
    spec = importlib.util.spec_from_file_location("export_openapi", REPO_ROOT / "scripts" / "export_openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_openapi_matches_the_app():
    exporter = load_exporter()
    committed = exporter.OUTPUT.read_text() if exporter.OUTPUT.exists() else ""
    assert committed == exporter.render(), (
        "openapi/openapi.json is out of date: run `python scripts/export_openapi.py` and commit the result")


def test_openapi_documents_both_request_bodies_and_the_error_shape():
    schema = json.loads(load_exporter().render())
    create = schema["paths"]["/v1/edits"]["post"]
    assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert create["requestBody"]["content"]["application/json"]["schema"]["discriminator"]["propertyName"] == "kind"
    components = schema["components"]["schemas"]
    for name in ("P2PEditRequest", "IP2PEditRequest", "Edit", "ErrorResponse", "LocalBlend", "Sweep"):
        assert name in components, name
    assert create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {p["name"] for p in create["parameters"]} >= {"Idempotency-Key", "prefer"}
    assert "HTTPBearer" in schema["components"]["securitySchemes"]

"""The server's OpenAPI schema as the server answers: errors are 400 (not FastAPI's 422) with
the OpenAI-style body, and the limits that depend on the served engine (n, max_tokens) are in
it, so generated clients and schema fuzzers agree with what is refused."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from llmctl.serve.protocol import ErrorResponse

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_API_ERRORS = {
    "400": "invalid request: a field out of range, a prompt too long, malformed JSON",
    "401": "missing or wrong API key (with --api-key)",
    "404": "no such route, or a model this server does not serve",
    "408": "the request body did not arrive in time",
    "413": "the request body is over --max-request-bytes",
    "500": "internal error (the message carries a request id the server log has)",
    "503": "the server is at its request limit, shutting down, or its engine died",
}


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _set_maximum(prop: dict, maximum: int) -> None:
    """Set `maximum` on an integer property, or on the integer branch of an optional one."""
    for branch in [prop, *prop.get("anyOf", [])]:
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def build_schema(app: FastAPI, max_num_seqs: int, max_model_len: int) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                for code, description in _API_ERRORS.items():
                    responses[code] = _error_response(description)
    paths = schema.get("paths", {})
    if "/health" in paths:
        paths["/health"]["get"]["responses"] = {
            "200": {"description": "the engine is running (empty body)"},
            "503": _error_response("the engine died; the message says why"),
        }
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components.get(name, {}).get("properties", {})
        if "n" in props:
            _set_maximum(props["n"], max_num_seqs)
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _set_maximum(props[field], max_model_len - 1)
    return schema


def install_openapi(app: FastAPI, max_num_seqs: int, max_model_len: int) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, max_num_seqs, max_model_len)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

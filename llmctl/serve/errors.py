"""HTTP errors: the server's own error classes and the OpenAI-style JSON body for each."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl.errors import InvalidRequestError, LlmctlError
from llmctl.serve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("llmctl.serve")

# vLLM names the error type after the openai client's exception class for the status.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class ServiceUnavailableError(LlmctlError):
    """The server cannot take the request now (queue full, shutting down, engine dead)."""

    status_code = 503


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve."""


class AuthenticationError(LlmctlError):
    status_code = 401


class RequestTooLargeError(LlmctlError):
    status_code = 413


def error_body(message: str, status_code: int, param: str | None = None) -> dict:
    err = ErrorInfo(message=message, type=_TYPES.get(status_code, "Error"), param=param, code=status_code)
    return ErrorResponse(error=err).model_dump()


def error_response(message: str, status_code: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status_code, param), status_code=status_code)


def param_of(err: Exception) -> str | None:
    """Our validation errors start with the field name (`top_p: must be ...`)."""
    head = str(err).split(":", 1)[0]
    return head if head.isidentifier() else None


def llmctl_error_response(err: LlmctlError) -> JSONResponse:
    message = str(err) if not err.hint else f"{err} ({err.hint})"
    return error_response(message, err.status_code, param_of(err))


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LlmctlError)
    async def _llmctl(_: Request, err: LlmctlError) -> JSONResponse:
        return llmctl_error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        # vLLM answers schema errors with 400, not FastAPI's 422: the openai client
        # then raises BadRequestError as it would against OpenAI.
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":  # loc is ("body", offset): a position, not a parameter
            where = first.get("loc", ())[-1]
            reason = (first.get("ctx") or {}).get("error", "")
            detail = f": {reason}" if reason else ""
            return error_response(f"the request body is not valid JSON (at character {where}{detail})", 400)
        # pydantic puts union members into the location (`prompt.list[int]`): keep field names only
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", err))
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(str(err.detail), err.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request")
        return error_response(f"internal error: {type(err).__name__}: {err}", 500)

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

# OpenAI's `type` strings, which clients branch on (the openai client picks its exception
# class by status; others read the type).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_disconnected",
}


def error_type(status_code: int) -> str:
    return _TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")


class ServiceUnavailableError(LlmctlError):
    """The server cannot take the request now (queue full, shutting down, engine dead)."""

    status_code = 503


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (404, as OpenAI and vLLM)."""

    status_code = 404


class AuthenticationError(LlmctlError):
    status_code = 401


class RequestTooLargeError(LlmctlError):
    status_code = 413


def error_body(message: str, status_code: int, param: str | None = None) -> dict:
    err = ErrorInfo(message=message, type=error_type(status_code), param=param, code=status_code)
    return ErrorResponse(error=err).model_dump()


def error_response(message: str, status_code: int, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status_code, param), status_code=status_code, headers=headers)


def internal_error_message(request_id: str | None) -> str:
    """What a client learns of an unexpected exception: nothing internal, an id to quote."""
    return f"internal server error (request id {request_id or 'unknown'}); the server log has the details"


def log_internal_error(err: BaseException, request_id: str | None) -> None:
    logger.error("internal error in request %s", request_id or "unknown", exc_info=err)


def param_of(err: Exception) -> str | None:
    """Our validation errors start with the field name (`top_p: must be ...`)."""
    head = str(err).split(":", 1)[0]
    return head if head.isidentifier() else None


def llmctl_error_response(err: LlmctlError) -> JSONResponse:
    message = str(err) if not err.hint else f"{err} ({err.hint})"
    return error_response(message, err.status_code, param_of(err))


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith(("constrained-", "function-"))
                                      or part in ("str", "int", "float", "bool", "list", "dict"))


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
        return error_response(str(err.detail), err.status_code, headers=getattr(err, "headers", None))  # 405: Allow

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        request_id = request.scope.get("state", {}).get("request_id")
        log_internal_error(err, request_id)
        return error_response(internal_error_message(request_id), 500)

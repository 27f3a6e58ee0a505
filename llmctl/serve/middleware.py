"""Request guards as plain ASGI middleware (so streaming and disconnects pass through
untouched): the API key on /v1 routes and the request size limit."""

from __future__ import annotations

import asyncio
import hmac
import json
import re

from llmctl.serve.errors import error_body, internal_error_message, log_internal_error
from llmctl.serve.protocol import random_id

_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    """Every request gets an id (the client's `X-Request-Id` if it is a plain token), kept in
    `scope["state"]["request_id"]` for the logs and sent back in the `X-Request-Id` header.
    An unexpected exception is answered here: a 500 that names the id, the traceback to the log."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given.decode() if _CLIENT_REQUEST_ID.fullmatch(given) else random_id("req")
        scope.setdefault("state", {})["request_id"] = request_id

        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as err:
            log_internal_error(err, request_id)
            if not started:
                await _send_error(send_with_id, internal_error_message(request_id), 500)


async def _send_error(send, message: str, status_code: int, extra_headers: list | None = None) -> None:
    body = json.dumps(error_body(message, status_code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status_code, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """401 without `Authorization: Bearer <key>` on /v1 (as vLLM guards only the API
    routes: /health and /metrics stay open to probes); 413 past max_request_bytes; 408 when
    the body does not arrive within body_timeout_s (a client that sends half a body)."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await _send_error(send, "invalid or missing API key: send `Authorization: Bearer <key>`", 401,
                                  [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            await _send_error(send, f"the request body has {int(length)} bytes, over the limit of "
                                    f"{self.max_request_bytes}", 413)
            return
        await self._call_limited(scope, receive, send)

    async def _call_limited(self, scope, receive, send) -> None:
        """Chunked bodies carry no length up front: count as they arrive. Past the limit,
        answer 413 here and tell the app the client left, so it stops reading."""
        received = 0
        answered = False
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive():
            nonlocal received, answered, body_done
            if answered:
                return {"type": "http.disconnect"}
            if body_done:  # past the body, receive() waits for a disconnect: no deadline
                return await receive()
            try:
                remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                answered = True
                await _send_error(send, f"the request body did not arrive within {self.body_timeout_s:g} s", 408)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    answered = True
                    await _send_error(send, f"the request body is over the limit of {self.max_request_bytes} bytes", 413)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

"""Request guards as plain ASGI middleware (so streaming and disconnects pass through
untouched): the API key on /v1 routes and the request size limit."""

from __future__ import annotations

import hmac
import json

from llmctl.serve.errors import error_body


async def _send_error(send, message: str, status_code: int, extra_headers: list | None = None) -> None:
    body = json.dumps(error_body(message, status_code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status_code, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """401 without `Authorization: Bearer <key>` on /v1 (as vLLM guards only the API
    routes: /health and /metrics stay open to probes); 413 past max_request_bytes."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

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

        async def limited_receive():
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
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

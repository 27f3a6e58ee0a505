"""The HTTP side of `llmctl bench serve`: first contact with a server (each way it can go
wrong becomes one clear error) and one streaming request timed token by token."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from llmctl.bench.workload import BenchRequest
from llmctl.errors import ConfigError, LlmctlError


class ServerContactError(LlmctlError):
    """The server cannot be reached or refuses the benchmark's first request."""


@dataclass
class RequestResult:
    index: int
    target: str = ""  # the base URL (A/B runs name several)
    warmup: bool = False
    scheduled_time: float = 0.0  # seconds from the start: when the arrival process said to send
    send_time: float = 0.0  # seconds from the start of the run: when it was sent
    end_time: float = 0.0  # seconds from the start of the run: done, failed or hung up
    success: bool = False
    disconnected: bool = False  # hung up on purpose (--disconnect-fraction)
    cancelled: bool = False  # still in flight when the run was stopped (over-saturation)
    status: int | None = None
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, send to last token
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with a single token."""
        if self.output_len <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)

    @property
    def counted(self) -> bool:
        """Part of the statistics: not a warm-up, not hung up or cancelled on purpose."""
        return not (self.warmup or self.disconnected or self.cancelled)


@dataclass(frozen=True)
class ServerInfo:
    base_url: str
    model: str  # the name requests carry
    served_models: tuple[str, ...]
    max_model_len: int | None


def check_base_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url: must start with http:// or https://, got {url!r}",
                          hint=f"e.g. --base-url http://{url.split('://')[-1]}")
    return url.rstrip("/")


def server_message(text: str) -> str:
    """The error message in a server's answer: OpenAI's `error.message`, vLLM's `message`,
    FastAPI's `detail`, or the start of the body."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])[:300]
    return text.strip()[:300]


async def first_contact(client: httpx.AsyncClient, base_url: str, model: str | None, endpoint: str) -> ServerInfo:
    """GET /v1/models, then one 1-token request: every way the first contact fails is a
    `ServerContactError` saying what to do, before any load is sent."""
    try:
        resp = await client.get("/v1/models")
    except httpx.ConnectError:
        raise ServerContactError(f"no server answers at {base_url} (connection refused)",
                                 hint="start one with `llmctl serve`, or point --base-url at it") from None
    except httpx.TimeoutException:
        raise ServerContactError(f"{base_url} did not answer within the timeout",
                                 hint="check the address and that the server is up") from None
    except httpx.HTTPError as err:
        raise ServerContactError(f"cannot reach {base_url}: {type(err).__name__}: {err}") from None
    if resp.status_code == 401:
        raise ServerContactError(f"the server wants an API key: {server_message(resp.text)}",
                                 hint="pass --api-key KEY or set LLMCTL_API_KEY")
    if resp.status_code != 200:
        raise ServerContactError(f"GET {base_url}/v1/models answered {resp.status_code}: {server_message(resp.text)}",
                                 hint="--base-url is the server's root, without /v1")
    try:
        cards = resp.json()["data"]
        names = tuple(c["id"] for c in cards)
    except (ValueError, KeyError, TypeError):
        raise ServerContactError(f"{base_url}/v1/models is not an OpenAI model list") from None
    if not names:
        raise ServerContactError(f"{base_url}/v1/models lists no model")
    chosen = model or names[0]
    max_len = next((c.get("max_model_len") for c in cards if c["id"] == chosen), None) or cards[0].get("max_model_len")
    probe = BenchRequest(index=-1, prompt="Hello", messages=({"role": "user", "content": "Hello"},)
                         if endpoint.endswith("chat/completions") else None, prompt_len=None, output_len=1)
    body = {**probe.body(chosen), "stream": False}
    body.pop("stream_options")
    resp = await client.post(endpoint, json=body)
    if resp.status_code != 200:
        hint = f"the server serves: {', '.join(names)}" if model and model not in names else \
            "--endpoint is /v1/completions or /v1/chat/completions"
        raise ServerContactError(f"the server refused the first request (HTTP {resp.status_code}): "
                                 f"{server_message(resp.text)}", hint=hint)
    return ServerInfo(base_url=base_url, model=chosen, served_models=names, max_model_len=max_len)


def _token_text(data: dict) -> str:
    choice = (data.get("choices") or [{}])[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def send_request(client: httpx.AsyncClient, endpoint: str, req: BenchRequest, model: str,
                       res: RequestResult, hang_up_after: int | None) -> RequestResult:
    """Stream one request and time it into `res`: TTFT at the first content chunk, one ITL
    per later chunk, the latency at the end of the stream."""
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, json=req.body(model)) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = server_message((await resp.aread()).decode(errors="replace"))
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = server_message(line[6:])
                    return res
                if data.get("usage"):
                    res.prompt_len = data["usage"]["prompt_tokens"]
                    res.output_len = data["usage"]["completion_tokens"]
                if _token_text(data):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    if hang_up_after is not None and len(res.itl) + 1 >= hang_up_after:
                        res.disconnected = True
                        return res  # leaving the `with` closes the connection mid-stream
        res.latency = time.perf_counter() - start
        res.output_len = res.output_len or len(res.itl) + (res.ttft > 0)
        res.success = res.ttft > 0
        if not res.success:
            res.error = "the stream ended without a token"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        res.error = f"{type(err).__name__}: {err}"[:300]
    return res

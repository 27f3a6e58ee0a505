"""What the completion and chat handlers share: the served model, prompt checks,
SamplingParams from a request, token text for logprobs, SSE framing, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from llmctl.engine.admission import AdmissionLimits, check_context, check_request, check_token_ids
from llmctl.engine.async_engine import AsyncEngine
from llmctl.errors import InvalidRequestError, LlmctlError
from llmctl.sampling_params import SamplingParams
from llmctl.serve.errors import (
    ModelNotFoundError,
    error_body,
    internal_error_message,
    log_internal_error,
    param_of,
)
from llmctl.serve.protocol import SamplingFields

T = TypeVar("T")


class ClientDisconnectedError(LlmctlError):
    """Nobody reads this answer; nginx's 499 for the log."""

    status_code = 499


@dataclass
class ServingContext:
    """The one model this server serves and the engine it runs on."""

    engine: AsyncEngine
    tokenizer: Any
    served_model_names: list[str]
    model_path: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int = 256
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    chat_template: str | None = None  # the operator's (--chat-template), else the tokenizer's
    # Templating and tokenization run here, one at a time, never on the event loop (a fast
    # tokenizer is not safe to call from several threads at once).
    _tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmctl-tokenizer"))
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> str:
        """The name to answer with. None or "" means the served model, as in vLLM."""
        if model and model not in self.served_model_names:
            raise ModelNotFoundError(f"model: the model `{model}` does not exist",
                                     hint=f"this server serves {', '.join(self.served_model_names)}")
        return model or self.model_name

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text (for logprobs), cached: lm-eval asks for the same ids over and over."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=False)

    async def run_tokenizer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    @property
    def limits(self) -> AdmissionLimits:
        return AdmissionLimits(self.vocab_size, self.max_model_len, self.max_num_seqs)

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        check_token_ids(token_ids, self.vocab_size, param)

    def admit(self, prompt_token_ids: list[int], req: SamplingFields, max_tokens: int | None, logprobs: int | None,
              prompt_logprobs: int | None = None, param: str = "prompt") -> SamplingParams:
        """The request's SamplingParams for this prompt, through the engine's admission checks:
        whatever the engine would refuse is refused here, before any work or stream byte."""
        max_tokens = check_context(len(prompt_token_ids), max_tokens, self.max_model_len, param)
        params = sampling_params(req, max_tokens, logprobs, prompt_logprobs, self.generation_defaults)
        check_request(prompt_token_ids, params, self.limits)
        return params


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """Where the request leaves a field out: the model's generation_config.json default if it
    has one (`defaults`, as vLLM), else OpenAI's (temperature 1, top_p 1)."""
    defaults = defaults or {}

    def pick(name: str, openai_default: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, openai_default)

    return SamplingParams(
        n=req.n,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", -1),
        min_p=pick("min_p", 0.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=pick("repetition_penalty", 1.0),
        seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=_logit_bias(req.logit_bias),
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys, so as strings."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and key.isascii()):
            raise InvalidRequestError(f"logit_bias: keys must be token ids, got {key!r}")
        out[int(key)] = value
    return out


def check_unsupported(req: SamplingFields) -> None:
    """What the server parses but cannot honour is refused, never silently ignored."""
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise InvalidRequestError(f"response_format: type {req.response_format.get('type')!r} is not supported "
                                  "(only \"text\"); structured output is not implemented")
    tools = getattr(req, "tools", None)
    if tools and getattr(req, "tool_choice", None) != "none":
        raise InvalidRequestError("tools: tool calling is not supported; send the request without tools "
                                  "(or with tool_choice \"none\")")


def include_usage(req: SamplingFields) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def sse(data: BaseModel | dict | str) -> str:
    if isinstance(data, BaseModel):
        data = data.model_dump_json(exclude_none=False)
    elif isinstance(data, dict):
        data = json.dumps(data)
    return f"data: {data}\n\n"


def sse_error(err: BaseException, request_id: str | None = None) -> str:
    """Errors after the stream began travel in the stream, as vLLM sends them; an unexpected
    one says only the request id, and its traceback goes to the log."""
    if isinstance(err, LlmctlError):
        return sse(error_body(str(err), err.status_code, param_of(err)))
    log_internal_error(err, request_id)
    return sse(error_body(internal_error_message(request_id), 500))


def request_id_of(request: Request) -> str | None:
    """The id RequestIdMiddleware gave the HTTP request (the server log's name for it)."""
    return request.scope.get("state", {}).get("request_id")


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive, tagging each with its index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except Exception as err:  # carried to the consumer, which re-raises it
            await queue.put((i, err))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run a non-streaming handler's work; if the client goes away first, cancel it
    (which aborts its engine requests and frees their blocks)."""
    work_task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch_task = asyncio.create_task(wait_disconnect())
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnectedError("the client disconnected before the response was ready")
    return work_task.result()

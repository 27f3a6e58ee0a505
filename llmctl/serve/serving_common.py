"""What the completion and chat handlers share: the served model, prompt checks,
SamplingParams from a request, token text for logprobs, SSE framing, disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from llmctl.engine.async_engine import AsyncEngine
from llmctl.engine.sampling_params import SamplingParams
from llmctl.errors import InvalidRequestError, LlmctlError
from llmctl.serve.errors import ModelNotFoundError, error_body, param_of
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

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"{param}: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "prompt") -> int | None:
        """vLLM's context check; returns max_tokens, filling None with what the context leaves."""
        if num_prompt_tokens == 0:
            raise InvalidRequestError(f"{param}: the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"{param}: this model's maximum context length is {self.max_model_len} tokens, "
                f"but the prompt has {num_prompt_tokens} tokens")
        if max_tokens is None:
            return self.max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens: this model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion). Please reduce the length of the prompt or completion.")
        return max_tokens


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """OpenAI defaults (temperature 1, top_p 1) where the request leaves a field out."""
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
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
    )


def include_usage(req: SamplingFields) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def sse(data: BaseModel | dict | str) -> str:
    if isinstance(data, BaseModel):
        data = data.model_dump_json(exclude_none=False)
    elif isinstance(data, dict):
        data = json.dumps(data)
    return f"data: {data}\n\n"


def sse_error(err: BaseException) -> str:
    """Errors after the stream began travel in the stream, as vLLM sends them."""
    if isinstance(err, LlmctlError):
        return sse(error_body(str(err), err.status_code, param_of(err)))
    return sse(error_body(f"internal error: {type(err).__name__}: {err}", 500))


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

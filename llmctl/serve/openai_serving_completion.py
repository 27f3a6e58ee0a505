"""`/v1/completions`: prompts in any of OpenAI's four shapes, echo, and logprobs in the
legacy shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) that
lm-evaluation-harness's `local-completions` reads, prompt positions included."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmctl.engine.admission import check_n, check_num_prompts
from llmctl.engine.outputs import CompletionOutput, Logprobs, RequestOutput
from llmctl.errors import InvalidRequestError
from llmctl.serve.chat_template import check_text
from llmctl.serve.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from llmctl.serve.serving_common import (
    ServingContext,
    check_unsupported,
    include_usage,
    merge_streams,
    request_id_of,
    sse,
    sse_error,
    unless_disconnected,
)

# (prompt text, prompt token ids) per prompt of the request
Prompt = tuple[str, list[int]]


def _prompts(ctx: ServingContext, req: CompletionRequest) -> list[Prompt]:
    raw = req.prompt
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise InvalidRequestError("prompt: must not be empty")
    if all(isinstance(t, int) for t in raw):
        raw = [raw]  # one prompt given as token ids
    check_num_prompts(len(raw))
    prompts = []
    for item in raw:
        if isinstance(item, str):
            prompts.append((item, ctx.encode(check_text(item, "prompt"), req.add_special_tokens)))
        else:
            ctx.check_token_ids(item)
            prompts.append((ctx.decode(item, skip_special_tokens=False), list(item)))
    return prompts


def completion_logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[Logprobs | None],
                        num_top: int, initial_text_offset: int = 0) -> CompletionLogProbs:
    """vLLM's shape: per token its text, its logprob and up to num_top + 1 alternatives
    (the chosen token, then the top ones); None where there is no logprob (the first prompt token)."""
    out = CompletionLogProbs()
    offset = initial_text_offset
    for token_id, position in zip(token_ids, logprobs):
        token = ctx.token_text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if position is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(max(position.get(token_id, float("-inf")), -9999.0))
        top: dict[str, float] = {}
        for rank, (alt_id, logprob) in enumerate(position.items()):
            if rank > num_top:
                break
            top.setdefault(ctx.token_text(alt_id), max(logprob, -9999.0))
        out.top_logprobs.append(top)
    return out


def _choice_logprobs(ctx: ServingContext, req: CompletionRequest, prompt: Prompt, final: RequestOutput,
                     c: CompletionOutput) -> CompletionLogProbs | None:
    if req.logprobs is None:
        return None
    token_ids, lps = list(c.token_ids), list(c.logprobs or [None] * len(c.token_ids))
    if req.echo:
        prompt_lps = final.prompt_logprobs or [None] * len(prompt[1])
        token_ids, lps = prompt[1] + token_ids, list(prompt_lps) + lps
    return completion_logprobs(ctx, token_ids, lps, req.logprobs)


class OpenAIServingCompletion:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create_completion(self, req: CompletionRequest, raw_request: Request):
        ctx = self.ctx
        model = ctx.check_model(req.model)
        if req.suffix:
            raise InvalidRequestError("suffix: is not supported")
        check_unsupported(req)
        check_n(req.n, ctx.max_num_seqs)  # before any prompt is tokenized
        prompts = await ctx.run_tokenizer(_prompts, ctx, req)
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else req.prompt_logprobs
        params = [ctx.admit(ids, req, req.max_tokens, req.logprobs, prompt_logprobs) for _, ids in prompts]
        request_id = random_id("cmpl")
        arrival = time.time()
        generators, submitted = [], []
        try:
            for i, ((_, ids), p) in enumerate(zip(prompts, params)):
                generators.append(ctx.engine.generate(f"{request_id}-{i}", ids, p, arrival,
                                                      final_only=not req.stream))
                submitted.append(f"{request_id}-{i}")
        except BaseException:
            for rid in submitted:
                ctx.engine.abort(rid)
            raise
        created = int(arrival)
        if req.stream:
            body = self._stream(req, prompts, generators, request_id, created, model, request_id_of(raw_request))
            return StreamingResponse(body, media_type="text/event-stream")
        finals = await unless_disconnected(raw_request, self._collect(generators))
        return self._response(req, prompts, finals, request_id, created, model)

    async def _collect(self, generators: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(generators)
        async for i, out in merge_streams(generators):
            finals[i] = out
        return finals  # type: ignore[return-value]

    def _response(self, req: CompletionRequest, prompts: list[Prompt], finals: list[RequestOutput],
                  request_id: str, created: int, model: str) -> CompletionResponse:
        choices, num_generated = [], 0
        for i, (prompt, final) in enumerate(zip(prompts, finals)):
            for c in final.outputs:
                text = prompt[0] + c.text if req.echo else c.text
                choices.append(CompletionResponseChoice(
                    index=i * req.n + c.index, text=text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=_choice_logprobs(self.ctx, req, prompt, final, c)))
                num_generated += len(c.token_ids)
        num_prompt = sum(len(ids) for _, ids in prompts)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                          total_tokens=num_prompt + num_generated)
        return CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)

    async def _stream(self, req: CompletionRequest, prompts: list[Prompt], generators: list,
                      request_id: str, created: int, model: str, log_id: str | None = None) -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}  # choice index -> characters sent
        sent_tokens: dict[int, int] = {}
        num_generated = 0
        try:
            async for i, out in merge_streams(generators):
                for c in out.outputs:
                    idx = i * req.n + c.index
                    chunk = self._chunk(req, prompts[i], out, c, idx, sent_text, sent_tokens)
                    if chunk is not None:
                        yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[chunk]))
                    if c.finished:
                        num_generated += len(c.token_ids)
            if include_usage(req):
                num_prompt = sum(len(ids) for _, ids in prompts)
                usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                                  total_tokens=num_prompt + num_generated)
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except Exception as err:
            yield sse_error(err, log_id)
        yield "data: [DONE]\n\n"

    def _chunk(self, req: CompletionRequest, prompt: Prompt, out: RequestOutput, c: CompletionOutput, idx: int,
               sent_text: dict[int, int], sent_tokens: dict[int, int]) -> CompletionResponseChoice | None:
        """The choice's delta since the last chunk, or None when there is nothing new to say."""
        first = idx not in sent_tokens
        num_text, num_tokens = sent_text.get(idx, 0), sent_tokens.get(idx, 0)
        if num_tokens == -1 or (not first and len(c.token_ids) == num_tokens and not c.finished):
            return None  # -1: its last chunk is out
        text, token_ids = c.text[num_text:], list(c.token_ids[num_tokens:])
        lps = list((c.logprobs or [None] * len(c.token_ids))[num_tokens:])
        offset = num_text + (len(prompt[0]) if req.echo else 0)
        if req.echo and first:
            text = prompt[0] + text
            token_ids = prompt[1] + token_ids
            lps = list(out.prompt_logprobs or [None] * len(prompt[1])) + lps
            offset = 0
        logprobs = completion_logprobs(self.ctx, token_ids, lps, req.logprobs, offset) if req.logprobs is not None else None
        sent_text[idx], sent_tokens[idx] = len(c.text), (-1 if c.finished else len(c.token_ids))
        return CompletionResponseChoice(index=idx, text=text, logprobs=logprobs,
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)

"""`/v1/chat/completions`: the model's chat template, n samples of one engine request,
logprobs in the chat shape (`content: [{token, logprob, bytes, top_logprobs}]`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmctl.engine.outputs import CompletionOutput, Logprobs, RequestOutput
from llmctl.errors import InvalidRequestError
from llmctl.serve.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from llmctl.serve.serving_common import (
    ServingContext,
    check_unsupported,
    include_usage,
    sse,
    sse_error,
    unless_disconnected,
)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them; content parts joined to one text."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise InvalidRequestError(f"messages.{i}.content: only text parts are supported, got {part.get('type')!r}")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        out.append({"role": m.role, "content": content or ""})
    return out


def apply_chat_template(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
                        continue_final_message: bool = False, extra: dict | None = None) -> list[int]:
    if not messages:
        raise InvalidRequestError("messages: must not be empty")
    if getattr(ctx.tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("messages: this model has no chat template; use /v1/completions")
    text = ctx.tokenizer.apply_chat_template(
        message_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message, **(extra or {}))
    # The template already wrote any BOS, so do not add special tokens again (as vLLM).
    return ctx.encode(text, add_special_tokens=False)


def chat_logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[Logprobs | None], num_top: int
                  ) -> ChatCompletionLogProbs:
    content = []
    for token_id, position in zip(token_ids, logprobs):
        position = position or {}
        token = ctx.token_text(token_id)
        ranked = sorted(position.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
        top = [ChatCompletionLogProb(token=ctx.token_text(t), logprob=max(lp, -9999.0),
                                     bytes=list(ctx.token_text(t).encode("utf-8"))) for t, lp in ranked]
        content.append(ChatCompletionLogProbsContent(
            token=token, logprob=max(position.get(token_id, float("-inf")), -9999.0),
            bytes=list(token.encode("utf-8")), top_logprobs=top))
    return ChatCompletionLogProbs(content=content)


class OpenAIServingChat:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create_chat_completion(self, req: ChatCompletionRequest, raw_request: Request):
        ctx = self.ctx
        model = ctx.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequestError("top_logprobs: requires logprobs to be true")
        check_unsupported(req)
        ids = apply_chat_template(ctx, req.messages, req.add_generation_prompt, req.continue_final_message,
                                  req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = ctx.admit(ids, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, param="messages")
        request_id = random_id("chatcmpl")
        arrival = time.time()
        generator = ctx.engine.generate(request_id, ids, params, arrival, final_only=not req.stream)
        if req.stream:
            return StreamingResponse(self._stream(req, ids, generator, request_id, int(arrival), model),
                                     media_type="text/event-stream")
        final = await unless_disconnected(raw_request, self._last(generator))
        return self._response(req, ids, final, request_id, int(arrival), model)

    @staticmethod
    async def _last(generator: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for out in generator:
            final = out
        return final  # type: ignore[return-value]

    def _logprobs(self, req: ChatCompletionRequest, c: CompletionOutput, start: int = 0) -> ChatCompletionLogProbs | None:
        if not req.logprobs:
            return None
        lps = (c.logprobs or [None] * len(c.token_ids))[start:]
        return chat_logprobs(self.ctx, list(c.token_ids[start:]), lps, req.top_logprobs or 0)

    def _response(self, req: ChatCompletionRequest, ids: list[int], final: RequestOutput, request_id: str,
                  created: int, model: str) -> ChatCompletionResponse:
        choices = [ChatCompletionResponseChoice(
            index=c.index, message=ChatResponseMessage(content=c.text), logprobs=self._logprobs(req, c),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in final.outputs]
        num_generated = sum(len(c.token_ids) for c in final.outputs)
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=num_generated, total_tokens=len(ids) + num_generated)
        return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)

    async def _stream(self, req: ChatCompletionRequest, ids: list[int], generator: AsyncIterator[RequestOutput],
                      request_id: str, created: int, model: str) -> AsyncIterator[str]:
        def chunk(choice: ChatCompletionResponseStreamChoice) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[choice]))

        sent_text = [0] * req.n
        sent_tokens = [0] * req.n
        try:
            for i in range(req.n):  # the role comes first, in a chunk of its own, as OpenAI sends it
                yield chunk(ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            final = None
            async for out in generator:
                final = out
                for c in out.outputs:
                    if sent_tokens[c.index] == -1 or (len(c.token_ids) == sent_tokens[c.index] and not c.finished):
                        continue
                    delta = DeltaMessage(content=c.text[sent_text[c.index]:])
                    yield chunk(ChatCompletionResponseStreamChoice(
                        index=c.index, delta=delta, logprobs=self._logprobs(req, c, sent_tokens[c.index]),
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                    sent_text[c.index] = len(c.text)
                    sent_tokens[c.index] = -1 if c.finished else len(c.token_ids)
            if include_usage(req) and final is not None:
                num_generated = sum(len(c.token_ids) for c in final.outputs)
                usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=num_generated,
                                  total_tokens=len(ids) + num_generated)
                yield sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                                       usage=usage))
        except Exception as err:
            yield sse_error(err)
        yield "data: [DONE]\n\n"

"""`/v1/chat/completions`: the model's chat template, n samples of one engine request,
logprobs in the chat shape (`content: [{token, logprob, bytes, top_logprobs}]`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmctl.engine.admission import check_n
from llmctl.engine.outputs import CompletionOutput, Logprobs, RequestOutput
from llmctl.errors import InvalidRequestError
from llmctl.serve.chat_template import render_chat
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
    request_id_of,
    sse,
    sse_error,
    unless_disconnected,
)


async def apply_chat_template(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
                              continue_final_message: bool = False, extra: dict | None = None) -> list[int]:
    """Prompt token ids of a conversation, rendered and tokenized on the tokenizer's thread."""
    return await ctx.run_tokenizer(render_chat, ctx.tokenizer, messages, add_generation_prompt,
                                   continue_final_message, extra, ctx.chat_template, ctx.max_model_len)


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
        check_n(req.n, ctx.max_num_seqs)  # before the template renders anything
        ids = await apply_chat_template(ctx, req.messages, req.add_generation_prompt, req.continue_final_message,
                                  req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = ctx.admit(ids, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, param="messages")
        request_id = random_id("chatcmpl")
        arrival = time.time()
        generator = ctx.engine.generate(request_id, ids, params, arrival, final_only=not req.stream)
        if req.stream:
            return StreamingResponse(self._stream(req, ids, generator, request_id, int(arrival), model,
                                                  request_id_of(raw_request)),
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
                      request_id: str, created: int, model: str, log_id: str | None = None) -> AsyncIterator[str]:
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
            yield sse_error(err, log_id)
        yield "data: [DONE]\n\n"

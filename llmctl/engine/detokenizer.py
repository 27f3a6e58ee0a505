"""Turning a sequence's tokens into text as they arrive, and deciding when it stops.

Per sequence, the engine keeps one
`detok = IncrementalDetokenizer(tokenizer, params, prompt_token_ids)` and, after each sampled token::

    finish_reason, stop_reason = check_token_stop(params, seq.output_token_ids, eos_token_id, limit)
    stop_str = detok.update([token_id], stop_terminated=finish_reason == "stop")
    if stop_str is not None:
        finish_reason, stop_reason = "stop", stop_str
    delta = detok.get_next_output_text(finished=finish_reason is not None, delta=True)
    text = detok.get_next_output_text(finished=..., delta=False)   # or the whole text so far

On "length" or an abort, pass finished=True too: that releases held-back text. `detok.output_text`
is all text decoded so far, a possible stop-string prefix not yet streamed included; a character
still missing bytes joins it only when completed or at the end.

`check_token_stop` is `llmctl.engine.stop`'s, the rule the scheduler applies.
`limit` is the number of new tokens the sequence may have: params.max_tokens, capped by what
is left of max_model_len. A stop token (EOS or one of stop_token_ids) is not detokenized
unless include_stop_str_in_output, as in vLLM.

Text is decoded over a sliding window of token ids (vLLM's prefix_offset / read_offset):
the text of ids[prefix:] minus the text of ids[prefix:read] is new, unless it ends in U+FFFD,
which means a character's bytes are split across tokens and the rest is still to come.
Decoding a window that starts one token back keeps SentencePiece's leading-space rule
consistent, so the pieces add up to tokenizer.decode(all output ids).

With `prompt_token_ids`, the window starts in the prompt's last tokens instead, as vLLM does:
a SentencePiece tokenizer (Llama 2, Mistral) then shows the space that "▁Paris" carries after a
prompt (" Paris", what a completion must append), where decode(output ids) strips it. For
byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2) both give the same text.

Fast tokenizers take the same window in Rust: `tokenizers.decoders.DecodeStream` (vLLM's fast
path) gives each token's new text in about 1 us where the two `decode` calls take about 6 (a
batch of 32 sequences: 0.2 ms of host time per engine step). It is used where it decodes a probe
exactly as `tokenizer.decode` does (transformers may clean up spaces before punctuation, which a
stream cannot), and the Python window takes over if it ever raises.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Protocol, Sequence

from llmctl.engine.stop import check_token_stop  # noqa: F401  (the stop rule; re-exported for callers)
from llmctl.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
_NUM_CONTEXT_TOKENS = 6  # prompt tokens decoded with the output; vLLM reads 5 back
_PROBE = "Hi , a . b ? c ! d 's — é 世界 🙂 x"  # spaces before punctuation, multibyte characters


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def find_stop_string(text: str, num_new_chars: int, stop: Sequence[str]) -> tuple[str, int] | None:
    """The earliest stop string that ends inside the last num_new_chars characters of text,
    and where it starts; None if none does. Older text was checked on earlier calls."""
    best: tuple[str, int] | None = None
    for stop_str in stop:
        start = text.find(stop_str, max(0, len(text) - num_new_chars - len(stop_str) + 1))
        if start != -1 and (best is None or start < best[1]):
            best = (stop_str, start)
    return best


class IncrementalDetokenizer:
    """One sequence's output text, built token by token; see the module docstring."""

    def __init__(
        self, tokenizer: Tokenizer, params: SamplingParams, prompt_token_ids: Sequence[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.output_text = ""
        self.stop_reason: str | None = None  # the stop string that ended the text
        context = list(prompt_token_ids or [])[-_NUM_CONTEXT_TOKENS:]
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []  # the prompt ends inside a character: its text would shift under the output
        self._num_context_tokens = len(context)
        self.token_ids: list[int] = context  # the decode window's source: context, then output ids
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._stream = _decode_stream(tokenizer, params.skip_special_tokens, context)
        # Skipped special tokens add no text and stay out of the window: a long run of them (a
        # model that keeps emitting EOS under ignore_eos) would otherwise widen it token by token.
        self._skipped = _skipped_ids(tokenizer) if params.skip_special_tokens else frozenset()
        self._num_output_tokens = 0
        self._last_output_offset = 0
        self._flushed = False
        # While streaming, a stop string's first len-1 characters may be the start of a match
        # the next token completes; they are held back unless the stop string is shown anyway.
        held = params.stop and not params.include_stop_str_in_output
        self.stop_buffer_length = max(len(s) for s in params.stop) - 1 if held else 0

    @property
    def output_token_ids(self) -> list[int]:
        """The output tokens decoded so far (a stop token left out when not shown, skipped special
        tokens left out)."""
        return self.token_ids[self._num_context_tokens :]

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str | None:
        """Add sampled tokens; return the stop string if the text now contains one.

        stop_terminated: the last token is EOS or a stop token id (`check_token_stop` said so);
        it counts but is not decoded unless include_stop_str_in_output.
        """
        if self.stopped:
            return self.stop_reason
        self._num_output_tokens += len(new_token_ids)
        if stop_terminated and not self.params.include_stop_str_in_output:
            new_token_ids = list(new_token_ids)[:-1]
        text_before = len(self.output_text)
        for token_id in new_token_ids:
            if token_id in self._skipped:
                continue
            self.token_ids.append(token_id)
            self.output_text += self._decode_next()
        if self._num_output_tokens < self.params.min_tokens or not self.params.stop:
            return None
        match = find_stop_string(self.output_text, len(self.output_text) - text_before, self.params.stop)
        if match is not None:
            stop_str, start = match
            end = start + len(stop_str) if self.params.include_stop_str_in_output else start
            self.output_text = self.output_text[:end]
            self.stop_reason = stop_str
        return self.stop_reason

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to show now: everything (delta=False) or what is new since the last call.

        While running, the last stop_buffer_length characters are held back; finished=True
        releases them and any bytes still waiting for the rest of their character.
        """
        if finished:
            self.flush()
        end = len(self.output_text) - (0 if finished else self.stop_buffer_length)
        if not delta:
            return self.output_text[: max(end, 0)]
        if end <= self._last_output_offset:
            return ""
        text = self.output_text[self._last_output_offset : end]
        self._last_output_offset = end
        return text

    def flush(self) -> None:
        """At the end, emit what was held for completion (an unfinished character decodes as
        U+FFFD, as tokenizer.decode shows it). Idempotent; a stop string already cut the text."""
        if self._flushed or self.stopped:
            return
        self._flushed = True
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.output_text += full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.token_ids)

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.params.skip_special_tokens)

    def _decode_next(self) -> str:
        if self._stream is not None:
            try:
                piece = self._stream[0].step(self._stream[1], self.token_ids[-1])
            except Exception:  # the Python window takes over, from the same offsets
                self._stream = None
            else:
                if not piece:
                    return ""
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
                return piece
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]


# Facts about a tokenizer, found once: (tokenizer, question) -> answer.
_TOKENIZER_FACTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _tokenizer_fact(tokenizer: Any, key: Any, find: Callable[[], Any]) -> Any:
    try:
        facts = _TOKENIZER_FACTS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: found every time
        return find()
    if key not in facts:
        facts[key] = find()
    return facts[key]


def _skipped_ids(tokenizer: Any) -> frozenset[int]:
    """The special token ids that decode(..., skip_special_tokens=True) drops, checked one by one."""
    return _tokenizer_fact(tokenizer, "skipped", lambda: frozenset(
        i for i in getattr(tokenizer, "all_special_ids", ()) or ()
        if tokenizer.decode([i], skip_special_tokens=True) == ""))


def _decode_stream(tokenizer: Any, skip_special_tokens: bool, context: list[int]) -> tuple[Any, Any] | None:
    """(a DecodeStream primed with `context`, the Rust tokenizer it steps on), or None where the
    tokenizer has no Rust backend, the tokenizers package no DecodeStream, or a stream does not
    decode the probe exactly as tokenizer.decode does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    if backend is None:
        return None
    if not _tokenizer_fact(tokenizer, ("stream agrees", skip_special_tokens),
                           lambda: _stream_matches_decode(tokenizer, backend, DecodeStream, skip_special_tokens)):
        return None
    try:
        stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
    except TypeError:  # tokenizers before 0.22: prime it token by token
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in context:
            stream.step(backend, token_id)
    return stream, backend


def _stream_matches_decode(tokenizer: Any, backend: Any, stream_type: Any, skip_special_tokens: bool) -> bool:
    try:
        ids = list(tokenizer.encode(_PROBE, add_special_tokens=False))
        special = getattr(tokenizer, "eos_token_id", None)
        if isinstance(special, int):
            ids = ids[:5] + [special] + ids[5:]
        stream = stream_type(skip_special_tokens=skip_special_tokens)
        text = "".join(piece for piece in (stream.step(backend, i) for i in ids) if piece)
        return text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    except Exception:
        return False

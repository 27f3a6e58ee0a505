"""Incremental detokenization and stopping, on the default model's real tokenizer."""

import random

import pytest

from llmctl.engine.detokenizer import IncrementalDetokenizer, check_token_stop, find_stop_string
from llmctl.sampling_params import SamplingParams

MIXED = "Héllo 🤖 世界, naïve café — 👨‍👩‍👧 ok. Ελληνικά дом 한국어 😀😀!"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def stream(tokenizer, token_ids, params=SamplingParams(), eos=None, prompt_token_ids=None):
    """Feed tokens one by one as the engine does; return (pieces, final text, stop reason)."""
    detok = IncrementalDetokenizer(tokenizer, params, prompt_token_ids)
    pieces, output = [], []
    for token_id in token_ids:
        output.append(token_id)
        finish, _ = check_token_stop(params, output, eos, None)
        stop_str = detok.update([token_id], stop_terminated=finish == "stop")
        finished = finish is not None or stop_str is not None
        pieces.append(detok.get_next_output_text(finished=finished, delta=True))
        if finished:
            break
    else:
        pieces.append(detok.get_next_output_text(finished=True, delta=True))
    return pieces, detok.get_next_output_text(finished=True, delta=False), detok.stop_reason


def test_multibyte_characters_are_split_across_tokens_in_this_text(tokenizer):
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    lone = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in piece for piece in lone) >= 5  # else the next test proves nothing


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_equals_full_decode_and_never_emits_partial_chars(tokenizer, skip_special_tokens):
    text = MIXED + "<|im_end|>\n<|im_start|>assistant\n 日本語 ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    pieces, final, _ = stream(tokenizer, ids, params)
    assert "".join(pieces) == final == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in piece for piece in pieces)
    assert ("<|im_end|>" in final) != skip_special_tokens


def test_random_token_streams_match_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        pieces, final, _ = stream(tokenizer, ids)
        assert "".join(pieces) == final == tokenizer.decode(ids, skip_special_tokens=True)


def test_decode_window_stays_short(tokenizer):
    ids = tokenizer.encode(" ".join(["word"] * 200), add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams())
    for token_id in ids:
        detok.update([token_id])
        assert len(detok.token_ids) - detok.prefix_offset <= 2


def test_unfinished_character_at_the_end_is_flushed_like_decode(tokenizer):
    ids = tokenizer.encode("ok 世", add_special_tokens=False)[:-1]  # cut inside the character
    pieces, final, _ = stream(tokenizer, ids)
    assert final == tokenizer.decode(ids) and final.endswith("\ufffd")
    assert "\ufffd" not in "".join(pieces[:-1])


def _straddling_stop(tokenizer, text):
    """A stop string made of the tail of one token and the head of the next."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for i in range(len(ids) - 1):
        left, right = tokenizer.decode(ids[: i + 1]), tokenizer.decode(ids[: i + 2])
        a, b = tokenizer.decode([ids[i]]), right[len(left):]
        if len(a) >= 3 and len(b) >= 3 and "\ufffd" not in a + b:
            return ids, a[-2:] + b[:2], left[:-2]
    raise AssertionError("no straddling stop string in the text")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(tokenizer, include):
    ids, stop, before = _straddling_stop(tokenizer, "The quick brown fox jumps over the lazy dog again and again.")
    params = SamplingParams(stop=["never-there", stop], include_stop_str_in_output=include)
    pieces, final, reason = stream(tokenizer, ids, params)
    assert reason == stop
    assert final == (before + stop if include else before)
    assert "".join(pieces) == final
    for k in range(1, len(pieces)):  # nothing streamed is ever taken back
        assert final.startswith("".join(pieces[:k]))
    assert len(pieces) < len(ids)  # it stopped early


def test_stop_string_inside_a_multibyte_character_sequence(tokenizer):
    ids = tokenizer.encode("abc 世界 and more text", add_special_tokens=False)
    pieces, final, reason = stream(tokenizer, ids, SamplingParams(stop=["界"]))
    assert (final, reason) == ("abc 世", "界")
    assert "".join(pieces) == final and "\ufffd" not in final


def test_earliest_stop_string_wins_and_min_tokens_delays_the_check(tokenizer):
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    _, final, reason = stream(tokenizer, ids, SamplingParams(stop=["five", "two"]))
    assert (final, reason) == ("one ", "two")
    # Before min_tokens tokens exist stop strings do not count: "two" is skipped, "five" ends it.
    params = SamplingParams(stop=["five", "two"], min_tokens=4)
    _, final, reason = stream(tokenizer, ids, params)
    assert (final, reason) == ("one two three four ", "five")
    # Several tokens in one update (both stops new at once): the earlier one in the text wins.
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["five", "two"]))
    assert detok.update(ids) == "two" and detok.output_text == "one "
    assert find_stop_string("abcdef", 2, ["cd", "ef"]) == ("ef", 4)
    assert find_stop_string("abcdef", 2, ["ab"]) is None


def test_stop_token_text_is_dropped_unless_included(tokenizer):
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    params = SamplingParams(skip_special_tokens=False)
    assert stream(tokenizer, ids + [eos, ids[0]], params, eos=eos)[1] == "hello world"
    stop_id = tokenizer.encode(" world", add_special_tokens=False)[-1]
    assert stream(tokenizer, ids, SamplingParams(stop_token_ids=[stop_id]))[1] == "hello"
    included = SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True)
    assert stream(tokenizer, ids, included)[1] == "hello world"


def test_streaming_holds_back_a_possible_stop_prefix(tokenizer):
    ids = tokenizer.encode("value: 12 ##", add_special_tokens=False)
    params = SamplingParams(stop=["###"])
    detok = IncrementalDetokenizer(tokenizer, params)
    for token_id in ids:
        detok.update([token_id])
    assert detok.get_next_output_text(finished=False, delta=False) == "value: 12 "
    assert detok.get_next_output_text(finished=True, delta=False) == "value: 12 ##"


def test_check_token_stop():
    eos = 2
    params = SamplingParams(max_tokens=5, stop_token_ids=[9], min_tokens=2)
    assert check_token_stop(params, [eos], eos, 5) == (None, None)  # min_tokens not reached
    assert check_token_stop(params, [1, eos], eos, 5) == ("stop", None)
    assert check_token_stop(params, [1, 9], eos, 5) == ("stop", 9)
    assert check_token_stop(params, [1, 1, 1, 1, 1], eos, 5) == ("length", None)
    assert check_token_stop(params, [1, 1, 1], eos, 3) == ("length", None)  # the context is full
    assert check_token_stop(SamplingParams(ignore_eos=True), [1, eos], eos, 16) == (None, None)
    assert check_token_stop(params, [], eos, 5) == (None, None)
    assert check_token_stop(SamplingParams(), [1, 7], [2, 7], 16) == ("stop", None)  # several EOS ids


CHAT_PROMPT = "<|im_start|>user\nHi 世界<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("prompt", [CHAT_PROMPT, "The capital of", "日"])
def test_prompt_context_changes_nothing_for_byte_level_bpe(tokenizer, prompt):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(" Paris, 世界 ok", add_special_tokens=False)
    pieces, final, _ = stream(tokenizer, ids, prompt_token_ids=prompt_ids)
    assert "".join(pieces) == final == tokenizer.decode(ids) == " Paris, 世界 ok"


def test_sentencepiece_leading_space_with_and_without_prompt(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    prompt_ids = tok.encode("The capital of France is", add_special_tokens=False)
    ids = tok.encode("Paris 世界 fox", add_special_tokens=False)  # starts "▁Paris", as after a prompt
    assert tok.convert_ids_to_tokens(ids)[:2] == ["▁Paris", "▁"] and "<0xE4>" in tok.convert_ids_to_tokens(ids)
    pieces, final, _ = stream(tok, ids)
    assert "".join(pieces) == final == tok.decode(ids) == "Paris 世界 fox"
    pieces, final, _ = stream(tok, ids, prompt_token_ids=prompt_ids)
    assert "".join(pieces) == final == " Paris 世界 fox"
    assert not any("\ufffd" in piece for piece in pieces)


def test_rust_decode_stream_gives_the_python_windows_pieces(tokenizer):
    """The default tokenizer takes tokenizers' DecodeStream; piece by piece it gives what the
    Python window gives, special tokens and split characters included."""
    rng = random.Random(1)
    texts = [MIXED + "<|im_end|>\n 日本語 ✓", "ok 世"]
    streams = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    streams += [[rng.randrange(len(tokenizer)) for _ in range(80)] for _ in range(5)]
    for skip in (True, False):
        for ids in streams:
            fast = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip))
            slow = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip))
            assert fast._stream is not None
            slow._stream = None
            for token_id in ids:
                fast.update([token_id])
                slow.update([token_id])
                assert fast.get_next_output_text(False, True) == slow.get_next_output_text(False, True)
                assert (fast.prefix_offset, fast.read_offset) == (slow.prefix_offset, slow.read_offset)
            assert fast.get_next_output_text(True, False) == slow.get_next_output_text(True, False)


def test_a_tokenizer_whose_decode_cleans_up_spaces_keeps_the_python_window(tokenizer):
    """transformers may remove spaces before punctuation in decode, which a stream cannot: such a
    tokenizer fails the probe and decodes through the Python window, whose text is decode's."""
    from transformers import PreTrainedTokenizerFast

    class CleaningUp(PreTrainedTokenizerFast):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            text = super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
            return text.replace(" ,", ",").replace(" .", ".")

    tok = CleaningUp(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    detok = IncrementalDetokenizer(tok, SamplingParams())
    assert detok._stream is None
    ids = tok.encode("Hello , world . Fine , thanks .", add_special_tokens=False)
    pieces, final, _ = stream(tok, ids)
    assert "".join(pieces) == final == tok.decode(ids) == "Hello, world. Fine, thanks."


def test_a_long_run_of_skipped_special_tokens_keeps_the_window_short(tokenizer):
    """ignore_eos on a model that keeps emitting EOS: skipped special tokens stay out of the decode
    window (else each token would decode a window as long as the run), and the text is decode's."""
    text_ids = tokenizer.encode("ok 世界", add_special_tokens=False)
    ids = text_ids[:2] + [tokenizer.eos_token_id] * 300 + text_ids[2:] + [tokenizer.eos_token_id] * 300
    for fast in (True, False):
        detok = IncrementalDetokenizer(tokenizer, SamplingParams())
        if not fast:
            detok._stream = None
        for token_id in ids:
            detok.update([token_id])
            assert len(detok.token_ids) - detok.prefix_offset <= 6  # (a split character waits)
        assert detok.get_next_output_text(True, False) == tokenizer.decode(ids, skip_special_tokens=True)
    pieces, final, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(pieces) == final == tokenizer.decode(ids) and final.count(tokenizer.eos_token) == 600

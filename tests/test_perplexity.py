"""The held-out split, windowing and perplexity arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmctl.errors import ConfigError
from llmctl.eval.corpus import NUM_HELDOUT_ARTICLES, load_corpus_split
from llmctl.eval.perplexity import make_windows, perplexity, tokenize_text


def test_split_holds_out_the_last_articles_by_sorted_key(tmp_path):
    data = {f"k{i:03d}": {"extract": f"article {i}"} for i in range(12)}
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(dict(reversed(list(data.items())))))  # file order must not matter
    split = load_corpus_split(path, num_heldout=3)
    assert split.heldout == ("article 9", "article 10", "article 11")
    assert split.train == tuple(f"article {i}" for i in range(9))
    assert split.heldout_text() == "article 9\n\narticle 10\n\narticle 11"


def test_embedded_corpus_split_is_disjoint_and_fixed():
    split = load_corpus_split()
    assert len(split.heldout) == NUM_HELDOUT_ARTICLES
    assert len(split.train) > 9000
    assert not set(split.train) & set(split.heldout)


def test_windows_are_the_leading_tokens_and_too_few_tokens_is_an_error():
    ids = torch.arange(100)
    windows = make_windows(ids, 3, 20)
    assert windows.shape == (3, 20) and windows[1, 0] == 20 and windows[2, -1] == 59
    with pytest.raises(ConfigError, match="text has 100 tokens"):
        make_windows(ids, 6, 20)


def test_perplexity_of_a_uniform_model_is_the_vocab_size_and_a_perfect_one_is_1():
    vocab = 50
    windows = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    result = perplexity(lambda ids: torch.zeros(*ids.shape, vocab), windows, batch_size=3)
    assert result.num_tokens == 4 * 15
    assert math.isclose(result.perplexity, vocab, rel_tol=1e-6)  # log_softmax runs in fp32

    def oracle(ids):  # puts all mass on the true next token
        logits = torch.full((*ids.shape, vocab), -1e4)
        logits[:, :-1].scatter_(-1, ids[:, 1:].unsqueeze(-1), 0.0)
        return logits

    assert math.isclose(perplexity(oracle, windows).perplexity, 1.0, rel_tol=1e-6)


def test_tokenize_text_adds_no_special_tokens(default_model_dir):
    from llmctl.models.loader import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    ids = tokenize_text(tokenizer, "Hello world")
    assert ids.tolist() == tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids.tolist()


@pytest.mark.slow
def test_default_model_heldout_perplexity_is_the_reference(default_model_dir):
    """16 windows of 1,024 held-out tokens, fp32: 13.47 (minutes on 2 CPU cores)."""
    from llmctl.eval.perplexity import heldout_windows
    from llmctl.models.loader import load_model, load_tokenizer

    model = load_model(default_model_dir, dtype="float32", device="cpu")
    result = perplexity(model.logits, heldout_windows(load_tokenizer(default_model_dir)))
    assert result.perplexity == pytest.approx(13.47, abs=0.01)

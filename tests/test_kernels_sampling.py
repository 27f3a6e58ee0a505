"""The fused sampling kernel (llmctl_kernels/sampling.py): under the CPU interpreter here (few rows: each
program is interpreted), through the Sampler on CUDA where present (many rows, frequencies)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"

pytest.importorskip("triton")

from llmctl.layers import logits_processors as lp  # noqa: E402
from llmctl.layers.sampler import Sampler, SamplingMetadata, make_generator  # noqa: E402
from llmctl.sampling_params import SamplingParams  # noqa: E402
from llmctl_kernels.sampling import sample  # noqa: E402

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _full(n: int, value: float) -> torch.Tensor:
    return torch.full((n,), value, device=DEVICE)


def _seeds(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2**62, (n,), generator=gen).to(DEVICE)


def test_top_p_and_min_p_keep_exactly_their_tokens_in_proportion() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    n = 400
    logits = PROBS.log().expand(n, -1).contiguous().to(DEVICE)
    # top_p 0.9 keeps three tokens, renormalized; min_p 0.35 keeps p >= 0.175 (two tokens) and
    # top_p 0.6 then keeps the first alone (0.625 of the two already reaches it)
    got = sample(logits, _full(n, 1.0), _seeds(n, gen), top_p=_full(n, 0.9)).cpu()
    freq = torch.bincount(got, minlength=4).float() / n
    # 0.1 is 4 standard deviations of a frequency at 400 draws
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.1, rtol=0)
    assert freq[3] == 0 and (freq[:3] > 0).all()
    got = sample(logits[:50], _full(50, 1.0), _seeds(50, gen), min_p=_full(50, 0.35), top_p=_full(50, 0.6)).cpu()
    assert (got == 0).all()


def test_rejection_rounds_keep_the_top_p_set_on_a_long_tail() -> None:
    """A geometric distribution over 200 tokens and top_p 0.6: the first draw often falls outside
    the kept set and later rounds race only the tokens above it. Every draw lies in the set the
    torch form keeps, with the same temperature."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    n, v = 60, 200
    logits = (-0.05 * torch.arange(v, dtype=torch.float32)).expand(n, -1).contiguous()
    logits = logits[:, torch.randperm(v, generator=gen)].contiguous()  # the order must not matter
    kept = lp.apply_top_p((logits[:1] / 0.7).clone(), torch.tensor([0.6])).isfinite()[0]
    assert 5 < int(kept.sum()) < 60
    got = sample(logits.to(DEVICE), _full(n, 0.7), _seeds(n, gen), top_p=_full(n, 0.6)).cpu()
    assert kept[got].all()
    assert len(set(got.tolist())) > 3  # a draw, not the most likely token


def test_top_k_and_min_p_floors_then_top_p_over_what_they_keep() -> None:
    """Per row: top-k alone, top-k then top-p (renormalized over the k), min-p stricter than
    top-k, and top-k off. Every draw lies in the set the torch form keeps with the same
    parameters."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    v = 200
    logits = (-0.05 * torch.arange(v, dtype=torch.float32))[torch.randperm(v, generator=gen)]
    rows = [(7, 1.0, 0.0), (12, 0.5, 0.0), (40, 1.0, 0.5), (v, 0.6, 0.0)]  # (top_k, top_p, min_p)
    n = 15
    batch = logits.expand(n * len(rows), -1).contiguous()
    top_k = torch.tensor([k for k, _, _ in rows]).repeat_interleave(n)
    top_p = torch.tensor([p for _, p, _ in rows]).repeat_interleave(n)
    min_p = torch.tensor([q for _, _, q in rows]).repeat_interleave(n)
    kth = lp.top_k_threshold(batch, top_k).view(-1)
    got = sample(batch.to(DEVICE), _full(len(batch), 0.7), _seeds(len(batch), gen), min_p.to(DEVICE), kth.to(DEVICE),
                 top_p.to(DEVICE)).cpu()
    for i, (k, p, q) in enumerate(rows):
        ref = (logits / 0.7).unsqueeze(0).clone()
        lp.apply_min_p(ref, torch.tensor([q]))
        kept = lp.apply_top_k_top_p(ref, torch.tensor([k]), torch.tensor([p])).isfinite()[0]
        draws = got[i * n:(i + 1) * n]
        assert kept[draws].all(), (k, p, q)
        assert len(set(draws.tolist())) > 1


def test_a_rows_token_depends_on_its_logits_and_seed_only() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    n, v = 8, 300
    logits = torch.randn(n, v, generator=gen).to(DEVICE) * 2
    seeds = _seeds(n, gen)
    temperature = torch.linspace(0.5, 1.5, n).to(DEVICE)
    top_p = torch.linspace(0.5, 1.0, n).to(DEVICE)
    first = sample(logits, temperature, seeds, top_p=top_p)
    perm = torch.randperm(n, generator=gen).to(DEVICE)
    again = sample(logits[perm].contiguous(), temperature[perm], seeds[perm], top_p=top_p[perm])
    assert torch.equal(again, first[perm])
    assert not torch.equal(sample(logits, temperature, seeds + 1, top_p=top_p), first)  # 8 rows, 300 tokens


def test_rejects_bad_input() -> None:
    logits = torch.zeros(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="temperature must be \\[3\\]"):
        sample(logits, _full(2, 1.0), torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous rows"):
        sample(logits.t(), _full(10, 1.0), torch.zeros(10, dtype=torch.int64, device=DEVICE))


def _frequencies(params: SamplingParams, num_samples: int = 20000) -> torch.Tensor:
    logits = PROBS.log().expand(num_samples, -1).contiguous().to("cuda")
    requests = [(params, [], [], make_generator(params.seed, "cuda") if params.seed is not None else None)]
    meta = SamplingMetadata.build(requests * num_samples, vocab_size=4, eos_token_id=None, device="cuda")
    return torch.bincount(Sampler()(logits, meta).sampled_token_ids, minlength=4).float().cpu() / num_samples


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=1.0), PROBS),
    (SamplingParams(temperature=0.5), torch.softmax(PROBS.log() / 0.5, -1)),
    (SamplingParams(top_p=0.75), torch.tensor([0.625, 0.375, 0.0, 0.0])),
    (SamplingParams(top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95),
    (SamplingParams(top_p=0.4), torch.tensor([1.0, 0.0, 0.0, 0.0])),
    (SamplingParams(min_p=0.2), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95),
])
def test_sampler_on_cuda_draws_the_specified_distribution(params, expected) -> None:
    got = _frequencies(params)
    torch.testing.assert_close(got, expected, atol=0.015, rtol=0)
    assert (got[expected == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_on_cuda_seeded_rows_repeat_and_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(6, 128256, device="cuda") * 3

    def run(rows):
        requests = [(p, [], [], make_generator(p.seed, "cuda") if p.seed is not None else None) for p in rows]
        meta = SamplingMetadata.build(requests, vocab_size=logits.shape[1], eos_token_id=None, device="cuda")
        return Sampler()(logits[:len(rows)], meta).sampled_token_ids.tolist()

    seeded = [SamplingParams(temperature=0.9, top_p=0.95, seed=7 + i) for i in range(3)]
    greedy = SamplingParams(temperature=0.0)
    first = run(seeded + [greedy])
    assert run(seeded + [greedy, SamplingParams(temperature=1.0)])[:4] == first
    assert first[3] == int(logits[3].argmax())

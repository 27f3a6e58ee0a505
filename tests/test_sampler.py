"""Sampler: each parameter changes the choice or the distribution exactly as specified."""

import math

import pytest
import torch

from llmctl.errors import InvalidRequestError
from llmctl.layers import logits_processors as lp
from llmctl.layers.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs, make_generator
from llmctl.sampling_params import SamplingParams

EOS = 3
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])  # distinct masses so every cut point is unambiguous
LOG_PROBS = PROBS.log()


def run(logits, requests, eos=EOS):
    meta = SamplingMetadata.build(requests, vocab_size=logits.shape[1], eos_token_id=eos, device=logits.device)
    return Sampler()(logits, meta), meta


def frequencies(params: SamplingParams, logits_row=LOG_PROBS, num_samples=20000) -> torch.Tensor:
    torch.manual_seed(0)
    logits = logits_row.expand(num_samples, -1).clone()
    out, _ = run(logits, [(params, [], [], None)] * num_samples, eos=None)
    return torch.bincount(out.sampled_token_ids, minlength=logits.shape[1]).float() / num_samples


def test_greedy_is_argmax_and_deterministic():
    torch.manual_seed(1)
    logits = torch.randn(16, 1000, dtype=torch.float16)
    reqs = [(SamplingParams(temperature=0.0, top_p=0.5, top_k=3), [], [], None)] * 16
    first, _ = run(logits, reqs)
    second, _ = run(logits, reqs)
    assert torch.equal(first.sampled_token_ids, logits.float().argmax(-1))
    assert torch.equal(first.sampled_token_ids, second.sampled_token_ids)


def test_sampler_does_not_modify_its_input():
    logits = torch.randn(3, 50)
    before = logits.clone()
    run(logits, [(SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.5, logprobs=2), [1], [2], None)] * 3)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    expected = torch.softmax(LOG_PROBS / temperature, -1)
    got = frequencies(SamplingParams(temperature=temperature))
    torch.testing.assert_close(got, expected, atol=0.015, rtol=0)


def test_top_k_keeps_the_k_most_likely_renormalized():
    got = frequencies(SamplingParams(top_k=2))
    torch.testing.assert_close(got, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    assert got[2:].sum() == 0


@pytest.mark.parametrize("top_p, kept", [(0.75, 2), (0.9, 3), (0.4, 1)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    got = frequencies(SamplingParams(top_p=top_p))
    expected = torch.zeros(4)
    expected[:kept] = PROBS[:kept] / PROBS[:kept].sum()
    torch.testing.assert_close(got, expected, atol=0.015, rtol=0)
    assert got[kept:].sum() == 0


def test_top_p_applies_after_top_k():
    # Alone, top_p=0.6 keeps tokens 0 and 1; after top_k=2 renormalizes to [0.625, 0.375] it keeps only 0.
    assert (frequencies(SamplingParams(top_p=0.6))[:2] > 0).all()
    assert frequencies(SamplingParams(top_k=2, top_p=0.6)).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_k_top_p_candidates_path_matches_full_sort():
    torch.manual_seed(0)
    logits = torch.randn(64, 2000) * 3
    top_k = torch.randint(1, 120, (64,))
    top_p = torch.rand(64) * 0.9 + 0.1
    fast = lp.apply_top_k_top_p(logits.clone(), top_k, top_p, max_top_k=int(top_k.max()))
    full = lp.apply_top_k_top_p(logits.clone(), top_k, top_p)
    assert torch.equal(fast, full)
    assert torch.equal(fast[fast.isfinite()], logits[fast.isfinite()])
    kept = fast.isfinite().sum(1)
    assert (kept <= top_k).all() and (kept < top_k).any() and (kept > 1).any()


def test_top_p_of_one_keeps_every_token_beside_rows_that_cut():
    # one token holds all but 1e-15 of the mass: its rounded cumulative sum is 1.0 at once
    logits = torch.cat([torch.tensor([[30.0]]), torch.full((1, 999), -5.0)], 1).expand(2, -1).clone()
    kept = lp.apply_top_p(logits, torch.tensor([1.0, 0.5])).isfinite()
    assert kept[0].all() and kept[1].sum() == 1


def test_top_p_keeps_ties_with_the_last_kept_token_whatever_their_order():
    logits = torch.tensor([0.4, 0.2, 0.2, 0.2, 0.1]).log()
    perm = torch.tensor([3, 0, 4, 2, 1])
    kept = lp.apply_top_p(logits.clone().unsqueeze(0), torch.tensor([0.5])).isfinite()[0]
    assert kept.tolist() == [True, True, True, True, False]
    kept_perm = lp.apply_top_p(logits[perm].unsqueeze(0), torch.tensor([0.5])).isfinite()[0]
    assert torch.equal(kept_perm, kept[perm])


def test_top_p_after_top_k_on_a_large_vocab():
    row = torch.cat([LOG_PROBS, torch.full((60,), -30.0)])  # V = 64 takes the top-k candidates path
    assert frequencies(SamplingParams(top_k=2, top_p=0.6), row)[:4].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (frequencies(SamplingParams(top_k=3, top_p=0.75), row)[:3] > 0).tolist() == [True, True, False]


@pytest.mark.parametrize("min_p, kept", [(0.35, 2), (0.2, 3), (0.05, 4)])
def test_min_p_drops_tokens_below_fraction_of_top(min_p, kept):
    got = frequencies(SamplingParams(min_p=min_p))
    expected = torch.zeros(4)
    expected[:kept] = PROBS[:kept] / PROBS[:kept].sum()
    torch.testing.assert_close(got, expected, atol=0.015, rtol=0)


def test_top_k_rows_beside_rows_without_top_k():
    torch.manual_seed(0)
    n = 4000
    reqs = [(SamplingParams(top_k=2), [], [], None), (SamplingParams(), [], [], None)] * n
    out, _ = run(LOG_PROBS.expand(len(reqs), -1).clone(), reqs, eos=None)
    ids = out.sampled_token_ids.view(n, 2)
    assert set(ids[:, 0].tolist()) == {0, 1} and set(ids[:, 1].tolist()) == {0, 1, 2, 3}


def test_mixed_batch_applies_each_rows_own_parameters():
    torch.manual_seed(0)
    n = 6000
    per_row = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=5.0),
               SamplingParams(top_p=0.75), SamplingParams(min_p=0.2), SamplingParams()]
    reqs = [(p, [], [], None) for p in per_row] * n
    out, _ = run(LOG_PROBS.expand(len(reqs), -1).clone(), reqs, eos=None)
    ids = out.sampled_token_ids.view(n, len(per_row))
    assert (ids[:, 0] == 0).all() and (ids[:, 1] == 0).all()
    assert set(ids[:, 2].tolist()) == {0, 1}
    assert set(ids[:, 3].tolist()) == {0, 1, 2}
    assert set(ids[:, 4].tolist()) == {0, 1, 2, 3}


def test_repetition_penalty_over_prompt_and_output():
    logits = torch.tensor([[2.0, -1.0, 1.9, 0.5, -0.5]])
    reqs = [(SamplingParams(temperature=0.0, repetition_penalty=1.25), [0], [1], None)]
    pen = SamplingMetadata.build(reqs, vocab_size=5, eos_token_id=None).penalties
    got = lp.apply_penalties(logits.clone(), pen)
    # Prompt token 0 (positive) is divided, output token 1 (negative) multiplied, the rest untouched.
    torch.testing.assert_close(got, torch.tensor([[1.6, -1.25, 1.9, 0.5, -0.5]]))
    assert run(logits, reqs, eos=None)[0].sampled_token_ids.item() == 2
    assert run(logits, [(SamplingParams(temperature=0.0), [0], [1], None)], eos=None)[0].sampled_token_ids.item() == 0


def test_frequency_and_presence_penalties_count_output_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, 1.5]])
    prompt, output = [3, 3, 3], [0, 0, 0, 1]
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25)
    pen = SamplingMetadata.build([(params, prompt, output, None)], 4, None).penalties
    got = lp.apply_penalties(logits.clone(), pen)
    # token 0: 2 - 3*0.5 - 0.25; token 1: 1 - 0.5 - 0.25; token 3 (prompt only): untouched.
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.25, 0.0, 1.5]]))
    assert run(logits, [(params, prompt, output, None)], eos=None)[0].sampled_token_ids.item() == 3
    negative = SamplingParams(temperature=0.0, presence_penalty=-2.0)
    assert run(logits, [(negative, [], [1], None)], eos=None)[0].sampled_token_ids.item() == 1


def test_penalties_match_a_per_token_reference_on_random_histories():
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=rng) * 3
    reqs = []
    for row in range(6):
        prompt = torch.randint(0, 30, (int(torch.randint(0, 40, (1,), generator=rng)),), generator=rng).tolist()
        output = torch.randint(20, 60, (int(torch.randint(0, 40, (1,), generator=rng)),), generator=rng).tolist()
        params = SamplingParams(repetition_penalty=[1.0, 1.3, 0.7][row % 3],
                                frequency_penalty=[0.0, 0.4, -0.3][row // 2],
                                presence_penalty=[0.5, 0.0, -1.0][(row + 1) % 3])
        reqs.append((params, prompt, output, None))
    expected = logits.clone()
    for row, (params, prompt, output, _) in enumerate(reqs):
        for token in set(prompt) | set(output):
            value = expected[row, token]
            penalty = params.repetition_penalty
            expected[row, token] = value / penalty if value > 0 else value * penalty
        for token in set(output):
            expected[row, token] -= output.count(token) * params.frequency_penalty + params.presence_penalty
    pen = SamplingMetadata.build(reqs, 100, None).penalties
    torch.testing.assert_close(lp.apply_penalties(logits.clone(), pen), expected)


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # EOS (3) is argmax, stop token 4 next
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4])
    pick = lambda p, out: run(logits, [(p, [0], out, None)])[0].sampled_token_ids.item()  # noqa: E731
    assert pick(params, [0, 0]) == 2
    assert pick(params, [0, 0, 0]) == 3
    # ignore_eos: EOS does not end the sequence, so min_tokens has no reason to mask it.
    assert pick(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4], ignore_eos=True), [0]) == 3
    assert pick(SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=[3, 4]), [0]) == 2


def test_stop_token_outside_vocab_and_seed_without_generator_are_rejected():
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        SamplingMetadata.build([(SamplingParams(min_tokens=2, stop_token_ids=[99]), [], [], None)], 10, None)
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingMetadata.build([(SamplingParams(seed=1), [], [], None)], 10, None)


def _seeded_run(layout: list[tuple[str, SamplingParams]], steps: int, vocab: int = 1000,
                device: str = "cpu") -> dict[str, list[int]]:
    """Decode `steps` tokens for each named row; a row's logits depend only on its name and step."""
    gens = {name: make_generator(p.seed, device) for name, p in layout if p.seed is not None}
    history: dict[str, list[int]] = {name: [] for name, _ in layout}
    for step in range(steps):
        rows = []
        for name, _ in layout:
            g = torch.Generator().manual_seed(ord(name) * 1000 + step)
            rows.append(torch.randn(vocab, generator=g) * 2)
        torch.manual_seed(1000 + step + len(layout))  # neighbours draw differently in every layout
        reqs = [(p, [1, 2], history[name], gens.get(name)) for name, p in layout]
        out, _ = run(torch.stack(rows).to(device), reqs, eos=None)
        for (name, _), token in zip(layout, out.sampled_token_ids.tolist()):
            history[name].append(token)
    return history


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_seed_reproduces_whatever_else_is_in_the_batch(device):
    a = SamplingParams(seed=7, temperature=0.9, top_p=0.95)
    b = SamplingParams(seed=8, top_k=50, top_p=0.9, repetition_penalty=1.1)
    batch1 = [("a", a), ("x", SamplingParams()), ("b", b)]
    batch2 = [("y", SamplingParams(temperature=0.0)), ("b", b), ("z", SamplingParams(seed=9)),
              ("w", SamplingParams(top_k=3)), ("a", a)]
    batch3 = [("a", a)]
    batch4 = [("w", SamplingParams(top_k=3)), ("b", b)]  # every row has top-k: top-p without a sort
    r1, r2, r3, r4 = (_seeded_run(b, 40, device=device) for b in (batch1, batch2, batch3, batch4))
    assert r1["a"] == r2["a"] == r3["a"]
    assert r1["b"] == r2["b"] == r4["b"]
    other_seed = _seeded_run([("a", SamplingParams(seed=70, temperature=0.9, top_p=0.95))], 40, device=device)
    assert other_seed["a"] != r1["a"]
    assert len(set(r1["a"])) > 5  # really sampled, not a degenerate greedy run


def test_same_seed_in_one_batch_gives_same_tokens():
    p = SamplingParams(seed=3)
    logits = torch.randn(1, 1000).expand(3, -1).clone()
    reqs = [(p, [], [], make_generator(3)), (SamplingParams(), [], [], None), (p, [], [], make_generator(3))]
    ids = run(logits, reqs)[0].sampled_token_ids
    assert ids[0] == ids[2]


def test_logprobs_are_raw_log_softmax_with_sorted_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 200, dtype=torch.bfloat16)
    raw = torch.log_softmax(logits.float(), -1)
    reqs = [(SamplingParams(temperature=0.3, repetition_penalty=1.8, logprobs=5), [1, 2], [3], None),
            (SamplingParams(temperature=0.0, logprobs=0), [], [], None),
            (SamplingParams(), [], [], None),
            (SamplingParams(top_k=200, temperature=50.0, logprobs=3), [], [], None)]
    out, meta = run(logits, reqs)
    rows = out.logprobs.tolists(meta.num_logprobs)
    assert rows[2] is None
    assert list(rows[1]) == [int(raw[1].argmax())]
    for i, k in ((0, 5), (3, 3)):
        sampled = int(out.sampled_token_ids[i])
        entry = rows[i]
        assert next(iter(entry)) == sampled
        assert entry[sampled] == pytest.approx(raw[i, sampled].item(), abs=1e-6)
        top = raw[i].topk(k)
        assert list(entry.values())[1:] == sorted(list(entry.values())[1:], reverse=True)
        for tok, val in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tok] == pytest.approx(val, abs=1e-6)
        assert len(entry) == (k if sampled in top.indices.tolist() else k + 1)


def test_prompt_logprobs_per_position_and_chunked():
    torch.manual_seed(0)
    prompt = [5, 17, 3, 3, 42, 9]
    logits = torch.randn(len(prompt), 64)
    full = compute_prompt_logprobs(logits, prompt, num_logprobs=2)
    raw = torch.log_softmax(logits, -1)
    assert len(full) == len(prompt) and full[0] is None
    for pos in range(1, len(prompt)):
        entry = full[pos]
        assert next(iter(entry)) == prompt[pos]
        assert entry[prompt[pos]] == pytest.approx(raw[pos - 1, prompt[pos]].item(), abs=1e-6)
        top = raw[pos - 1].topk(2)
        assert all(entry[t] == pytest.approx(v, abs=1e-6) for t, v in zip(top.indices.tolist(), top.values.tolist()))
    chunks = compute_prompt_logprobs(logits[:4], prompt, 2) + compute_prompt_logprobs(logits[4:], prompt, 2, start=4)
    assert chunks == full
    assert all(math.isfinite(v) for e in full[1:] for v in e.values())


def test_full_vocab_batch_with_every_feature():
    torch.manual_seed(0)
    vocab = 49152
    logits = torch.randn(4, vocab) * 3
    reqs = [(SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, seed=1, repetition_penalty=1.2,
                            frequency_penalty=0.3, presence_penalty=0.2, min_tokens=2, logprobs=20),
             list(range(100)), [5, 6], make_generator(1))] * 2 + [(SamplingParams(temperature=0.0), [], [], None)] * 2
    out, _ = run(logits, reqs, eos=0)
    ids = out.sampled_token_ids
    top40 = set(logits[0].topk(60).indices.tolist())  # penalties can reorder near the cut
    assert ids[0].item() in top40 and ids[0] != 0
    assert ids[2] == logits[2].argmax() and ids[3] == logits[3].argmax()
    assert out.logprobs.token_ids.shape == (4, 21)


@pytest.mark.gpu
def test_greedy_and_logprobs_on_cuda_match_cpu():
    torch.manual_seed(0)
    logits = torch.randn(8, 49152)
    reqs = [(SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=5), list(range(50)), [7, 8], None)] * 8
    cpu, meta = run(logits, reqs)
    gpu, _ = run(logits.cuda(), reqs)
    assert torch.equal(cpu.sampled_token_ids, gpu.sampled_token_ids.cpu())
    torch.testing.assert_close(cpu.logprobs.logprobs, gpu.logprobs.logprobs.cpu(), atol=1e-5, rtol=0)

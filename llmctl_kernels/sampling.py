"""One-kernel random sampling with temperature, min-p, top-k and top-p: no sort of the vocabulary.

The sampler's torch form spends a softmax, a sort of every row, a cumulative sum, masks and an
exponential race on each step, about 25 launches; at batch 1-32 with top-p on a 128k vocabulary
that is 0.5-1 ms per step on an H100, a quarter of a 4-bit decode step. Here one program per row
reads its logits a few times from L2 and never sorts:

    s_i = l_i / T - max_j(l_j / T)          log of the unnormalized probability, <= 0
    min-p keeps s_i >= log(min_p)           (p_i >= min_p * max p)
    top-k keeps l_i >= kth_i                (the row's k-th largest logit, found by the caller)
    top-p keeps K = {i : G(s_i) < top_p Z}  G(s) = sum of exp(s_j) over s_j > s, Z = the mass
                                            min-p and top-k kept

Top-p by rejection (FlashInfer's idea): draw j from the kept tokens by an exponential race
(argmax of s_i - log(-log u_i), u_i uniform: Gumbel-max), then one pass sums G(s_j) (and Z, the
first time). If j is in K, done; if not, every token of K is more likely than j, so the next
round races only the tokens above j. Each round's draw is exact for the tokens it races, and a
rejection depends only on a token outside K, so the accepted token is a draw from K renormalized.
The first draw is already in K with probability >= top_p; each rejection removes the tail below
the rejected token. After MAX_ROUNDS rejections (never seen at a realistic distribution) the row
takes its most likely token, which is always in K.

The order is vLLM's (temperature, min-p, top-k, top-p on what top-k left): min-p and top-k are
floors on s, the larger of the two applies, and top-p renormalizes over what they keep.

Uniforms come from Philox keyed by a per-row seed drawn each step (from the row's own generator
for seeded requests), four per Philox counter, each round its own counters: a row's token depends
only on its logits, parameters and seed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import interpreting

MAX_ROUNDS = 64
_BLOCK = 4096


@triton.jit
def _scaled(logits_row, offs, V, inv_t, m):
    """s = l / T - m, -inf outside the row."""
    x = tl.load(logits_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    return x * inv_t - m


@triton.jit
def _uniforms(seed, rnd, start, V, BLOCK: tl.constexpr):
    """BLOCK uniforms in [0, 1) for tokens start...start + BLOCK - 1 of round rnd: one Philox call
    gives four. Each round has its own counters, over the vocabulary padded to whole blocks."""
    counters = rnd * (tl.cdiv(V, BLOCK) * (BLOCK // 4)) + start // 4 + tl.arange(0, BLOCK // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    return tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [BLOCK])


@triton.jit(do_not_specialize=["has_min_p", "has_top_k", "has_top_p"])
def _sample_kernel(
    logits_ptr, stride, temperature_ptr, min_p_ptr, kth_ptr, top_p_ptr, seed_ptr, out_ptr, V,
    has_min_p, has_top_k, has_top_p, MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr,
):
    # (which filters apply are arguments, not constants: one compiled kernel serves every batch)
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride
    inv_t = 1.0 / tl.load(temperature_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row)
    lanes = tl.arange(0, BLOCK)

    # the row's maximum and its most likely token (the fallback, always kept)
    m = float("-inf")
    top = 0
    for start in range(0, V, BLOCK):
        x = _scaled(logits_row, start + lanes, V, inv_t, 0.0)
        block_max = tl.max(x, axis=0)
        top = tl.where(block_max > m, start + tl.argmax(x, axis=0), top)
        m = tl.maximum(m, block_max)

    floor = tl.full([], float("-inf"), tl.float32)  # tokens race while s >= floor (first round) or s > floor
    if has_min_p != 0:
        floor = tl.log(tl.load(min_p_ptr + row).to(tl.float32))
    if has_top_k != 0:
        floor = tl.maximum(floor, tl.load(kth_ptr + row).to(tl.float32) * inv_t - m)
    top_p = tl.full([], 1.0, tl.float32)
    if has_top_p != 0:
        top_p = tl.load(top_p_ptr + row).to(tl.float32)
    kept_mass = -1.0  # Z, summed in the first acceptance pass
    strict = 0
    chosen = top
    done = 0
    rnd = 0
    while (done == 0) & (rnd < MAX_ROUNDS):
        # the exponential race among the tokens still in play
        best = float("-inf")
        winner = top
        best_s = 0.0
        for start in range(0, V, BLOCK):
            offs = start + lanes
            s = _scaled(logits_row, offs, V, inv_t, m)
            in_play = (s > floor) | ((strict == 0) & (s == floor))
            u = _uniforms(seed, rnd, start, V, BLOCK)
            key = tl.where(in_play & (offs < V), s - tl.log(-tl.log(u)), float("-inf"))
            block_best = tl.max(key, axis=0)
            i = tl.argmax(key, axis=0)
            better = block_best > best
            winner = tl.where(better, start + i, winner)
            best_s = tl.where(better, tl.sum(tl.where(lanes == i, s, 0.0), axis=0), best_s)
            best = tl.maximum(best, block_best)
        if best == float("-inf"):
            done = 1  # nothing in play: the most likely token
        elif top_p >= 1.0:
            chosen = winner
            done = 1
        else:
            # G(s_j) and, once, Z: the kept mass strictly above the winner, and all of it
            above = 0.0
            total = 0.0
            for start in range(0, V, BLOCK):
                s = _scaled(logits_row, start + lanes, V, inv_t, m)
                e = tl.exp(s)
                above += tl.sum(tl.where(s > best_s, e, 0.0), axis=0)
                total += tl.sum(tl.where(s >= floor, e, 0.0), axis=0)
            if kept_mass < 0.0:
                kept_mass = total  # the first round's floor is min-p's: Z
            if above < top_p * kept_mass:
                chosen = winner
                done = 1
            else:
                floor = best_s
                strict = 1
        rnd += 1
    tl.store(out_ptr + row, chosen.to(tl.int64))


def sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
           min_p: torch.Tensor | None = None, top_k_threshold: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [B, V] (fp32/fp16/bf16, rows contiguous): temperature [B]
    (> 0), seeds [B] int64 (Philox keys, drawn fresh each step), min_p [B] (0 = off),
    top_k_threshold [B] (each row's k-th largest logit, -inf = off), top_p [B] (1 = off).
    Returns [B] int64."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with contiguous rows, got {tuple(logits.shape)}")
    b, v = logits.shape
    for name, t in (("temperature", temperature), ("seeds", seeds), ("min_p", min_p),
                    ("top_k_threshold", top_k_threshold), ("top_p", top_p)):
        if t is not None and (t.shape != (b,) or t.device != logits.device):
            raise ValueError(f"{name} must be [{b}] on {logits.device}, got {tuple(t.shape)} on {t.device}")
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    block = max(4, min(_BLOCK, triton.next_power_of_2(v)))
    _sample_kernel[(b,)](
        logits, logits.stride(0), temperature, min_p if min_p is not None else temperature,
        top_k_threshold if top_k_threshold is not None else temperature,
        top_p if top_p is not None else temperature, seeds, out, v,
        int(min_p is not None), int(top_k_threshold is not None), int(top_p is not None),
        MAX_ROUNDS=MAX_ROUNDS, BLOCK=block,
        num_warps=1 if interpreting() else 16,
    )
    return out

"""Fused vocabulary reduction: the decoders' per-position candidate and scores in one pass over the logits.

Per position (one program per row, the vocabulary streamed in tiles, nothing of size [N, V] written):
- x0: argmax over v != mask_id of the temperature-scaled logits plus Gumbel noise -log(-log u) in float64, u the
  counter-based hash of kernels/counter_hash.py (seed, step, position, column) recomputed in-kernel, so the draw
  is bit-identical to the torch path's; greedy rows (temperature 0) take the plain argmax;
- p(x0), the top-2 margin p1 - p2 and -H = sum p log p of the score distribution (softmax of the raw logits, or of
  the tempered ones for Dream/RND1 rows), from an online max / sum exp / sum exp * (l - max) in fp32.

Top-k / top-p filtering is not fused: batches that filter take the torch path (engine/decoding/candidates.py).
`vocab_scores_ref` is the plain-torch reference (full softmax; what candidates() computes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .counter_hash import uniform, uniform_tl


@triton.jit
def _vocab_kernel(
    # pointers
    Logits, Temp, Keys, Tempered, X0, PX0, Margin, NegH,
    # sizes
    vocab, mask_id,
    # strides
    stride_ln,
    # meta-parameters
    SAMPLING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    temp = tl.load(Temp + row)
    sample = temp > 0
    temp_c = tl.maximum(temp, 1e-8)
    use_tempered = tl.load(Tempered + row) != 0
    key = tl.load(Keys + row).to(tl.uint64, bitcast=True)
    offs0 = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float64)
    best_idx = tl.full([], 0, tl.int64)
    best_sl = tl.full([], float("-inf"), tl.float32)  # score logit at x0
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.full([], 0.0, tl.float32)  # sum exp(sl - m)
    s1 = tl.full([], 0.0, tl.float32)  # sum exp(sl - m) * (sl - m)
    top1 = tl.full([], float("-inf"), tl.float32)
    top2 = tl.full([], float("-inf"), tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        offs = v0 + offs0
        vm = offs < vocab
        lg = tl.load(Logits + row * stride_ln + offs, mask=vm, other=float("-inf"))  # [BV] fp32
        lt = tl.where(sample, tl.math.div_rn(lg, temp_c), lg)  # IEEE division, as torch divides
        if SAMPLING:
            u = uniform_tl(key, offs)  # [BV] float64, this row's columns
            pert = tl.where(sample, lt.to(tl.float64) - tl.log(-tl.log(u)), lt.to(tl.float64))
        else:
            pert = lt.to(tl.float64)
        pert = tl.where(vm & (offs != mask_id), pert, float("-inf"))
        b_max = tl.max(pert, 0)
        b_idx = tl.argmax(pert, 0)
        sl = tl.where(use_tempered, lt, lg)  # [BV] score logits (-inf past the vocab)
        b_sl = tl.sum(tl.where(offs0 == b_idx, sl, 0.0), 0)
        better = b_max > best
        best = tl.where(better, b_max, best)
        best_idx = tl.where(better, (v0 + b_idx).to(tl.int64), best_idx)
        best_sl = tl.where(better, b_sl, best_sl)
        # online softmax statistics of the score logits
        m_new = tl.maximum(m, tl.max(sl, 0))
        e = tl.exp(sl - m_new)
        d = tl.where(sl > float("-inf"), sl - m_new, 0.0)
        rescale = tl.exp(m - m_new)
        shift = (tl.where(z > 0, m, m_new) - m_new) * z  # 0 before the first tile
        s1 = rescale * (s1 + shift) + tl.sum(e * d, 0)
        z = z * rescale + tl.sum(e, 0)
        m = m_new
        # running top-2 of the score logits
        i1 = tl.argmax(sl, 0)
        c1 = tl.max(sl, 0)
        c2 = tl.max(tl.where(offs0 == i1, float("-inf"), sl), 0)
        top2 = tl.maximum(tl.minimum(top1, c1), tl.maximum(top2, c2))
        top1 = tl.maximum(top1, c1)
    inv_z = 1.0 / z
    tl.store(X0 + row, best_idx)
    tl.store(PX0 + row, tl.exp(best_sl - m) * inv_z)
    tl.store(Margin + row, (tl.exp(top1 - m) - tl.exp(top2 - m)) * inv_z)
    tl.store(NegH + row, s1 * inv_z - tl.log(z))


def vocab_scores(logits: torch.Tensor, temperature: torch.Tensor, noise_keys: torch.Tensor, tempered: torch.Tensor,
                 mask_id: int, sampling: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] fp32; temperature [N] fp32; noise_keys [N] int64; tempered [N] bool.
    -> x0 [N] int64, p(x0) [N], margin p1 - p2 [N], -H [N] (float64). sampling=False: no row has temperature > 0
    (skips the noise)."""
    N, V = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    dev = logits.device
    x0 = torch.empty(N, dtype=torch.long, device=dev)
    p_x0, margin, neg_h = (torch.empty(N, dtype=torch.float32, device=dev) for _ in range(3))
    if N:
        _vocab_kernel[(N,)](
            logits, temperature.float().contiguous(), noise_keys.contiguous(), tempered.to(torch.int8), x0, p_x0,
            margin, neg_h, V, mask_id, logits.stride(0),
            SAMPLING=sampling, BLOCK_V=min(4096, triton.next_power_of_2(V)), num_warps=8)
    return x0, p_x0.double(), margin.double(), neg_h.double()


def vocab_scores_ref(logits: torch.Tensor, temperature: torch.Tensor, noise_keys: torch.Tensor,
                     tempered: torch.Tensor, mask_id: int, sampling: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vocab_scores' contract with full-vocabulary softmaxes (the torch decoders' formulas)."""
    temp = temperature[:, None].float()  # [N, 1]
    lt = torch.where(temp > 0, logits / temp.clamp_min(1e-8), logits)  # [N, V]
    pert = lt.double()
    if sampling:
        u = uniform(noise_keys, logits.shape[-1])  # [N, V] float64
        pert = torch.where(temp > 0, pert - torch.log(-torch.log(u)), pert)
    pert[:, mask_id] = float("-inf")
    x0 = pert.argmax(-1)  # [N]
    sl = torch.where(tempered[:, None], lt, logits)
    p = torch.softmax(sl, dim=-1)  # [N, V]
    top2 = p.topk(2, dim=-1).values.double()
    neg_h = torch.nan_to_num(p * torch.log_softmax(sl, dim=-1), nan=0.0).sum(-1).double()
    return x0, p.gather(-1, x0[:, None])[:, 0].double(), top2[:, 0] - top2[:, 1], neg_h

"""Plain, obviously-correct reference samplers, written from the published algorithms (one sequence at a time,
a full forward over the whole canvas every step, no cache). The engine is checked against these.

One deliberate deviation, shared with the engine: the mask token is never a candidate (`no_mask`). The published
loops can pick MASK as x0 (random models often do), which leaves a hole that a later block re-decodes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def full_logits(model, x: torch.Tensor) -> torch.Tensor:
    """x [1, L] -> [1, L, V]."""
    return model.logits(x)


def no_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    out = logits.clone()
    out[..., mask_id] = -float("inf")
    return out


def shifted(logits: torch.Tensor) -> torch.Tensor:
    """Dream/RND1: position i is predicted from the output at i - 1 (position 0 keeps its own)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def llada_transfer_counts(mask_count: int, steps: int) -> list[int]:
    base, rem = divmod(mask_count, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def llada_generate(model, prompt: list[int], gen_length: int, block_length: int, steps: int,
                   cfg_scale: float = 0.0, remasking: "str | Callable" = "low_confidence",
                   block_steps: list[int] | None = None) -> list[int]:
    """LLaDA generate.py at temperature 0 (greedy): returns the generated region.

    block_steps overrides the even split of steps over blocks (to check the engine's graceful rules);
    the last block may be shorter than block_length.
    """
    mask_id = model.config.mask_id
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :P] = True
    num_blocks = -(-gen_length // block_length)
    if block_steps is None:
        assert gen_length % block_length == 0 and steps % num_blocks == 0
        block_steps = [steps // num_blocks] * num_blocks
    for b in range(num_blocks):
        start, end = P + b * block_length, min(P + (b + 1) * block_length, P + gen_length)
        block_mask = x[:, start:end] == mask_id
        counts = llada_transfer_counts(int(block_mask.sum()), block_steps[b])
        for i in range(block_steps[b]):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = full_logits(model, torch.cat([x, un_x]))
                logits, un_logits = both[:1], both[1:]
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = full_logits(model, x)
            if model.config.shift_logits:
                logits = shifted(logits)
            x0 = torch.argmax(no_mask(logits, mask_id), dim=-1)
            p = F.softmax(logits, dim=-1)
            if remasking == "low_confidence":
                conf = torch.gather(p, -1, x0[..., None])[..., 0].double()
            elif remasking == "margin":
                top2 = p.topk(2, dim=-1).values
                conf = (top2[..., 0] - top2[..., 1]).double()
            elif remasking == "entropy":
                conf = (p * torch.log_softmax(logits, dim=-1)).nan_to_num().sum(-1).double()
            elif callable(remasking):  # a custom score (p [1, L, V], x0 [1, L]) -> [1, L]
                conf = remasking(p, x0).double()
            else:
                raise ValueError(remasking)
            conf[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.tensor(-float("inf"), dtype=conf.dtype))
            k = counts[i]
            if k > 0:
                _, idx = torch.topk(conf[0], k)
                x[0, idx] = x0[0, idx]
    return x[0, P:].tolist()


def dream_generate(model, prompt: list[int], gen_length: int, steps: int, alg: str, eps: float = 1e-3) -> list[int]:
    """Dream diffusion_generate at temperature 0, alg in maskgit_plus / topk_margin / entropy, alg_temp 0."""
    mask_id = model.config.mask_id
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = shifted(full_logits(model, x))
        mask_logits = logits[mask_index]
        probs = torch.softmax(mask_logits, dim=-1)
        confidence = probs.max(dim=-1).values
        x0 = no_mask(mask_logits, mask_id).argmax(dim=-1)
        confidence = probs.gather(-1, x0[:, None])[:, 0]
        if alg == "topk_margin":
            sp = torch.sort(probs, dim=-1, descending=True).values
            confidence = sp[:, 0] - sp[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        t, s = timesteps[i], timesteps[i + 1]
        num_mask = mask_index.sum() / mask_index.shape[0]
        n = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full_conf = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_conf[mask_index] = confidence
        if n > 0:
            _, idx = torch.topk(full_conf, n)
            x_ = torch.full_like(x, mask_id)
            x_[mask_index] = x0
            x[0, idx[0]] = x_[0, idx[0]]
    return x[0, P:].tolist()


def rnd1_generate(model, prompt: list[int], gen_length: int, steps: int) -> list[int]:
    """RND1 diffusion_sample, greedy: keep the highest-entropy positions masked on a linear schedule."""
    mask_id = model.config.mask_id
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    maskable = x == mask_id
    total = int(maskable.sum())

    def scores(tokens):
        logp = torch.log_softmax(shifted(full_logits(model, tokens)), dim=-1)
        pred = no_mask(logp, mask_id).argmax(-1)
        ent = -(logp.exp() * logp).sum(-1)
        return pred, ent

    pred, ent = scores(x)
    for step in range(steps - 1, 0, -1):
        keep_n = int(torch.tensor(total) * (step / steps))
        sel = ent.masked_fill(~maskable, -torch.finfo(ent.dtype).max)
        keep = torch.zeros_like(maskable)
        if keep_n > 0:
            keep[0, torch.topk(sel[0], keep_n).indices] = True
        unmask = maskable & ~keep
        x[unmask] = pred[unmask]
        maskable &= ~unmask
        if maskable.any():
            pred, ent = scores(x)
    x[maskable] = pred[maskable]
    return x[0, P:].tolist()

"""The published LLaDA generate loop, batched, used as the speed baseline: every step a full forward over the
whole canvas, full-vocabulary logits and softmax at every position, a fixed even transfer schedule."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def reference_generate(model, prompts: list[list[int]], gen_length: int, block_length: int, steps: int,
                       on_step=None) -> list[list[int]]:
    """prompts are left-padded with EOS into one batch (as the reference does); returns generated regions."""
    cfg = model.config
    mask_id, P = cfg.mask_id, max(len(p) for p in prompts)
    B = len(prompts)
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=model.device)
    attn = torch.ones_like(x)
    for i, p in enumerate(prompts):
        x[i, :P - len(p)] = cfg.pad_id
        attn[i, :P - len(p)] = 0
        x[i, P - len(p):P] = torch.tensor(p)
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        m = int((x[0, s:e] == mask_id).sum())
        base, rem = divmod(m, per_block)
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model.logits(x, attn)  # [B, L, V]
            if cfg.shift_logits:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            x0 = logits.argmax(-1)
            p = F.softmax(logits, dim=-1)
            conf = torch.gather(p, -1, x0[..., None])[..., 0]
            conf[:, e:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, -float("inf"))
            k = base + (1 if i < rem else 0)
            if k:
                idx = torch.topk(conf, k, dim=-1).indices
                x.scatter_(1, idx, x0.gather(1, idx))
            if on_step:
                on_step()
    return x[:, P:].tolist()

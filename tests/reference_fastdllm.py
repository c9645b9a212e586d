"""Plain Fast-dLLM loops (prefix / dual cache, threshold / factor parallel decoding), one sequence at a time.

The forward here is written from scratch over the model's weights with an explicit per-layer K/V cache (keys
stored after RoPE), independent of the engine's packing and paged pool:
- block start: a full forward over the canvas decodes AND fills the cache for every position;
- prefix: later steps run the block and the whole suffix; keys before the block come from the cache;
- dual: later steps run only the block; keys outside the block come from the cache;
- shifted families also run the position just before the block (its cached K/V is left as it was).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.reference_sampler import llada_transfer_counts, no_mask


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [L, H, D] rotate-half RoPE at positions pos [L]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    ang = pos.float()[:, None] * inv[None, :]  # [L, D/2]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def forward(model, tokens: list[int], q_pos: list[int], cache: list[list[torch.Tensor]] | None,
            keep_cached: set[int] = frozenset(), full_len: int | None = None):
    """Run positions q_pos (tokens at them). With cache=None: plain full self-attention over q_pos and returns a
    fresh cache. Otherwise keys/values at q_pos are refreshed in the cache (except positions in keep_cached)
    and queries attend over the whole cached canvas. Returns (final hidden [Lq, D], cache)."""
    net, cfg = model.net, model.config
    pos = torch.tensor(q_pos)
    x = net.embed(torch.tensor(tokens))
    new_cache = []
    for li, layer in enumerate(net.layers):
        a = layer.attn
        h = layer.attn_norm(x)
        if a.qkv_proj is not None:  # the loader fuses q/k/v into one GEMM (engine/model/fuse.py)
            hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            q, k, v = a.qkv_proj(h).split([hq, hkv, hkv], -1)
        else:
            q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        q = q.reshape(len(q_pos), cfg.num_heads, cfg.head_dim)
        k = k.reshape(len(q_pos), cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(len(q_pos), cfg.num_kv_heads, cfg.head_dim)
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
        if cache is None:
            K, V = k, v
            new_cache.append([k.clone(), v.clone()])
        else:
            K, V = cache[li]
            for j, p in enumerate(q_pos):
                if p not in keep_cached:
                    K[p], V[p] = k[j], v[j]
        rep = cfg.num_heads // cfg.num_kv_heads
        Kr, Vr = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)  # [Lk, H, D]
        scores = torch.einsum("qhd,khd->hqk", q.float(), Kr.float()) / cfg.head_dim ** 0.5
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), Vr.float()).to(x.dtype)
        x = x + a.o_proj(out.reshape(len(q_pos), -1))
        h = layer.mlp_norm(x)
        x = x + (layer.moe(h) if layer.moe is not None else layer.mlp(h))
    return net.norm(x), (new_cache if cache is None else cache)


def decode_step(logits: torch.Tensor, x: list[int], block: tuple[int, int], mask_id: int, k: int | None,
                threshold: float | None, factor: float | None, last: bool) -> int:
    """logits [block_len, V] for the block positions; commits into x in place; returns the number committed."""
    bs, be = block
    masked = [i for i in range(be - bs) if x[bs + i] == mask_id]
    if not masked:
        return 0
    p = F.softmax(logits, -1)
    x0 = no_mask(logits, mask_id).argmax(-1)
    conf = p.gather(-1, x0[:, None])[:, 0].double()
    conf_m = torch.full_like(conf, -float("inf"))
    conf_m[masked] = conf[masked]
    order = torch.argsort(conf_m, descending=True, stable=True).tolist()[:len(masked)]
    if last:
        chosen = masked
    elif threshold is not None:
        chosen = [order[0]] + [i for i in order[1:] if conf[i] >= threshold]
    elif factor is not None:
        n = max([j for j in range(1, len(order) + 1) if (j + 1) * (1 - float(conf[order[j - 1]])) < factor],
                default=1)
        chosen = order[:n]
    else:
        chosen = torch.topk(conf_m, k).indices.tolist() if k else []
    for i in chosen:
        x[bs + i] = int(x0[i])
    return len(chosen)


def fastdllm_generate(model, prompt: list[int], gen_length: int, block_length: int, steps: int, cache: str,
                      threshold: float | None = None, factor: float | None = None) -> tuple[list[int], int]:
    """Returns (generated region, number of steps)."""
    cfg = model.config
    mask_id, shift = cfg.mask_id, 1 if cfg.shift_logits else 0
    P = len(prompt)
    x = prompt + [mask_id] * gen_length
    L = len(x)
    nb = gen_length // block_length
    per_block = steps // nb
    total_steps = 0
    for b in range(nb):
        bs, be = P + b * block_length, P + (b + 1) * block_length
        counts = llada_transfer_counts(block_length, per_block)
        step, kv = 0, None
        while True:
            last = (threshold is not None or factor is not None) and step >= per_block - 1
            if step == 0 or cache == "none":
                hidden, kv = forward(model, x, list(range(L)), None)
                h = hidden[bs - shift:be - shift]
            else:
                qa = bs - shift
                qb = be if cache == "dual" else L
                hidden, kv = forward(model, x[qa:qb], list(range(qa, qb)), kv, keep_cached={bs - 1} if shift else set())
                h = hidden[:be - bs]
            logits = model.net.compute_logits(h)
            decode_step(logits, x, (bs, be), mask_id, counts[step] if step < len(counts) else 0, threshold, factor,
                        last)
            step += 1
            total_steps += 1
            if threshold is None and factor is None:
                if step >= per_block:
                    break
            elif mask_id not in x[bs:be]:
                break
    return x[P:], total_steps

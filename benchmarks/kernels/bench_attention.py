"""Paged flash attention (kernels/attention.py) vs the torch path (gather K/V out of the pool into a padded copy,
pad queries, SDPA), both through engine.model.attention.attention with the step's K/V write included, at LLaDA-8B
shapes (32 heads, MHA, head_dim 128): refresh passes (queries = the whole canvas) and block passes (32 queries
against a cached prefix), equal and mixed row lengths; plus RND1's GQA (32 query heads over 4 KV heads).

    python -m benchmarks.kernels.bench_attention [--smoke] [--out results.md]
"""
from __future__ import annotations

import random

import torch

from benchmarks.kernels.common import device, fmt, measure_ceilings, parser, table, time_ms
from engine.model.attention import AttnContext, KVPoolTensors, attention


def build(lens_q: list[int], lens_k: list[int], H: int, Hkv: int, D: int, page_size: int, dtype: torch.dtype,
          dev: torch.device) -> dict:
    """One layer's pool with shuffled pages; each row's queries are the last lens_q keys of its lens_k."""
    g = torch.Generator().manual_seed(0)
    pages = [-(-n // page_size) for n in lens_k]
    num_pages = sum(pages)
    slots = num_pages * page_size + 1
    scratch = slots - 1
    perm = torch.randperm(num_pages, generator=g)
    table_ = torch.zeros(len(lens_k), max(pages), dtype=torch.long)
    start = 0
    for b, n in enumerate(pages):
        table_[b, :n] = perm[start:start + n]
        start += n
    lk = max(lens_k)
    ar = torch.arange(lk)
    key_valid = ar[None, :] < torch.tensor(lens_k)[:, None]  # [B, Lk]
    read = torch.where(key_valid, table_[:, ar // page_size] * page_size + ar % page_size, scratch)  # [B, Lk]
    write = torch.cat([read[b, n - q:n] for b, (q, n) in enumerate(zip(lens_q, lens_k))])  # [T]
    pool = KVPoolTensors(k=[torch.randn(slots, Hkv, D, dtype=dtype, device=dev)],
                         v=[torch.randn(slots, Hkv, D, dtype=dtype, device=dev)])
    T = sum(lens_q)
    q, k, v = (torch.randn(T, h, D, dtype=dtype, device=dev) for h in (H, Hkv, Hkv))
    ref_ctx = AttnContext.from_lengths(lens_q, dev)
    ref_ctx.key_valid, ref_ctx.read_slots = key_valid.to(dev), read.to(dev)
    ref_ctx.write_slots, ref_ctx.kv_pool = write.to(dev), pool
    cu = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    tri_ctx = AttnContext(None, None, None, len(lens_q), max(lens_q), backend="triton", cu_seqlens_q=cu,
                          block_table=table_.to(dev, torch.int32), seq_lens_k=torch.tensor(lens_k, dtype=torch.int32,
                                                                                         device=dev),
                          page_size=page_size)
    tri_ctx.write_slots, tri_ctx.kv_pool = write.to(dev), pool
    return dict(q=q, k=k, v=v, ref=ref_ctx, tri=tri_ctx)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev, dtype = device(), getattr(torch, args.dtype)
    ceil = measure_ceilings(dev, args.smoke)
    rng = random.Random(0)
    if args.smoke:
        D = 32
        cases = [("refresh", [13, 29]), ("block", [(5, 61), (5, 37)]), ("gqa block", [(5, 61)])]
        heads = {"refresh": (4, 2), "block": (4, 2), "gqa block": (8, 1)}
    else:
        D = 128
        cases = [
            ("refresh B=1 L=1024", [1024]), ("refresh B=8 L=1024", [1024] * 8), ("refresh B=4 L=4096", [4096] * 4),
            ("refresh B=16 mixed 128..2048", [rng.randrange(128, 2049) for _ in range(16)]),
            ("block B=1 32/1024", [(32, 1024)]), ("block B=8 32/1024", [(32, 1024)] * 8),
            ("block B=64 32/1024", [(32, 1024)] * 64), ("block B=32 32/4096", [(32, 4096)] * 32),
            ("block B=64 mixed 32/(128..4096)", [(32, rng.randrange(128, 4097)) for _ in range(64)]),
            ("RND1 GQA block B=64 33/1024", [(33, 1024)] * 64), ("RND1 GQA refresh B=8 L=1024", [1024] * 8),
        ]
        heads = {name: (32, 4) if name.startswith("RND1") else (32, 32) for name, _ in cases}
    rows = []
    for name, spec in cases:
        H, Hkv = heads[name]
        if "refresh" in name:
            lens_q = lens_k = list(spec)
        else:
            lens_q, lens_k = [a for a, _ in spec], [b for _, b in spec]
        c = build(lens_q, lens_k, H, Hkv, D, 16, dtype, dev)
        scale = D ** -0.5
        run_ref = lambda: attention(c["q"], c["k"], c["v"], c["ref"], 0, scale)  # noqa: E731
        run_tri = lambda: attention(c["q"], c["k"], c["v"], c["tri"], 0, scale)  # noqa: E731
        diff = (run_ref().float() - run_tri().float()).abs().max().item()
        ms_ref, ms_tri = time_ms(run_ref, dev), time_ms(run_tri, dev)
        flops = 4 * sum(q * k for q, k in zip(lens_q, lens_k)) * H * D
        elem = c["q"].element_size()
        nbytes = elem * D * (2 * sum(lens_q) * H + 2 * sum(lens_k) * Hkv + 4 * sum(lens_q) * Hkv)
        tf, gb = flops / ms_tri / 1e9, nbytes / ms_tri / 1e6
        rows.append([f"{name} (H={H}, Hkv={Hkv})", fmt(ms_ref), fmt(ms_tri), fmt(ms_ref / ms_tri), fmt(tf), f"{100 * tf / ceil.tflops:.0f}%",
                     fmt(gb), f"{100 * gb / ceil.gbps:.0f}%", fmt(diff, 2)])
    table(f"attention ({args.dtype}, D={D}, page 16; ceilings {ceil.tflops:.0f} TFLOP/s, "
          f"{ceil.gbps:.0f} GB/s)",
          ["case", "torch ms", "triton ms", "speedup", "TFLOP/s", "of peak", "GB/s", "of peak", "max |diff|"],
          rows, args.out)


if __name__ == "__main__":
    main()

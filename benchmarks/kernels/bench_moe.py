"""Fused MoE (kernels/moe.py: device-side align + gated grouped GEMMs) vs the torch path (argsort, one GEMM pair
per expert, a host sync for the per-expert counts) at LLaDA-MoE (hidden 2048, 64 experts, top-8, width 1024, no
renormalisation) and RND1 (hidden 2048, 128 experts, top-8, width 768, renormalised) shapes, 1..4096 tokens.
Routing (the same softmax/top-k for both) is included in neither timing.

    python -m benchmarks.kernels.bench_moe [--smoke] [--out results.md]
"""
from __future__ import annotations

import torch

from benchmarks.kernels.common import device, fmt, measure_ceilings, parser, table, time_ms
from kernels.moe import fused_moe, fused_moe_triton, route

MODELS = {"LLaDA-MoE": (2048, 64, 8, 1024, False), "RND1": (2048, 128, 8, 768, True)}
TOKENS = (1, 8, 32, 128, 512, 1024, 4096)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev, dtype = device(), getattr(torch, args.dtype)
    ceil = measure_ceilings(dev, args.smoke)
    models = {"tiny": (64, 8, 2, 32, False), "tiny-renorm": (64, 16, 4, 48, True)} if args.smoke else MODELS
    tokens = (1, 7) if args.smoke else TOKENS
    rows = []
    for name, (D, E, k, inter, renorm) in models.items():
        g = torch.Generator(device=dev).manual_seed(0)
        w_gate = (torch.randn(E, inter, D, device=dev, generator=g) / D ** 0.5).to(dtype)
        w_up = (torch.randn(E, inter, D, device=dev, generator=g) / D ** 0.5).to(dtype)
        w_down = (torch.randn(E, D, inter, device=dev, generator=g) / inter ** 0.5).to(dtype)
        router = torch.randn(D, E, device=dev, generator=g) / D ** 0.5
        for T in tokens:
            x = torch.randn(T, D, device=dev, generator=g).to(dtype)
            weights, ids = route(x.float() @ router, k, renorm)
            weights = weights.to(dtype)
            run_ref = lambda: fused_moe(x, w_gate, w_up, w_down, weights, ids)  # noqa: E731
            run_tri = lambda: fused_moe_triton(x, w_gate, w_up, w_down, weights, ids)  # noqa: E731
            diff = (run_ref().float() - run_tri().float()).abs().max().item()
            ms_ref, ms_tri = time_ms(run_ref, dev), time_ms(run_tri, dev)
            used = int(torch.unique(ids).numel())
            flops = 6 * T * k * D * inter
            nbytes = x.element_size() * (3 * used * inter * D + 2 * T * D + 2 * T * k * (inter + D))
            tf, gb = flops / ms_tri / 1e9, nbytes / ms_tri / 1e6
            rows.append([name, str(T), str(used), fmt(ms_ref), fmt(ms_tri), fmt(ms_ref / ms_tri), fmt(tf),
                         f"{100 * tf / ceil.tflops:.0f}%", fmt(gb), f"{100 * gb / ceil.gbps:.0f}%", fmt(diff, 2)])
    table(f"fused MoE ({args.dtype}; ceilings {ceil.tflops:.0f} TFLOP/s, {ceil.gbps:.0f} GB/s)",
          ["model", "tokens", "experts hit", "torch ms", "triton ms", "speedup", "TFLOP/s", "of peak", "GB/s",
           "of peak", "max |diff|"], rows, args.out)


if __name__ == "__main__":
    main()

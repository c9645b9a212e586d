"""Fused vocabulary pass (kernels/vocab.py: x0 with Gumbel noise, p(x0), margin, entropy in one read of the
logits) vs the torch decoders' candidates() (full softmaxes over [N, V]) at LLaDA's vocabulary (126464), for
greedy and sampled rows with entropy scoring.

    python -m benchmarks.kernels.bench_vocab [--smoke] [--out results.md]
"""
from __future__ import annotations

import torch

from benchmarks.kernels.common import device, fmt, measure_ceilings, parser, table, time_ms
from engine.decoding.candidates import CandidateInputs, candidates


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = device()
    ceil = measure_ceilings(dev, args.smoke)
    V = 211 if args.smoke else 126464
    rows = []
    for N in ((3, 17) if args.smoke else (32, 256, 1024, 4096)):
        logits = torch.randn(N, V, device=dev) * 3  # [N, V] fp32, as compute_logits returns
        keys = torch.randint(-2 ** 62, 2 ** 62, (N,), device=dev)
        for mode, temp in (("greedy", 0.0), ("sampled", 0.7)):
            def inp(backend: str) -> CandidateInputs:
                return CandidateInputs(torch.full((N,), temp, device=dev), torch.zeros(N, dtype=torch.long, device=dev),
                                       torch.ones(N, device=dev), torch.full((N,), 3, device=dev),
                                       torch.zeros(N, dtype=torch.bool, device=dev), keys, 5, temp > 0, False,
                                       frozenset({3}), False, backend)
            ref, tri = inp("torch"), inp("triton")
            same = bool((candidates(logits, ref)[0] == candidates(logits, tri)[0]).all())
            ms_ref = time_ms(lambda: candidates(logits, ref), dev)
            ms_tri = time_ms(lambda: candidates(logits, tri), dev)
            gb = logits.numel() * 4 / ms_tri / 1e6
            rows.append([str(N), mode, fmt(ms_ref), fmt(ms_tri), fmt(ms_ref / ms_tri), fmt(gb),
                         f"{100 * gb / ceil.gbps:.0f}%", "yes" if same else "NO"])
    table(f"vocabulary pass (V={V}, entropy scores; copy ceiling {ceil.gbps:.0f} GB/s)",
          ["positions", "rows", "torch ms", "triton ms", "speedup", "GB/s", "of peak", "same x0"], rows, args.out)


if __name__ == "__main__":
    main()

"""bfloat16 attention on AVX512-BF16 CPUs (bidirectional, or block-causal by a limit on each query's keys):
engine/model/attention_avx512.c, built with the CPU's other C kernels (engine/model/cpu_kernel.py).

Why: at the engine's step sizes torch's CPU flash-attention kernel for bf16 runs far below the core's bf16 rate
(measured on an AVX512-BF16 EPYC, one thread, [1, 16 heads, 128, 64]: 1.03 ms, 65 GFLOP/s, about 12% of a
no-cache LLaDA step at d1024), while the two products are small dense GEMMs. The C kernel packs each head's keys
and values once, multiplies with VDPBF16PS (32 bf16 products an instruction, float32 sums) and does the softmax in
float32 in registers: 0.23 ms for the same call (4.5x).

Its arithmetic is torch's flash kernel's at one key block (scores and softmax in float32, probabilities rounded to
bf16 for the value product, the sum of the unrounded ones dividing the output); its error against a float32
reference is SDPA-bf16's (tests/test_attention_cpu.py). Each (row, head, query) is one fixed sequence of
operations over its own keys, so a query's output does not depend on what it is batched with (the engine's batch
invariance), nor on how the heads are split over threads.

`cpu_attention(q, k, v, key_valid, scale)` -> the output, or None where the kernel does not apply (not bf16, not
on the CPU, autograd, a head dim that is not a multiple of 16 or above 256, a CPU without AVX512-BF16, no C
compiler, UNMASK_CPU_KERNELS=0): the caller then runs SDPA. Block-causal attention (LLaDA2, SDAR) runs in it too
when the keys are canvas positions 0..Lk-1 (the runner's attention groups): each query's block end is a limit on
its keys.

With more than one torch thread the heads are split over a small thread pool (ctypes drops the GIL during the
call). On this 2-vCPU VM (SMT siblings) a no-cache step with two threads measured the same as SDPA's within the
noise (63.5-72 ms against 68-75 ms); with one thread, the usual CPU setting here, it is the 4.5x above.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os

import torch

from . import cpu_kernel


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether cpu_attention runs for these operands (dtype, device, head dim, CPU, kernel built)."""
    D = q.shape[-1]
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu" and D % 16 == 0
            and D <= 256 and not (torch.is_grad_enabled() and q.requires_grad) and cpu_kernel.bf16_dot())


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
                  scale: float, q_limit: torch.Tensor | None = None) -> torch.Tensor | None:
    """q [G, Lq, H, D], k/v [G, Lk, Hkv, D] bf16 (any row strides; each row's heads and dims contiguous), key_valid
    [G, Lk] bool or None (all keys) -> softmax(scale * q k^T) v [G, Lq, H, D] bf16; None if the kernel does not
    apply. q_limit [G, Lq] (integers) or None: query i of row b sees only keys j < q_limit[b, i] (block-causal
    attention, keys at canvas positions 0..Lk-1); a query that sees no key gets zeros. Heads are split over torch's
    intra-op thread count."""
    if not applies(q, k, v):
        return None
    lib = cpu_kernel._library()
    G, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    assert H % Hkv == 0 and k.shape == v.shape and k.shape[0] == G and v.shape[-1] == D
    q, k, v = (_heads_dense(x) for x in (q, k, v))
    out = torch.empty(G, Lq, H, D, dtype=torch.bfloat16)  # [G, Lq, H, D]
    valid = None if key_valid is None else key_valid.contiguous().view(torch.uint8)  # [G, Lk] (bool: one byte)
    limit = None if q_limit is None else q_limit.to(torch.int32).contiguous()  # [G, Lq] (int32 from bind: no copy)
    assert limit is None or limit.shape == (G, Lq)

    def run(h0: int, h1: int) -> int:
        return lib.attn_bf16(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                             v.data_ptr(), v.stride(0), v.stride(1), None if valid is None else valid.data_ptr(),
                             None if limit is None else limit.data_ptr(), G, Lq, Lk, H, Hkv, D, scale, h0, h1,
                             out.data_ptr())

    parts = _splits(H, Hkv, torch.get_num_threads())
    if len(parts) == 1:
        rcs = [run(0, H)]
    else:  # ctypes drops the GIL for the call: the pool's threads run their heads in parallel with this one
        futures = [_pool(len(parts) - 1, os.getpid()).submit(run, *hs) for hs in parts[1:]]
        rcs = [run(*parts[0])] + [f.result() for f in futures]
    if any(rcs):
        raise MemoryError("attention_avx512.c: no scratch memory")
    return out


def _heads_dense(x: torch.Tensor) -> torch.Tensor:
    """x [G, L, H, D] with each row's [H, D] contiguous (the kernel's layout), copied only when it is not."""
    H, D = x.shape[2], x.shape[3]
    if x.stride(3) == 1 and (x.stride(2) == D or H == 1):
        return x
    return x.contiguous()


def _splits(H: int, Hkv: int, threads: int) -> list[tuple[int, int]]:
    """Head ranges for `threads` workers, cut at kv-head boundaries (each worker packs its own kv heads once)."""
    per_kv = H // Hkv
    n = max(1, min(threads, Hkv if Hkv > 1 else H))
    unit = per_kv if Hkv > 1 else 1
    units = H // unit
    cuts = [round(i * units / n) * unit for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


@functools.cache
def _pool(workers: int, pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads, per process (a forked child gets its own: the parent's threads are not in it)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="unmask-attn")

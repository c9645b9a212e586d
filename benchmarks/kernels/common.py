"""Timing, the card's measured ceilings and markdown rows shared by the kernel benchmarks.

Every benchmark times the Triton kernel and its torch baseline in the same process on the same inputs and reports
the ratio; TFLOP/s and GB/s are set against the ceilings this card reaches on a large bf16 matmul and a large copy.
`--smoke` shrinks every shape so the scripts also run on CPU under TRITON_INTERPRET=1 (numbers meaningless there;
the point is that the script is exercised).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / interpreter check)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out", help="append the markdown table to this file")
    return p


def time_ms(fn: Callable[[], object], dev: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds per call (CUDA events on GPU, wall clock on CPU)."""
    if dev.type != "cuda":
        reps, warmup = min(reps, 2), 1
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


@dataclass
class Ceilings:
    tflops: float
    """bf16 dense matmul TFLOP/s measured on this card."""
    gbps: float
    """device-to-device copy GB/s (read + write) measured on this card."""


def measure_ceilings(dev: torch.device, smoke: bool) -> Ceilings:
    n = 512 if smoke or dev.type != "cuda" else 8192
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    ms = time_ms(lambda: a @ b, dev)
    x = torch.empty((1 << 20) if smoke or dev.type != "cuda" else (1 << 30), dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms_copy = time_ms(lambda: y.copy_(x), dev)
    return Ceilings(tflops=2 * n ** 3 / ms / 1e9, gbps=2 * x.numel() / ms_copy / 1e6)


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"


def table(title: str, header: list[str], rows: list[list[str]], out: str | None) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")
    return text


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"

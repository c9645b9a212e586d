"""One host-to-device copy per step for everything the host knows about the step.

The runner describes a step (query ranges, block positions, per-row counts, schedule values) in small host tensors.
`StepUpload` packs them into one int64 buffer (bool and int32 widened, float64 bit-cast), sends it with a single
non_blocking copy from pinned memory (on CUDA) and hands back device views with the original dtypes and shapes.
Two pinned buffers alternate; before one is refilled, the event recorded after its last copy is waited on, so a
copy still in flight is never overwritten (the wait is on that copy only, not on the step's compute).

The runner (ModelRunner._plan) sends each step's host-known layout through one `send`.
"""
from __future__ import annotations

import torch

_WIDE = torch.int64


class StepUpload:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._host: list[torch.Tensor] = [torch.empty(0, dtype=_WIDE), torch.empty(0, dtype=_WIDE)]
        self._events: list["torch.cuda.Event | None"] = [None, None]
        self._turn = 0
        self.copies = 0
        """Host-to-device copies made (one per send)."""

    def send(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors (int64/int32/bool/float64, any shape) -> the same on the device, in one copy."""
        flat, layout = [], []
        for name, t in parts.items():
            assert t.device.type == "cpu", name
            if t.dtype == torch.float64:
                w = t.reshape(-1).view(_WIDE)
            else:
                assert t.dtype in (torch.int64, torch.int32, torch.bool), f"{name}: {t.dtype}"
                w = t.reshape(-1).to(_WIDE)
            flat.append(w)
            layout.append((name, t.dtype, tuple(t.shape), w.numel()))
        n = sum(w.numel() for w in flat)
        host = self._buffer(n)
        torch.cat(flat, out=host) if flat else None
        if self.cuda:
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events[self._turn] = event
            self._turn ^= 1
        else:
            dev = host if self.device.type == "cpu" else host.to(self.device)
        self.copies += 1
        out, start = {}, 0
        for name, dtype, shape, size in layout:
            seg = dev[start:start + size]
            start += size
            if dtype == torch.float64:
                seg = seg.view(torch.float64)
            elif dtype != _WIDE:
                seg = seg.to(dtype)
            out[name] = seg.view(shape)
        return out

    def _buffer(self, n: int) -> torch.Tensor:
        if not self.cuda:
            return torch.empty(n, dtype=_WIDE)
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()  # this buffer's previous copy has finished reading it
        host = self._host[self._turn]
        if host.numel() < n:
            host = torch.empty(max(n, 2 * host.numel(), 4096), dtype=_WIDE, pin_memory=True)
            self._host[self._turn] = host
        return host[:n]

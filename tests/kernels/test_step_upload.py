"""StepUpload: a step's host metadata goes to the device as one buffer, and comes back with its dtypes/shapes.

(Not yet wired into the runner: see engine/step_upload.py.)"""
from __future__ import annotations

import math

import torch

from engine.step_upload import StepUpload
from tests.kernels.tolerance import DEVICE


def test_round_trip_keeps_values_dtypes_and_shapes():
    g = torch.Generator().manual_seed(0)
    parts = {
        "idx": torch.randint(-2 ** 40, 2 ** 40, (13,), generator=g),
        "cu": torch.tensor([0, 5, 9, 31], dtype=torch.int32),
        "valid": torch.rand(3, 7, generator=g) < 0.5,
        "origin": torch.tensor([0.25, math.nan, -1e-300, math.inf], dtype=torch.float64),
        "empty": torch.zeros(0, dtype=torch.long),
    }
    up = StepUpload(DEVICE)
    for _ in range(3):  # buffers are reused across steps
        out = up.send(parts)
        for name, want in parts.items():
            got = out[name]
            assert got.device.type == DEVICE.type and got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.cpu(), want) or (want.dtype == torch.float64 and torch.equal(
                got.cpu().view(torch.int64), want.view(torch.int64))), name
    assert up.copies == 3

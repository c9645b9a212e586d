"""StepUpload: a step's host metadata goes to the device as one buffer, and comes back with its dtypes/shapes."""
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


def test_engine_sends_one_upload_per_step(make_checkpoint):
    """The runner's host metadata for a step (query layout, decoded positions, schedule values) is one send."""
    from engine import LLM, SamplingParams
    llm = LLM(make_checkpoint("dream"), page_size=4)
    runner = llm.engine.runner
    calls, step = 0, runner.step

    def counting(reqs):
        nonlocal calls
        calls += 1
        return step(reqs)

    runner.step = counting
    before = runner.upload.copies
    llm.generate([[5, 9, 2], [7, 1, 4, 4, 8, 3]], SamplingParams(max_tokens=8, steps=4, block_length=4, cache="dual",
                                                                 cfg_scale=0.5, seed=1))
    assert calls > 0 and runner.upload.copies - before == calls

"""Backend choice: argument > UNMASK_KERNELS > auto; triton never silently becomes torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.dispatch import KernelBackendError, resolve_kernels

ROOT = Path(__file__).resolve().parents[2]


def test_auto_is_torch_on_cpu_and_explicit_choices_hold(monkeypatch):
    monkeypatch.delenv("UNMASK_KERNELS", raising=False)
    assert resolve_kernels(None, "cpu") == "torch"
    assert resolve_kernels("auto", "cpu") == "torch"
    assert resolve_kernels("torch", "cpu") == "torch"
    if torch.cuda.is_available():
        assert resolve_kernels("auto", "cuda") == "triton"
    else:  # the test session runs the interpreter
        assert resolve_kernels("triton", "cpu") == "triton"


def test_env_overrides_the_default_but_not_the_argument(monkeypatch):
    monkeypatch.setenv("UNMASK_KERNELS", "torch")
    assert resolve_kernels(None, "cpu") == "torch"
    monkeypatch.setenv("UNMASK_KERNELS", "TRITON")
    expected = "triton"
    assert resolve_kernels(None, "cuda" if torch.cuda.is_available() else "cpu") == expected
    assert resolve_kernels("torch", "cpu") == "torch"


def test_bad_choices_name_their_source(monkeypatch):
    monkeypatch.setenv("UNMASK_KERNELS", "cuda")
    with pytest.raises(KernelBackendError, match=r"UNMASK_KERNELS: must be one of auto, triton, torch, got 'cuda'"):
        resolve_kernels(None, "cpu")
    with pytest.raises(KernelBackendError, match=r"^kernels: must be one of"):
        resolve_kernels("fast", "cpu")


def test_triton_on_cpu_without_the_interpreter_is_an_error_not_a_fallback():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UNMASK_KERNELS")}
    r = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "sort 3 1 2", "--kernels", "triton"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert "kernels=triton on cpu: needs the Triton interpreter; set TRITON_INTERPRET=1" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_rejects_an_unknown_kernels_value():
    r = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "x", "--kernels", "cuda"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "--kernels: invalid choice: 'cuda'" in r.stderr

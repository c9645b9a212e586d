"""dtype="auto": bf16 on CPUs with native bf16 (else float32); on other devices the checkpoint's torch_dtype."""
from __future__ import annotations

import json

import pytest
import torch

from engine import loader
from engine.loader import checkpoint_dtype, resolve_dtype


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_native_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(loader, "cpu_supports_bfloat16", lambda: native)
    assert resolve_dtype("auto", torch.device("cpu"), "float16") == expected


@pytest.mark.parametrize("ckpt, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                            ("float32", torch.float32), (None, torch.float32)])
def test_auto_elsewhere_takes_the_checkpoint_dtype(ckpt, expected):
    assert resolve_dtype("auto", torch.device("meta"), ckpt) == expected


def test_checkpoint_dtype_reads_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text("not json")
    assert checkpoint_dtype(tmp_path) is None


def test_llm_default_is_auto(make_checkpoint, monkeypatch):
    from engine import LLM
    monkeypatch.setattr(loader, "cpu_supports_bfloat16", lambda: True)
    llm = LLM(make_checkpoint("llada"), kv_cache_memory=1 << 20)
    assert llm.model.dtype == torch.bfloat16
    monkeypatch.setattr(loader, "cpu_supports_bfloat16", lambda: False)
    assert LLM(make_checkpoint("llada"), kv_cache_memory=1 << 20).model.dtype == torch.float32

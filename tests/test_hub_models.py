"""Hugging Face repo ids as model references (engine/hub.py): `LLM("org/name")`, `unmask generate --model org/name`
and `unmask serve org/name` resolve through huggingface_hub's cache. The cache here is made by hand in the
layout huggingface_hub documents (models--org--name/snapshots/<commit>/..., refs/main) around a tiny random
checkpoint, and HF_HUB_OFFLINE=1: no test touches the network."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine import LLM, SamplingParams
from engine.errors import CheckpointError
from engine.hub import is_repo_id, resolve_model_path
from tests.server.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-llada"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, make_checkpoint) -> Path:
    src = make_checkpoint("llada")
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return hf_home


def _env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_repo_id_shapes():
    assert is_repo_id("GSAI-ML/LLaDA-8B-Instruct") and is_repo_id("org/name@v1.0")
    for ref in ("/abs/path", "./rel", "a/b/c", "name", "../x", "org/..", "org/name@bad rev"):
        assert not is_repo_id(ref), ref


def test_a_local_directory_wins_over_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == Path("org/name")


def test_llm_loads_a_cached_repo_id_offline(offline_cache, make_checkpoint):
    snap = resolve_model_path(REPO)
    assert snap == offline_cache / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT
    params = SamplingParams(max_tokens=8, steps=8, seed=3, temperature=0.5)
    by_id = LLM(REPO).generate([[5, 6, 7]], params)[0]
    by_dir = LLM(make_checkpoint("llada")).generate([[5, 6, 7]], params)[0]
    assert by_id.token_ids == by_dir.token_ids


def test_offline_and_not_cached_names_the_repo(offline_cache):
    with pytest.raises(CheckpointError, match=r"'tiny-org/absent'.*not in the local cache.*HF_HUB_OFFLINE"):
        LLM("tiny-org/absent")


@pytest.mark.slow
def test_cli_generate_and_missing_repo(hf_home, make_checkpoint):
    run = lambda *a: subprocess.run([sys.executable, "-m", "engine.cli", "generate", *a], cwd=ROOT,  # noqa: E731
                                    env=_env(hf_home), capture_output=True, text=True, timeout=300)
    by_id = run("--model", REPO, "hello", "--max-tokens", "8", "--steps", "8")
    by_dir = run("--model", str(make_checkpoint("llada")), "hello", "--max-tokens", "8", "--steps", "8")
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_dir.stdout
    missing = run("--model", "tiny-org/absent", "hello")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "tiny-org/absent" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr


@pytest.mark.slow
def test_serve_takes_the_repo_id_as_a_positional_argument(hf_home):
    proc = ServeProcess(REPO, env={k: v for k, v in _env(hf_home).items() if k.startswith("HF_")})
    try:
        models = httpx.get(proc.url + "/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [REPO]
        r = httpx.post(proc.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 4, "steps": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.stop()

"""benchmarks/serve.py's random dataset against the default server (`unmask serve`, the bundled model, default
flags): prompts are drawn from the served vocabulary, so every request succeeds; a run where every request fails
(ids outside the vocabulary) exits non-zero."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from benchmarks import serve
from tests.server.serve_process import ROOT, ServeProcess


@pytest.fixture(scope="module")
def default_server():
    proc = ServeProcess()
    yield proc
    proc.stop()


def _bench(url: str, out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.serve", "--base-url", url, "--dataset-name", "random",
                           "--num-prompts", "6", "--random-input-len", "16", "--random-output-len", "8",
                           "--steps", "8", "--no-progress", "--result-file", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_served_token_ids_are_the_vocabulary_without_special_ids(default_server):
    card = httpx.get(default_server.url + "/v1/models", timeout=30).json()["data"][0]
    from unmask_client.types import ModelCard
    ids = serve.served_token_ids(ModelCard(**card))
    special = card["special_tokens"]
    assert card["vocab_size"] > 0 and max(ids) < card["vocab_size"]
    assert special["mask_token_id"] not in ids and special["eos_token_id"] not in ids
    assert len(ids) >= card["vocab_size"] - 2 - len(special["stop_token_ids"])


@pytest.mark.slow
def test_random_dataset_runs_against_the_default_server(default_server, tmp_path):
    ok = _bench(default_server.url, tmp_path / "ok.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    saved = json.loads((tmp_path / "ok.json").read_text())
    assert saved["completed"] == 6 and saved["failed"] == 0
    bad = _bench(default_server.url, tmp_path / "bad.json", "--random-token-range", "100", "1000")
    assert bad.returncode == 1 and "every request failed" in bad.stderr
    assert json.loads((tmp_path / "bad.json").read_text())["completed"] == 0

"""`unmask generate --tensor-parallel-size 2` (workers spawned by the engine) and the same command under torchrun
(env:// rendezvous, one process per rank, as on several nodes) print what one process prints; bad parallel flags
are one clear line; the bundled trained model keeps its accuracy at TP=2. Starts processes: marked slow."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
GEN = ("--max-tokens", "8", "--steps", "8", "--block-length", "4", "--ignore-eos", "--raw", "--cache", "dual", "--seed", "1", "--dtype", "float32")


def run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return str(make_checkpoint("dream"))


@pytest.fixture(scope="module")
def expected(ckpt):
    llm = LLM(ckpt, dtype="float32")
    return llm.generate(["hello world"], SamplingParams(max_tokens=8, steps=8, block_length=4, ignore_eos=True,
                                                        cache="dual", seed=1))[0].text


def test_generate_tensor_parallel_matches_one_process(ckpt, expected):
    r = run("-m", "engine.cli", "generate", "hello world", "--model", ckpt, *GEN, "--tensor-parallel-size", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected


def test_torchrun_env_rendezvous(ckpt, expected):
    r = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "engine.cli", "generate",
            "hello world", "--model", ckpt, *GEN, "--tensor-parallel-size", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected  # only rank 0 prints


@pytest.mark.parametrize("flags, message", [
    (("--tensor-parallel-size", "4"), "tensor_parallel_size 4 must divide the number of attention heads (6)"),
    (("--tensor-parallel-size", "0"), "tensor_parallel_size must be an integer >= 1"),
    (("--tensor-parallel-size", "2", "--parallel-timeout", "0"), "parallel timeout must be > 0"),
])
def test_bad_parallel_flags_are_one_line(ckpt, flags, message, capsys):
    from engine.cli import main
    with pytest.raises(SystemExit) as info:  # rejected before any worker process starts
        main(["generate", "hi", "--model", ckpt, *GEN, *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("unmask: error: ") and message in err


def test_bundled_model_accuracy_unchanged_at_tp2():
    from engine.bundled import DEFAULT_MODEL_DIR, task
    problems = task.make_problems(60, seed=2024, split="held_out")
    msgs = [task.messages_for(q) for q, _ in problems]
    one = LLM(DEFAULT_MODEL_DIR, max_num_seqs=60, dtype="float32")
    with LLM(DEFAULT_MODEL_DIR, max_num_seqs=60, tensor_parallel_size=2, dtype="float32") as tp:
        for params in (SamplingParams(remasking="low_confidence"), SamplingParams(cache="dual", threshold=0.9)):
            a, b = tp.chat(msgs, params), one.chat(msgs, params)
            acc_tp = sum(task.check(q, o.text) for (q, _), o in zip(problems, a)) / len(problems)
            acc_one = sum(task.check(q, o.text) for (q, _), o in zip(problems, b)) / len(problems)
            assert [o.token_ids for o in a] == [o.token_ids for o in b]
            assert acc_tp == acc_one >= 0.9

"""`unmask generate` as a user runs it: a subprocess, stdout is the completion, bad input is one clear line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def unmask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return str(make_checkpoint("llada"))


def test_generate_prints_the_completion_matching_the_api(ckpt):
    from engine import LLM, SamplingParams
    r = unmask("generate", "hello world", "--model", ckpt, "--max-tokens", "8", "--steps", "8", "--block-length",
               "4", "--ignore-eos", "--raw")
    assert r.returncode == 0, r.stderr
    llm = LLM(ckpt)
    expected = llm.generate(["hello world"], SamplingParams(max_tokens=8, steps=8, block_length=4,
                                                            ignore_eos=True))[0]
    assert r.stdout.rstrip("\n") == expected.text


def test_show_steps_prints_the_canvas_unmasking(ckpt):
    r = unmask("generate", "hi", "--model", ckpt, "--max-tokens", "6", "--steps", "6", "--block-length", "3",
               "--show-steps", "--ignore-eos", "--stats")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("step")]
    assert len(lines) == 6
    assert [l.count("░") for l in lines] == [5, 4, 3, 2, 1, 0]
    assert "forward_passes=6" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--model", "/no/such/dir"], "/no/such/dir"),
    (["--steps", "0"], "--steps"),
    (["--remasking", "best"], "--remasking"),
    (["--cache", "paged"], "--cache"),
    (["--dtype", "float8"], "dtype"),
])
def test_bad_input_is_one_clear_line(ckpt, args, needle):
    full = ["generate", "hi", *(["--model", ckpt] if "--model" not in args else []), *args]
    r = unmask(*full)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_text_prompt_without_tokenizer_is_refused_clearly(make_checkpoint):
    d = make_checkpoint("llada", tokenizer=False, vocab_size=101)
    r = unmask("generate", "hi", "--model", str(d))
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
    ok = unmask("generate", "1 2 3", "--token-ids", "--model", str(d), "--max-tokens", "4", "--steps", "4")
    assert ok.returncode == 0, ok.stderr

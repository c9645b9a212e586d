"""The bundled model's synthetic task: checkable digit problems asked in chat form.

Two operations over space-separated digits, each with a unique exact answer:

    sort 3 1 4 1 5     ->  1 1 3 4 5      (2..8 digits, ascending)
    reverse 3 1 4 1 5  ->  5 1 4 1 3      (2..8 digits)

Problems are split into train and held-out by a stable hash of the question text, so no held-out question is
ever produced for training (`make_problems(..., split="train")` rejects them).
"""
from __future__ import annotations

import hashlib
import random

OPS = ("sort", "reverse")
MIN_DIGITS, MAX_DIGITS = 2, 8
"""Length range of the sort / reverse digit lists."""
HELD_OUT_EVERY = 8
"""One question in HELD_OUT_EVERY (by hash) belongs to the held-out split."""
SPLITS = ("train", "held_out")


def split_of(question: str) -> str:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "held_out" if h % HELD_OUT_EVERY == 0 else "train"


def solve(question: str) -> str:
    """The exact expected answer text of a question."""
    op, *args = question.split()
    if op == "sort":
        return " ".join(sorted(args))
    if op == "reverse":
        return " ".join(reversed(args))
    raise ValueError(f"unknown operation {op!r} in question {question!r}")


def make_problem(rng: random.Random) -> tuple[str, str]:
    """A random (question, answer) pair from either split."""
    op = rng.choice(OPS)
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
    question = f"{op} {' '.join(digits)}"
    return question, solve(question)


def make_problems(n: int, seed: int, split: str) -> list[tuple[str, str]]:
    """n (question, answer) pairs from one split, deterministic in (n, seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{split}:{seed}")
    out: list[tuple[str, str]] = []
    while len(out) < n:
        q, a = make_problem(rng)
        if split_of(q) == split:
            out.append((q, a))
    return out


def check(question: str, completion: str) -> bool:
    """Whether a completion's text (special tokens already removed) is exactly the answer, after stripping."""
    return completion.strip() == solve(question)


def messages_for(question: str) -> list[dict[str, str]]:
    """The chat messages that ask a question (one user turn, no system prompt)."""
    return [{"role": "user", "content": question}]

"""Request limits: what one HTTP request may ask for, checked before any engine memory is committed.

    limits = RequestLimits(max_n=8).resolve(max_model_len=512)
    limits.check_fields(req)                 # APIError(400, param="n") for n=9, before tokenizing
    limits.check_prompt_tokens(len(ids), "prompt")

Every limit is an `unmask serve` flag (add_limit_flags). A limit left at None takes a default derived from the
model, chosen so that the defaults never refuse a request the model's context and the KV pool could serve:
- prompt tokens: the context minus one (at least one position must be generated);
- max_tokens: the context minus one;
- messages: the context (every chat template renders at least one token per message, its role header);
- steps: the engine's own bound (one step per generated token at most is useful; the engine caps it at 16384).
Fairness (one request must not hold the engine for long while others wait):
- denoising steps per request, summed over its choices (prompts x n x the steps one choice can take, from its
  resolved plan: engine/sampling_params.step_budget): 65536 (--max-request-steps), e.g. n=128 with 512 steps, or
  n=4 with the largest steps; a request over it is refused (400, param `steps`);
- batch slots per request: at most half of --max-num-seqs of one request's choices run at once
  (--max-request-slots); the rest start as those finish, so a new request always finds a free slot.
The others are fixed: n (128, OpenAI's own limit), stop strings (16 of at most 256 characters, the engine's caps),
and, in ServerConfig, the body size (--max-body-bytes, 32 MiB, 413) and the waiting queue (--max-queue, 1000,
503 with Retry-After).
Checks run in order of cost: body size (before reading it), field counts and a bound on prompt characters (before
tokenizing), prompt tokens (after tokenizing, before the engine), queue length (just before submitting).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import MAX_STEPS, MAX_STOP_LENGTH, MAX_STOP_STRINGS

from .errors import bad_request

MAX_N = 128
"""OpenAI's documented maximum for `n`."""
PROMPT_CHARS_SLACK = 4
"""Text prompts longer than max_prompt_tokens x (longest token's characters) x this are refused untokenized."""
MAX_REQUEST_STEPS = 4 * MAX_STEPS
"""Denoising steps per request, summed over its choices (65536)."""
MAX_STOP_CHARS = MAX_STOP_LENGTH
"""The engine's caps (engine.sampling_params) are the defaults; a flag above them is moot (the engine refuses)."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_messages: int | None = None
    """Chat messages per request. None: the model's context length."""
    max_prompt_tokens: int | None = None
    """Prompt tokens (after the chat template). None: the context minus one."""
    max_tokens: int | None = None
    """Generation length (max_tokens / max_completion_tokens). None: the context minus one."""
    max_n: int = MAX_N
    """Choices per prompt (`n`)."""
    max_choices: int | None = None
    """Prompts x n per request. None: max_n x 16 (a completions request may carry several prompts)."""
    max_steps: int = MAX_STEPS
    """Denoising steps per request."""
    max_stop: int = MAX_STOP_STRINGS
    """Stop strings per request."""
    max_stop_chars: int = MAX_STOP_CHARS
    """Characters per stop string."""
    max_request_steps: int = MAX_REQUEST_STEPS
    """Denoising steps per request summed over its choices (prompts x n x steps)."""
    max_request_slots: int | None = None
    """Choices of one request in the running batch at once. None: half of the engine's max_num_seqs."""
    context: int | None = None
    """The model's context length, set by resolve() (named in the errors of the limits derived from it)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")

    def resolve(self, max_model_len: int) -> "RequestLimits":
        """The limits with every None replaced by its model-derived default."""
        ctx = max(max_model_len, 2)
        return dataclasses.replace(
            self, max_messages=self.max_messages or ctx, max_prompt_tokens=self.max_prompt_tokens or ctx - 1,
            max_tokens=self.max_tokens or ctx - 1, max_choices=self.max_choices or self.max_n * 16, context=ctx)

    def request_slots(self, max_num_seqs: int | None) -> int | None:
        """Choices of one request in the engine at once: the flag, else half the running batch (None: no cap)."""
        if self.max_request_slots is not None:
            return self.max_request_slots
        return max(1, max_num_seqs // 2) if max_num_seqs else None

    def check_work(self, choices: int, steps: int) -> None:
        """Total denoising steps of a request (choices x steps, the steps resolved against the defaults)."""
        if choices * steps > self.max_request_steps:
            raise bad_request(f"{choices} choice{'s' if choices > 1 else ''} x {steps} steps = {choices * steps} "
                              f"denoising steps; this server allows at most {self.max_request_steps} per request "
                              f"(fewer steps or a smaller n; unmask serve --max-request-steps)", "steps")

    # checks, cheapest first --------------------------------------------------------------------------------
    def check_fields(self, req: Any) -> None:
        """Counts and sizes readable from the parsed body: no tokenization, no engine call."""
        n = getattr(req, "n", 1)
        if n > self.max_n:
            raise bad_request(f"n is {n}; this server allows at most {self.max_n} choices per prompt "
                              f"(unmask serve --max-n)", "n")
        prompts = getattr(req, "prompt", None)
        if isinstance(prompts, list) and self.max_choices is not None and len(prompts) * n > self.max_choices:
            raise bad_request(f"{len(prompts)} prompts x n={n} = {len(prompts) * n} choices; this server allows "
                              f"at most {self.max_choices} per request (unmask serve --max-choices)", "prompt")
        messages = getattr(req, "messages", None)
        if messages is not None and self.max_messages is not None and len(messages) > self.max_messages:
            raise bad_request(f"{len(messages)} messages; this server allows at most {self.max_messages} "
                              f"(unmask serve --max-messages)", "messages")
        for name in ("max_tokens", "max_completion_tokens"):
            v = getattr(req, name, None)
            if v is not None and self.max_tokens is not None and v > self.max_tokens:
                raise bad_request(f"'{name}' is {v}; this server allows at most {self.max_tokens}{self._ctx()} "
                                  f"(unmask serve --max-tokens-limit)", name)
        steps = getattr(req, "steps", None)
        if steps is not None and steps > self.max_steps:
            raise bad_request(f"steps is {steps}; this server allows at most {self.max_steps} "
                              f"(unmask serve --max-steps)", "steps")
        stop = getattr(req, "stop", None)
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > self.max_stop:
            raise bad_request(f"{len(stops)} stop strings; this server allows at most {self.max_stop} "
                              f"(unmask serve --max-stop)", "stop")
        for i, s in enumerate(stops):
            if len(s) > self.max_stop_chars:
                raise bad_request(f"stop[{i}] is {len(s)} characters; this server allows at most "
                                  f"{self.max_stop_chars} per stop string (unmask serve --max-stop-chars)", "stop")

    def check_prompt_size(self, prompt: str | list[int], param: str, max_token_chars: int | None) -> None:
        """Before tokenizing: a token-id prompt is counted; a text prompt longer than max_prompt_tokens tokens of
        the vocabulary's longest token (max_token_chars characters, times PROMPT_CHARS_SLACK for normalizers that
        drop characters) cannot fit, and is refused without spending the tokenizer's time and memory on it."""
        if not isinstance(prompt, str):
            self.check_prompt_tokens(len(prompt), param)
        elif max_token_chars and self.max_prompt_tokens is not None:
            bound = self.max_prompt_tokens * max_token_chars * PROMPT_CHARS_SLACK
            if len(prompt) > bound:
                raise bad_request(f"the prompt is {len(prompt)} characters, more than {self.max_prompt_tokens} "
                                  f"tokens can spell with this vocabulary{self._ctx()} (unmask serve "
                                  f"--max-prompt-tokens)", param)

    def check_prompt_tokens(self, num_tokens: int, param: str) -> None:
        """After tokenizing, before the engine sees the request."""
        if self.max_prompt_tokens is not None and num_tokens > self.max_prompt_tokens:
            raise bad_request(f"the prompt is {num_tokens} tokens; this server allows at most "
                              f"{self.max_prompt_tokens}{self._ctx()} (unmask serve --max-prompt-tokens)", param)

    def _ctx(self) -> str:
        return f"; this model's context is {self.context} tokens" if self.context else ""


# CLI -----------------------------------------------------------------------------------------------------------
def add_limit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request limits", "refused with 400 (413 for the body, 503 for a full queue) before "
                                               "the engine commits any memory")
    g.add_argument("--max-messages", type=_positive, metavar="N",
                   help="chat messages per request (default: the model's context length)")
    g.add_argument("--max-prompt-tokens", type=_positive, metavar="N",
                   help="prompt tokens after the chat template (default: the context length - 1)")
    g.add_argument("--max-tokens-limit", type=_positive, metavar="N",
                   help="largest max_tokens / max_completion_tokens (default: the context length - 1)")
    g.add_argument("--max-n", type=_positive, default=MAX_N, metavar="N",
                   help=f"largest n, choices per prompt (default {MAX_N})")
    g.add_argument("--max-choices", type=_positive, metavar="N",
                   help="prompts x n per request (default: 16 x --max-n)")
    g.add_argument("--max-steps", type=_positive, default=MAX_STEPS, metavar="N",
                   help=f"largest steps (default {MAX_STEPS}, the engine's cap)")
    g.add_argument("--max-request-steps", type=_positive, default=MAX_REQUEST_STEPS, metavar="N",
                   help=f"denoising steps per request summed over its choices, prompts x n x steps "
                        f"(default {MAX_REQUEST_STEPS})")
    g.add_argument("--max-request-slots", type=_positive, metavar="N",
                   help="choices of one request in the running batch at once; the rest start as those finish "
                        "(default: half of --max-num-seqs)")
    g.add_argument("--max-stop", type=_positive, default=MAX_STOP_STRINGS, metavar="N",
                   help=f"stop strings per request (default {MAX_STOP_STRINGS}, the engine's cap)")
    g.add_argument("--max-stop-chars", type=_positive, default=MAX_STOP_CHARS, metavar="N",
                   help=f"characters per stop string (default {MAX_STOP_CHARS}, the engine's cap)")


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_messages=args.max_messages,
                         max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                         max_n=args.max_n, max_choices=args.max_choices, max_steps=args.max_steps,
                         max_stop=args.max_stop, max_stop_chars=args.max_stop_chars,
                         max_request_steps=args.max_request_steps, max_request_slots=args.max_request_slots)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v

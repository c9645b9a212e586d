"""The `stream_options.include_steps` extension: one SSE chunk per denoising step of a choice.

A step chunk is an ordinary chunk of the stream (chat: `delta: {}`, completions: `text: ""`, `finish_reason: null`)
whose choice carries one extra field:

    "diffusion_step": {"step": 3, "block": [0, 16], "length": 32,
                       "positions": [4, 9], "token_ids": [25, 34], "tokens": [" 2", "<|endoftext|>"]}

`step` counts from 1 and every step of the choice is sent once, in order, before the content delta of the block it
completes. `block` ([start, end)) and `positions` are offsets into the generated tokens (0 = the first generated
position), `length` is the number of generated positions (max_tokens). `tokens` are the text pieces of `token_ids`
(special tokens by name); absent for a model without a tokenizer. With token editing (LLaDA2.1) a step may also
carry `edited_positions`, `edited_token_ids` (and `edited_tokens`): committed positions it replaced, and their new
tokens. Starting from `length` masks and writing each step's tokens at its positions, then its edits, rebuilds the
generated canvas; cut at the first stop token it is the final output.

Cost and memory: only a request that asks records its steps (engine/step_log.py). A slow client never makes the
server queue per-step items: the engine wakes the stream at most once per undelivered step and the stream sends
every step it has not sent yet from the request's log, whose size is bounded by max_tokens + steps.
"""
from __future__ import annotations

from typing import Any

from engine.step_log import StepCommit


def step_event(engine: Any, step: StepCommit, length: int) -> dict[str, Any]:
    event: dict[str, Any] = {"step": step.step, "block": list(step.block), "length": length,
                             "positions": step.positions, "token_ids": step.token_ids}
    pieces = getattr(engine, "token_pieces", None)
    text = pieces(step.token_ids) if pieces is not None else None
    if text is not None:
        event["tokens"] = text
    if step.edited_positions:  # token editing replaced committed tokens in this step
        event["edited_positions"], event["edited_token_ids"] = step.edited_positions, step.edited_token_ids
        edited = pieces(step.edited_token_ids) if pieces is not None else None
        if edited is not None:
            event["edited_tokens"] = edited
    return event

"""Block-diffusion generation (LLaDA2, `block_causal` models): the block-aligned canvas, the per-block step plan
and the per-step quota of the reference `generate` (shared/notes/llada2.md). Plain Python, no torch.

Geometry, for a prompt of P tokens, max_tokens G and block length B:
- the canvas is rounded up to whole blocks: ceil((P + G) / B) * B positions, prompt at 0..P-1, masks after;
- blocks are absolute (block b covers [b * B, (b + 1) * B)); decoding starts at block P // B, the block holding the
  prompt's tail, so ceil((P + G) / B) - P // B blocks are denoised;
- each forward covers the canvas up to the end of the current block (block-causal attention: later blocks are
  never attended to), and the output is the first G generated tokens.
Steps: the API's `steps` is steps-per-block times the number of denoised blocks (split evenly, the first blocks
taking the remainder, as for every family); unset, every block gets the family's steps per block. Each block's
steps are capped at G (the reference's min(steps, gen_length // minimal_topk) with minimal_topk 1).
Quota: step k of a block with s steps commits at least B // s + (k < B % s) positions (the even split of the FULL
block length, whatever part of it the prompt already fills).
"""
from __future__ import annotations


def canvas_length(prompt_len: int, max_tokens: int, block_length: int) -> int:
    """Positions of the block-aligned canvas."""
    return -(-(prompt_len + max_tokens) // block_length) * block_length


def first_block(prompt_len: int, block_length: int) -> int:
    """Index of the first denoised block (the one holding the prompt's tail, or the one after a whole prompt)."""
    return prompt_len // block_length


def block_plan(prompt_len: int, max_tokens: int, block_length: int, steps: int | None,
               steps_per_block: int) -> tuple[int, ...]:
    """Steps of each denoised block. steps: the API total (None: steps_per_block for every block)."""
    n = canvas_length(prompt_len, max_tokens, block_length) // block_length - first_block(prompt_len, block_length)
    if steps is None:
        per = [steps_per_block] * n
    else:
        base, extra = divmod(max(steps, n), n)
        per = [base + (1 if b < extra else 0) for b in range(n)]
    return tuple(min(s, max_tokens) for s in per)


def quota(block_length: int, block_steps: int, step: int) -> int:
    """Minimum commits of step `step` of a block (the reference's num_transfer_tokens schedule)."""
    base, rem = divmod(block_length, block_steps)
    return base + (1 if step < rem else 0)

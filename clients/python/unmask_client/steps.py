"""StepCanvas: the generated canvas rebuilt from a step stream (`include_steps=True`).

    canvas = StepCanvas()
    for chunk in client.chat(messages, stream=True, include_steps=True):
        if chunk.step:
            canvas.apply(chunk.step)
            print(canvas.render())          # e.g. '1 ░ 3·····' : committed pieces, ░ for masked positions
"""
from __future__ import annotations

from .types import DiffusionStep

MASK = "░"


class StepCanvas:
    """One choice's generated positions: None while masked, then the committed token. `step_of[i]` is the step that
    committed position i (0: still masked)."""

    def __init__(self) -> None:
        self.token_ids: list[int | None] = []
        self.pieces: list[str | None] = []
        self.step_of: list[int] = []
        self.steps = 0

    def apply(self, step: DiffusionStep) -> None:
        """Write one step's commits, then its edits (token editing); steps must come in order (as the server
        sends them)."""
        if step.step != self.steps + 1:
            raise ValueError(f"step {step.step} arrived after step {self.steps}: steps must be applied in order")
        if not self.token_ids:
            self.token_ids = [None] * step.length
            self.pieces = [None] * step.length
            self.step_of = [0] * step.length
        pieces = step.tokens if step.tokens is not None else [None] * len(step.token_ids)
        for pos, tok, piece in zip(step.positions, step.token_ids, pieces):
            if self.token_ids[pos] is not None:
                raise ValueError(f"position {pos} committed twice (steps {self.step_of[pos]} and {step.step})")
            self.token_ids[pos], self.pieces[pos], self.step_of[pos] = tok, piece, step.step
        edited = step.edited_tokens if step.edited_tokens is not None else [None] * len(step.edited_token_ids)
        for pos, tok, piece in zip(step.edited_positions, step.edited_token_ids, edited):  # token editing
            if self.token_ids[pos] is None:
                raise ValueError(f"position {pos} edited in step {step.step} before it was committed")
            self.token_ids[pos], self.pieces[pos] = tok, piece
        self.steps = step.step

    @property
    def masked(self) -> int:
        """Positions not committed yet."""
        return sum(t is None for t in self.token_ids)

    def render(self, mask: str = MASK) -> str:
        """The canvas as text: committed pieces joined, `mask` for each masked position."""
        return "".join(mask if t is None else (p if p is not None else f"<{t}>")
                       for t, p in zip(self.token_ids, self.pieces))

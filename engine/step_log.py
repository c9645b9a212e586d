"""StepLog: the per-step commit record of one request, kept only for requests that ask for it. No torch.

Each denoising step of a recording request appends one entry: the current block's bounds and the positions
committed in that step with their token ids (positions are offsets into the generated region, 0 = the first
generated token), and, with token editing (engine/decoding/editing/), the committed positions the step replaced
with their new tokens. Replaying the entries in order over an all-mask canvas (commits, then edits, per step)
rebuilds the request's final canvas.

Threading and memory: the engine thread is the only writer; any thread may read. A reader sees the first
`num_steps` entries, which are complete, because each entry's data is appended before `num_steps` is published.
Every position is committed at most once in a request's life, so a log holds at most gen_len commits plus one small
entry per step (and with editing at most a block's worth of edits per step), however slowly its consumer reads it:
a consumer that falls behind reads several steps at once (`since(cursor)`), nothing is queued per step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepCommit:
    step: int
    """1-based step number of the request."""
    block: tuple[int, int]
    """The block decoded in this step, [start, end) as generated-region offsets."""
    positions: list[int]
    """Generated-region offsets committed in this step (ascending)."""
    token_ids: list[int]
    """The committed token of each position."""
    edited_positions: list[int] = ()  # type: ignore[assignment]
    """Token editing: generated-region offsets of committed tokens this step replaced (ascending)."""
    edited_token_ids: list[int] = ()  # type: ignore[assignment]
    """Their new tokens."""


class StepLog:
    __slots__ = ("gen_len", "num_steps", "_blocks", "_ends", "_positions", "_tokens", "_edit_ends", "_edits")

    def __init__(self, gen_len: int) -> None:
        self.gen_len = gen_len
        self.num_steps = 0
        """Entries published so far (readers must not look past them)."""
        self._blocks: list[tuple[int, int]] = []
        self._ends: list[int] = []
        """Commit-list end of each step (step k's commits are [_ends[k-1], _ends[k]))."""
        self._positions: list[int] = []
        self._tokens: list[int] = []
        self._edit_ends: list[int] = []
        """Edit-list end of each step (only for logs with edits: empty until the first one)."""
        self._edits: list[tuple[int, int]] = []  # (position, new token)

    def record(self, block: tuple[int, int], positions: list[int], token_ids: list[int],
               edited: list[tuple[int, int]] | None = None) -> None:
        """Append one step (engine thread only); edited: (position, new token) of the tokens it replaced."""
        self._positions.extend(positions)
        self._tokens.extend(token_ids)
        if edited or self._edit_ends:
            self._edit_ends.extend([len(self._edits)] * (self.num_steps - len(self._edit_ends)))  # steps before
            self._edits.extend(edited or ())
            self._edit_ends.append(len(self._edits))
        self._blocks.append(block)
        self._ends.append(len(self._positions))
        self.num_steps += 1  # publish last

    @property
    def num_commits(self) -> int:
        n = self.num_steps
        return self._ends[n - 1] if n else 0

    def since(self, cursor: int) -> list[StepCommit]:
        """The published steps after the first `cursor` ones, in order."""
        n = self.num_steps
        out = []
        for k in range(cursor, n):
            a, b = self._ends[k - 1] if k else 0, self._ends[k]
            commit = StepCommit(k + 1, self._blocks[k], self._positions[a:b], self._tokens[a:b])
            if k < len(self._edit_ends):
                edits = self._edits[self._edit_ends[k - 1] if k else 0:self._edit_ends[k]]
                commit = StepCommit(commit.step, commit.block, commit.positions, commit.token_ids,
                                    [p for p, _ in edits], [t for _, t in edits])
            out.append(commit)
        return out

    def canvas(self, mask_id: int) -> list[int]:
        """The generated region as of the last published step (mask_id where nothing is committed yet)."""
        ids = [mask_id] * self.gen_len
        if self._edit_ends:  # step by step: edits overwrite earlier commits
            for step in self.since(0):
                for p, t in zip(step.positions + list(step.edited_positions),
                                step.token_ids + list(step.edited_token_ids)):
                    ids[p] = t
            return ids
        end = self.num_commits
        for p, t in zip(self._positions[:end], self._tokens[:end]):
            ids[p] = t
        return ids

"""Host-side state of one request: its canvas geometry, block plan and progress. No torch."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .block_diffusion import block_plan, canvas_length, first_block
from .step_log import StepLog

if TYPE_CHECKING:
    from .sampling_params import ResolvedParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SeqStats:
    steps: int = 0
    """Denoising steps taken (each one forward pass for this request, two with CFG)."""
    forward_passes: int = 0
    tokens_committed: int = 0
    positions_computed: int = 0
    """Query positions this request fed through the network (refresh passes count the whole canvas)."""
    preemptions: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens_committed / self.steps if self.steps else 0.0


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: ResolvedParams
    shift: int
    """1 for shifted families: position p is decoded from the output at p - 1."""
    arrival: int = 0
    status: Status = Status.WAITING
    block_idx: int = 0
    step_in_block: int = 0
    masked_in_block: int = 0
    block_masks: int = 0
    finish_reason: str | None = None
    pages: list[int] = field(default_factory=list)
    """KV pages of the conditional canvas, then (with CFG) of the unconditional twin."""
    cached_prefix_len: int = 0
    """Leading canvas positions whose K/V live in prefix-cache pages (engine/prefix_cache.py): found cached at
    admission (the request's passes start after them) or registered by it since. Never written by this request."""
    prefix_keys: list[bytes] | None = None
    """Keys of the prompt's shareable pages (computed at first admission when prefix caching is on)."""
    prefix_registered: bool = False
    """Whether the prompt's shareable pages are all in the cache (found or registered)."""
    stats: SeqStats = field(default_factory=SeqStats)
    step_log: StepLog | None = None
    """Set for requests that asked for their per-step commits (see step_log.py); None costs nothing."""
    row: Any = None
    """The request's row of the batched-parameters table (batch_params.param_row), built once with the Sequence
    (engine/input_processor.py)."""
    constraint: Any = None
    """The request's structured-output state (engine/constraints Constraint), None when unconstrained."""
    text: Any = None
    """The engine's text state of the request (stop-string search position, streamed text)."""
    block_causal: bool = False
    """Block-diffusion model (LLaDA2): block-aligned canvas and absolute blocks (engine/block_diffusion.py)."""
    plan: tuple[int, ...] = ()
    """Steps of each block (block_causal: per request, it depends on the prompt length; else params.block_steps)."""
    post_steps: int = 0
    """Token editing: steps of the current block taken after its last mask was filled."""
    cached_upto: int = 0
    """Block-causal exact cache: canvas positions [0, cached_upto) hold final K/V in this request's pages."""
    stream: bool = False
    """Its consumer streams: each completed block also yields an unfinished output (LLMEngine.add_request)."""
    keep_canvas: bool = False
    final_canvas: list[int] | None = None
    """With keep_canvas, the whole generated canvas once finished (past EOS; `unmask generate --show-steps`)."""

    def __post_init__(self) -> None:
        p = self.params
        if self.block_causal:
            self.plan = block_plan(self.prompt_len, p.max_tokens, p.block_length, p.steps or None,
                                   p.steps_per_block)
        else:
            self.plan = p.block_steps
        self.masked_in_block = self.block_masks = self.block_len(0)
        if self.block_causal:
            self.masked_in_block = self.block_bounds(0)[1] - self.prompt_len
            self.block_masks = p.block_length  # the quota splits the full block

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def gen_len(self) -> int:
        return self.params.max_tokens

    @property
    def canvas_len(self) -> int:
        if self.block_causal:
            return canvas_length(self.prompt_len, self.gen_len, self.params.block_length)
        return self.prompt_len + self.gen_len

    @property
    def num_blocks(self) -> int:
        return len(self.plan)

    @property
    def num_rows(self) -> int:
        """Forward rows: the canvas, plus its unconditional twin under classifier-free guidance."""
        return 2 if self.params.cfg_scale > 0 else 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_bounds(self, b: int | None = None) -> tuple[int, int]:
        """Absolute canvas positions [start, end) of block b (default: the current one)."""
        b = self.block_idx if b is None else b
        if self.block_causal:
            b += first_block(self.prompt_len, self.params.block_length)
            return b * self.params.block_length, (b + 1) * self.params.block_length
        start = self.prompt_len + b * self.params.block_length
        return start, min(start + self.params.block_length, self.canvas_len)

    def block_len(self, b: int) -> int:
        s, e = self.block_bounds(b)
        return e - s

    @property
    def block_steps(self) -> int:
        return self.plan[self.block_idx]

    @property
    def is_last_allowed_step(self) -> bool:
        return self.step_in_block >= self.block_steps - 1

    @property
    def at_safe_point(self) -> bool:
        """Preemptible without losing work: no K/V is kept across this point (block-causal: any step, the cache
        is recomputed from cached_upto = 0)."""
        return self.block_causal or self.params.cache == "none" or self.step_in_block == 0

    @property
    def needs_refresh(self) -> bool:
        """Cached modes: the block's first step is a full pass that also refills the cache."""
        return self.params.cache == "none" or self.step_in_block == 0

    def query_range(self) -> tuple[int, int]:
        """Canvas positions [qa, qb) this step feeds through the network (the same for the CFG twin).

        Refresh passes: the whole canvas. Dual: the block (plus, shifted families, the position before it).
        Prefix: the block and the whole suffix (plus the shift position).
        """
        if self.block_causal:  # the prefix up to the current block's end; cached: only what is not cached yet
            start = 0 if self.params.cache == "none" else self.cached_upto
            return max(start, self.cached_prefix_len), self.block_bounds()[1]  # shared prompt pages: read-only
        if self.needs_refresh:
            return 0, self.canvas_len
        bs, be = self.block_bounds()
        return bs - self.shift, be if self.params.cache == "dual" else self.canvas_len

    def step_cost(self) -> int:
        qa, qb = self.query_range()
        return (qb - qa) * self.num_rows

    def advance(self, committed: int, edited: int = 0) -> bool:
        """Record one step (`committed` masks filled, `edited` tokens replaced); returns True when the current
        block just completed."""
        self.stats.steps += 1
        self.stats.forward_passes += self.num_rows
        if self.block_causal:  # every block before the current one is final and its K/V written
            self.cached_upto = self.block_bounds()[0]
        self.stats.tokens_committed += committed
        if self.params.editing:  # a token-editing rule owns the block's progress (engine/decoding/editing/)
            from .decoding import registry
            return registry.editing(self.params.editing).advance(self, committed, edited)
        self.masked_in_block -= committed
        self.step_in_block += 1
        if self.params.adaptive:
            done = self.masked_in_block <= 0
        else:
            done = self.step_in_block >= self.block_steps
        return done

    def next_block(self) -> bool:
        """Move to the next block; returns False when there is none."""
        self.block_idx += 1
        self.step_in_block = self.post_steps = 0
        if self.block_idx >= self.num_blocks:
            return False
        self.masked_in_block = self.block_masks = self.block_len(self.block_idx)
        return True

    def drop_cache(self) -> None:
        """Its pages were freed (preemption): the next step recomputes the K/V of the whole prefix."""
        self.cached_upto = 0

"""Bounded step shapes on CPU: the row counts every Linear runs at and the (query, key) lengths attention runs at.

Why: in bfloat16 on CPUs with native bf16, oneDNN compiles and caches one matmul kernel per distinct (M, K, N)
(~0.7 MiB each). The packed token count M of a step changes with the batch mix, so an unbounded set of M grows
resident memory (~0.9 GiB under load) and slows steps once the cache evicts. And a kernel's rounding can depend on
its shape, so a request's result could depend on what it is batched with.

What lives here:
- `row_bucket(m)`: the padded row count of a matmul over m rows: MIN_ROWS, then STEPS_PER_OCTAVE sizes per
  doubling (16, 24, 32, 48, 64, ...), so padding adds less than 1/STEPS_PER_OCTAVE of the rows.
- `BucketedLinear` / `bucket_linears(net)`: every nn.Linear of a loaded CPU network pads its input rows with zeros to
  row_bucket(M), runs the GEMM at that M and drops the padded rows' outputs. This covers the packed token count of
  every forward (q/k/v/o, MLP, router) with one rule, and nothing else in the network sees the padding (attention,
  norms and K/V writes run on the real rows only). The lm_head is a BucketedLinear too, but where the CPU kernel
  builds it runs unpadded through that kernel instead (engine/head_linear.py: no oneDNN/MKL kernel per shape, and a
  row's logits do not depend on the row count); the bucketed GEMM is its fallback.
- `attention_groups(...)`: the torch (SDPA) attention of a step's rows, grouped by (query bucket, key bucket): each
  row's queries and keys are padded to buckets of its own lengths (padded keys read the pool's scratch slot and are
  masked out; padded queries' outputs are dropped), one SDPA call per group (block-causal rows, LLaDA2 / SDAR:
  keys up to the row's query end, each group with its own block mask). A row's attention then runs at shapes
  fixed by its own lengths, so its result does not depend on the other rows of the batch (with one padded layout
  for the whole batch, SDPA's rounding moves with the batch's longest key length). Refresh passes (queries =
  keys = the whole canvas) group apart and take their keys from the forward's own k/v, not the pool; a step of
  no-cache requests only writes no K/V at all.

Distinct matmul shapes a dense model sees: at most len(sizes up to the largest forward) per weight shape, e.g. 33
row counts for up to 16384 packed tokens (engine/scheduler.py's default max_num_batched_tokens) per distinct
Linear weight shape (the lm_head's weight not among them where engine/head_linear.py's kernel runs it);
tests/test_shape_buckets.py counts them over a random mixed workload. MoE expert GEMMs
(kernels/moe.py) run at per-expert token counts and are not bounded here.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from .model.attention import AttnGroup
from .model.upcast import linear

MIN_ROWS = 16
"""Smallest row bucket: a single decoded token runs its rows at M = 16 like everything else (MKL's fp32 GEMM rounds
1-3 rows differently from 4+, so tiny M would also break batch invariance)."""
STEPS_PER_OCTAVE = 2
"""Bucket sizes per doubling: padding adds less than 1/STEPS_PER_OCTAVE of the rows."""
MIN_ATTN = 8
"""Smallest query / key length bucket of attention."""


def bucket(n: int, lo: int, steps: int = STEPS_PER_OCTAVE) -> int:
    """The smallest size >= n among lo and, above lo, `steps` evenly spaced sizes per doubling (2^k + j 2^k/steps):
    with lo=16, steps=2: 16, 24, 32, 48, 64, 96, ... (n <= 0 stays 0)."""
    if n <= lo:
        return lo if n > 0 else 0
    p = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
    step = max(p // steps, 1)
    return -(-n // step) * step


def row_bucket(m: int) -> int:
    """The padded row count of a matmul over m rows."""
    return bucket(m, MIN_ROWS)


def length_bucket(n: int) -> int:
    """The padded query or key length attention runs a row at."""
    return bucket(n, MIN_ATTN)


def row_buckets_up_to(m: int) -> list[int]:
    """Every row count row_bucket can return for 1..m rows."""
    out, n = [], 1
    while n <= m:
        out.append(row_bucket(n))
        n = out[-1] + 1
    return out


class BucketedLinear(nn.Linear):
    """An nn.Linear (same parameters and state dict) whose GEMM always runs at row_bucket(rows) rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        padded = row_bucket(rows)
        if padded == rows:
            return linear(x, self.weight, self.bias)
        flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))  # [Mb, K], zero rows appended
        return linear(flat, self.weight, self.bias)[:rows].view(*x.shape[:-1], -1)


def pack_linears(net: nn.Module) -> nn.Module:
    """In place: every BucketedLinear whose weight oneDNN multiplies (upcast.packs) keeps it in oneDNN's blocked
    layout instead of the plain one (same bytes; the GEMM skips its per-call reorder). A weight shared with another
    module (a tied head is the embedding's table) stays plain, and so do MoE routers (LLaDA2's reads its weight in
    float32). Returns net."""
    from .model.upcast import pack_weight, packs
    count = Counter(id(p) for _, p in net.named_parameters(remove_duplicate=False))  # a module's uses of each
    for name, mod in net.named_modules():
        if isinstance(mod, BucketedLinear) and not name.endswith("router") and count.get(id(mod.weight)) == 1 \
                and packs(mod.weight):
            mod.weight = nn.Parameter(pack_weight(mod.weight.detach()), requires_grad=False)
    return net


def bucket_linears(net: nn.Module) -> nn.Module:
    """In place: every plain nn.Linear of net becomes a BucketedLinear (parameters untouched). Returns net."""
    for mod in net.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = BucketedLinear
    return net


@dataclass(slots=True)
class GroupPlan:
    """The host-side layout of one attention group (uploaded with the step's metadata)."""
    rows: torch.Tensor  # [G] long: forward rows in this group
    q_index: torch.Tensor  # [G, Lq] long: packed index of each padded query (0 where invalid)
    unpad: torch.Tensor  # [Tg] long: position of each real query in the flattened [G * Lq] layout
    tokens: torch.Tensor  # [Tg] long: packed index of each real query (the output rows it fills)
    key_len: int  # Lk: the key bucket
    self_keys: bool = False  # every row's keys are its own queries, in order (see attention_groups)


def attention_groups(q_lens: list[int], k_lens: list[int], own_keys: list[bool] | None = None) -> list[GroupPlan]:
    """Group forward rows (packed back to back with q_lens queries, attending over k_lens keys) by their
    (length_bucket(q), length_bucket(k)) and whether their keys are their own queries; host tensors.

    own_keys: per row, whether it attends over exactly its own new K/V, in query order (the runner's refresh passes:
    queries are canvas positions 0..k-1 and so are the keys). Such rows group apart as `self_keys`: attention
    takes their keys from this forward's k/v at the queries' own layout instead of writing them to the pool and
    reading them back (same values, same padded shapes, so the same result)."""
    starts, acc = [], 0
    for n in q_lens:
        starts.append(acc)
        acc += n
    own = own_keys or [False] * len(q_lens)
    assert all(q == k for q, k, o in zip(q_lens, k_lens, own) if o), "a self-keyed row has as many keys as queries"
    groups: dict[tuple[int, int, bool], list[int]] = {}
    for r, (q, k) in enumerate(zip(q_lens, k_lens)):
        groups.setdefault((length_bucket(q), length_bucket(k), own[r]), []).append(r)
    out = []
    for (lq, lk, self_keys), rows in sorted(groups.items()):
        lens = torch.tensor([q_lens[r] for r in rows])  # [G]
        first = torch.tensor([starts[r] for r in rows])  # [G]
        ar = torch.arange(lq)
        valid = ar[None, :] < lens[:, None]  # [G, Lq]
        q_index = torch.where(valid, first[:, None] + ar[None, :], 0)  # [G, Lq]
        flat = torch.arange(len(rows) * lq).view(len(rows), lq)
        out.append(GroupPlan(torch.tensor(rows), q_index, flat[valid], q_index[valid], lk, self_keys))
    return out


def group_upload(plans: list[GroupPlan]) -> dict[str, torch.Tensor]:
    """The groups' host tensors, named for one StepUpload.send."""
    host = {}
    for i, g in enumerate(plans):
        host.update({f"attn{i}_rows": g.rows, f"attn{i}_q_index": g.q_index, f"attn{i}_unpad": g.unpad,
                     f"attn{i}_tokens": g.tokens})
    return host


def build_groups(plans: list[GroupPlan], dev: dict[str, torch.Tensor], read_slots: torch.Tensor,
                 key_valid: torch.Tensor, scratch_slot: int, block_len: torch.Tensor | None = None
                 ) -> list[AttnGroup]:
    """The device-side AttnGroups: each group's key slots [G, Lk] taken from the batch's read_slots [R, Lk_max]
    (cut to the bucket, or extended with masked scratch-slot reads); block-causal: its rows' block_len [R] too."""
    out = []
    width = read_slots.shape[1]
    for i, g in enumerate(plans):
        rows = dev[f"attn{i}_rows"]
        slots, valid = read_slots[rows], key_valid[rows]  # [G, Lk_max]
        if g.key_len <= width:
            slots, valid = slots[:, :g.key_len], valid[:, :g.key_len]
        else:
            slots = F.pad(slots, (0, g.key_len - width), value=scratch_slot)
            valid = F.pad(valid, (0, g.key_len - width), value=False)
        out.append(AttnGroup(dev[f"attn{i}_q_index"], dev[f"attn{i}_unpad"], dev[f"attn{i}_tokens"], slots,
                             valid, None if block_len is None else block_len[rows], self_keys=g.self_keys))
    return out

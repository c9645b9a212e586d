"""The batched-parameters table: each running request's numeric sampling parameters as named [B] columns.

Each column is declared once below (its dtype and how it is read from a ResolvedParams). A request's `ParamRow`
(the column values, plain numbers) is built once, when its Sequence is built (engine/input_processor.py); the
runner builds one ParamTable per batch membership (rebuilt only when the set of running requests changes) with
one host-to-device copy per storage dtype, and the decoders read columns by name (`table.temperature[seq]`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from .decoding import registry
from .sampling_params import ResolvedParams

ParamRow = tuple[Any, ...]
"""One request's column values, in column order."""


def column(dtype: torch.dtype, get: Callable[[ResolvedParams], Any]) -> Any:
    return field(metadata={"dtype": dtype, "get": get})


def _or_nan(v: float | None) -> float:
    return math.nan if v is None else v


def _seed(p: ResolvedParams) -> int:
    return p.seed - (1 << 64) if p.seed >= 1 << 63 else p.seed  # 64-bit seeds, stored as int64


@dataclass(slots=True)
class ParamTable:
    seed: torch.Tensor = column(torch.long, _seed)  # [B]
    top_k: torch.Tensor = column(torch.long, lambda p: p.top_k)  # [B] 0 = off
    remasking: torch.Tensor = column(torch.long, lambda p: registry.remasking(p.remasking).id)  # [B] rule id
    transfer: torch.Tensor = column(torch.long, lambda p: registry.transfer(p.transfer).id)  # [B] rule id
    tempered: torch.Tensor = column(torch.bool, lambda p: registry.transfer(p.algorithm).tempered_scores)  # [B]
    temperature: torch.Tensor = column(torch.float32, lambda p: p.temperature)  # [B]
    top_p: torch.Tensor = column(torch.float32, lambda p: p.top_p)  # [B] 1 = off
    cfg_w: torch.Tensor = column(torch.float32, lambda p: p.cfg_scale)  # [B] 0 = no guidance
    alg_temp: torch.Tensor = column(torch.float64, lambda p: p.alg_temp)  # [B] 0 = deterministic top-k
    threshold: torch.Tensor = column(torch.float64, lambda p: _or_nan(p.threshold))  # [B] nan = none
    editing: torch.Tensor = column(torch.long, lambda p: registry.editing(p.editing).id if p.editing else -1)  # [B]
    edit_threshold: torch.Tensor = column(torch.float64, lambda p: _or_nan(p.editing_threshold))  # [B] nan = off
    # host-side facts about the batch (branch without a device sync)
    remasking_ids: frozenset[int] = frozenset()
    any_sampling: bool = False
    any_filter: bool = False
    any_tempered: bool = False
    any_alg_temp: bool = False

    @classmethod
    def build(cls, rows: list[ParamRow], device: torch.device) -> "ParamTable":
        """Stack the rows (one copy per storage dtype, int64 and float64) and split them into named columns."""
        cols = _COLUMNS
        ints = [i for i, c in enumerate(cols) if not c.metadata["dtype"].is_floating_point]
        flts = [i for i, c in enumerate(cols) if c.metadata["dtype"].is_floating_point]
        istore = torch.tensor([[r[i] for i in ints] for r in rows], dtype=torch.long).to(device)  # [B, Ci]
        fstore = torch.tensor([[r[i] for i in flts] for r in rows], dtype=torch.float64).to(device)  # [B, Cf]
        values = {cols[i].name: istore[:, j].to(cols[i].metadata["dtype"]) for j, i in enumerate(ints)}
        values.update({cols[i].name: fstore[:, j].to(cols[i].metadata["dtype"]) for j, i in enumerate(flts)})
        by = {c.name: k for k, c in enumerate(cols)}
        return cls(**values, remasking_ids=frozenset(r[by["remasking"]] for r in rows),
                   any_sampling=any(r[by["temperature"]] > 0 for r in rows),
                   any_filter=any(r[by["top_k"]] > 0 or r[by["top_p"]] < 1 for r in rows),
                   any_tempered=any(bool(r[by["tempered"]]) for r in rows),
                   any_alg_temp=any(r[by["alg_temp"]] > 0 for r in rows))


_COLUMNS = tuple(f for f in fields(ParamTable) if "get" in f.metadata)


_INT64 = (-(1 << 63), (1 << 63) - 1)


def param_row(p: ResolvedParams) -> ParamRow:
    """A request's column values (built once per request, on the thread that submits it); a value a column
    cannot hold fails this request alone, here, before it joins a batch."""
    row = tuple(c.metadata["get"](p) for c in _COLUMNS)
    for c, v in zip(_COLUMNS, row):
        if not c.metadata["dtype"].is_floating_point and not _INT64[0] <= int(v) <= _INT64[1]:
            raise ValueError(f"{c.name}: {v} does not fit the engine's int64 parameter table")
    return row

"""The decoding plug-in registry: remasking (scoring) rules, transfer rules and token-editing rules, one small file
each.

- A remasking rule (engine/decoding/remasking/<name>.py) turns the per-position statistics of a step
  (ScoreStats: p(x0), the top-2 margin, -H, a uniform draw) into a ranking score and a [0, 1] confidence.
- A transfer rule (engine/decoding/transfer/<name>.py) decides how many / which scored positions of the current
  block a step commits: a host-side number per request per step (`step_value`: a count, a threshold, a
  probability) and a vectorised device rule (`select`) applied to every row that uses it.
- A token-editing rule (engine/decoding/editing/<name>.py; LLaDA2.1's) may also replace committed tokens of the
  current block: which committed positions a step scores again (`scored_from`, host), which of them it replaces
  (`edits`, a vectorised device rule) and when a block whose masks are all filled is done (`advance`, host).

Each plug-in file calls `register_remasking` / `register_transfer` / `register_editing` when imported; the files of
the three packages are discovered (pkgutil) the first time the registry is read, so adding a rule is one file (plus
its test). From the registry come SamplingParams' validation (`remasking`, `algorithm`, `editing` choices and their
constraints), the HTTP enums (server/protocol.py), the CLI help, the SDK check (tests/test_schema.py) and the docs.
The runner's batched-parameters table stores each request's rule ids, and the combiners (candidates.combine_scores,
select.select, editing.edit) run one vectorised pass per rule present in the batch, never a per-row Python loop.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from ..sequence import Sequence
    from .candidates import ScoreStats
    from .editing import EditContext
    from .select import SelectContext


@dataclass(frozen=True, slots=True)
class Remasking:
    name: str
    score: "Callable[[ScoreStats], tuple[torch.Tensor, torch.Tensor]]"
    """stats -> (score [N] float64 ranking, higher commits first; conf [N] float64 in [0, 1] for threshold/factor)."""
    help: str
    aliases: tuple[str, ...] = ()
    """Other names accepted for this rule (e.g. Dream's)."""
    transfer: str | None = None
    """A transfer rule this score implies instead of the algorithm's schedule (Dream's origin)."""
    algorithm: str | None = None
    """The only algorithm this rule works with (None: any)."""
    why: str = ""
    """Why `algorithm` is required, for error messages (e.g. "is Dream's algorithm")."""
    transfer_why: str = ""
    """Why `transfer` excludes the param rules (threshold, factor), for error messages."""
    order: int = 100
    """Listing order in enums, help and docs (then registration order)."""
    id: int = -1
    """Assigned on registration; stored in the batched-parameters table."""


@dataclass(frozen=True, slots=True)
class Transfer:
    name: str
    step_value: "Callable[[Sequence], float]"
    """Host side, once per request per step: the number the device rule reads for that row (a commit count, a
    threshold, a reveal probability)."""
    select: "Callable[[SelectContext, torch.Tensor, float], torch.Tensor]"
    """(ctx, value [B] float64, host max of value over this rule's rows) -> commit [B, M] bool for every row
    (only the rows using the rule are kept)."""
    help: str
    kind: str = "algorithm"
    """"algorithm": chosen by SamplingParams.algorithm (a fixed schedule); "param": turned on by the SamplingParams
    field of the same name (threshold, factor); "remasking": implied by a remasking rule (origin)."""
    adaptive: bool = False
    """The commit count is decided on the device (the step bound is an upper bound; the last allowed step commits
    every remaining position)."""
    tempered_scores: bool = False
    """Algorithms: score positions from the temperature-scaled, filtered logits (Dream, RND1), not the raw ones."""
    order: int = 100
    id: int = -1


@dataclass(frozen=True, slots=True)
class Editing:
    name: str
    edits: "Callable[[EditContext], torch.Tensor]"
    """ctx -> [B, M] bool for every row: the committed tokens to replace by their candidate this step (only the rows
    using the rule are kept)."""
    advance: "Callable[[Sequence, int, int], bool]"
    """Host side, once per request per step (seq, masks filled, tokens edited) -> whether its current block is done.
    Called instead of the plain rule (done once no mask is left / the block's steps are spent); it owns
    seq.masked_in_block, step_in_block and post_steps."""
    help: str
    fields: tuple[str, ...]
    """The SamplingParams fields that configure it; setting the first turns the rule on (`editing` unset)."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """(field, value) for those fields when the request leaves them unset and the rule is on."""
    scored_from: "Callable[[Sequence], int]" = lambda seq: seq.prompt_len
    """Host side: the first canvas position whose committed tokens the current block's steps score again (at most
    the first generated position; masked positions are always scored)."""
    algorithm: str | None = None
    """The only algorithm (transfer schedule) it works with; None: any."""
    why: str = ""
    """Why `algorithm` is required, for error messages."""
    order: int = 100
    id: int = -1


_REMASKING: dict[str, Remasking] = {}
_TRANSFER: dict[str, Transfer] = {}
_EDITING: dict[str, Editing] = {}
_TABLES = {"remasking": _REMASKING, "transfer": _TRANSFER, "editing": _EDITING}
_BY_ID: dict[str, dict[int, Any]] = {"remasking": {}, "transfer": {}, "editing": {}}
_next_id = {"remasking": 0, "transfer": 0, "editing": 0}
_loaded = False


def _register(table: dict[str, Any], kind: str, spec: Any) -> Any:
    if spec.name in table:
        raise ValueError(f"{kind} rule {spec.name!r} is already registered")
    import dataclasses
    spec = dataclasses.replace(spec, id=_next_id[kind])
    _next_id[kind] += 1
    table[spec.name] = spec
    _BY_ID[kind][spec.id] = spec
    return spec


def register_remasking(spec: Remasking) -> Remasking:
    """Add a remasking rule (returns it with its id). Register before building a server to see it in its API."""
    return _register(_REMASKING, "remasking", spec)


def register_transfer(spec: Transfer) -> Transfer:
    return _register(_TRANSFER, "transfer", spec)


def register_editing(spec: Editing) -> Editing:
    return _register(_EDITING, "editing", spec)


def unregister(name: str, kind: str = "remasking") -> None:
    """Remove a rule (tests registering toy rules clean up with this). Ids are never reused."""
    spec = _TABLES[kind].pop(name)
    del _BY_ID[kind][spec.id]


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in _TABLES:
        pkg = importlib.import_module(f"{__package__}.{package}")
        for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
            importlib.import_module(f"{pkg.__name__}.{mod}")
    # the built-in rules' ids follow their listing order (low_confidence = 0, ...), whatever the file names
    import dataclasses
    for kind, table in _TABLES.items():
        ordered = sorted(table.values(), key=lambda s: (s.order, s.id))
        _BY_ID[kind].clear()
        for i, spec in enumerate(ordered):
            table[spec.name] = _BY_ID[kind][i] = dataclasses.replace(spec, id=i)
        _next_id[kind] = len(ordered)


def _sorted(table: dict[str, Any]) -> list[Any]:
    _load()
    return sorted(table.values(), key=lambda s: (s.order, s.id))


def remasking_rules() -> list[Remasking]:
    return _sorted(_REMASKING)


def transfer_rules(kind: str | None = None) -> list[Transfer]:
    return [t for t in _sorted(_TRANSFER) if kind is None or t.kind == kind]


def remasking_names() -> tuple[str, ...]:
    return tuple(r.name for r in remasking_rules())


def remasking_aliases() -> dict[str, str]:
    return {a: r.name for r in remasking_rules() for a in r.aliases}


def algorithm_names() -> tuple[str, ...]:
    return tuple(t.name for t in transfer_rules("algorithm"))


def param_transfers() -> tuple[str, ...]:
    """Transfer rules turned on by a SamplingParams field of their name (threshold, factor)."""
    return tuple(t.name for t in transfer_rules("param"))


def editing_rules() -> list[Editing]:
    return _sorted(_EDITING)


def editing_names() -> tuple[str, ...]:
    return tuple(e.name for e in editing_rules())


def editing_fields() -> tuple[str, ...]:
    """The SamplingParams fields owned by token-editing rules (each configures only its rules)."""
    return tuple(dict.fromkeys(f for e in editing_rules() for f in e.fields))


def remasking(name: str) -> Remasking:
    _load()
    return _REMASKING[name]


def transfer(name: str) -> Transfer:
    _load()
    return _TRANSFER[name]


def editing(name: str) -> Editing:
    _load()
    return _EDITING[name]


def editing_by_id(i: int) -> Editing:
    _load()
    return _BY_ID["editing"][i]


def remasking_by_id(i: int) -> Remasking:
    _load()
    return _BY_ID["remasking"][i]


def transfer_by_id(i: int) -> Transfer:
    _load()
    return _BY_ID["transfer"][i]


def markdown_table() -> str:
    """README's table of decoding rules (tests/test_schema.py checks README holds the current one)."""
    rows = ["| rule | chosen by | what it does |", "|---|---|---|"]
    for r in remasking_rules():
        alias = f" (alias {', '.join(f'`{a}`' for a in r.aliases)})" if r.aliases else ""
        rows.append(f"| `{r.name}`{alias} | `remasking` | {r.help} |")
    for t in transfer_rules():
        how = {"algorithm": "`algorithm`", "param": f"`{t.name}` set", "remasking": f"`remasking={t.name}`"}[t.kind]
        rows.append(f"| `{t.name}` | {how} | {t.help} |")
    for e in editing_rules():
        rows.append(f"| `{e.name}` | `editing` (or `{e.fields[0]}` set) | {e.help} |")
    return "\n".join(rows) + "\n"

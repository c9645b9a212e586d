"""The request-parameter schema: each SamplingParams field carries a ParamSpec (`param(...)` below), and that one
declaration is the source of everything that names or checks request parameters:

- SamplingParams' validation (`validate`, one pass: type, range, choices, aliases);
- the HTTP request fields and /openapi.json (server/protocol.py builds its pydantic model from `http_specs()`);
- the `unmask generate` / `unmask serve` sampling flags and the server-wide defaults (`add_cli_flags`,
  `api_names()`; engine/cli.py, server/cli.py), and the fields the server maps onto SamplingParams
  (server/serving.py);
- the value each unset field takes on a server (`fixed_defaults()`: server/playground.py, /v1/models'
  `diffusion_defaults`);
- the Python SDK's typed keyword arguments: clients/python/unmask_client/params.py is generated from here
  (`sdk_source()`) and tests/test_schema.py checks it is current; so are README's tables of request fields and
  decoding rules. `regenerate()` rewrites both (the command is GENERATED).

Choices that are decoding plug-ins (remasking, algorithm, editing) are read from engine/decoding/registry.py.
Adding a plain request field is one `param(...)` field on SamplingParams (plus its test).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import FieldError


class SamplingParamsError(FieldError):
    """A SamplingParams field is invalid; `.field` (also `.param`) names it."""
    prefix = "SamplingParams."


@dataclass(frozen=True)
class ParamSpec:
    kind: str
    """"int", "float", "bool", "choice" (a string among `choices`), "stop" (a string or a list of them) or
    "object" (validated and normalised by `convert`)."""
    help: str
    """One line: what the field does (CLI help, HTTP description, SDK docstring)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Callable[[], tuple[str, ...]] | tuple[str, ...] = ()
    aliases: Callable[[], dict[str, str]] | None = None
    """Other accepted names, mapped to a choice on validation (e.g. Dream's names for remasking rules)."""
    source: str = "fixed"
    """Where an unset (None) value comes from: "model" (the model's GenerationDefaults field of the same name),
    "fixed" (this field's default), "random" (drawn per request)."""
    api: bool = True
    """Exposed over HTTP, as CLI flags and server-wide defaults, and in the SDK; False: engine-only."""
    http: bool | None = None
    """An HTTP request field (None: as `api`). http=True with api=False: a request field the server maps itself
    (structured_outputs, read together with its OpenAI-shaped aliases), with no CLI flag or server default."""
    nullable: bool = True
    """None accepted (it means: take the default)."""
    what: str | None = None
    """How the valid range is said in errors (default: from lo/hi)."""
    http_lo: float | None = None
    http_hi: float | None = None
    """The HTTP schema's bounds where they differ (wire format: seeds are int64; top_k -1 means off)."""
    convert: Callable[[Any], Any] | None = None
    """kind "object": the value's validation and normal form (raises a RequestError naming the field)."""
    json_schema: Callable[[], dict[str, Any]] | None = None
    """kind "object": the JSON Schema of its HTTP form (what `convert` takes), for /openapi.json."""

    def choice_values(self) -> tuple[str, ...]:
        return self.choices() if callable(self.choices) else tuple(self.choices)

    def alias_map(self) -> dict[str, str]:
        return self.aliases() if self.aliases is not None else {}

    def range_text(self) -> str:
        if self.what is not None:
            return self.what
        if self.kind == "choice":
            return f"one of {', '.join(self.choice_values())}"
        noun = "an integer" if self.kind == "int" else "a number"
        if self.hi is None or math.isinf(self.hi):
            return f"{noun} {'>' if self.lo_open else '>='} {self.lo:g}"
        return (f"{noun} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
                if self.kind == "float" else f"{noun} in [{self.lo}, {self.hi}]")


def param(default: Any, kind: str, help: str, **spec: Any) -> Any:
    """A SamplingParams field with its schema."""
    return field(default=default, metadata={"spec": ParamSpec(kind, help, **spec)})


@functools.cache
def specs(cls: type) -> dict[str, tuple[ParamSpec, Any]]:
    """name -> (spec, default) of every field of a schema dataclass, in declaration order."""
    return {f.name: (f.metadata["spec"], f.default) for f in dataclasses.fields(cls) if "spec" in f.metadata}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_value(name: str, spec: ParamSpec, v: Any, limits: dict[str, Any]) -> Any:
    """The validated (normalised) value of one field; raises SamplingParamsError naming it."""
    if v is None:
        if spec.nullable:
            return None
        raise SamplingParamsError(name, f"must be {spec.range_text()}, got None")
    if spec.kind in ("int", "float"):
        ok = _is_int(v) if spec.kind == "int" else _is_num(v)
        lo, hi = spec.lo, spec.hi
        if ok and lo is not None:
            ok = lo < v if spec.lo_open else lo <= v
        if ok and hi is not None:
            ok = v < hi if spec.hi_open else v <= hi
        if not ok:
            raise SamplingParamsError(name, f"must be {spec.range_text()}, got {v!r}")
        return v
    if spec.kind == "bool":
        if not isinstance(v, bool):
            raise SamplingParamsError(name, f"must be a boolean, got {v!r}")
        return v
    if spec.kind == "choice":
        c = spec.alias_map().get(v, v) if isinstance(v, str) else None
        if c not in spec.choice_values():
            raise SamplingParamsError(name, f"must be {spec.range_text()}, got {v!r}")
        return c
    if spec.kind == "stop":
        stop = [v] if isinstance(v, str) else list(v) if isinstance(v, tuple) else v
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise SamplingParamsError(name, f"must be a non-empty string or a list of them, got {v!r}")
        if len(stop) > limits["max_stop_strings"]:
            raise SamplingParamsError(name, f"at most {limits['max_stop_strings']} stop strings, got {len(stop)}")
        if max(map(len, stop), default=0) > limits["max_stop_length"]:
            raise SamplingParamsError(name, f"each stop string must be at most {limits['max_stop_length']} "
                                            f"characters")
        return stop
    if spec.kind == "object" and spec.convert is not None:
        return spec.convert(v)
    raise AssertionError(f"unknown parameter kind {spec.kind!r}")


# derived views ----------------------------------------------------------------------------------------------------
def _schema() -> dict[str, tuple[ParamSpec, Any]]:
    from .sampling_params import SamplingParams
    return specs(SamplingParams)


def api_specs() -> dict[str, tuple[ParamSpec, Any]]:
    """The fields requests may set (HTTP, CLI, server defaults, SDK), in declaration order."""
    return {k: v for k, v in _schema().items() if v[0].api}


def api_names() -> tuple[str, ...]:
    return tuple(api_specs())


def http_specs() -> dict[str, tuple[ParamSpec, Any]]:
    """The HTTP request fields of the schema (server/protocol.py): the api fields and the http-only ones."""
    return {k: v for k, v in _schema().items() if (v[0].api if v[0].http is None else v[0].http)}


def fixed_defaults() -> dict[str, Any]:
    """The value each request field whose default is not the model's takes when unset."""
    return {k: d for k, (s, d) in api_specs().items() if s.source != "model"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_cli_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per request field (`--max-tokens`, ...); unset flags stay None (the model's default) except the
    fields with a fixed default, which start at it."""
    for name, (spec, default) in api_specs().items():
        help = spec.help + (f" ({' | '.join(spec.choice_values())})" if spec.kind == "choice" else "")
        help = help.replace("%", "%%")
        if spec.kind == "bool":
            group.add_argument(flag(name), action="store_true", help=help)
        elif spec.kind == "stop":
            group.add_argument(flag(name), action="append", help=help + " (repeatable)")
        else:
            kind = {"int": int, "float": float, "choice": str}[spec.kind]
            group.add_argument(flag(name), type=kind, default=default, help=help)


def markdown_table() -> str:
    """README's table of request fields (tests/test_schema.py checks README holds the current one)."""
    src = {"model": "model", "fixed": "", "random": "random"}
    rows = ["| field | valid values | unset | meaning |", "|---|---|---|---|"]
    for name, (spec, default) in _schema().items():
        if spec.kind == "choice":
            valid = ", ".join(f"`{c}`" for c in spec.choice_values())
        elif spec.kind == "stop":
            valid = "string or list of strings"
        elif spec.kind in ("bool", "object"):
            valid = {"bool": "boolean", "object": "see engine/constraints"}[spec.kind]
        else:
            valid = spec.range_text()
        unset = src[spec.source] or ("" if default is None else f"`{default!r}`")
        api = "" if spec.api else " (HTTP and Python API)" if spec.http else " (Python API only)"
        rows.append(f"| `{name}` | {valid} | {unset} | {spec.help.replace('|', chr(92) + '|')}{api} |")
    return "\n".join(rows) + "\n"


# the SDK's typed keyword arguments ---------------------------------------------------------------------------------
SDK_LITERALS = {"remasking": "Remasking", "cache": "CacheMode", "algorithm": "Algorithm", "editing": "Editing"}
"""Names of the SDK's Literal aliases for the choice fields."""


def sdk_source() -> str:
    """clients/python/unmask_client/params.py: the request options as a TypedDict (torch-free, typed)."""
    out = ['"""Request options of the unmask server, generated from the engine\'s request schema (engine/param_schema.py);',
           "tests/test_schema.py checks it is current. Do not edit by hand; regenerate with",
           f"    {GENERATED}",
           '"""', "from __future__ import annotations", "", "from typing import Literal, Union", "",
           "from typing_extensions import TypedDict", ""]
    items = api_specs()
    for name, (spec, _) in items.items():
        if spec.kind == "choice":
            values = (*spec.choice_values(), *spec.alias_map())
            out.append(f"{SDK_LITERALS[name]} = Literal[{', '.join(repr(v) for v in values)}]")
    out += ["", "", "class SamplingOptions(TypedDict, total=False):",
            '    """Sampling and diffusion options (unset: the server\'s defaults, then the model\'s)."""']
    types = {"int": "int", "float": "float", "bool": "bool", "stop": "Union[str, list[str]]"}
    for name, (spec, _) in items.items():
        t = SDK_LITERALS[name] if spec.kind == "choice" else types[spec.kind]
        out.append(f"    {name}: {t} | None")
        out += textwrap.wrap(f'"""{spec.help}"""', 116, initial_indent="    ", subsequent_indent="    ")
    out += ["", "", "SAMPLING_OPTIONS = ("]
    out += textwrap.wrap(", ".join(repr(n) for n in items) + ")", 116, initial_indent="    ",
                         subsequent_indent="    ")
    return "\n".join(out) + "\n"


GENERATED = "python -c 'import engine.param_schema as s; s.regenerate()'"
"""The command that rewrites the files generated from the schema and the registry."""


def regenerate(root: str | None = None) -> None:
    """Rewrite clients/python/unmask_client/params.py and README.md's generated tables (between their markers)."""
    from pathlib import Path

    from .decoding.registry import markdown_table as rules_table
    base = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    (base / "clients/python/unmask_client/params.py").write_text(sdk_source())
    readme = (base / "README.md").read_text()
    for marker, table in (("schema:params", markdown_table()), ("registry:rules", rules_table())):
        start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
        a, b = readme.index(start) + len(start), readme.index(end)
        readme = readme[:a] + table + readme[b:]
    (base / "README.md").write_text(readme)

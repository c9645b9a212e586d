"""StructuredOutputs: what a request's output must match (JSON schema, regex, choice, grammar, any JSON object),
validated on construction and turned into one llguidance grammar text (`grammar_text`).

Exactly one option is set. The field names follow vLLM's `structured_outputs` object:
- json: a JSON schema (dict, or its JSON text); the output is one JSON value valid against it (strict JSON: no
  NaN/Infinity, compact separators, no free whitespace);
- regex: the whole output matches it (Rust `regex` syntax, as llguidance reads it; anchored at both ends);
- choice: the output is exactly one of these strings;
- grammar: an llguidance Lark grammar (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md: Lark
  rules `start: ...`, string literals, /regex/ terminals, `%json {schema}` embedding);
- json_object: any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError

MAX_SPEC_CHARS = 1 << 20
"""Upper bound on a schema / regex / grammar text (characters); compilation is further bounded by llguidance's
parser limits (constraints/grammars.py)."""
MAX_CHOICES = 4096
OPTIONS = ("json", "regex", "choice", "grammar", "json_object")
JSON_OPTIONS = {"whitespace_flexible": False}
"""llguidance JSON compile options: compact JSON (',' and ':' separators), no free whitespace."""


class StructuredOutputsError(RequestError):
    """An invalid structured-output option; `.param` names the request field (e.g. structured_outputs.regex)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}", param)
        self.field = param


@dataclass(frozen=True)
class StructuredOutputs:
    json: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    param: str = "structured_outputs"
    """The request field this came from, used to name it in errors (response_format, tools, ...)."""

    def __post_init__(self) -> None:
        p = self.param
        set_ = [k for k in OPTIONS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise StructuredOutputsError(p, f"set exactly one of {', '.join(OPTIONS)}"
                                            + (f" (got {', '.join(set_)})" if set_ else ""))
        if self.json is not None:
            if isinstance(self.json, str):
                if len(self.json) > MAX_SPEC_CHARS:
                    raise StructuredOutputsError(f"{p}.json", f"longer than {MAX_SPEC_CHARS} characters")
                try:
                    schema = _json.loads(self.json)
                except (ValueError, RecursionError) as e:
                    raise StructuredOutputsError(f"{p}.json", f"not valid JSON ({e})") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise StructuredOutputsError(f"{p}.json", f"must be a JSON schema object, got {type(schema).__name__}")
            try:
                text = _json.dumps(schema)  # the cache key; property order kept
            except (ValueError, TypeError, RecursionError) as e:
                raise StructuredOutputsError(f"{p}.json", f"not a JSON schema ({type(e).__name__}: "
                                                          f"{str(e)[:200]})") from None
            if len(text) > MAX_SPEC_CHARS:
                raise StructuredOutputsError(f"{p}.json", f"longer than {MAX_SPEC_CHARS} characters")
            object.__setattr__(self, "json", text)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                raise StructuredOutputsError(f"{p}.{name}", f"must be a non-empty string, got {v!r:.80}")
            if isinstance(v, str) and len(v) > MAX_SPEC_CHARS:
                raise StructuredOutputsError(f"{p}.{name}", f"longer than {MAX_SPEC_CHARS} characters")
        if self.choice is not None:
            c = self.choice
            if not isinstance(c, (list, tuple)) or not c:
                raise StructuredOutputsError(f"{p}.choice", "must be a non-empty list of strings")
            if not all(isinstance(s, str) for s in c):
                raise StructuredOutputsError(f"{p}.choice", "must be a list of strings")
            if len(c) > MAX_CHOICES or sum(map(len, c)) > MAX_SPEC_CHARS:
                raise StructuredOutputsError(f"{p}.choice", f"at most {MAX_CHOICES} choices of "
                                                            f"{MAX_SPEC_CHARS} characters in all")
            object.__setattr__(self, "choice", tuple(c))
        if self.json_object not in (None, True, False):
            raise StructuredOutputsError(f"{p}.json_object", f"must be a boolean, got {self.json_object!r}")

    @property
    def option(self) -> str:
        """The option that is set (json, regex, choice, grammar or json_object)."""
        return next(k for k in OPTIONS if getattr(self, k) not in (None, False))

    @property
    def field_param(self) -> str:
        """The request field to name in an error about this constraint's content."""
        return self.param if self.param != "structured_outputs" else f"{self.param}.{self.option}"

    def grammar_text(self) -> str:
        """The llguidance grammar (not yet checked: constraints.grammars.compile does that)."""
        from llguidance import LLMatcher

        option = self.option
        if option == "json":
            return LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
        if option == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if option == "regex":
            return LLMatcher.grammar_from_regex(self.regex)
        if option == "choice":
            alts = " | ".join(_json.dumps(c, ensure_ascii=False) for c in self.choice)
            return LLMatcher.grammar_from_lark(f"start: {alts}\n")
        return LLMatcher.grammar_from_lark(self.grammar)

    @classmethod
    def from_dict(cls, value: Any, param: str = "structured_outputs") -> "StructuredOutputs":
        """From vLLM's JSON object {json | regex | choice | grammar | json_object}; unknown keys are refused."""
        if isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, dict):
            raise StructuredOutputsError(param, f"must be an object with one of {', '.join(OPTIONS)}")
        unknown = sorted(set(value) - set(OPTIONS))
        if unknown:
            raise StructuredOutputsError(f"{param}.{unknown[0]}", f"unknown option (expected one of "
                                                                  f"{', '.join(OPTIONS)})")
        return cls(**{k: v for k, v in value.items() if v is not None}, param=param)

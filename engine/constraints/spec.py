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

The OpenAI-shaped request fields that mean the same are read here too, so every form is validated by this one
module: `from_response_format` (response_format: text | json_object | json_schema) and `tool_functions` /
`tool_call` (tools and a forced tool_choice). The JSON Schemas the HTTP API documents for these fields
(`json_schema`, RESPONSE_FORMAT_SCHEMA, TOOLS_SCHEMA) sit beside the code that accepts them.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

from ..errors import FieldError

MAX_SPEC_CHARS = 1 << 20
"""Upper bound on a schema / regex / grammar text (characters); compilation is further bounded by llguidance's
parser limits (constraints/grammars.py)."""
MAX_CHOICES = 4096
MAX_TOOLS = 128
OPTIONS = ("json", "regex", "choice", "grammar", "json_object")
JSON_OPTIONS = {"whitespace_flexible": False}
"""llguidance JSON compile options: compact JSON (',' and ':' separators), no free whitespace."""


class StructuredOutputsError(FieldError):
    """An invalid structured-output option; `.param` (also `.field`) names the request field (e.g.
    structured_outputs.regex)."""


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

    @classmethod
    def from_response_format(cls, rf: Any) -> "StructuredOutputs | None":
        """From OpenAI's response_format: {"type": "text"} (None: unconstrained), {"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise StructuredOutputsError("response_format", "must be {\"type\": \"text\" | \"json_object\" | "
                                                            "\"json_schema\"}")
        if rf["type"] == "text":
            return None
        if rf["type"] == "json_object":
            return cls(json_object=True, param="response_format")
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise StructuredOutputsError("response_format.json_schema", "must be {\"name\", \"schema\": {...}, "
                                                                        "\"strict\"} with a schema object")
        return cls(json=js["schema"], param="response_format.json_schema.schema")

    @classmethod
    def tool_call(cls, functions: dict[str, dict[str, Any]], name: str | None = None) -> "StructuredOutputs":
        """A forced call of one of `functions` ({name: parameters schema}, from tool_functions): the named one's
        arguments, or with name None ("required") {"name": <one of them>, "arguments": <its parameters>}."""
        if name is not None:
            return cls(json=functions[name], param=f"tools[{name}].parameters")
        return cls(json={"anyOf": [
            {"type": "object", "properties": {"name": {"const": n}, "arguments": p}, "required": ["name", "arguments"],
             "additionalProperties": False} for n, p in functions.items()]}, param="tools")

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """The JSON Schema of the `structured_outputs` object as the HTTP API documents it (what from_dict takes;
        that exactly one option is set is checked on construction)."""
        text = {"type": "string", "minLength": 1}
        return {"type": "object", "additionalProperties": False, "properties": {
            "json": {"anyOf": [{"type": "object"}, {"type": "boolean"}, {"type": "string"}, {"type": "null"}],
                     "description": "A JSON schema (or its JSON text): the output is one JSON value valid against it."},
            "regex": {"anyOf": [text, {"type": "null"}], "description": "The whole output matches it."},
            "choice": {"anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"type": "null"}],
                       "description": "The output is exactly one of these strings."},
            "grammar": {"anyOf": [text, {"type": "null"}], "description": "An llguidance Lark grammar."},
            "json_object": {"anyOf": [{"type": "boolean"}, {"type": "null"}],
                            "description": "true: any JSON object."}}}


def tool_functions(tools: Any) -> dict[str, dict[str, Any]]:
    """{name: parameters schema} of OpenAI function tools [{"type": "function", "function": {name, description,
    parameters}}]; raises StructuredOutputsError naming the tool."""
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise StructuredOutputsError("tools", f"must be a list of at most {MAX_TOOLS} function tools")
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise StructuredOutputsError(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": "
                                                        "{\"name\", \"parameters\"}}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise StructuredOutputsError(f"tools[{i}].function.parameters", "must be a JSON schema object")
        if fn["name"] in out:
            raise StructuredOutputsError(f"tools[{i}].function.name", f"duplicate function name {fn['name']!r}")
        out[fn["name"]] = params
    return out


RESPONSE_FORMAT_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"type": "string", "enum": ["text"]}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"type": "string", "enum": ["json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"type": "string", "enum": ["json_schema"]},
        "json_schema": {"type": "object", "required": ["schema"], "properties": {
            "name": {"description": "A name for the schema (unused)."}, "schema": {"type": "object"},
            "strict": {"description": "Accepted: the output always follows the schema."}}}}},
    {"type": "null"}]}
"""What from_response_format takes (the HTTP API's documented schema of response_format)."""
TOOLS_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "array", "maxItems": MAX_TOOLS, "items": {
        "type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "minLength": 1}, "description": {"description": "Shown to the model."},
                "parameters": {"type": "object"}}}}}},
    {"type": "null"}]}
"""What tool_functions takes (the HTTP API's documented schema of tools)."""

"""Structured-output request fields -> one engine constraint, and forced tool calls back to OpenAI tool_calls.

Request fields (chat and completions): OpenAI `response_format` (text | json_object | json_schema {name, schema,
strict}) and vLLM `structured_outputs` {json | regex | choice | grammar | json_object}; chat also takes `tools` and
`tool_choice`:
- "none": no tool call (tools are still rendered into the prompt when the template supports them);
- "auto" (the default with tools): the tools are rendered into the prompt when the chat template supports them
  and the output is left unconstrained; its text comes back as `content` (this server does not parse
  model-specific free-text tool-call formats, so a model whose template has no tool format simply answers);
- "required": the output is one call of one of the tools: {"name": <one of them>, "arguments": <its parameters>};
- {"type": "function", "function": {"name": N}}: the output is N's arguments (a JSON object valid against its
  parameters).
A forced call comes back as message.tool_calls = [{id, type: "function", function: {name, arguments}}] with content
null and finish_reason "tool_calls"; streamed as OpenAI does (ToolStream): the id and name first, then argument
fragments as blocks complete.
Every error is a 400 naming the field, raised before anything is queued; grammars compile off the event loop
under COMPILE_TIMEOUT_S.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from engine.constraints.spec import StructuredOutputs, StructuredOutputsError, tool_functions

from .errors import bad_request

COMPILE_TIMEOUT_S = 10.0
"""Wall-clock bound on compiling one request's grammar (llguidance's parser limits bound the work itself)."""


_REQUIRED_HEAD = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')
"""The start of a "required" call as the compact JSON grammar writes it: {"name":"<name>","arguments":"""


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """A forced tool call: `name` set (named function; the output is its arguments) or None ("required": the
    output is {"name", "arguments"})."""
    name: str | None

    def head(self, text: str) -> tuple[str, int] | None:
        """(function name, where its arguments start in text) once the text says so, else None."""
        if self.name is not None:
            return self.name, 0
        m = _REQUIRED_HEAD.match(text)
        return (json.loads(m.group(1)), m.end()) if m else None

    def arguments(self, text: str, start: int) -> str:
        """The arguments text so far: a "required" call's last character is held back (the wrapper's closing
        brace at the end; while the text grows it may still be one)."""
        return text[start:] if self.name is not None else text[start:-1]

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI tool_calls of a finished output, or None when it is not a complete call."""
        try:
            json.loads(text)
        except ValueError:
            return None
        head = self.head(text)
        if head is None:
            return None
        return [{"id": new_call_id(), "type": "function",
                 "function": {"name": head[0], "arguments": self.arguments(text, head[1])}}]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolStream:
    """One choice's forced call as OpenAI streams it: a first delta with id, type and name (arguments ""), then
    argument fragments as the text grows; concatenated, the fragments are the blocking answer's arguments."""

    def __init__(self, calls: ToolCalls) -> None:
        self.calls, self.head, self.sent = calls, None, 0

    def deltas(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.head is None:
            self.head = self.calls.head(text)
            if self.head is None:
                return out
            out.append({"index": 0, "id": new_call_id(), "type": "function",
                        "function": {"name": self.head[0], "arguments": ""}})
        args = self.calls.arguments(text, self.head[1])
        if len(args) > self.sent:
            out.append({"index": 0, "function": {"arguments": args[self.sent:]}})
            self.sent = len(args)
        return out


def request_constraint(req: Any) -> tuple[StructuredOutputs | None, ToolCalls | None]:
    """The request's constraint (None: unconstrained) and its forced tool call, if any; 400s name the field. Every
    form is read and validated by engine/constraints/spec.py."""
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    rf, so = getattr(req, "response_format", None), getattr(req, "structured_outputs", None)
    if choice is not None and not tools:
        raise bad_request("tool_choice needs a non-empty `tools` list", "tool_choice")
    try:
        functions = tool_functions(tools) if tools else {}
        calls: ToolCalls | None = None
        spec: StructuredOutputs | None = None
        if choice is None or choice in ("none", "auto"):
            pass
        elif choice == "required":
            calls, spec = ToolCalls(None), StructuredOutputs.tool_call(functions)
        elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"),
                                                                                          dict):
            name = choice["function"].get("name")
            if name not in functions:
                raise bad_request(f"tool_choice names function {name!r}, which is not in tools "
                                  f"({', '.join(functions)})", "tool_choice")
            calls, spec = ToolCalls(name), StructuredOutputs.tool_call(functions, name)
        else:
            raise bad_request("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                              "\"function\": {\"name\": ...}}", "tool_choice")
        if rf is not None and so is not None:
            raise bad_request("set either response_format or structured_outputs, not both", "structured_outputs")
        own = StructuredOutputs.from_response_format(rf) if rf is not None else (
            StructuredOutputs.from_dict(so, "structured_outputs") if so is not None else None)
    except StructuredOutputsError as e:
        raise bad_request(str(e), e.param)
    if own is not None and spec is not None:
        raise bad_request("a forced tool call cannot be combined with response_format / structured_outputs",
                          "tool_choice")
    return spec or own, calls


async def compile_checked(engine: Any, spec: StructuredOutputs) -> None:
    """Compile spec for the served model off the event loop (cached for the engine), within COMPILE_TIMEOUT_S;
    an invalid spec or a compilation that runs too long is a 400 naming the field."""
    compile_fn = getattr(engine, "compile_structured", None)
    if compile_fn is None:  # an EngineClient without a grammar backend: the engine checks at add time
        return
    try:
        await asyncio.wait_for(asyncio.to_thread(compile_fn, spec), COMPILE_TIMEOUT_S)
    except StructuredOutputsError as e:
        raise bad_request(str(e), e.param)
    except asyncio.TimeoutError:
        raise bad_request(f"{spec.field_param}: grammar compilation exceeded {COMPILE_TIMEOUT_S:g} s",
                          spec.field_param)

"""One declared request schema (SamplingParams' `param(...)` fields, engine/param_schema.py): the HTTP request
model and /openapi.json, the CLI flags and server-wide defaults, the server's field mapping, /v1/models'
diffusion_defaults and the SDK's typed options all follow it, and a new field declared once appears everywhere."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from engine import SamplingParams, SamplingParamsError
from engine.cli import build_parser, sampling_fields
from engine.decoding import registry
from engine.param_schema import (GENERATED, SDK_LITERALS, add_cli_flags, api_names, api_specs, fixed_defaults, param,
                                 sdk_source, specs)
from engine.sampling_params import GenerationDefaults
from server import protocol
from server.app import build_app
from server.config import ServerConfig
from server.serving import PARAM_FIELDS

from .server.fakes import FakeEngine
from .server.helpers import client, run

SDK_PARAMS = Path(__file__).resolve().parents[1] / "clients/python/unmask_client/params.py"


def test_sdk_options_are_generated_from_the_current_schema():
    assert SDK_PARAMS.read_text() == sdk_source(), f"run {GENERATED}"


def test_sdk_keyword_arguments_match_the_schema():
    """Names, value types and Literal choices of Client.chat's typed options against the schema and registry."""
    from unmask_client import AsyncClient, Client, params
    from unmask_client._base import ChatOptions, CompletionOptions
    hints = typing.get_type_hints(params.SamplingOptions)
    assert tuple(hints) == api_names() == params.SAMPLING_OPTIONS
    for name, (spec, _) in api_specs().items():
        args = set(typing.get_args(hints[name]))
        if spec.kind == "choice":
            lit = getattr(params, SDK_LITERALS[name])
            assert set(typing.get_args(lit)) == {*spec.choice_values(), *spec.alias_map()}
            assert lit in args
        elif spec.kind != "stop":
            assert {"int": int, "float": float, "bool": bool}[spec.kind] in args
    assert set(typing.get_args(params.Remasking)) >= set(registry.remasking_names())
    assert set(typing.get_args(params.Algorithm)) == set(registry.algorithm_names())
    # both clients take exactly these options (one shared TypedDict, no hand-kept keyword lists)
    assert set(api_names()) <= ChatOptions.__optional_keys__ and set(api_names()) <= CompletionOptions.__optional_keys__
    for cls in (Client, AsyncClient):
        for method in ("chat", "complete"):
            sig = typing.get_type_hints(getattr(cls, method), include_extras=True)["options"]
            assert typing.get_args(sig)[0] is (ChatOptions if method == "chat" else CompletionOptions)
    with pytest.raises(TypeError, match="temprature"):
        Client("http://127.0.0.1:1").chat([], temprature=0.5)


def openapi_schemas() -> dict:
    """/openapi.json's component schemas, from the app."""
    app = build_app(FakeEngine(), ServerConfig(served_model_names=["fake"]))

    async def main():
        async with client(app) as c:
            return (await c.get("/openapi.json")).json()

    return run(main())["components"]["schemas"]


def test_openapi_shows_every_field_with_its_range_enum_and_help():
    schema = openapi_schemas()
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        props = schema[request]["properties"]
        for name, (spec, _) in api_specs().items():
            p = props[name]
            assert spec.help.split(":")[0] in p["description"], (request, name)
            alts = p.get("anyOf", [p])
            if spec.kind == "choice":
                enum = next(a["enum"] for a in alts if "enum" in a)
                assert set(enum) == {*spec.choice_values(), *spec.alias_map()}
            if spec.kind in ("int", "float"):
                num = next(a for a in alts if a.get("type") in ("integer", "number"))
                lo = spec.http_lo if spec.http_lo is not None else spec.lo
                assert num.get("minimum", num.get("exclusiveMinimum")) == lo, (request, name)
                if spec.hi is not None and spec.hi != float("inf"):
                    assert num.get("maximum", num.get("exclusiveMaximum")) is not None, (request, name)
    assert "origin" in schema["ChatCompletionRequest"]["properties"]["remasking"]["anyOf"][0]["enum"]


def test_every_derived_list_follows_the_schema():
    names = api_names()
    assert set(PARAM_FIELDS) | {"max_tokens"} == set(names)
    assert sampling_fields() == names
    assert set(protocol.SamplingFields.model_fields) >= set(names) - {"max_tokens"}
    # fields whose unset value is the model's are exactly GenerationDefaults' fields
    model_sourced = {n for n, (s, _) in specs(SamplingParams).items() if s.source == "model"}
    assert model_sourced == {f.name for f in dataclasses.fields(GenerationDefaults)}
    # /v1/models diffusion_defaults: a value for every request field
    app = build_app(FakeEngine(), ServerConfig(served_model_names=["fake"]))

    async def main():
        async with client(app) as c:
            return (await c.get("/v1/models")).json()["data"][0]["diffusion_defaults"]

    defaults = run(main())
    assert set(names) - {"seed"} <= set(defaults) and defaults["cache"] == "none" and defaults["max_tokens"] == 6
    # CLI: one flag per field, choices listed in the help, fixed defaults as flag defaults
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {a.dest: a for a in gen._actions}
    assert set(names) <= set(flags)
    assert all(r in flags["remasking"].help for r in registry.remasking_names())
    # cache: unset = the family's (block for LLaDA2, main's block-diffusion merge), so no fixed flag default
    assert flags["cache"].default is None and flags["cfg_scale"].default == 0.0


def test_validation_runs_once_and_again_only_after_a_mutation(monkeypatch):
    calls = []
    real = SamplingParams._validate
    monkeypatch.setattr(SamplingParams, "_validate", lambda self: (calls.append(1), real(self))[1])
    p = SamplingParams(max_tokens=4, stop="x")
    defaults = GenerationDefaults()
    p.resolve(defaults)
    assert len(calls) == 1 and p.stop == ["x"]
    p.top_p = 0.0
    with pytest.raises(SamplingParamsError, match="top_p"):
        p.resolve(defaults)
    assert len(calls) == 2


def test_a_new_field_declared_once_appears_in_every_derived_place(monkeypatch):
    """A plain field added to the schema (here by extending SamplingParams) is validated, becomes an HTTP field
    with its bounds and help, a CLI flag, a server-wide default and an SDK option, with no other edit."""

    @dataclasses.dataclass
    class Extended(SamplingParams):
        shade: float = param(0.25, "float", "A toy knob.", lo=0, hi=2)

    import engine.param_schema as schema_mod
    monkeypatch.setattr(schema_mod, "_schema", lambda: specs(Extended))
    with pytest.raises(SamplingParamsError) as e:
        Extended(shade=3.0)
    assert e.value.field == "shade"
    assert "shade" in api_names() and fixed_defaults()["shade"] == 0.25
    model = protocol.sampling_fields_model()
    field = model.model_json_schema()["properties"]["shade"]
    assert field["description"].startswith("A toy knob.")
    assert field["anyOf"][0]["maximum"] == 2
    with pytest.raises(Exception):
        model(shade=5)
    p = argparse.ArgumentParser()
    add_cli_flags(p.add_argument_group())
    assert p.parse_args(["--shade", "1.5"]).shade == 1.5 and p.parse_args([]).shade == 0.25
    assert "    shade: float | None" in sdk_source()


def test_readme_tables_are_generated_from_the_schema_and_registry():
    from engine.decoding.registry import markdown_table as rules_table
    from engine.param_schema import markdown_table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"<!-- schema:params -->\n{markdown_table()}<!-- /schema:params -->" in readme, f"run {GENERATED}"
    assert f"<!-- registry:rules -->\n{rules_table()}<!-- /registry:rules -->" in readme, f"run {GENERATED}"


def test_structured_output_fields_are_documented_from_the_code_that_reads_them():
    """structured_outputs is an HTTP field of the schema (its help and JSON Schema from SamplingParams and
    engine/constraints/spec.py); response_format and tools are documented with spec.py's schemas. Whatever those
    documented schemas refuse, spec.py's readers refuse too (so the docs never promise more than is accepted)."""
    import jsonschema

    from engine.constraints.spec import (RESPONSE_FORMAT_SCHEMA, TOOLS_SCHEMA, StructuredOutputs,
                                         StructuredOutputsError, tool_functions)
    spec, _ = specs(SamplingParams)["structured_outputs"]
    assert "structured_outputs" not in api_names()  # no CLI flag, server default or plain mapping
    schema = openapi_schemas()
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        so = schema[request]["properties"]["structured_outputs"]
        assert so["description"] == spec.help and so["anyOf"][0] == StructuredOutputs.json_schema()
        assert schema[request]["properties"]["response_format"]["anyOf"] == RESPONSE_FORMAT_SCHEMA["anyOf"]
    assert schema["ChatCompletionRequest"]["properties"]["tools"]["anyOf"] == TOOLS_SCHEMA["anyOf"]

    def documented(value, doc) -> bool:
        try:
            jsonschema.validate(value, doc)
            return True
        except jsonschema.ValidationError:
            return False

    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = [  # (reader, documented schema, value)
        *[(StructuredOutputs.from_dict, {"anyOf": [StructuredOutputs.json_schema(), {"type": "null"}]}, v) for v in (
            {"json": {"type": "object"}}, {"json": '{"type": "integer"}'}, {"regex": "[0-9]+"}, {"choice": ["a", "b"]},
            {"grammar": "start: \"x\""}, {"json_object": True}, {"json": 5}, {"regex": ""}, {"regex": 3},
            {"choice": []}, {"choice": ["a", 1]}, {"grammar": ["x"]}, {"json_object": "yes"}, {"lark": "x"},
            {"regex": "a", "flags": 1}, [], "regex")],
        *[(StructuredOutputs.from_response_format, RESPONSE_FORMAT_SCHEMA, v) for v in (
            {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {}}},
            {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 1}},
            {"type": "json_schema", "json_schema": {"name": "n"}}, {}, [], "json_object")],
        *[(tool_functions, TOOLS_SCHEMA, v) for v in (
            [fn], [fn, {**fn, "function": {"name": "g"}}], [{"type": "function", "function": {}}],
            [{"type": "tool", "function": {"name": "f"}}], [{"type": "function", "function": {"name": ""}}],
            [{"type": "function", "function": {"name": "f", "parameters": []}}], [fn] * 129, {"type": "function"},
            ["f"])],
    ]
    for reader, doc, value in cases:
        if not documented(value, doc):
            with pytest.raises(StructuredOutputsError):
                reader(value)
    assert sum(not documented(v, d) for _, d, v in cases) >= 20  # the refusals are exercised

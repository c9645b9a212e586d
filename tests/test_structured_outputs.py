"""Structured outputs (engine/constraints): random-weight models whose unconstrained output is gibberish, so the
constraint does all the work. Every answer is checked by an independent validator (the `jsonschema` package,
`re.fullmatch`, set membership), across schedules, block lengths, threshold/factor, cache modes, remasking rules,
temperatures and seeds; unconstrained requests batched with constrained ones are token-for-token unchanged."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.constraints.spec import StructuredOutputs, StructuredOutputsError
from engine.sampling_params import SamplingParamsError

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["color", "tags"]},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                 "y": {"type": ["integer", "null"]}},
                                                "required": ["x", "y"]},
                                      "ok": {"type": "boolean"}},
     "required": ["inner", "ok"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 99},
                                                      {"type": "string", "pattern": "^[a-z]{2,4}$"}]},
                                      "n": {"type": "null"}},
     "required": ["v", "n"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
]
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z ]{3,12}\.", r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})?"]
CHOICES = [["positive", "negative", "neutral"], ["A", "BB", "A B", "{\"q\": 1}"]]


@pytest.fixture(scope="module")
def llms(make_checkpoint):
    return {fam: LLM(make_checkpoint(fam), dtype="float32", kv_cache_memory=1 << 24, page_size=4)
            for fam in ("llada", "dream")}


def random_params(rng: random.Random, family: str, **kw) -> SamplingParams:
    """A random decoding configuration (schedule, blocks, parallel rule, cache, scoring)."""
    gen = kw.pop("max_tokens", rng.choice([40, 48, 64]))
    block = rng.choice([4, 7, 16, gen])
    rule = rng.choice(["fixed", "fixed", "threshold", "factor"])
    remasking = rng.choice(["low_confidence", "margin", "entropy", "random"]
                           + (["origin"] if family == "dream" and rule == "fixed" else []))
    out = dict(max_tokens=gen, block_length=block, steps=rng.choice([gen, max(gen // 2, 1), max(gen // 4, 1)]),
               remasking=remasking, cache=rng.choice(["none", "prefix", "dual"]),
               temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.randrange(1 << 30))
    if rule == "threshold":
        out["threshold"] = rng.choice([0.5, 0.9])
    elif rule == "factor":
        out["factor"] = 1.0
    return SamplingParams(**{**out, **kw})


def prompt(llm: LLM, rng: random.Random) -> list[int]:
    cfg = llm.model.config
    banned = {cfg.mask_id, *cfg.stop_ids}
    return [t for t in (rng.randrange(cfg.vocab_size) for _ in range(12)) if t not in banned][:rng.randint(3, 8)]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_json_schemas_always_valid(llms, family):
    llm, rng = llms[family], random.Random(f"schemas-{family}")
    prompts, params = [], []
    for schema in SCHEMAS:
        for _ in range(3):
            prompts.append(prompt(llm, rng))
            params.append(random_params(rng, family, structured_outputs=StructuredOutputs(json=schema)))
    outs = llm.generate(prompts, params)
    for i, out in enumerate(outs):
        schema = SCHEMAS[i // 3]
        assert out.finish_reason == "stop", (params[i], out.text)
        jsonschema.validate(json.loads(out.text), schema)  # strict JSON: json.loads refuses NaN below
        assert "NaN" not in out.text and "Infinity" not in out.text


def test_regexes_and_choices_always_valid(llms):
    llm, rng = llms["llada"], random.Random("regex")
    specs = [StructuredOutputs(regex=r) for r in REGEXES for _ in range(3)]
    specs += [StructuredOutputs(choice=c) for c in CHOICES for _ in range(3)]
    params = [random_params(rng, "llada", structured_outputs=s) for s in specs]
    outs = llm.generate([prompt(llm, rng) for _ in specs], params)
    for s, p, out in zip(specs, params, outs):
        assert out.finish_reason == "stop", (s, p, out.text)
        if s.regex is not None:
            assert re.fullmatch(s.regex, out.text), (s.regex, out.text)
        else:
            assert out.text in s.choice


def test_outputs_vary_with_seed_where_the_schema_leaves_freedom(llms):
    llm = llms["llada"]
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer"}}, "required": ["word", "n"]}
    ps = [SamplingParams(max_tokens=40, steps=40, block_length=8, temperature=1.0, seed=s,
                         structured_outputs=StructuredOutputs(json=schema)) for s in range(6)]
    texts = [o.text for o in llm.generate([[5, 6, 7]] * len(ps), ps)]
    for t in texts:
        jsonschema.validate(json.loads(t), schema)
    assert len(set(texts)) >= 3, texts
    again = llm.generate([[5, 6, 7]], ps[0])[0].text  # and the same seed gives the same answer
    assert again == texts[0]


def test_completes_in_a_tight_canvas_and_reports_length_when_nothing_fits(llms):
    """max_tokens = 2x the shortest answer in characters (>= 2x in tokens): always completes."""
    llm, rng = llms["llada"], random.Random("tight")
    schema = {"type": "object", "properties": {"key": {"type": "string"}, "list": {"type": "array"}},
              "required": ["key", "list"]}
    shortest = '{"key":"","list":[]}'
    specs = [random_params(rng, "llada", max_tokens=2 * len(shortest), temperature=1.0,
                           structured_outputs=StructuredOutputs(json=schema)) for _ in range(8)]
    for out in llm.generate([prompt(llm, rng) for _ in specs], specs):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    out = llm.generate([[5, 6]], SamplingParams(max_tokens=3, structured_outputs=StructuredOutputs(json=schema)))[0]
    assert out.finish_reason == "length"


TIGHT = [  # (spec, a shortest valid answer): canvases of twice its length in characters
    ({"json": {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "minItems": 2},
                                                "b": {"type": "string", "minLength": 3}}, "required": ["a", "b"]}},
     '{"a":[0,0],"b":"aaa"}'),
    ({"json": {"type": "object", "properties": {"o": {"type": "object", "properties": {
        "x": {"type": "null"}, "y": {"type": "boolean"}}, "required": ["x", "y"]}}, "required": ["o"]}},
     '{"o":{"x":null,"y":true}}'),
    ({"regex": r"[a-z]+@[a-z]+\.com"}, "a@b.com"),
    ({"regex": r"(ab)*c"}, "c"),  # a loop whose exit the closing path must find
    ({"json": {"anyOf": [{"type": "string", "pattern": "^x+$"}, {"type": "array", "items": {"type": "number"}}]}},
     "[]"),
    ({"grammar": 'start: "(" item ("," item)* ")"\nitem: /[0-9]+/ | start\n'}, "(0)"),  # recursive
]


def test_tight_canvases_complete_for_every_kind_of_constraint(llms):
    llm, rng = llms["llada"], random.Random("tight-kinds")
    specs, params = [], []
    for spec, shortest in TIGHT:
        for _ in range(3):
            specs.append(spec)
            params.append(random_params(rng, "llada", max_tokens=2 * len(shortest), temperature=1.0,
                                        structured_outputs=spec))
    for spec, p, out in zip(specs, params, llm.generate([prompt(llm, rng) for _ in params], params)):
        assert out.finish_reason == "stop", (spec, p, out.text)
        if "json" in spec:
            jsonschema.validate(json.loads(out.text), spec["json"])
        elif "regex" in spec:
            assert re.fullmatch(spec["regex"], out.text), (spec, out.text)
        else:
            assert _nested_tuple(out.text), out.text


def _nested_tuple(text: str) -> bool:
    """Recursive-descent check of start: "(" item ("," item)* ")", item: /[0-9]+/ | start."""
    def group(i: int) -> int:
        if i >= len(text) or text[i] != "(":
            return -1
        i = item(i + 1)
        while i > 0 and i < len(text) and text[i] == ",":
            i = item(i + 1)
        return i + 1 if i > 0 and i < len(text) and text[i] == ")" else -1

    def item(i: int) -> int:
        m = re.match(r"[0-9]+", text[i:])
        return i + m.end() if m else group(i)

    return group(0) == len(text)


def test_compiled_grammars_are_cached(llms):
    from engine.constraints.build import compile_for
    from engine.constraints.grammars import GRAMMARS

    model = llms["llada"].model
    spec = StructuredOutputs(regex="[0-9]{2,5}x")
    first, _ = compile_for(spec, model)
    hits = GRAMMARS.hits
    again, _ = compile_for(StructuredOutputs(regex="[0-9]{2,5}x"), model)
    assert again is first and GRAMMARS.hits == hits + 1


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(llms):
    """Batch invariance at temperature 0: the same tokens alone and next to constrained requests."""
    llm, rng = llms["llada"], random.Random("invariance")
    plain = [(prompt(llm, rng), random_params(rng, "llada", temperature=0.0, ignore_eos=True)) for _ in range(3)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in plain]
    cons = [(prompt(llm, rng), random_params(rng, "llada", structured_outputs=StructuredOutputs(json=s)))
            for s in SCHEMAS[:3]]
    mixed = [*plain[:1], *cons[:2], *plain[1:], cons[2]]
    outs = llm.generate([p for p, _ in mixed], [sp for _, sp in mixed])
    got = [outs[0].token_ids, outs[3].token_ids, outs[4].token_ids]
    assert got == alone


def test_parallel_decoding_survives_the_constraint(llms):
    """With a threshold, the schema's forced text commits several tokens per step."""
    llm = llms["llada"]
    schema = {"type": "object", "properties": {"first_name": {"type": "string", "maxLength": 4},
                                               "last_name": {"type": "string", "maxLength": 4}},
              "required": ["first_name", "last_name"]}
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=48, block_length=48, steps=48, threshold=0.9,
                                                   structured_outputs=StructuredOutputs(json=schema)))[0]
    jsonschema.validate(json.loads(out.text), schema)
    assert out.stats.tokens_per_forward > 1.5, (out.stats, out.text)


def test_grammar_option_uses_llguidance_lark(llms):
    llm = llms["llada"]
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,2}/\n'
    outs = llm.generate([[5, 6, 7]] * 3, [SamplingParams(max_tokens=24, temperature=1.0, seed=s, steps=12,
                                                         structured_outputs={"grammar": lark}) for s in range(3)])
    for o in outs:
        assert o.finish_reason == "stop" and re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", o.text), o.text


def test_json_object_and_ignore_eos(llms):
    llm = llms["llada"]
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=32, temperature=1.0, seed=3, ignore_eos=True,
                                                   structured_outputs={"json_object": True}))[0]
    assert isinstance(json.loads(out.text), dict)  # the EOS fill after the object decodes to nothing
    assert len(out.token_ids) == 32


@pytest.mark.parametrize("spec, param", [
    ({"json": {"type": "foo"}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"regex": "(a"}, "structured_outputs.regex"),
    ({"grammar": "start: missing_rule"}, "structured_outputs.grammar"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({"jsonn": {}}, "structured_outputs.jsonn"),
    ({"json": {"enum": ["x" * 100] * 20000}}, "structured_outputs.json"),  # too large
    ({"json": "[" * 100000 + "]" * 100000}, "structured_outputs.json"),  # nested too deep to read
])
def test_invalid_specs_are_refused_naming_the_field(llms, spec, param):
    llm = llms["llada"]
    with pytest.raises((StructuredOutputsError, SamplingParamsError)) as e:
        llm.generate([[5, 6]], SamplingParams(max_tokens=8, structured_outputs=spec))
    assert e.value.param == param, str(e.value)
    assert llm.engine.scheduler.has_unfinished() is False


@pytest.mark.slow
def test_bundled_model_keeps_its_accuracy_under_a_digit_regex():
    """The trained bundled model (sort / reverse digits) answers 50 held-out problems as well with its answer format
    enforced as without, at its default schedule and with a threshold."""
    from engine.bundled import DEFAULT_MODEL_DIR, task

    llm = LLM(DEFAULT_MODEL_DIR, dtype="float32")
    probs = task.make_problems(50, seed=5, split="held_out")
    convs = [task.messages_for(q) for q, _ in probs]
    regex = r"[0-9]( [0-9]){1,7}"
    for opts in ({}, {"threshold": 0.9}):
        plain = llm.chat(convs, SamplingParams(**opts))
        cons = llm.chat(convs, SamplingParams(**opts, structured_outputs={"regex": regex}))
        acc_plain = sum(task.check(q, o.text) for (q, _), o in zip(probs, plain))
        acc_cons = sum(task.check(q, o.text) for (q, _), o in zip(probs, cons))
        assert all(o.finish_reason == "stop" and re.fullmatch(regex, o.text) for o in cons)
        assert acc_plain >= 45 and acc_cons >= acc_plain, (opts, acc_plain, acc_cons)


def test_a_vocabulary_that_cannot_spell_the_grammar_is_refused():
    """The bundled model's vocabulary has digits and a few words only: a JSON object is refused up front."""
    from engine.bundled import DEFAULT_MODEL_DIR

    llm = LLM(DEFAULT_MODEL_DIR, dtype="float32")
    with pytest.raises(StructuredOutputsError) as e:
        llm.generate([[8, 9]], SamplingParams(max_tokens=8, structured_outputs={"json_object": True}))
    assert e.value.param == "structured_outputs.json_object" and "cannot spell" in str(e.value)


def test_stop_strings_do_not_cut_a_constrained_answer(llms):
    llm = llms["llada"]
    ps = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, stop=["a", "b", "c"],
                         structured_outputs={"regex": "[a-c]{6}"}) for s in range(3)]
    for out in llm.generate([[5, 6, 7]] * 3, ps):
        assert out.finish_reason == "stop" and re.fullmatch("[a-c]{6}", out.text), out.text


@pytest.mark.slow
def test_tensor_parallel_gives_the_same_constrained_answers(make_checkpoint, llms):
    """Two gloo ranks: constrained rows make rank 0 gather their logits; answers equal one process's."""
    path = make_checkpoint("llada")
    rng = random.Random("tp")
    one = llms["llada"]
    prompts = [prompt(one, rng) for _ in range(4)]
    params = [random_params(rng, "llada", temperature=0.0, structured_outputs={"json": SCHEMAS[i % 3]})
              for i in range(3)] + [random_params(rng, "llada", temperature=0.0, ignore_eos=True)]
    with LLM(path, tensor_parallel_size=2, parallel_timeout=60, dtype="float32", kv_cache_memory=1 << 24,
             page_size=4) as tp:
        a = tp.generate(prompts, params)
    b = one.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for out, p in zip(a[:3], params):
        jsonschema.validate(json.loads(out.text), json.loads(p.structured_outputs.json))

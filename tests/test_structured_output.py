"""Constrained decoding: JSON schemas and grammars on llguidance, from the mask kernel up
to the OpenAI client against Qwen2.5 and SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import jsonschema
import numpy as np
import openai
import pytest

from llamazip.runtime import constrained_decoding
from llamazip.runtime.constrained_decoding import ConstraintError, apply_mask, json_schema_grammar, text_grammar
from llamazip.runtime.engine import Engine, GenerationRequest
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.openai_api import Defaults
from llamazip.runtime.sampling import Sampler, SamplingParams
from llamazip.runtime.server import ApiServer
from llamazip.runtime.tokenizer import Tokenizer
from llamazip_server import running_server
from tiny_models import TinyLlama

SMALL = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["answer", "n"], "additionalProperties": False}
YES_NO = 'root ::= "yes" | "no"'


# --- the mask kernel and the sampler ------------------------------------------------------

@pytest.mark.parametrize("compiled", [True, False])
def test_the_mask_forbids_exactly_the_cleared_bits(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr(constrained_decoding, "numba_enabled", lambda: False)
    rng = np.random.default_rng(0)
    n = 1000  # not a multiple of 32, and longer than the mask below covers
    mask = rng.integers(-2 ** 31, 2 ** 31, size=30, dtype=np.int64).astype(np.int32)
    mask[3], mask[4] = -1, 0  # a word all allowed, a word all forbidden
    logits = rng.standard_normal(n)
    expected = logits.copy()
    bits = [(int(mask[i // 32]) >> (i % 32)) & 1 if i < 30 * 32 else 0 for i in range(n)]
    expected[np.array(bits) == 0] = -np.inf
    apply_mask(logits, mask)
    assert np.array_equal(logits, expected)


class _Forbids:
    """A constraint that forbids some tokens, counting how often it had to mask."""

    def __init__(self, forbidden: set[int]):
        self.forbidden, self.masks, self.accepted = forbidden, 0, []

    def allows(self, token):
        return token not in self.forbidden

    def mask(self, logits):
        self.masks += 1
        logits[list(self.forbidden)] = -np.inf

    def accept(self, token):
        self.accepted.append(token)


def test_sampling_first_then_checking_draws_from_the_masked_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    constraint = _Forbids({0})
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3), constraint)
    draws = np.array([sampler.sample(logits) for _ in range(6000)])
    assert 0 not in draws and constraint.accepted == draws.tolist()
    # Masked: 0.3 / 0.5 and 0.2 / 0.5; the mask was needed only when token 0 came first (about half the time).
    assert abs((draws == 1).mean() - 0.6) < 0.03
    assert 0.45 < constraint.masks / len(draws) < 0.55


def test_greedy_masks_only_when_the_best_token_is_forbidden():
    constraint = _Forbids({2})
    sampler = Sampler(SamplingParams(temperature=0.0), constraint)
    assert sampler.sample(np.array([0.0, 1.0, 0.5])) == 1 and constraint.masks == 0
    assert sampler.sample(np.array([0.0, 1.0, 5.0])) == 1 and constraint.masks == 1


# --- compiling schemas and grammars ---------------------------------------------------------

@pytest.mark.parametrize("schema, message", [
    ("{not json", "not valid JSON"),
    ('{"type": "bogus"}', "bogus"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {}}, "if"),
    ({"type": "integer", "minimum": 3, "maximum": 1}, "minimum"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}, "missing"),
    ([1, 2], "must be an object"),
])
def test_a_bad_schema_is_a_constraint_error(schema, message):
    with pytest.raises(ConstraintError, match="schema") as error:
        json_schema_grammar(schema, "json_schema")
    assert message in str(error.value) and error.value.param == "json_schema"


@pytest.mark.parametrize("grammar", ['root ::= "yes" | (', "root ::= missing_rule", "", "start: /[/"])
def test_a_bad_grammar_is_a_constraint_error(grammar):
    with pytest.raises(ConstraintError, match="grammar"):
        text_grammar(grammar, "grammar")


# --- generations on a tiny model ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return TinyLlama(seed=5).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_engine(tiny_path) -> Engine:
    gguf = GGUFFile(tiny_path)
    return Engine(Model(gguf), Tokenizer.from_metadata(gguf.metadata), None, "tiny")


def _answer(engine: Engine, grammar, max_tokens: int = 100, seed: int = 0) -> tuple[str, str]:
    request = GenerationRequest(SamplingParams(temperature=1.0, seed=seed), max_tokens=max_tokens, grammar=grammar)
    chunks = list(engine.generate(engine.tokenize("Answer:"), request))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_a_schema_constrains_a_random_model(tiny_engine):
    grammar = json_schema_grammar(SMALL)
    for seed in range(5):
        text, finish = _answer(tiny_engine, grammar, seed=seed)
        jsonschema.validate(json.loads(text), SMALL)
        assert finish == "stop"


def test_a_gbnf_grammar_constrains_a_random_model(tiny_engine):
    answers = {_answer(tiny_engine, text_grammar(YES_NO), seed=seed) for seed in range(6)}
    assert answers <= {("yes", "stop"), ("no", "stop")} and answers


def test_max_tokens_cuts_a_constrained_answer_with_length(tiny_engine):
    text, finish = _answer(tiny_engine, json_schema_grammar(SMALL), max_tokens=4)
    assert finish == "length" and len(text.encode()) == 4 and text.startswith('{"')


# --- the command line ------------------------------------------------------------------------

def _run(*args):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "llamazip", "run", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_json_schema_and_grammar_file(tiny_path, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SMALL))
    for schema in (schema_file, json.dumps(SMALL)):
        result = _run("-m", tiny_path, "-p", "Answer:", "--json-schema", schema, "--seed", 1)
        assert result.returncode == 0, result.stderr
        jsonschema.validate(json.loads(result.stdout), SMALL)
    grammar_file = tmp_path / "yes_no.gbnf"
    grammar_file.write_text(YES_NO)
    result = _run("-m", tiny_path, "-p", "Answer:", "--grammar-file", grammar_file, "--seed", 2)
    assert result.returncode == 0 and result.stdout.strip() in ("yes", "no"), result.stderr


@pytest.mark.parametrize("flags, message", [
    (("--json-schema", '{"type": "bogus"}'), "invalid JSON schema"),
    (("--json-schema", "no-such-file.json"), "cannot read JSON schema file"),
    (("--grammar-file", "GRAMMAR"), "invalid grammar"),
])
def test_cli_bad_constraints_are_one_line_errors(tiny_path, tmp_path, flags, message):
    bad = tmp_path / "bad.gbnf"
    bad.write_text('root ::= "a" | (')
    result = _run("-m", tiny_path, "-p", "x", *[str(bad) if f == "GRAMMAR" else f for f in flags])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


# --- the server, in process on the tiny model ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    server = ApiServer(("127.0.0.1", 0), tiny_engine, Defaults(max_tokens=100))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-", max_retries=0)
    server.shutdown()
    server.server_close()


def _schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_server_fields_that_constrain(tiny_server):
    prompt = "Answer:"
    reply = tiny_server.completions.create(model="m", prompt=prompt, seed=1,
                                           extra_body={"response_format": _schema_format(SMALL)})
    jsonschema.validate(json.loads(reply.choices[0].text), SMALL)
    assert reply.choices[0].finish_reason == "stop"
    reply = tiny_server.completions.create(model="m", prompt=prompt, extra_body={"json_schema": SMALL}, seed=2)
    jsonschema.validate(json.loads(reply.choices[0].text), SMALL)
    reply = tiny_server.completions.create(model="m", prompt=prompt, extra_body={"grammar": YES_NO}, seed=3)
    assert reply.choices[0].text in ("yes", "no") and reply.choices[0].finish_reason == "stop"
    stream = tiny_server.completions.create(model="m", prompt=prompt, extra_body={"json_schema": SMALL},
                                            seed=4, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in stream if c.choices)), SMALL)
    reply = tiny_server.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=1, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content == "{"


@pytest.mark.parametrize("fields, param", [
    ({"response_format": _schema_format({"type": "bogus"})}, "response_format.json_schema.schema"),
    ({"response_format": _schema_format({"type": "array", "items": {"type": "string"},
                                         "if": {"minItems": 2}, "then": {}})}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"grammar": 'root ::= "a" | ('}, "grammar"),
    ({"grammar": 'root ::= "a"', "json_schema": {}}, "json_schema"),
])
def test_server_bad_constraints_are_400s_and_the_server_goes_on(tiny_server, fields, param):
    with pytest.raises(openai.BadRequestError) as error:
        tiny_server.completions.create(model="m", prompt="x", extra_body=fields)
    body = error.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == param and body["message"]
    assert tiny_server.completions.create(model="m", prompt="x", max_tokens=2).choices[0].text is not None


def test_without_llguidance_constraints_are_400s_and_the_rest_works(tiny_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now fails, as where it is not installed
    with pytest.raises(openai.BadRequestError, match="needs the llguidance package"):
        tiny_server.completions.create(model="m", prompt="x", extra_body={"json_schema": SMALL})
    assert tiny_server.completions.create(model="m", prompt="x", max_tokens=2).choices[0].finish_reason == "length"


# --- real models ---------------------------------------------------------------------------

# Varied schemas, each with a prompt that asks for it (the constraint decides the shape).
SCHEMAS = [
    ("Give a person's name and age.", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("Pick a primary color.", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                               "required": ["color"], "additionalProperties": False}),
    ("List two to four fruits.", {"type": "object", "properties": {"fruits": {
        "type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4}},
        "required": ["fruits"], "additionalProperties": False}),
    ("Describe a book with its author.", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 20},
                                                    "last": {"type": "string", "maxLength": 20}},
                   "required": ["first", "last"], "additionalProperties": False},
        "year": {"type": "integer", "minimum": 1400, "maximum": 2030}},
        "required": ["title", "author", "year"], "additionalProperties": False}),
    ("Rate a movie from 0 to 10 and say whether you recommend it.", {"type": "object", "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 10}, "recommend": {"type": "boolean"}},
        "required": ["score", "recommend"], "additionalProperties": False}),
    ("Give a point in 3D space.", {"type": "object", "properties": {
        "point": {"type": "array", "items": {"type": "integer", "minimum": -100, "maximum": 100},
                  "minItems": 3, "maxItems": 3}}, "required": ["point"], "additionalProperties": False}),
    ("Plan a day: a list of one to three tasks with priorities.", {"type": "object", "properties": {
        "tasks": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"task": {"type": "string", "maxLength": 40},
                                             "priority": {"enum": ["low", "medium", "high"]}},
            "required": ["task", "priority"], "additionalProperties": False}}},
        "required": ["tasks"], "additionalProperties": False}),
    ("Convert 3 km to meters.", {"type": "object", "properties": {
        "meters": {"type": "integer", "minimum": 0, "maximum": 100000}, "unit": {"const": "m"}},
        "required": ["meters", "unit"], "additionalProperties": False}),
    ("Name a country and its capital.", {"type": "object", "properties": {
        "country": {"type": "string", "maxLength": 40}, "capital": {"type": "string", "maxLength": 40}},
        "required": ["country", "capital"], "additionalProperties": False}),
    ("Give a hex color code.", {"type": "object", "properties": {
        "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}, "required": ["hex"], "additionalProperties": False}),
]


@pytest.fixture(scope="module")
def qwen_client(qwen_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("qwen") / "stderr.log"
    with running_server(qwen_path, log, "-c", "2048", "-t", "2") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=600)


@pytest.mark.model
@pytest.mark.parametrize("round", [0, 1])
def test_qwen_json_schema_answers_validate(qwen_client, round):
    """20 requests over 10 schemas at temperature 0.7: every answer parses and validates."""
    for i, (prompt, schema) in enumerate(SCHEMAS):
        reply = qwen_client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt + " Answer in JSON."}], temperature=0.7,
            seed=100 * round + i, max_tokens=200, response_format=_schema_format(schema))
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.model
def test_qwen_json_object_answers_parse(qwen_client):
    for i, (prompt, _) in enumerate(SCHEMAS):
        reply = qwen_client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt + " Answer in JSON."}], temperature=0.7,
            seed=i, max_tokens=200, response_format={"type": "json_object"})
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.model
def test_smollm2_streamed_json_schema(smollm2_path, tmp_path):
    with running_server(smollm2_path, tmp_path / "stderr.log", "-c", "1024") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=300)
        prompt, schema = SCHEMAS[6]
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                temperature=0.7, seed=1, max_tokens=200, stream=True,
                                                response_format=_schema_format(schema))
        chunks = list(stream)
        jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), schema)
        assert chunks[-1].choices[0].finish_reason == "stop"

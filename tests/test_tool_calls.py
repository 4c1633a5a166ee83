"""Tool calls in OpenAI's shape: the request's checks, the three output formats
(Hermes, Llama 3.x, generic), whole and streamed, on tiny models and on Qwen2.5
with the official openai client."""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from llamazip.runtime.chat_template import ChatTemplate
from llamazip.runtime.constrained_decoding import ConstraintError
from llamazip.runtime.engine import Engine
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.openai_api import Defaults
from llamazip.runtime.server import ApiServer
from llamazip.runtime.tokenizer import Tokenizer
from llamazip.runtime.tool_calls import CallParser, ToolError, parse_tools
from llamazip_server import running_server
from tiny_models import TinyLlama

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"},
                                                       "unit": {"enum": ["celsius", "fahrenheit"]}},
                      "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
# Bounded arguments, so that even a random model's constrained call ends soon.
PICK_PARAMETERS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}
PICK = {"type": "function", "function": {"name": "pick_city", "parameters": PICK_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                       "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_TEMPLATE = "{% if tools %}<tool_call> tools {% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"


# --- reading the request -------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "absent"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_are_errors_naming_the_field(body, param):
    with pytest.raises((ToolError, ConstraintError)) as error:
        parse_tools(body, HERMES_TEMPLATE)
    assert error.value.param == param


def test_the_format_follows_the_template():
    body = {"tools": [WEATHER]}
    assert parse_tools(body, HERMES_TEMPLATE).format == "hermes"
    assert parse_tools(body, "<|start_header_id|>{{ tools }}").format == "llama3"
    assert parse_tools(body, "{{ messages }}").format == "generic" and parse_tools(body, None).format == "generic"
    assert parse_tools(dict(body, tool_choice="none"), HERMES_TEMPLATE) is None
    named = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function",
                                                                   "function": {"name": "get_time"}}}, None)
    assert [f.name for f in named.callable] == ["get_time"] and named.must_call


# --- reading the answer --------------------------------------------------------------------

HERMES_ANSWER = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris {x}"}}\n'
                 '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def _parser(fmt: str, tools=(WEATHER, TIME)) -> CallParser:
    template = {"hermes": HERMES_TEMPLATE, "llama3": "<|start_header_id|> tools", "generic": None}[fmt]
    return CallParser(parse_tools({"tools": list(tools)}, template))


@pytest.mark.parametrize("fmt, answer, content, calls", [
    ("hermes", HERMES_ANSWER, "Let me check.", [("get_weather", {"city": "Paris {x}"}), ("get_time", {})]),
    ("hermes", '{"name": "get_time", "arguments": {}}', "", [("get_time", {})]),
    ("hermes", "Just text.", "Just text.", []),
    ("hermes", '```json\n{"name": "get_time", "arguments": {}}\n```', "", [("get_time", {})]),
    ("hermes", '```json\n{"name": "other", "arguments": {}}\n```', '```json\n{"name": "other", "arguments": {}}\n```',
     []),  # not one of the tools: an answer in JSON
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {', '<tool_call>\n{"name": "get_time", "arguments": {',
     []),  # cut short: the text as it is
    ("llama3", ' {"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ("llama3", "Hello {there}", "Hello {there}", []),
    ("generic", '{"tool_calls": [{"name": "get_time", "arguments": {}}]}', "", [("get_time", {})]),
    ("generic", '{"response": "It is sunny."}', "It is sunny.", []),
])
def test_answers_parse_into_content_and_calls(fmt, answer, content, calls):
    parsed = _parser(fmt).parse(answer, final=True)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls


@pytest.mark.parametrize("fmt", ["hermes", "llama3"])
def test_a_growing_answer_only_ever_adds(fmt):
    """What a stream sends (content, each call's arguments) grows by appending, up to the whole answer's."""
    answer = HERMES_ANSWER if fmt == "hermes" else '{"name": "get_weather", "parameters": {"city": "Paris {x}"}}'
    parser = _parser(fmt)
    content, arguments, ids = "", [], []
    for end in range(len(answer) + 1):
        parsed = parser.parse(answer[:end], final=end == len(answer))
        assert parsed.content.startswith(content)
        content = parsed.content
        for i, call in enumerate(parsed.calls):
            if i == len(arguments):
                arguments.append("")
                ids.append(call.id)
            assert call.arguments.startswith(arguments[i]) and call.id == ids[i]
            arguments[i] = call.arguments
    final = parser.parse(answer, final=True)
    assert arguments == [c.arguments for c in final.calls] and content == final.content


# --- tiny models through the server --------------------------------------------------------

LLAMA3_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eos|>{% endfor %}"
                   "{% if tools %}<|start_header_id|>tools: {{ tools | tojson }}{% endif %}<|bos|>assistant\n")
PLAIN_TEMPLATE = "{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eos|>{% endfor %}<|bos|>assistant\n"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return GGUFFile(TinyLlama(seed=9).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


def _serve(engine):
    server = ApiServer(("127.0.0.1", 0), engine, Defaults(max_tokens=120))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-",
                                 max_retries=0)


@pytest.fixture(scope="module", params=["llama3", "generic"])
def tiny_client(request, tiny_gguf):
    template = ChatTemplate(LLAMA3_TEMPLATE if request.param == "llama3" else PLAIN_TEMPLATE)
    # A byte per token: the tools and the generic format's instructions need more than the 256 the file says.
    engine = Engine(Model(tiny_gguf, n_ctx=1024), Tokenizer.from_metadata(tiny_gguf.metadata), template, "tiny")
    server, client = _serve(engine)
    yield client
    server.shutdown()
    server.server_close()


def _accumulated(stream) -> object:
    state = ChatCompletionStreamState()
    for chunk in stream:
        state.handle_chunk(chunk)
    return state.get_final_completion().choices[0]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "pick_city"}}])
def test_tiny_models_call_with_valid_arguments_whole_and_streamed(tiny_client, choice):
    for seed in range(3):
        ask = dict(model="m", messages=QUESTION, tools=[TIME, PICK] if choice == "required" else [PICK],
                   tool_choice=choice, temperature=1.0, seed=seed, parallel_tool_calls=False)
        whole = tiny_client.chat.completions.create(**ask).choices[0]
        streamed = _accumulated(tiny_client.chat.completions.create(**ask, stream=True))
        for choice_ in (whole, streamed):
            assert choice_.finish_reason == "tool_calls" and choice_.message.content in (None, "")
            for call in choice_.message.tool_calls:
                assert call.type == "function" and call.id.startswith("call_")
                schema = PICK_PARAMETERS if call.function.name == "pick_city" else TIME["function"]["parameters"]
                jsonschema.validate(json.loads(call.function.arguments), schema)
        assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
               [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [PICK], "tool_choice": {"type": "function", "function": {"name": "absent"}}}, "tool_choice"),
    ({"messages": QUESTION + [{"role": "tool", "content": "18 C"}]}, "messages[1].tool_call_id"),
    ({"messages": QUESTION + [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[1].tool_calls"),
    ({"tools": [PICK], "response_format": {"type": "json_object"}}, "tools"),
])
def test_bad_tool_requests_are_400s_and_the_server_goes_on(tiny_client, fields, param):
    with pytest.raises(openai.BadRequestError) as error:
        tiny_client.chat.completions.create(**{"model": "m", "messages": QUESTION, **fields})
    assert error.value.body["param"] == param and error.value.body["type"] == "invalid_request_error"
    assert tiny_client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2).choices[0].message


# --- Qwen2.5, Hermes format ---------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_client(qwen_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("qwen") / "stderr.log"
    with running_server(qwen_path, log, "-c", "2048", "-t", "2") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=600)


def _the_weather_call(choice) -> object:
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    assert "paris" in arguments["city"].lower()
    return call


@pytest.mark.model
def test_qwen_required_tool_call_whole_and_streamed(qwen_client):
    ask = dict(model="m", messages=QUESTION, tools=[WEATHER], tool_choice="required", temperature=0)
    whole = _the_weather_call(qwen_client.chat.completions.create(**ask).choices[0])
    streamed = _the_weather_call(_accumulated(qwen_client.chat.completions.create(**ask, stream=True)))
    assert (whole.function.name, whole.function.arguments) == (streamed.function.name, streamed.function.arguments)


@pytest.mark.model
def test_qwen_calls_a_tool_on_its_own_and_answers_with_the_result(qwen_client):
    call = _the_weather_call(qwen_client.chat.completions.create(
        model="m", messages=QUESTION, tools=[WEATHER, TIME], temperature=0).choices[0])
    conversation = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
    # tool_choice none: Qwen2.5-Coder-0.5B asked with tools would only call again.
    answer = qwen_client.chat.completions.create(model="m", messages=conversation, tools=[WEATHER, TIME],
                                                 tool_choice="none", temperature=0, max_tokens=100).choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls and "18" in answer.message.content

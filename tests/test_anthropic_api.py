"""POST /v1/messages through Anthropic's official client: text, system, streaming
events, tool_use and tool_result blocks, errors."""

from __future__ import annotations

import json
import threading

import anthropic
import jsonschema
import pytest

from llamazip.runtime.chat_template import ChatTemplate
from llamazip.runtime.engine import Engine
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.model_file import open_model
from llamazip.runtime.openai_api import Defaults
from llamazip.runtime.server import ApiServer
from llamazip.runtime.tokenizer import Tokenizer
from tiny_models import TinyLlama

TEMPLATE = "{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eos|>{% endfor %}<|bos|>assistant\n"
PICK = {"name": "pick_city", "description": "Pick a city",
        "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                         "required": ["city"], "additionalProperties": False}}
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _serve(engine):
    server = ApiServer(("127.0.0.1", 0), engine, Defaults())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.server_address[1]}", api_key="-",
                                 max_retries=0, timeout=600)
    return server, client


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    gguf = GGUFFile(TinyLlama(seed=6).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))
    engine = Engine(Model(gguf, n_ctx=1024), Tokenizer.from_metadata(gguf.metadata), ChatTemplate(TEMPLATE), "tiny")
    server, client = _serve(engine)
    yield client
    server.shutdown()
    server.server_close()


def test_a_message_whole_and_streamed_says_the_same(client):
    ask = dict(model="m", max_tokens=10, system="Be brief.", extra_body={"temperature": 0},
               messages=[{"role": "user", "content": "Hello"}])
    whole = client.messages.create(**ask)
    assert whole.type == "message" and whole.role == "assistant" and whole.id.startswith("msg_")
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.usage.output_tokens <= 10
    with client.messages.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.text for b in final.content] == [b.text for b in whole.content] and final.stop_reason == whole.stop_reason


def test_a_forced_tool_gives_a_tool_use_block_whole_and_streamed(client):
    ask = dict(model="m", max_tokens=100, extra_body={"temperature": 1.0}, tools=[PICK],
               tool_choice={"type": "tool", "name": "pick_city", "disable_parallel_tool_use": True},
               messages=[{"role": "user", "content": "Pick a city."}])
    whole = client.messages.create(**ask)
    assert whole.stop_reason == "tool_use"
    (use,) = [b for b in whole.content if b.type == "tool_use"]
    assert use.name == "pick_city" and use.id.startswith("call_")
    jsonschema.validate(use.input, PICK["input_schema"])
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.input for b in final.content if b.type == "tool_use"] == [use.input]
    # The result goes back as a tool_result block.
    answer = client.messages.create(model="m", max_tokens=5, messages=[
        {"role": "user", "content": "Pick a city."}, {"role": "assistant", "content": whole.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "picked"}]}])
    assert answer.stop_reason in ("end_turn", "max_tokens")


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "x"}]},  # no max_tokens
    {"max_tokens": 5, "messages": []},
    {"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]},
    {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
    {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [PICK],
     "tool_choice": {"type": "tool", "name": "absent"}},
])
def test_bad_requests_are_400s_in_anthropics_shape(client, body):
    with pytest.raises(anthropic.BadRequestError) as error:
        client.post("/v1/messages", body=body, cast_to=object)
    assert error.value.body["type"] == "error" and error.value.body["error"]["message"]
    assert client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "ok"}]).content


@pytest.mark.model
def test_qwen_tool_use_round_trip(qwen_path):
    gguf = open_model(str(qwen_path))
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    template = ChatTemplate(gguf.metadata["tokenizer.chat_template"])
    server, client = _serve(Engine(Model(gguf, n_ctx=2048), tokenizer, template, "qwen"))
    try:
        question = [{"role": "user", "content": "What is the weather in Paris?"}]
        reply = client.messages.create(model="m", max_tokens=100, extra_body={"temperature": 0}, tools=[WEATHER],
                                       tool_choice={"type": "any"}, messages=question)
        (use,) = [b for b in reply.content if b.type == "tool_use"]
        assert reply.stop_reason == "tool_use" and use.name == "get_weather" and "paris" in use.input["city"].lower()
        answer = client.messages.create(model="m", max_tokens=100, extra_body={"temperature": 0}, tools=[WEATHER],
                                        tool_choice={"type": "none"}, messages=question + [
            {"role": "assistant", "content": reply.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": json.dumps({"temperature_c": 18})}]}])
        assert answer.stop_reason == "end_turn" and "18" in "".join(b.text for b in answer.content if b.type == "text")
    finally:
        server.shutdown()
        server.server_close()

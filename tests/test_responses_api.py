"""POST /v1/responses through the official openai client: whole, streamed, cut short, refused."""

from __future__ import annotations

import threading

import openai
import pytest

from llamazip.runtime.chat_template import ChatTemplate
from llamazip.runtime.engine import Engine
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.openai_api import Defaults
from llamazip.runtime.server import ApiServer
from llamazip.runtime.tokenizer import Tokenizer
from tiny_models import TinyLlama

TEMPLATE = "{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eos|>{% endfor %}<|bos|>assistant\n"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    gguf = GGUFFile(TinyLlama(seed=8).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))
    engine = Engine(Model(gguf), Tokenizer.from_metadata(gguf.metadata), ChatTemplate(TEMPLATE), "tiny")
    server = ApiServer(("127.0.0.1", 0), engine, Defaults(max_tokens=24))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-", max_retries=0)
    server.shutdown()
    server.server_close()


def test_a_response_whole_and_streamed_says_the_same(client):
    ask = dict(model="m", instructions="Be brief.", input="Hello", temperature=0, max_output_tokens=12)
    whole = client.responses.create(**ask)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.output_text
    assert whole.output[0].role == "assistant" and whole.usage.output_tokens <= 12 and whole.usage.input_tokens > 5
    events = list(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text and events[-1].response.status == whole.status


def test_a_message_list_input_and_a_short_limit(client):
    reply = client.responses.create(model="m", max_output_tokens=2, input=[
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 2


@pytest.mark.parametrize("body", [{}, {"input": []}, {"input": [{"role": "user", "content": [{"type": "image"}]}]},
                                  {"input": "x", "instructions": 3}, {"input": "x", "temperature": 9}])
def test_bad_responses_requests_are_400s(client, body):
    with pytest.raises(openai.BadRequestError):
        client.post("/responses", body=body, cast_to=object)
    assert client.responses.create(model="m", input="fine", max_output_tokens=2).output

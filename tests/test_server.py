"""The HTTP server as clients use it: OpenAI's own Python client against SmolLM2,
malformed requests, concurrency, clients that leave mid-answer."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from llamazip.runtime.chat_template import ChatTemplateError
from llamazip.runtime.engine import Chunk
from llamazip.runtime.openai_api import Defaults
from llamazip.runtime.server import ApiServer
from llamazip_server import running_server

KEY = "sesame"
SYSTEM = "You are a pirate."
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with running_server(smollm2_path, tmp_path_factory.mktemp("server") / "stderr.log", "-c", "1024") as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("keyed") / "stderr.log"
    with running_server(smollm2_path, log, "-c", "1024", "--api-key", KEY, "-s", SYSTEM) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    # No retries: a retried failure must not pass as a success.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def assert_healthy(server) -> None:
    assert server.request("GET", "/health", timeout=30) == (200, {"status": "ok"})


# --- the OpenAI client ----------------------------------------------------------------

@pytest.mark.model
def test_chat_completion(client):
    reply = client.chat.completions.create(model="anything", messages=HELLO, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert 0 < usage.completion_tokens <= 12 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.model
def test_streamed_chat_gives_the_same_answer(client):
    whole = client.chat.completions.create(model="m", messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


@pytest.mark.model
def test_completion(client):
    reply = client.completions.create(model="m", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text.strip()
    assert reply.usage.completion_tokens <= 6


@pytest.mark.model
def test_streamed_completion(client):
    chunks = list(client.completions.create(model="m", prompt="One, two, three,", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.model
def test_model_list(client):
    models = client.models.list().data
    assert len(models) == 1 and "smollm2" in models[0].id.lower()


@pytest.mark.model
def test_chat_logprobs(client):
    reply = client.chat.completions.create(model="m", messages=HELLO, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy takes the likeliest


@pytest.mark.model
def test_stop_string(client):
    reply = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=["7"])
    assert "7" not in reply.choices[0].text and reply.choices[0].finish_reason == "stop"


@pytest.mark.model
def test_concurrent_streams_all_complete(client):
    def stream(i: int) -> tuple[str, str | None]:
        chunks = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Name a color."}], max_tokens=8, stream=True, seed=i))
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(stream, range(20)))
    assert len(answers) == 20
    assert all(text and finish in ("stop", "length") for text, finish in answers), answers


# --- errors ---------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
TOO_LONG = [{"role": "user", "content": "word " * 1200}]


@pytest.mark.parametrize("method, path, body, status, param", [
    ("POST", CHAT, b"{not json", 400, None),
    ("POST", CHAT, b"[1, 2]", 400, None),
    ("GET", "/v1/nothing", None, 404, None),
    ("GET", CHAT, None, 405, None),
    ("POST", "/health", b"{}", 405, None),
    ("POST", CHAT, {"messages": []}, 400, "messages"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("POST", CHAT, {"messages": HELLO, "n": 2}, 400, "n"),
    ("POST", CHAT, {"messages": HELLO, "temperature": 5}, 400, "temperature"),
    ("POST", CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("POST", CHAT, {"messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
    ("POST", CHAT, {"messages": HELLO, "stop": [1]}, 400, "stop"),
    ("POST", CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("POST", CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("POST", CHAT, {"messages": TOO_LONG}, 400, "messages"),
    ("POST", CHAT, {"messages": TOO_LONG, "stream": True}, 400, "messages"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("POST", "/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
    ("POST", CHAT, b"x" * (1 << 20 | 1), 413, None),
])
@pytest.mark.model
def test_bad_requests_get_openai_errors(server, method, path, body, status, param):
    got, reply = server.request(method, path, body, {"Content-Type": "application/json"})
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    assert error["param"] == param
    assert_healthy(server)


@pytest.mark.model
def test_prompt_longer_than_the_context_says_so(server):
    status, reply = server.request("POST", CHAT, {"messages": TOO_LONG})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert "1024" in reply["error"]["message"]


@pytest.mark.model
def test_an_error_leaves_the_connection_usable(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        for path, status in (("/v1/nothing", 404), ("/health", 200)):
            connection.request("POST" if status == 404 else "GET", path, body=b'{"a": 1}' if status == 404 else None)
            response = connection.getresponse()
            response.read()
            assert response.status == status
    finally:
        connection.close()


@pytest.mark.model
def test_api_key(keyed_server):
    assert keyed_server.request("GET", "/v1/models")[0] == 401
    status, reply = keyed_server.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert keyed_server.request("POST", "/tokenize", {"content": "hi"})[0] == 401
    assert keyed_server.request("POST", CHAT, {"messages": HELLO})[0] == 401
    assert keyed_server.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    # The health check and the page (which asks for the key itself) need none.
    assert_healthy(keyed_server)
    assert keyed_server.request("GET", "/")[0] == 200
    assert openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0).models.list().data


@pytest.mark.model
def test_system_prompt_flag_applies_when_the_request_has_none(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0, timeout=300)

    def prompt_tokens(messages):
        return client.chat.completions.create(model="m", messages=messages, max_tokens=1).usage.prompt_tokens

    with_flag = prompt_tokens(HELLO)
    assert with_flag == prompt_tokens([{"role": "system", "content": SYSTEM}] + HELLO)
    assert with_flag != prompt_tokens([{"role": "system", "content": "You are a helpful assistant."}] + HELLO)


# --- clients that leave -------------------------------------------------------------------

def _leave_mid_answer(port: int, body: dict) -> None:
    """Send a chat request, wait for part of the answer (streamed) or a moment (whole), and hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        data = json.dumps(body).encode()
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        if not body.get("stream"):
            time.sleep(1)
            return
        received = b""
        while b'"delta": {"content": "' not in received:  # a piece of the answer, past the role
            piece = s.recv(4096)
            assert piece, received
            received += piece


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.model
def test_the_server_goes_on_after_a_client_leaves(server, client, stream):
    count = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]
    _leave_mid_answer(server.port, {"messages": count, "max_tokens": 400, "temperature": 0, "stream": stream})
    assert client.chat.completions.create(model="m", messages=HELLO, max_tokens=4).choices[0].message.content


# --- small routes -----------------------------------------------------------------------

@pytest.mark.model
def test_tokenize_detokenize_round_trip(server):
    text = "Hello world, how are you? Ünïcödé 🙂"
    status, reply = server.request("POST", "/tokenize", {"content": text})
    assert status == 200 and all(isinstance(t, int) for t in reply["tokens"]) and len(reply["tokens"]) > 5
    assert server.request("POST", "/detokenize", {"tokens": reply["tokens"]}) == (200, {"content": text})


@pytest.mark.parametrize("path, kind", [("/", "text/html"), ("/chat.js", "text/javascript"),
                                        ("/chat.css", "text/css")])
@pytest.mark.model
def test_the_page_and_its_files(server, path, kind):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200 and response.read()
        assert response.getheader("Content-Type").startswith(kind)
        assert "script-src 'self'" in response.getheader("Content-Security-Policy")
    finally:
        connection.close()


# --- inside the server, with stand-in engines ---------------------------------------------

class StandInEngine:
    """Answers "word word ..." up to max_tokens or until cancelled or closed, noting
    when it ends. Its template refuses a message "refused"; it fails as a bug would
    on a message "crash", and halfway through a request for 3 tokens."""

    name, n_ctx, tokenizer = "stand-in", 64, None

    def __init__(self):
        self.ended = threading.Event()

    def chat_tokens(self, messages, tools=None):
        if messages[-1]["content"] == "crash":
            raise RuntimeError("boom")
        if messages[-1]["content"] == "refused":
            raise ChatTemplateError("the chat template refused the conversation: no")
        return [1, 2, 3]

    def generate(self, prompt, request, cancelled=lambda: False):
        return self._run(request.max_tokens, cancelled)

    def _run(self, max_tokens, cancelled):
        try:
            for n in itertools.count(1):
                if n == max_tokens == 3:
                    raise RuntimeError("boom")
                if n == max_tokens:
                    yield Chunk("word", token=5, finish_reason="length")
                    return
                yield Chunk("word ", token=5)
                if cancelled():
                    return
                time.sleep(0.01)
        finally:
            self.ended.set()


@pytest.fixture
def stand_in():
    engine = StandInEngine()
    server = ApiServer(("127.0.0.1", 0), engine, Defaults())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield engine, server
    server.shutdown()
    server.server_close()


def _post(server: ApiServer, body: dict) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*server.server_address, timeout=30)
    try:
        connection.request("POST", CHAT, body=json.dumps(body))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_ends_its_generation(stand_in, stream):
    engine, server = stand_in
    _leave_mid_answer(server.server_address[1], {"messages": HELLO, "stream": stream})
    assert engine.ended.wait(10)


def test_a_template_error_is_a_400(stand_in):
    status, body = _post(stand_in[1], {"messages": [{"role": "user", "content": "refused"}]})
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"


def test_an_unexpected_exception_is_a_500_and_the_server_goes_on(stand_in):
    _, server = stand_in
    status, body = _post(server, {"messages": [{"role": "user", "content": "crash"}]})
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    # Mid-stream the status is sent already: the error comes as the stream's last event.
    status, body = _post(server, {"messages": HELLO, "stream": True, "max_tokens": 3})
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
    assert status == 200 and "boom" in events[-1]["error"]["message"]
    assert _post(server, {"messages": HELLO, "max_tokens": 3})[0] == 500
    assert _post(server, {"messages": HELLO, "max_tokens": 2})[0] == 200

"""The server under load on loopback: 50 concurrent clients mixing whole and
streamed requests, slow readers, clients that hang up mid-answer, malformed and
oversized bodies, all with an API key. Every request that should succeed does,
/health answers throughout, and the server's memory stays flat.

The default run uses the tiny test model for a couple of rounds; `pytest -m slow`
runs many rounds on it and a shorter load on SmolLM2, and prints the numbers.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llamazip_server import running_server
from tiny_models import TinyLlama

KEY = "load-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CLIENTS = 50
BODY_LIMIT = 64 * 1024
TOKENS_LIMIT = 32
TIMEOUT = 300  # per request: a hang guard, not a speed requirement
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# How much the server's RSS may grow from the end of the warm-up round to the end of
# the load: threads, sockets and per-request objects that were not freed would pile up.
RSS_GROWTH_LIMIT = 40 << 20


@dataclass
class Tally:
    """What happened, per kind of request, and what went wrong."""

    done: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str) -> None:
        with self.lock:
            self.done[kind] += 1

    def fail(self, kind: str, why: str) -> None:
        with self.lock:
            self.failures.append(f"{kind}: {why}")


def _connection(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)


def _post(port: int, path: str, body: dict | bytes, headers: dict = AUTH) -> tuple[int, bytes]:
    connection = _connection(port)
    try:
        connection.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body), headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _messages(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": rng.choice(["hello", "tell me a story", "1, 2, 3,", "é ü 🙂"])}]


def _check_stream(data: bytes, chat: bool) -> str | None:
    """None for a complete stream, else what is wrong with it."""
    events = [line[len("data: "):] for line in data.decode().split("\n\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"no [DONE] at the end: {data[-200:]!r}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"an error in the stream: {chunks}"
    last = [c for c in chunks if c["choices"]][-1]  # a usage chunk, if asked for, has no choices
    if last["choices"][0]["finish_reason"] not in ("stop", "length"):
        return f"no finish reason: {last}"
    kind = "chat.completion.chunk" if chat else "text_completion"
    return None if all(c["object"] == kind for c in chunks) else f"wrong object kind: {chunks[0]}"


# --- the kinds of client -------------------------------------------------------------------

def whole(port: int, rng: random.Random, tally: Tally) -> None:
    chat = rng.random() < 0.5
    body = {"messages": _messages(rng)} if chat else {"prompt": "Once upon a time"}
    body |= {"max_tokens": rng.randint(1, TOKENS_LIMIT), "temperature": rng.choice([0, 0.8])}
    status, data = _post(port, CHAT if chat else COMPLETIONS, body)
    reply = json.loads(data)
    if status != 200 or reply["choices"][0]["finish_reason"] not in ("stop", "length"):
        return tally.fail("whole", f"{status} {data[:300]!r}")
    if reply["usage"]["completion_tokens"] > body["max_tokens"]:
        return tally.fail("whole", f"more tokens than asked for: {reply['usage']}")
    tally.ok("whole")


def streamed(port: int, rng: random.Random, tally: Tally, slow: bool = False) -> None:
    """A streamed request; a slow reader takes the answer a few bytes at a time."""
    kind = "slow reader" if slow else "streamed"
    chat = rng.random() < 0.5
    body = {"messages": _messages(rng)} if chat else {"prompt": "Once upon a time"}
    body |= {"max_tokens": rng.randint(1, TOKENS_LIMIT), "stream": True,
             "stream_options": {"include_usage": rng.random() < 0.5}}
    connection = _connection(port)
    try:
        connection.request("POST", CHAT if chat else COMPLETIONS, body=json.dumps(body), headers=AUTH)
        response = connection.getresponse()
        if slow:
            data = b""
            while piece := response.read(16):
                data += piece
                time.sleep(0.01)
        else:
            data = response.read()
    finally:
        connection.close()
    if response.status != 200:
        return tally.fail(kind, f"{response.status} {data[:300]!r}")
    problem = _check_stream(data, chat)
    if problem:
        return tally.fail(kind, problem)
    tally.ok(kind)


def hang_up(port: int, rng: random.Random, tally: Tally) -> None:
    """Ask for a long answer and leave: after part of a stream, or right away."""
    stream = rng.random() < 0.7
    data = json.dumps({"prompt": "Once upon a time", "max_tokens": TOKENS_LIMIT, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        if stream:
            received = b""
            while b"data: " not in received and (piece := s.recv(4096)):
                received += piece
    tally.ok("hang-up")


def _expect_error(tally: Tally, kind: str, got: tuple[int, bytes], status: int, param: str | None = None) -> None:
    code, data = got
    try:
        error = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return tally.fail(kind, f"not an OpenAI error body: {code} {data[:200]!r}")
    if code != status or error.get("param") != param or set(error) != {"message", "type", "param", "code"}:
        return tally.fail(kind, f"expected {status} ({param}), got {code} {error}")
    tally.ok(kind)


def malformed(port: int, rng: random.Random, tally: Tally) -> None:
    case = rng.randrange(6)
    if case == 0:
        _expect_error(tally, "bad json", _post(port, CHAT, b'{"messages": [', ), 400)
    elif case == 1:
        _expect_error(tally, "bad field", _post(port, CHAT, {"messages": "hi"}), 400, "messages")
    elif case == 2:
        body = {"messages": _messages(rng), "max_tokens": TOKENS_LIMIT + 1}
        _expect_error(tally, "over max_tokens", _post(port, CHAT, body), 400, "max_tokens")
    elif case == 3:
        _expect_error(tally, "oversized", _post(port, CHAT, b"x" * (BODY_LIMIT + 1)), 413)
    elif case == 4:
        _expect_error(tally, "no key", _post(port, CHAT, {"messages": _messages(rng)}, {}), 401)
    else:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            reply = b""
            while piece := s.recv(4096):
                reply += piece
        head, _, data = reply.partition(b"\r\n\r\n")
        _expect_error(tally, "garbage", (int(head.split()[1]) if head else 0, data), 400)


# --- the run -------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _client(port: int, seed: int, requests: int, tally: Tally) -> None:
    rng = random.Random(seed)
    for _ in range(requests):
        kind = rng.choices([whole, streamed, "slow", hang_up, malformed], weights=[4, 4, 1, 1, 2])[0]
        try:
            if kind == "slow":
                streamed(port, rng, tally, slow=True)
            else:
                kind(port, rng, tally)
        except Exception as e:  # a reset, a timeout, a body that is not JSON: all failures
            tally.fail(getattr(kind, "__name__", str(kind)), f"{type(e).__name__}: {e}")


class HealthWatch(threading.Thread):
    """Asks /health every 0.2 s while the load runs; every answer must be 200."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.answers, self.failures = port, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                if response.status == 200 and json.loads(response.read()) == {"status": "ok"}:
                    self.answers += 1
                else:
                    self.failures.append(response.status)
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            finally:
                connection.close()
            self.stop.wait(0.2)


def load(model: Path, log: Path, rounds: int, requests_per_client: int) -> dict:
    """Run the mixed load against a server of `model`; returns the numbers."""
    flags = ["--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT), "--max-tokens-limit", str(TOKENS_LIMIT),
             "-c", "256", "--temp", "0.8", "-t", "1"]
    with running_server(model, log, *flags) as server:
        pid, port = server.process.pid, server.port
        watch = HealthWatch(port)
        watch.start()
        tally = Tally()
        rss = [rss_bytes(pid)]
        started = time.monotonic()
        for round_ in range(rounds):
            with ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(lambda c: _client(port, round_ * 1000 + c, requests_per_client, tally),
                              range(CLIENTS)))
            rss.append(rss_bytes(pid))
        duration = time.monotonic() - started
        watch.stop.set()
        watch.join()
        # After the load, the server still answers, with the key and without.
        assert server.request("GET", "/health", timeout=60)[0] == 200
        assert server.request("GET", "/v1/models", headers=AUTH, timeout=60)[0] == 200
    numbers = {"requests": sum(tally.done.values()) + len(tally.failures), "by kind": dict(tally.done),
               "failures": tally.failures, "health answers": watch.answers, "health failures": watch.failures,
               "rss MB per round": [round(r / 1e6, 1) for r in rss], "seconds": round(duration, 1)}
    print(f"\nload on {model.name}: {json.dumps(numbers, indent=1)}")
    return numbers


def check(numbers: dict) -> None:
    assert not numbers["failures"], numbers["failures"][:20]
    assert not numbers["health failures"] and numbers["health answers"] > 0, numbers
    rss = numbers["rss MB per round"]
    growth = (rss[-1] - rss[1]) * 1e6  # from the end of the first (warm-up) round
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 1e6:.1f} MB under load: {rss}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return TinyLlama(seed=11).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_fifty_clients_on_the_tiny_model(tiny_model, tmp_path):
    numbers = load(tiny_model, tmp_path / "server.log", rounds=2, requests_per_client=2)
    check(numbers)
    assert numbers["requests"] == 2 * 2 * CLIENTS


@pytest.mark.slow
def test_fifty_clients_on_the_tiny_model_long(tiny_model, tmp_path):
    numbers = load(tiny_model, tmp_path / "server.log", rounds=6, requests_per_client=10)
    check(numbers)
    assert numbers["requests"] == 6 * 10 * CLIENTS


@pytest.mark.slow
@pytest.mark.model
def test_fifty_clients_on_smollm2(smollm2_path, tmp_path):
    numbers = load(smollm2_path, tmp_path / "server.log", rounds=3, requests_per_client=2)
    check(numbers)


# --- limits and defaults, in-process ----------------------------------------------------------

class _Idle:
    """An engine stand-in for requests that never reach the model."""

    name, n_ctx, tokenizer = "idle", 64, None


@pytest.fixture
def in_process(monkeypatch):
    from llamazip.runtime import server as server_module
    from llamazip.runtime.openai_api import Defaults

    monkeypatch.setattr(server_module._Handler, "timeout", 1)  # idle connections close after 1 s
    server = server_module.ApiServer(("127.0.0.1", 0), _Idle(), Defaults(), api_key=KEY)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_key_guards_every_route_but_health(in_process):
    from llamazip.runtime.server import ROUTES

    port = in_process.server_address[1]
    for path, methods in ROUTES.items():
        for method in methods:
            connection = _connection(port)
            try:
                connection.request(method, path, body=b"{}" if method == "POST" else None)
                response = connection.getresponse()
                body = json.loads(response.read()) if path != "/health" else None
            finally:
                connection.close()
            if path == "/health":
                assert response.status == 200
            else:
                assert response.status == 401 and body["error"]["code"] == "invalid_api_key", (path, body)


def test_stalled_clients_are_let_go(in_process):
    """A request line never finished, a body never sent: the connection closes, the server goes on."""
    port = in_process.server_address[1]
    for opening in (b"POST /v1/chat/comp", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(opening)
            while s.recv(4096):  # whatever comes, then the close
                pass
    connection = _connection(port)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_max_tokens_limit():
    from llamazip.runtime.openai_api import ApiError, Defaults, _generation

    limited = Defaults(max_tokens_limit=8)
    assert _generation({}, limited, None).max_tokens == 8  # the default (-1: no limit) obeys it
    assert _generation({"max_tokens": 8}, limited, None).max_tokens == 8
    assert _generation({"max_tokens": 100}, Defaults(), None).max_tokens == 100
    for field_name in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(ApiError) as caught:
            _generation({field_name: 9}, limited, None)
        assert caught.value.status == 400 and caught.value.param == field_name


def test_server_defaults_are_loopback_and_bounded():
    from llamazip.main import _parser

    args = _parser().parse_args(["run", "-m", "x.gguf", "--server"])
    assert args.host == "127.0.0.1" and args.api_key is None
    assert args.max_body_bytes == 1 << 20 and args.max_tokens_limit == 0

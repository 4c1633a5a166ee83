"""Parallel slots: the batched decode step against each sequence's own forward pass,
and the scheduler that runs several generations at once (runtime/slots.py)."""

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import gguf
import numpy as np
import pytest

from llamazip.runtime.engine import Engine, GenerationRequest
from llamazip.runtime.generate import PROMPT_BATCH
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.openai_api import Defaults
from llamazip.runtime.sampling import SamplingParams
from llamazip.runtime.server import ApiServer
from llamazip.runtime import slots as slots_module
from llamazip.runtime import token_ops
from llamazip.runtime.slots import PASS_STRETCH, PIECE_ROWS_PER_STREAM, RETIME_PASSES, PieceSizer, Slots
from llamazip.runtime.weight_matrix import BATCH_ROWS
from llamazip.runtime.tokenizer import Tokenizer
from llamazip.runtime.weight_types import FLOAT_SWITCH
from scripted_drafter import ScriptedDrafter
from tiny_models import TinyGemma3, TinyLlama, TinyQwen2

Q = gguf.GGMLQuantizationType
# Prompts of different lengths: their sequences decode at different positions.
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 87, 111, 114, 108, 100, 33, 32, 65], [256, 66, 121],
           [256, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116]]
NEXT = [44, 32, 119, 101]  # the token each sequence decodes next


def _filled(model: Model, prompts: list[list[int]]) -> None:
    for slot, prompt in enumerate(prompts):
        model.forward(np.array(prompt), 0, slot=slot)


def _own_logits(path, prompts: list[list[int]]) -> np.ndarray:
    """Each sequence alone in a one-slot model: its prompt, then its next token."""
    rows = []
    for prompt, token in zip(prompts, NEXT):
        alone = Model(GGUFFile(path), n_ctx=32)
        alone.forward(np.array(prompt), 0)
        rows.append(alone.forward(np.array([token]), len(prompt)))
    return np.stack(rows)


@pytest.mark.parametrize("architecture", [TinyLlama, TinyQwen2, TinyGemma3])
@pytest.mark.parametrize("weight_type", [Q.Q8_0, Q.Q4_0])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("split", [False, True], ids=["one-thread-attention", "split-attention"])
def test_batched_step_equals_each_sequence_alone(tmp_path, monkeypatch, architecture, weight_type, n, split):
    """Everything in the batched step but the weights' product is the single-token
    step's own compiled code, row by row, and the int8 matmul of 2-16 rows gives
    each row its matvec's result: the logits are bit for bit each sequence's own,
    whether the rows' attention runs on one thread or split between the threads."""
    monkeypatch.setattr(token_ops, "SERIAL_ROWS_PAIRS", 0 if split else 10 ** 9)
    path = architecture(weight_type=weight_type, n_head_kv=2, seed=n, tied=False).write(tmp_path / "tiny.gguf")
    model = Model(GGUFFile(path), n_ctx=32, n_slots=4)
    prompts = PROMPTS[:n]
    # Slots out of order: row i belongs to slot slots[i].
    slots = list(reversed(range(n)))
    _filled(model, [prompts[slots.index(s)] for s in range(n)])
    batched = model.forward_batch(NEXT[:n], [len(p) for p in prompts], slots)
    np.testing.assert_array_equal(batched, _own_logits(path, prompts))


@pytest.mark.parametrize("split", [False, True], ids=["one-thread-attention", "split-attention"])
def test_a_sequences_rows_in_one_pass_equal_its_own_steps(tmp_path, monkeypatch, split):
    """Several rows of one slot at consecutive positions (drafted tokens), beside
    another slot's row: each row sees the keys of the rows before it, as its own
    one-token pass would, also when every row's key is stored before any attends."""
    monkeypatch.setattr(token_ops, "SERIAL_ROWS_PAIRS", 0 if split else 10 ** 9)
    path = TinyLlama(weight_type=Q.Q8_0, n_head_kv=2, seed=5, tied=False).write(tmp_path / "tiny.gguf")
    model = Model(GGUFFile(path), n_ctx=32, n_slots=2)
    _filled(model, PROMPTS[:2])
    drafted = NEXT[:3]
    start = len(PROMPTS[0])
    batched = model.forward_batch(drafted + [NEXT[3]], [start, start + 1, start + 2, len(PROMPTS[1])], [0, 0, 0, 1])
    alone = Model(GGUFFile(path), n_ctx=32, n_slots=2)
    _filled(alone, PROMPTS[:2])
    own = [alone.forward(np.array([t]), start + i, slot=0) for i, t in enumerate(drafted)]
    own.append(alone.forward(np.array([NEXT[3]]), len(PROMPTS[1]), slot=1))
    np.testing.assert_array_equal(batched, np.stack(own))


@pytest.mark.parametrize("weight_type", [Q.F32, Q.Q8_0, Q.Q4_0])
def test_batched_step_on_the_float_path_is_within_float_rounding(tmp_path, monkeypatch, weight_type):
    """On the float path (LLAMAZIP_FLOAT_MATVEC=1, and F32 weights) the batched rows
    go through the float matmul, whose sums run in another order than the float
    matvec's: the logits agree to float32 rounding, not bit for bit."""
    monkeypatch.setenv(FLOAT_SWITCH, "1")
    path = TinyLlama(weight_type=weight_type, seed=7, tied=False).write(tmp_path / "tiny.gguf")
    model = Model(GGUFFile(path), n_ctx=32, n_slots=4)
    _filled(model, PROMPTS)
    batched = model.forward_batch(NEXT, [len(p) for p in PROMPTS], [0, 1, 2, 3])
    own = _own_logits(path, PROMPTS)
    np.testing.assert_allclose(batched, own, rtol=0, atol=1e-5 * np.abs(own).max())


def test_slots_keep_their_own_caches(tmp_path):
    """A sequence in slot 1 leaves slot 0's cache as it was."""
    path = TinyLlama(seed=4).write(tmp_path / "tiny.gguf")
    model = Model(GGUFFile(path), n_ctx=32, n_slots=2)
    model.forward(np.array(PROMPTS[0]), 0, slot=0)
    model.forward(np.array(PROMPTS[1]), 0, slot=1)
    after = model.forward(np.array([NEXT[0]]), len(PROMPTS[0]), slot=0)
    np.testing.assert_array_equal(after, _own_logits(path, PROMPTS[:1])[0])


def test_forward_batch_refuses_bad_slots(tmp_path):
    model = Model(GGUFFile(TinyLlama().write(tmp_path / "tiny.gguf")), n_ctx=8, n_slots=2)
    with pytest.raises(ValueError, match="consecutive positions"):
        model.forward_batch([1, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="slot 2"):
        model.forward_batch([1], [0], [2])
    with pytest.raises(ValueError, match="do not fit"):
        model.forward_batch([1, 2], [0, 8], [0, 1])


# --- the scheduler and the server's signals, in-process on a tiny model -------------------------

GREEDY_FEW = GenerationRequest(sampling=SamplingParams(temperature=0), max_tokens=2)
TEXTS = ["Hi", "Yo!", "abc", "cat"]


@pytest.fixture
def tiny_path(tmp_path):
    return TinyLlama(weight_type=Q.Q8_0, seed=3, tied=False).write(tmp_path / "tiny.gguf")


def _engine(path, n_slots: int | None):
    """An Engine; with n_slots, with that many slots attached."""
    g = GGUFFile(path)
    engine = Engine(Model(g, n_ctx=128, n_slots=n_slots or 1), Tokenizer.from_metadata(g.metadata), None, "tiny")
    if n_slots:
        Slots(engine, queue_limit=1)
    return engine


@contextmanager
def _serving(engine, metrics: bool = False):
    server = ApiServer(("127.0.0.1", 0), engine, Defaults(), metrics=metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _request(server, method: str, path: str, body: dict | None = None):
    connection = http.client.HTTPConnection(*server.server_address, timeout=60)
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None)
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    return response.status, json.loads(text) if response.getheader("Content-Type", "").startswith(
        "application/json") else text


def _streamed_text(server, prompt: str, max_tokens: int = 24) -> str:
    status, events = _request(server, "POST", "/v1/completions",
                              {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    assert status == 200, events
    pieces = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
    return "".join(p["choices"][0]["text"] for p in pieces)


def _greedy(engine, prompt: str, max_tokens: int = 24) -> str:
    request = GenerationRequest(sampling=SamplingParams(temperature=0), max_tokens=max_tokens)
    return "".join(c.text for c in engine.generate(engine.tokenize(prompt), request))


class _Gate:
    """Holds the model's passes until opened: slots stay busy as long as a test needs."""

    def __init__(self, model, monkeypatch):
        self.open, self.entered = threading.Event(), threading.Event()
        for name in ("forward", "forward_batch"):
            original = getattr(model, name)
            monkeypatch.setattr(model, name, self._held(original))

    def _held(self, original):
        def held(*args, **kwargs):
            self.entered.set()
            assert self.open.wait(60)
            return original(*args, **kwargs)
        return held


@contextmanager
def _admitted_together(engine, n: int):
    """The n requests made in the block are admitted to slots in one round, before any
    pass: their prompts are then processed whole, in float32, as alone (a prompt
    coming while others decode rides in their passes, rounded to int8: slots.py)."""
    slots, ready = engine.slots, threading.Event()
    step = slots._step

    def held_step():
        assert ready.wait(60)
        with slots._wake:
            slots._admit()
        slots._step = step
        step()
    slots._step = held_step
    yield
    deadline = time.monotonic() + 60
    while sum(slot.job is not None for slot in slots.slots) + len(slots._waiting) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ready.set()


def test_concurrent_streams_each_get_their_text_alone(tiny_path):
    """Four streams at once in four slots: each gets the greedy text it gets alone."""
    alone = _engine(tiny_path, None)
    want = [_greedy(alone, text) for text in TEXTS]
    engine = _engine(tiny_path, 4)
    with _serving(engine) as server, ThreadPoolExecutor(4) as pool:
        with _admitted_together(engine, 4):
            streams = [pool.submit(_streamed_text, server, text) for text in TEXTS]
        got = [stream.result() for stream in streams]
    assert got == want
    assert engine.slots.metrics.busy_slots_in_steps > engine.slots.metrics.decode_steps  # steps were shared


def test_one_request_leaving_leaves_the_others_intact(tiny_path):
    alone = _engine(tiny_path, None)
    want = [_greedy(alone, text, 60) for text in TEXTS[1:]]
    engine = _engine(tiny_path, 4)
    request = GenerationRequest(sampling=SamplingParams(temperature=0), max_tokens=60)
    with _admitted_together(engine, 4):
        leaving = engine.generate(engine.tokenize(TEXTS[0]), request)
        staying = [engine.generate(engine.tokenize(text), request) for text in TEXTS[1:]]
    next(leaving)
    leaving.close()  # as the server does when its client is gone
    assert ["".join(c.text for c in chunks) for chunks in staying] == want


def test_a_request_takes_the_slot_with_the_longest_shared_prefix(tiny_path):
    engine = _engine(tiny_path, 2)
    request = GenerationRequest(sampling=SamplingParams(temperature=0), max_tokens=8)

    def generated(prompt: list[int]) -> list[int]:
        return [c.token for c in engine.generate(prompt, request) if c.token is not None]

    story = engine.tokenize("Once upon a time")
    answer = generated(story)
    generated(engine.tokenize("xyz"))  # shares only BOS: to the empty slot, the story's cache stays
    assert [len(slot.cached) for slot in engine.slots.slots] == [len(story) + 7, len(engine.tokenize("xyz")) + 7]
    before = engine.slots.metrics.prompt_tokens
    followup = story + answer + engine.tokenize(" and then", add_special=False)
    generated(followup)
    # Only what the story's slot did not hold was processed (its last generated token never ran).
    assert engine.slots.metrics.prompt_tokens - before == len(followup) - (len(story) + 7)
    assert engine.slots.slots[0].cached[:len(followup)] == followup


def test_a_long_prompt_rides_in_the_decode_passes_while_others_decode(tiny_path, monkeypatch):
    """A newcomer's long prompt, while another stream decodes, goes in pieces in the
    decode passes (3 rows beside the one decoding row), never in a pass of its own; the
    running stream's text is what it gets alone, and the newcomer's logits are
    asked for only at its prompt's last token."""
    alone = _engine(tiny_path, None)
    want = _greedy(alone, "abc", 40)
    engine = _engine(tiny_path, 2)
    forwards: list[int] = []
    passes: list[tuple[int, list[int], list[int]]] = []  # rows, the prompt's positions in them, logits_rows
    forward, forward_batch = engine.model.forward, engine.model.forward_batch
    monkeypatch.setattr(engine.model, "forward", lambda tokens, *a, **k: forwards.append(len(tokens)) or forward(
        tokens, *a, **k))

    def recorded(tokens, positions, slots, logits_rows=None):
        prompt_rows = [p for p, slot in zip(positions, slots) if slot == 1 and p < len(long_prompt)]
        passes.append((len(tokens), prompt_rows, logits_rows))
        return forward_batch(tokens, positions, slots, logits_rows)
    monkeypatch.setattr(engine.model, "forward_batch", recorded)
    long_prompt = engine.tokenize("The quick brown fox jumps over the lazy dog. " * 2)
    request = GenerationRequest(sampling=SamplingParams(temperature=0), max_tokens=40)
    running = engine.generate(engine.tokenize("abc"), request)
    first = next(running)  # decoding now
    newcomer = engine.generate(long_prompt, GREEDY_FEW)
    assert first.text + "".join(c.text for c in running) == want
    assert [c.finish_reason for c in newcomer][-1] in ("stop", "length")
    # One-token passes are the running stream decoding alone; the only longer one is its prompt.
    assert [n for n in forwards if n > 1] == [len(engine.tokenize("abc"))]
    pieces = [(n, prompt, rows) for n, prompt, rows in passes if prompt]  # each the running stream's row first
    assert [p for _, prompt, _ in pieces for p in prompt] == list(range(len(long_prompt)))
    # The first piece before any is timed; later ones as PieceSizer finds (at least a row, within BATCH_ROWS).
    assert pieces[0][0] == 1 + PIECE_ROWS_PER_STREAM + 1
    assert all(2 <= n <= BATCH_ROWS for n, _, _ in pieces)
    assert all(rows == [0] for _, _, rows in pieces[:-1]) and pieces[-1][2] == [0, pieces[-1][0] - 1]


def test_prompt_pieces_are_steered_to_stretch_a_pass_by_pass_stretch():
    """PieceSizer: 2d + 1 rows until a pass alone is timed; then each piece grows or
    shrinks by sqrt((PASS_STRETCH - 1) / (its stretch - 1)), at most 2x either way;
    at least one row, never past the room left, and none every RETIME_PASSES."""
    sizer = PieceSizer()
    start = 3 * PIECE_ROWS_PER_STREAM + 1
    assert sizer.rows(3, 13) == start
    sizer.timed(3, start, 0.024)  # nothing to compare with yet: unchanged
    assert sizer.rows(3, 13) == start
    sizer.timed(3, 0, 0.010)  # three rows alone: 10 ms
    sizer.timed(3, start, 0.010 * (1 + 4 * (PASS_STRETCH - 1)))  # four times the stretch wanted: half
    assert sizer.rows(3, 13) == round(start / 2)
    sizer.timed(3, 4, 0.010 * (1 + (PASS_STRETCH - 1) / 4))  # a quarter of it: twice
    assert sizer.rows(3, 13) == 8
    sizer.timed(3, 8, 0.010 * PASS_STRETCH)  # as wanted: kept
    assert sizer.rows(3, 13) == 8 and sizer.rows(3, 2) == 2
    sizer.timed(3, 8, 1.0)  # a pass slowed by the machine: halved, not more
    assert sizer.rows(3, 13) == 4
    sizer.timed(3, 1, 0.010 * (1 + (PASS_STRETCH - 1) / 1000))  # far below: doubled, not more
    assert sizer.rows(3, 13) == 2
    assert sizer.rows(1, 15) == PIECE_ROWS_PER_STREAM + 1  # each number of decoding rows steers its own
    assert sizer.rows(16, 0) == 1
    for _ in range(RETIME_PASSES - 5):  # five passes with pieces timed so far: every RETIME_PASSES, one goes alone
        assert sizer.rows(3, 13) > 0
        sizer.timed(3, 2, 0.010 * PASS_STRETCH)
    assert sizer.rows(3, 13) == 0
    sizer.timed(3, 0, 0.020)  # timed again: the streams' contexts grew
    assert sizer.rows(3, 13) == 2


def _tokens(engine, prompt: list[int], request: GenerationRequest) -> list[int]:
    return [c.token for c in engine.generate(prompt, request) if c.token is not None]


@pytest.mark.parametrize("wrong", [2, 1000])
def test_a_request_decoding_alone_drafts_and_keeps_its_text(tiny_path, monkeypatch, wrong):
    """A slot that decodes alone runs prompt lookup's guesses in its passes: the
    tokens are the lone engine's, drafts kept (and refused, with `wrong`)."""
    prompt = _engine(tiny_path, None).tokenize("abc")
    greedy = GenerationRequest(sampling=SamplingParams(temperature=0), max_tokens=40)
    want = _tokens(_engine(tiny_path, None), prompt, greedy)
    monkeypatch.setattr(slots_module, "Drafter", lambda n, cost: ScriptedDrafter(prompt + want, wrong))
    engine = _engine(tiny_path, 2)
    assert _tokens(engine, prompt, GenerationRequest(sampling=greedy.sampling, max_tokens=40, draft=5)) == want
    stats = engine.last_stats
    assert stats.draft_passes > 0 and stats.accepted_tokens > 0
    assert (stats.accepted_tokens == stats.drafted_tokens) == (wrong > 100)
    assert engine.slots.slots[0].cached == prompt + want[:-1]  # the last token never ran


def test_no_slot_drafts_while_others_decode(tiny_path, monkeypatch):
    """Two streams together: no pass carries two rows of one stream until one has ended."""
    engine = _engine(tiny_path, 2)
    prompts = [engine.tokenize(text) for text in TEXTS[:2]]
    greedy = GenerationRequest(sampling=SamplingParams(temperature=0), max_tokens=30)
    want = [_tokens(_engine(tiny_path, None), prompt, greedy) for prompt in prompts]
    truth = {len(p): p + w for p, w in zip(prompts, want)}  # the prompts differ in length
    monkeypatch.setattr(slots_module, "Drafter", lambda n, cost: _KeyedDrafter(truth))
    passes = []
    forward_batch = engine.model.forward_batch

    def recorded(tokens, positions, slots, logits_rows=None):
        passes.append(list(slots))
        return forward_batch(tokens, positions, slots, logits_rows)
    monkeypatch.setattr(engine.model, "forward_batch", recorded)
    short = GenerationRequest(sampling=greedy.sampling, max_tokens=10, draft=5)
    with _admitted_together(engine, 2):
        streams = [engine.generate(prompts[0], short),
                   engine.generate(prompts[1], GenerationRequest(sampling=greedy.sampling, max_tokens=30, draft=5))]
    got = [[c.token for c in stream if c.token is not None] for stream in streams]
    assert got == [want[0][:10], want[1]]
    together = [p for p in passes if len(set(p)) > 1]
    assert together and all(len(p) == len(set(p)) for p in together)
    assert any(len(p) > 1 and len(set(p)) == 1 for p in passes)  # the longer one drafted once alone


class _KeyedDrafter(ScriptedDrafter):
    """Drafts the true continuation of whichever prompt the tokens began with."""

    def __init__(self, truths: dict[int, list[int]]):
        super().__init__([], 1000)
        self.truths = truths

    def propose(self, tokens):
        self.truth = next(t for t in self.truths.values() if t[:len(tokens)] == list(tokens))
        return super().propose(tokens)


def test_health_while_loading_and_when_every_slot_is_busy(tiny_path, monkeypatch):
    with _serving(None) as server:  # the model still loading
        status, body = _request(server, "GET", "/health")
        assert status == 503 and body["error"]["type"] == "unavailable_error"
        assert _request(server, "GET", "/v1/models")[0] == 503
        engine = _engine(tiny_path, 1)
        server.engine = engine
        assert _request(server, "GET", "/health") == (200, {"status": "ok"})
        assert _request(server, "GET", "/health?fail_on_no_slot=1") == (200, {"status": "ok"})
        gate = _Gate(engine.model, monkeypatch)
        chunks = engine.generate(engine.tokenize("Hello"), GREEDY_FEW)
        assert gate.entered.wait(60)
        status, body = _request(server, "GET", "/health?fail_on_no_slot=1")
        assert status == 503 and body["error"]["type"] == "unavailable_error"
        assert _request(server, "GET", "/health")[0] == 200  # busy is not unhealthy
        gate.open.set()
        assert [c.finish_reason for c in chunks][-1] in ("stop", "length")


def test_slots_report_what_each_holds(tiny_path):
    engine = _engine(tiny_path, 2)
    _greedy(engine, "Hello", 5)
    with _serving(engine) as server:
        status, slots = _request(server, "GET", "/slots")
    assert status == 200
    assert slots == [{"id": 0, "is_processing": False, "n_ctx": 128, "n_cached": len(engine.tokenize("Hello")) + 4,
                      "n_decoded": 5},
                     {"id": 1, "is_processing": False, "n_ctx": 128, "n_cached": 0, "n_decoded": 0}]


def test_metrics_count_tokens_in_prometheus_text(tiny_path):
    engine = _engine(tiny_path, 2)
    with _serving(engine) as server:
        assert _request(server, "GET", "/metrics")[0] == 501  # off without --metrics
    with _serving(engine, metrics=True) as server:
        _streamed_text(server, "Hello", 6)
        status, text = _request(server, "GET", "/metrics")
    assert status == 200
    values = dict(line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    assert set(values) == {f"llamazip:{name}" for name in (
        "prompt_tokens_total", "tokens_predicted_total", "prompt_seconds_total", "tokens_predicted_seconds_total",
        "requests_processing", "requests_deferred", "n_busy_slots_per_decode")}
    assert values["llamazip:prompt_tokens_total"] == str(len(engine.tokenize("Hello")))
    assert values["llamazip:tokens_predicted_total"] == "6"
    assert float(values["llamazip:prompt_seconds_total"]) > 0
    assert values["llamazip:requests_processing"] == "0"


def test_a_full_queue_answers_503(tiny_path, monkeypatch):
    engine = _engine(tiny_path, 1)  # one slot, one place in the queue
    gate = _Gate(engine.model, monkeypatch)
    running = engine.generate(engine.tokenize("Hello"), GREEDY_FEW)
    assert gate.entered.wait(60)
    waiting = engine.generate(engine.tokenize("abc"), GREEDY_FEW)
    with _serving(engine) as server:
        status, body = _request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503 and body["error"]["type"] == "unavailable_error"
        gate.open.set()
        assert [c.finish_reason for c in running][-1] in ("stop", "length")
        assert [c.finish_reason for c in waiting][-1] in ("stop", "length")
        assert _request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_serve_answers_503_until_loaded_and_raises_a_load_error(monkeypatch):
    """serve() listens first; the model loading behind it fails here, which ends the server with that error."""
    from llamazip.errors import UserError
    from llamazip.runtime import server as server_module
    from llamazip.runtime.options import RunOptions, ServerOptions
    from llamazip_server import free_port

    port, loading, seen = free_port(), threading.Event(), []

    def load():
        loading.wait(60)
        raise UserError("no such model")

    def probe():
        while True:
            try:
                seen.append(_request(type("S", (), {"server_address": ("127.0.0.1", port)}), "GET", "/health"))
                break
            except OSError:
                time.sleep(0.05)
        loading.set()

    threading.Thread(target=probe, daemon=True).start()
    with pytest.raises(UserError, match="no such model"):
        server_module.serve(load, RunOptions(server=ServerOptions(port=port, open_browser=False)))
    assert seen[0][0] == 503 and seen[0][1]["error"]["type"] == "unavailable_error"

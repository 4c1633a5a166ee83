"""The HTTP server: an OpenAI-compatible API and a chat page, on the standard library.

One thread per connection; generations run in the engine's parallel slots
(slots.py: one scheduler thread decodes every busy slot in one batched step;
the handler threads hand it requests and read chunks). Every answer that is
not a success has OpenAI's error shape, and nothing a request does can stop
the server: an unexpected exception becomes a 500. A client that goes away
mid-answer stops its generation, and only its own.

The server listens before the model is loaded. What a balancer reads
(llama.cpp's names): /health answers 503 (type "unavailable_error") while
loading, 200 when ready, and with ?fail_on_no_slot=1 503 while every slot is
busy; /slots describes each slot; /metrics (with --metrics) counts tokens and
seconds in Prometheus' text format. A request that finds every slot busy and
--queue-limit requests already waiting is refused with 503.

With --api-key every route needs `Authorization: Bearer KEY` except /health
and the chat page with its files (they hold no data; the page asks for the
key and sends it with its API calls).
"""

from __future__ import annotations

import gc
import hmac
import importlib.resources
import json
import os
import socket
import sys
import threading
import time
import traceback
import webbrowser
from collections.abc import Callable, Iterator
from contextlib import closing
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from ..errors import UserError
from .anthropic_api import MessageReply, error_body, parse_messages_request
from .chat_template import ChatTemplateError
from .engine import Chunk, Engine
from .generate import PromptTooLongError
from .openai_api import ApiError, Defaults, Job, Reply, embeddings, parse_chat, parse_completion, pieces
from .options import MAX_BODY_BYTES, RunOptions
from .responses_api import ResponseReply, parse_response_request
from .slots import QueueFullError, Slots
from .tokenizer import TokenizerError

IDLE_SECONDS = 120  # a connection that sends or reads nothing this long is closed (slowloris, stuck readers)
LINGER_SECONDS = 2.0  # how long to read what a client still sends after we refused its body

STATIC_FILES = {  # path -> (file in llamazip.templates, content type)
    "/": ("chat.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
# The page runs only our own script and style, and talks only to us: model output
# that slipped into the page as HTML still could not run code or load anything.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True  # a generation in progress does not hold up Ctrl-C
    request_queue_size = 64  # many clients may connect at once; they queue for the slots anyway

    def __init__(self, address: tuple[str, int], engine: Engine | None, defaults: Defaults,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, verbose: bool = False,
                 metrics: bool = False):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.engine = engine  # None while the model loads: every route but the page answers 503
        self.defaults, self.api_key = defaults, api_key
        self.max_body_bytes, self.verbose, self.metrics = max_body_bytes, verbose, metrics
        self.started = int(time.time())

    @property
    def slots(self) -> Slots | None:
        """The engine's parallel slots (None while loading, or for an engine served without them)."""
        return getattr(self.engine, "slots", None)

    def handle_error(self, request, client_address) -> None:
        # A client that drops its connection between requests is not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def serve(load: Callable[[], Engine], options: RunOptions) -> int:
    """Listen, load the engine with `load` (a model with options.server.parallel slots)
    behind it, and serve until Ctrl-C; returns the exit status. An error in loading
    (a UserError) stops the server and is raised here."""
    listen = options.server
    try:
        server = ApiServer((listen.host, listen.port), None, options.request_defaults(), listen.api_key,
                           listen.max_body_bytes, options.verbose, listen.metrics)
    except OSError as e:
        print(f"error: cannot listen on {listen.host}:{listen.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    url = _url(listen.host, server.server_address[1])
    failed: list[BaseException] = []

    def load_then_ready() -> None:
        try:
            engine = load()
            engine.model.make_decoding_copies()
            Slots(engine, listen.queue_limit)
            # What loading made (the vocabulary, the model's objects) lives as long as the
            # server: out of the collector's scans, a full collection holding the GIL took
            # 13 ms (SmolLM2) and 27 ms (Qwen2.5 0.5B), one stalled token of every stream.
            gc.collect()
            gc.freeze()
        except BaseException as e:  # raised again in the main thread, after the server stops
            failed.append(e)
            server.shutdown()
            return
        server.engine = engine
        print(f"llamazip: serving {engine.name} at {url} with {engine.model.n_slots} slots (Ctrl-C stops)",
              file=sys.stderr)
        if listen.open_browser:
            _open_browser(url)

    threading.Thread(target=load_then_ready, name="llamazip-load", daemon=True).start()
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("\nllamazip: stopped", file=sys.stderr)
    if failed:
        raise failed[0]
    return 0


def _url(host: str, port: int) -> str:
    """The page's address as a browser on this machine reaches it."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _open_browser(url: str) -> None:
    # Without a display, webbrowser falls back to a text browser that would take over the terminal.
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return
    try:
        webbrowser.open(url)
    except Exception:  # a missing or broken browser must not stop the server
        pass


def _read_static(name: str) -> bytes:
    return importlib.resources.files("llamazip.templates").joinpath(name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"  # keep-alive: clients such as the openai package reuse connections
    server_version = "llamazip"
    timeout = IDLE_SECONDS  # every read and write on the connection

    # -- routing --

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        self._streaming = False
        try:
            body = self._read_body()  # first: an unread body would corrupt the connection's next request
            path = urlsplit(self.path).path
            methods = ROUTES.get(path) or ({"GET": _Handler._static} if path in STATIC_FILES else None)
            if methods is None:
                raise ApiError(404, f"no such route: {self.command} {path}")
            route = methods.get("GET" if self.command == "HEAD" else self.command)  # _send skips HEAD's body
            if route is None:
                raise ApiError(405, f"{path} takes {' or '.join(methods)}, not {self.command}")
            if path not in PUBLIC_PATHS and not self._authorized():
                raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")
            if self.server.engine is None and path not in STATIC_FILES:
                raise ApiError(503, "loading the model", kind="unavailable_error")
            route(self, body)
            if self._streaming:
                self._end_events()
        except ApiError as e:
            self._answer_error(e)
        except QueueFullError as e:
            self._answer_error(ApiError(503, str(e), kind="unavailable_error"))
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client left or stalled; nobody to answer
        except UserError as e:  # found mid-answer (a grammar with no way on): the request's fault, not ours
            self._answer_error(ApiError(400, str(e), getattr(e, "param", None)))
        except Exception as e:
            print(f"llamazip: {self.command} {self.path} failed:", file=sys.stderr)
            traceback.print_exc()
            self._answer_error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    def _authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())

    # -- reading --

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            raise ApiError(400, "bad Content-Length")
        if size > self.server.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"the body is {size} bytes; the limit is {self.server.max_body_bytes}")
        return self.rfile.read(size)

    def _json(self, body: bytes) -> dict:
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "the body must be a JSON object")
        return value

    # -- writing --

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")  # so keep-alive clients do not reuse it
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, obj: dict, status: int = 200) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def _answer_error(self, error: ApiError) -> None:
        try:
            if self._streaming:
                # The status is sent already: report in the stream, as OpenAI does, and end it.
                self._event(error.body())
                self._end_events()
                return
            self._send_json(error.body(), error.status)
            if error.status == 413:
                self._linger()
        except OSError:
            self.close_connection = True

    def _linger(self) -> None:
        """Read and drop what the client still sends of a refused body, for a moment: closing
        a socket with unread data resets the connection, and the client could lose our answer."""
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            while time.monotonic() < deadline and self.connection.recv(65536):
                pass
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method) in OpenAI's shape too."""
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # a garbled request line: still answer with a status line
        self.close_connection = True
        self._streaming = False
        self._answer_error(ApiError(code, message or HTTPStatus(code).phrase))

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- streaming --

    def _start_events(self) -> None:
        """A stream of server-sent events, chunked on HTTP/1.1: its last, empty chunk
        (_end_events) says it ended as meant, so a client, or a balancer in front
        of us, can tell an answer cut short (this process killed mid-answer) from a
        whole one, which a stream ended by closing the connection cannot."""
        self._streaming = True
        self._chunked = self.request_version == "HTTP/1.1"
        self.close_connection = True  # the stream's end is the connection's end
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()

    def _write_event(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _end_events(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _event(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self._write_event(f"data: {text}\n\n".encode())

    def _named_event(self, event: dict) -> None:
        """An event of Anthropic's and of the Responses API's streams: its type named on its own line too."""
        self._write_event(f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode())

    def _client_gone(self) -> bool:
        """True when the client has closed its side: the socket reads as ended.
        (A peek that does not wait: select() fails on descriptors past 1023.)"""
        sock = self.connection
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False  # nothing to read, the connection is open
        except OSError:
            return True
        finally:
            sock.settimeout(timeout)

    # -- routes --

    def _static(self, body: bytes) -> None:
        name, content_type = STATIC_FILES[urlsplit(self.path).path]
        self._send(200, _read_static(name), content_type, PAGE_HEADERS)

    def _health(self, body: bytes) -> None:
        query = parse_qs(urlsplit(self.path).query)
        slots = self.server.slots
        if query.get("fail_on_no_slot", ["0"])[0] not in ("", "0") and slots is not None \
                and slots.busy() == len(slots.slots):
            raise ApiError(503, "no slot available", kind="unavailable_error")
        self._send_json({"status": "ok"})

    def _slots(self, body: bytes) -> None:
        slots = self.server.slots
        if slots is None:
            raise ApiError(501, "this server runs without slots")
        self._send(200, json.dumps(slots.status()).encode(), "application/json")

    def _metrics(self, body: bytes) -> None:
        slots = self.server.slots
        if not self.server.metrics or slots is None:
            raise ApiError(501, "metrics are off: start the server with --metrics")
        self._send(200, _prometheus(slots).encode(), "text/plain; version=0.0.4")

    def _models(self, body: bytes) -> None:
        model = {"id": self.server.engine.name, "object": "model", "created": self.server.started,
                 "owned_by": "llamazip"}
        self._send_json({"object": "list", "data": [model]})

    def _tokenize(self, body: bytes) -> None:
        request = self._json(body)
        content, add_special = request.get("content"), request.get("add_special", False)
        if not isinstance(content, str):
            raise ApiError(400, "content must be a string", "content")
        if not isinstance(add_special, bool):
            raise ApiError(400, "add_special must be true or false", "add_special")
        self._send_json({"tokens": self.server.engine.tokenize(content, add_special=add_special)})

    def _detokenize(self, body: bytes) -> None:
        tokens = self._json(body).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "tokens must be an array of token ids", "tokens")
        try:
            content = self.server.engine.tokenizer.decode(tokens)
        except TokenizerError as e:
            raise ApiError(400, str(e), "tokens") from None
        self._send_json({"content": content})

    def _chat_completions(self, body: bytes) -> None:
        self._complete(parse_chat, body)

    def _completions(self, body: bytes) -> None:
        self._complete(parse_completion, body)

    def _anthropic_messages(self, body: bytes) -> None:
        engine = self.server.engine
        try:
            try:
                job = parse_messages_request(engine, self._json(body), self.server.defaults)
                chunks = engine.generate(job.prompt, job.request, cancelled=self._client_gone)
            except UserError as e:  # a chat template's refusal, a prompt too long, a bad grammar
                raise ApiError(400, str(e), "messages") from None
        except ApiError as e:  # in Anthropic's error shape, which its client reads
            self._send_json(error_body(e), e.status)
            return
        reply, message = Reply(engine, job), MessageReply(engine.name, job)
        with closing(chunks):
            if not job.stream:
                self._send_json(message.whole(reply.whole(list(pieces(chunks)))))
                return
            self._start_events()
            events, finish = message.start_events(), None
            for piece in pieces(chunks):
                for chunk in reply.chunk(piece):
                    finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
                    events += message.events(chunk)
                for event in events:
                    self._named_event(event)
                events = []
            for event in message.end_events(finish, reply.completion_tokens):
                self._named_event(event)

    def _responses(self, body: bytes) -> None:
        engine = self.server.engine
        try:
            job = parse_response_request(engine, self._json(body), self.server.defaults)
            chunks = engine.generate(job.prompt, job.request, cancelled=self._client_gone)
        except UserError as e:  # a chat template's refusal, a prompt too long, a bad grammar
            raise ApiError(400, str(e), "input") from None
        reply = ResponseReply(engine, job)
        with closing(chunks):
            if not job.stream:
                self._send_json(reply.whole(list(pieces(chunks))))
                return
            self._start_events()
            for event in reply.events(pieces(chunks)):
                self._named_event(event)

    def _embeddings(self, body: bytes) -> None:
        try:
            answer = embeddings(self.server.engine, self._json(body), self.server.defaults)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), "input", code="context_length_exceeded") from None
        except UserError as e:  # an input that tokenizes to nothing
            raise ApiError(400, str(e), "input") from None
        self._send_json(answer)

    def _complete(self, parse: Callable[..., Job], body: bytes) -> None:
        engine = self.server.engine
        try:
            job = parse(engine, self._json(body), self.server.defaults)
            chunks = engine.generate(job.prompt, job.request, cancelled=self._client_gone)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        except PromptTooLongError as e:
            raise ApiError(400, str(e), "messages" if parse is parse_chat else "prompt",
                           code="context_length_exceeded") from None
        except UserError as e:  # a grammar that does not fit the model's vocabulary, a prompt it cannot take
            raise ApiError(400, str(e), getattr(e, "param", None)) from None
        reply = Reply(engine, job)
        with closing(chunks):  # closing releases the engine when the client leaves mid-answer
            if job.stream:
                self._stream(reply, chunks)
            else:
                self._send_json(reply.whole(list(pieces(chunks))))

    def _stream(self, reply: Reply, chunks: Iterator[Chunk]) -> None:
        self._start_events()
        for event in reply.opening_chunks():
            self._event(event)
        for piece in pieces(chunks):
            for event in reply.chunk(piece):
                self._event(event)
        if reply.job.include_usage:
            self._event(reply.usage_chunk())
        self._event("[DONE]")


ROUTES: dict[str, dict[str, Callable[[_Handler, bytes], None]]] = {
    "/v1/chat/completions": {"POST": _Handler._chat_completions},
    "/v1/completions": {"POST": _Handler._completions},
    "/v1/embeddings": {"POST": _Handler._embeddings},
    "/v1/responses": {"POST": _Handler._responses},
    "/v1/messages": {"POST": _Handler._anthropic_messages},
    "/v1/models": {"GET": _Handler._models},
    "/health": {"GET": _Handler._health},
    "/slots": {"GET": _Handler._slots},
    "/metrics": {"GET": _Handler._metrics},
    "/tokenize": {"POST": _Handler._tokenize},
    "/detokenize": {"POST": _Handler._detokenize},
}
PUBLIC_PATHS = {"/health", *STATIC_FILES}


def _prometheus(slots: Slots) -> str:
    """The slots' counters in Prometheus' text format, under llama.cpp's metric names."""
    m = slots.metrics
    values = [
        ("prompt_tokens_total", "counter", "Prompt tokens processed.", m.prompt_tokens),
        ("prompt_seconds_total", "counter", "Prompt processing time.", m.prompt_seconds),
        ("tokens_predicted_total", "counter", "Generation tokens processed.", m.tokens_predicted),
        ("tokens_predicted_seconds_total", "counter", "Generation time.", m.tokens_predicted_seconds),
        ("requests_processing", "gauge", "Requests in a slot.", slots.busy()),
        ("requests_deferred", "gauge", "Requests waiting for a slot.", slots.waiting()),
        ("n_busy_slots_per_decode", "gauge", "Mean busy slots per decode step.",
         m.busy_slots_in_steps / m.decode_steps if m.decode_steps else 0.0),
    ]
    lines = []
    for name, kind, help_text, value in values:
        lines += [f"# HELP llamazip:{name} {help_text}", f"# TYPE llamazip:{name} {kind}", f"llamazip:{name} {value}"]
    return "\n".join(lines) + "\n"

"""OpenAI's chat and text completion requests in, OpenAI's response objects out.

Parsing checks every field we use and turns a bad one into an ApiError naming
it; fields we do not use are ignored, as OpenAI-compatible servers do. Unset
sampling fields take the server's defaults (its command-line flags). The
response builders follow OpenAI's shapes, so its official clients can read them.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .constrained_decoding import (ConstraintError, Grammar, any_json_object_grammar, json_schema_grammar,
                                   text_grammar)
from .embeddings import pool
from .engine import Chunk, Engine, GenerationRequest
from .sampling import SamplingParams
from .tool_calls import CallParser, ToolError, ToolRequest, parse_tools, template_messages, template_tools
from .tool_calls import grammar as tool_grammar

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_EMBEDDING_INPUTS = 256


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        # "unavailable_error" (llama.cpp's) for 503s a balancer retries elsewhere: loading, no slot, queue full.
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Defaults:
    """What a request gets for the fields it leaves out."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = -1
    system_prompt: str | None = None
    max_tokens_limit: int = 0  # the most a request may ask for (0: no limit but the context)
    pooling: str = "mean"  # how /v1/embeddings pools a text's hidden states
    draft: int = 0  # tokens a request's slot guesses from the context per pass while it decodes alone


@dataclass
class Job:
    """A checked request: what to generate and how to answer."""

    chat: bool  # chat.completion or text_completion
    prompt: list[int]
    request: GenerationRequest
    stream: bool
    include_usage: bool
    tools: ToolRequest | None = None  # the answer may call these


# --- reading requests ------------------------------------------------------------

def _invalid(param: str, expected: str) -> ApiError:
    return ApiError(400, f"{param} must be {expected}", param)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _invalid(name, f"a number in [{lo:g}, {hi:g}]")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise _invalid(name, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, "true or false")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stops):
        raise _invalid("stop", f"a string or an array of at most {MAX_STOP_STRINGS} strings")
    return stops


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _invalid("stream_options", "an object")
    return _flag(options, "include_usage")


def _generation(body: dict, defaults: Defaults, top_logprobs: int | None) -> GenerationRequest:
    """The sampling settings, length and stop strings both kinds of completion share."""
    if _integer(body, "n", 1, 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request", "n")
    d = defaults.sampling
    seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 64 - 1)
    sampling = replace(
        d,
        temperature=_number(body, "temperature", d.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", d.top_p, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", d.presence_penalty, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", d.frequency_penalty, -2.0, 2.0),
        # OpenAI takes any 64-bit seed; numpy wants a non-negative one.
        seed=d.seed if seed is None else seed % 2 ** 64)
    try:
        sampling.check()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    limit = defaults.max_tokens_limit or None
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, param, None, 0, limit)
    if max_tokens is None:
        max_tokens = defaults.max_tokens
        if limit and not 0 <= max_tokens <= limit:  # the server's own default obeys its limit too
            max_tokens = limit
    return GenerationRequest(sampling=sampling, max_tokens=max_tokens, stop=_stop(body), top_logprobs=top_logprobs,
                             grammar=_grammar(body), draft=defaults.draft)


def _grammar(body: dict) -> Grammar | None:
    """What the answer must follow: OpenAI's response_format, or llama.cpp's grammar or json_schema field."""
    given = [name for name in ("response_format", "grammar", "json_schema") if body.get(name) is not None]
    if len(given) > 1:
        raise ApiError(400, f"give one of response_format, grammar and json_schema, not {' and '.join(given)}",
                       given[1])
    try:
        if body.get("grammar") is not None:
            return text_grammar(body["grammar"], "grammar")
        if body.get("json_schema") is not None:
            return json_schema_grammar(body["json_schema"], "json_schema")
        if body.get("response_format") is not None:
            return _response_format(body["response_format"])
    except ConstraintError as e:
        raise ApiError(400, str(e), e.param) from None
    return None


def _response_format(value: Any) -> Grammar | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return any_json_object_grammar("response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise _invalid("response_format.json_schema", 'an object {"name": ..., "schema": {...}}')
        # OpenAI's default for a missing schema: any JSON object.
        return json_schema_grammar(spec.get("schema", {"type": "object"}), "response_format.json_schema.schema")
    raise _invalid("response_format", 'an object whose type is "text", "json_object" or "json_schema"')


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or an array of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if content is None:  # an assistant message that only calls tools
        return ""
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise _invalid(param, 'a string or an array of {"type": "text", "text": ...} parts')


def _message(message: Any, param: str) -> dict:
    if not isinstance(message, dict):
        raise _invalid(param, "an object with a role and a content")
    if message.get("role") not in ROLES:
        raise _invalid(f"{param}.role", "one of " + ", ".join(ROLES))
    checked = {"role": message["role"], "content": _content(message.get("content"), f"{param}.content")}
    # Fields that tool-aware chat templates read, passed on unchanged.
    checked.update({k: message[k] for k in ("name", "tool_calls", "tool_call_id") if k in message})
    if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise _invalid(f"{param}.tool_call_id", "the id of the call this tool message answers")
    if message.get("tool_calls") is not None:
        calls = message["tool_calls"]
        if message["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) and isinstance(c["function"].get("arguments"), str)
                for c in calls):
            raise _invalid(f"{param}.tool_calls", 'on an assistant message, an array of {"id": ..., "type": '
                                                  '"function", "function": {"name": ..., "arguments": "..."}}')
    return checked


def _messages(body: dict, system_prompt: str | None) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "a non-empty array of messages")
    checked = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    if system_prompt and not any(m["role"] == "system" for m in checked):
        checked.insert(0, {"role": "system", "content": system_prompt})
    return checked


def parse_chat(engine: Engine, body: dict, defaults: Defaults) -> Job:
    """A /v1/chat/completions request; raises ApiError (and ChatTemplateError)."""
    messages = _messages(body, defaults.system_prompt)
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if _flag(body, "logprobs") else None
    request = _generation(body, defaults, top)
    tools = _tools(engine, body)
    if tools is None:
        prompt = engine.chat_tokens(template_messages(messages, None))
        return Job(True, prompt, request, _flag(body, "stream"), _include_usage(body))
    if request.grammar is not None:
        raise ApiError(400, "give either tools or a response format (grammar, json_schema), not both", "tools")
    try:
        request.grammar = tool_grammar(tools)
    except ToolError as e:
        raise ApiError(400, str(e), e.param) from None
    prompt = engine.chat_tokens(template_messages(messages, tools), template_tools(tools))
    return Job(True, prompt, request, _flag(body, "stream"), _include_usage(body), tools)


def _tools(engine: Engine, body: dict) -> ToolRequest | None:
    if body.get("tools") is None and body.get("tool_choice") is None:
        return None
    template = engine.chat_template.source if engine.chat_template is not None else None
    try:
        return parse_tools(body, template)
    except ToolError as e:
        raise ApiError(400, str(e), e.param) from None
    except ConstraintError as e:
        raise ApiError(400, str(e), e.param) from None


def parse_completion(engine: Engine, body: dict, defaults: Defaults) -> Job:
    """A /v1/completions request (its prompt one string); raises ApiError."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _invalid("prompt", "a string")
    # Here `logprobs` is the number of alternatives to report, as in OpenAI's legacy API.
    request = _generation(body, defaults, _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS))
    tokens = engine.tokenize(prompt)
    if not tokens:
        raise ApiError(400, "the prompt is empty: nothing to continue from", "prompt")
    return Job(False, tokens, request, _flag(body, "stream"), _include_usage(body))


def embeddings(engine: Engine, body: dict, defaults: Defaults) -> dict:
    """A /v1/embeddings request answered: one unit vector per input (raises ApiError, PromptError)."""
    given = body.get("input")
    texts = [given] if isinstance(given, str) or (isinstance(given, list) and given and all(
        isinstance(t, int) and not isinstance(t, bool) for t in given)) else given
    if not isinstance(texts, list) or not texts or len(texts) > MAX_EMBEDDING_INPUTS or not all(
            isinstance(t, str) or (isinstance(t, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                for i in t)) for t in texts):
        raise _invalid("input", f"a string, an array of at most {MAX_EMBEDDING_INPUTS} strings, or token ids")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _invalid("encoding_format", '"float" or "base64"')
    data, used = [], 0
    for index, text in enumerate(texts):
        tokens = engine.tokenize(text) if isinstance(text, str) else text
        if any(not 0 <= t < engine.tokenizer.vocab_size for t in tokens):
            raise _invalid(f"input[{index}]", "token ids of the model's vocabulary")
        vector = pool(engine.hidden_states(tokens), defaults.pooling)
        used += len(tokens)
        data.append({"object": "embedding", "index": index, "embedding": (
            vector.tolist() if encoding == "float" else base64.b64encode(vector.astype("<f4").tobytes()).decode())})
    return {"object": "list", "data": data, "model": engine.name,
            "usage": {"prompt_tokens": used, "total_tokens": used}}


# --- turning engine chunks into pieces of an answer ---------------------------------

@dataclass
class Piece:
    """Text to send, with the tokens that made it; the last piece has a finish reason."""

    text: str
    tokens: list[Chunk]  # the chunks of the generated tokens, for their log-probabilities
    finish_reason: str | None = None


def pieces(chunks: Iterator[Chunk]) -> Iterator[Piece]:
    """Group chunks so that every piece has text (or finishes the answer): a token
    whose text is held back (half a character, a possible stop string) waits for
    the next piece."""
    tokens: list[Chunk] = []
    for chunk in chunks:
        if chunk.token is not None:
            tokens.append(chunk)
        if chunk.text or chunk.finish_reason:
            yield Piece(chunk.text, tokens, chunk.finish_reason)
            tokens = []


# --- writing responses ---------------------------------------------------------------

class Reply:
    """The response objects of one job, whole or as stream chunks."""

    def __init__(self, engine: Engine, job: Job):
        self.job, self.tokenizer, self.model = job, engine.tokenizer, engine.name
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self._text_offset = 0  # where the next token starts in the answer (text completions' logprobs)
        # With tools: the answer so far, and how much of its content and of each call was sent.
        self._calls = CallParser(job.tools) if job.tools else None
        self._answer = ""
        self._sent_content = 0
        self._sent_calls: list[int] = []  # per call: arguments' characters sent (after its first delta)

    def whole(self, answer: list[Piece]) -> dict:
        text = "".join(p.text for p in answer)
        tokens = [t for p in answer for t in p.tokens]
        self.completion_tokens = len(tokens)
        finish = (answer[-1].finish_reason if answer else None) or "length"
        if self._calls is not None:
            parsed = self._calls.parse(text, final=True)
            message = {"role": "assistant", "content": parsed.content or None}
            if parsed.calls:
                message["tool_calls"] = [_tool_call(c) for c in parsed.calls]
                finish = "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        elif self.job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._logprobs(tokens), "finish_reason": finish}
        else:
            choice = {"text": text, "index": 0, "logprobs": self._logprobs(tokens), "finish_reason": finish}
        return self._object(self._kind(), [choice], usage=self.usage())

    def opening_chunks(self) -> list[dict]:
        """Chat streams start by naming the speaker."""
        if not self.job.chat:
            return []
        return [self._object(self._chunk_kind(), [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])]

    def chunk(self, piece: Piece) -> list[dict]:
        """The stream chunks of one piece: its text, then the finish reason if it is the last."""
        self.completion_tokens += len(piece.tokens)
        if self._calls is not None:
            return self._tool_chunks(piece)
        chunks = []
        if piece.text or piece.tokens:
            chunks.append(self._choice_chunk(piece.text, self._logprobs(piece.tokens), None))
        if piece.finish_reason:
            chunks.append(self._choice_chunk("", None, piece.finish_reason))
        return chunks

    def _tool_chunks(self, piece: Piece) -> list[dict]:
        """Deltas of an answer that may call tools: new content, then per call a first delta
        (id, type, name) and its arguments' text as it grows."""
        self._answer += piece.text
        final = piece.finish_reason is not None
        parsed = self._calls.parse(self._answer, final)
        deltas: list[dict] = []
        if len(parsed.content) > self._sent_content:
            deltas.append({"content": parsed.content[self._sent_content:]})
            self._sent_content = len(parsed.content)
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break
            if index == len(self._sent_calls):
                deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
                self._sent_calls.append(0)
            if len(call.arguments) > self._sent_calls[index]:
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": call.arguments[self._sent_calls[index]:]}}]})
                self._sent_calls[index] = len(call.arguments)
        chunks = [self._object(self._chunk_kind(), [{"index": 0, "delta": d, "logprobs": None,
                                                     "finish_reason": None}]) for d in deltas]
        if final:
            finish = "tool_calls" if parsed.calls else piece.finish_reason
            chunks.append(self._choice_chunk("", None, finish))
        return chunks

    def usage_chunk(self) -> dict:
        return self._object(self._chunk_kind(), [], usage=self.usage())

    def usage(self) -> dict:
        prompt = len(self.job.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _choice_chunk(self, text: str, logprobs: dict | None, finish: str | None) -> dict:
        if self.job.chat:
            choice = {"index": 0, "delta": {} if finish else {"content": text},
                      "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return self._object(self._chunk_kind(), [choice])

    def _kind(self) -> str:
        return "chat.completion" if self.job.chat else "text_completion"

    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.job.chat else "text_completion"

    def _object(self, kind: str, choices: list[dict], **extra) -> dict:
        obj = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if self.job.stream and self.job.include_usage and "usage" not in extra:
            extra["usage"] = None  # OpenAI's chunks carry a null usage until the last
        return obj | extra

    def _logprobs(self, tokens: list[Chunk]) -> dict | None:
        if self.job.request.top_logprobs is None:
            return None
        if self.job.chat:
            return {"content": [dict(self._token(t.token, t.logprob),
                                     top_logprobs=[self._token(i, lp) for i, lp in t.top_logprobs or []])
                                for t in tokens]}
        texts = [self._text(t.token) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{self._text(i): lp for i, lp in t.top_logprobs or []} for t in tokens],
                "text_offset": offsets}

    def _token(self, token: int, logprob: float | None) -> dict:
        data = self.tokenizer.token_bytes(token)
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}

    def _text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", "replace")


def _tool_call(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}

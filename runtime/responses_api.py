"""OpenAI's Responses API (`POST /v1/responses`: text in, text out, whole or streamed)
as a translation over the chat path: `instructions` and `input` become chat
messages, the answer becomes one output message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from .engine import Engine
from .openai_api import ApiError, Defaults, Job, Piece, parse_chat


def parse_response_request(engine: Engine, body: dict, defaults: Defaults) -> Job:
    """A /v1/responses request as the chat request it means; raises ApiError."""
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        messages += [_message(item, f"input[{i}]") for i, item in enumerate(given)]
    else:
        raise ApiError(400, "input must be a string or a non-empty array of messages", "input")
    chat = {"messages": messages, "stream": body.get("stream"), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "max_tokens": body.get("max_output_tokens")}
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise ApiError(400, "instructions must be a string", "instructions")
    return parse_chat(engine, {k: v for k, v in chat.items() if v is not None}, defaults)


def _message(item: Any, param: str) -> dict:
    """An input item: {"role", "content"} with content a string or input_text/output_text parts."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise ApiError(400, f'{param} must be a message {{"role": ..., "content": ...}}', param)
    content = item.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                   and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{param}.content parts must be input_text or output_text", f"{param}.content")
        content = "\n".join(p["text"] for p in content)
    role = "system" if item.get("role") == "developer" else item.get("role")
    return {"role": role, "content": content}


class ResponseReply:
    """The Response object of one job, whole or as its stream of events."""

    def __init__(self, engine: Engine, job: Job):
        self.job, self.model = job, engine.name
        self.id, self.message_id = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
        self.created = int(time.time())
        self._sequence = 0

    def whole(self, answer: list[Piece]) -> dict:
        text = "".join(p.text for p in answer)
        tokens = sum(len(p.tokens) for p in answer)
        finish = answer[-1].finish_reason if answer else "length"
        return self._response(text, tokens, finish)

    def events(self, answer: Iterator[Piece]) -> Iterator[dict]:
        yield self._event("response.created", response=self._response("", 0, None))
        message = self._message("", "in_progress")
        yield self._event("response.output_item.added", output_index=0, item=message)
        yield self._event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                          part=_text_part(""))
        texts, tokens, finish = [], 0, "length"
        for piece in answer:
            tokens += len(piece.tokens)
            finish = piece.finish_reason or finish
            if piece.text:
                texts.append(piece.text)
                yield self._event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                  content_index=0, delta=piece.text)
        text = "".join(texts)
        yield self._event("response.output_text.done", item_id=self.message_id, output_index=0, content_index=0,
                          text=text)
        yield self._event("response.content_part.done", item_id=self.message_id, output_index=0, content_index=0,
                          part=_text_part(text))
        done = self._response(text, tokens, finish)
        yield self._event("response.output_item.done", output_index=0, item=done["output"][0])
        yield self._event("response.completed" if done["status"] == "completed" else "response.incomplete",
                          response=done)

    def _response(self, text: str, output_tokens: int, finish: str | None) -> dict:
        status = "in_progress" if finish is None else "completed" if finish == "stop" else "incomplete"
        prompt = len(self.job.prompt)
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": status,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "output": [] if finish is None else [self._message(text, "completed")],
                "usage": {"input_tokens": prompt, "output_tokens": output_tokens,
                          "total_tokens": prompt + output_tokens,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}},
                "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "error": None}

    def _message(self, text: str, status: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [_text_part(text)] if status == "completed" else []}

    def _event(self, kind: str, **fields) -> dict:
        self._sequence += 1
        return {"type": kind, "sequence_number": self._sequence, **fields}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}

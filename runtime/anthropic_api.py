"""Anthropic's Messages API (`POST /v1/messages`) as a translation over the chat path.

The request becomes an OpenAI chat request (system, text, `tool_use` and
`tool_result` blocks, tools and tool_choice); the answer, whole or as OpenAI
stream chunks, becomes Anthropic's message or its stream of events.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from .engine import Engine
from .openai_api import ApiError, Defaults, Job, parse_chat

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def error_body(error: ApiError) -> dict:
    kind = "api_error" if error.status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def parse_messages_request(engine: Engine, body: dict, defaults: Defaults) -> Job:
    """A /v1/messages request as the chat request it means; raises ApiError."""
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be an integer >= 1", "max_tokens")
    messages = _system(body.get("system"))
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise ApiError(400, "messages must be a non-empty array", "messages")
    for i, message in enumerate(given):
        messages += _messages(message, f"messages[{i}]")
    chat = {"messages": messages, "max_tokens": max_tokens, "stream": body.get("stream"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "stop": body.get("stop_sequences")}
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
        if body["tool_choice"].get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    return parse_chat(engine, {k: v for k, v in chat.items() if v is not None}, defaults)


def _system(system: Any) -> list[dict]:
    if system is None:
        return []
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system):
        system = "\n".join(str(b.get("text", "")) for b in system)
    if not isinstance(system, str):
        raise ApiError(400, "system must be a string or an array of text blocks", "system")
    return [{"role": "system", "content": system}]


def _messages(message: Any, param: str) -> list[dict]:
    """One Anthropic message as chat messages: tool results become tool messages."""
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise ApiError(400, f'{param} must be {{"role": "user" | "assistant", "content": ...}}', param)
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{param}.content must be a string or an array of blocks", f"{param}.content")
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        where = f"{param}.content[{j}]"
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user" and isinstance(block.get("tool_use_id"), str):
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _result_text(block.get("content", ""), where)})
        else:
            raise ApiError(400, f"{where} must be a text block, a tool_use block (assistant) or a tool_result "
                                f"block (user)", where)
    text = "\n".join(texts)
    if role == "assistant":
        return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]
    return results + ([{"role": "user", "content": text}] if texts or not results else [])


def _result_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "\n".join(str(b.get("text", "")) for b in content)
    raise ApiError(400, f"{param}.content must be a string or text blocks", f"{param}.content")


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, "tools must be an array of {name, description, input_schema}", "tools")
    return [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                              "parameters": t.get("input_schema", {"type": "object"})}}
            for t in tools]


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in TOOL_CHOICES:
        return TOOL_CHOICES[kind]
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise ApiError(400, 'tool_choice must be {"type": "auto" | "any" | "none" | "tool", ...}', "tool_choice")


class MessageReply:
    """Anthropic's shapes of an answer built by the chat path's Reply (OpenAI objects in)."""

    def __init__(self, model: str, job: Job):
        self.model, self.job = model, job
        self.id = "msg_" + uuid.uuid4().hex
        self._block: str | None = None  # the kind of the open content block
        self._index = -1
        self._calls: dict[int, int] = {}  # OpenAI call index -> our block index

    def whole(self, completion: dict) -> dict:
        choice = completion["choices"][0]
        message = choice["message"]
        content = [{"type": "text", "text": message["content"]}] if message.get("content") else []
        for call in message.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": json.loads(call["function"]["arguments"])})
        usage = completion["usage"]
        return dict(self._message(content, STOP_REASONS.get(choice["finish_reason"], "end_turn")),
                    usage={"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]})

    def start_events(self) -> list[dict]:
        return [{"type": "message_start", "message": dict(
            self._message([], None), usage={"input_tokens": len(self.job.prompt), "output_tokens": 0})}]

    def events(self, chunk: dict) -> Iterator[dict]:
        """Events for one OpenAI stream chunk."""
        for choice in chunk["choices"]:
            delta = choice.get("delta", {})
            if delta.get("content"):
                if self._block != "text":
                    yield from self._open({"type": "text", "text": ""}, "text")
                yield {"type": "content_block_delta", "index": self._index,
                       "delta": {"type": "text_delta", "text": delta["content"]}}
            for call in delta.get("tool_calls") or []:
                if "id" in call:
                    yield from self._open({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                                           "input": {}}, "tool_use")
                    self._calls[call["index"]] = self._index
                fragment = call.get("function", {}).get("arguments")
                if fragment:
                    yield {"type": "content_block_delta", "index": self._calls[call["index"]],
                           "delta": {"type": "input_json_delta", "partial_json": fragment}}

    def end_events(self, finish_reason: str | None, output_tokens: int) -> list[dict]:
        events = list(self._close())
        return events + [{"type": "message_delta",
                          "delta": {"stop_reason": STOP_REASONS.get(finish_reason or "length", "end_turn"),
                                    "stop_sequence": None},
                          "usage": {"output_tokens": output_tokens}},
                         {"type": "message_stop"}]

    def _open(self, block: dict, kind: str) -> Iterator[dict]:
        yield from self._close()
        self._index += 1
        self._block = kind
        yield {"type": "content_block_start", "index": self._index, "content_block": block}

    def _close(self) -> Iterator[dict]:
        if self._block is not None:
            yield {"type": "content_block_stop", "index": self._index}
            self._block = None

    def _message(self, content: list[dict], stop_reason: str | None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": None}

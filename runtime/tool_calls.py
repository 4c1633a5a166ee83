"""Tool calls in OpenAI's shape, over the formats models are trained to write.

A request's `tools` and `tool_choice` become a `ToolRequest`: the tools go to
the chat template, and a grammar (constrained_decoding) keeps the model's
calls to the tools' schemas. The format follows the chat template:

- Hermes (Qwen2.5, Hermes 2 Pro): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
  with tool_choice auto the text is free until `<tool_call>`, then the call is constrained
  (an answer that starts with `{` is a call without its tags, as small Qwen2.5 models write them).
- Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}` (or text not starting with `{`).
- Generic, for templates that know nothing of tools: the tools are described in the
  system message and the answer is constrained from its start to
  `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`.

`CallParser` reads the answer's text, whole or as it grows (for streams):
the content before any call and each call's name and arguments' text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .constrained_decoding import COMPACT_JSON, ConstraintError, Grammar, json_schema_grammar, lark_grammar

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


class ToolError(UserError, ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict


@dataclass
class ToolRequest:
    tools: list[dict]  # as the client sent them: what the chat template renders
    functions: list[Function]
    choice: str  # "auto", "required", or the one function's name
    parallel: bool
    format: str  # "hermes", "llama3" or "generic"

    @property
    def callable(self) -> list[Function]:
        """The functions a call may name."""
        if self.choice in ("auto", "required"):
            return self.functions
        return [f for f in self.functions if f.name == self.choice]

    @property
    def must_call(self) -> bool:
        return self.choice != "auto"


def parse_tools(body: dict, template_source: str | None) -> ToolRequest | None:
    """The request's tools (None when it has none, or tool_choice is "none"); raises ToolError."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError('tools must be an array of {"type": "function", "function": {...}}', "tools")
    functions = [_function(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("tools must have distinct names", "tools")
    choice = _choice(choice, names)
    if choice == "none":
        return None
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    return ToolRequest(tools, functions, choice, parallel, _format(template_source))


def _function(tool: Any, param: str) -> Function:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolError(f'{param} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                        param)
    spec = tool["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise ToolError(f"{param}.function.name must be 1 to 64 letters, digits, _, . or -", f"{param}.function.name")
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ToolError(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
    json_schema_grammar(parameters, f"{param}.function.parameters")  # a schema that does not compile is a 400 now
    return Function(name, parameters)


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name in names:
            return name
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                        "tool_choice")
    raise ToolError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                    '{"name": ...}}', "tool_choice")


def _format(template_source: str | None) -> str:
    source = template_source or ""
    if HERMES_OPEN in source:
        return "hermes"
    if "<|start_header_id|>" in source and "tools" in source:
        return "llama3"
    return "generic"


# --- what the template sees ------------------------------------------------------------

GENERIC_INSTRUCTIONS = (
    "You can call these tools (JSON schemas of their arguments):\n{tools}\n\n"
    'Answer in JSON: {{"tool_calls": [{{"name": <tool name>, "arguments": <arguments object>}}]}} to call '
    'tools, or {{"response": <your answer>}} to answer directly.')


def template_messages(messages: list[dict], request: ToolRequest | None) -> list[dict]:
    """The conversation as the chat template should see it with tools.

    Earlier calls' arguments become objects (templates write them with tojson;
    clients send them as JSON text). For the generic format the tools are
    described in the system message and earlier calls are written as the JSON
    the model is asked for.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls:
            if request is not None and request.format == "generic":
                message = {"role": "assistant", "content": json.dumps({"tool_calls": [
                    {"name": c["function"]["name"], "arguments": _arguments_object(c["function"]["arguments"])}
                    for c in calls]}, ensure_ascii=False)}
            else:
                message = dict(message, tool_calls=[
                    dict(c, function=dict(c["function"], arguments=_arguments_object(c["function"]["arguments"])))
                    for c in calls])
        out.append(message)
    if request is not None and request.format == "generic":
        described = "\n".join(json.dumps({"name": f.name, "parameters": f.parameters}, ensure_ascii=False)
                              for f in request.callable)
        instructions = GENERIC_INSTRUCTIONS.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=out[0]["content"] + "\n\n" + instructions)
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def template_tools(request: ToolRequest) -> list[dict] | None:
    """The tools the template renders (none for the generic format: they are in the system message)."""
    if request.format == "generic":
        return None
    return [t for t in request.tools if t["function"]["name"] in {f.name for f in request.callable}]


# --- the grammar of an answer ------------------------------------------------------------

def grammar(request: ToolRequest) -> Grammar:
    args_key = "parameters" if request.format == "llama3" else "arguments"
    calls = [{"type": "object", "properties": {"name": {"const": f.name}, args_key: f.parameters},
              "required": ["name", args_key], "additionalProperties": False} for f in request.callable]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    try:
        if request.format == "generic":
            tool_calls = {"type": "object", "properties": {"tool_calls": {
                "type": "array", "items": call, "minItems": 1, **({} if request.parallel else {"maxItems": 1})}},
                "required": ["tool_calls"], "additionalProperties": False}
            response = {"type": "object", "properties": {"response": {"type": "string"}},
                        "required": ["response"], "additionalProperties": False}
            return json_schema_grammar(tool_calls if request.must_call else {"anyOf": [tool_calls, response]},
                                       "tools")
        call_json = "%json " + json.dumps(dict(call, **{"x-guidance": COMPACT_JSON}))
        if request.format == "llama3":
            start = "start: call" if request.must_call else "start: TEXT | call\nTEXT: /[^{](.|\\n)*/"
            return lark_grammar(f"%llguidance {{}}\n{start}\ncall: {call_json}\n", "tools")
        more = '(WS "<tool_call>" body)*' if request.parallel else ""
        if request.must_call:
            start = f'"<tool_call>" body {more} WS?'
        else:  # free text, or text then calls, or (as small models write it) a call without its tags
            start = f'TEXT? | head body {more} WS? | call WS?'
        return lark_grammar(
            "%llguidance {}\n"
            f"start: {start}\n"
            # lazy: ends at the first <tool_call>; text that starts with { is a call
            "head[lazy]: /([^{](.|\\n)*)?<tool_call>/\n"
            'body: "\\n" call "\\n</tool_call>"\n'
            f"call: {call_json}\n"
            "TEXT: /[^{](.|\\n)*/\n"
            "WS: /[ \\n]+/\n", "tools")
    except ConstraintError as e:
        raise ToolError(f"the tools' schemas do not combine into a grammar: {e}", "tools") from None


# --- reading the answer ------------------------------------------------------------------

@dataclass
class Call:
    name: str | None = None
    arguments: str = ""  # the arguments' JSON text so far
    complete: bool = False
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


@dataclass
class Parsed:
    content: str  # the text before any call that is safe to show now
    calls: list[Call]


_NAME = r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"%s"\s*:\s*'
# A call in a Markdown JSON block, as small models write one when asked freely (not constrained).
FENCED_CALL = re.compile(r"\s*```(?:json)?\s*\n(\{.*\})\s*```\s*", re.DOTALL)
FENCED_START = re.compile(r"\s*```(?:json)?\s*\n\s*\{")


class CallParser:
    """The content and calls of an answer's text; call `parse` again as the text grows."""

    def __init__(self, request: ToolRequest):
        self.format = request.format
        self._names = {f.name for f in request.callable}
        self._name = re.compile(_NAME % ("parameters" if self.format == "llama3" else "arguments"))
        self._ids: list[str] = []  # each call keeps its id as the text grows

    def parse(self, text: str, final: bool = False) -> Parsed:
        if self.format == "hermes":
            parsed = self._hermes(text, final)
        elif self.format == "llama3":
            parsed = self._llama3(text, final)
        else:
            parsed = self._generic(text, final)
        for i, call in enumerate(parsed.calls):
            if i == len(self._ids):
                self._ids.append(call.id)
            call.id = self._ids[i]
        if final and any(not c.complete or not _is_json(c.arguments) for c in parsed.calls):
            return Parsed(text, [])  # cut short or malformed: the client gets the text as it is
        return parsed

    def _hermes(self, text: str, final: bool) -> Parsed:
        start = text.find(HERMES_OPEN)
        if start < 0 and text.lstrip().startswith("{"):
            return Parsed("", [self._call_in(text, 0)])
        if start < 0 and FENCED_START.match(text):
            if not final:
                return Parsed("", [])  # a call or a JSON answer: known at the end
            fenced = FENCED_CALL.fullmatch(text)
            value = _json_or_none(fenced.group(1)) if fenced else None
            if isinstance(value, dict) and set(value) == {"name", "arguments"} and value["name"] in self._names:
                return Parsed("", [Call(value["name"], json.dumps(value["arguments"], ensure_ascii=False), True)])
            return Parsed(text, [])
        if start < 0:
            if final:
                return Parsed(text, [])
            # Held back: what may begin a <tool_call>, and trailing space (a call would drop it).
            return Parsed(text[:len(text) - _partial_suffix(text, HERMES_OPEN)].rstrip(), [])
        calls = []
        for segment in text[start:].split(HERMES_OPEN)[1:]:
            call = self._call_in(segment.split(HERMES_CLOSE)[0], 0)
            calls.append(call)
        return Parsed(text[:start].rstrip(), calls)

    def _llama3(self, text: str, final: bool) -> Parsed:
        stripped = text.lstrip()
        if not stripped:
            return Parsed(text if final else "", [])
        if not stripped.startswith("{"):
            return Parsed(text, [])
        return Parsed("", [self._call_in(stripped, 0)])

    def _generic(self, text: str, final: bool) -> Parsed:
        if not final:  # the answer's parts are known only once its JSON is whole
            return Parsed("", [])
        try:
            value = json.loads(text)
        except ValueError:
            return Parsed(text, [])
        if isinstance(value, dict) and isinstance(value.get("response"), str):
            return Parsed(value["response"], [])
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            calls = [Call(c.get("name"), json.dumps(c.get("arguments"), ensure_ascii=False), True)
                     for c in value["tool_calls"] if isinstance(c, dict)]
            if all(isinstance(c.name, str) for c in calls):
                return Parsed("", calls)
        return Parsed(text, [])

    def _call_in(self, text: str, pos: int) -> Call:
        """The call whose JSON object starts at or after text[pos] (name first, arguments after)."""
        found = self._name.search(text, pos)
        if not found:
            return Call()
        name = json.loads(f'"{found.group(1)}"')
        end = _value_end(text, found.end())
        if end is None:
            return Call(name, text[found.end():])
        return Call(name, text[found.end():end], True)


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array starting at text[start] ends; None while it is unfinished."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True

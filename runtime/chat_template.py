"""Render a model's chat template (Jinja, from `tokenizer.chat_template`) safely.

Templates come inside downloaded files, so they are untrusted: they render in
jinja2's immutable sandbox (no attribute access to Python internals, no
mutation of our objects) with bounds on steps and value sizes
(template_sandbox), and the output size is bounded, so a template can neither
reach out of the sandbox nor run forever. The variables are those Hugging Face
templates expect.

A template is parsed at its first render (or check()), and jinja2 loaded
then: a run that only continues raw text (`-p`) never pays for either (~15 ms
of a 0.4 s start).
"""

from __future__ import annotations

import datetime
from typing import Any

from ..errors import UserError

MAX_RENDERED_CHARS = 4_000_000
MAX_RANGE_ITEMS = 1_000_000  # all range() items of one render: bounds loops that print nothing


class ChatTemplateError(UserError, ValueError):
    pass


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._parsed = None  # (environment, template) once parsed

    def check(self) -> None:
        """Parse the template now (ChatTemplateError if it does not parse)."""
        self._environment_and_template()

    def _environment_and_template(self):
        if self._parsed is None:
            import jinja2

            from .template_sandbox import BoundedSandbox

            env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                 undefined=jinja2.Undefined)
            env.add_filter("tojson", _tojson)  # HF's tojson keeps non-ASCII and takes indent
            env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
            try:
                self._parsed = env, env.from_string(self.source)
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"the chat template does not parse: {e}") from None
        return self._parsed

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list | None = None, **extra) -> str:
        import jinja2
        from jinja2.sandbox import SecurityError

        from .template_sandbox import TemplateBoundsError

        env, template = self._environment_and_template()
        pieces, size = [], 0
        budget = [MAX_RANGE_ITEMS]

        def bounded_range(*args):
            r = range(*args)
            budget[0] -= len(r)
            if budget[0] < 0:
                raise ChatTemplateError("the chat template loops too long")
            return r

        try:
            stream = env.render_bounded(
                template, messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token, eos_token=self.eos_token, range=bounded_range, **extra)
            for piece in stream:
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise ChatTemplateError(f"the chat template produced more than {MAX_RENDERED_CHARS} characters")
                pieces.append(piece)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, SecurityError, TemplateBoundsError, TypeError, ValueError, KeyError,
                IndexError, AttributeError, RecursionError, OverflowError, ArithmeticError, MemoryError) as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        return "".join(pieces)


def chat_template_for(metadata: dict, tokenizer, override_path: str | None = None) -> ChatTemplate | None:
    """The --chat-template file if given, else the model's own; None: plain completion."""
    if override_path:
        try:
            with open(override_path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read chat template {override_path}: "
                                    f"{getattr(e, 'strerror', None) or e}") from None
    else:
        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            return None

    def text(token_id):
        return tokenizer.token_bytes(token_id).decode("utf-8", "replace") if token_id is not None else ""

    return ChatTemplate(source, bos_token=text(tokenizer.bos_id), eos_token=text(tokenizer.eos_id))

"""A jinja2 sandbox whose renders end, in bounded time and memory.

jinja2's immutable sandbox keeps a template away from Python internals and from
mutating our objects, but not from making huge values (`'x' * 10**10`,
`'%999999999d' % 1`, `2 ** 10**9`) or working forever without printing
(nested loops, exponential macro recursion). This one adds, per render:
- a step budget: every loop iteration (recursive loops included) and every call
  (macros, methods, filters) takes a step;
- a size limit on every value an operator, call, filter or `~` makes, checked
  before the value is made where its size can be known in advance;
- no `lipsum` (it writes as many paragraphs as asked);
- reaching for an unsafe attribute (`''.__class__`) is an error, not an empty value.
Exceeding a bound raises TemplateBoundsError.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

MAX_VALUE_ITEMS = 4_000_000  # characters of a string, items of a list
MAX_STEPS = 200_000  # loop iterations plus calls, per render: real templates take a few thousand
MAX_INT_BITS = 100_000
_FORMAT_NUMBER = re.compile(r"\d{8,}")  # a width or precision of 10^7 or more in a format string


class TemplateBoundsError(ValueError):
    pass


class _Budget:
    def __init__(self) -> None:
        self.steps = MAX_STEPS


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _step(n: int = 1) -> None:
    budget = _budget.get(None)
    if budget is None:
        return
    budget.steps -= n
    if budget.steps < 0:
        raise TemplateBoundsError(f"the chat template runs too long (more than {MAX_STEPS} steps)")


def _sized(value: Any) -> Any:
    """`value`, unless it is too big to keep."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_VALUE_ITEMS:
        raise TemplateBoundsError(f"the chat template made a value of more than {MAX_VALUE_ITEMS} items")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateBoundsError(f"the chat template made an integer of more than {MAX_INT_BITS} bits")
    return value


def _too_big(what: str) -> TemplateBoundsError:
    return TemplateBoundsError(f"the chat template asked for {what} of more than {MAX_VALUE_ITEMS} items")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too big, before computing it."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(n, int) and hasattr(seq, "__len__") and not isinstance(seq, dict):
                if len(seq) * n > MAX_VALUE_ITEMS:
                    raise _too_big("a repetition")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * left.bit_length() > MAX_INT_BITS:
                raise TemplateBoundsError(f"the chat template asked for a power of more than {MAX_INT_BITS} bits")
    elif operator == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,))


def _check_format(spec: str, args: Iterable[Any] = ()) -> None:
    if _FORMAT_NUMBER.search(spec) or any(isinstance(a, int) and a > MAX_VALUE_ITEMS for a in args):
        raise _too_big("formatted text")


def _check_call(func: Any, args: tuple, kwargs: dict) -> None:
    """Refuse calls whose result would be too big: a huge width or count, a
    replace or join that multiplies sizes."""
    values = list(args) + list(kwargs.values())
    if any(isinstance(v, int) and not isinstance(v, bool) and v > MAX_VALUE_ITEMS for v in values):
        raise _too_big("a width or count")
    name = getattr(func, "__name__", "")
    owner = getattr(func, "__self__", None)
    method = isinstance(owner, str)  # a str method, else a filter (after its context argument)
    if name == "replace" and method or name == "do_replace":
        text, old, new = (owner, *args[:2]) if method else args[1:4] if len(args) >= 4 else ("", "", "")
        if all(isinstance(v, str) for v in (text, old, new)):
            occurrences = len(text) + 1 if not old else len(text) // len(old)
            if len(text) + occurrences * len(new) > MAX_VALUE_ITEMS:
                raise _too_big("a replacement")
    elif name == "join" and method or name == "do_join":
        separator, items = (owner, args[0] if args else ()) if method else (
            args[2] if len(args) > 2 else kwargs.get("d", ""), args[1] if len(args) > 1 else ())
        if isinstance(items, (list, tuple)) and isinstance(separator, str):
            size = len(separator) * max(len(items) - 1, 0)
            size += sum(len(i) if isinstance(i, str) else 20 for i in items)
            if size > MAX_VALUE_ITEMS:
                raise _too_big("a join")
    elif name == "translate" and method and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        if len(owner) * longest > MAX_VALUE_ITEMS:
            raise _too_big("a translation")
    elif name == "do_format" and args and isinstance(args[0], str):
        _check_format(args[0], args[1:])


def _bounded_filter(func):
    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _step()
        _check_call(func, args, kwargs)
        return _sized(func(*args, **kwargs))
    return bounded


class _Bounder(NodeTransformer):
    """Rewrites a parsed template so that loops count their steps and `~` checks its result."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.EnvironmentAttribute("bounded_value"), [node], [], None, None, lineno=node.lineno)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.globals.pop("lipsum", None)
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}

    def add_filter(self, name: str, func) -> None:
        self.filters[name] = _bounded_filter(func)

    def _parse(self, source, name, filename):
        return _Bounder().visit(super()._parse(source, name, filename))

    def unsafe_undefined(self, obj: Any, attribute: str):
        # jinja's sandbox returns an undefined value that prints as nothing: fail instead,
        # so that a template reaching for internals is told so.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    def bounded_iter(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            _step()
            yield item

    def bounded_value(self, value: Any) -> Any:
        return _sized(value)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _step()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (__self.bounded_iter(args[0]),) + args[1:]
        elif __obj is not __self.bounded_iter and __obj is not __self.bounded_value:
            _check_call(__obj, args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        spec = getattr(value, "__self__", "")

        def checked(*args, **kwargs):
            _check_format(spec, list(args) + list(kwargs.values()))
            return _sized(wrapped(*args, **kwargs))
        return checked

    def render_bounded(self, template, **variables: Any) -> Iterator[str]:
        """template.generate(**variables), with this render's own step budget."""
        context = contextvars.copy_context()
        context.run(_budget.set, _Budget())
        stream = context.run(template.generate, **variables)
        while True:
            try:
                yield context.run(next, stream)
            except StopIteration:
                return

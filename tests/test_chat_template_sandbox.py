"""Chat templates come inside downloaded models: they must not reach Python's
internals, and every render must end, in bounded time and memory, with the
text or with one ChatTemplateError."""

from __future__ import annotations

import signal
import tracemalloc

import pytest

from llamazip.runtime.chat_template import ChatTemplate, ChatTemplateError

HANG_SECONDS = 60  # a hang guard: the bounds below stop each render long before
MAX_ALLOCATION = 256 << 20
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 1000}]

ESCAPES = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self.__dict__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ (messages|first).__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ range.__closure__ }}",
    "{{ bos_token.__add__ }}",
    "{% for m in messages %}{{ loop.__class__ }}{% endfor %}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0.__globals__}'.format(cycler.__init__) }}",
    "{{ '{0.__init__.__globals__}'.format(joiner) }}",
    "{{ '{m.__class__}'.format_map({'m': messages}) }}",
    "{{ messages|attr('__class__') }}",
    "{{ (messages|first)|attr('__class__') }}",
    "{{ messages.append(1) }}",
    "{{ (messages|first).update(role='system') }}",
    "{% set x = messages.pop() %}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum(n=1000000000) }}",
    "{{ ''.__class__.__base__.__subclasses__()[0].__init__.__globals__['sys'].modules['os'].system('id') }}",
]

# Bounded by the step budget (work that prints nothing).
LONG_RUNNERS = [
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}",
    "{% for c in messages[1].content %}{% for d in messages[1].content %}{% for e in messages[1].content %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
]
# Bounded by the size checks (values too big to make).
BLOW_UPS = [
    "{{ 'x' * 10**10 }}",
    "{{ ['x'] * 10**9 }}",
    "{{ 2 ** 1000000000 }}",
    "{% macro f(x, n) %}{{ f(x * x, n - 1) if n else 1 }}{% endmacro %}{{ f(3, 64) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '%*d' % (999999999, 1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=999999999) }}",
    "{{ 'x'.center(10**9) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'|indent(10**9, true) }}",
    "{{ '%999999999d'|format(1) }}",
    "{{ ('x' * 4000000)|replace('', 'yy') }}",
    "{{ ('x' * 4000000).replace('', 'yy') }}",
    "{{ (['x' * 4000000] * 1000)|join }}",
    "{{ ('x' * 4000000).join(['x' * 4000000] * 100) }}",
    "{{ 'ab'.translate({97: 'x' * 4000000, 98: 'y' * 4000000}) * 2 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('x', 64) }}",
    "{{ 'x' * 4000000 ~ 'x' * 4000000 }}",
    "{% for i in range(1000000) %}{{ 'x' * 100 }}{% endfor %}",
]


@pytest.fixture(autouse=True)
def hang_guard():
    def on_alarm(signum, frame):
        raise AssertionError(f"the render did not end in {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def memory_guard():
    """Fails a test whose render allocates much (tracemalloc slows deep recursion a lot: only here)."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < MAX_ALLOCATION, f"the render allocated {peak / 1e6:.0f} MB"
    finally:
        tracemalloc.stop()


def _fails_cleanly(source: str) -> str:
    with pytest.raises(ChatTemplateError) as caught:
        ChatTemplate(source).render(MESSAGES)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("source", ESCAPES)
def test_templates_cannot_reach_python_internals(source):
    message = _fails_cleanly(source)
    assert "<class" not in message and "<function" not in message and "module" not in message


@pytest.mark.parametrize("source", LONG_RUNNERS)
def test_templates_that_run_forever_stop(source):
    _fails_cleanly(source)


@pytest.mark.parametrize("source", BLOW_UPS)
def test_templates_that_make_huge_values_stop(source, memory_guard):
    _fails_cleanly(source)


def test_a_real_template_still_renders():
    """What Hugging Face templates do: namespaces, loop variables, filters, str methods,
    tojson, raise_exception on a conversation they refuse."""
    source = (
        "{%- set ns = namespace(system='') -%}"
        "{%- for m in messages if m.role == 'system' %}{% set ns.system = m.content|trim %}{% endfor -%}"
        "{{ bos_token }}{% if ns.system %}[SYS]{{ ns.system }}[/SYS]{% endif %}"
        "{%- for m in messages if m.role != 'system' -%}"
        "{%- if m.role not in ('user', 'assistant') %}{{ raise_exception('bad role ' ~ m.role) }}{% endif -%}"
        "<{{ m.role }}>{{ m.content.strip().split('</think>')[-1]|replace('\\n', ' ') }}"
        "{% if loop.last %}|last{% endif %}{% endfor %}"
        "{% if tools %}{{ tools|tojson }}{% endif %}"
        "{{ '%s-%d'|format('n', range(3)|length) }}{{ ', '.join(['a', 'b']) }}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    template = ChatTemplate(source, bos_token="<s>")
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "hi\nthere"},
                {"role": "assistant", "content": "<think>hm</think>hello"}]
    text = template.render(messages, tools=[{"name": "é"}])
    assert text == '<s>[SYS]Be brief.[/SYS]<user>hi there<assistant>hello|last[{"name": "é"}]n-3a, b<assistant>'
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        template.render(messages + [{"role": "tool", "content": "x"}])

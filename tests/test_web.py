"""The chat page in headless Chromium against the real server: typing, streaming,
stopping, and model output that looks like HTML staying text.

Chromium is driven through its DevTools protocol over a pipe (fds 3 and 4 of the
browser, --remote-debugging-pipe): no port to find, no websocket library.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from llamazip_server import running_server

pytestmark = pytest.mark.model

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox",  # no sandbox: the tests may run as root
    "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
    "--remote-debugging-pipe",
]


class Chromium:
    def __init__(self, profile: Path, log: Path):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            pytest.fail("chromium is missing: run `make setup-test`")
        to_browser_read, to_browser_write = os.pipe()
        from_browser_read, from_browser_write = os.pipe()

        def pipe_fds() -> None:  # in the child: the browser reads commands on fd 3, writes replies on fd 4
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(3, 4), preexec_fn=pipe_fds)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._commands = os.fdopen(to_browser_write, "wb")
        self._replies = from_browser_read
        self._buffer = b""
        self._last_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._commands.write(json.dumps(message).encode() + b"\0")
        self._commands.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next_message(deadline)
            if reply.get("id") == self._last_id:  # anything else is an event we do not follow
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def _next_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            data = os.read(self._replies, 1 << 16)
            if not data:
                raise AssertionError("chromium closed its DevTools pipe")
            self._buffer += data
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        self._commands.close()
        os.close(self._replies)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Page:
    """One tab, driven with JavaScript and key presses."""

    def __init__(self, browser: Chromium, url: str):
        self.browser = browser
        self.target = browser.send("Target.createTarget", {"url": url})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": self.target, "flatten": True})["sessionId"]
        self.wait_for("document.readyState === 'complete' && typeof renderMarkdown === 'function'")

    def close(self) -> None:
        self.browser.send("Target.closeTarget", {"targetId": self.target})

    def evaluate(self, expression: str):
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, self.session)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        """Poll until `expression` is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.05)
        raise AssertionError(f"still false after {timeout} s: {expression}")

    def type_and_send(self, text: str) -> None:
        self.evaluate("document.getElementById('input').focus()")
        self.browser.send("Input.insertText", {"text": text}, self.session)
        for kind in ("keyDown", "keyUp"):
            self.browser.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                         "windowsVirtualKeyCode": 13}, self.session)


LAST_ANSWER = "[...document.querySelectorAll('.message.assistant .content')].pop()?.textContent"
STREAMING = "document.querySelector('.message.streaming') !== null"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("web") / "server.log"
    with running_server(smollm2_path, log, "-c", "1024", "-n", "48") as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(folder / "profile", folder / "chromium.log")
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser, server):
    tab = Page(browser, server.url + "/")
    yield tab
    tab.close()


def test_a_streamed_answer_appears_and_the_conversation_goes_on(page):
    page.wait_for("document.getElementById('model-name').textContent.toLowerCase().startsWith('smollm2')")
    page.type_and_send("Write a short poem about the sea.")
    # Text while the caret still blinks: the answer arrives in pieces.
    first = page.wait_for(f"({STREAMING}) && {LAST_ANSWER}")
    page.wait_for(f"!({STREAMING})")
    answer = page.evaluate(LAST_ANSWER)
    assert len(answer) > len(first) and answer.strip()
    assert page.evaluate("document.getElementById('input').value") == ""

    page.type_and_send("Thanks! Now one line about the moon.")
    page.wait_for(f"document.querySelectorAll('.message.assistant').length === 2 && !({STREAMING})")
    assert page.evaluate("conversation.map(m => m.role).join()") == "user,assistant,user,assistant"
    assert page.evaluate(LAST_ANSWER).strip()


def test_stop_ends_the_answer(page):
    page.type_and_send("Count from 1 to 100.")
    page.wait_for(f"({STREAMING}) && {LAST_ANSWER}")
    page.evaluate("document.getElementById('stop').click()")
    page.wait_for(f"!({STREAMING}) && !document.getElementById('send').hidden", timeout=5)
    assert page.evaluate("document.getElementById('stop').hidden")


RENDER = """(() => {
  const box = document.createElement('div');
  box.innerHTML = renderMarkdown(%s);
  return {tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()), text: box.textContent};
})()"""


@pytest.mark.parametrize("source", [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    '**<a href="javascript:alert(1)">bold</a>** `<b>code</b>`',
    "# <svg onload=alert(1)>\n\n- <iframe src=x>\n\n```\n</code></pre><img src=x>\n```",
])
def test_html_in_model_output_stays_text(page, source):
    rendered = page.evaluate(RENDER % json.dumps(source))
    assert set(rendered["tags"]) <= {"p", "br", "strong", "em", "code", "pre", "h1", "ul", "ol", "li"}
    for dangerous in ("<img", "<script", "<a ", "<svg", "<iframe"):
        assert (dangerous in source) == (dangerous in rendered["text"])


def test_markdown(page):
    source = "# Title\n\nSome **bold**, *italic* and `x * y`.\n\n- one\n- two\n\n1. first\n2. second\n\n```\na < b\n```"
    rendered = page.evaluate(RENDER % json.dumps(source))
    assert rendered["tags"] == ["h1", "p", "strong", "em", "code", "ul", "li", "li", "ol", "li", "li", "pre", "code"]
    assert "a < b" in rendered["text"] and "**" not in rendered["text"]


def test_a_hostile_streamed_answer_is_shown_as_text(page):
    """The whole path, fetch to screen, with the server's answer replaced by one that carries HTML."""
    hostile = '<img src=x onerror="window.pwned = true">Hi <b>there</b>'
    page.evaluate("""window.fetch = async () => {
      const chunk = (delta) => `data: ${JSON.stringify({choices: [{index: 0, delta}]})}\\n\\n`;
      const body = chunk({role: 'assistant', content: ''}) + chunk({content: %s}) + 'data: [DONE]\\n\\n';
      return new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
    }""" % json.dumps(hostile))
    page.type_and_send("Hello")
    page.wait_for(f"!({STREAMING}) && {LAST_ANSWER}")
    assert page.evaluate(LAST_ANSWER) == hostile
    assert page.evaluate("document.querySelectorAll('#messages img, #messages b').length") == 0
    assert page.evaluate("window.pwned === undefined")

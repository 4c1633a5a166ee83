"""The terminal chat driven through a pseudo-terminal, as a person types."""

import os
import pty
import select
import sys
import time

import pytest

pytestmark = pytest.mark.model


class Terminal:
    def __init__(self, args: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, with the pty as its controlling terminal
            os.execv(sys.executable, [sys.executable, "-m", "llamazip", *args])
        self.buffer = b""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Read until `text` appears; return everything up to and including it."""
        deadline = time.time() + timeout
        while text.encode() not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                pytest.fail(f"no {text!r} within {timeout} s; the screen ends with {self.buffer[-500:]!r}")
            try:
                self.buffer += os.read(self.fd, 4096)
            except OSError:  # the child has gone
                pytest.fail(f"the chat ended before {text!r}; the screen ends with {self.buffer[-500:]!r}")
        end = self.buffer.index(text.encode()) + len(text)
        seen, self.buffer = self.buffer[:end], self.buffer[end:]
        return seen.decode("utf-8", "replace")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_status(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def test_two_turns_undo_interrupt_and_exit(smollm2_path):
    term = Terminal(["run", "-m", str(smollm2_path), "--temp", "0", "-c", "1024", "-n", "300"])
    assert "/help" in term.expect("> ")

    term.type("What is the capital of France?\r")
    assert "Paris" in term.expect("\n> ")
    term.type("And what is the capital of Italy?\r")
    second = term.expect("\n> ")
    assert len(second.split("?", 1)[1].strip()) > 0  # an answer was written

    term.type("/undo\r")
    assert "took back" in term.expect("> ")

    term.type("Write a very long story about a dragon who learns to read.\r")
    term.expect("read.\r\n")
    term.expect(" ")  # the answer has begun
    term.type("\x03")  # Ctrl-C: stops the answer, not the chat
    assert "(stopped)" in term.expect("> ")

    term.type("/stats\r")
    assert "context:" in term.expect("> ")
    term.type("/exit\r")
    assert term.exit_status() == 0

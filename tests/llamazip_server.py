"""`llamazip run --server` in a subprocess, for the tests that talk to it over HTTP."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_SECONDS = 300  # loading the model may include compiling the kernels


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on, and not one this process handed out before: a server
    binds its port a second or more after it is chosen, and the system may give the
    same free port twice in that time (two servers started together then collided)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _ctrl_c_reaches_it() -> None:
    """In the child before exec: SIGINT back to its default. A test run started in
    the background of a script (`pytest &`) ignores SIGINT, as POSIX shells make
    background commands do, and a child inherits that: stop() would never reach
    the server."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    def __init__(self, model: Path, log: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "llamazip", "run", "-m", str(model), "--server",
                 "--port", str(self.port), "--nobrowser", *flags],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_ctrl_c_reaches_it)

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if self.request("GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"the server did not answer /health in {STARTUP_SECONDS} s:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body: dict | bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, dict | str]:
        """One request on a fresh connection: (status, the JSON body or the text)."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; the exit status."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the server did not stop on Ctrl-C") from None


@contextmanager
def running_server(model: Path, log: Path, *flags: str) -> Iterator[Server]:
    """A healthy server; afterwards it must stop cleanly on Ctrl-C, never having printed a traceback."""
    server = Server(model, log, *flags)
    try:
        server.wait_until_healthy()
        yield server
    finally:
        status = server.stop()
    output = log.read_text()
    assert status == 0, output
    assert "Traceback" not in output, output

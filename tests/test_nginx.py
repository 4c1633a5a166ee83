"""Two replicas behind nginx, with deploy/nginx.conf (its ports changed): both serve
concurrent streams, one is killed mid-run, every request started afterwards is
answered by the other (one of them after nginx found the dead one refusing its
connection), the streams the dead one was writing end without hanging and
without their `data: [DONE]`, and a client that leaves mid-stream stops its
generation on the replica.

Debian's nginx (`make setup-test` installs it) runs on loopback as a child of the
test, with its own prefix, pid file and logs: never the system's service.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from llamazip_server import Server, free_port
from tiny_models import TinyLlama

DEPLOY_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
REPLICA_FLAGS = ("-t", "1", "-c", "2048", "--parallel", "4")  # one core each: two replicas on two cores
HANG_SECONDS = 60  # a stream silent this long has hung (a failure, never a speed limit)
NEVER_ENDS = "root ::= [a-z] root"  # a grammar that keeps the end-of-text token out: max_tokens decides the length
LONG_TOKENS = 1200  # streams still running when a replica is killed
SHORT_TOKENS = 12


@pytest.fixture
def nginx_binary() -> str:
    binary = shutil.which("nginx", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if binary is None:
        pytest.fail("nginx is missing: run `make setup-test`")
    return binary


def _render(conf: str, replica_ports: list[int], listen_port: int, access_log: Path) -> str:
    """deploy/nginx.conf with the test's ports and log; every replaced text must be there once."""
    replacements = {"server 127.0.0.1:8081 ": f"server 127.0.0.1:{replica_ports[0]} ",
                    "server 127.0.0.1:8082 ": f"server 127.0.0.1:{replica_ports[1]} ",
                    "listen 8080;": f"listen 127.0.0.1:{listen_port};",
                    "/var/log/nginx/llamazip.log": str(access_log)}
    for old, new in replacements.items():
        assert conf.count(old) == 1, f"{DEPLOY_CONF} no longer has {old!r} once"
        conf = conf.replace(old, new)
    return conf


class Nginx:
    """nginx in the foreground (a child process), in a prefix of its own."""

    def __init__(self, binary: str, prefix: Path, replica_ports: list[int]):
        self.port = free_port()
        self.error_log = prefix / "error.log"
        (prefix / "llamazip.conf").write_text(
            _render(DEPLOY_CONF.read_text(), replica_ports, self.port, prefix / "access.log"))
        temp_paths = "\n".join(f"    {name}_temp_path {prefix / name};"
                               for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(
            f"worker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {self.error_log} info;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n{temp_paths}\n    include {prefix / 'llamazip.conf'};\n}}\n")
        self.output = prefix / "stderr.log"
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                [binary, "-p", str(prefix), "-e", str(self.error_log), "-c", str(prefix / "nginx.conf"),
                 "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output)

    def wait_until_listening(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited with {self.process.returncode}: {self.output.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx did not listen in 30 s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()  # the master stops its workers
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Stream(threading.Thread):
    """One streamed completion through nginx, read to its end in its own thread."""

    def __init__(self, port: int, max_tokens: int, seed: int):
        super().__init__(daemon=True)
        self.port = port
        self.body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
                     "grammar": NEVER_ENDS, "temperature": 0.8, "seed": seed}
        self.status: int | None = None
        self.replicas = ""  # nginx's X-Llamazip-Replica: "a" or, after a retry, "a, b"
        self.data = b""  # the whole body, once the stream has ended
        self.error: Exception | None = None
        self.first_event = threading.Event()  # the replica has begun generating
        self.start()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HANG_SECONDS)
        received = bytearray()
        try:
            connection.request("POST", "/v1/completions", json.dumps(self.body),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            self.status, self.replicas = response.status, response.getheader("X-Llamazip-Replica", "")
            while chunk := response.read1(65536):
                received += chunk
                if not self.first_event.is_set() and b"data: " in received:
                    self.first_event.set()
        except Exception as e:  # http.client.IncompleteRead, ConnectionResetError, TimeoutError
            self.error = e
        finally:
            connection.close()
            self.data = bytes(received)  # read by the test once the thread has ended
            self.first_event.set()

    @property
    def answered_by(self) -> str:
        return self.replicas.split(", ")[-1]

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.error is None and self.data.rstrip().endswith(b"data: [DONE]")

    def finished(self) -> None:
        self.join(HANG_SECONDS + 10)
        assert not self.is_alive(), f"a stream through {self.replicas} hung"
        assert not isinstance(self.error, TimeoutError), f"a stream through {self.replicas} hung: {self.error}"

    def describe(self) -> str:
        return (f"status {self.status} via {self.replicas!r}, {self.data.count(b'data: ')} events, "
                f"error {self.error!r}, ends {self.data[-80:]!r}")


def _all_finished(streams: list[Stream]) -> None:
    for stream in streams:
        stream.finished()


@pytest.fixture
def replicas(tmp_path):
    """Two healthy `llamazip run --server` processes of a tiny model; stopped afterwards."""
    model = TinyLlama(seed=11).write(tmp_path / "tiny.gguf")
    servers = [Server(model, tmp_path / f"replica{i}.log", *REPLICA_FLAGS) for i in range(2)]
    try:
        for server in servers:
            server.wait_until_healthy()
        yield servers
    finally:
        statuses = []
        for server in servers:  # each one, even when stopping another failed
            try:
                statuses.append(server.stop() if server.process.poll() is None else None)
            except AssertionError as e:
                statuses.append(e)
    for server, status in zip(servers, statuses):
        log = server.log.read_text()
        assert status in (0, None) and "Traceback" not in log, log  # None: killed by the test


@pytest.fixture
def nginx(nginx_binary, tmp_path, replicas):
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    proxy = Nginx(nginx_binary, prefix, [server.port for server in replicas])
    try:
        proxy.wait_until_listening()
        yield proxy
    finally:
        proxy.stop()


def test_replicas_behind_nginx_survive_a_killed_one(nginx, replicas):  # nginx first: missing, it fails at once
    victim, survivor = replicas
    victim_address, survivor_address = (f"127.0.0.1:{server.port}" for server in replicas)
    seeds = iter(range(1000))

    # Both replicas serve concurrent streams.
    warm = [Stream(nginx.port, SHORT_TOKENS, next(seeds)) for _ in range(8)]
    _all_finished(warm)
    assert all(s.complete for s in warm), [s.describe() for s in warm if not s.complete]
    assert {s.answered_by for s in warm} == {victim_address, survivor_address}

    # Long streams on both; the victim dies (SIGKILL, as a crash) while writing its share.
    long = [Stream(nginx.port, LONG_TOKENS, next(seeds)) for _ in range(6)]
    for stream in long:
        assert stream.first_event.wait(HANG_SECONDS), "a long stream did not begin"
    assert all(s.status == 200 for s in long), [s.describe() for s in long]
    cut = [s for s in long if s.answered_by == victim_address]
    going_on = [s for s in long if s.answered_by == survivor_address]
    assert cut and going_on, f"least_conn should spread the long streams: {[s.replicas for s in long]}"
    victim.process.kill()
    victim.process.wait()

    # Requests right after the kill, and after the cut streams have ended.
    after = [Stream(nginx.port, SHORT_TOKENS, next(seeds)) for _ in range(6)]
    _all_finished(cut)
    after += [Stream(nginx.port, SHORT_TOKENS, next(seeds)) for _ in range(6)]
    _all_finished(after + going_on)

    # The cut streams ended, without their [DONE]: a closed connection, or (the replica's
    # stream has no length or chunks of its own to say it was cut) an HTTP end with no
    # finish_reason in it.
    for stream in cut:
        assert not stream.complete and b'"finish_reason": "length"' not in stream.data, stream.describe()
    # Every request started after the kill was answered, by the survivor; nginx tried the
    # dead replica for at least one of them and retried it there.
    assert all(s.complete for s in after), [s.describe() for s in after if not s.complete]
    assert {s.answered_by for s in after} == {survivor_address}
    assert any(s.replicas == f"{victim_address}, {survivor_address}" for s in after), \
        [s.replicas for s in after]
    assert "Connection refused" in nginx.error_log.read_text()
    # The survivor's own long streams went on to their end.
    assert all(s.complete for s in going_on), [s.describe() for s in going_on if not s.complete]

    # A client that leaves mid-stream: nginx closes its connection to the replica, which
    # stops that generation (its slot goes free before the answer's length).
    before = {slot["id"]: slot["n_decoded"] for slot in survivor.request("GET", "/slots")[1]}
    _leave_after_the_first_event(nginx.port, next(seeds))
    deadline = time.monotonic() + HANG_SECONDS
    slots = survivor.request("GET", "/slots")[1]
    while any(slot["is_processing"] for slot in slots):
        assert time.monotonic() < deadline, f"the generation of a client that left goes on: {slots}"
        time.sleep(0.1)
        slots = survivor.request("GET", "/slots")[1]
    changed = [slot["n_decoded"] for slot in slots if slot["n_decoded"] != before[slot["id"]]]
    assert changed and all(n < LONG_TOKENS for n in changed), (before, slots)


def _leave_after_the_first_event(port: int, seed: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_SECONDS)
    try:
        connection.request("POST", "/v1/completions",
                           json.dumps({"prompt": "Once upon a time", "max_tokens": LONG_TOKENS, "stream": True,
                                       "grammar": NEVER_ENDS, "seed": seed}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.read1(65536).startswith(b"data: ")
    finally:
        connection.close()

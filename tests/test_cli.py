"""`llamazip run` as a user runs it: a subprocess, text on stdout, one-line errors."""

import os
import subprocess
import sys

import pytest

from tiny_models import TinyLlama


def run(*args, check_error=False):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "llamazip", "run", *map(str, args)],
                            capture_output=True, text=True, env=env, timeout=300)
    if check_error:
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyLlama(seed=11).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_greedy_run_is_deterministic(tiny):
    first = run("-m", tiny, "-p", "Hello", "-n", 12, "--temp", 0)
    assert first.returncode == 0, first.stderr
    assert first.stdout == run("-m", tiny, "-p", "Hello", "-n", 12, "--temp", 0).stdout
    assert first.stderr == ""


def test_same_seed_same_text(tiny):
    a = run("-m", tiny, "-p", "Hi", "-n", 16, "--temp", 1.5, "--seed", 5).stdout
    b = run("-m", tiny, "-p", "Hi", "-n", 16, "--temp", 1.5, "--seed", 5).stdout
    assert a == b and a


def test_n_zero_prints_nothing(tiny):
    result = run("-m", tiny, "-p", "Hello", "-n", 0)
    assert result.returncode == 0 and result.stdout == ""


def test_empty_prompt_starts_from_bos_when_the_model_adds_one(tiny):
    result = run("-m", tiny, "-p", "", "-n", 4, "--temp", 0, "--verbose")
    assert result.returncode == 0 and "generated: 4 tokens" in result.stderr


def test_empty_prompt_without_bos_is_an_error(tmp_path):
    path = TinyLlama(add_bos=False).write(tmp_path / "nobos.gguf")
    assert "prompt is empty" in run("-m", path, "-p", "", check_error=True).stderr


def test_context_smaller_than_prompt(tiny):
    assert "context holds 8" in run("-m", tiny, "-p", "a long prompt here", "-c", 8, check_error=True).stderr


def test_missing_file(tmp_path):
    assert "cannot open" in run("-m", tmp_path / "none.gguf", "-p", "x", check_error=True).stderr


def test_text_file_named_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_text("just some text\n")
    assert "not a GGUF file" in run("-m", path, "-p", "x", check_error=True).stderr


def test_truncated_file(tiny, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny.read_bytes()[:5000])
    run("-m", path, "-p", "x", check_error=True)


@pytest.mark.parametrize("flags", [["-t", 0], ["-c", -1], ["-n", -2], ["--top-p", 0], ["--temp", "nan"]])
def test_bad_settings(tiny, flags):
    run("-m", tiny, "-p", "x", *flags, check_error=True)


@pytest.mark.model
def test_smollm2_capital_of_france(smollm2_path):
    result = run("-m", smollm2_path, "-p", "The capital of France is", "-n", 16, "--temp", 0)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


EXIT_NOW = """
import atexit, sys, threading, time
from llamazip.main import exit_now
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("unflushed ")
if sys.argv[1] == "thread":  # a non-daemon thread still running: the normal exit waits for it
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
exit_now(3)
"""


@pytest.mark.parametrize("case", ["alone", "thread"])
def test_exit_now_flushes_runs_atexit_and_keeps_the_code(case):
    result = subprocess.run([sys.executable, "-c", EXIT_NOW, case], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout.startswith("unflushed ") and "atexit ran" in result.stdout
    assert ("thread done" in result.stdout) == (case == "thread")


def test_a_broken_chat_template_file_is_one_error_even_for_a_raw_prompt(tiny, tmp_path):
    template = tmp_path / "broken.jinja"
    template.write_text("{{ messages")
    result = run("-m", tiny, "--chat-template", template, "-p", "Hello", "-n", 2, check_error=True)
    assert "does not parse" in result.stderr

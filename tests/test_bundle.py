"""A SmolLM2 bundle, built and run as a user would: in a Python with no packages."""

import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import pytest

from llamazip.runtime import tokenizer_cache
from llamazip.zipalign.reader import read_members
from tiny_models import TinyLlama

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"


def llamazip(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llamazip", *map(str, args)], capture_output=True, text=True, **kw)


def build(model, out, *args):
    result = llamazip("build", "-m", model, "-o", out, *args)
    assert result.returncode == 0, result.stderr
    return Path(out)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """An interpreter with none of numpy, numba or tiktoken."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python3"
    assert subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode != 0
    return python


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bundle(smollm2_path, tmp_path_factory):
    return build(smollm2_path, tmp_path_factory.mktemp("out") / "smollm2.llamazip")


def run_bundle(path, *args, python, cache, **kw):
    env = dict(os.environ, LLAMAZIP_PYTHON=str(python), LLAMAZIP_CACHE=str(cache))
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(path), *map(str, args)], capture_output=True, text=True, env=env, **kw)


def test_bundle_runs_without_packages_like_run(bundle, smollm2_path, bare_python, cache):
    expected = llamazip("run", "-m", smollm2_path, "-p", PROMPT, "-n", 16, "--temp", 0)
    assert expected.returncode == 0, expected.stderr
    got = run_bundle(bundle, "-p", PROMPT, "-n", 16, "--temp", 0, python=bare_python, cache=cache)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout and "Paris" in got.stdout
    assert os.access(bundle, os.X_OK)


def test_the_hosts_site_packages_stay_out(bundle, tmp_path, cache):
    """The launcher starts Python with -S: nothing in the host's site-packages (a .pth,
    a package of the same name) runs inside a bundle."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python3"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "noisy.pth").write_text("import sys; sys.stderr.write('host site ran\\n')\n")
    assert "host site ran" in subprocess.run([python, "-c", "pass"], capture_output=True, text=True).stderr
    got = run_bundle(bundle, "-p", PROMPT, "-n", 4, "--temp", 0, python=python, cache=cache)
    assert got.returncode == 0, got.stderr
    assert "host site ran" not in got.stderr and got.stdout.strip()


def test_bundle_is_a_valid_zip(bundle):
    if shutil.which("unzip"):
        result = subprocess.run(["unzip", "-tq", str(bundle)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    members = {m.name: m for m in read_members(str(bundle))}
    weights = members["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert weights.stored and weights.data_offset % 4096 == 0
    assert {"bootstrap.py", ".args", "MANIFEST.json"} <= members.keys()
    assert {"__main__.py", "wheels/index.json", "wheels/files.pack"} <= members.keys()
    with zipfile.ZipFile(bundle) as zf:
        index = json.loads(zf.read("wheels/index.json"))
    assert any(name.startswith("numpy-") for name in index["wheels"])


def _generated(result) -> int:
    assert result.returncode == 0, result.stderr
    return int(result.stderr.split("generated: ")[1].split()[0])


def test_default_args_and_where_user_args_go(smollm2_path, tmp_path, bare_python, cache):
    placed = build(smollm2_path, tmp_path / "placed.llamazip", "--args=--temp 0 -n 2 ... -n 5 --verbose")
    # -n 9 lands between the defaults: the later -n 5 wins.
    assert _generated(run_bundle(placed, "-p", "1, 2, 3,", "-n", 9, python=bare_python, cache=cache)) == 5
    appended = tmp_path / "args"
    appended.write_text("# defaults\n--temp\n0\n-n\n3\n--verbose\n")
    plain = build(smollm2_path, tmp_path / "plain.llamazip", "--args-file", appended)
    assert _generated(run_bundle(plain, "-p", "1, 2, 3,", python=bare_python, cache=cache)) == 3
    assert _generated(run_bundle(plain, "-p", "1, 2, 3,", "-n", 7, python=bare_python, cache=cache)) == 7
    info = llamazip("info", plain)
    assert info.returncode == 0 and "--verbose" in info.stdout and "general.architecture = llama" in info.stdout


def test_same_inputs_same_bytes(smollm2_path, bundle, tmp_path):
    again = build(smollm2_path, tmp_path / "again.llamazip")
    assert again.read_bytes() == bundle.read_bytes()


def test_verify_names_a_changed_weights_member(bundle, tmp_path):
    assert llamazip("verify", bundle).returncode == 0
    damaged = tmp_path / "damaged.llamazip"
    shutil.copy(bundle, damaged)
    weights = next(m for m in read_members(str(damaged)) if m.name.endswith(".gguf"))
    with open(damaged, "r+b") as f:
        f.seek(weights.data_offset + weights.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = llamazip("verify", damaged)
    assert result.returncode == 1 and weights.name in result.stderr and "FAILED" in result.stdout


def test_truncated_bundle_is_a_clear_error(bundle, tmp_path, bare_python, cache):
    cut = tmp_path / "cut.llamazip"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    cut.chmod(0o755)
    result = run_bundle(cut, "-p", PROMPT, python=bare_python, cache=cache)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    run = llamazip("run", "-m", cut, "-p", PROMPT)
    assert run.returncode == 1 and "truncated or damaged" in run.stderr


def test_compressed_weights_are_refused_with_a_hint(bundle, tmp_path, bare_python, cache, smollm2_path):
    squeezed = tmp_path / "squeezed.llamazip"
    shutil.copy(bundle, squeezed)
    assert llamazip("zipalign", "-6", "-j", squeezed, smollm2_path).returncode == 0
    result = run_bundle(squeezed, "-p", PROMPT, "-n", 1, python=bare_python, cache=cache)
    assert result.returncode == 1 and "compressed" in result.stderr and "llamazip build" in result.stderr


def test_killed_build_leaves_the_earlier_output(smollm2_path, tmp_path):
    out = build(smollm2_path, tmp_path / "out.llamazip")
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-m", "llamazip", "build", "-m", str(smollm2_path), "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            partial = list(tmp_path.glob(".out.llamazip.*.partial"))
            if partial and partial[0].stat().st_size > 20_000_000:  # midway through the weights
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == before
        if sig == signal.SIGTERM:
            assert not list(tmp_path.glob("*.partial"))


def test_weights_are_mapped_not_copied(bundle, smollm2_path, tmp_path, bare_python, cache):
    """Private memory of the running bundle, beyond the runtime's own (a bundle of a
    tiny model) and the KV cache it fills, stays under half the weights' size.

    The test maps the bundle itself first, so pages of the file that the runtime
    maps count as shared; weights copied into the process would count as private.
    """
    tiny = TinyLlama(weight_type=gguf.GGMLQuantizationType.Q4_1).write(tmp_path / "tiny.gguf")
    tiny_bundle = build(tiny, tmp_path / "tiny.llamazip")
    n_ctx, n_gen = 256, 120

    def private_kib(path: Path) -> int:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            sum(m[i] for i in range(0, len(m), 4096))  # touch every page: shared from now on
            # Not repacked (interleaved.py: a model that fits the cache would be, into a copy).
            env = dict(os.environ, LLAMAZIP_PYTHON=str(bare_python), LLAMAZIP_CACHE=str(cache),
                       LLAMAZIP_INTERLEAVE="0")
            args = [str(path), "-p", "Once upon a time", "-n", str(n_gen), "-c", str(n_ctx), "--temp", "0"]
            subprocess.run(args, env=env, capture_output=True, check=True)  # warm: compiled, unpacked
            proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            peak = 0
            while proc.poll() is None:
                try:
                    rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
                except OSError:
                    break
                fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
                peak = max(peak, fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))
                time.sleep(0.02)
            assert proc.wait() == 0
            return peak

    weights = smollm2_path.stat().st_size
    kv_cache = 2 * 30 * 3 * 64 * 4 * n_ctx  # k and v: layers x kv heads x head size x float32 x positions
    extra = (private_kib(bundle) - private_kib(tiny_bundle)) * 1024 - kv_cache
    assert extra < 0.5 * weights, f"{extra / 1e6:.1f} MB private beyond the runtime, weights {weights / 1e6:.1f} MB"


def test_cache_races_and_fallbacks(bundle, tmp_path, bare_python):
    fresh = tmp_path / "fresh-cache"
    env = dict(os.environ, LLAMAZIP_PYTHON=str(bare_python), LLAMAZIP_CACHE=str(fresh))
    args = [str(bundle), "-p", PROMPT, "-n", 4, "--temp", 0]
    runs = [subprocess.Popen(list(map(str, args)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [r.communicate() for r in runs]
    assert all(r.returncode == 0 for r in runs), outputs
    assert outputs[0][0] == outputs[1][0] and "Paris" in outputs[0][0]
    assert len([p for p in fresh.iterdir() if not p.name.startswith(".") and p.name != tokenizer_cache.FOLDER]) == 1
    assert not [p for p in fresh.iterdir() if p.name.startswith(".")]  # no partial trees left

    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    result = run_bundle(bundle, "-p", PROMPT, "-n", 4, "--temp", 0, python=bare_python, cache=blocked / "cache")
    assert result.returncode == 0 and result.stdout == outputs[0][0]
    assert result.stderr.count("warning:") == 1


def test_bundle_over_4_gib_starts(bundle, smollm2_path, tmp_path, bare_python, cache):
    big = tmp_path / "big.llamazip"
    shutil.copy(bundle, big)
    padding = tmp_path / "padding.bin"
    with open(padding, "wb") as f:
        f.truncate((4 << 30) + 4096)
    # Re-adding the model after the padding moves the weights past 4 GiB.
    assert llamazip("zipalign", "-j", big, padding, smollm2_path).returncode == 0
    weights = next(m for m in read_members(str(big)) if m.name.endswith(".gguf"))
    assert weights.data_offset > 1 << 32
    with zipfile.ZipFile(big) as zf:
        assert zf.getinfo("padding.bin").file_size > 1 << 32
    result = run_bundle(big, "-p", PROMPT, "-n", 8, "--temp", 0, python=bare_python, cache=cache)
    assert result.returncode == 0 and "Paris" in result.stdout, result.stderr
    # `python3 BUNDLE`: Python's zip importer reads ZIP64 only from 3.13 on (before, it finds no
    # __main__.py: Python's own message, which a zip cannot change).
    env = dict(os.environ, LLAMAZIP_CACHE=str(cache))
    direct = subprocess.run([str(bare_python), str(big), "-p", PROMPT, "-n", "8", "--temp", "0"],
                            capture_output=True, text=True, env=env)
    if sys.version_info >= (3, 13):
        assert direct.returncode == 0 and direct.stdout == result.stdout, direct.stderr
    else:
        assert direct.returncode != 0 and "__main__" in direct.stderr, direct.stderr


def test_without_numba_the_numpy_kernels_run_with_one_warning(bundle, tmp_path, bare_python):
    from llamazip.zipalign.writer import Member, write_zip

    stripped = tmp_path / "no-numba.llamazip"
    with zipfile.ZipFile(bundle) as zf, open(stripped, "wb") as out:
        with open(bundle, "rb") as f:
            out.write(f.read(min(i.header_offset for i in zf.infolist())))  # the launcher
        index = json.loads(zf.read("wheels/index.json"))
        index["wheels"] = {name: files for name, files in index["wheels"].items()
                           if not name.startswith(("numba-", "llvmlite-"))}
        members = [Member.from_bytes(i.filename, zf.read(i)) for i in zf.infolist() if i.filename != "wheels/index.json"]
        write_zip(out, members + [Member.from_bytes("wheels/index.json", json.dumps(index).encode())])
    stripped.chmod(0o755)
    # Its own cache: the unpacked tree is keyed by MANIFEST.json, which this copy shares with the original.
    result = run_bundle(stripped, "-p", PROMPT, "-n", 8, "--temp", 0, python=bare_python, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "numpy kernels" in warnings[0]

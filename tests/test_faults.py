"""Bad luck during a build and a first run: builds killed at random moments, a
full disk, racing first runs, a damaged or read-only cache, altered weights."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from llamazip.templates import bootstrap
from llamazip.zipalign.reader import read_members
from tiny_models import TinyLlama

BOOTSTRAP = Path(bootstrap.__file__)


def llamazip(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamazip", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line a failure ends with (progress lines may come before it)."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return TinyLlama(seed=3).write(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_bundle(tiny, tmp_path_factory) -> Path:
    """A bundle without wheels: it runs on this interpreter's packages, so it starts fast."""
    from llamazip.builder.bundle import BuildOptions, build_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny.llamazip"
    build_bundle(BuildOptions(model=tiny, output=out, with_deps=False), log=lambda msg: None)
    return out


# --- builds killed at random moments -----------------------------------------------------------

def test_builds_killed_at_random_moments(tiny, tmp_path):
    """SIGTERM and SIGKILL at several moments of a build (wheels, weights, manifest):
    the earlier output stays whole; SIGTERM leaves nothing behind, SIGKILL at most a
    hidden temporary file, which the next build removes."""
    out = tmp_path / "out.llamazip"
    command = [sys.executable, "-m", "llamazip", "build", "-m", str(tiny), "-o", str(out)]
    started = time.monotonic()
    assert subprocess.run(command, capture_output=True).returncode == 0
    duration = time.monotonic() - started
    before = sha256(out)
    rng = random.Random(9)
    for sig in [signal.SIGTERM, signal.SIGKILL] * 3:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, duration))
        proc.send_signal(sig)
        proc.wait()
        # Killed, or finished first: either way the output is a whole bundle, the same one.
        assert sha256(out) == before, f"the output changed after {sig.name}"
        partial = list(tmp_path.glob(".out.llamazip.*.partial"))
        if sig == signal.SIGTERM:  # (an earlier SIGKILL's leftover stays until a build gets that far)
            own = [p for p in partial if f".{proc.pid}." in p.name]
            assert not own, f"{sig.name} left {own}"
        # (A killed conversion's `.work` folder is the model-input step's to clean.)
        left = {p.name for p in tmp_path.iterdir() if p.suffix != ".work"}
        assert left <= {"out.llamazip"} | {p.name for p in partial}
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert sha256(out) == before
    left = [p.name for p in tmp_path.iterdir() if p.suffix != ".work"]
    assert left == ["out.llamazip"], "stale temporary files were not removed"


def test_a_running_build_keeps_its_temporary_file(tmp_path):
    from llamazip.builder.bundle import remove_stale_partials

    out = tmp_path / "x.llamazip"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f".x.llamazip.{os.getpid()}.abc.partial"
    gone = tmp_path / f".x.llamazip.{dead.pid}.abc.partial"
    other = tmp_path / ".y.llamazip.1.abc.partial"
    for path in (mine, gone, other):
        path.write_bytes(b"partial")
    work = tmp_path / f".x.llamazip.{dead.pid}.abc.work"
    (work / "inside").mkdir(parents=True)
    remove_stale_partials(out)
    assert mine.exists() and other.exists() and not gone.exists() and not work.exists()


# --- a full disk ---------------------------------------------------------------------------------

@contextmanager
def mounted(mount_args: list[str], path: Path, what: str):
    """`mount MOUNT_ARGS PATH` for the block, or the test skipped where mounting is not allowed."""
    result = subprocess.run(["mount", *mount_args, str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot {what} here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextmanager
def small_disk(path: Path, size: str):
    path.mkdir()
    with mounted(["-t", "tmpfs", "-o", f"size={size}", "tmpfs"], path, "mount a tmpfs"):
        yield path


def test_a_full_disk_is_one_clear_error(tiny, tmp_path):
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "tiny.llamazip"
        assert llamazip("build", "-m", tiny, "-o", out, "--no-deps").returncode == 0
        before = sha256(out)
        # Leave less room than a second copy needs: the build must fail while writing.
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - out.stat().st_size // 2))
        line = one_error_line(llamazip("build", "-m", tiny, "-o", out, "--no-deps"))
        assert "No space left on device" in line and "full" in line and str(out) in line
        assert sha256(out) == before
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "tiny.llamazip"]


# --- the unpacked runtime in the cache ------------------------------------------------------------

def _prepare(bundle: Path, cache: Path) -> str:
    os.environ["LLAMAZIP_CACHE"] = str(cache)
    try:
        return bootstrap.prepare(str(bundle))
    finally:
        del os.environ["LLAMAZIP_CACHE"]


def _tree(cache: Path) -> Path:
    trees = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(trees) == 1, trees
    return trees[0]


@pytest.mark.parametrize("damage", ["delete a file", "truncate a .py", "half extracted", "garbled mark",
                                    "empty mark"])
def test_a_damaged_cache_is_unpacked_again(tiny_bundle, tmp_path, damage):
    cache = tmp_path / "cache"
    lib = Path(_prepare(tiny_bundle, cache))
    tree = _tree(cache)
    engine = lib / "llamazip" / "runtime" / "engine.py"
    whole = engine.read_bytes()
    if damage == "delete a file":
        engine.unlink()
    elif damage == "truncate a .py":
        engine.write_bytes(whole[: len(whole) // 2])
    elif damage == "half extracted":
        (tree / bootstrap.COMPLETE_MARK).unlink()
        shutil.rmtree(lib / "llamazip" / "runtime")
    elif damage == "garbled mark":
        (tree / bootstrap.COMPLETE_MARK).write_bytes(os.urandom(300))
    else:
        (tree / bootstrap.COMPLETE_MARK).write_text("")
    assert not bootstrap.tree_intact(str(tree))
    assert _prepare(tiny_bundle, cache) == str(lib)
    assert engine.read_bytes() == whole and bootstrap.tree_intact(str(tree))
    assert [p.name for p in cache.iterdir()] == [tree.name], "partial or broken trees were left"


def test_an_intact_cache_is_used_as_it_is(tiny_bundle, tmp_path):
    cache = tmp_path / "cache"
    lib = Path(_prepare(tiny_bundle, cache))
    marker = lib / "added-later"  # numba's cache files appear in the tree after unpacking
    marker.write_text("x")
    assert _prepare(tiny_bundle, cache) == str(lib) and marker.exists()


@contextmanager
def read_only(path: Path):
    """A read-only mount of `path` over itself (root ignores file permissions)."""
    with mounted(["--bind", "-o", "ro", str(path)], path, "bind-mount read-only"):
        yield path


def test_a_read_only_cache(tiny_bundle, tmp_path, capfd):
    cache = tmp_path / "cache"
    lib = _prepare(tiny_bundle, cache)
    capfd.readouterr()
    with read_only(cache):
        assert _prepare(tiny_bundle, cache) == lib  # intact: used, nothing written
        assert capfd.readouterr().err == ""
    (Path(lib) / "llamazip" / "main.py").unlink()
    with read_only(cache):
        # Damaged and cannot be repaired: a temporary tree instead, with one warning.
        elsewhere = _prepare(tiny_bundle, cache)
        assert elsewhere != lib and Path(elsewhere, "llamazip", "main.py").exists()
        err = capfd.readouterr().err
        assert err.count("warning:") == 1 and str(cache) in err


def test_racing_first_runs_repair_one_tree(tiny_bundle, tmp_path):
    """Four first runs at once, on a fresh cache and then on a damaged one, all succeed."""
    cache = tmp_path / "cache"
    env = dict(os.environ, LLAMAZIP_CACHE=str(cache))
    script = (f"import sys; sys.path.insert(0, {str(BOOTSTRAP.parent)!r}); import bootstrap; "
              f"print(bootstrap.prepare({str(tiny_bundle)!r}))")
    for round_ in range(2):
        runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outputs = [r.communicate(timeout=300) for r in runs]
        assert all(r.returncode == 0 for r in runs), outputs
        assert len({out for out, _ in outputs}) == 1 and not any(err for _, err in outputs), outputs
        tree = _tree(cache)
        assert bootstrap.tree_intact(str(tree)) and [p.name for p in cache.iterdir()] == [tree.name]
        (Path(outputs[0][0].strip()) / "llamazip" / "main.py").unlink()  # the second round repairs it


def test_a_killed_first_run_leaves_a_partial_tree_that_is_removed_later(tiny_bundle, tmp_path):
    cache = tmp_path / "cache"
    key = bootstrap.tree_key(zipfile.ZipFile(tiny_bundle).read("MANIFEST.json"))
    stale = cache / f".{key}-killed"
    fresh = cache / f".{key}-running"
    for partial in (stale, fresh):
        (partial / "lib").mkdir(parents=True)
    old = time.time() - bootstrap.STALE_PARTIAL_SECONDS - 60
    os.utime(stale, (old, old))
    _prepare(tiny_bundle, cache)
    assert not stale.exists() and fresh.exists()


def test_a_damaged_bundle_at_start_is_one_error_line(tiny_bundle, tmp_path):
    damaged = tmp_path / "damaged.llamazip"
    data = bytearray(tiny_bundle.read_bytes())
    code = next(m for m in read_members(str(tiny_bundle)) if m.name == "lib/llamazip/main.py")
    data[code.data_offset + 10] ^= 0xFF  # a CRC mismatch while unpacking
    damaged.write_bytes(bytes(data))
    damaged.chmod(0o755)
    env = dict(os.environ, LLAMAZIP_CACHE=str(tmp_path / "cache"), LLAMAZIP_PYTHON=sys.executable)
    result = subprocess.run([str(damaged), "-p", "hi", "-n", "1"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert "damaged" in one_error_line(result)


# --- altered weights ---------------------------------------------------------------------------

def test_verify_flag_checks_the_weights_before_loading(tiny_bundle, tiny, tmp_path):
    ok = llamazip("run", "-m", tiny_bundle, "--verify", "-p", "hi", "-n", 2, "--temp", 0)
    assert ok.returncode == 0, ok.stderr
    altered = tmp_path / "altered.llamazip"
    shutil.copy(tiny_bundle, altered)
    weights = next(m for m in read_members(str(altered)) if m.name.endswith(".gguf"))
    with open(altered, "r+b") as f:
        f.seek(weights.data_offset + weights.size - 5)  # inside the last tensor's data
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x55]))
    line = one_error_line(llamazip("run", "-m", altered, "--verify", "-p", "hi", "-n", 2))
    assert "sha256" in line and weights.name in line
    assert llamazip("run", "-m", altered, "-p", "hi", "-n", 2, "--temp", 0).returncode == 0  # unchecked, it loads
    assert "not a bundle" in one_error_line(llamazip("run", "-m", tiny, "--verify", "-p", "hi", "-n", 1))
    # Through the launcher, as a user passes it.
    env = dict(os.environ, LLAMAZIP_CACHE=str(tmp_path / "cache"), LLAMAZIP_PYTHON=sys.executable)
    result = subprocess.run([str(altered), "--verify", "-p", "hi", "-n", "1"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert "sha256" in one_error_line(result)

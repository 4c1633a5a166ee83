"""One bundle for many Pythons and platforms: what it carries, how it starts, what it answers.

The SmolLM2 tests build the default bundle (every CPython the pinned
dependencies have wheels for, on this platform) and run it as a user would; the
tiny-model tests build narrowed bundles to check the build options and errors.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import pytest

from llamazip.builder.wheels import CANDIDATE_PYTHONS, PLATFORMS, host_platform
from llamazip.runtime import tokenizer_cache
from llamazip.templates import bootstrap
from test_bundle import build, llamazip
from tiny_models import TinyLlama

PROMPT = "Paris is the capital of"
THIS_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def one_error_line(result) -> str:
    """The one `error:` line a failure ends with (a build logs its progress before it)."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """An interpreter with none of the runtime's packages."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python3"


def user_env(home: Path, python: Path) -> dict:
    """A user with an empty home: no llamazip cache, no numba cache, nothing in the environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LLAMAZIP_CACHE", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR")}
    return dict(env, HOME=str(home), LLAMAZIP_PYTHON=str(python))


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    return TinyLlama(weight_type=gguf.GGMLQuantizationType.Q8_0).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


# --- a real model: the first run answers like every later one ----------------------------------

@pytest.mark.model
def test_first_run_answers_like_later_runs_and_like_run(smollm2_path, tmp_path, bare_python):
    bundle = build(smollm2_path, tmp_path / "smollm2.llamazip")
    args = ["-p", PROMPT, "-n", 12, "--temp", 0]
    # `llamazip run`'s answer from numba's cache (its own cache: this test's reference does not
    # depend on what ran before).
    numba_cache = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    llamazip("run", "-m", smollm2_path, *args, env=numba_cache)
    expected = llamazip("run", "-m", smollm2_path, *args, env=numba_cache)
    assert expected.returncode == 0 and "United States" in expected.stdout, expected.stderr

    env = user_env(tmp_path / "home", bare_python)
    answers = []
    for command in ([str(bundle)], [str(bundle)], [str(bare_python), str(bundle)]):  # empty cache, then warm
        result = subprocess.run(command + list(map(str, args)), capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        answers.append(result.stdout)
    assert answers == [expected.stdout] * 3
    trees = [p for p in (tmp_path / "home" / ".cache" / "llamazip").iterdir() if p.name != tokenizer_cache.FOLDER]
    assert len(trees) == 1 and any(p.name.startswith("kernels-") for p in trees[0].iterdir())


@pytest.mark.model
def test_default_bundle_covers_every_python_with_wheels_once(smollm2_path, tmp_path):
    bundle = build(smollm2_path, tmp_path / "smollm2.llamazip")
    manifest = json.loads(zipfile.ZipFile(bundle).read("MANIFEST.json"))
    covered = manifest["covers"][host_platform()]
    assert {"3.10", "3.11", "3.12", "3.13"} <= covered.keys() <= set(CANDIDATE_PYTHONS)
    assert covered[THIS_PYTHON] == {k: v for k, v in manifest["dependencies"].items()}  # the pins, exactly
    with zipfile.ZipFile(bundle) as zf:
        index = json.loads(zf.read("wheels/index.json"))
        pack_size = zf.getinfo("wheels/files.pack").file_size
    llvmlite = [files for name, files in index["wheels"].items() if name.startswith("llvmlite-")]
    assert len(llvmlite) == len(covered)
    # llvmlite's library (loaded through ctypes) is the same bytes for every Python: stored once.
    libraries = {sha for files in llvmlite for path, sha in files if path.endswith(("libllvmlite.so", ".dylib", ".dll"))}
    assert len(libraries) == 1
    files = sum(len(f) for f in index["wheels"].values())
    assert len(index["blobs"]) < files / 2
    # 3.10-3.14 in 88 MB (the weights are 98 MB): the libraries in zstd, stripped of their symbol tables.
    library = index["blobs"][libraries.pop()]
    assert library[3] == "zstd" and library[2] < 170e6  # 179 MB with its .symtab
    assert pack_size < 90e6, pack_size
    info = llamazip("info", bundle)
    assert info.returncode == 0 and f"runs on: {host_platform()} (Python 3.10" in info.stdout, info.stdout


# --- build options: --python, --platform, and their errors -------------------------------------------

def test_python_narrows_the_wheels_and_another_python_is_told_what_the_bundle_covers(tiny_q8, tmp_path, bare_python):
    other = "3.12" if THIS_PYTHON != "3.12" else "3.13"
    narrowed = build(tiny_q8, tmp_path / "narrow.llamazip", "--python", other)
    manifest = json.loads(zipfile.ZipFile(narrowed).read("MANIFEST.json"))
    assert manifest["covers"] == {host_platform(): {other: manifest["covers"][host_platform()][other]}}
    result = subprocess.run([str(narrowed), "-p", "hi", "-n", "2"], capture_output=True, text=True,
                            env=user_env(tmp_path / "home", bare_python))
    line = one_error_line(result)
    assert "carries no numpy" in line and f"Python {THIS_PYTHON}" in line
    assert f"it covers {host_platform()} (Python {other})" in line


def test_python_with_another_platform_by_its_plain_name(tiny_q8, tmp_path, bare_python):
    both = build(tiny_q8, tmp_path / "both.llamazip", "--platform", "linux-aarch64", "--python", THIS_PYTHON)
    manifest = json.loads(zipfile.ZipFile(both).read("MANIFEST.json"))
    assert set(manifest["covers"]) == {host_platform(), "linux-aarch64"}
    assert all(list(pythons) == [THIS_PYTHON] for pythons in manifest["covers"].values())
    index = json.loads(zipfile.ZipFile(both).read("wheels/index.json"))
    for project in ("numpy", "numba", "llvmlite", "tiktoken", "regex"):
        tagged = [w for w in index["wheels"] if w.startswith(f"{project}-")]
        assert any("aarch64" in w for w in tagged) and any("x86_64" in w for w in tagged), tagged
    info = llamazip("info", both)
    assert f"linux-aarch64 (Python {THIS_PYTHON})" in info.stdout, info.stdout
    # Run here, it picks this machine's wheels.
    result = subprocess.run([str(both), "-p", "hi", "-n", "2", "--temp", "0"], capture_output=True, text=True,
                            env=user_env(tmp_path / "home", bare_python))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flags, says", [
    (["--platform", "linux-sparc"], "unknown platform 'linux-sparc': use one of linux-x86_64"),
    (["--python", "2.7"], "--python 2.7: give a CPython version as X.Y, 3.10 or newer"),
    (["--python", "three"], "--python three: give a CPython version"),
    (["--python", "3.99"], "no wheel of numpy"),
    (["--no-deps", "--python", "3.12"], "--no-deps carries no wheels"),
])
def test_bad_platforms_and_pythons_are_one_line(tiny_q8, tmp_path, flags, says):
    line = one_error_line(llamazip("build", "-m", tiny_q8, "-o", tmp_path / "x.llamazip", *flags))
    assert says in line
    assert not (tmp_path / "x.llamazip").exists()


def test_plain_platform_names_cover_the_five():
    assert set(PLATFORMS) == {"linux-x86_64", "linux-aarch64", "macos-arm64", "macos-x86_64", "windows-x86_64"}
    assert all(tags for tags in PLATFORMS.values())


# --- which wheels an interpreter picks, on platforms this machine is not -----------------------------

WHEELS = [
    "numpy-2.4.6-cp313-cp313-win_amd64.whl",
    "numpy-2.4.6-cp313-cp313-macosx_14_0_arm64.whl",
    "numpy-2.4.6-cp313-cp313-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "numpy-2.4.6-cp312-cp312-win_amd64.whl",
    "llguidance-1.9.1-cp39-abi3-win_amd64.whl",
    "llguidance-1.9.1-cp39-abi3-macosx_11_0_arm64.whl",
    "jinja2-3.1.6-py3-none-any.whl",
]


@pytest.mark.parametrize("system, machine, mac, chosen", [
    ("win32", "AMD64", "", {"numpy": WHEELS[0], "llguidance": WHEELS[4], "jinja2": WHEELS[6]}),
    ("darwin", "arm64", "14.2", {"numpy": WHEELS[1], "llguidance": WHEELS[5], "jinja2": WHEELS[6]}),
    ("darwin", "arm64", "13.6", {"llguidance": WHEELS[5], "jinja2": WHEELS[6]}),  # numpy wants macOS 14
])
def test_wheels_chosen_for_other_systems(monkeypatch, system, machine, mac, chosen):
    """`python model.llamazip` on Windows or macOS: the bootstrap's choice, with the platform faked."""
    monkeypatch.setattr(bootstrap.sys, "platform", system)
    monkeypatch.setattr(bootstrap.sys, "version_info", (3, 13, 1, "final", 0))
    monkeypatch.setattr(bootstrap.platform, "machine", lambda: machine)
    monkeypatch.setattr(bootstrap.platform, "mac_ver", lambda: (mac, ("", "", ""), ""))
    assert bootstrap.chosen_wheels(WHEELS) == chosen


def test_index_paths_cannot_leave_the_tree(tmp_path):
    for bad in ("../evil.py", "/etc/passwd", "a/../../b", "c:\\x"):
        with pytest.raises(zipfile.BadZipFile):
            bootstrap._safe_path(str(tmp_path), bad)
    assert bootstrap._safe_path(str(tmp_path), "numpy/__init__.py") == str(tmp_path / "numpy" / "__init__.py")


def test_python3_bundle_on_an_old_python_is_one_line(tiny_q8, tmp_path):
    """__main__.py is plain Python 3: an interpreter older than 3.10 gets the reason."""
    bundle = build(tiny_q8, tmp_path / "t.llamazip", "--no-deps")
    main_py = zipfile.ZipFile(bundle).read("__main__.py").decode()
    code = compile(main_py, "__main__.py", "exec")
    namespace = {"__name__": "__main__"}
    real = sys.version_info
    try:
        sys.version_info = (3, 9, 18, "final", 0)
        with pytest.raises(SystemExit) as exit_:
            exec(code, namespace)
    finally:
        sys.version_info = real
    assert "needs Python 3.10 or newer; this is Python 3.9" in str(exit_.value)


# --- another Python: Debian trixie's 3.13, in a root made by `make setup-test` ------------------

TEST_ROOTS = Path(os.environ.get("LLAMAZIP_TEST_ROOTS", "/var/cache/llamazip-test-roots"))


def debian_root(name: str) -> Path:
    """A Debian root `make setup-test` made with debootstrap; the test fails, with the reason, without it."""
    root = TEST_ROOTS / name
    if not (root / ".complete").is_file():
        pytest.fail(f"{root} is missing: `make setup-test` makes it (as root, with debootstrap from Debian's "
                    f"packages; LLAMAZIP_TEST_ROOTS moves it)")
    if os.geteuid() != 0:
        pytest.fail(f"running a bundle in {root} takes chroot, which needs root")
    return root


@pytest.mark.model
def test_bundle_runs_on_python_3_13_in_debian_trixie(smollm2_path, tmp_path):
    root = debian_root("trixie-amd64")
    bundle = build(smollm2_path, tmp_path / "smollm2.llamazip")
    args = ["-p", PROMPT, "-n", "12", "--temp", "0"]
    numba_cache = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    llamazip("run", "-m", smollm2_path, *args, env=numba_cache)
    expected = llamazip("run", "-m", smollm2_path, *args, env=numba_cache)
    assert expected.returncode == 0, expected.stderr

    inside = Path("/tmp") / f"llamazip-test-{os.getpid()}"  # as the root sees it
    (root / inside.relative_to("/")).mkdir()
    try:
        try:
            os.link(bundle, root / inside.relative_to("/") / bundle.name)
        except OSError:  # another file system
            shutil.copy(bundle, root / inside.relative_to("/") / bundle.name)
        clean = ["env", "-i", f"HOME={inside}/home", "PATH=/usr/bin:/bin"]
        version = subprocess.run(["chroot", str(root), *clean, "python3", "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True)
        assert version.stdout.strip() == "(3, 13)", version
        for command in ([f"{inside}/{bundle.name}"], ["python3", f"{inside}/{bundle.name}"]):
            result = subprocess.run(["chroot", str(root), *clean, *command, *args], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            assert result.stdout == expected.stdout
    finally:
        shutil.rmtree(root / inside.relative_to("/"), ignore_errors=True)


# --- another architecture: aarch64 Python in a Debian arm64 root, under qemu-user ----------------

def test_aarch64_bundle_runs_under_qemu_and_answers_as_the_float_path_here(tiny_q8, tmp_path):
    """Built here for linux-aarch64, run by Debian arm64's Python 3.13 under qemu-user-static
    (started inside the chroot: no binfmt_misc needed). The kernels there have no integer
    dot-product flavour, so it decodes as the float path does here: the same greedy text.
    Emulated, the run compiles every kernel (minutes): the model is the tiny one."""
    root = debian_root("trixie-arm64")
    bundle = build(tiny_q8, tmp_path / "tiny.llamazip", "--platform", "linux-aarch64", "--python", "3.13")
    args = ["-p", "Hello", "-n", "12", "--temp", "0"]
    expected = llamazip("run", "-m", tiny_q8, *args, env=dict(os.environ, LLAMAZIP_FLOAT_MATVEC="1"))
    assert expected.returncode == 0 and expected.stdout, expected.stderr

    inside = Path("/tmp") / f"llamazip-test-{os.getpid()}"  # as the root sees it
    (root / inside.relative_to("/")).mkdir()
    try:
        shutil.copy(bundle, root / inside.relative_to("/") / bundle.name)
        # The environment is cleaned outside: inside, nothing arm64 can start another program.
        emulated = ["env", "-i", f"HOME={inside}/home", "PATH=/usr/bin:/bin",
                    shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/usr/bin/qemu-aarch64-static",
                    "/usr/bin/python3"]
        result = subprocess.run([*emulated, f"{inside}/{bundle.name}", *args], capture_output=True, text=True,
                                timeout=1800)
        assert result.returncode == 0, result.stderr
        assert "numpy kernels" not in result.stderr  # numba's kernels ran, not the numpy fallback
        assert result.stdout == expected.stdout
    finally:
        shutil.rmtree(root / inside.relative_to("/"), ignore_errors=True)

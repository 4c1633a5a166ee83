"""A bundle ships its model's kernels compiled per CPU family: a first run loads them, compiles
nothing, and answers as every later run and `llamazip run` do; a CPU no family fits compiles once."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import pytest

from llamazip.builder import compiled_code
from llamazip.runtime import cpu_family, tokenizer_cache
from llamazip.templates import bootstrap
from llamazip.templates.bootstrap import COMPILED, interpreter_tag
from test_bundle import build, llamazip
from test_bundle_portability import bare_python, one_error_line, user_env  # noqa: F401 (a fixture)
from tiny_models import TinyLlama

PROMPT = "Paris is the capital of"
HOST_FAMILIES = cpu_family.fitting(cpu_family.host_features())


def numba_cache_files(home: Path) -> dict[str, bytes]:
    """numba's cache files in the user's one unpacked tree, by path under it."""
    (tree,) = [p for p in (home / ".cache" / "llamazip").iterdir() if p.name != tokenizer_cache.FOLDER]
    return {str(p.relative_to(tree)): p.read_bytes() for p in tree.rglob("*") if p.suffix in (".nbi", ".nbc")}


def test_builder_and_bootstrap_name_compiled_code_alike():
    assert (compiled_code.COMPILED, compiled_code.interpreter_tag()) == (bootstrap.COMPILED, interpreter_tag())


def test_families_by_cpu_features():
    zen3 = set(cpu_family.X86_64_V3) | {"sse", "sse2", "aes", "sha"}
    sapphire_rapids = zen3 | set(cpu_family.X86_64_V4) | {"avx512vnni", "avx512vbmi", "amx-tile"}
    assert [f.name for f in cpu_family.fitting(zen3, "x86_64")] == ["x86-64-avx2-fma"]
    assert [f.name for f in cpu_family.fitting(sapphire_rapids, "x86_64")] == ["x86-64-avx512-vnni-vbmi",
                                                                                "x86-64-avx2-fma"]
    assert cpu_family.fitting({"sse4.2", "popcnt"}, "x86_64") == []  # older than Haswell: compiled on the host
    assert cpu_family.fitting(sapphire_rapids - {"avx512vbmi"}, "x86_64")[0].name == "x86-64-avx2-fma"
    for family in cpu_family.FAMILIES["x86_64"]:
        assert not {"amx-tile", "amx-int8"} & set(family.features)  # faults in some VMs: never targeted


@pytest.mark.parametrize("family", [f.name for f in HOST_FAMILIES])
def test_kernels_choose_their_instructions_from_the_family_not_the_host(family):
    code = "from llamazip.runtime import simd; print(simd.DOT_FLAVOUR, simd.VNNI_512, simd.HAS_VBMI)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(env, LLAMAZIP_CPU_FAMILY=family))
    assert result.returncode == 0, result.stderr
    expected = {"x86-64-avx512-vnni-vbmi": "vnni True True", "x86-64-avx2-fma": "avx2 False False"}[family]
    assert result.stdout.strip() == expected


def test_an_unknown_family_name_is_said_and_ignored(monkeypatch, capsys):
    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    monkeypatch.setenv("LLAMAZIP_CPU_FAMILY", "x86-64-avx9")
    assert cpu_family.chosen() == (HOST_FAMILIES[0] if HOST_FAMILIES else None)  # as if unset
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "LLAMAZIP_CPU_FAMILY=x86-64-avx9 names no CPU family" in message[0]
    assert "x86-64-avx2-fma" in message[0] and "ignored" in message[0]


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    return TinyLlama(weight_type=gguf.GGMLQuantizationType.Q4_1).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.mark.skipif(not HOST_FAMILIES, reason="this CPU is none of the families")
def test_a_family_target_inherited_from_a_parent_is_that_family(monkeypatch):
    """apply() exports the family's numba target: a child process (a bundle run from a
    test run, say) inherits it, and must see the family, not a target of the user's."""
    monkeypatch.delenv("LLAMAZIP_CPU_FAMILY", raising=False)
    for key, value in HOST_FAMILIES[0].environment().items():
        monkeypatch.setenv(key, value)
    assert cpu_family.chosen() == HOST_FAMILIES[0]
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")  # the user's own target wins
    assert cpu_family.chosen() is None


@pytest.mark.skipif(not HOST_FAMILIES, reason="this CPU is none of the families: nothing to ship")
def test_build_ships_kernels_and_bytecode_for_the_builders_python(tiny_q4, tmp_path):
    bundle = build(tiny_q4, tmp_path / "tiny.llamazip")
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("MANIFEST.json"))
        names = zf.namelist()
    assert manifest["kernels"] == {interpreter_tag(): [f.name for f in HOST_FAMILIES]}
    prefix = f"{COMPILED}/{interpreter_tag()}/"
    assert any(n.startswith(prefix + "llamazip/runtime/__pycache__/") and n.endswith(".nbc") for n in names)
    assert any(n.startswith(prefix + "numba/") and n.endswith(".pyc") for n in names)
    bare = build(tiny_q4, tmp_path / "bare.llamazip", "--no-kernels")
    assert not any(n.startswith(COMPILED) for n in zipfile.ZipFile(bare).namelist())


@pytest.mark.skipif(not HOST_FAMILIES, reason="this CPU is none of the families: nothing to ship")
def test_a_cpu_no_shipped_family_fits_compiles_once_and_says_so(tiny_q4, tmp_path, bare_python):
    bundle = build(tiny_q4, tmp_path / "tiny.llamazip")
    args = [str(bundle), "-p", "hello", "-n", "4", "--temp", "0"]
    shipped = subprocess.run(args, capture_output=True, text=True, env=user_env(tmp_path / "a", bare_python))
    assert shipped.returncode == 0 and "note:" not in shipped.stderr, shipped.stderr

    # A family this CPU cannot run (another architecture's) stands for a CPU none fits.
    env = dict(user_env(tmp_path / "b", bare_python), LLAMAZIP_CPU_FAMILY="aarch64-neon")
    only_shipped = subprocess.run(args, capture_output=True, text=True, env=dict(env, LLAMAZIP_KERNELS="shipped"))
    assert "none of the families this bundle's kernels were compiled for" in one_error_line(only_shipped)
    runs = [subprocess.run(args, capture_output=True, text=True, env=env) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    notes = [[line for line in r.stderr.splitlines() if line.startswith("note:")] for r in runs]
    assert len(notes[0]) == 1 and "compiling them for this CPU, once" in notes[0][0] and notes[1] == []
    assert runs[0].stdout == runs[1].stdout == shipped.stdout

    unshipped = build(tiny_q4, tmp_path / "bare.llamazip", "--no-kernels")
    result = subprocess.run([str(unshipped)] + args[1:], capture_output=True, text=True,
                            env=user_env(tmp_path / "c", bare_python))
    assert result.returncode == 0 and "carries no compiled kernels for Python" in result.stderr


@pytest.mark.model
@pytest.mark.skipif(not HOST_FAMILIES, reason="this CPU is none of the families: nothing to ship")
def test_first_run_loads_the_shipped_kernels_and_answers_like_later_runs_and_run(smollm2_path, tmp_path,
                                                                                bare_python):
    bundle = build(smollm2_path, tmp_path / "smollm2.llamazip")
    args = ["-p", PROMPT, "-n", "12", "--temp", "0"]
    numba_cache = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    llamazip("run", "-m", smollm2_path, *args, env=numba_cache)  # compiles
    expected = llamazip("run", "-m", smollm2_path, *args, env=numba_cache)  # from numba's cache
    assert expected.returncode == 0 and "United States" in expected.stdout, expected.stderr

    home = tmp_path / "home"
    env = user_env(home, bare_python)
    runs = []
    for _ in range(2):  # an empty cache, then warm
        runs.append(subprocess.run([str(bundle), *args], capture_output=True, text=True, env=env))
        assert runs[-1].returncode == 0, runs[-1].stderr
        if len(runs) == 1:
            after_first = numba_cache_files(home)
    assert [r.stdout for r in runs] == [expected.stdout] * 2
    assert "note:" not in runs[0].stderr
    # The first run compiled nothing: the kernel files are the bundle's, unchanged.
    prefix = f"{COMPILED}/{interpreter_tag()}/"
    with zipfile.ZipFile(bundle) as zf:
        shipped = {"lib/" + n[len(prefix):]: zf.read(n) for n in zf.namelist()
                   if n.startswith(prefix) and n.endswith((".nbi", ".nbc"))}
    assert shipped and after_first == shipped
    # A one-token prompt takes other kernels than decoding where the weights are repacked
    # (runtime/interleaved.py): shipped too.
    one_token = subprocess.run([str(bundle), "-p", "Hello", "-n", "2", "--temp", "0"], capture_output=True,
                               text=True, env=env)
    assert one_token.returncode == 0, one_token.stderr
    assert numba_cache_files(home) == shipped
    # Which layout decoding reads depends on the host's cache and memory: both are shipped.
    for layout in ("0", "1"):
        forced = subprocess.run([str(bundle), *args], capture_output=True, text=True,
                                env=dict(env, LLAMAZIP_INTERLEAVE=layout))
        assert forced.returncode == 0, forced.stderr
        assert numba_cache_files(home) == shipped, layout

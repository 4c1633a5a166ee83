"""What a first run would compile, compiled at build time: the model's kernels and the runtime's bytecode.

A child process of the builder's own Python runs the model for a few tokens
once per CPU family this machine can run (runtime/cpu_family.py), with numba's
cache pointed at a folder of its own. Every kernel the run compiles lands
there. The bundle carries those files where numba looks for them in the
unpacked tree (`__pycache__` beside each module), and the bytecode of every
module the run imported (hash-checked .pyc files: valid whatever the files'
times), under `compiled/<interpreter>/`; the bootstrap writes the ones for its
interpreter into the tree. numba keeps one index per function holding every
(signature, target) entry, so the families share files: one set per Python.

Only the builder's Python is compiled for (its numba is the bundle's: the pins
are the builder's), and only the families this CPU can run, since compiling
means running the model. Other Pythons and CPUs compile on the host at their
first run, as before. What a build compiled is kept in the user cache, keyed by
the code, the interpreter, the families and the model's structure (its GGUF
header), so rebuilding a bundle of the same model compiles nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import py_compile
import shutil
import subprocess
import sys
import tempfile
from importlib.util import cache_from_source
from pathlib import Path

from ..runtime import cpu_family
from ..runtime.gguf import GGUFFile
from .wheels import pinned_versions

# As the bootstrap names them (it imports nothing of ours: tests check the two agree).
COMPILED = "compiled"


def interpreter_tag() -> str:
    """'cp311-linux-x86_64': the interpreter this builder's compiled code is for."""
    return f"cp{sys.version_info[0]}{sys.version_info[1]}-{sys.platform}-{platform.machine()}".lower()


KEPT = 16  # builds' compiled code kept in the user cache (the most recent)

# A prompt of a few tokens and two decoded ones go through every kernel a run uses
# (prompt matmuls, decode matvecs, the token steps), as the bootstrap's own compiling
# run does; then, once decoding from repacked copies and once from the mapped
# weights (which one a host takes depends on its cache and memory:
# runtime/interleaved.py), a one-token prompt (its products read the GGML bytes
# either way), a decoded token, and batched passes of
# two rows (the kernels of drafted tokens, which
# `-p` and the chat guess from the first tokens on, and of the server's slots), one
# with its attention on one thread, one split between the threads (as longer
# contexts take it). Then the modules it imported, as (file, path relative to its
# sys.path entry).
_COMPILE_RUN = """import json, os, sys
from llamazip.main import main
code = main(["run", "-m", sys.argv[1], "-p", "Hello, world", "-n", "2", "--temp", "0", "-t", "1"])
if code == 0:
    import numpy
    from llamazip.runtime import token_ops
    from llamazip.runtime.model import Model
    from llamazip.runtime.model_file import open_model
    serial_rows_pairs = token_ops.SERIAL_ROWS_PAIRS
    for layout in ("1", "0"):  # repacked copies and mapped weights: a host's cache and memory choose
        os.environ["LLAMAZIP_INTERLEAVE"] = layout
        model = Model(open_model(sys.argv[1]), n_ctx=8)
        model.forward(numpy.array([1]), 0, prompt=True)
        model.forward(numpy.array([2]), 1)
        token_ops.SERIAL_ROWS_PAIRS = serial_rows_pairs
        model.forward_batch([1, 2], [0, 1], [0, 0])
        token_ops.SERIAL_ROWS_PAIRS = 0
        model.forward_batch([1, 2], [0, 1], [0, 0])
roots = sorted((os.path.join(p, "") for p in sys.path if p.endswith(("site-packages", "dist-packages"))), key=len)
files = {}
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    for root in roots[::-1]:
        if path.endswith(".py") and path.startswith(root):
            files[path] = path[len(root):].replace(os.sep, "/")
            break
with open(sys.argv[2], "w") as f:
    json.dump(files, f)
sys.exit(code)
"""


def families_here() -> list[cpu_family.Family]:
    try:
        return cpu_family.fitting(cpu_family.host_features())
    except Exception:  # no llvmlite in the builder's Python
        return []


def _model_structure(model: Path) -> bytes:
    """The GGUF's header (metadata and tensor types and shapes): what decides which kernels run."""
    header_end = GGUFFile(model).data_offset
    with open(model, "rb") as f:
        return f.read(header_end)


def _key(model: Path, families: list[cpu_family.Family], code: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for part in (interpreter_tag(), sys.version, json.dumps(pinned_versions(), sort_keys=True),
                 json.dumps([f.name for f in families])):
        digest.update(part.encode() + b"\0")
    for name, data in code:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    digest.update(_model_structure(model))
    return digest.hexdigest()[:32]


def _run_model(model: Path, family: cpu_family.Family, cache_dir: Path, imported: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "LLAMAZIP_NO_NUMBA", "NUMBA_DISABLE_JIT")}
    env.update(NUMBA_CACHE_DIR=str(cache_dir), LLAMAZIP_CPU_FAMILY=family.name)
    result = subprocess.run([sys.executable, "-c", _COMPILE_RUN, str(model), str(imported)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"compiling the kernels for {family.name} failed: {last}")


def _kernel_files(cache_dir: Path, packages: dict[str, Path]) -> dict[str, bytes]:
    """numba's cache files under NUMBA_CACHE_DIR (one folder per source folder, named
    '<folder>_<sha1 of its path>') by their paths in the unpacked tree's lib/."""
    folders = {}
    for sub, path in packages.items():
        for spelled in {os.path.abspath(path), str(Path(path).resolve())}:
            folders[f"{os.path.basename(spelled)}_{hashlib.sha1(spelled.encode()).hexdigest()}"] = sub
    files = {}
    for folder in sorted(cache_dir.iterdir()):
        sub = folders.get(folder.name)
        if sub is None:
            continue
        package = "/".join(p for p in ("llamazip", sub) if p)
        for file in sorted(folder.iterdir()):
            if file.suffix in (".nbi", ".nbc"):
                files[f"{package}/__pycache__/{file.name}"] = file.read_bytes()
    return files


def _bytecode_files(imported: dict[str, str], packages: dict[str, Path], scratch: Path) -> dict[str, bytes]:
    """The .pyc of every module the run imported, by its path in the unpacked tree's lib/."""
    where = dict(imported)  # source file -> its path under lib/
    for sub, folder in packages.items():
        for source in folder.glob("*.py"):
            where[str(source)] = "/".join(p for p in ("llamazip", sub, source.name) if p)
    files = {}
    for source, relative in sorted(where.items(), key=lambda item: item[1]):
        compiled = scratch / "pyc" / f"{len(files)}.pyc"
        try:
            py_compile.compile(source, cfile=str(compiled), dfile=relative, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except (py_compile.PyCompileError, OSError):
            continue  # not compilable here: Python compiles it at import, as without this
        folder, name = os.path.split(cache_from_source(relative))
        files[f"{folder.replace(os.sep, '/')}/{name}"] = compiled.read_bytes()
    return files


def _prune(store: Path) -> None:
    """Keep the KEPT most recent builds' compiled code (each a few MB)."""
    try:
        entries = sorted((p for p in store.iterdir() if not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[KEPT:]:
        shutil.rmtree(old, ignore_errors=True)


def compiled_files(model: Path, packages: dict[str, Path], code: list[tuple[str, bytes]],
                   store: Path, log) -> tuple[dict[str, bytes], list[str]]:
    """(bundle members, family names): the model's kernels compiled for every family this
    CPU runs and the imported modules' bytecode, taken from `store` when an earlier build
    compiled the same."""
    families = families_here()
    if not families:
        return {}, []
    names = [f.name for f in families]
    kept = store / _key(model, families, code)
    prefix = f"{COMPILED}/{interpreter_tag()}/"
    if (kept / "members.json").is_file():
        os.utime(kept)  # recently used: kept by _prune
        listing = json.loads((kept / "members.json").read_text())
        return {prefix + name: (kept / "files" / str(i)).read_bytes() for i, name in enumerate(listing)}, names
    log(f"compiling the model's kernels for {', '.join(names)} (Python {sys.version_info[0]}.{sys.version_info[1]})")
    with tempfile.TemporaryDirectory(prefix="llamazip-compile-") as scratch:
        scratch = Path(scratch)
        (scratch / "pyc").mkdir()
        imported: dict[str, str] = {}
        for family in families:
            _run_model(model, family, scratch / "numba", scratch / "imported.json")
            imported.update(json.loads((scratch / "imported.json").read_text()))
        files = _kernel_files(scratch / "numba", packages)
        files.update(_bytecode_files(imported, packages, scratch))
    # Kept for the next build: written to a temporary folder renamed into place.
    store.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{kept.name}-", dir=store))
    try:
        (partial / "files").mkdir()
        for i, data in enumerate(files.values()):
            (partial / "files" / str(i)).write_bytes(data)
        (partial / "members.json").write_text(json.dumps(list(files)))
        os.rename(partial, kept)
    except OSError:
        pass  # another build kept the same first, or the cache is not writable: nothing lost
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _prune(store)
    return {prefix + name: data for name, data in files.items()}, names

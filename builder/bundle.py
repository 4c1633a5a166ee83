"""Assemble a bundle: launcher preamble + zip { __main__.py, bootstrap.py, .args,
lib/llamazip/... (deflated), wheels/index.json + wheels/files.pack (the runtime's wheels
for every platform and CPython it covers, each distinct file once, the large ones in zstd:
wheel_pack.py),
compiled/<interpreter>/... (the model's kernels and the runtime's bytecode compiled for the
builder's Python: compiled_code.py), the model .gguf (stored, aligned), MANIFEST.json }.

MANIFEST.json comes last because it holds the sha256 of every other member,
computed while they are written. The output is written to a temporary file
beside OUT and renamed over it only when complete; the temporary files that
killed builds left (their pid no longer runs) are removed first. A full disk
is one clear error.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llamazip import __version__

from ..bundle_format import ARGS, MANIFEST, MANIFEST_FORMAT, format_args_file
from ..zipalign.writer import MIN_ALIGNMENT, Member, write_zip
from .compiled_code import compiled_files, interpreter_tag
from .wheel_pack import INDEX, PACK, WheelPack
from .wheels import default_cache_dir, host_platform, pinned_versions, resolve_all, zstd_backport_pin

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@dataclass
class BuildOptions:
    model: Path
    output: Path
    args: list[str] = field(default_factory=list)
    name: str = ""
    platforms: list[str] = field(default_factory=list)
    python_versions: list[str] = field(default_factory=list)
    with_deps: bool = True
    kernels: bool = True  # ship the model's kernels (and bytecode) compiled for the builder's Python
    wheel_compression: str = "zstd"  # the wheels' large files: "zstd" (smaller) or "deflate" (as the wheels hold them)
    alignment: int = MIN_ALIGNMENT


_CODE_SUFFIXES = (".py", ".sh", ".html", ".js", ".css")


def _package_dirs() -> dict[str, Path]:
    """Every package under the import name `llamazip`, by dotted name relative to it
    ("" for the root), found by walking: the folders beside the root package (a
    source tree: llamazip/, runtime/, ...) and inside it (an installed wheel) that
    the import system resolves as `llamazip.<folder>`."""
    import llamazip

    root = Path(llamazip.__file__).resolve().parent
    found = {"": root}
    for folder in sorted({*root.iterdir(), *root.parent.iterdir()}):
        if not (folder / "__init__.py").is_file() or folder == root:
            continue
        spec = importlib.util.find_spec(f"llamazip.{folder.name}")
        if spec is not None and spec.origin and Path(spec.origin).resolve().parent == folder.resolve():
            found[folder.name] = folder
    return found


def _code_files(packages: dict[str, Path]) -> list[tuple[str, Path]]:
    """The llamazip package's source files, by their names under lib/llamazip/, in a fixed order."""
    files = []
    for sub, root in sorted(packages.items()):
        for path in sorted(root.iterdir()):
            if path.is_file() and path.suffix in _CODE_SUFFIXES:
                files.append(("/".join(p for p in ("lib/llamazip", sub, path.name) if p), path))
    return files


def _model_member_name(model: Path) -> str:
    return model.name if model.suffix == ".gguf" else model.stem + ".gguf"


def build_bundle(options: BuildOptions, log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Write the bundle to options.output atomically; return its manifest."""
    args_text = format_args_file(options.args)
    model_name = _model_member_name(options.model)
    dependencies: dict[str, str] = {}
    covers: dict[str, dict[str, dict[str, str]]] = {}  # platform -> Python -> the versions it gets
    wheels: list[Path] = []
    if options.with_deps:
        dependencies = pinned_versions()
        if options.wheel_compression == "zstd":  # the decompressor, for Pythons before 3.14
            dependencies |= zstd_backport_pin()
        log("resolving the runtime's wheels")
        for resolved in resolve_all(default_cache_dir(), dependencies, options.platforms,
                                    options.python_versions, log):
            covers.setdefault(resolved.platform, {})[resolved.python] = resolved.versions()
            wheels += resolved.wheels.values()

    # __main__.py makes `python3 BUNDLE` work where the file cannot be executed.
    members = [Member.from_file("__main__.py", TEMPLATES / "zip_main.py"),
               Member.from_file("bootstrap.py", TEMPLATES / "bootstrap.py"),
               Member.from_bytes(ARGS, args_text.encode())]
    packages = _package_dirs()
    code = _code_files(packages)
    members += [Member.from_file(name, path, level=6) for name, path in code]
    kernels: dict[str, list[str]] = {}
    if options.kernels and f"{sys.version_info[0]}.{sys.version_info[1]}" in covers.get(host_platform(), {}):
        compiled, families = compiled_files(options.model, packages, [(n, p.read_bytes()) for n, p in code],
                                            default_cache_dir().parent / "compiled", log)
        if compiled:
            kernels[interpreter_tag()] = families
            members += [Member.from_bytes(name, data, level=6) for name, data in compiled.items()]
            log(f"  compiled code: {len(compiled)} files, {sum(map(len, compiled.values())) / 1e6:.1f} MB")
    if wheels:
        zstd_store = default_cache_dir() / "zstd" if options.wheel_compression == "zstd" else None
        pack = WheelPack(wheels, zstd_store, log)
        log(f"  {len(pack.wheels)} wheels, {pack.total_files} files, stored once each: "
            f"{pack.pack_size / 1e6:.1f} MB (the wheels: {sum(w.stat().st_size for w in pack.wheels) / 1e6:.1f} MB)")
        members += [Member.from_bytes(INDEX, pack.index_bytes(), level=6), Member(PACK, pack.pack_chunks)]
    members.append(Member.from_file(model_name, options.model))

    manifest = {
        "format": MANIFEST_FORMAT,
        "name": options.name or options.model.stem,
        "llamazip": __version__,
        "model": model_name,
        "build": {
            "alignment": options.alignment,
            "args": options.args,
            "platforms": options.platforms,
            "python_versions": options.python_versions,
            "vendored_dependencies": options.with_deps,
            "wheel_compression": options.wheel_compression if wheels else None,
        },
        "dependencies": dependencies,
        "covers": covers,
        "kernels": kernels,  # interpreter -> the CPU families its shipped kernels were compiled for
    }

    output = options.output
    remove_stale_partials(output)
    # The temporary name carries our pid, so a later build can tell a killed build's leftover.
    fd, temp = tempfile.mkstemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".partial",
                                dir=output.parent or ".")
    progress_shown = False
    try:
        with os.fdopen(fd, "wb") as out:
            out.write((TEMPLATES / "launcher.sh").read_bytes())
            model_size = options.model.stat().st_size

            def progress(name: str, done: int) -> None:  # the weights are what takes time
                nonlocal progress_shown
                if name == model_name and model_size:
                    progress_shown = True
                    print(f"\r  adding {name}: {100 * done // model_size}%", end="", file=sys.stderr, flush=True)

            # MANIFEST.json is produced after the other members are written (it
            # holds their hashes), so it is passed as a generator of one chunk.
            def manifest_bytes():
                manifest["members"] = {m.name: {"size": m.size, "sha256": m.sha256} for m in members}
                yield (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()

            log(f"writing {output}")
            write_zip(out, members + [Member(MANIFEST, manifest_bytes)], options.alignment, progress)
            print(file=sys.stderr)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o755)
        os.replace(temp, output)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if progress_shown:
            print(file=sys.stderr)  # end the progress line: the error gets a line of its own
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(e.errno, f"{e.strerror or e}: the disk of {output.parent} is full "
                                   f"(the bundle needs about {_estimate(options, wheels) / 1e6:.0f} MB)") from None
        raise
    return manifest


def _estimate(options: BuildOptions, wheels: list[Path]) -> int:
    """Roughly the bundle's size: the model and wheels, plus the code and zip records."""
    return options.model.stat().st_size + sum(w.stat().st_size for w in wheels) + (1 << 20)


def remove_stale_partials(output: Path) -> None:
    """Remove what killed builds of OUT left beside it: temporary outputs (`.partial`)
    and work folders (`.work`) named `.OUT.PID.*` whose process is gone. A build
    still running keeps its own."""
    prefix = f".{output.name}."
    for path in (output.parent or Path(".")).glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split(".", 1)[0]
        if path.suffix not in (".partial", ".work") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        except OSError:
            pass  # alive, another user's

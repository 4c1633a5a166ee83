"""The bundle's bootstrap: the launcher runs it with `python3 -c` straight from the zip.

Standard library only: nothing else is importable yet. It unpacks the runtime
code (lib/) and the vendored wheels (wheels/) that suit this interpreter into a
per-user cache keyed by the bundle's content (the sha256 of MANIFEST.json, which
holds every member's sha256), once; later runs find them there. The weights stay
in the bundle: the runtime maps them out of it.

Unpacking goes to a temporary directory renamed into place, so two first runs
racing both end up with one complete tree. The tree's last file, written after
everything else, lists every file with its size; each start checks the sizes
(a few thousand stat calls), so a half-deleted or truncated tree is noticed and
unpacked again. An unwritable cache falls back to a temporary directory, with
one warning. A damaged bundle is one `error:` line, not a traceback.
"""

import compileall
import hashlib
import io
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib

COMPLETE_MARK = "complete"  # written last: "size path" of every file in the tree
STALE_PARTIAL_SECONDS = 3600  # a partial tree this old belongs to a first run that was killed
# Without these the runtime cannot start; numba and llvmlite are optional (numpy kernels).
REQUIRED = ("numpy", "tiktoken", "regex", "jinja2", "markupsafe")


def cache_root() -> str:
    if os.environ.get("LLAMAZIP_CACHE"):
        return os.environ["LLAMAZIP_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llamazip")


# --- which wheels suit this interpreter ------------------------------------------

def _glibc() -> tuple:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION").split()[1]
        return tuple(int(p) for p in version.split(".")[:2])
    except (AttributeError, ValueError, IndexError, OSError):
        return ()


def _platform_ok(tag: str) -> bool:
    if tag == "any":
        return True
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) if sys.platform != "darwin" else machine
    if sys.platform.startswith("linux"):
        glibc = _glibc()
        legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
        m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014|manylinux_(\d+)_(\d+))_(\w+)", tag)
        if m and m.group(4) == arch and glibc:
            need = legacy.get(m.group(1)) or (int(m.group(2)), int(m.group(3)))
            return glibc >= need
        return tag == f"linux_{arch}"
    if sys.platform == "darwin":
        m = re.fullmatch(r"macosx_(\d+)_(\d+)_(\w+)", tag)
        if not m:
            return False
        mac = tuple(int(p) for p in (platform.mac_ver()[0] or "0.0").split(".")[:2])
        fits = m.group(3) in (machine, "universal2") or (m.group(3) == "intel" and machine == "x86_64")
        return fits and (int(m.group(1)), int(m.group(2))) <= mac
    if sys.platform == "win32":
        return tag == {"amd64": "win_amd64", "arm64": "win_arm64", "x86": "win32"}.get(machine)
    return False


def wheel_suits(filename: str) -> bool:
    """Does the wheel's python-abi-platform tag fit this interpreter? (PEP 425)"""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        return False
    pythons, abis, platforms = (p.split(".") for p in parts[-3:])
    major, minor = sys.version_info[:2]
    cp = f"cp{major}{minor}"
    exact = any(p in (cp, f"py{major}", f"py{major}{minor}") for p in pythons) and any(a in ("none", cp) for a in abis)
    # abi3: built for the stable ABI of some CPython 3.x no newer than this one.
    stable = "abi3" in abis and any(re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= minor for p in pythons)
    return (exact or stable) and any(_platform_ok(t) for t in platforms)


# --- unpacking ---------------------------------------------------------------------

def unpack(bundle: zipfile.ZipFile, target: str) -> None:
    """Runtime code and the suitable wheels into target/lib, then the completion mark."""
    lib = os.path.join(target, "lib")
    chosen = {}
    code = 0
    for name in bundle.namelist():
        if name.startswith("lib/") and not name.endswith("/"):
            bundle.extract(name, target)
            code += 1
        elif name.startswith("wheels/") and name.endswith(".whl"):
            filename = name[len("wheels/"):]
            project = filename.split("-")[0].lower()
            if project not in chosen and wheel_suits(filename):
                chosen[project] = name
    if not code:
        raise zipfile.BadZipFile("it holds no runtime code (lib/)")
    for name in chosen.values():
        with zipfile.ZipFile(io.BytesIO(_read(bundle, name))) as wheel:
            wheel.extractall(lib)
    # Byte-compile now, as pip does at install: later starts then never parse
    # source, even where PYTHONDONTWRITEBYTECODE is set.
    compileall.compile_dir(lib, quiet=2)
    missing = [p for p in REQUIRED if p not in chosen]
    if missing and any(n.startswith("wheels/") for n in bundle.namelist()):
        raise SystemExit(f"error: this bundle carries no {', '.join(missing)} for Python "
                         f"{sys.version_info[0]}.{sys.version_info[1]} on {sys.platform} {platform.machine()}; "
                         f"rebuild it with `llamazip build --platform ...` for this machine")
    _write_mark(target)


def _read(bundle: zipfile.ZipFile, name: str, limit: int = 1 << 40) -> bytes:
    """A member's bytes, read in chunks: a damaged header claiming a huge size allocates
    nothing up front (zipfile's read() would allocate what the header claims)."""
    chunks, size = [], 0
    with bundle.open(name) as f:
        while chunk := f.read(1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise zipfile.BadZipFile(f"member {name!r} is larger than {limit} bytes")
    return b"".join(chunks)


def _listing(target: str) -> list:
    files = []
    for folder, _, names in os.walk(os.path.join(target, "lib")):
        for name in names:
            path = os.path.join(folder, name)
            files.append((os.path.getsize(path), os.path.relpath(path, target)))
    return sorted(files, key=lambda f: f[1])


def _write_mark(target: str) -> None:
    text = "".join(f"{size} {path}\n" for size, path in _listing(target))
    temp = os.path.join(target, COMPLETE_MARK + ".partial")
    with open(temp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    os.replace(temp, os.path.join(target, COMPLETE_MARK))


def tree_intact(target: str) -> bool:
    """Is every file the mark lists there with its size? (Files added later, such as
    numba's cache, do not matter.)"""
    try:
        with open(os.path.join(target, COMPLETE_MARK), encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
        if not lines:
            return False
        for line in lines:
            size, path = line.split(" ", 1)
            if os.path.getsize(os.path.join(target, path)) != int(size):
                return False
    except (OSError, ValueError):
        return False
    return True


def _remove_stale_partials(root: str, key: str) -> None:
    """Partial trees of first runs that were killed (each may hold hundreds of MB)."""
    try:
        entries = os.listdir(root)
    except OSError:
        return
    for name in entries:
        path = os.path.join(root, name)
        if name.startswith(f".{key}-"):
            try:
                if time.time() - os.stat(path).st_mtime > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def ensure_unpacked(bundle: zipfile.ZipFile, key: str) -> str:
    """The unpacked tree for this bundle, made once per user; returns its lib/ path."""
    root = cache_root()
    target = os.path.join(root, key)
    if tree_intact(target):
        return os.path.join(target, "lib")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        _remove_stale_partials(root, key)
        partial = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
    except OSError as e:
        return _unpack_to_temp(bundle, f"cannot write the cache {root} ({e.strerror or e})")
    try:
        unpack(bundle, partial)
        if os.path.isdir(target) and not tree_intact(target):
            # Incomplete or damaged (a killed first run, a deleted or truncated file): move it
            # aside in one step, so a run racing this one never sees half of it, then remove it.
            broken = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
            try:
                os.rename(target, os.path.join(broken, "tree"))
            except OSError:
                pass  # another run moved it first
            shutil.rmtree(broken, ignore_errors=True)
        try:
            os.rename(partial, target)
        except OSError:
            if not tree_intact(target):
                raise
            # Another first run finished first: use its tree.
    except OSError as e:
        return _unpack_to_temp(bundle, f"cannot write the cache {root} ({e.strerror or e})")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return os.path.join(target, "lib")


def _unpack_to_temp(bundle: zipfile.ZipFile, why: str) -> str:
    print(f"warning: {why}; unpacking to a temporary directory", file=sys.stderr)
    temp = tempfile.mkdtemp(prefix="llamazip-")
    import atexit
    atexit.register(shutil.rmtree, temp, True)
    unpack(bundle, temp)
    return os.path.join(temp, "lib")


# What zipfile raises on a damaged archive or member: bad records, CRC mismatches,
# short or corrupt deflate streams, impossible offsets, unknown methods.
DAMAGED = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, struct.error, EOFError, ValueError,
           OverflowError, NotImplementedError, RuntimeError)


def prepare(path: str) -> str:
    """The unpacked runtime of the bundle at `path`: its lib/ path. Exits with one
    `error:` line on a bundle that cannot be read."""
    try:
        with zipfile.ZipFile(path) as bundle:
            try:
                manifest = _read(bundle, "MANIFEST.json", limit=16 << 20)
            except KeyError:
                raise SystemExit(f"error: {path}: not a llamazip bundle (no MANIFEST.json)") from None
            return ensure_unpacked(bundle, hashlib.sha256(manifest).hexdigest()[:32])
    except DAMAGED as e:
        raise SystemExit(f"error: {path}: the bundle is damaged ({type(e).__name__}: {e}); "
                         f"download or build it again") from None
    except OSError as e:
        raise SystemExit(f"error: {path}: {e.strerror or e}") from None


def main() -> None:
    path = os.path.abspath(sys.argv[1])
    sys.path.insert(0, prepare(path))
    try:
        from llamazip.main import bundle_main
    except ImportError as e:
        raise SystemExit(f"error: {path}: the bundle's runtime code is incomplete ({e}); "
                         f"download or build it again") from None

    sys.exit(bundle_main(path, sys.argv[2:]))


if __name__ == "__main__":  # as the launcher runs it; importing it (tests) runs nothing
    main()

"""The bundle's bootstrap: the launcher runs it with `python3 -c` straight from the zip
(and `python3 BUNDLE` through the zip's __main__.py).

Standard library only: nothing else is importable yet. It unpacks the runtime
code (lib/) and the files of the vendored wheels that suit this interpreter
(wheels/index.json lists each wheel's files; wheels/files.pack holds each
distinct file once, the large ones as zstd frames decompressed on every core,
by Python 3.14's compression.zstd or the backports.zstd wheel the bundle
carries, written first) into a per-user cache keyed by the bundle's content (the
sha256 of MANIFEST.json, which holds every member's sha256), once; later runs
find them there. The weights stay in the bundle: the runtime maps them out of it.
The model's kernels compiled at build time (kernels/<interpreter>/: numba's
cache files) go into the tree too; when none suits this CPU, a child process
compiles them once (compile_kernels_once).

Unpacking goes to a temporary directory renamed into place, so two first runs
racing both end up with one complete tree. The tree's last file, written after
everything else, lists every file with its size; each start checks the sizes
(a few thousand stat calls), so a half-deleted or truncated tree is noticed and
unpacked again. An unwritable cache falls back to a temporary directory, with
one warning. A damaged bundle is one `error:` line, not a traceback.
"""

import hashlib
import json
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

INDEX = "wheels/index.json"
PACK = "wheels/files.pack"
DECOMPRESSOR = "backports_zstd"  # the wheel that decompresses the others before Python 3.14
# compiled/<interpreter_tag()>/<path under lib/>: numba's cache of the model's kernels and the
# imported modules' bytecode, compiled at build time for one interpreter.
COMPILED = "compiled"


def _wheel_preference(filename: str) -> int:
    """Among the suitable wheels of one project: built for this very Python first,
    then the stable ABI, then pure Python."""
    abis = filename[:-len(".whl")].split("-")[-2].split(".")
    return 0 if f"cp{sys.version_info[0]}{sys.version_info[1]}" in abis else 1 if "abi3" in abis else 2


def chosen_wheels(names) -> dict:
    """project -> the wheel file name this interpreter uses, of the names given."""
    chosen = {}
    for filename in sorted(names, key=_wheel_preference):
        project = filename.split("-")[0].lower()
        if project not in chosen and wheel_suits(filename):
            chosen[project] = filename
    return chosen


def _safe_path(lib: str, path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or ".." in parts or ":" in parts[0]:
        raise zipfile.BadZipFile(f"the wheel index names a path outside the tree: {path!r}")
    return os.path.join(lib, *parts)


def _write(path: str, data: bytes, at: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _inflate(data: bytes, method, size: int, crc: int, path: str, sha: str) -> None:
    if method == 8:
        inflater = zlib.decompressobj(-15)
        data = inflater.decompress(data) + inflater.flush()
    if len(data) != size or zlib.crc32(data) != crc:
        raise zipfile.BadZipFile(f"a file of the wheels is damaged (blob {sha[:12]})")
    _write(path, data)


def _unzstd(zstd, frames: list, path, sha: str, base=None) -> bytes:
    """A zstd blob's frames (each carries its own checksum, which zstd checks), written at
    their places in `path` (None: kept in memory only); with `base` (a future of the base
    blob's bytes), decompressed against that as a dictionary. Returns the bytes when whole."""
    dictionary = zstd.ZstdDict(base.result(), is_raw=True) if base else None
    parts = []
    for frame, at, expected in frames:
        try:
            data = zstd.decompress(frame, zstd_dict=dictionary)
        except zstd.ZstdError as e:
            raise zipfile.BadZipFile(f"a file of the wheels is damaged (blob {sha[:12]}: {e})") from None
        if len(data) != expected:
            raise zipfile.BadZipFile(f"a file of the wheels is damaged (blob {sha[:12]})")
        if path:
            _write(path, data, at)
        parts.append(data)
    return b"".join(parts)


def install_wheels(bundle: zipfile.ZipFile, lib: str, required=()) -> dict:
    """Write every file of the wheels that suit this interpreter into lib; returns the
    chosen wheels by project. A project of `required` with no wheel here is one error
    line, before anything is written."""
    try:
        index = json.loads(_read(bundle, INDEX, limit=256 << 20))
        chosen = chosen_wheels(index["wheels"])
        targets = {}  # sha256 -> the paths it is written to
        for filename in chosen.values():
            for path, sha in index["wheels"][filename]:
                targets.setdefault(sha, []).append(_safe_path(lib, path))
        blobs = {sha: list(index["blobs"][sha]) for sha in targets}
        # The bases this Python's deltas were compressed against: read too, kept in memory.
        for blob in list(blobs.values()):
            if len(blob) > 5 and blob[5] not in blobs:
                blobs[blob[5]] = list(index["blobs"][blob[5]])
        frame_size = index.get("zstd_chunk", 0)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise zipfile.BadZipFile(f"{INDEX} is not a wheel index ({type(e).__name__}: {e})") from None
    missing = [p for p in required if p not in chosen]
    if missing:
        covers = _coverage(bundle)
        raise SystemExit(f"error: this bundle carries no {', '.join(missing)} for Python "
                         f"{sys.version_info[0]}.{sys.version_info[1]} on {sys.platform} {platform.machine()}"
                         + (f" (it covers {covers})" if covers else "")
                         + "; rebuild it with `llamazip build --python X.Y --platform NAME` for this machine")
    zstd = None
    if any(blob[3] == "zstd" for blob in blobs.values()):
        zstd = _zstd_module(bundle, lib, index, chosen, targets, blobs)
    _write_blobs(bundle, blobs, targets, zstd, frame_size)
    for paths in targets.values():
        for path in paths[1:]:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copyfile(paths[0], path)
    return chosen


def _zstd_module(bundle: zipfile.ZipFile, lib: str, index: dict, chosen: dict, targets: dict, blobs: dict):
    """What decompresses zstd here: the standard library's (3.14+), else the bundle's
    backports.zstd wheel for this Python, whose (deflated) files are written first and
    taken out of `blobs`."""
    try:
        from compression import zstd
        return zstd
    except ImportError:
        pass
    wheel = chosen.get(DECOMPRESSOR)
    if wheel is None:
        raise SystemExit(f"error: this bundle's wheels are compressed with zstd, and this Python "
                         f"({sys.executable}) has no compression.zstd and the bundle no backports.zstd for it; "
                         f"run it with another python3 (LLAMAZIP_PYTHON), or rebuild it with "
                         f"`llamazip build --wheel-compression deflate`")
    try:
        own = {sha: blobs.pop(sha) for sha in {sha for _, sha in index["wheels"][wheel]}}
    except (KeyError, TypeError) as e:
        raise zipfile.BadZipFile(f"{INDEX} is not a wheel index ({type(e).__name__}: {e})") from None
    _write_blobs(bundle, own, targets, None, 0)
    return import_backported_zstd(lib)


def import_backported_zstd(lib: str):
    sys.path.insert(0, lib)
    try:
        from backports import zstd
    except ImportError as e:
        raise SystemExit(f"error: the bundle's backports.zstd does not load in this Python "
                         f"({sys.executable}: {e}); rebuild it with `llamazip build --wheel-compression deflate`")
    finally:
        sys.path.remove(lib)
    return zstd


def _write_blobs(bundle: zipfile.ZipFile, blobs: dict, targets: dict, zstd, frame_size: int) -> None:
    """Write each blob to the first of its target paths (a blob with none is the base of
    a delta, only decompressed). Blobs are read from the pack in one forward pass and
    decompressed on every core (zlib and zstd let go of the GIL)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    # Each worker holds a frame's 32 MiB: a few cores bound the memory.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(cores, 8))
    bases = {blob[5] for blob in blobs.values() if len(blob) > 5}
    ordered = sorted(([sha] + blob[:6] + [None] * (6 - len(blob)) for sha, blob in blobs.items()), key=lambda b: b[1])
    with ThreadPoolExecutor(workers) as pool, bundle.open(PACK) as pack:
        pending, whole = deque(), {}  # whole: sha -> the future of a base's bytes

        def submit(*job):
            future = pool.submit(*job)
            pending.append(future)
            while len(pending) > 2 * workers:  # bounds the compressed bytes held at once
                pending.popleft().result()
            return future

        position = 0
        for sha, offset, length, size, method, check, base in ordered:
            while position < offset:  # skip what other interpreters' wheels need
                skipped = len(pack.read(min(offset - position, 1 << 22)))
                if not skipped:
                    raise EOFError("the wheel pack ends early")
                position += skipped
            data = pack.read(length)
            position += len(data)
            if len(data) != length:
                raise EOFError("the wheel pack ends early")
            path = targets[sha][0] if sha in targets else None
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.truncate(size)
            if method == "zstd":
                if zstd is None or not frame_size or sum(check) != length \
                        or len(check) != max(1, -(-size // frame_size)) or (base and base not in whole):
                    raise zipfile.BadZipFile(f"{INDEX} does not match the pack (blob {sha[:12]})")
                frames, start = [], 0
                for i, frame_length in enumerate(check):
                    frames.append((data[start:start + frame_length], i * frame_size,
                                   min(frame_size, size - i * frame_size)))
                    start += frame_length
                if sha in bases or base:  # whole, in one job: a base's bytes serve its deltas
                    future = submit(_unzstd, zstd, frames, path, sha, whole.get(base))
                    if sha in bases:
                        whole[sha] = future
                else:
                    for frame in frames:
                        submit(_unzstd, zstd, [frame], path, sha)
            elif size >= 1 << 20:
                submit(_inflate, data, method, size, check, path, sha)
            else:
                _inflate(data, method, size, check, path, sha)
        while pending:
            pending.popleft().result()


def _coverage(bundle: zipfile.ZipFile) -> str:
    """What the bundle's MANIFEST.json says it covers: "linux-x86_64 (Python 3.11, 3.12)"."""
    try:
        covers = json.loads(_read(bundle, "MANIFEST.json", limit=16 << 20)).get("covers") or {}
        return "; ".join(f"{name} (Python {', '.join(sorted(pythons, key=lambda v: int(v.split('.')[1])))})"
                         for name, pythons in covers.items())
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        return ""


def unpack(bundle: zipfile.ZipFile, target: str) -> None:
    """Runtime code and the suitable wheels into target/lib, then the completion mark."""
    lib = os.path.join(target, "lib")
    names = bundle.namelist()
    code = 0
    for name in names:
        if name.startswith("lib/") and not name.endswith("/"):
            bundle.extract(name, target)
            code += 1
    if not code:
        raise zipfile.BadZipFile("it holds no runtime code (lib/)")
    if INDEX in names:
        install_wheels(bundle, lib, REQUIRED)
    # What was compiled for this interpreter at build time, in the __pycache__ folders
    # where Python and numba look for it, beside the modules the tree holds (a folder
    # of bytecode alone would import as an empty namespace package).
    compiled = f"{COMPILED}/{interpreter_tag()}/"
    for name in names:
        if name.startswith(compiled) and not name.endswith("/"):
            path = _safe_path(lib, name[len(compiled):])
            if os.path.isdir(os.path.dirname(os.path.dirname(path))):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(_read(bundle, name, limit=1 << 30))
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
        if os.path.basename(folder) == "__pycache__":
            continue  # bytecode and numba's cache: rewritten as they go stale or grow
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


def interpreter_tag() -> str:
    """'cp311-linux-x86_64': what this interpreter's wheels and compiled kernels are for."""
    return f"cp{sys.version_info[0]}{sys.version_info[1]}-{sys.platform}-{platform.machine()}".lower()


def tree_key(manifest: bytes) -> str:
    """The cache folder's name for a bundle (its MANIFEST.json) under this interpreter:
    one tree per bundle and interpreter, as each Python unpacks its own wheels."""
    return f"{hashlib.sha256(manifest).hexdigest()[:32]}-{interpreter_tag()}"


def prepare(path: str) -> str:
    """The unpacked runtime of the bundle at `path`: its lib/ path. Exits with one
    `error:` line on a bundle that cannot be read."""
    try:
        with zipfile.ZipFile(path) as bundle:
            try:
                manifest = _read(bundle, "MANIFEST.json", limit=16 << 20)
            except KeyError:
                raise SystemExit(f"error: {path}: not a llamazip bundle (no MANIFEST.json)") from None
            return ensure_unpacked(bundle, tree_key(manifest))
    except DAMAGED as e:
        raise SystemExit(f"error: {path}: the bundle is damaged ({type(e).__name__}: {e}); "
                         f"download or build it again") from None
    except OSError as e:
        raise SystemExit(f"error: {path}: {e.strerror or e}") from None


# --- compiling the kernels in a process of their own ------------------------------------

# What the compiling process runs: a two-token prompt and one decoded token go
# through every kernel the model uses (prompt matmuls, decode matvecs, token steps).
_COMPILE_RUN = """import sys
sys.dont_write_bytecode = False  # later starts then never parse source
sys.path.insert(0, sys.argv[1])
from llamazip.main import main
sys.exit(main(["run", "-m", sys.argv[2], "-p", "Hello, world", "-n", "2", "--temp", "0", "-t", "1"]))
"""


def _cpu_key() -> str:
    """This CPU's model and features, as numba's cache tells CPUs apart (roughly: a
    changed key only costs one more compiling run), and the target the user chose."""
    described = [platform.machine(), platform.processor()]
    described += [os.environ.get(k, "") for k in ("LLAMAZIP_CPU_FAMILY", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            described += sorted({line for line in f if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        pass
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:16]


def _shipped_families(bundle: str) -> list:
    """The CPU families the bundle's kernels for this interpreter were compiled for."""
    try:
        with zipfile.ZipFile(bundle) as z:
            kernels = json.loads(_read(z, "MANIFEST.json", limit=16 << 20)).get("kernels") or {}
        return list(kernels.get(interpreter_tag()) or [])
    except DAMAGED + (OSError, AttributeError, TypeError):
        return []


def _mark_done(mark: str, why: str) -> None:
    try:
        with open(f"{mark}.{os.getpid()}.partial", "w") as f:
            f.write(why + "\n")
        os.replace(f"{mark}.{os.getpid()}.partial", mark)
    except OSError:
        pass


def compile_kernels_once(bundle: str, lib: str) -> None:
    """Make sure every kernel this run uses comes from numba's cache: the bundle's
    shipped kernels when they were compiled for this CPU's family, else compiled
    once, on this host, by a child process (about as long as a first run took
    before kernels shipped).

    numba runs a parallel kernel it has just compiled with the loop body compiled
    on its own, but a kernel loaded from its cache with the caller's re-optimised
    copy of that body; with fastmath's reassociation the two round sums
    differently. So a run that compiled its kernels would answer differently from
    every later run. Compiled by a child, the kernels every run uses come from the
    cache. Without numba (the numpy kernels) there is nothing to compile.
    LLAMAZIP_KERNELS=shipped makes a CPU the shipped kernels do not serve an error."""
    mark = os.path.join(os.path.dirname(lib), f"kernels-{_cpu_key()}")
    if os.path.exists(mark) or os.environ.get("LLAMAZIP_NO_NUMBA") == "1":
        return
    import importlib.util
    if importlib.util.find_spec("numba") is None:
        return
    from llamazip.runtime import cpu_family
    family = cpu_family.chosen()
    shipped = _shipped_families(bundle)
    if family is not None and family.name in shipped:
        return _mark_done(mark, f"the bundle's kernels for {family.name} serve this CPU")
    python = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    why = (f"this bundle carries no compiled kernels for {python}" if not shipped else
           f"this CPU is none of the families this bundle's kernels were compiled for ({', '.join(shipped)})")
    if os.environ.get("LLAMAZIP_KERNELS") == "shipped":
        raise SystemExit(f"error: {why} (LLAMAZIP_KERNELS=shipped: compiling here was not allowed)")
    print(f"note: {why}; compiling them for this CPU, once", file=sys.stderr)
    import subprocess
    try:
        no_site = ["-S"] if sys.flags.no_site and carries_packages(lib) else []  # as this process started
        done = subprocess.run([sys.executable, *no_site, "-c", _COMPILE_RUN, lib, bundle], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:  # no process can be started here (an emulator, a sandbox)
        done = False
    if done:  # else the run itself compiles (and shows whatever went wrong)
        _mark_done(mark, "numba's cache holds this model's kernels for this CPU")


def carries_packages(lib: str) -> bool:
    """Whether the bundle brought its runtime's packages (one built with --no-deps
    runs on the interpreter's own)."""
    return os.path.isdir(os.path.join(lib, "numpy"))


def main(argv=None) -> None:
    """argv: the bundle's path, then the user's arguments (the launcher's `sys.argv[1:]`)."""
    argv = sys.argv[1:] if argv is None else argv
    path = os.path.abspath(argv[0])
    lib = prepare(path)
    if sys.flags.no_site and not carries_packages(lib):
        import site
        site.main()  # the site-packages the launcher's -S left out: a --no-deps bundle needs them
    sys.path.insert(0, lib)
    compile_kernels_once(path, lib)
    try:
        from llamazip.main import bundle_main, exit_now
    except ImportError as e:
        raise SystemExit(f"error: {path}: the bundle's runtime code is incomplete ({e}); "
                         f"download or build it again") from None

    exit_now(bundle_main(path, argv[1:]))


if __name__ == "__main__":  # as the launcher runs it; importing it (tests) runs nothing
    main()

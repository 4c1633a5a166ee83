"""The runtime's wheels stored once per distinct file: a content-addressed pack.

A bundle for four CPython versions carries four numpy wheels and four
llvmlite wheels, yet most of their files are the same bytes (llvmlite's 179 MB
library, loaded through ctypes, is one file for every Python; numpy's Python
sources do not change between its cp311 and cp313 wheels). So the bundle holds
two members instead of the wheels:

- `wheels/files.pack`: each distinct file once, one after another: the large
  ones (shared libraries, extension modules) compressed again with zstd in
  independent frames of ZSTD_CHUNK bytes, so a first run decompresses them on
  every core; the rest as the deflate stream its wheel already holds;
- `wheels/index.json`: for each blob (by sha256) its offset, length, size,
  method ("zstd", else the zip method: 0 stored, 8 deflated) and CRC-32 (zstd:
  the compressed length of each frame; each frame carries its own checksum;
  and for a delta, the sha256 of its base), and for each wheel its file name
  and the (path, sha256) of every file in it.

One Python's build of an extension module is compressed against another
Python's build of it (same project, version and path but for the CPython tag)
as a zstd dictionary: numpy's 10 MB `_multiarray_umath` then takes 0.61 MB
instead of 2.41, and each Python beyond the first costs ~2.3 MB instead of
~5.5 (SmolLM2's bundle, linux-x86_64). The base is always an earlier blob of the pack.

Why zstd: a first run must unpack fast, and the bundle stay small. On
linux-x86_64's libraries (233 MB for one Python, 2-core Xeon): xz 51.8 MB and
4.2 s of CPU to decompress, zstd level 19 57.2 MB in 0.46 s, deflate ~80 MB;
with frames of 32 MiB instead of 8, llvmlite's library takes 43.5 MB in zstd
against 45.0 (xz: 40.9). The bootstrap decompresses with the standard
library's `compression.zstd` (3.14+) or the `backports.zstd` wheel the bundle
carries for older Pythons, whose own files stay deflated so that it can be
written first. Compressing takes about a minute per 100 MB, once (kept in the
user cache by blob). Before compressing, ELF libraries lose their static symbol
table (elf_strip.py), which nothing reads at run time: llvmlite's library
179 -> 160 MB, 2.7 MB less compressed. Without `zstd_store` the pack keeps the wheels' own
deflate streams.

Files the runtime never loads are left out of the index (and so of the pack):
test suites, numba's CUDA target, numpy's test extension modules, build-time
sources and headers, type stubs (`never_loaded`).

The bootstrap picks the wheels that suit its interpreter and writes each of
their files where the wheel puts it. The listing of a wheel (its files'
sha256, computed once by decompressing them) is kept beside it in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .elf_strip import strip_symbol_tables
from .wheels import WheelError, wheel_project_version

try:
    from compression import zstd  # Python 3.14+
except ImportError:
    try:
        from backports import zstd
    except ImportError:  # only deflate can be written
        zstd = None

PACK = "wheels/files.pack"
INDEX = "wheels/index.json"
INDEX_FORMAT = "llamazip-wheels/3"  # 3: zstd frames (and deltas) instead of xz streams
_CHUNK = 1 << 22

ZSTD = "zstd"
ZSTD_MIN = 1 << 16  # smaller files stay deflated (2.4 MB of 3.10-3.13's pack: would save under 1%)
ZSTD_CHUNK = 32 << 20  # decompressed bytes per independent frame (one core's share of a first run)
ZSTD_LEVEL = 19  # 22 saves under 0.5% more and needs more memory to write
_DECOMPRESSOR = "backports_zstd"  # its files stay deflated: the bootstrap writes them before any zstd


# What no run imports or opens (checked against every module a run, the server and
# constrained decoding import; `make test` runs the bundles without them):
_NEVER_LOADED = re.compile(
    r"(^|.*/)tests/.*"  # test suites (a file named tests.py, as jinja2's, is kept)
    r"|numba/cuda/.*"  # the CUDA target
    r"|numpy/(f2py|distutils|typing|testing|fft|_pyinstaller|doc)/.*"  # imported by neither numba nor us
    r"|numpy/_core/(_simd|_multiarray_tests|_umath_tests|_rational_tests|_struct_ufunc_tests"
    r"|_operand_flag_tests)\.[^/]*"  # extension modules that exist for numpy's tests
    r"|numpy/_core/(include|lib)/.*"  # C headers and static libraries for building against numpy
    r"|.*\.(c|cpp|h|hpp|pxd|pyx|pyi)|.*/py\.typed")  # sources, headers and stubs


def never_loaded(path: str) -> bool:
    return _NEVER_LOADED.fullmatch(path) is not None


@dataclass(frozen=True)
class _Blob:
    wheel: Path
    data_start: int  # where the member's (compressed) bytes start in the wheel
    length: int
    size: int
    method: int  # 0 stored, 8 deflated (as the wheel holds it)
    crc: int

    def wheel_bytes(self) -> bytes:
        with open(self.wheel, "rb") as f:
            f.seek(self.data_start)
            data = f.read(self.length)
        if len(data) != self.length:
            raise ValueError(f"{self.wheel.name} is shorter than its directory says")
        return data

    def content(self) -> bytes:
        data = self.wheel_bytes()
        return zlib.decompress(data, -15) if self.method == zipfile.ZIP_DEFLATED else data


def _zstd_frames(sha: str, blob: _Blob, store: Path, pool: ThreadPoolExecutor,
                 base: tuple[str, _Blob] | None = None) -> tuple[Path, dict]:
    """The blob, without its ELF symbol table, compressed as independent zstd frames of
    ZSTD_CHUNK bytes each (with `base`: against that blob's content as a dictionary):
    written once to the store, with its size and the frames' lengths beside it (.json)."""
    name = f"{sha}.{ZSTD_CHUNK}" + (f".on-{base[0]}" if base else "")
    data_path, about_path = store / f"{name}.zst", store / f"{name}.json"
    try:
        about = json.loads(about_path.read_text())
        if data_path.stat().st_size == sum(about["frames"]):
            return data_path, about
    except (OSError, ValueError, KeyError, TypeError):
        pass
    content = memoryview(strip_symbol_tables(blob.content()))
    options = {zstd.CompressionParameter.compression_level: ZSTD_LEVEL,
               zstd.CompressionParameter.window_log: ZSTD_CHUNK.bit_length() - 1,
               zstd.CompressionParameter.checksum_flag: 1}
    dictionary = None
    if base:
        dictionary = zstd.ZstdDict(strip_symbol_tables(base[1].content()), is_raw=True)
        options[zstd.CompressionParameter.enable_long_distance_matching] = 1
    # zstd releases the GIL while it compresses: the frames go to every core.
    frames = list(pool.map(lambda start: zstd.compress(content[start:start + ZSTD_CHUNK], options=options,
                                                       zstd_dict=dictionary),
                           range(0, len(content), ZSTD_CHUNK)))
    about = {"size": len(content), "frames": [len(f) for f in frames]}
    store.mkdir(parents=True, exist_ok=True)
    for path, data in ((data_path, b"".join(frames)), (about_path, json.dumps(about).encode())):
        temp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        temp.write_bytes(data)
        os.replace(temp, path)
    return data_path, about


# The CPython version in an extension module's name: `cpython-312-x86_64-linux-gnu.so`, `.cp312-win_amd64.pyd`.
_PYTHON_TAG = re.compile(r"(?<=cpython-)3\d+|(?<=\.cp)3\d+")


def delta_bases(files: dict[str, list[list[str]]], candidates: set[str]) -> dict[str, str]:
    """For each candidate blob that is one Python's build of a file another Python's wheel of
    the same project and version also holds (numpy's `_multiarray_umath.cpython-3XY...so`),
    the blob of the first such wheel: compressed against it, 2.41 -> 0.61 MB for numpy's,
    0.94 -> 0.22 for tiktoken's. The base comes earlier in `files` order than its deltas."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for wheel, listing in files.items():
        project, version = wheel_project_version(wheel)
        for path, sha in listing:
            if sha in candidates:
                group = groups.setdefault((project, version, _PYTHON_TAG.sub("*", path)), [])
                if sha not in group:
                    group.append(sha)
    bases = {sha: group[0] for group in groups.values() for sha in group[1:]}
    return {sha: base for sha, base in bases.items() if base not in bases}  # one step: no chains


def _listing(wheel: Path) -> list[dict]:
    """Every file of the wheel: path, sha256, where its bytes lie, kept beside the wheel."""
    cached = wheel.with_name(wheel.name + ".files.json")
    stamp = [wheel.stat().st_size, int(wheel.stat().st_mtime)]
    try:
        saved = json.loads(cached.read_text())
        if saved["stamp"] == stamp:
            return saved["files"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files = []
    with zipfile.ZipFile(wheel) as zf, open(wheel, "rb") as raw:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"{wheel.name}: {info.filename} uses compression method {info.compress_type}")
            digest = hashlib.sha256()
            with zf.open(info) as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            raw.seek(info.header_offset)
            header = raw.read(30)
            if header[:4] != b"PK\x03\x04":
                raise ValueError(f"{wheel.name}: bad local header for {info.filename}")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            files.append({"path": info.filename, "sha256": digest.hexdigest(),
                          "data_start": info.header_offset + 30 + name_length + extra_length,
                          "length": info.compress_size, "size": info.file_size,
                          "method": info.compress_type, "crc": info.CRC})
    temp = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    temp.write_text(json.dumps({"stamp": stamp, "files": files}))
    os.replace(temp, cached)
    return files


class WheelPack:
    """The pack and index of a set of wheels (each file name once). `zstd_store`: where the
    zstd form of large files is kept between builds (None: keep the wheels' deflate)."""

    def __init__(self, wheels: list[Path], zstd_store: Path | None = None, log=lambda msg: None):
        self.wheels = sorted({w.name: w for w in wheels}.values(), key=lambda w: w.name)
        self._blobs: dict[str, _Blob] = {}
        self._files: dict[str, list[list[str]]] = {}
        for wheel in self.wheels:
            listing = [f for f in _listing(wheel) if not never_loaded(f["path"])]
            self._files[wheel.name] = [[f["path"], f["sha256"]] for f in listing]
            for f in listing:
                self._blobs.setdefault(f["sha256"], _Blob(wheel, f["data_start"], f["length"], f["size"],
                                                          f["method"], f["crc"]))
        self.total_files = sum(len(files) for files in self._files.values())
        self._zstd: dict[str, tuple[Path, dict]] = {}  # sha -> its zstd frames and their sizes
        self._bases: dict[str, str] = {}  # sha -> the blob its zstd frames were compressed against
        if zstd_store is not None:
            if zstd is None:
                raise WheelError("this Python has neither compression.zstd (3.14+) nor backports.zstd, so it "
                                 "cannot write zstd: pip install backports.zstd, or build with "
                                 "--wheel-compression deflate")
            decompressor = {f["sha256"] for w in self.wheels if wheel_project_version(w.name)[0] == _DECOMPRESSOR
                            for f in _listing(w)}
            large = [(sha, b) for sha, b in self._blobs.items() if b.size >= ZSTD_MIN and sha not in decompressor]
            if not all((zstd_store / f"{sha}.{ZSTD_CHUNK}.json").is_file() for sha, _ in large):
                log(f"  compressing {sum(b.size for _, b in large) / 1e6:.0f} MB of libraries with zstd "
                    f"(once: kept in {zstd_store})")
            self._bases = delta_bases(self._files, {sha for sha, _ in large})
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                self._zstd = {sha: _zstd_frames(sha, blob, zstd_store, pool,
                                                (self._bases[sha], self._blobs[self._bases[sha]])
                                                if sha in self._bases else None)
                              for sha, blob in large}

    @property
    def pack_size(self) -> int:
        return sum(sum(self._zstd[sha][1]["frames"]) if sha in self._zstd else b.length
                   for sha, b in self._blobs.items())

    def index_bytes(self) -> bytes:
        blobs, offset = {}, 0
        for sha, blob in self._blobs.items():
            if sha in self._zstd:
                about = self._zstd[sha][1]
                blobs[sha] = [offset, sum(about["frames"]), about["size"], ZSTD, about["frames"]]
                if sha in self._bases:
                    blobs[sha].append(self._bases[sha])
            else:
                blobs[sha] = [offset, blob.length, blob.size, blob.method, blob.crc]
            offset += blobs[sha][1]
        return json.dumps({"format": INDEX_FORMAT, "blobs": blobs, "wheels": self._files,
                           "zstd_chunk": ZSTD_CHUNK}, separators=(",", ":"), sort_keys=True).encode()

    def pack_chunks(self) -> Iterator[bytes]:
        """The pack's bytes: every blob in the index's order, from its zstd form or its wheel."""
        for sha, blob in self._blobs.items():
            source, start, left = (self._zstd[sha][0], 0, sum(self._zstd[sha][1]["frames"])) if sha in self._zstd else \
                (blob.wheel, blob.data_start, blob.length)
            with open(source, "rb") as f:
                f.seek(start)
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    if not chunk:
                        raise ValueError(f"{source.name} is shorter than its directory says")
                    left -= len(chunk)
                    yield chunk

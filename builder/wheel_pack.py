"""The runtime's wheels stored once per distinct file: a content-addressed pack.

A bundle for four CPython versions carries four numpy wheels and four
llvmlite wheels, yet most of their files are the same bytes (llvmlite's 179 MB
library, loaded through ctypes, is one file for every Python; numpy's Python
sources do not change between its cp311 and cp313 wheels). So the bundle holds
two members instead of the wheels:

- `wheels/files.pack`: each distinct file once, one after another: the large
  ones (shared libraries, extension modules) compressed again with xz in
  independent chunks of XZ_CHUNK bytes, so a first run decompresses them on
  every core; the rest as the deflate stream its wheel already holds;
- `wheels/index.json`: for each blob (by sha256) its offset, length, size,
  method ("xz", else the zip method: 0 stored, 8 deflated) and CRC-32 (xz: the
  compressed length of each chunk; each chunk carries its own CRC-32), and for
  each wheel its file name and the (path, sha256) of every file in it.

xz against the wheels' deflate, linux-x86_64: CPython 3.10-3.13 112.2 -> 77.5 MB,
3.10-3.14 119.9 -> 83.0 MB (llvmlite's library alone 59.6 -> 40.4; bz2 saves a
third as much and decompresses slower than xz). It costs a
first run 3-4x the CPU time of inflating (6.4-6.9 s against 1.6-2.1 s, loaded
2-core Xeon), spread over the cores, and a build about a minute per 100 MB
once (kept in the user cache by blob). Without `xz_store` the pack keeps the
wheels' own deflate streams (and needs no lzma module where the bundle runs).

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

from .wheels import WheelError

try:
    import lzma
except ImportError:  # a Python built without liblzma: only deflate can be written
    lzma = None

PACK = "wheels/files.pack"
INDEX = "wheels/index.json"
INDEX_FORMAT = "llamazip-wheels/2"
_CHUNK = 1 << 22

XZ = "xz"
XZ_MIN = 1 << 16  # smaller files stay deflated (2.4 MB of 3.10-3.13's pack: xz would save under 1%)
XZ_CHUNK = 8 << 20  # decompressed bytes per independent xz stream (one core's share of a first run)
# x86 code compresses a few percent better after the BCJ filter turns relative calls absolute.
_BCJ_X86, _LZMA2 = 0x04, 0x21  # lzma.FILTER_X86, lzma.FILTER_LZMA2
_XZ_FILTERS = {"x86": [{"id": _BCJ_X86}, {"id": _LZMA2, "preset": 6}], "other": [{"id": _LZMA2, "preset": 6}]}


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


def _xz_filters(wheel: Path) -> list[dict]:
    return _XZ_FILTERS["x86" if re.search(r"(x86_64|amd64|win32|i686)", wheel.name) else "other"]


def _xz_chunks(sha: str, blob: _Blob, store: Path, pool: ThreadPoolExecutor) -> Path:
    """The blob compressed as independent xz streams of XZ_CHUNK bytes each, written
    once to store/<sha>.<XZ_CHUNK>.xz with their compressed lengths beside it (.json)."""
    data_path, lengths_path = store / f"{sha}.{XZ_CHUNK}.xz", store / f"{sha}.{XZ_CHUNK}.json"
    if data_path.is_file() and lengths_path.is_file():
        return data_path
    content = memoryview(blob.content())
    filters = _xz_filters(blob.wheel)
    # lzma releases the GIL while it compresses: the chunks go to every core.
    chunks = list(pool.map(lambda start: lzma.compress(content[start:start + XZ_CHUNK], format=lzma.FORMAT_XZ,
                                                       check=lzma.CHECK_CRC32, filters=filters),
                           range(0, len(content), XZ_CHUNK)))
    store.mkdir(parents=True, exist_ok=True)
    for path, data in ((data_path, b"".join(chunks)), (lengths_path, json.dumps([len(c) for c in chunks]).encode())):
        temp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        temp.write_bytes(data)
        os.replace(temp, path)
    return data_path


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
    """The pack and index of a set of wheels (each file name once). `xz_store`: where the
    xz form of large files is kept between builds (None: keep the wheels' deflate)."""

    def __init__(self, wheels: list[Path], xz_store: Path | None = None, log=lambda msg: None):
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
        self._xz: dict[str, Path] = {}  # sha -> its xz chunks, for the blobs stored so
        if xz_store is not None:
            if lzma is None:
                raise WheelError("this Python has no lzma module, so it cannot write xz: build with "
                                 "--wheel-compression deflate, or with a Python that has it")
            large = [(sha, b) for sha, b in self._blobs.items() if b.size >= XZ_MIN]
            if not all((xz_store / f"{sha}.{XZ_CHUNK}.json").is_file() for sha, _ in large):
                log(f"  compressing {sum(b.size for _, b in large) / 1e6:.0f} MB of libraries with xz "
                    f"(once: kept in {xz_store})")
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                self._xz = {sha: _xz_chunks(sha, blob, xz_store, pool) for sha, blob in large}

    def _xz_lengths(self, sha: str) -> list[int]:
        return json.loads(self._xz[sha].with_suffix(".json").read_text())

    @property
    def pack_size(self) -> int:
        return sum(self._xz[sha].stat().st_size if sha in self._xz else b.length for sha, b in self._blobs.items())

    def index_bytes(self) -> bytes:
        blobs, offset = {}, 0
        for sha, blob in self._blobs.items():
            if sha in self._xz:
                lengths = self._xz_lengths(sha)
                blobs[sha] = [offset, sum(lengths), blob.size, XZ, lengths]
            else:
                blobs[sha] = [offset, blob.length, blob.size, blob.method, blob.crc]
            offset += blobs[sha][1]
        return json.dumps({"format": INDEX_FORMAT, "blobs": blobs, "wheels": self._files, "xz_chunk": XZ_CHUNK},
                          separators=(",", ":"), sort_keys=True).encode()

    def pack_chunks(self) -> Iterator[bytes]:
        """The pack's bytes: every blob in the index's order, from its xz form or its wheel."""
        for sha, blob in self._blobs.items():
            source, start, left = (self._xz[sha], 0, self._xz[sha].stat().st_size) if sha in self._xz else \
                (blob.wheel, blob.data_start, blob.length)
            with open(source, "rb") as f:
                f.seek(start)
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    if not chunk:
                        raise ValueError(f"{source.name} is shorter than its directory says")
                    left -= len(chunk)
                    yield chunk

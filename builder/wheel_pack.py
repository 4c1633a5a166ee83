"""The runtime's wheels stored once per distinct file: a content-addressed pack.

A bundle for four CPython versions carries four numpy wheels and four
llvmlite wheels, yet most of their files are the same bytes (llvmlite's 179 MB
library, loaded through ctypes, is one file for every Python; numpy's Python
sources do not change between its cp311 and cp313 wheels). So the bundle holds
two members instead of the wheels:

- `wheels/files.pack`: each distinct file once, as the deflate stream its wheel
  already holds (nothing is compressed again), one after another;
- `wheels/index.json`: for each blob (by sha256) its offset, length, size,
  method and CRC-32, and for each wheel its file name and the (path, sha256) of
  every file in it.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACK = "wheels/files.pack"
INDEX = "wheels/index.json"
INDEX_FORMAT = "llamazip-wheels/1"
_CHUNK = 1 << 22


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
    """The pack and index of a set of wheels (each file name once)."""

    def __init__(self, wheels: list[Path]):
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

    @property
    def pack_size(self) -> int:
        return sum(b.length for b in self._blobs.values())

    def index_bytes(self) -> bytes:
        blobs, offset = {}, 0
        for sha, blob in self._blobs.items():
            blobs[sha] = [offset, blob.length, blob.size, blob.method, blob.crc]
            offset += blob.length
        return json.dumps({"format": INDEX_FORMAT, "blobs": blobs, "wheels": self._files},
                          separators=(",", ":"), sort_keys=True).encode()

    def pack_chunks(self) -> Iterator[bytes]:
        """The pack's bytes: every blob in the index's order, copied from its wheel."""
        handles: dict[Path, object] = {}
        try:
            for blob in self._blobs.values():
                f = handles.get(blob.wheel) or handles.setdefault(blob.wheel, open(blob.wheel, "rb"))
                f.seek(blob.data_start)
                left = blob.length
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    if not chunk:
                        raise ValueError(f"{blob.wheel.name} is shorter than its directory says")
                    left -= len(chunk)
                    yield chunk
        finally:
            for f in handles.values():
                f.close()

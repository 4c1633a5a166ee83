"""Read safetensors files one tensor at a time: memory-mapped from a file, or
streamed from a file object (a zip member) in the order the data lies.

Layout: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data; offsets count from the end of the header. Every malformed input
raises `SafetensorsError` naming the file and the problem, before anything is
allocated from the sizes it claims.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ..errors import UserError

# safetensors' own limit on the JSON header (its Rust reader refuses bigger ones).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# dtype -> (numpy dtype of the stored items, bytes per item); BF16 is read as its raw bits.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1), "BOOL": ("?", 1),
    "F8_E4M3": ("u1", 1), "F8_E5M2": ("u1", 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_STREAM_CHUNK = 1 << 24


class SafetensorsError(UserError, ValueError):
    """A safetensors file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # from the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_header(raw: bytes, data_size: int, source: str) -> list[TensorEntry]:
    """The tensors a header describes, in data order; checks every entry against
    `data_size`, the bytes that follow the header."""
    def fail(problem: str):
        raise SafetensorsError(f"{source}: {problem}")

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        fail(f"header is not JSON ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
    if not isinstance(header, dict):
        fail("header is not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                fail("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            fail(f"tensor {name[:80]!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            fail(f"tensor {name[:80]!r}: unknown dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and 0 <= d < 1 << 48 for d in shape)):
            fail(f"tensor {name[:80]!r}: bad shape {str(shape)[:80]}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            fail(f"tensor {name[:80]!r}: bad data_offsets {str(offsets)[:80]}")
        n_items = 1
        for d in shape:
            n_items *= d
        if offsets[1] - offsets[0] != n_items * DTYPES[dtype][1]:
            fail(f"tensor {name[:80]!r}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                 f"its shape and dtype need {n_items * DTYPES[dtype][1]}")
        if offsets[1] > data_size:
            fail(f"truncated: tensor {name[:80]!r} ends at data byte {offsets[1]}, the file has {data_size}")
        entries.append(TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e.begin, e.end))
    for before, after in zip(entries, entries[1:]):
        if after.begin < before.end:
            fail(f"tensors {before.name[:80]!r} and {after.name[:80]!r} overlap")
    return entries


def _header_length(prefix: bytes, total_size: int, source: str) -> int:
    if len(prefix) < 8:
        raise SafetensorsError(f"{source}: truncated: {len(prefix)} bytes, not a safetensors file")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{source}: header claims {n} bytes (more than {MAX_HEADER_BYTES}): "
                               "not a safetensors file")
    if 8 + n > total_size:
        raise SafetensorsError(f"{source}: truncated: header claims {n} bytes, the file has {total_size - 8}")
    return n


def to_array(raw: np.ndarray | bytes, entry: TensorEntry) -> np.ndarray:
    """A tensor's bytes as a numpy array of its stored dtype and shape (no copy)."""
    return np.frombuffer(raw, dtype=DTYPES[entry.dtype][0], count=entry.nbytes // DTYPES[entry.dtype][1]) \
        .reshape(entry.shape)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor (F64/F32/F16, or BF16 given as its uint16 bits) as float32."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} is not a float type")
    return array.astype(np.float32)


class SafetensorsFile:
    """A safetensors file mapped read-only; tensors come out as views into the map."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = _header_length(f.read(8), size, self.path)
                header = f.read(n)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self._data_start = 8 + n
        self.entries = parse_header(header, size - self._data_start, self.path)
        self.tensors = {e.name: e for e in self.entries}

    def raw(self, entry: TensorEntry) -> np.ndarray:
        """The tensor in its stored dtype, a view into the map."""
        start = self._data_start + entry.begin
        return to_array(memoryview(self._map)[start:start + entry.nbytes], entry)

    def iter_tensors(self) -> Iterator[tuple[TensorEntry, np.ndarray]]:
        """Each tensor in data order; once the caller is done with one, its pages are
        dropped from this process (they stay in the page cache), so resident
        memory stays at about one tensor however big the file is."""
        page = mmap.PAGESIZE
        for entry in self.entries:
            yield entry, self.raw(entry)
            start = (self._data_start + entry.begin) // page * page
            end = (self._data_start + entry.end) // page * page
            if end > start and hasattr(mmap, "MADV_DONTNEED"):
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()


class SafetensorsStream:
    """A safetensors file read once from front to back (e.g. a compressed zip
    member): the header first, then each tensor in data order, one at a time."""

    def __init__(self, stream: BinaryIO, size: int, source: str):
        self.source, self._stream = source, stream
        n = _header_length(self._read_exact(8, "the header length"), size, source)
        header = self._read_exact(n, "the header")
        self._pos = 0  # in the data section
        self.entries = parse_header(header, size - 8 - n, source)
        self.tensors = {e.name: e for e in self.entries}

    def _read_exact(self, n: int, what: str) -> bytes:
        parts, left = [], n
        while left:
            chunk = self._stream.read(min(left, _STREAM_CHUNK))
            if not chunk:
                raise SafetensorsError(f"{self.source}: truncated while reading {what}")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def iter_tensors(self) -> Iterator[tuple[TensorEntry, np.ndarray]]:
        for entry in self.entries:
            while self._pos < entry.begin:  # bytes between tensors: skip them
                skip = min(entry.begin - self._pos, _STREAM_CHUNK)
                self._read_exact(skip, "padding")
                self._pos += skip
            buf = bytearray(entry.nbytes)
            view, done = memoryview(buf), 0
            while done < entry.nbytes:
                got = self._stream.readinto(view[done:]) if hasattr(self._stream, "readinto") else None
                if got is None:
                    chunk = self._stream.read(entry.nbytes - done)
                    got = len(chunk)
                    view[done:done + got] = chunk
                if not got:
                    raise SafetensorsError(f"{self.source}: truncated in tensor {entry.name!r}")
                done += got
            self._pos = entry.end
            yield entry, to_array(buf, entry)

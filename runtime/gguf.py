"""Read a GGUF file through a memory map, at any byte offset of any file.

The weights are never copied: `GGUFFile.tensor_data` returns numpy views into
the map. The same reader serves a bare .gguf (offset 0) and a GGUF stored inside
a bundle (offset = the zip member's data offset). Every malformed input raises
`GGUFError` naming the file and the problem.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64
metadata count, the metadata key/values, the tensor infos, padding to
`general.alignment`, then the tensor data. A tensor's dims list the fastest
varying dimension first; numpy shapes here are the reverse.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .ggml_types import BLOCK_GEOMETRY, GGMLType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# metadata value type id -> (struct format, size) for the fixed-size scalars
_SCALARS = {
    0: ("<B", 1),   # uint8
    1: ("<b", 1),   # int8
    2: ("<H", 2),   # uint16
    3: ("<h", 2),   # int16
    4: ("<I", 4),   # uint32
    5: ("<i", 4),   # int32
    6: ("<f", 4),   # float32
    7: ("<?", 1),   # bool
    10: ("<Q", 8),  # uint64
    11: ("<q", 8),  # int64
    12: ("<d", 8),  # float64
}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
                 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFError(UserError, ValueError):
    """A GGUF file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: slowest dimension first
    ggml_type: GGMLType
    offset: int  # from the start of the GGUF's data section
    nbytes: int

    @property
    def ncols(self) -> int:
        return self.shape[-1]

    @property
    def nrows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1


# String arrays of at least this many items are decoded on first use (LazyStrings).
LAZY_STRINGS = 4096


class LazyStrings(Sequence):
    """A metadata array of strings decoded when first read: a vocabulary's 100k+
    strings took a third of a warm start to decode, and a tokenizer loaded from
    its cache (tokenizer_cache.py) never reads them. `raw` is the array's bytes
    as stored (what that cache is keyed by)."""

    def __init__(self, cursor: _Cursor, count: int):
        self._cursor, self._count, self._items = cursor, count, None
        self.raw = cursor.buf[cursor.pos:cursor.end]

    def _decoded(self) -> list[str]:
        if self._items is None:
            self._items = self._cursor.strings(self._count)
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self._decoded()[index]

    def __iter__(self):
        return iter(self._decoded())

    def __add__(self, other) -> list[str]:
        return self._decoded() + list(other)

    def __radd__(self, other) -> list[str]:
        return list(other) + self._decoded()

    def __eq__(self, other) -> bool:
        return list(self) == (list(other) if isinstance(other, (list, tuple, LazyStrings)) else other)

    __hash__ = None


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: memoryview, start: int, end: int, fail):
        self.buf, self.pos, self.end, self.fail = buf, start, end, fail

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            self.fail(f"truncated: needs {n} more bytes at offset {self.pos}, file ends at {self.end}")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, size: int):
        return struct.unpack(fmt, self.take(size))[0]

    def u32(self) -> int:
        return self.scalar("<I", 4)

    def u64(self) -> int:
        return self.scalar("<Q", 8)

    def string(self) -> str:
        n = self.u64()
        raw = self.take(n)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            # Some vocabularies hold invalid UTF-8 pieces; keep them readable.
            return bytes(raw).decode("utf-8", errors="surrogateescape")

    def strings(self, count: int) -> list[str]:
        """`count` strings: string() in one loop, for vocabularies of 100k+ entries
        (a third of a warm start went into calling string() for each)."""
        buf, pos, end = self.buf, self.pos, self.end
        length = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.take(8)  # fails with the usual message
            (n,) = length(buf, pos)
            start, pos = pos + 8, pos + 8 + n
            if pos > end:
                self.pos = start
                self.take(n)
            raw = buf[start:pos]
            try:
                out.append(str(raw, "utf-8"))
            except UnicodeDecodeError:
                out.append(bytes(raw).decode("utf-8", errors="surrogateescape"))
        self.pos = pos
        return out

    def lazy_strings(self, count: int) -> LazyStrings:
        """`count` strings, checked and stepped over now, decoded when first read."""
        buf, start, pos, end = self.buf, self.pos, self.pos, self.end
        stepped = _compiled_end_of_strings(buf, pos, end, count)
        if stepped >= 0:
            self.pos = stepped
            return LazyStrings(_Cursor(buf, start, stepped, self.fail), count)
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.take(8)  # fails with the usual message
            pos += 8 + length(buf, pos)[0]
            if pos > end:
                self.fail(f"truncated: a metadata string runs past the end of the file at offset {pos}")
        self.pos = pos
        return LazyStrings(_Cursor(buf, start, pos, self.fail), count)

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth > 2:
                self.fail("metadata arrays nested too deeply")
            item_type = self.u32()
            count = self.u64()
            if item_type in _NUMPY_DTYPES:
                size = _SCALARS[item_type][1]
                raw = self.take(count * size)  # checks the count against the file first
                return np.frombuffer(raw, dtype=_NUMPY_DTYPES[item_type]).copy()
            if item_type not in (_STRING, _ARRAY):
                self.fail(f"unknown metadata array item type {item_type}")
            # Each string or array item takes at least 8 bytes: refuse counts the file cannot hold.
            if count * 8 > self.end - self.pos:
                self.fail(f"truncated: metadata array claims {count} items")
            if item_type == _STRING:
                return self.strings(count) if count < LAZY_STRINGS else self.lazy_strings(count)
            return [self.value(item_type, depth + 1) for _ in range(count)]
        self.fail(f"unknown metadata value type {vtype}")


def _compiled_end_of_strings(buf: memoryview, pos: int, end: int, count: int) -> int:
    """gguf_strings.end_of_strings when the runtime's kernels are loaded (a run);
    -1 otherwise, or when a string is cut short (the Python loop then says where)."""
    jit = sys.modules.get(f"{__package__}.jit")
    if jit is None or not jit.numba_enabled():
        return -1
    from .gguf_strings import end_of_strings

    return int(end_of_strings(np.frombuffer(buf, np.uint8), pos, end, count))


class GGUFFile:
    """A GGUF file mapped read-only; `offset`/`length` select a GGUF inside a larger file."""

    def __init__(self, path: str | os.PathLike, offset: int = 0, length: int | None = None):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                if length is None:
                    length = file_size - offset
                if offset < 0 or length <= 0 or offset + length > file_size:
                    self._fail(f"empty or truncated: {file_size} bytes, GGUF expected at {offset}..{offset + (length or 0)}")
                # mmap offsets must be multiples of the allocation granularity: map from
                # the offset rounded down and skip the difference.
                map_start = offset - offset % mmap.ALLOCATIONGRANULARITY
                self._map = mmap.mmap(f.fileno(), offset + length - map_start,
                                      offset=map_start, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror or e}") from None
        self._base = offset - map_start
        self._end = self._base + length
        self._buf = memoryview(self._map)
        self._parse()

    def _fail(self, problem: str):
        raise GGUFError(f"{self.path}: {problem}")

    def _parse(self) -> None:
        cur = _Cursor(self._buf, self._base, self._end, self._fail)
        if self._end - self._base < 4 or bytes(self._buf[self._base:self._base + 4]) != GGUF_MAGIC:
            self._fail("not a GGUF file (bad magic)")
        cur.take(4)
        self.version = cur.u32()
        if self.version not in SUPPORTED_VERSIONS:
            self._fail(f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors, n_kv = cur.u64(), cur.u64()
        # A key/value takes at least 12 bytes and a tensor info at least 28: refuse counts
        # the file cannot hold before allocating anything for them.
        if n_kv * 12 + n_tensors * 28 > self._end - cur.pos:
            self._fail(f"truncated or corrupt: header claims {n_tensors} tensors and {n_kv} metadata keys")

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.u32())

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(self.alignment, int) or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            self._fail(f"general.alignment must be a power of two, got {self.alignment!r}")

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                self._fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [cur.u64() for _ in range(n_dims)]
            type_id = cur.u32()
            offset = cur.u64()
            infos.append((name, dims, type_id, offset))

        header_end = cur.pos - self._base
        self.data_offset = header_end + (-header_end) % self.alignment  # from the GGUF's start
        data_size = self._end - self._base - self.data_offset

        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            try:
                ggml_type = GGMLType(type_id)
            except ValueError:
                self._fail(f"tensor {name!r} has unknown type {type_id}")
            block_size, type_size = BLOCK_GEOMETRY[ggml_type]
            if any(d <= 0 or d >= 1 << 40 for d in dims):
                self._fail(f"tensor {name!r} has invalid dimensions {dims}")
            if dims[0] % block_size:
                self._fail(f"tensor {name!r}: {ggml_type.name} rows must be a multiple of {block_size}, got {dims[0]}")
            n_elements = int(np.prod(dims, dtype=object))
            nbytes = n_elements // block_size * type_size
            if offset % self.alignment:
                self._fail(f"tensor {name!r} data offset {offset} is not aligned to {self.alignment}")
            if offset + nbytes > data_size:
                self._fail(f"tensor {name!r} points past the end of the file "
                           f"(needs {offset + nbytes} data bytes, file has {max(data_size, 0)})")
            if name in self.tensors:
                self._fail(f"duplicate tensor name {name!r}")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes)

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view, shape (rows, bytes per row)."""
        info = self.tensors[name]
        start = self._base + self.data_offset + info.offset
        flat = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=start)
        return flat.reshape(info.nrows, info.nbytes // info.nrows)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            self._fail(f"missing metadata key {key!r}")
        return self.metadata[key]

    @property
    def architecture(self) -> str:
        return self.require("general.architecture")

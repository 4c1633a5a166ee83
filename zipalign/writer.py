"""Write a zip whose members' data start at aligned offsets.

The archive may follow a preamble (the bundle's shell launcher): every offset
written is absolute from the start of the file, as `zip -A` leaves a
self-extracting archive, so unzip, Python's zipfile and 7-Zip all read it
without "extra bytes" complaints. Alignment comes from padding in the local
header's extra field (id 0xD935, the one Android's zipalign uses), so the data
itself is never moved. Sizes and offsets past 4 GiB use ZIP64 records.

Timestamps are a fixed date unless the caller passes real ones, and members are
written in the order given: the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from ..errors import UserError

FIXED_DATE_TIME = (2000, 1, 1, 0, 0, 0)  # DOS time cannot say 1970
MIN_ALIGNMENT = 4096
MAX_ALIGNMENT = 1 << 16  # the padding must fit a 16-bit extra-field length
_ZIP64_LIMIT = 0xFFFFFFFF
_PAD_EXTRA_ID = 0xD935
_ZIP64_EXTRA_ID = 0x0001
_UTF8_FLAG = 0x800
_CHUNK = 1 << 22

STORED, DEFLATED = 0, 8


class ZipAlignError(UserError, ValueError):
    pass


def check_alignment(align: int) -> int:
    if align < MIN_ALIGNMENT or align > MAX_ALIGNMENT or align & (align - 1):
        raise ZipAlignError(f"alignment must be a power of two from {MIN_ALIGNMENT} to {MAX_ALIGNMENT}, got {align}")
    return align


@dataclass
class Member:
    """One file to store: `open_data` yields its bytes (a file, or bytes in memory)."""

    name: str
    open_data: Callable[[], Iterator[bytes]]
    level: int = 0  # 0 = stored, 1..9 = deflate level
    date_time: tuple[int, int, int, int, int, int] = FIXED_DATE_TIME
    mode: int = 0o644
    # filled in by the writer:
    sha256: str = field(default="", init=False)
    size: int = field(default=0, init=False)
    data_offset: int = field(default=0, init=False)

    @classmethod
    def from_bytes(cls, name: str, data: bytes, **kw) -> "Member":
        return cls(name, lambda: iter((data,)), **kw)

    @classmethod
    def from_file(cls, name: str, path: str | os.PathLike, real_times: bool = False, **kw) -> "Member":
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk
        if real_times:
            st = os.stat(path)
            kw.setdefault("date_time", _dos_clamp(st.st_mtime))
            kw.setdefault("mode", st.st_mode & 0o777)
        return cls(name, chunks, **kw)


@dataclass
class _Written:
    member: Member
    header_offset: int
    method: int
    crc: int
    compressed_size: int
    size: int
    dos_time: int
    dos_date: int


def _dos_clamp(mtime: float) -> tuple[int, int, int, int, int, int]:
    t = time.localtime(max(mtime, 315532800))  # 1980-01-01, DOS time's first day
    return (min(t.tm_year, 2107), t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def _dos(date_time) -> tuple[int, int]:
    y, mo, d, h, mi, s = date_time
    return (h << 11) | (mi << 5) | (s // 2), ((y - 1980) << 9) | (mo << 5) | d


def write_zip(out: BinaryIO, members: Iterable[Member], align: int = MIN_ALIGNMENT,
              progress: Callable[[str, int], None] | None = None) -> list[Member]:
    """Write `members` as a zip at out's current position (after any preamble).

    Every member's data starts at a multiple of `align` from the start of the
    file. Fills in each member's sha256 (of its uncompressed bytes), size and
    data offset; returns the members.
    """
    check_alignment(align)
    written: list[_Written] = []
    names: set[str] = set()
    for member in members:
        if member.name in names:
            raise ZipAlignError(f"duplicate member name {member.name!r}")
        names.add(member.name)
        written.append(_write_member(out, member, align, progress))
    _write_central_directory(out, written)
    return [w.member for w in written]


def _write_member(out: BinaryIO, member: Member, align: int, progress) -> _Written:
    name = member.name.encode("utf-8")
    method = DEFLATED if member.level else STORED
    header_offset = out.tell()
    # Sizes are unknown until the data is written: reserve a ZIP64 extra for
    # every member (harmless when small), then patch the header in place.
    zip64 = struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, 0, 0)
    unpadded = header_offset + 30 + len(name) + len(zip64) + 4
    padding = -unpadded % align
    extra = zip64 + struct.pack("<HH", _PAD_EXTRA_ID, padding) + b"\0" * padding
    dos_time, dos_date = _dos(member.date_time)
    out.write(b"\0" * (30 + len(name)) + extra)  # the header, patched below
    member.data_offset = out.tell()

    crc, size, digest = 0, 0, hashlib.sha256()
    compressor = zlib.compressobj(member.level, zlib.DEFLATED, -15) if method == DEFLATED else None
    for chunk in member.open_data():
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
        digest.update(chunk)
        out.write(compressor.compress(chunk) if compressor else chunk)
        if progress:
            progress(member.name, size)
    if compressor:
        out.write(compressor.flush())
    end = out.tell()
    compressed_size = end - member.data_offset

    out.seek(header_offset)
    out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, _UTF8_FLAG, method, dos_time, dos_date, crc,
                          _ZIP64_LIMIT, _ZIP64_LIMIT, len(name), len(extra)))
    out.write(name + struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, size, compressed_size))
    out.seek(end)
    member.sha256, member.size = digest.hexdigest(), size
    return _Written(member, header_offset, method, crc, compressed_size, size, dos_time, dos_date)


def _write_central_directory(out: BinaryIO, written: list[_Written]) -> None:
    cd_start = out.tell()
    for w in written:
        name = w.member.name.encode("utf-8")
        # ZIP64 extra holds, in this order, only the fields too big for 32 bits.
        big = [v for v in (w.size, w.compressed_size, w.header_offset) if v >= _ZIP64_LIMIT]
        extra = struct.pack(f"<HH{len(big)}Q", _ZIP64_EXTRA_ID, 8 * len(big), *big) if big else b""
        out.write(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45 if big else 20, _UTF8_FLAG, w.method,
            w.dos_time, w.dos_date, w.crc, min(w.compressed_size, _ZIP64_LIMIT), min(w.size, _ZIP64_LIMIT),
            len(name), len(extra), 0, 0, 0, (0o100000 | w.member.mode) << 16, min(w.header_offset, _ZIP64_LIMIT)))
        out.write(name + extra)
    cd_end = out.tell()
    count, cd_size = len(written), cd_end - cd_start
    if count >= 0xFFFF or cd_size >= _ZIP64_LIMIT or cd_start >= _ZIP64_LIMIT:
        out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_start))
        out.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                          min(cd_size, _ZIP64_LIMIT), min(cd_start, _ZIP64_LIMIT), 0))

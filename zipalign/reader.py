"""Find where each zip member's data lies in the file, and check its alignment.

Python's zipfile parses the central directory (ZIP64 and prepended launchers
included) and gives absolute header offsets; the data starts after the local
header, whose name and extra-field lengths may differ from the central
directory's, so they are read from the local header itself.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass

from ..errors import UserError
from .writer import MIN_ALIGNMENT, STORED

WEIGHTS_SUFFIX = ".gguf"


# What zipfile raises on a damaged archive: bad records, impossible offsets (a
# negative or 64-bit seek), names that are not the UTF-8 they claim, CRC
# mismatches, short or corrupt deflate streams, unknown methods or encryption.
ZIP_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, struct.error, zlib.error, EOFError, ValueError,
              OverflowError, NotImplementedError, RuntimeError)


MAX_SMALL_MEMBER = 16 << 20  # MANIFEST.json and .args are a few KiB


class BundleFormatError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class MemberInfo:
    name: str
    header_offset: int
    data_offset: int
    compress_type: int
    compressed_size: int
    size: int
    crc: int

    @property
    def alignment(self) -> int:
        """The largest power of two dividing the data offset (capped at 1 MiB)."""
        offset = self.data_offset or 1 << 20
        return min(offset & -offset, 1 << 20)

    @property
    def stored(self) -> bool:
        return self.compress_type == STORED


def read_members(path: str) -> list[MemberInfo]:
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            members = []
            for info in zf.infolist():
                f.seek(info.header_offset)
                header = f.read(30)
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    raise BundleFormatError(f"{path}: member {info.filename!r} has no local header "
                                            f"at offset {info.header_offset}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                data_offset = info.header_offset + 30 + name_len + extra_len
                members.append(MemberInfo(info.filename, info.header_offset, data_offset, info.compress_type,
                                          info.compress_size, info.file_size, info.CRC))
            return members
    except ZIP_DAMAGE as e:
        raise BundleFormatError(f"{path}: not a readable zip: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise BundleFormatError(f"{path}: cannot read: {e.strerror or e}") from None


def read_member(zf: zipfile.ZipFile, name: str, limit: int = MAX_SMALL_MEMBER) -> bytes:
    """A small member's bytes (MANIFEST.json, .args), read without trusting the size the
    archive claims for it: a damaged header claiming gigabytes allocates nothing."""
    with zf.open(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleFormatError(f"member {name!r} is larger than {limit} bytes")
    return data


def weights_problem(member: MemberInfo, align: int = MIN_ALIGNMENT) -> str | None:
    """Why a weights member cannot be memory-mapped, or None when it can."""
    if not member.stored:
        return f"weights member {member.name!r} is compressed"
    if member.data_offset % align:
        return f"weights member {member.name!r} starts at offset {member.data_offset}, not a multiple of {align}"
    return None

"""`llamazip zipalign`: llamafile's zipalign flags over our aligned zip writer.

    llamazip zipalign [-a N] [-0|-1..-9] [-j] [-N] ZIP FILE...   add or replace members
    llamazip zipalign --check ZIP                                 list offsets; fail on bad weights
"""

from __future__ import annotations

import argparse
import os
import tempfile
import zipfile
from pathlib import Path

from .reader import WEIGHTS_SUFFIX, read_members, weights_problem
from .writer import MIN_ALIGNMENT, STORED, Member, ZipAlignError, check_alignment, write_zip


def add_parser(commands) -> None:
    p = commands.add_parser("zipalign", help="add files to a zip, data aligned for memory mapping",
                            description="Add FILEs to ZIP (created if missing), each member's data aligned to -a "
                                        "bytes; members of the same name are replaced.")
    p.add_argument("-a", "--align", type=int, default=MIN_ALIGNMENT, help="alignment in bytes (default 4096)")
    levels = p.add_mutually_exclusive_group()
    levels.add_argument("-0", dest="level", action="store_const", const=0, help="store (default)")
    for level in range(1, 10):
        levels.add_argument(f"-{level}", dest="level", action="store_const", const=level,
                            help=argparse.SUPPRESS if level > 1 else "deflate at level 1..9")
    p.add_argument("-j", "--junk-paths", action="store_true", help="store file names without their folders")
    p.add_argument("-N", "--nondeterministic", action="store_true",
                   help="keep the files' own times and modes (default: fixed, for reproducible output)")
    p.add_argument("--check", action="store_true", help="list ZIP's members and check the weights' alignment")
    p.add_argument("zip")
    p.add_argument("files", nargs="*")
    p.set_defaults(handler=run, level=0)


def run(args: argparse.Namespace) -> int:
    if args.check:
        if args.files:
            raise ZipAlignError("--check takes only the zip")
        return check(args.zip, args.align)
    if not args.files:
        raise ZipAlignError("name at least one FILE to add")
    add_files(args.zip, args.files, args.align, args.level, args.junk_paths, args.nondeterministic)
    return 0


def _member_name(path: str, junk_paths: bool) -> str:
    if junk_paths:
        return os.path.basename(path)
    return Path(os.path.normpath(path)).as_posix().lstrip("/").removeprefix("./")


def _kept_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    """An existing member, re-written (and re-aligned) with its time, mode and compression."""
    def chunks():
        with zf.open(info) as f:
            while chunk := f.read(1 << 22):
                yield chunk
    mode = (info.external_attr >> 16) & 0o777 or 0o644
    level = 0 if info.compress_type == STORED else 6
    return Member(info.filename, chunks, level=level, date_time=info.date_time, mode=mode)


def add_files(zip_path: str, files: list[str], align: int, level: int = 0,
              junk_paths: bool = False, real_times: bool = False) -> None:
    check_alignment(align)
    new = {}
    for path in files:
        if not os.path.isfile(path):
            raise ZipAlignError(f"{path}: not a file")
        name = _member_name(path, junk_paths)
        if name in new:
            raise ZipAlignError(f"two files would both be stored as {name!r}")
        new[name] = Member.from_file(name, path, real_times=real_times, level=level)

    preamble, existing = b"", None
    if os.path.exists(zip_path):
        try:
            existing = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ZipAlignError(f"{zip_path}: not a readable zip: {e}") from None
        infos = existing.infolist()
        with open(zip_path, "rb") as f:  # keep a launcher or other bytes before the first member
            preamble = f.read(min((i.header_offset for i in infos), default=existing.start_dir))

    target = Path(zip_path)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(preamble)
            kept = [_kept_member(existing, i) for i in existing.infolist() if i.filename not in new] if existing else []
            write_zip(out, kept + list(new.values()), align)
        if existing:
            os.chmod(temp, os.stat(zip_path).st_mode & 0o777)
        os.replace(temp, zip_path)
    except BaseException:
        os.unlink(temp)
        raise
    finally:
        if existing:
            existing.close()


def check(zip_path: str, align: int = MIN_ALIGNMENT) -> int:
    members = read_members(zip_path)
    print(f"{'offset':>12} {'align':>7} {'method':>8} {'size':>12}  name")
    problems = []
    for m in members:
        print(f"{m.data_offset:>12} {m.alignment:>7} {'stored' if m.stored else 'deflated':>8} {m.size:>12}  {m.name}")
        if m.name.endswith(WEIGHTS_SUFFIX):
            problem = weights_problem(m, align)
            if problem:
                problems.append(problem)
    if problems:
        raise ZipAlignError("; ".join(problems))
    return 0

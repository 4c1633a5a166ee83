"""The aligned zip writer and `llamazip zipalign`, checked with unzip and Python's zipfile."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from llamazip.zipalign.reader import read_members, weights_problem
from llamazip.zipalign.writer import Member, ZipAlignError, write_zip

UNZIP = shutil.which("unzip")


def zipalign(*args):
    return subprocess.run([sys.executable, "-m", "llamazip", "zipalign", *map(str, args)],
                          capture_output=True, text=True)


def _unzip_test(path):
    result = subprocess.run([UNZIP, "-tq", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def files(tmp_path):
    (tmp_path / "d").mkdir()
    paths = {"a.txt": b"hello\n", "d/b.bin": os.urandom(10000), "model.gguf": b"GGUF" + os.urandom(50000)}
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path, paths


@pytest.mark.parametrize("align", [4096, 65536])
def test_members_are_aligned_after_a_preamble(tmp_path, align):
    path = tmp_path / "out.zip"
    with open(path, "wb") as out:
        out.write(b"#!/bin/sh\nexit 0\n" * 37)
        write_zip(out, [Member.from_bytes(f"m{i}", os.urandom(i * 1000 + 1)) for i in range(5)]
                  + [Member.from_bytes("z", b"x" * 100000, level=9)], align)
    members = read_members(str(path))
    assert all(m.data_offset % align == 0 for m in members)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None and zf.read("z") == b"x" * 100000
    assert members[-1].compress_type == zipfile.ZIP_DEFLATED
    if UNZIP:
        _unzip_test(path)


def test_duplicate_names_and_bad_alignment_are_refused(tmp_path):
    with open(tmp_path / "x.zip", "wb") as out:
        with pytest.raises(ZipAlignError, match="duplicate"):
            write_zip(out, [Member.from_bytes("a", b"1"), Member.from_bytes("a", b"2")])
        with pytest.raises(ZipAlignError, match="power of two"):
            write_zip(out, [], align=5000)


def test_cli_adds_replaces_and_is_reproducible(files, monkeypatch):
    tmp, contents = files
    monkeypatch.chdir(tmp)
    assert zipalign("out.zip", "a.txt", "d/b.bin").returncode == 0
    first = (tmp / "out.zip").read_bytes()
    (tmp / "out.zip").unlink()
    assert zipalign("out.zip", "a.txt", "d/b.bin").returncode == 0
    assert (tmp / "out.zip").read_bytes() == first  # fixed timestamps: same bytes

    (tmp / "a.txt").write_bytes(b"replaced\n")
    assert zipalign("-j", "out.zip", "a.txt", "model.gguf").returncode == 0
    with zipfile.ZipFile(tmp / "out.zip") as zf:
        assert sorted(zf.namelist()) == ["a.txt", "d/b.bin", "model.gguf"]
        assert zf.read("a.txt") == b"replaced\n" and zf.read("d/b.bin") == contents["d/b.bin"]
    assert all(m.data_offset % 4096 == 0 for m in read_members(str(tmp / "out.zip")))
    check = zipalign("--check", "out.zip")
    assert check.returncode == 0 and "model.gguf" in check.stdout


def test_cli_refuses_duplicate_files_and_missing_ones(files, monkeypatch):
    tmp, _ = files
    monkeypatch.chdir(tmp)
    (tmp / "e").mkdir()
    (tmp / "e" / "a.txt").write_text("other")
    result = zipalign("-j", "out.zip", "a.txt", "e/a.txt")
    assert result.returncode == 1 and "both be stored as 'a.txt'" in result.stderr
    assert not (tmp / "out.zip").exists()
    assert zipalign("out.zip", "nope").returncode == 1


def test_nondeterministic_keeps_real_times(files, monkeypatch):
    tmp, _ = files
    monkeypatch.chdir(tmp)
    os.utime(tmp / "a.txt", (1_600_000_000, 1_600_000_000))
    assert zipalign("-N", "out.zip", "a.txt").returncode == 0
    with zipfile.ZipFile(tmp / "out.zip") as zf:
        assert zf.getinfo("a.txt").date_time[0] == 2020


def test_check_fails_on_compressed_weights(files, monkeypatch):
    tmp, _ = files
    monkeypatch.chdir(tmp)
    assert zipalign("-6", "out.zip", "model.gguf").returncode == 0
    result = zipalign("--check", "out.zip")
    assert result.returncode == 1 and "compressed" in result.stderr
    (member,) = read_members(str(tmp / "out.zip"))
    assert "compressed" in weights_problem(member)


def test_check_fails_on_misaligned_weights(tmp_path):
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as zf:  # Python's writer: no alignment
        zf.writestr("w.gguf", b"GGUF" + b"\0" * 100)
    result = zipalign("--check", path)
    assert result.returncode == 1 and "not a multiple of 4096" in result.stderr


def test_zip64_member_past_4_gib(tmp_path):
    """A member larger than 4 GiB and one whose offset is past 4 GiB (ZIP64 records)."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate((4 << 30) + 12345)  # sparse: cheap to make, 4 GiB to write
    path = tmp_path / "big.zip"
    with open(path, "wb") as out:
        write_zip(out, [Member.from_file("big.bin", big), Member.from_bytes("after.gguf", b"GGUF1234")])
    members = {m.name: m for m in read_members(str(path))}
    assert members["after.gguf"].data_offset > 1 << 32 and members["after.gguf"].data_offset % 4096 == 0
    with zipfile.ZipFile(path) as zf:
        assert zf.read("after.gguf") == b"GGUF1234"
        assert zf.getinfo("big.bin").file_size == (4 << 30) + 12345
    if UNZIP:
        listing = subprocess.run([UNZIP, "-l", str(path)], capture_output=True, text=True)
        assert listing.returncode == 0 and "after.gguf" in listing.stdout

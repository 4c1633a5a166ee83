"""Pieces of bundle start-up: which wheels suit an interpreter, and .args merging."""

import json
from pathlib import Path
import platform
import subprocess
import sys
import zipfile

import gguf
import numpy as np
import pytest

from llamazip.bundle_format import format_args_file, merge_args, parse_args_file
from llamazip.templates.bootstrap import wheel_suits
from tiny_models import TinyLlama

CP = f"cp{sys.version_info[0]}{sys.version_info[1]}"
LINUX_X86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"


@pytest.mark.skipif(not LINUX_X86, reason="the tags below are those of Linux on x86_64")
@pytest.mark.parametrize("filename, suits", [
    (f"numpy-2.4.6-{CP}-{CP}-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
    (f"regex-1-{CP}-{CP}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    (f"numpy-2.4.6-{CP}-{CP}-manylinux_2_27_aarch64.whl", False),
    (f"numpy-2.4.6-{CP}-{CP}-macosx_11_0_arm64.whl", False),
    (f"numpy-2.4.6-{CP}-{CP}-win_amd64.whl", False),
    ("numpy-2.4.6-cp39-cp39-manylinux_2_28_x86_64.whl", False),
    (f"numpy-2.4.6-{CP}-{CP}-manylinux_2_99_x86_64.whl", False),  # needs a newer glibc
    (f"numpy-2.4.6-{CP}-{CP}-musllinux_1_2_x86_64.whl", False),
    ("tiktoken-0.14.0-cp38-abi3-manylinux_2_28_x86_64.whl", True),
    ("six-1.16.0-py2.py3-none-any.whl", True),
])
def test_wheel_tags(filename, suits):
    assert wheel_suits(filename) is suits


def test_args_file_format():
    text = "# comment\n--temp\n0\n\n-p\nhello world\n...\n-n\n5\n"
    args = parse_args_file(text)
    assert args == ["--temp", "0", "-p", "hello world", "...", "-n", "5"]
    assert merge_args(args, ["-n", "9"]) == ["--temp", "0", "-p", "hello world", "-n", "9", "-n", "5"]
    assert merge_args(["--temp", "0"], ["-n", "9"]) == ["--temp", "0", "-n", "9"]
    assert parse_args_file(format_args_file(["-p", "two words"])) == ["-p", "two words"]
    with pytest.raises(ValueError):
        format_args_file(["line\nbreak"])


def test_build_carries_wheels_for_another_platform(tmp_path):
    model = TinyLlama(weight_type=gguf.GGMLQuantizationType.Q8_0).write(tmp_path / "tiny.gguf")
    out = tmp_path / "tiny.llamazip"
    result = subprocess.run([sys.executable, "-m", "llamazip", "build", "-m", model, "-o", out,
                             "--platform", "manylinux_2_28_aarch64", "--python", CP[2] + "." + CP[3:]],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(out) as zf:
        wheels = list(json.loads(zf.read("wheels/index.json"))["wheels"])  # a pip tag still names a platform
    for project in ("numpy", "numba", "llvmlite", "tiktoken", "regex"):
        tagged = [w for w in wheels if w.startswith(f"{project}-")]
        assert any("aarch64" in w for w in tagged) and any("x86_64" in w for w in tagged), tagged


# --- the wheel pack: what the builder stores, the bootstrap writes back ---------------------------

def _wheel(path, files: dict) -> "Path":
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def two_wheels(tmp_path):
    """Two Pythons' wheels of one project (a large library both share, a module of each, a
    small file), and for each Python a stand-in for the zstd decompressor's wheel."""
    rng = np.random.default_rng(0)
    library = rng.integers(0, 4, 300_000, dtype=np.uint8).tobytes()  # compressible, several zstd frames
    extension = rng.bytes(100_000)  # each Python's build of it differs a little
    files, decompressors = {}, {}
    for cp in ("cp312", "cp313"):
        files[cp] = {"demo/libshared.so": library, f"demo/_ext.{cp}.so": extension + rng.bytes(2_000),
                     "demo/__init__.py": b"VALUE = 1\n", "demo/tests/test_x.py": b"never loaded\n"}
        # Large enough to be compressed, were it not the decompressor itself.
        decompressors[cp] = {f"backports/zstd/_zstd.{cp}.so": rng.integers(0, 4, 100_000, dtype=np.uint8).tobytes()}
    wheels = [_wheel(tmp_path / f"demo-1.0-{cp}-{cp}-{TAG}.whl", f) for cp, f in files.items()]
    wheels += [_wheel(tmp_path / f"backports_zstd-1.8.0-{cp}-{cp}-{TAG}.whl", f) for cp, f in decompressors.items()]
    return wheels, {cp: files[cp] | decompressors[cp] for cp in files}


TAG = "manylinux2014_x86_64"


def _bundle(tmp_path, pack) -> zipfile.ZipFile:
    from llamazip.builder.wheel_pack import INDEX, PACK
    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(INDEX, pack.index_bytes())
        zf.writestr(PACK, b"".join(pack.pack_chunks()))
    return zipfile.ZipFile(path)


def _backport_from_the_tree(monkeypatch, bootstrap):
    """The bootstrap imports backports.zstd from the tree it has just written; the fake
    wheels' stand-in cannot load, so hand it the real one once its file is in place."""
    from backports import zstd

    def import_backported_zstd(lib):
        assert list(Path(lib, "backports", "zstd").glob("_zstd.*.so")), "the decompressor was not written first"
        return zstd
    monkeypatch.setattr(bootstrap, "import_backported_zstd", import_backported_zstd)


@pytest.mark.skipif(not LINUX_X86, reason="the fake wheels are tagged for Linux on x86_64")
@pytest.mark.parametrize("compression", ["zstd", "deflate"])
def test_pack_round_trip(two_wheels, tmp_path, monkeypatch, compression):
    from llamazip.builder import wheel_pack
    from llamazip.templates import bootstrap

    monkeypatch.setattr(wheel_pack, "ZSTD_CHUNK", 1 << 16)  # several frames per large file
    _backport_from_the_tree(monkeypatch, bootstrap)
    wheels, files = two_wheels
    pack = wheel_pack.WheelPack(wheels, tmp_path / "zstd" if compression == "zstd" else None)
    index = json.loads(pack.index_bytes())

    def methods(prefix):
        return {index["blobs"][sha][3] for name, files_ in index["wheels"].items() for _, sha in files_
                if name.startswith(prefix)}
    assert methods("demo-") == ({"zstd", 8} if compression == "zstd" else {8})
    assert methods("backports_zstd-") == {8}  # stays deflated: it is what decompresses the rest
    shared = [sha for w in index["wheels"].values() for path, sha in w if path == "demo/libshared.so"]
    assert len(set(shared)) == 1 and len(shared) == 2  # stored once for both Pythons
    if compression == "zstd":
        assert len(index["blobs"][shared[0]][4]) == 5  # 300,000 bytes in frames of 65,536
        # cp313's extension is compressed against cp312's (which a 3.13 run reads but does not write).
        ext = {path: sha for w in index["wheels"].values() for path, sha in w if path.startswith("demo/_ext.")}
        base, delta = index["blobs"][ext["demo/_ext.cp312.so"]], index["blobs"][ext["demo/_ext.cp313.so"]]
        assert len(base) == 5 and delta[5] == ext["demo/_ext.cp312.so"]
        assert delta[1] < base[1] / 10, (delta[1], base[1])

    for cp in ("cp312", "cp313"):
        monkeypatch.setattr(bootstrap.sys, "version_info", (3, int(cp[3:]), 0, "final", 0))
        lib = tmp_path / f"lib-{cp}"
        chosen = bootstrap.install_wheels(_bundle(tmp_path, pack), str(lib))
        assert chosen == {"demo": f"demo-1.0-{cp}-{cp}-{TAG}.whl",
                          "backports_zstd": f"backports_zstd-1.8.0-{cp}-{cp}-{TAG}.whl"}
        written = {str(p.relative_to(lib)): p.read_bytes() for p in lib.rglob("*") if p.is_file()}
        assert written == {k: v for k, v in files[cp].items() if "tests/" not in k}


@pytest.mark.skipif(not LINUX_X86, reason="the fake wheels are tagged for Linux on x86_64")
def test_a_damaged_zstd_frame_or_no_decompressor_is_one_line(two_wheels, tmp_path, monkeypatch):
    from llamazip.builder import wheel_pack
    from llamazip.templates import bootstrap

    monkeypatch.setattr(wheel_pack, "ZSTD_CHUNK", 1 << 16)
    monkeypatch.setattr(bootstrap.sys, "version_info", (3, 13, 0, "final", 0))
    _backport_from_the_tree(monkeypatch, bootstrap)
    pack = wheel_pack.WheelPack(two_wheels[0], tmp_path / "zstd")
    data = bytearray(b"".join(pack.pack_chunks()))
    index = json.loads(pack.index_bytes())
    shared = next(sha for files in index["wheels"].values() for path, sha in files if path == "demo/libshared.so")
    offset, length = index["blobs"][shared][:2]
    data[offset + length // 2] ^= 0xFF
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as zf:
        zf.writestr(wheel_pack.INDEX, pack.index_bytes())
        zf.writestr(wheel_pack.PACK, bytes(data))
    with pytest.raises(bootstrap.DAMAGED):
        bootstrap.install_wheels(zipfile.ZipFile(damaged), str(tmp_path / "lib-damaged"))

    # A Python before 3.14, and no backports.zstd among the bundle's wheels for it.
    without = wheel_pack.WheelPack([w for w in two_wheels[0] if w.name.startswith("demo-")], tmp_path / "zstd")
    with pytest.raises(SystemExit) as exit_:
        bootstrap.install_wheels(_bundle(tmp_path, without), str(tmp_path / "lib-no-zstd"))
    line = str(exit_.value)
    assert line.startswith("error: ") and "no backports.zstd" in line and "--wheel-compression deflate" in line
    assert "\n" not in line

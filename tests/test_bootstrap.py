"""Pieces of bundle start-up: which wheels suit an interpreter, and .args merging."""

import json
import platform
import subprocess
import sys
import zipfile

import gguf
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

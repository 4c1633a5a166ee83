"""Fuzzing what reads untrusted or damaged input: GGUF files, bundles (the zip
reader, open_model, the bootstrap's unpacking) and .args files. Every input
must end in our own clean error or in success: never another exception, a hang
or a large allocation.

The inputs are valid files mutated (truncated, bits flipped, header fields
overwritten with extreme integers, bytes inserted or deleted), so they get past
the magic numbers into the parsers, where random bytes would not. The default
run tries a few hundred inputs per target; `pytest -m slow` tries 10,000.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import tracemalloc
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamazip.bundle_format import ArgsFileError, format_args_file, merge_args, parse_args_file, read_args_file
from llamazip.errors import UserError
from llamazip.runtime import gguf as gguf_reader
from llamazip.runtime.gguf import GGUFError, GGUFFile
from llamazip.runtime.model_file import open_model
from llamazip.templates import bootstrap
from llamazip.zipalign.reader import BundleFormatError, read_members
from llamazip.zipalign.writer import Member, write_zip

DEFAULT_EXAMPLES, LONG_EXAMPLES = 300, 10_000
MAX_ALLOCATION = 32 << 20  # the inputs are a few KiB: an allocation this big means a size was trusted
HANG_SECONDS = 30  # a hang guard, far above what any one input takes
EXTREMES = [0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
            2**40, 2**60, 2**63 - 1, 2**63, 2**64 - 1]


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# Each fuzz test runs short in the default run and long under -m slow.
LENGTHS = [pytest.param(DEFAULT_EXAMPLES, id="short"), pytest.param(LONG_EXAMPLES, id="long", marks=pytest.mark.slow)]


class Inputs:
    """How many inputs a fuzz test tried: hypothesis may stop early on a small input space."""

    def __init__(self) -> None:
        self.count = 0
        self.outcomes: Counter[str] = Counter()  # how far inputs got: read whole, or refused

    def check(self, name: str, examples: int) -> None:
        print(f"\n{name}: {self.count} inputs {dict(self.outcomes)}")
        assert self.count >= examples, f"only {self.count} of {examples} inputs were tried"


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` under test swallows it."""


@contextmanager
def guarded() -> Iterator[None]:
    """Fail on a hang, and on any input that makes the code under test allocate a lot.
    (Tracing only here: hypothesis's own work between inputs runs untraced, at full speed.)"""
    def on_alarm(signum, frame):
        raise Hang(f"no answer in {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < MAX_ALLOCATION, f"allocated {peak / 1e6:.1f} MB"


# --- valid inputs to start from -----------------------------------------------------

def _seed_gguf(path: Path, alignment: int | None = None) -> bytes:
    """Every metadata type, nested arrays, a vocabulary, tensors of a few types."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 2.25)
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_token_list(["<s>", "a", "b", "ab", ""])
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(64, dtype=np.float32).reshape(2, 32).astype(np.float16))
    w.add_tensor("q", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _gguf_fields(path: Path) -> list[int]:
    """Where the reader finds each integer of the header: counts, lengths, types, dims, offsets."""
    positions: list[int] = []

    class Recording(gguf_reader._Cursor):
        def scalar(self, fmt, size):
            positions.append(self.pos)
            return super().scalar(fmt, size)

    original = gguf_reader._Cursor
    gguf_reader._Cursor = Recording
    try:
        GGUFFile(path)
    finally:
        gguf_reader._Cursor = original
    return positions


LAUNCHER = b"#!/bin/sh\necho a launcher\nexit 1\n"


def _seed_bundle(model: bytes) -> bytes:
    """A bundle as `llamazip build` lays it out, small: launcher, code, .args, model, MANIFEST.json."""
    members = [Member.from_bytes("bootstrap.py", b"print('hello')\n"),
               Member.from_bytes(".args", b"--temp\n0\n...\n"),
               Member.from_bytes("lib/llamazip/__init__.py", b"__version__ = '0'\n" * 20, level=6),
               Member.from_bytes("model.gguf", model)]
    manifest = {"format": "llamazip-bundle/1", "model": "model.gguf", "members": {}}
    members.append(Member.from_bytes("MANIFEST.json", json.dumps(manifest).encode()))
    out = io.BytesIO()
    out.write(LAUNCHER)
    write_zip(out, members)
    return out.getvalue()


def _seed_zip64(model: bytes) -> bytes:
    """The same kind of content written by Python's zipfile with ZIP64 records, deflated."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data, method in (("MANIFEST.json", b'{"model": "model.gguf"}', zipfile.ZIP_DEFLATED),
                                   ("lib/llamazip/x.py", b"x = 1\n", zipfile.ZIP_DEFLATED),
                                   ("model.gguf", model, zipfile.ZIP_STORED)):
            info = zipfile.ZipInfo(name, (2000, 1, 1, 0, 0, 0))
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as f:
                f.write(data)
    return out.getvalue()


def _zip_fields(data: bytes) -> list[int]:
    """Each byte of the zip records' fixed parts: where sizes, offsets and counts live."""
    positions: list[int] = []
    for signature, length in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22),
                              (b"PK\x06\x06", 56), (b"PK\x06\x07", 20)):
        at = data.find(signature)
        while at >= 0:
            positions += range(at + 4, min(at + length, len(data)))
            at = data.find(signature, at + 1)
    return positions


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, tuple[list[bytes], list[list[int]]]]:
    folder = tmp_path_factory.mktemp("seeds")
    plain = _seed_gguf(folder / "plain.gguf")
    aligned = _seed_gguf(folder / "aligned.gguf", alignment=64)
    small = _seed_gguf(folder / "small.gguf", alignment=8)
    gguf_seeds = [plain, aligned]
    zips = [_seed_bundle(small), _seed_zip64(small)]
    return {
        "gguf": (gguf_seeds, [_gguf_fields(folder / "plain.gguf"), _gguf_fields(folder / "aligned.gguf")]),
        "zip": (zips, [_zip_fields(z) for z in zips]),
    }


# --- mutations ------------------------------------------------------------------------

@st.composite
def mutated(draw, seeds: list[bytes], fields: list[list[int]]) -> bytes:
    k = draw(st.integers(0, len(seeds) - 1))
    data = bytearray(seeds[k])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        n = len(data)
        targets = [p for p in fields[k] if p < n]
        pos = draw(st.sampled_from(targets) if targets and draw(st.booleans()) else st.integers(0, n - 1))
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "overwrite", "insert", "delete", "tail"]))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(EXTREMES) | st.integers(0, 2**64 - 1))
            data[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            data[pos:] = draw(st.binary(max_size=64))
    return bytes(data)


def _touch(model: GGUFFile) -> None:
    """Use what was read as the runtime does: every tensor's bytes, the metadata."""
    for name, info in model.tensors.items():
        view = model.tensor_data(name)
        assert view.size == info.nbytes
        view.sum()
    for key in model.metadata:
        model.get(key)


def _check_model_file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    with guarded():
        try:
            model = open_model(path)
        except UserError as e:  # a damaged GGUF (GGUFError) or bundle (BundleFormatError)
            assert str(e).startswith(str(path))
            return "model refused"
        _touch(model)
    return "model read"


# --- GGUF ------------------------------------------------------------------------------

@pytest.mark.parametrize("examples", LENGTHS)
def test_gguf_reader(seeds, tmp_path, examples):
    inputs = Inputs()

    @fuzz_settings(examples)
    @given(mutated(*seeds["gguf"]))
    def run(data):
        inputs.count += 1
        inputs.outcomes[_check_model_file(tmp_path / "fuzzed.gguf", data)] += 1

    run()
    inputs.check("test_gguf_reader", examples)


@pytest.mark.parametrize("examples", LENGTHS)
def test_gguf_random_tail(tmp_path, examples):
    """A valid start followed by anything: the parser's every branch on random values."""
    inputs = Inputs()

    @fuzz_settings(examples)
    @given(st.binary(max_size=256))
    def run(tail):
        inputs.count += 1
        inputs.outcomes[_check_model_file(tmp_path / "tail.gguf", b"GGUF" + struct.pack("<I", 3) + tail)] += 1

    run()
    inputs.check("test_gguf_random_tail", examples)


def test_a_header_claiming_2_to_the_60_tensors_does_not_allocate(tmp_path):
    for n_tensors, n_kv in ((2**60, 0), (0, 2**60), (2**64 - 1, 2**64 - 1)):
        data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"\0" * 4096
        with pytest.raises(GGUFError, match="claims"):
            with guarded():
                GGUFFile(_write(tmp_path / "huge.gguf", data))
    # An array whose count claims 2^60 strings, and one of 2^60 u64s.
    for item_type in (8, 10):
        kv = struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, item_type, 2**60)
        data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + b"\0" * 4096
        with pytest.raises(GGUFError, match="truncated"):
            with guarded():
                GGUFFile(_write(tmp_path / "huge.gguf", data))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- bundles: the zip reader, open_model, the bootstrap ------------------------------------

@pytest.mark.parametrize("examples", LENGTHS)
def test_bundle_reader(seeds, tmp_path, examples):
    inputs = Inputs()

    @fuzz_settings(examples)
    @given(mutated(*seeds["zip"]))
    def run(raw):
        inputs.count += 1
        path = _write(tmp_path / "fuzzed.llamazip", raw)
        with guarded():
            try:
                members = read_members(str(path))
            except BundleFormatError as e:
                assert str(e).startswith(str(path))
                inputs.outcomes["zip refused"] += 1
            else:
                assert all(m.data_offset >= m.header_offset >= 0 for m in members)
                inputs.outcomes["zip read"] += 1
        inputs.outcomes[_check_model_file(path, raw)] += 1

    run()
    inputs.check("test_bundle_reader", examples)


@pytest.mark.parametrize("examples", LENGTHS)
def test_bootstrap_unpack(seeds, tmp_path, monkeypatch, examples):
    """The bootstrap unpacking a damaged bundle: a lib/ path or one `error:` line."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMAZIP_CACHE", str(cache))

    inputs = Inputs()

    @fuzz_settings(examples)
    @given(mutated(*seeds["zip"]))
    def run(raw):
        inputs.count += 1
        path = _write(tmp_path / "boot.llamazip", raw)
        shutil.rmtree(cache, ignore_errors=True)
        with guarded():
            try:
                lib = bootstrap.prepare(str(path))
            except SystemExit as e:
                message = str(e.code)
                assert message.startswith("error: ") and "\n" not in message, message
                inputs.outcomes["refused"] += 1
            else:
                assert os.path.isdir(lib)
                inputs.outcomes["unpacked"] += 1

    run()
    inputs.check("test_bootstrap_unpack", examples)


# --- .args -----------------------------------------------------------------------------------

line_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
args_bytes = st.binary(max_size=300) | st.lists(line_text, max_size=12).map(lambda ls: "\n".join(ls).encode())


@pytest.mark.parametrize("examples", LENGTHS)
def test_args_file(examples):
    inputs = Inputs()

    @fuzz_settings(examples)
    @given(args_bytes)
    def run(data):
        inputs.count += 1
        with guarded():
            try:
                args = read_args_file(data)
            except ArgsFileError as e:
                assert "\n" not in str(e)
                inputs.outcomes["refused"] += 1
                return
            inputs.outcomes["read"] += 1
            for arg in args:
                assert "\n" not in arg and arg.strip() and not arg.lstrip().startswith("#")
            try:
                text = format_args_file(args)
            except ArgsFileError:
                assert any("\r" in a for a in args)  # the one thing a parsed line holds that format refuses
            else:
                assert parse_args_file(text) == args

    run()
    inputs.check("test_args_file", examples)


@pytest.mark.parametrize("examples", LENGTHS)
def test_args_round_trip(examples):
    """Any argument list is refused cleanly or reads back as itself, and the user's
    arguments land in one piece where `...` says."""
    inputs = Inputs()

    @fuzz_settings(examples)
    @given(st.lists(line_text, max_size=8), st.lists(line_text, max_size=8))
    def run(defaults, user):
        inputs.count += 1
        with guarded():
            try:
                text = format_args_file(defaults)
            except ArgsFileError:
                return
            assert parse_args_file(text) == defaults
            merged = merge_args(defaults, user)
            at = defaults.index("...") if "..." in defaults else len(defaults)
            assert merged[at:at + len(user)] == user
            assert len(merged) == len(user) + len([a for a in defaults if a != "..."])

    run()
    inputs.check("test_args_round_trip", examples)

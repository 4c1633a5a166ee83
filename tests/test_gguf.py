"""The GGUF reader: every value type, offsets inside larger files, and clean errors."""

import struct

import gguf
import numpy as np
import pytest

from llamazip.runtime.ggml_types import GGMLType
from llamazip.runtime.gguf import LAZY_STRINGS, GGUFError, GGUFFile, LazyStrings


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_bytes(version=3, kvs=(), tensors=(), data=b"", n_tensors=None, n_kv=None) -> bytes:
    """A GGUF assembled by hand, so that tests can make it wrong on purpose."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)
    for key, vtype, payload in kvs:
        out += _string(key) + struct.pack("<I", vtype) + payload
    for name, dims, type_id, offset in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", type_id, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


@pytest.fixture
def written(tmp_path):
    """A file with one of every metadata type and a few tensors, by gguf-py."""
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
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
    w.add_array("t.strs", ["a", "bc", ""])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(64, dtype=np.float32).reshape(2, 32).astype(np.float16))
    w.add_tensor("q", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_metadata_type_and_tensor_views(written):
    f = GGUFFile(written)
    m = f.metadata
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -100, 60000, -30000)
    assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 5, -(2**62))
    assert (m["t.f32"], m["t.bool"], m["t.str"], m["t.f64"]) == (1.5, True, "héllo ✓", 2.25)
    assert list(m["t.ints"]) == [1, 2, 3] and m["t.strs"] == ["a", "bc", ""]
    assert list(m["t.floats"]) == [0.5, 1.5]
    assert f.architecture == "llama"

    a = f.tensors["a"]
    assert a.shape == (3, 4) and a.ggml_type == GGMLType.F32
    np.testing.assert_array_equal(f.tensor_data("a").view(np.float32), np.arange(12).reshape(3, 4))
    assert not f.tensor_data("a").flags.writeable  # a view of the map, not a copy
    np.testing.assert_array_equal(f.tensor_data("b").view(np.float16).ravel(), np.arange(64))
    q = f.tensors["q"]
    assert q.shape == (2, 64) and q.ggml_type == GGMLType.Q8_0 and f.tensor_data("q").shape == (2, 68)


@pytest.mark.parametrize("prefix", [1, 4095, 4096, 70001])
def test_reads_a_gguf_at_any_offset_inside_another_file(written, tmp_path, prefix):
    blob = written.read_bytes()
    path = tmp_path / "inside.bin"
    path.write_bytes(b"\x7f" * prefix + blob + b"trailer")
    f = GGUFFile(path, offset=prefix, length=len(blob))
    np.testing.assert_array_equal(f.tensor_data("a"), GGUFFile(written).tensor_data("a"))
    assert f.metadata["t.strs"] == ["a", "bc", ""]


def _error(tmp_path, content: bytes) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    message = str(e.value)
    assert message.startswith(str(path)), message  # names the file
    return message


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path)


def test_text_file_named_gguf(tmp_path):
    assert "not a GGUF file" in _error(tmp_path, b"hello, I am plain text\n")


def test_empty_file(tmp_path):
    assert "empty" in _error(tmp_path, b"")


def test_unsupported_version(tmp_path):
    assert "unsupported GGUF version 7" in _error(tmp_path, _gguf_bytes(version=7))


def test_every_truncation_is_a_clean_error(written, tmp_path):
    blob = written.read_bytes()
    whole = GGUFFile(written)
    data_end = whole.data_offset + max(t.offset + t.nbytes for t in whole.tensors.values())
    for cut in sorted(set(range(0, whole.data_offset, 7)) | {whole.data_offset, data_end - 1}):
        _error(tmp_path, blob[:cut])


def test_tensor_past_the_end(tmp_path):
    content = _gguf_bytes(tensors=[("w", [32, 4], 0, 0)], data=b"\0" * 100)
    assert "points past the end" in _error(tmp_path, content)


def test_unknown_tensor_type(tmp_path):
    content = _gguf_bytes(tensors=[("w", [32], 99, 0)], data=b"\0" * 128)
    assert "unknown type 99" in _error(tmp_path, content)


def test_absurd_counts_do_not_allocate(tmp_path):
    assert "header claims" in _error(tmp_path, _gguf_bytes(n_tensors=2**60))
    huge_array = struct.pack("<IQ", 8, 2**60)  # an array of 2^60 strings
    assert "truncated" in _error(tmp_path, _gguf_bytes(kvs=[("k", 9, huge_array)]))
    huge_string = struct.pack("<Q", 2**62)
    assert "truncated" in _error(tmp_path, _gguf_bytes(kvs=[("k", 8, huge_string)]))


def test_unknown_value_type_and_bad_dims(tmp_path):
    assert "unknown metadata value type 42" in _error(tmp_path, _gguf_bytes(kvs=[("k", 42, b"")]))
    assert "dimensions" in _error(tmp_path, _gguf_bytes(tensors=[("w", [], 0, 0)]))
    assert "multiple of 32" in _error(tmp_path, _gguf_bytes(tensors=[("w", [33], 8, 0)], data=b"\0" * 64))


@pytest.fixture(params=["compiled", "python"])
def string_stepping(request, monkeypatch):
    """Large string arrays stepped over by the compiled kernel (a run has numba
    loaded: gguf_strings.py) or by gguf.py's own loop."""
    from llamazip.runtime import gguf as gguf_module
    from llamazip.runtime import jit

    stepped = []
    if request.param == "compiled":
        assert jit.numba_enabled()
        compiled = gguf_module._compiled_end_of_strings
        monkeypatch.setattr(gguf_module, "_compiled_end_of_strings",
                            lambda *args: stepped.append(compiled(*args)) or stepped[-1])
        return stepped
    monkeypatch.setattr(gguf_module, "_compiled_end_of_strings", lambda *args: -1)
    return None


def test_a_large_string_array_is_checked_at_once_and_decoded_when_read(tmp_path, string_stepping):
    """A vocabulary-sized string array (gguf.LAZY_STRINGS items or more) is stepped over
    when the file opens and decoded on first use; a cut anywhere in it, or a length
    past the end, is still an error at open, not later."""
    words = [f"w{i}é" for i in range(LAZY_STRINGS + 3)]
    payload = struct.pack("<IQ", 8, len(words)) + b"".join(_string(w) for w in words)
    blob = _gguf_bytes(kvs=[("t.words", 9, payload), ("t.after", 4, struct.pack("<I", 7))])
    path = tmp_path / "words.gguf"
    path.write_bytes(blob)
    g = GGUFFile(path)
    if string_stepping is not None:  # the kernel ran and found the end
        assert string_stepping and all(end > 0 for end in string_stepping)
    lazy = g.metadata["t.words"]
    assert isinstance(lazy, LazyStrings) and len(lazy) == len(words) and lazy._items is None
    assert bytes(lazy.raw) == b"".join(_string(w) for w in words)
    assert g.metadata["t.after"] == 7  # the value after it was read from the right place
    assert lazy[5] == words[5] and list(lazy) == words and lazy == words
    cut = blob.index(_string(words[-2]))
    assert "truncated" in _error(tmp_path, blob[:cut + 3])
    assert "truncated" in _error(tmp_path, blob[:cut + 10])
    for length in (len(blob), 2**63 + 1):  # past the end; negative as a signed 64-bit number
        bad = blob[:cut] + struct.pack("<Q", length) + blob[cut + 8:]
        assert "truncated" in _error(tmp_path, bad)

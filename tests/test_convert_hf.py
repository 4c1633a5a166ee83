"""Hugging Face checkpoints -> GGUF -> bundle: logits and token ids against
transformers and llama.cpp, folders and zips (Deflate64 too) giving the same
bundle, one-line errors for bad inputs, and the safetensors reader fuzzed."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import TEXTS, make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp_tokenizer import llama
from llamazip.builder.hf_convert import convert_checkpoint
from llamazip.builder.model_input import FolderSource, ZipSource, prepared_model
from llamazip.builder.safetensors_reader import SafetensorsError, SafetensorsFile, SafetensorsStream
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.tokenizer import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The quick brown fox jumps over the lazy dog, 12345 times."
# Largest |ours - transformers| over the positions' logits, as a fraction of the
# largest |logit|: float32 weights differ only in summation order (measured
# ~1e-6); F16 and Q8_0 also round each weight (measured ~1e-3 and ~2.4e-2, while
# transformers runs the original weights; Gemma's are BF16, exact in F16).
TOLERANCE = {"keep": 1e-4, "f16": 5e-3, "q8_0": 5e-2}
CHECKPOINTS = {
    # Llama 3.1-style RoPE scaling (a rope_freqs tensor), in float32
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    # sharded, with model.safetensors.index.json
    "qwen2": dict(max_shard_size="60KB"),
    # bfloat16 weights; 7 layers, sliding window 4: local and global layers
    "gemma3": dict(dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_checkpoint(root / arch, arch, **kw) for arch, kw in CHECKPOINTS.items()}


def convert(folder: Path, scheme: str = "keep") -> Path:
    dst = folder.parent / f"{folder.name}-{scheme}.gguf"
    if not dst.exists():
        convert_checkpoint(FolderSource(folder), dst, scheme)
    return dst


def reference_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def our_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits at every position: the prompt's first half in one batch, then one token at a time."""
    model = Model(GGUFFile(path), n_ctx=64)
    half = len(ids) // 2
    rows = [None] * (half - 1) + [model.forward(np.array(ids[:half]), 0)]
    rows += [model.forward(np.array([t]), i) for i, t in enumerate(ids[half:], start=half)]
    return np.array(rows[half - 1:])


@pytest.mark.parametrize("scheme", ["keep", "f16", "q8_0"])
@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_logits_match_transformers(checkpoints, arch, scheme):
    folder = checkpoints[arch]
    ids = AutoTokenizer.from_pretrained(folder).encode(PROMPT)
    assert len(ids) > 8  # longer than Gemma's sliding window
    expected = reference_logits(folder, ids)[len(ids) // 2 - 1:]
    got = our_logits(convert(folder, scheme), ids)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < TOLERANCE[scheme], f"relative logit error {error:.2e}"


def test_stored_layout(checkpoints):
    """What the converter changes: gemma's norms +1, llama's rope_freqs, types kept."""
    gemma = GGUFFile(convert(checkpoints["gemma3"]))
    assert gemma.tensors["blk.0.attn_q.weight"].ggml_type.name == "BF16"
    assert gemma.tensors["blk.0.attn_norm.weight"].ggml_type.name == "F32"
    hf = AutoModelForCausalLM.from_pretrained(checkpoints["gemma3"], dtype=torch.float32)
    norm = hf.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(gemma.tensor_data("blk.0.attn_norm.weight").view(np.float32)[0], norm + 1)
    assert "output.weight" not in gemma.tensors  # tied
    llama_gguf = GGUFFile(convert(checkpoints["llama"]))
    factors = llama_gguf.tensor_data("rope_freqs.weight").view(np.float32)[0]
    assert factors[0] == 1.0 and factors[-1] == 8.0


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_tokenizer_matches_hf_and_llama_cpp(checkpoints, arch):
    folder = checkpoints[arch]
    path = convert(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_metadata(GGUFFile(path).metadata)
    reference = llama(path)
    for text in TEXTS:
        expected = hf.encode(text)
        assert ours.encode(text, add_special=True, parse_special=True) == expected, repr(text)
        assert reference.tokenize(text.encode(), add_bos=True, special=True) == expected, repr(text)
    assert ours.eos_id == hf.eos_token_id
    if hf.bos_token_id is not None:  # Qwen2 has none (and adds none)
        assert ours.bos_id == hf.bos_token_id


def test_chat_template_and_special_ids(checkpoints):
    metadata = GGUFFile(convert(checkpoints["qwen2"])).metadata
    hf = AutoTokenizer.from_pretrained(checkpoints["qwen2"])
    assert metadata["tokenizer.chat_template"] == hf.chat_template
    assert metadata["tokenizer.ggml.pre"] == "qwen2"
    assert metadata["tokenizer.ggml.eos_token_id"] == hf.convert_tokens_to_ids("<|im_end|>")
    assert metadata["tokenizer.ggml.add_bos_token"] is False or metadata["tokenizer.ggml.add_bos_token"] == 0
    assert GGUFFile(convert(checkpoints["llama"])).metadata["tokenizer.ggml.pre"] == "llama-bpe"
    assert GGUFFile(convert(checkpoints["gemma3"])).metadata["tokenizer.ggml.model"] == "llama"


def _large_checkpoint(tokenizer_from: Path, folder: Path) -> Path:
    """A llama checkpoint of ~250 MB of float32 (random weights, written with safetensors)."""
    from safetensors.numpy import save_file

    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    config = json.loads((tokenizer_from / "config.json").read_text())
    dim, n_ff, n_layer = 1024, 2048, 6
    config.update(hidden_size=dim, intermediate_size=n_ff, num_hidden_layers=n_layer, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((config["vocab_size"], dim), np.float32),
               "lm_head.weight": rng.standard_normal((config["vocab_size"], dim), np.float32),
               "model.norm.weight": np.ones(dim, np.float32)}
    for i in range(n_layer):
        shapes = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (dim, dim), "self_attn.v_proj": (dim, dim),
                  "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (n_ff, dim), "mlp.up_proj": (n_ff, dim),
                  "mlp.down_proj": (dim, n_ff)}
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = rng.standard_normal(shape, np.float32)
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{name}.weight"] = np.ones(dim, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_converting_does_not_load_the_model_whole(checkpoints, tmp_path):
    """Peak memory while converting stays far below the checkpoint's size, from a
    folder (memory-mapped) and from a zip (streamed)."""
    folder = _large_checkpoint(checkpoints["llama"], tmp_path / "large")
    size = (folder / "model.safetensors").stat().st_size
    archive = zip_folder(folder, tmp_path / "large.zip", zipfile.ZIP_STORED)
    # VmHWM: this process's peak resident memory (ru_maxrss would count the parent's, kept across exec)
    script = """
import re, sys, zipfile
from pathlib import Path
from llamazip.builder.hf_convert import convert_checkpoint
from llamazip.builder.model_input import FolderSource, ZipSource, prepared_model
model, scheme = Path(sys.argv[1]), sys.argv[2]
if model.suffix == ".zip":
    with zipfile.ZipFile(model) as zf:
        convert_checkpoint(ZipSource(model, zf, "large/"), Path(sys.argv[3]), scheme)
else:
    convert_checkpoint(FolderSource(model), Path(sys.argv[3]), scheme)
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024)
"""
    for model, scheme in ((folder, "keep"), (folder, "q8_0"), (archive, "keep")):
        out = tmp_path / f"{model.suffix or 'folder'}-{scheme}.gguf"
        result = subprocess.run([sys.executable, "-c", script, str(model), scheme, str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        peak = int(result.stdout.split()[-1])
        assert peak < size / 2, f"{model.name} {scheme}: peak RSS {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
        assert GGUFFile(out).tensors["blk.5.ffn_down.weight"].shape == (1024, 2048)


# --- the CLI: folders and zips, errors -------------------------------------------------

def llamazip_build(model: Path, out: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamazip", "build", "-m", str(model), "-o", str(out), "--no-deps",
                           *map(str, args)], capture_output=True, text=True, timeout=300)


def zip_folder(folder: Path, dst: Path, compression: int) -> Path:
    with zipfile.ZipFile(dst, "w", compression) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{folder.name}/{path.name}")
    return dst


def deflate64_zip(folder: Path, dst: Path) -> Path:
    """A zip whose members are Deflate64 (method 9), compressed with inflate64 and
    laid out by hand: zipfile cannot write that method."""
    import inflate64

    out, central = io.BytesIO(), io.BytesIO()
    paths = sorted(folder.iterdir())
    for path in paths:
        data = path.read_bytes()
        deflater = inflate64.Deflater()
        packed = deflater.deflate(data) + deflater.flush()
        name = f"{folder.name}/{path.name}".encode()
        crc = zipfile.crc32(data)
        offset = out.tell()
        out.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 9, 0, 0x21, crc, len(packed), len(data),
                              len(name), 0) + name + packed)
        central.write(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 9, 0, 0x21, crc, len(packed), len(data),
                                  len(name), 0, 0, 0, 0, 0, offset) + name)
    cd = central.getvalue()
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(paths), len(paths), len(cd), out.tell(), 0)
    dst.write_bytes(out.getvalue() + cd + end)
    return dst


def test_folder_zip_and_deflate64_zip_give_the_same_bundle(checkpoints, tmp_path):
    folder = checkpoints["qwen2"]  # sharded
    (tmp_path / "zip").mkdir()
    (tmp_path / "d64").mkdir()
    inputs = {"folder": folder,
              "zip": zip_folder(folder, tmp_path / "zip" / "qwen2.zip", zipfile.ZIP_DEFLATED),
              "deflate64": deflate64_zip(folder, tmp_path / "d64" / "qwen2.zip")}
    with zipfile.ZipFile(inputs["deflate64"]) as zf:
        assert {i.compress_type for i in zf.infolist()} == {9}
    bundles = {}
    for kind, model in inputs.items():
        out = tmp_path / f"{kind}.llamazip"
        result = llamazip_build(model, out, "-q", "q8_0")
        assert result.returncode == 0, result.stderr
        bundles[kind] = out.read_bytes()
    assert bundles["folder"] == bundles["zip"] == bundles["deflate64"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with zipfile.ZipFile(tmp_path / "folder.llamazip") as zf:
        assert "qwen2.gguf" in zf.namelist()


def test_zip_with_the_model_at_its_root(checkpoints, tmp_path):
    folder = checkpoints["gemma3"]
    archive = tmp_path / "gemma3.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    (tmp_path / "out").mkdir()
    with prepared_model(archive, tmp_path / "out" / "x.llamazip", log=lambda _: None) as converted:
        assert converted.name == "gemma3.gguf"
        assert converted.read_bytes() == convert(folder).read_bytes()
    assert list((tmp_path / "out").iterdir()) == []  # the temporary folder is gone


def test_a_bundle_rebuilds_from_its_model(checkpoints, tmp_path):
    first, second = tmp_path / "first.llamazip", tmp_path / "second.llamazip"
    assert llamazip_build(checkpoints["llama"], first).returncode == 0
    result = llamazip_build(first, second)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(first) as a, zipfile.ZipFile(second) as b:
        assert a.read("llama.gguf") == b.read("llama.gguf")


def _assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("error")] == [lines[-1]]
    for word in words:
        assert word in lines[-1], lines[-1]


def _broken_inputs(folder: Path, root: Path) -> dict[str, tuple[Path, str]]:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(folder, root / name))

    truncated = copy("truncated")
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    no_config = copy("no-config")
    (no_config / "config.json").unlink()
    unsupported = copy("unsupported")
    config = json.loads((unsupported / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (unsupported / "config.json").write_text(json.dumps(config))
    no_model = root / "no-model.zip"
    with zipfile.ZipFile(no_model, "w") as zf:
        zf.writestr("readme.txt", "no model here")
    return {"truncated": (truncated, "truncated"), "no-config": (no_config, "config.json"),
            "unsupported": (unsupported, "GPTNeoXForCausalLM"), "no-model": (no_model, "no model")}


@pytest.mark.parametrize("case", ["truncated", "no-config", "unsupported", "no-model"])
def test_bad_inputs_give_one_line_errors_and_no_output(checkpoints, tmp_path, case):
    model, words = _broken_inputs(checkpoints["llama"], tmp_path)[case]
    out = tmp_path / "out" / "model.llamazip"
    out.parent.mkdir()
    _assert_one_line_error(llamazip_build(model, out), words)
    assert not out.exists()
    out.write_bytes(b"previous bundle")  # an earlier output survives a failed build
    _assert_one_line_error(llamazip_build(model, out), words)
    assert out.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.llamazip"]


def test_truncated_zip_member_is_a_clean_error(checkpoints, tmp_path):
    archive = zip_folder(checkpoints["llama"], tmp_path / "llama.zip", zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(archive) as zf:
        source = ZipSource(archive, zf, "llama/")
        shard = source.open_shard("model.safetensors")
        entries = list(shard.iter_tensors())
        assert len(entries) == len(shard.entries)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("llama/model.safetensors")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle:middle + 64] = bytes(64)  # corrupt the compressed stream
    archive.write_bytes(bytes(data))
    _assert_one_line_error(llamazip_build(archive, tmp_path / "out.llamazip"))
    assert not (tmp_path / "out.llamazip").exists()


# --- the safetensors reader, fuzzed ---------------------------------------------------

def _valid_file(tensors: dict[str, np.ndarray]) -> bytes:
    header, data = {}, b""
    for name, array in tensors.items():
        raw = array.tobytes()
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[array.dtype.name],
                        "shape": list(array.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


SEED_FILE = _valid_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)})


def _read_both(data: bytes, tmp: Path) -> None:
    """Parse `data` as a file and as a stream; only SafetensorsError may come out."""
    path = tmp / "x.safetensors"
    path.write_bytes(data)
    for reader in (lambda: SafetensorsFile(path), lambda: SafetensorsStream(io.BytesIO(data), len(data), "x")):
        try:
            shard = reader()
            for entry, array in shard.iter_tensors():
                assert array.nbytes == entry.nbytes
        except SafetensorsError:
            pass


def _with_length(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def _mutations() -> st.SearchStrategy[bytes]:
    def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
        buf = bytearray(data)
        for pos, value in edits:
            buf[pos % len(buf)] = value
        return bytes(buf[:cut]) if cut is not None else bytes(buf)

    header_claims = st.integers(0, 2 ** 64 - 1).map(lambda n: n.to_bytes(8, "little") + SEED_FILE[8:])
    scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.text(max_size=8)
    json_bodies = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
    crafted = st.builds(lambda h, tail: _with_length(h) + tail,
                        json_bodies.map(lambda v: json.dumps({"t": v} if not isinstance(v, dict) else v).encode()),
                        st.binary(max_size=64))
    entries = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "F64", "X"]),
                                     "shape": st.lists(st.integers(-1, 2 ** 62), max_size=4),
                                     "data_offsets": st.lists(st.integers(-1, 2 ** 63), min_size=0, max_size=3)})
    headers = st.builds(lambda e, tail: _with_length(json.dumps({"w": e}).encode()) + tail,
                        entries, st.binary(max_size=128))
    mutated = st.builds(mutate, st.just(SEED_FILE), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)),
                                                               max_size=6), st.none() | st.integers(0, len(SEED_FILE)))
    return st.one_of(st.binary(max_size=64), header_claims, crafted, headers, mutated)


def _fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_fuzz(300)
@given(data=_mutations())
def test_safetensors_reader_fails_cleanly(tmp_path, data):
    _read_both(data, tmp_path)


@pytest.mark.slow
@_fuzz(10_000)
@given(data=_mutations())
def test_safetensors_reader_fails_cleanly_long(tmp_path, data):
    _read_both(data, tmp_path)


def test_huge_claims_do_not_allocate(tmp_path):
    big = {"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 20], "data_offsets": [0, 2 ** 62]}}
    text = json.dumps(big).encode()
    for data in ((2 ** 63).to_bytes(8, "little") + b"{}", len(text).to_bytes(8, "little") + text):
        with pytest.raises(SafetensorsError):
            SafetensorsStream(io.BytesIO(data), len(data), "x")
        (tmp_path / "x").write_bytes(data)
        with pytest.raises(SafetensorsError):
            SafetensorsFile(tmp_path / "x")

"""--quantize: our bytes against ggml's own reference quantizers (called in
llama-cpp-python's libggml-base), the per-tensor type rules, re-quantizing a
GGUF, and quantized models run by llama.cpp and by our runtime."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from hf_tiny import make_checkpoint
from llamazip.builder import aqlm_import, aqlm_quantize, gguf_rewrite, requantize
from llamazip.builder.hf_convert import convert_checkpoint
from llamazip.builder.model_input import FolderSource
from llamazip.builder.quantize import quantize, target_type
from llamazip.builder.requantize import requantize_gguf
from llamazip.runtime.ggml_types import BLOCK_GEOMETRY, GGMLType
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.model_file import open_model
from llamazip.runtime.tokenizer import Tokenizer

_GGML = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
REFERENCE_FUNCTIONS = {
    GGMLType.Q8_0: "quantize_row_q8_0_ref", GGMLType.Q4_0: "quantize_row_q4_0_ref",
    GGMLType.Q4_1: "quantize_row_q4_1_ref", GGMLType.Q5_0: "quantize_row_q5_0_ref",
    GGMLType.Q4_K: "quantize_row_q4_K_ref", GGMLType.Q6_K: "quantize_row_q6_K_ref",
    GGMLType.BF16: "ggml_fp32_to_bf16_row_ref",
}


def ggml_reference(x: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """ggml's quantize_row_*_ref over the whole array."""
    fn = getattr(_GGML, REFERENCE_FUNCTIONS[ggml_type])
    fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = BLOCK_GEOMETRY[ggml_type]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def awkward_rows(seed: int) -> np.ndarray:
    """Rows that reach the quantizers' corner cases: zeros, constants, one sign,
    outliers, heavy tails, tiny and huge scales, exact ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((48, 512)) * rng.uniform(1e-4, 30, (48, 1))
    x[0] = 0
    x[1, :256], x[1, 256:] = 0.5, -2.0
    x[2, 3] = 1e3
    x[3], x[4] = np.abs(x[3]), -np.abs(x[4])
    x[5, ::3] = 0
    x[6] = rng.standard_t(1.5, 512)
    x[7] = np.round(x[7] * 4) / 4  # many equal values
    x[8, :32] = 1e-30
    x[9] = rng.integers(-8, 8, 512)
    return x.astype(np.float32)


@pytest.mark.parametrize("ggml_type", list(REFERENCE_FUNCTIONS), ids=lambda t: t.name)
def test_bytes_equal_ggml_reference(ggml_type):
    for seed in range(3):
        x = awkward_rows(seed)
        ours = quantize(x, ggml_type)
        np.testing.assert_array_equal(ours.reshape(len(x), -1).view(np.uint8), ggml_reference(x, ggml_type))


def test_type_rules():
    dims = (512, 256)
    assert target_type("blk.0.attn_norm.weight", (256,), GGMLType.BF16, "q4_0") == GGMLType.F32
    assert target_type("blk.0.attn_q.bias", (256,), GGMLType.F32, "q8_0") == GGMLType.F32
    assert target_type("blk.0.attn_q.weight", dims, GGMLType.BF16, "keep") == GGMLType.BF16
    assert target_type("blk.0.attn_q.weight", dims, GGMLType.F64, "keep") == GGMLType.F32
    assert target_type("blk.0.attn_q.weight", dims, GGMLType.F32, "q4_0") == GGMLType.Q4_0
    assert target_type("token_embd.weight", dims, GGMLType.F32, "q4_0") == GGMLType.Q6_K
    assert target_type("output.weight", dims, GGMLType.F32, "q5_0") == GGMLType.Q6_K
    assert target_type("token_embd.weight", dims, GGMLType.F32, "q8_0") == GGMLType.Q8_0
    assert target_type("blk.3.ffn_down.weight", dims, GGMLType.F32, "q4_k") == GGMLType.Q6_K
    assert target_type("blk.3.ffn_up.weight", dims, GGMLType.F32, "q4_k") == GGMLType.Q4_K
    # rows that are not whole blocks fall back
    assert target_type("blk.0.ffn_up.weight", (64, 96), GGMLType.F32, "q4_k") == GGMLType.Q5_0
    assert target_type("blk.0.ffn_up.weight", (64, 96), GGMLType.F32, "q6_k") == GGMLType.Q8_0
    assert target_type("blk.0.ffn_up.weight", (64, 40), GGMLType.F32, "q4_0") == GGMLType.F16
    assert target_type("token_embd.weight", (300, 64), GGMLType.F32, "q4_0") == GGMLType.Q8_0


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """Rows 256 wide, so that every scheme (K-quants too) applies to every matrix."""
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "llama", "llama", dim=256, n_ff=512, seed=3)


def _converted(folder: Path, scheme: str) -> Path:
    dst = folder.parent / f"{folder.name}-{scheme}.gguf"
    if not dst.exists():
        convert_checkpoint(FolderSource(folder), dst, scheme)
    return dst


def _greedy_llama_cpp(path: Path, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == n:
            break
    return tokens, [np.array(llm.scores[len(ids) - 1 + i]) for i in range(n)]


# llama.cpp rounds each matrix product's input to 8 bits (Q8_0 / Q8_K) where we
# keep float32: on these random models its logits differ from ours by up to
# ~5% of the largest logit, so where the two top logits are nearly tied the
# greedy choice may differ. A wrong layout or block would differ by ~100%.
NEAR_TIE = 0.15  # of the largest |logit|
LOGIT_TOLERANCE = 0.1


@pytest.mark.parametrize("scheme", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q6_k"])
def test_llama_cpp_runs_our_quantized_gguf_like_our_runtime(wide_llama, scheme):
    path = _converted(wide_llama, scheme)
    types = {info.ggml_type for info in GGUFFile(path).tensors.values() if len(info.shape) == 2}
    assert GGMLType[scheme.upper()] in types
    ids = Tokenizer.from_metadata(GGUFFile(path).metadata).encode("The quick brown fox", add_special=True)
    n = 10
    expected, reference_logits = _greedy_llama_cpp(path, ids, n)
    # teacher-forced on llama.cpp's tokens: our logits at each step, and our greedy pick
    model = Model(GGUFFile(path), n_ctx=64)
    logits = model.forward(np.array(ids), 0)
    for step, token in enumerate(expected):
        scale = np.abs(reference_logits[step]).max()
        assert np.abs(logits - reference_logits[step]).max() < LOGIT_TOLERANCE * scale, f"step {step}"
        ours = int(np.argmax(logits))
        assert ours == token or logits[ours] - logits[token] < NEAR_TIE * scale, f"step {step}"
        logits = model.forward(np.array([token]), len(ids) + step)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_llama_cpp_runs_other_architectures(tmp_path, arch):
    folder = make_checkpoint(tmp_path / arch, arch, dim=256, n_ff=512)
    path = _converted(folder, "q8_0")
    ids = Tokenizer.from_metadata(GGUFFile(path).metadata).encode("The quick brown fox", add_special=True)
    expected, reference_logits = _greedy_llama_cpp(path, ids, 6)
    model = Model(GGUFFile(path), n_ctx=64)
    logits = model.forward(np.array(ids), 0)
    for step, token in enumerate(expected):
        scale = np.abs(reference_logits[step]).max()
        assert np.abs(logits - reference_logits[step]).max() < LOGIT_TOLERANCE * scale, f"step {step}"
        logits = model.forward(np.array([token]), len(ids) + step)


def test_requantizing_a_gguf_equals_converting_straight(wide_llama, tmp_path):
    """F32 GGUF -> q4_k gives the bytes HF -> q4_k gives: dequantizing F32 is exact."""
    requantized = tmp_path / "requantized.gguf"
    requantize_gguf(_converted(wide_llama, "keep"), requantized, "q4_k")
    direct, again = GGUFFile(_converted(wide_llama, "q4_k")), GGUFFile(requantized)
    assert list(direct.tensors) == list(again.tensors)
    for name, info in direct.tensors.items():
        assert again.tensors[name].ggml_type == info.ggml_type, name
        np.testing.assert_array_equal(again.tensor_data(name), direct.tensor_data(name))
    for key, value in direct.metadata.items():
        if key != "general.file_type":
            assert np.array_equal(again.metadata[key], value) if isinstance(value, np.ndarray) \
                else again.metadata[key] == value, key


def test_cli_quantizes_a_gguf(wide_llama, tmp_path):
    out = tmp_path / "q.llamazip"
    result = subprocess.run([sys.executable, "-m", "llamazip", "build", "-m", str(_converted(wide_llama, "keep")),
                             "-o", str(out), "--no-deps", "-q", "q6_k"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    types = {info.ggml_type for info in open_model(out).tensors.values()}
    assert types == {GGMLType.F32, GGMLType.Q6_K}


def test_aqlm_scheme_hands_the_converted_gguf_to_the_aqlm_quantizer(wide_llama, tmp_path, monkeypatch):
    """--quantize aqlm-2x8: the checkpoint is converted as it is, then given to
    builder/aqlm_quantize.py with the calibration text and seed; its output is what gets bundled."""
    import llamazip.builder.aqlm_quantize as aqlm_quantize
    from llamazip.builder.model_input import prepared_model

    calls = []

    def fake_quantize(src, dst, *, calibration_text, seed, finetune_steps):
        calls.append((GGUFFile(src).tensors["blk.0.attn_q.weight"].ggml_type, calibration_text, seed, finetune_steps))
        dst.write_bytes(src.read_bytes())

    monkeypatch.setattr(aqlm_quantize, "quantize_gguf_aqlm", fake_quantize)
    with prepared_model(wide_llama, tmp_path / "x.llamazip", "aqlm-2x8", calibration_text="some text", seed=7,
                        finetune_steps=2, log=lambda _: None) as path:
        assert path.name == "llama.gguf" and path.parent.name == "aqlm"
    assert calls == [(GGMLType.F32, "some text", 7, 2)]
    assert list(tmp_path.iterdir()) == []


def _odd_vocabulary_gguf(path: Path) -> Path:
    """A GGUF whose vocabulary and name hold byte strings that are not valid UTF-8
    (as some SentencePiece vocabularies do), with one linear layer and one norm."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_key_value("general.name", b"caf\xe9", gguf.GGUFValueType.STRING)
    w.add_token_list(["a", b"\xff\xfe", b"\xe2\x96", "\u2581b"])
    w.add_token_scores([0.0, -1.0, -2.0, -3.0])
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _raw_metadata(path: Path) -> dict[str, tuple]:
    """Each field's types and the bytes of its values, read without decoding."""
    fields = gguf.GGUFReader(str(path)).fields.values()
    return {f.name: (list(f.types), [bytes(f.parts[i]) for i in f.data]) for f in fields
            if not f.name.startswith("GGUF.")}


def test_every_gguf_rewrite_copies_metadata_that_is_not_utf8(tmp_path):
    """requantize, the AQLM quantizer and the AQLM importer all write through
    builder/gguf_rewrite.py, which copies strings as bytes."""
    assert requantize.rewrite_gguf is aqlm_quantize.rewrite_gguf is aqlm_import.rewrite_gguf \
        is gguf_rewrite.rewrite_gguf
    src = _odd_vocabulary_gguf(tmp_path / "odd.gguf")
    want = _raw_metadata(src)
    assert want["tokenizer.ggml.tokens"][1][1] == b"\xff\xfe"

    copied = tmp_path / "copied.gguf"
    gguf_rewrite.rewrite_gguf(src, copied)
    assert copied.read_bytes() == src.read_bytes()

    requantize_gguf(src, tmp_path / "q8_0.gguf", "q8_0")
    codes = {"blk.0.attn_q.codes": np.zeros((8, 2, 32), np.int8),
             "blk.0.attn_q.codebooks": np.zeros((2, 256, 8), np.float32),
             "blk.0.attn_q.scales": np.ones(32, np.float32)}
    aqlm_import.write_gguf(src, codes, tmp_path / "imported.gguf")
    aqlm_quantize.quantize_gguf_aqlm(src, tmp_path / "aqlm.gguf", calibration_text=None, seed=0, calibrate=False)
    for name in ("q8_0.gguf", "imported.gguf", "aqlm.gguf"):
        got = _raw_metadata(tmp_path / name)
        assert {key: got[key] for key in want} == want, name
    assert GGUFFile(tmp_path / "q8_0.gguf").tensors["blk.0.attn_q.weight"].ggml_type == GGMLType.Q8_0
    assert "blk.0.attn_q.codes" in GGUFFile(tmp_path / "aqlm.gguf").tensors
    assert not list(tmp_path.glob("*.tmp"))

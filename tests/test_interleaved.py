"""Matrices of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K repacked 16 rows to a vector
(interleaved.py): the products within x's int8 rounding of the dequantized
weights' product, a few rows of x each what the matvec gives that row alone, bit for bit (also just compiled, in a fresh
process), and the model choosing the layout only where it should."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from ggml_weights import quantized
from test_kernels import assert_products_match
from tiny_models import TinyLlama

from llamazip.runtime import interleaved
from llamazip.runtime.generate import process_prompt
from llamazip.runtime.ggml_types import GGMLType
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.weight_matrix import BATCH_ROWS, InterleavedMatrix, interleaves
from llamazip.runtime.weight_types import dequantize

pytestmark = pytest.mark.skipif(not interleaved.AVAILABLE, reason="the interleaved kernels need 512-bit VNNI")

TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K)
# One block; an odd count; Qwen2.5 0.5B's long rows. The K-quants' blocks are of 256.
BLOCK_SHAPES = ((16, 32), (48, 96), (64, 640), (32, 4864))
SUPER_BLOCK_SHAPES = ((16, 256), (48, 768), (64, 2560), (32, 4864))


def shapes(ggml_type: GGMLType) -> tuple[tuple[int, int], ...]:
    return SUPER_BLOCK_SHAPES if ggml_type in (GGMLType.Q4_K, GGMLType.Q6_K) else BLOCK_SHAPES


@pytest.mark.parametrize("shape", range(4), ids=lambda i: f"shape{i}")
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_products_within_the_rounding_of_x(ggml_type, shape):
    rows, ncols = shapes(ggml_type)[shape]
    raw = quantized(ggml_type, rows, ncols)
    matrix = InterleavedMatrix(raw, ggml_type, ncols)
    assert_products_match(matrix, dequantize(raw, ggml_type, ncols))


def batched_and_alone(ggml_type: GGMLType, shape: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    rows, ncols = shape
    packed = interleaved.repack(quantized(ggml_type, rows, ncols, seed=n), ggml_type)
    x = np.random.default_rng(n).standard_normal((n, ncols), dtype=np.float32)
    batched = np.empty((n, rows), np.float32)
    interleaved.matmul(*packed, x, batched)
    alone = np.empty((n, rows), np.float32)
    for i in range(n):
        interleaved.matvec(*packed, x[i], alone[i])
    return batched, alone


@pytest.mark.parametrize("n", (2, 3, 4, 5, 8, BATCH_ROWS))
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_rows_as_the_matvec_gives_them(ggml_type, n):
    for shape in shapes(ggml_type):
        batched, alone = batched_and_alone(ggml_type, shape, n)
        np.testing.assert_array_equal(batched, alone)


IDENTITY_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_interleaved import TYPES, batched_and_alone, shapes
differ = [f"{t.name}-{s}-{n}" for t in TYPES for s in shapes(t) for n in (2, 4, 7, 16)
          if not np.array_equal(*batched_and_alone(t, s, n))]
print("differ:", differ)
"""


def test_rows_as_the_matvec_gives_them_just_compiled(tmp_path):
    """An empty numba cache: both kernels compiled in the same process."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", IDENTITY_SCRIPT, tests_dir], cwd=tests_dir, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "differ: []"


@pytest.mark.parametrize(("ggml_type", "minimum"), ((GGMLType.Q4_0, -8), (GGMLType.Q5_0, -16)))
def test_a_type_without_minimums_gets_its_implied_one(ggml_type, minimum):
    raw = quantized(ggml_type, 16, 64)
    nibbles, scales, minimums = interleaved.repack(raw, ggml_type)
    d = scales.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(minimums.view(np.float16).astype(np.float32), minimum * d)


def test_fifth_bits_transposed_for_a_shift_and_a_mask():
    """Weight 4k + j's fifth bit lands at lane bit 8j + k, every one of the 32."""
    for i in range(32):
        k, j = divmod(i, 4)
        assert interleaved._fifth_bits_transposed(np.uint32(1 << i)) == 1 << (8 * j + k)
    rng = np.random.default_rng(0)
    for bits in rng.integers(0, 1 << 32, 20, dtype=np.uint64):
        expected = sum(1 << (8 * (i % 4) + i // 4) for i in range(32) if int(bits) >> i & 1)
        assert interleaved._fifth_bits_transposed(np.uint32(bits)) == expected


def test_q8_0_extremes():
    """Weights -128 and 127 (plus 128: 0 and 255) against x at +-127: the sums start
    from -128 times x's block sum, exact in int32."""
    raw = quantized(GGMLType.Q8_0, 16, 64)
    quants = raw.reshape(16, 2, 34)[:, :, 2:].view(np.int8)
    quants[:8] = -128
    quants[8:] = 127
    matrix = InterleavedMatrix(raw, GGMLType.Q8_0, 64)
    assert_products_match(matrix, dequantize(raw, GGMLType.Q8_0, 64))


def test_rows_in_groups_of_16_only():
    with pytest.raises(ValueError, match="groups of 16"):
        interleaved.repack(quantized(GGMLType.Q4_1, 24, 32), GGMLType.Q4_1)
    assert interleaves(GGMLType.Q4_1, 32) and not interleaves(GGMLType.Q4_1, 24)
    assert interleaves(GGMLType.Q6_K, 32) and not interleaves(GGMLType.Q5_K, 32)


def test_which_types_decode_from_a_copy(monkeypatch):
    monkeypatch.delenv(interleaved.SWITCH, raising=False)
    assert interleaved.last_level_cache_bytes() > 0 and interleaved.available_memory_bytes() > 0  # Linux reports them
    monkeypatch.setattr(interleaved, "last_level_cache_bytes", lambda: 32 << 20)
    monkeypatch.setattr(interleaved, "available_memory_bytes", lambda: 16 << 30)
    plain = interleaved.TYPES - {GGMLType.Q4_K, GGMLType.Q6_K}
    assert interleaved.repacked_types(32 << 20) == interleaved.TYPES  # in the cache: every type
    # Past it, one stream: the plain block types while the copy is at most 1/16 of the memory available.
    assert interleaved.repacked_types((32 << 20) + 1) == interleaved.repacked_types(1 << 30) == plain
    assert not interleaved.repacked_types((1 << 30) + 1)
    # Serving several streams: all but Q4_K while the copy is at most a quarter of it.
    assert interleaved.repacked_types((1 << 30) + 1, batched=True) == interleaved.TYPES - {GGMLType.Q4_K}
    assert interleaved.repacked_types(4 << 30, batched=True) == interleaved.TYPES - {GGMLType.Q4_K}
    assert not interleaved.repacked_types((4 << 30) + 1, batched=True)
    monkeypatch.setenv(interleaved.SWITCH, "0")
    assert not interleaved.repacked_types(1)
    monkeypatch.setenv(interleaved.SWITCH, "1")
    assert interleaved.repacked_types(1 << 50) == interleaved.TYPES


def test_the_model_decodes_from_the_copy_only_when_asked(tmp_path, monkeypatch):
    path = TinyLlama(weight_type=gguf.GGMLQuantizationType.Q4_1).write(tmp_path / "tiny.gguf")
    monkeypatch.setenv(interleaved.SWITCH, "1")
    model = Model(GGUFFile(path))
    assert all(isinstance(m, InterleavedMatrix) for layer in model.layers for m in (layer.wq, layer.w_down))
    tokens = np.array([1, 5, 9, 3])
    logits = model.forward(tokens, 0)
    monkeypatch.setenv(interleaved.SWITCH, "0")
    plain = Model(GGUFFile(path))
    assert not any(isinstance(m, InterleavedMatrix) for layer in plain.layers for m in (layer.wq, layer.w_down))
    # A prompt is multiplied in float32 or int8_gemm from the GGML bytes either way: the same logits.
    np.testing.assert_array_equal(plain.forward(tokens, 0), logits)


@pytest.mark.parametrize("prompt_tokens", ([7], [1, 5, 9, 3]))
def test_a_prompt_never_waits_for_the_copy(tmp_path, monkeypatch, prompt_tokens):
    """A prompt (one token too) reads the GGML bytes: the copy is made at the first decode step."""
    path = TinyLlama(weight_type=gguf.GGMLQuantizationType.Q8_0).write(tmp_path / "tiny.gguf")
    monkeypatch.setenv(interleaved.SWITCH, "1")
    model = Model(GGUFFile(path))
    matrices = [m for layer in model.layers for m in (layer.wq, layer.w_gate, layer.w_down)]
    assert all(isinstance(m, InterleavedMatrix) for m in matrices)
    process_prompt(model, prompt_tokens)
    assert all(m._packed is None for m in matrices)
    model.forward(np.array([2]), len(prompt_tokens))
    assert all(m._packed is not None for m in matrices)


def test_a_server_makes_the_copies_while_loading(tmp_path, monkeypatch):
    path = TinyLlama(weight_type=gguf.GGMLQuantizationType.Q5_0).write(tmp_path / "tiny.gguf")
    monkeypatch.setenv(interleaved.SWITCH, "1")
    model = Model(GGUFFile(path), n_slots=2)
    matrices = [m for layer in model.layers for m in (layer.wq, layer.w_gate, layer.w_down)]
    assert all(isinstance(m, InterleavedMatrix) and m._packed is None for m in matrices)
    model.make_decoding_copies()
    assert all(m._packed is not None for m in matrices)

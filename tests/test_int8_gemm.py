"""The prompt's integer product (int8_gemm.py) against every weight type with an int8
matvec: x is rounded to int8 as the matvec rounds it, and what that leaves to int8
again, so each row is within a 254th of the matvec's rounding of the dequantized
weights' product in float64, and far nearer it than the matvec."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ggml_weights import quantized
from test_kernels import HASWELL_FEATURES, gguf_rounded_x

from llamazip.runtime import int8_gemm, int8_matvec
from llamazip.runtime.ggml_types import BLOCK_GEOMETRY
from llamazip.runtime.weight_matrix import QuantMatrix, RoundedRows
from llamazip.runtime.weight_types import WEIGHT_TYPES, dequantize

pytestmark = pytest.mark.skipif(not int8_gemm.AVAILABLE, reason="the prompt's int8 product needs 512-bit VNNI")

INT8_TYPES = sorted(t for t, row in WEIGHT_TYPES.items() if row.int8_matvec is not None)
BLOCKS = {32: (1, 3, 28), 256: (1, 3)}
CASES = [(t, BLOCK_GEOMETRY[t][0] * nb) for t in INT8_TYPES for nb in BLOCKS[BLOCK_GEOMETRY[t][0]]]
TOKENS = (2, 5, 17, 64)
ROWS = 37  # a whole tile (int8_gemm.TILE_ROWS) and a part of one


def case_id(case) -> str:
    return f"{case[0].name}-{case[1]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rows_as_the_matvec_gives_them(case):
    ggml_type, ncols = case
    raw = quantized(ggml_type, ROWS, ncols, seed=3)
    raw.flags.writeable = False
    matrix = QuantMatrix(raw, ggml_type, ncols)
    w = dequantize(raw, ggml_type, ncols)
    rng = np.random.default_rng(5)
    for tokens in TOKENS:
        x = rng.standard_normal((tokens, ncols), dtype=np.float32) * rng.uniform(0.1, 10, (tokens, 1)).astype(np.float32)
        out = matrix.prompt_matmul(x)
        assert out.shape == (tokens, ROWS) and out.flags.c_contiguous
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        for t in range(tokens):
            # half of a 254th of a rounding step per element, and float32 sums
            steps = gguf_rounded_x(x[t])[1]
            bound = np.abs(w.astype(np.float64)) @ (0.5 * steps / int8_gemm.REMAINDER_STEPS + 2e-6 * np.abs(x[t]))
            assert np.max(np.abs(out[t] - exact[t]) / (bound + 1e-30)) <= 1.0
            matvec_error = np.abs(matrix.matvec(x[t]) - exact[t]).max()
            assert np.abs(out[t] - exact[t]).max() < 0.05 * matvec_error


def test_rows_are_rounded_as_quantize_x_rounds_one_then_the_remainder():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((7, 320)) * rng.uniform(0, 5, (7, 1))).astype(np.float32)
    x[1] = 0  # a zero scale
    x[2, :32] = 2.5  # halves: rounded to even, as np.rint
    xq, xd, xs16, xs32 = int8_gemm.quantize_rows(x)
    assert xq.shape[0] % int8_gemm.X_ROWS == 0 and xq.shape[0] >= 7 and xq.shape[1] == 2 * 320
    steps = int8_gemm.REMAINDER_STEPS
    for t in range(7):
        q, scales, _ = int8_matvec.quantize_x(x[t])
        np.testing.assert_array_equal(xq[t, :320], q)
        np.testing.assert_array_equal(xd[t], scales)
        both = (q + xq[t, 320:] / steps) * np.repeat(scales, 32)
        assert np.all(np.abs(both - x[t]) <= np.repeat(scales, 32) * (0.5 / steps + 1e-6))
        sums16 = both.reshape(-1, 16).sum(axis=1)
        np.testing.assert_allclose(xs16[t], sums16, rtol=1e-5, atol=1e-6 * np.abs(x[t]).max())
        np.testing.assert_allclose(xs32[t], sums16[0::2] + sums16[1::2], rtol=1e-5, atol=1e-6 * np.abs(x[t]).max())
    assert not xq[7:].any() and not xd[7:].any() and not xs16[7:].any()  # the padding adds nothing


def test_in_float_when_asked_and_rounding_shared_per_array():
    ggml_type, ncols = INT8_TYPES[0], 640
    raw = quantized(ggml_type, ROWS, ncols)
    matrix = QuantMatrix(raw, ggml_type, ncols)
    x = np.random.default_rng(7).standard_normal((20, ncols), dtype=np.float32)
    float_kernel = np.empty_like(matrix.prompt_matmul(x))
    matrix.weight_type.matmul(*matrix.weight_type.views(raw), x, float_kernel)
    np.testing.assert_array_equal(matrix.prompt_matmul(x, in_float=True), float_kernel)

    rounded = RoundedRows()
    first = rounded.of(x)
    assert rounded.of(x) is first
    other = x.copy()
    assert rounded.of(other) is not first
    np.testing.assert_array_equal(rounded.of(other)[0], first[0])


def test_prompts_stay_in_float_on_a_cpu_without_512_bit_vnni():
    script = ("from llamazip.runtime import int8_gemm\nfrom llamazip.runtime.weight_types import WEIGHT_TYPES\n"
              "print(int8_gemm.AVAILABLE, [t.name for t, row in WEIGHT_TYPES.items() if row.prompt_gemm()])")
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "[]"]


@pytest.mark.parametrize("rows,cols", [(37, 256), (130, 576)])
def test_aqlm_prompts_round_the_weights_as_q8_0_then_multiply_as_precisely(rows, cols):
    """AQLM's prompt product: each row dequantized, rounded to int8 per block of 32
    (Q8_0's rule), then int8_gemm's product; the float path stays exact."""
    from test_aqlm import dense, random_matrix
    m = random_matrix(rows, cols, seed=rows)
    w = dense(m).astype(np.float32)
    blocks = w.reshape(rows, -1, 32)
    steps = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)  # in float32, as the kernel rounds
    inverse = np.float32(1) / np.where(steps > 0, steps, np.float32(1))
    w_rounded = (np.rint(blocks * inverse).astype(np.float64) * steps).reshape(rows, cols)
    w = w.astype(np.float64)
    x = np.random.default_rng(4).standard_normal((20, cols), dtype=np.float32)
    out = m.prompt_matmul(x)
    assert out.shape == (20, rows) and out.flags.c_contiguous
    for t in range(20):
        x_steps = gguf_rounded_x(x[t])[1]
        bound = np.abs(w_rounded) @ (0.5 * x_steps / int8_gemm.REMAINDER_STEPS + 2e-6 * np.abs(x[t]))
        assert np.max(np.abs(out[t] - w_rounded @ x[t]) / (bound + 1e-30)) <= 1.0
    in_float = m.prompt_matmul(x, in_float=True)
    np.testing.assert_allclose(in_float, x @ w.T, rtol=0, atol=1e-5 * np.sqrt(cols) * np.abs(w).max())

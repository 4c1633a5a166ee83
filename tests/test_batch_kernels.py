"""The batched int8 product (int8_batch.py): 2-16 rows of x against every weight
type that has an int8 matvec. Each row must be what the int8 matvec gives for
that row alone, bit for bit (here, whether the kernels come from numba's cache
or not, and in fresh processes, on this CPU and compiled for an AVX2 CPU),
and, as a product, within the rounding of x of the dequantized weights' product
(numpy, float64), as the matvec is (test_kernels.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ggml_weights import quantized
from test_kernels import HASWELL_FEATURES, assert_matvec_close

from llamazip.runtime import int8_matvec
from llamazip.runtime.ggml_types import BLOCK_GEOMETRY
from llamazip.runtime.weight_matrix import BATCH_ROWS, QuantMatrix
from llamazip.runtime.weight_types import WEIGHT_TYPES, dequantize

pytestmark = pytest.mark.skipif(not int8_matvec.AVAILABLE, reason="the int8 kernels need an x86 CPU with AVX2")

INT8_TYPES = sorted(t for t, row in WEIGHT_TYPES.items() if row.int8_matvec is not None)
# One block, an odd count (a pair form's last block on its own) and an even one;
# the 32-weight types also 7 blocks (3 pairs: odd pairs) and 4864 (Qwen2.5 0.5B's rows).
BLOCKS = {32: (1, 3, 7, 20, 152), 256: (1, 3, 4)}
CASES = [(t, BLOCK_GEOMETRY[t][0] * nb) for t in INT8_TYPES for nb in BLOCKS[BLOCK_GEOMETRY[t][0]]]
NS = (2, 3, 4, 8, 16)
ROWS = 37  # more than a task's rows (int8_batch.ROWS_PER_TASK), not a multiple of them


def case_id(case) -> str:
    return f"{case[0].name}-{case[1]}"


def batched_and_matvecs(ggml_type, ncols: int, n: int, seed: int = 0):
    """The batched kernel's (n, ROWS) result on random rows of x, the int8 matvec's
    for each row, the weights (float32) and x."""
    row = WEIGHT_TYPES[ggml_type]
    raw = quantized(ggml_type, ROWS, ncols, seed=seed)
    raw.flags.writeable = False  # as a file map is
    views = row.views(raw)
    x = np.random.default_rng(seed + n).standard_normal((n, ncols), dtype=np.float32)
    batched = np.empty((n, ROWS), np.float32)
    row.int8_matmul(*views, x, batched)
    alone = np.empty((n, ROWS), np.float32)
    for i in range(n):
        row.int8_matvec(*views, x[i], alone[i])
    return batched, alone, dequantize(raw, ggml_type, ncols), x


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rows_as_the_matvec_gives_them(case, n):
    ggml_type, ncols = case
    batched, alone, w, x = batched_and_matvecs(ggml_type, ncols, n)
    matrix = QuantMatrix(quantized(ggml_type, ROWS, ncols), ggml_type, ncols)
    for i in range(n):
        assert_matvec_close(batched[i:i + 1], matrix, w, x[i])
    np.testing.assert_array_equal(batched, alone)


IDENTITY_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_batch_kernels import CASES, NS, batched_and_matvecs
from llamazip.runtime.simd import DOT_FLAVOUR, VNNI_512

print(DOT_FLAVOUR, VNNI_512)
differ = []
for ggml_type, ncols in CASES:
    for n in NS:
        batched, alone, _, _ = batched_and_matvecs(ggml_type, ncols, n)
        if not np.array_equal(batched, alone):
            differ.append(f"{ggml_type.name}-{ncols}-{n}: {np.abs(batched - alone).max()}")
print(len(CASES) * len(NS), "differ:", differ)
"""


def run_identity_script(env: dict) -> list[str]:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", IDENTITY_SCRIPT, tests_dir], env=env, cwd=tests_dir,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")


def test_bit_identical_to_the_matvec(tmp_path):
    """Both kernels just compiled (an empty numba cache), on this CPU."""
    lines = run_identity_script(dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert lines[1] == f"{len(CASES) * len(NS)} differ: []", lines


def test_bit_identical_on_a_cpu_without_vnni(tmp_path):
    """The AVX2 form (vpmaddubsw + vpmaddwd, the two-block pair forms), compiled for Haswell."""
    lines = run_identity_script(dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES,
                                     NUMBA_CACHE_DIR=str(tmp_path)))
    assert lines[0] == "avx2 False"
    assert lines[1] == f"{len(CASES) * len(NS)} differ: []", lines


def test_matmul_routes_a_few_rows_to_the_batched_kernel():
    """QuantMatrix.matmul: 2..BATCH_ROWS rows rounded as the matvec rounds each; more
    rows in float32 (prompts: test_int8_gemm.py)."""
    ggml_type, ncols = INT8_TYPES[0], 640
    raw = quantized(ggml_type, ROWS, ncols)
    matrix = QuantMatrix(raw, ggml_type, ncols)
    x = np.random.default_rng(7).standard_normal((BATCH_ROWS + 1, ncols), dtype=np.float32)
    few = matrix.matmul(x[:BATCH_ROWS])
    for i in range(BATCH_ROWS):
        np.testing.assert_allclose(few[i], matrix.matvec(x[i]), rtol=0, atol=1e-5 * np.abs(few[i]).max())
    many = matrix.matmul(x)  # x not rounded, so nearer the float product than int8 gets
    exact = x.astype(np.float64) @ dequantize(raw, ggml_type, ncols).astype(np.float64).T
    int8_error = np.abs(few - exact[:BATCH_ROWS]).max()
    assert np.abs(many - exact).max() < 0.1 * int8_error

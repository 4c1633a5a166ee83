"""Dequantizers against gguf-py (an implementation we did not write), and every
QuantMatrix product against dequantize(...) in float64, on every path: numba
with the integer matvecs (int8_matvec: x rounded to int8 first, so checked
against the product with x rounded as gguf-py rounds Q8_0, and against the
exact product within that rounding), numba's float kernels, and the numpy
fallback (in this process by switching the module's numba off, and in a fresh
process with LLAMAZIP_NO_NUMBA=1 to check numba never loads).
The rows come from ggml_weights: gguf-py's quantizer, or random K-quant blocks;
and, in test_real_model_tensors, from the real models' files."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import gguf
import numpy as np
import pytest

from ggml_weights import quantized
from models import REAL_MODELS

from llamazip.runtime import int8_matvec, jit
from llamazip.runtime.ggml_types import BLOCK_GEOMETRY, GGMLType
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.weight_matrix import BATCH_ROWS, QuantMatrix
from llamazip.runtime.weight_types import FLOAT_SWITCH, WEIGHT_TYPES, dequantize

TYPES = sorted(WEIGHT_TYPES)
ROWS = (1, 3, 37)
# One and a few blocks, and real models' row widths: 640 and 896 (Gemma 3 270M's
# and Qwen2.5 0.5B's Q5_0/Q8_0 rows), 4864 (Qwen's K-quant rows; Gemma's 1024 and
# 2048 are in test_real_model_tensors).
NCOLS = (32, 96, 256, 640, 896, 4864)
# (type, ncols) for every width that is a whole number of the type's blocks
CASES = [(t, n) for t in TYPES for n in NCOLS if n % BLOCK_GEOMETRY[t][0] == 0]
TOKENS = (1, 5, 17)  # the matvec, the batched int8 product (up to BATCH_ROWS), the prompt matmul


def case_id(case) -> str:
    return f"{case[0].name}-{case[1]}"


def assert_products_close(ours: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """ours ~ x @ w.T in float64; the error allowed scales with |x| @ |w|.T, what
    float32 rounding in a sum of products can reach."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    # einsum, not BLAS: OpenBLAS's threads, beside numba's or a busy core, ran 100x slower
    reference = np.einsum("tk,rk->tr", x64, w64)
    bound = 5e-5 * np.einsum("tk,rk->tr", np.abs(x64), np.abs(w64)) + 1e-30
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    worst = np.max(np.abs(ours - reference) / bound)
    assert worst <= 1.0, f"error {worst:.2f}x the tolerance"


@pytest.fixture(params=["numba", "numba-float", "numpy"])
def backend(request, monkeypatch):
    """Run a test on each path: numba with the integer matvecs where this CPU
    has them, numba's float kernels only, and numpy (numba switched off)."""
    if request.param.startswith("numba"):
        if not jit.numba_enabled():
            pytest.skip("numba is not available here")
        if request.param == "numba-float":
            monkeypatch.setenv(FLOAT_SWITCH, "1")
    else:
        monkeypatch.setattr(jit, "numba", None)
    return request.param


def assert_dequantize_matches_gguf(raw: np.ndarray, ggml_type: GGMLType, ncols: int) -> None:
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(ggml_type)))
    ours = dequantize(raw, ggml_type, ncols)
    assert ours.dtype == np.float32 and ours.shape == (raw.shape[0], ncols)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def gguf_rounded_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x rounded to int8 per block of 32 by gguf-py's Q8_0 quantizer (llama.cpp's
    rule), as float32, and each element's rounding step (its block's scale)."""
    blocks = gguf.quants.quantize(x[None, :], gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    # gguf-py stores the scale as float16; the kernels keep it float32, as computed
    steps = np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127.0)
    return (values * steps[:, None]).reshape(-1), np.repeat(steps, 32)


def assert_matvec_close(ours: np.ndarray, matrix: QuantMatrix, w: np.ndarray, x: np.ndarray) -> None:
    """ours (1, rows) ~ matrix's one-token product with x (ncols,)."""
    if not matrix.rounds_input:
        assert_products_close(ours, w, x[None, :])
        return
    # Integer kernel: the float product of the rounded x, and the exact one
    # within half a rounding step per element.
    rounded, steps = gguf_rounded_x(x)
    assert_products_close(ours, w, rounded[None, :])
    exact = w.astype(np.float64) @ x.astype(np.float64)
    bound = np.abs(w.astype(np.float64)) @ (0.5 * steps + 5e-5 * np.abs(x)).astype(np.float64) + 1e-30
    assert np.max(np.abs(ours[0] - exact) / bound) <= 1.0


def assert_products_match(matrix: QuantMatrix, w: np.ndarray, seed: int = 1) -> None:
    """matmul and matvec of `matrix` against x @ w.T in float64, and rows() against w."""
    rows, ncols = w.shape
    rng = np.random.default_rng(seed)
    for tokens in TOKENS:
        x = rng.standard_normal((tokens, ncols), dtype=np.float32)
        if tokens == 1 or (matrix.rounds_input and tokens <= BATCH_ROWS):
            # a one-row matmul is the matvec; a few rows are rounded as it rounds one
            out = matrix.matmul(x)
            for t in range(tokens):
                assert_matvec_close(out[t:t + 1], matrix, w, x[t])
        else:
            assert_products_close(matrix.matmul(x), w, x)
        assert_matvec_close(matrix.matvec(x[0])[None, :], matrix, w, x[0])
    ids = np.array([rows - 1, 0, rows // 2, rows - 1])
    np.testing.assert_array_equal(matrix.rows(ids), w[ids])


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("rows", ROWS)
def test_dequantize_matches_gguf(case, rows):
    ggml_type, ncols = case
    assert_dequantize_matches_gguf(quantized(ggml_type, rows, ncols), ggml_type, ncols)


def test_dequantize_refuses_unsupported_type_and_bad_rows():
    with pytest.raises(ValueError, match="IQ4_XS"):
        dequantize(np.zeros((1, 136), np.uint8), GGMLType.IQ4_XS, 256)
    with pytest.raises(ValueError, match="34 bytes"):
        dequantize(np.zeros((2, 36), np.uint8), GGMLType.Q8_0, 32)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("rows", ROWS)
def test_products_match_dequantized_reference(backend, case, rows):
    ggml_type, ncols = case
    raw = quantized(ggml_type, rows, ncols)
    raw.flags.writeable = False  # as a file map is
    matrix = QuantMatrix(raw, ggml_type, ncols)
    assert matrix.shape == (rows, ncols) and matrix.ggml_type == ggml_type and matrix.nbytes == raw.nbytes
    assert_products_match(matrix, dequantize(raw, ggml_type, ncols))


@pytest.mark.parametrize("model", ["qwen2.5", "gemma3"])
@pytest.mark.model
def test_real_model_tensors(backend, model):
    """Blocks as llama.cpp quantized them: the first rows of one tensor of each
    (type, width) that the model's matrices use."""
    path = REAL_MODELS[model].path
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make models-all`")
    gguf_file = GGUFFile(path)
    seen = set()
    for info in gguf_file.tensors.values():
        key = (info.ggml_type, info.ncols)
        if len(info.shape) != 2 or key in seen:
            continue
        seen.add(key)
        assert info.ggml_type in WEIGHT_TYPES, f"{info.name} is {info.ggml_type.name}"
        raw = gguf_file.tensor_data(info.name)[:37]
        assert_dequantize_matches_gguf(raw, info.ggml_type, info.ncols)
        assert_products_match(QuantMatrix(raw, info.ggml_type, info.ncols), dequantize(raw, info.ggml_type, info.ncols))
    assert {t for t, _ in seen} == {GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K}


def test_weights_are_used_in_place(backend):
    """Bytes changed after construction show in the products: nothing was copied."""
    raw = quantized(GGMLType.Q4_1, 8, 64)
    matrix = QuantMatrix(raw, GGMLType.Q4_1, 64)
    raw[:] = 0  # every scale and offset 0: every weight 0
    x = np.ones(64, np.float32)
    assert not matrix.matvec(x).any()
    assert not matrix.matmul(np.ones((5, 64), np.float32)).any()


def test_refuses_bad_inputs():
    with pytest.raises(ValueError, match="IQ4_XS"):
        QuantMatrix(np.zeros((1, 136), np.uint8), GGMLType.IQ4_XS, 256)
    with pytest.raises(ValueError, match="20 bytes"):
        QuantMatrix(np.zeros((1, 18), np.uint8), GGMLType.Q4_1, 32)
    matrix = QuantMatrix(quantized(GGMLType.Q8_0, 4, 64), GGMLType.Q8_0, 64)
    with pytest.raises(ValueError, match="ncols = 64"):
        matrix.matvec(np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="ncols = 64"):
        matrix.matmul(np.zeros(64, np.float32))
    with pytest.raises(IndexError):
        matrix.rows(np.array([4]))


@pytest.mark.skipif(not jit.numba_enabled(), reason="numba is not available here")
def test_set_threads_clamps_and_holds_in_other_threads():
    raw = quantized(GGMLType.Q8_0, 37, 96)
    matrix = QuantMatrix(raw, GGMLType.Q8_0, 96)
    x = np.random.default_rng(2).standard_normal(96, dtype=np.float32)
    expected = matrix.matvec(x)
    seen = {}

    def worker():
        matrix.matvec(x)
        seen["threads"] = jit.numba.get_num_threads()

    try:
        for n in (0, 10**6):
            jit.set_threads(n)
            np.testing.assert_array_equal(matrix.matvec(x), expected)
        jit.set_threads(1)
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen["threads"] == 1
    finally:
        jit.set_threads(jit.numba.config.NUMBA_NUM_THREADS)


FALLBACK_SCRIPT = """
import sys
import numpy as np
from llamazip.runtime import jit
from llamazip.runtime.ggml_types import GGMLType
from llamazip.runtime.weight_matrix import QuantMatrix
from llamazip.runtime.weight_types import dequantize

rng = np.random.default_rng(0)
raw = rng.integers(0, 256, (300, 4 * 34), dtype=np.uint8)
raw.reshape(300, 4, 34)[:, :, :2] = np.full((300, 4, 1), 0.01, np.float16).view(np.uint8)
x = rng.standard_normal((3, 128), dtype=np.float32)
matrix = QuantMatrix(raw, GGMLType.Q8_0, 128)
w = dequantize(raw, GGMLType.Q8_0, 128).astype(np.float64)
assert np.allclose(matrix.matvec(x[0]), w @ x[0], rtol=1e-5, atol=1e-5)
assert np.allclose(matrix.matmul(x), x @ w.T, rtol=1e-5, atol=1e-5)
jit.set_threads(1)
print(jit.numba_enabled(), "numba" in sys.modules)
"""


def test_numpy_fallback_never_imports_numba():
    env = dict(os.environ, LLAMAZIP_NO_NUMBA="1")
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.skipif(not int8_matvec.AVAILABLE, reason="the integer matvecs need an x86 CPU with AVX2")
def test_int8_rounding_matches_gguf_q8_0():
    """The kernels' rounding of x is llama.cpp's Q8_0, as gguf-py writes it."""
    x = np.random.default_rng(3).standard_normal(4096, dtype=np.float32) * 5
    x[:32] = 0  # a block of zeros: scale 0, values 0
    values, scales, _ = int8_matvec.quantize_x(x)
    blocks = gguf.quants.quantize(x[None, :], gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    np.testing.assert_array_equal(values, blocks[:, 2:].view(np.int8).reshape(-1))
    np.testing.assert_allclose(scales.astype(np.float16), blocks[:, :2].view(np.float16)[:, 0])


AVX2_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from ggml_weights import quantized
from test_kernels import assert_products_match
from llamazip.runtime.ggml_types import GGMLType
from llamazip.runtime.simd import DOT_FLAVOUR
from llamazip.runtime.weight_matrix import QuantMatrix
from llamazip.runtime.weight_types import WEIGHT_TYPES, dequantize

print(DOT_FLAVOUR)
int8_types = [t for t, row in WEIGHT_TYPES.items() if row.int8_matvec is not None]
for ggml_type in int8_types:
    raw = quantized(ggml_type, 37, 512)
    matrix = QuantMatrix(raw, ggml_type, 512)
    assert matrix.rounds_input
    assert_products_match(matrix, dequantize(raw, ggml_type, 512))
print(len(int8_types))
"""

# Haswell's features: AVX2 and F16C, no AVX-512 or VNNI.
HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+invpcid,"
                    "+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,"
                    "+ssse3,+xsave,+xsaveopt")


@pytest.mark.skipif(not int8_matvec.AVAILABLE, reason="the integer matvecs need an x86 CPU with AVX2")
def test_int8_matvecs_on_a_cpu_without_vnni(tmp_path):
    """The AVX2 form (vpmaddubsw + vpmaddwd), compiled for Haswell in a fresh process."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES,
               NUMBA_CACHE_DIR=str(tmp_path))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", AVX2_SCRIPT, tests_dir], env=env, cwd=tests_dir,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["avx2", "8"]


COMPILE_SCRIPT = """
import numpy as np
from numba import typeof, types
from llamazip.runtime.simd import DOT_FLAVOUR, VNNI_512
from llamazip.runtime.weight_types import WEIGHT_TYPES

print(DOT_FLAVOUR, VNNI_512)
vector = types.Array(types.float32, 1, "C")
compiled = 0
for row in WEIGHT_TYPES.values():
    if row.int8_matvec is not None:
        views = row.views(np.zeros((1, 4096), "u1"))
        arrays = [typeof(v).copy(readonly=True) for v in views]  # file maps are read-only
        row.int8_matvec.compile((*arrays, vector, vector))
        compiled += 1
print(compiled)
"""

# Ice Lake server's features: AVX-512 with VNNI (the 512-bit forms).
ICELAKE_FEATURES = HASWELL_FEATURES + (",+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd,+avx512vnni,"
                                       "+avx512vbmi,+avx512vbmi2,+avx512bitalg,+avx512vpopcntdq,+gfni,+vaes,"
                                       "+vpclmulqdq,+adx,+rdseed,+sha,+clwb,+clflushopt,+prfchw")


@pytest.mark.skipif(not int8_matvec.AVAILABLE, reason="the integer matvecs need an x86 CPU with AVX2")
def test_int8_matvecs_compile_for_avx512_vnni(tmp_path):
    """The VNNI forms (256- and 512-bit vpdpbusd) compile for an AVX-512 VNNI CPU,
    in a fresh process: only compiled, never run, so this holds on any x86 host."""
    env = dict(os.environ, NUMBA_CPU_NAME="icelake-server", NUMBA_CPU_FEATURES=ICELAKE_FEATURES,
               NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["vnni", "True", "8"]


CACHED_KERNEL_SCRIPT = """
import sys
import numpy as np
from llamazip.runtime import token_ops
x = np.linspace(-2, 2, 576, dtype=np.float32)
out = np.empty_like(x)
token_ops.rms_norm_into(x, np.ones_like(x), np.float32(1e-5), out)
expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5)
assert np.allclose(out, expected, rtol=1e-5), (out[:4], expected[:4])
print("refreshed" if "numba.np.linalg" in sys.modules else "not refreshed")
"""


def test_a_cached_kernel_loads_without_the_compiler_refresh(tmp_path):
    """A warm start loads its kernels from numba's cache without importing numba's
    typing and lowering registries (jit._load_cached_kernels_without_refresh); a
    kernel not in the cache still compiles, and both compute the same."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", CACHED_KERNEL_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    assert [run.stdout.strip() for run in runs] == ["refreshed", "not refreshed"]  # compiled, then loaded


def test_a_numba_config_file_in_the_working_folder_changes_nothing(tmp_path):
    """numba reads .numba_config.yaml from the working folder where PyYAML imports
    (the builder's gguf needs it, so it does here); the runtime keeps it out, so
    a folder's file cannot switch the kernels off or retarget them. The runtime
    also leaves numba's extension entry points unread (jit._skip_numba_extensions)."""
    import yaml  # noqa: F401  (present: the test means nothing without it)

    (tmp_path / ".numba_config.yaml").write_text("DISABLE_JIT: 1\nNUM_THREADS: 1\n")
    script = ("from llamazip.runtime import jit; "
              "import numba.core.entrypoints as ep; "
              "print(jit.numba_enabled(), jit.numba.config.NUMBA_NUM_THREADS > 1 or jit.numba.config.NUMBA_NUM_THREADS, "
              "ep._already_initialized)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    enabled, threads, extensions_done = done.stdout.split()
    assert enabled == "True" and extensions_done == "True"
    assert threads == "True" or os.cpu_count() == 1

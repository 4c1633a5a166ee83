"""Matrix x vector and matrix x matrix over GGML weights, used in place.

`QuantMatrix` wraps the uint8 rows of one weight tensor (usually a read-only
view of the memory-mapped file) and multiplies them without ever copying or
converting the bulk bytes: the numba kernels read llama.cpp's blocks where they
lie, and decode the float16 scales with the CPU's own conversion instruction.

Two paths, chosen once at import:
- numba (default): kernels compiled on first use per tensor type and cached
  on disk, parallel over output rows.
- numpy (when `import numba` fails or LLAMAZIP_NO_NUMBA=1): dequantize a few
  rows at a time and multiply with numpy; slower, same results, and numba is
  never imported.

Why the kernels look the way they do (measured on the project's 2-core
AVX-512 machine; see the team's KERNELS.md):
- The block size is read at run time (`qk`), never written as the constant 32:
  with a constant, LLVM unrolls the block and vectorises across blocks with
  gathers, 5-20x slower.
- Rows are sliced before the inner loops, which then index from 0: indices
  LLVM cannot prove non-negative make numba's wraparound checks expensive.
- Q4 blocks are dotted by one hand-built vector expression (`_nibble_dot`),
  the one place where numba's loops left 1.5x on the table.
- One thread pool at a time: these kernels never call BLAS, and the numpy path
  never runs numba, so numba's and OpenBLAS's threads never alternate (which
  costs 7-190x). Code that mixes both should run OpenBLAS single-threaded.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, NamedTuple

import numpy as np

from .dequant import check_raw, dequantize
from .ggml_types import GGMLType


def _load_numba():
    """The numba module, or None when it is switched off or cannot load."""
    if os.environ.get("LLAMAZIP_NO_NUMBA") == "1":
        return None
    try:
        import numba
    except Exception:  # ImportError, or a broken llvmlite/numpy pairing
        return None
    # NUMBA_DISABLE_JIT=1 (a debugging switch) would run the kernels as Python,
    # where the LLVM intrinsics below cannot run.
    return None if numba.config.DISABLE_JIT else numba


_numba = _load_numba()

if _numba is not None:
    from llvmlite import ir
    from numba import prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _jit(parallel: bool = False):
        return _numba.njit(parallel=parallel, fastmath=True, cache=True, nogil=True)

    @intrinsic
    def _f16_to_f32(typingctx, bits):
        """float16 bits (uint16) -> float32; one F16C instruction, vectorisable."""
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def _bf16_to_f32(typingctx, bits):
        """bfloat16 bits (uint16) -> float32: they are the top half of the float32."""
        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def _nibble_dot(typingctx, q, q_start, x, x_start):
        """One Q4 block: sum over j < 16 of (q[q_start + j] & 15) x[x_start + j]
        + (q[q_start + j] >> 4) x[x_start + 16 + j], built as one 16-lane vector
        expression. The same 16-step loop in numba ran 1.5x slower: LLVM's
        vector body wants 64 steps, so a narrower remainder path ran instead.
        No bounds checks: the caller keeps both ranges inside the rows.
        """
        if not (isinstance(q, types.Array) and q.dtype == types.uint8 and q.layout == "C"
                and isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C"):
            return None

        def codegen(context, builder, signature, args):
            q_arr = context.make_array(signature.args[0])(context, builder, args[0])
            x_arr = context.make_array(signature.args[2])(context, builder, args[2])
            bytes16 = ir.VectorType(ir.IntType(8), 16)
            ints16 = ir.VectorType(ir.IntType(32), 16)
            floats16 = ir.VectorType(ir.FloatType(), 16)
            packed = builder.load(builder.bitcast(builder.gep(q_arr.data, [args[1]]), bytes16.as_pointer()), align=1)
            packed = builder.zext(packed, ints16)
            low = builder.uitofp(builder.and_(packed, ir.Constant(ints16, [15] * 16)), floats16)
            high = builder.uitofp(builder.lshr(packed, ir.Constant(ints16, [4] * 16)), floats16)
            x_low_ptr = builder.gep(x_arr.data, [args[3]])
            x_high_ptr = builder.gep(x_low_ptr, [ir.Constant(ir.IntType(64), 16)])
            x_low = builder.load(builder.bitcast(x_low_ptr, floats16.as_pointer()), align=4)
            x_high = builder.load(builder.bitcast(x_high_ptr, floats16.as_pointer()), align=4)
            fast = ("fast",)
            products = builder.fadd(builder.fmul(low, x_low, flags=fast), builder.fmul(high, x_high, flags=fast),
                                    flags=fast)
            reduce_add = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), floats16]),
                "llvm.vector.reduce.fadd.v16f32")
            return builder.call(reduce_add, [ir.Constant(ir.FloatType(), 0.0), products], fastmath=fast)
        return types.float32(q, types.intp, x, types.intp), codegen
else:
    # The kernels below stay plain Python functions that nothing calls.
    def _jit(parallel: bool = False):
        return lambda fn: fn


# ---------------------------------------------------------------------------
# Matrix x vector: one output per row, rows split evenly between the threads.
# Quantized rows are dotted block by block: s = sum(q * x) over the block, then
# scaled once, so the inner loop is a plain int->float multiply-add.
# ---------------------------------------------------------------------------

@_jit()
def _block_sums(x, qk):
    """Sum of x over each block of qk: lets Q4_0's -8 and Q4_1's m be applied per block."""
    nb = x.size // qk
    sums = np.empty(nb, np.float32)
    for b in range(nb):
        xb = x[b * qk:b * qk + qk]
        s = np.float32(0.0)
        for j in range(qk):
            s += xb[j]
        sums[b] = s
    return sums


@_jit(parallel=True)
def _matvec_f32(w, x, out):
    for r in prange(w.shape[0]):
        wr = w[r]
        s = np.float32(0.0)
        for i in range(x.size):
            s += wr[i] * x[i]
        out[r] = s


@_jit(parallel=True)
def _matvec_f16(w, x, out):
    for r in prange(w.shape[0]):
        wr = w[r]
        s = np.float32(0.0)
        for i in range(x.size):
            s += _f16_to_f32(wr[i]) * x[i]
        out[r] = s


@_jit(parallel=True)
def _matvec_bf16(w, x, out):
    for r in prange(w.shape[0]):
        wr = w[r]
        s = np.float32(0.0)
        for i in range(x.size):
            s += _bf16_to_f32(wr[i]) * x[i]
        out[r] = s


@_jit(parallel=True)
def _matvec_q8_0(q, d, x, out):
    # Block = 34 bytes: f16 scale (d[17 b]), then 32 int8 (q[34 b + 2 ...]).
    nb = d.shape[1] // 17
    qk = x.size // nb  # 32, but a run-time value (see the module docstring)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = np.float32(0.0)
        for b in range(nb):
            qb = qr[b * 34 + 2:b * 34 + 34]
            xb = x[b * qk:b * qk + qk]
            s = np.float32(0.0)
            for j in range(qk):
                s += np.float32(qb[j]) * xb[j]
            acc += _f16_to_f32(dr[b * 17]) * s
        out[r] = acc


@_jit(parallel=True)
def _matvec_q4_0(q, d, x, out):
    # Block = 18 bytes: f16 scale (d[9 b]), 16 bytes of nibbles: byte j holds
    # weight j (low) and j + 16 (high). w = (n - 8) d, so a block contributes
    # d (sum(n x) - 8 sum(x)).
    nb = d.shape[1] // 9
    xsum = _block_sums(x, x.size // nb)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = np.float32(0.0)
        for b in range(nb):
            s = _nibble_dot(qr, b * 18 + 2, x, b * 32)
            acc += _f16_to_f32(dr[b * 9]) * (s - np.float32(8.0) * xsum[b])
        out[r] = acc


@_jit(parallel=True)
def _matvec_q4_1(q, d, x, out):
    # Block = 20 bytes: f16 scale d (d[10 b]), f16 offset m (d[10 b + 1]), 16
    # nibble bytes as Q4_0. w = n d + m, so a block contributes d sum(n x) + m sum(x).
    nb = d.shape[1] // 10
    xsum = _block_sums(x, x.size // nb)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = np.float32(0.0)
        for b in range(nb):
            s = _nibble_dot(qr, b * 20 + 4, x, b * 32)
            acc += _f16_to_f32(dr[b * 10]) * s + _f16_to_f32(dr[b * 10 + 1]) * xsum[b]
        out[r] = acc


# ---------------------------------------------------------------------------
# Matrix x matrix: each task dequantizes _ROW_BLOCK rows into a small float32
# block (a cost shared by all T columns), then multiplies it by x in 4 x 4
# register tiles (16 accumulators: as fast as OpenBLAS sgemm here). x arrives
# padded to a multiple of 4 rows.
# ---------------------------------------------------------------------------

_ROW_BLOCK = 8  # rows per task; a multiple of the tile's 4


@_jit()
def _dequant_rows_f32(w, r0, nr, out):
    """Weight rows r0 .. r0 + nr - 1 as float32 into out[:nr]; one such function per type."""
    for i in range(nr):
        src = w[r0 + i]
        dst = out[i]
        for k in range(src.size):
            dst[k] = src[k]


@_jit()
def _dequant_rows_f16(w, r0, nr, out):
    for i in range(nr):
        src = w[r0 + i]
        dst = out[i]
        for k in range(src.size):
            dst[k] = _f16_to_f32(src[k])


@_jit()
def _dequant_rows_bf16(w, r0, nr, out):
    for i in range(nr):
        src = w[r0 + i]
        dst = out[i]
        for k in range(src.size):
            dst[k] = _bf16_to_f32(src[k])


@_jit()
def _dequant_rows_q8_0(q, d, r0, nr, out):
    nb = d.shape[1] // 17
    qk = out.shape[1] // nb
    for i in range(nr):
        qr = q[r0 + i]
        dr = d[r0 + i]
        for b in range(nb):
            qb = qr[b * 34 + 2:b * 34 + 34]
            wb = out[i, b * qk:b * qk + qk]
            scale = _f16_to_f32(dr[b * 17])
            for j in range(qk):
                wb[j] = scale * np.float32(qb[j])


@_jit()
def _dequant_rows_q4_0(q, d, r0, nr, out):
    nb = d.shape[1] // 9
    qk = out.shape[1] // nb
    half = qk // 2
    for i in range(nr):
        qr = q[r0 + i]
        dr = d[r0 + i]
        for b in range(nb):
            qb = qr[b * 18 + 2:b * 18 + 18]
            wb = out[i, b * qk:b * qk + qk]
            scale = _f16_to_f32(dr[b * 9])
            for j in range(half):
                wb[j] = scale * (np.float32(qb[j] & 15) - np.float32(8.0))
                wb[j + half] = scale * (np.float32(qb[j] >> 4) - np.float32(8.0))


@_jit()
def _dequant_rows_q4_1(q, d, r0, nr, out):
    nb = d.shape[1] // 10
    qk = out.shape[1] // nb
    half = qk // 2
    for i in range(nr):
        qr = q[r0 + i]
        dr = d[r0 + i]
        for b in range(nb):
            qb = qr[b * 20 + 4:b * 20 + 20]
            wb = out[i, b * qk:b * qk + qk]
            scale = _f16_to_f32(dr[b * 10])
            low = _f16_to_f32(dr[b * 10 + 1])
            for j in range(half):
                wb[j] = scale * np.float32(qb[j] & 15) + low
                wb[j + half] = scale * np.float32(qb[j] >> 4) + low


@_jit()
def _store4(out, t, r, s0, s1, s2, s3, valid):
    """Write one weight row's results for columns t..t+3 (skipping the padding rows)."""
    if valid:
        out[t, r] = s0
        out[t + 1, r] = s1
        out[t + 2, r] = s2
        out[t + 3, r] = s3


@_jit()
def _tiles_4x4(w, nr, x, out, r0):
    """out[t, r0 + i] = w[i] . x[t] for i < nr; w has _ROW_BLOCK rows, x a multiple of 4."""
    n = x.shape[1]
    for i in range(0, w.shape[0], 4):
        w0 = w[i]
        w1 = w[i + 1]
        w2 = w[i + 2]
        w3 = w[i + 3]
        for t in range(0, x.shape[0], 4):
            x0 = x[t]
            x1 = x[t + 1]
            x2 = x[t + 2]
            x3 = x[t + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for k in range(n):
                a0, a1, a2, a3 = w0[k], w1[k], w2[k], w3[k]
                b0, b1, b2, b3 = x0[k], x1[k], x2[k], x3[k]
                s00 += a0 * b0; s01 += a0 * b1; s02 += a0 * b2; s03 += a0 * b3  # noqa: E702
                s10 += a1 * b0; s11 += a1 * b1; s12 += a1 * b2; s13 += a1 * b3  # noqa: E702
                s20 += a2 * b0; s21 += a2 * b1; s22 += a2 * b2; s23 += a2 * b3  # noqa: E702
                s30 += a3 * b0; s31 += a3 * b1; s32 += a3 * b2; s33 += a3 * b3  # noqa: E702
            _store4(out, t, r0 + i, s00, s01, s02, s03, i < nr)
            _store4(out, t, r0 + i + 1, s10, s11, s12, s13, i + 1 < nr)
            _store4(out, t, r0 + i + 2, s20, s21, s22, s23, i + 2 < nr)
            _store4(out, t, r0 + i + 3, s30, s31, s32, s33, i + 3 < nr)


@_jit()
def _n_tasks(rows):
    return (rows + _ROW_BLOCK - 1) // _ROW_BLOCK


@_jit()
def _task(blk, rows, ncols):
    """Task `blk`'s first row, its row count, and a float32 block for its rows,
    zeroed: garbage in the padding rows could be denormals, which are slow."""
    r0 = blk * _ROW_BLOCK
    return r0, min(_ROW_BLOCK, rows - r0), np.zeros((_ROW_BLOCK, ncols), np.float32)


@_jit(parallel=True)
def _matmul_f32(w, x, out):
    for blk in prange(_n_tasks(w.shape[0])):
        r0, nr, block = _task(blk, w.shape[0], x.shape[1])
        _dequant_rows_f32(w, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_f16(w, x, out):
    for blk in prange(_n_tasks(w.shape[0])):
        r0, nr, block = _task(blk, w.shape[0], x.shape[1])
        _dequant_rows_f16(w, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_bf16(w, x, out):
    for blk in prange(_n_tasks(w.shape[0])):
        r0, nr, block = _task(blk, w.shape[0], x.shape[1])
        _dequant_rows_bf16(w, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q8_0(q, d, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q8_0(q, d, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q4_0(q, d, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q4_0(q, d, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q4_1(q, d, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q4_1(q, d, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


# ---------------------------------------------------------------------------
# Per type: zero-copy views of the raw bytes that the kernels take, and the kernels.
# ---------------------------------------------------------------------------

class _TypeKernels(NamedTuple):
    views: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    matvec: Callable
    matmul: Callable


def _whole(dtype: str):
    return lambda raw: (raw.view(dtype),)


def _quants_and_halves(quant_dtype: str):
    """The block bytes as `quant_dtype`, and the same bytes as uint16 for the f16 fields."""
    return lambda raw: (raw.view(quant_dtype), raw.view("<u2"))


_KERNELS: dict[GGMLType, _TypeKernels] = {
    GGMLType.F32: _TypeKernels(_whole("<f4"), _matvec_f32, _matmul_f32),
    GGMLType.F16: _TypeKernels(_whole("<u2"), _matvec_f16, _matmul_f16),
    GGMLType.BF16: _TypeKernels(_whole("<u2"), _matvec_bf16, _matmul_bf16),
    GGMLType.Q8_0: _TypeKernels(_quants_and_halves("i1"), _matvec_q8_0, _matmul_q8_0),
    GGMLType.Q4_0: _TypeKernels(_quants_and_halves("u1"), _matvec_q4_0, _matmul_q4_0),
    GGMLType.Q4_1: _TypeKernels(_quants_and_halves("u1"), _matvec_q4_1, _matmul_q4_1),
}

SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(_KERNELS)


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------

_threads: int | None = None  # from set_threads(); None leaves numba's default (all cores)
_applied = threading.local()  # numba's thread count is per calling thread


def numba_enabled() -> bool:
    return _numba is not None


def set_threads(n: int) -> None:
    """Use n threads (clamped to [1, available]) in every later kernel call, from any thread.

    The numpy path leaves threading to numpy's BLAS and ignores this.
    """
    global _threads
    if _numba is not None:
        _threads = max(1, min(int(n), _numba.config.NUMBA_NUM_THREADS))


def _apply_threads() -> None:
    if _threads is not None and getattr(_applied, "threads", None) != _threads:
        _numba.set_num_threads(_threads)
        _applied.threads = _threads


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

_NUMPY_CHUNK = 1 << 20  # weights dequantized at a time on the numpy path (4 MiB of float32)


class QuantMatrix:
    """A (rows, ncols) weight matrix kept in its GGML encoding, multiplied in place."""

    def __init__(self, raw: np.ndarray, ggml_type: GGMLType, ncols: int):
        ggml_type = GGMLType(ggml_type)
        if ggml_type not in SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
            raise ValueError(f"tensor type {ggml_type.name} is not supported (supported: {supported})")
        check_raw(raw, ggml_type, ncols)
        if not raw.flags.c_contiguous:
            raise ValueError("weight rows must be C-contiguous (a view of the file, never a strided copy)")
        # A read-only view whatever the caller passed, so numba compiles one
        # signature per type (file maps are read-only).
        self._raw = raw.view()
        self._raw.flags.writeable = False
        self.ggml_type = ggml_type
        self.shape = (raw.shape[0], ncols)
        self.nbytes = raw.nbytes
        self._kernels = _KERNELS[ggml_type]
        self._views = self._kernels.views(self._raw)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """W @ x for x float32 (ncols,) -> float32 (rows,)."""
        x = self._input(x, 1)
        if _numba is None:
            return self._numpy_matmul(x[None, :])[0]
        out = np.empty(self.shape[0], np.float32)
        _apply_threads()
        self._kernels.matvec(*self._views, x, out)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x float32 (T, ncols) -> float32 (T, rows)."""
        x = self._input(x, 2)
        if _numba is None:
            return self._numpy_matmul(x)
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]
        padded = np.zeros((-(-x.shape[0] // 4) * 4, x.shape[1]), np.float32)
        padded[:x.shape[0]] = x
        out = np.empty((padded.shape[0], self.shape[0]), np.float32)
        _apply_threads()
        self._kernels.matmul(*self._views, padded, out)
        return out[:x.shape[0]]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` as float32 (len(ids), ncols): an embedding lookup."""
        ids = np.asarray(ids, dtype=np.intp)
        if ids.ndim != 1:
            raise ValueError(f"row ids must be one-dimensional, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]}), got {ids.min()}..{ids.max()}")
        return dequantize(self._raw[ids], self.ggml_type, self.shape[1])

    def _input(self, x: np.ndarray, ndim: int) -> np.ndarray:
        """x as C-contiguous writable float32 (one numba signature), shape-checked:
        the kernels do no bounds checks."""
        x = np.require(x, np.float32, ["C", "W"])
        if x.ndim != ndim or x.shape[-1] != self.shape[1]:
            want = "(ncols,)" if ndim == 1 else "(T, ncols)"
            raise ValueError(f"x must have shape {want} with ncols = {self.shape[1]}, got {x.shape}")
        return x

    def _numpy_matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T by chunks of rows, never holding all of W as float32."""
        rows, ncols = self.shape
        out = np.empty((x.shape[0], rows), np.float32)
        step = max(1, _NUMPY_CHUNK // ncols)
        for r0 in range(0, rows, step):
            w = dequantize(self._raw[r0:r0 + step], self.ggml_type, ncols)
            out[:, r0:r0 + step] = x @ w.T
        return out

"""Matrix x vector and matrix x matrix over GGML weights, used in place.

`QuantMatrix` wraps the uint8 rows of one weight tensor (usually a read-only
view of the memory-mapped file) and multiplies them without ever copying or
converting the bulk bytes: the numba kernels read llama.cpp's blocks where they
lie, and decode the float16 scales with the CPU's own conversion instruction.

Decoding (matvec) on x86 goes through int8_matvec for most types: x rounded
to int8, integer dot products; the float kernels here serve prompts (matmul),
other CPUs and LLAMAZIP_FLOAT_MATVEC=1.

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
  where numba's loops left 1.5x on the table.
- Q5 and the K-quants go further (numba's loops ran 2-4x slower): hand-built
  16-lane intrinsics unpack the bit fields and multiply-add into a running
  vector sum (`_f32x16`) that is reduced once per row, not once per block.
  Each K-quant's layout is one `_part` function, shared with the matmul path;
  its packed sub-block scales are unpacked in the kernel, block by block.
- One thread pool at a time: these kernels never call BLAS, and the numpy path
  never runs numba, so numba's and OpenBLAS's threads never alternate (which
  costs 7-190x). Code that mixes both should run OpenBLAS single-threaded.
"""

from __future__ import annotations

import os
import sys
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
    except Exception as e:  # ImportError, or a broken llvmlite/numpy pairing
        print(f"warning: numba cannot load ({type(e).__name__}: {e}); using the slower numpy kernels",
              file=sys.stderr)
        return None
    # NUMBA_DISABLE_JIT=1 (a debugging switch) would run the kernels as Python,
    # where the LLVM intrinsics below cannot run.
    return None if numba.config.DISABLE_JIT else numba


_numba = _load_numba()

if _numba is not None:
    from llvmlite import ir
    from numba import prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

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

    # 16-lane vectors for the Q5 and K-quant kernels. A row's running sum stays
    # a vector (the type _f32x16) and is reduced to one float once per row, not
    # once per block: the reductions were half the instructions (K-quant
    # matvec 1.6-2x faster). Bit fields are cut out in 16-bit lanes, where x86
    # can shift by a run-time amount in one instruction (bytes cannot).
    _BYTES16 = ir.VectorType(ir.IntType(8), 16)
    _SHORTS16 = ir.VectorType(ir.IntType(16), 16)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)
    _FAST = ("fast",)

    class _F32Vector(types.Type):
        """`lanes` float32 lanes held in vector registers: a row's running sum."""
        def __init__(self, lanes: int):
            self.lanes = lanes
            super().__init__(name=f"F32x{lanes}")

    @register_model(_F32Vector)
    class _F32VectorModel(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.lanes))

    def _float_vector(lanes: int):
        """The vector type of `lanes` floats, and intrinsics for one of zeros and for its sum."""
        vector_type = _F32Vector(lanes)
        llvm_type = ir.VectorType(ir.FloatType(), lanes)

        @intrinsic
        def zeros(typingctx):
            def codegen(context, builder, signature, args):
                return _constant(llvm_type, 0.0)
            return vector_type(), codegen

        @intrinsic
        def total(typingctx, acc):
            def codegen(context, builder, signature, args):
                reduce_add = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), llvm_type]),
                    f"llvm.vector.reduce.fadd.v{lanes}f32")
                return builder.call(reduce_add, [ir.Constant(ir.FloatType(), 0.0), args[0]], fastmath=_FAST)
            return types.float32(acc), codegen

        return vector_type, zeros, total

    def _lanes(context, builder, array_type, array, start, vector_type):
        """vector_type's worth of array[start:], unchecked: callers keep inside the array."""
        data = context.make_array(array_type)(context, builder, array).data
        align = 4 if vector_type.element == ir.FloatType() else 1
        return builder.load(builder.bitcast(builder.gep(data, [start]), vector_type.as_pointer()), align=align)

    def _splat(builder, value, vector_type):
        """The scalar `value` in every lane, truncated to the lane width if an integer."""
        if isinstance(vector_type.element, ir.IntType):
            value = builder.trunc(value, vector_type.element)
        lane0 = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
        return builder.shuffle_vector(lane0, ir.Constant(vector_type, ir.Undefined), zeros)

    def _constant(vector_type, value):
        return ir.Constant(vector_type, [value] * vector_type.count)

    def _int64(value: int):
        return ir.Constant(ir.IntType(64), value)

    def _field(context, builder, array_type, q, start, shift, bits):
        """(q[start + l] >> shift) & (2^bits - 1) for the 16 lanes l, as 16-bit ints."""
        packed = builder.zext(_lanes(context, builder, array_type, q, start, _BYTES16), _SHORTS16)
        mask = _constant(_SHORTS16, (1 << bits) - 1)
        return builder.and_(builder.lshr(packed, _splat(builder, shift, _SHORTS16)), mask)

    _f32x16, _zeros16, _sum16 = _float_vector(16)

    def _nibble_block(context, builder, q_type, q, q_start, x_type, x, x_start):
        """The 16 lanes (q & 15) x[..16] + (q >> 4) x[16..32] of one Q4 block."""
        ints16 = ir.VectorType(ir.IntType(32), 16)
        packed = builder.zext(_lanes(context, builder, q_type, q, q_start, _BYTES16), ints16)
        low = builder.uitofp(builder.and_(packed, _constant(ints16, 15)), _FLOATS16)
        high = builder.uitofp(builder.lshr(packed, _constant(ints16, 4)), _FLOATS16)
        x_low = _lanes(context, builder, x_type, x, x_start, _FLOATS16)
        x_high = _lanes(context, builder, x_type, x, builder.add(x_start, _int64(16)), _FLOATS16)
        return builder.fadd(builder.fmul(low, x_low, flags=_FAST), builder.fmul(high, x_high, flags=_FAST),
                            flags=_FAST)

    @intrinsic
    def _nibble_fma(typingctx, acc, q, q_start, x, x_start, scale):
        """acc + scale * (one Q4 block's 16-lane products, as _nibble_block): the
        row's sum stays a vector, reduced once per row (see _f32x16)."""
        def codegen(context, builder, signature, args):
            acc, q, q_start, x, x_start, scale = args
            block = _nibble_block(context, builder, signature.args[1], q, q_start, signature.args[3], x, x_start)
            scaled = builder.fmul(block, _splat(builder, scale, _FLOATS16), flags=_FAST)
            return builder.fadd(acc, scaled, flags=_FAST)
        index = types.intp
        return _f32x16(acc, q, index, x, index, types.float32), codegen

    @intrinsic
    def _int8_fma(typingctx, acc, q, q_start, x, x_start, scale):
        """acc + scale * (q[j] x[j] + q[16 + j] x[16 + j]) for the 16 lanes j:
        one Q8_0 block of 32 signed bytes."""
        def codegen(context, builder, signature, args):
            acc, q, q_start, x, x_start, scale = args
            block = None
            for half in range(2):
                start = builder.add(q_start, _int64(16 * half))
                w = builder.sitofp(_lanes(context, builder, signature.args[1], q, start, _BYTES16), _FLOATS16)
                xs = _lanes(context, builder, signature.args[3], x, builder.add(x_start, _int64(16 * half)), _FLOATS16)
                product = builder.fmul(w, xs, flags=_FAST)
                block = product if block is None else builder.fadd(block, product, flags=_FAST)
            scaled = builder.fmul(block, _splat(builder, scale, _FLOATS16), flags=_FAST)
            return builder.fadd(acc, scaled, flags=_FAST)
        index = types.intp
        return _f32x16(acc, q, index, x, index, types.float32), codegen

    def _field_fma(low_bits: int, high_bits: int, bias: int):
        """An intrinsic fma(acc, q, lo, lo_shift, hi, hi_shift, x, x_start, scale)
        = acc + scale * (w - bias) * x[x_start + l] for the 16 lanes l, where
        w = (q[lo + l] >> lo_shift) & (2^low_bits - 1), plus, when high_bits,
        ((q[hi + l] >> hi_shift) & (2^high_bits - 1)) << low_bits: 16 weights
        of a K-quant super-block. No bounds checks."""
        @intrinsic
        def fma(typingctx, acc, q, lo, lo_shift, hi, hi_shift, x, x_start, scale):
            def codegen(context, builder, signature, args):
                acc, q, lo, lo_shift, hi, hi_shift, x, x_start, scale = args
                q_type = signature.args[1]
                w = _field(context, builder, q_type, q, lo, lo_shift, low_bits)
                if high_bits:
                    top = _field(context, builder, q_type, q, hi, hi_shift, high_bits)
                    w = builder.or_(w, builder.shl(top, _constant(_SHORTS16, low_bits)))
                w = builder.sitofp(builder.sub(w, _constant(_SHORTS16, bias)), _FLOATS16)
                weights = builder.fmul(w, _splat(builder, scale, _FLOATS16), flags=_FAST)
                xs = _lanes(context, builder, signature.args[6], x, x_start, _FLOATS16)
                return builder.fadd(acc, builder.fmul(weights, xs, flags=_FAST), flags=_FAST)
            index = types.intp
            return _f32x16(acc, q, index, index, index, index, x, index, types.float32), codegen
        return fma

    def _q5_block_fma(bias: int):
        """An intrinsic fma(acc, q, start, qh, x, x_start, scale) = acc + scale *
        sum over the halves h of (w - bias) * x[x_start + 16 h + l] for the 16
        lanes l: one Q5 block, w = (q[start + l] >> 4 h) & 15 | ((qh >> (16 h + l)) & 1) << 4.
        Both halves summed before acc: half the additions in acc's serial chain
        (1.35x over a call per half). No bounds checks."""
        @intrinsic
        def fma(typingctx, acc, q, start, qh, x, x_start, scale):
            def codegen(context, builder, signature, args):
                acc, q, start, qh, x, x_start, scale = args
                lane = ir.Constant(_SHORTS16, list(range(16)))
                block = None
                for h in range(2):
                    nibbles = _field(context, builder, signature.args[1], q, start, _int64(4 * h), 4)
                    qh_half = _splat(builder, builder.lshr(qh, _int64(16 * h)), _SHORTS16)
                    fifth = builder.and_(builder.lshr(qh_half, lane), _constant(_SHORTS16, 1))
                    w = builder.or_(nibbles, builder.shl(fifth, _constant(_SHORTS16, 4)))
                    w = builder.sitofp(builder.sub(w, _constant(_SHORTS16, bias)), _FLOATS16)
                    xs = _lanes(context, builder, signature.args[4], x, builder.add(x_start, _int64(16 * h)), _FLOATS16)
                    product = builder.fmul(w, xs, flags=_FAST)
                    block = product if block is None else builder.fadd(block, product, flags=_FAST)
                scaled = builder.fmul(block, _splat(builder, scale, _FLOATS16), flags=_FAST)
                return builder.fadd(acc, scaled, flags=_FAST)
            index = types.intp
            return _f32x16(acc, q, index, index, x, index, types.float32), codegen
        return fma
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
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = _zeros16()
        for b in range(nb):
            acc = _int8_fma(acc, qr, b * 34 + 2, x, b * 32, _f16_to_f32(dr[b * 17]))
        out[r] = _sum16(acc)


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
        acc = _zeros16()
        offset = np.float32(0.0)
        for b in range(nb):
            scale = _f16_to_f32(dr[b * 9])
            acc = _nibble_fma(acc, qr, b * 18 + 2, x, b * 32, scale)
            offset += scale * xsum[b]
        out[r] = _sum16(acc) - np.float32(8.0) * offset


@_jit(parallel=True)
def _matvec_q4_1(q, d, x, out):
    # Block = 20 bytes: f16 scale d (d[10 b]), f16 offset m (d[10 b + 1]), 16
    # nibble bytes as Q4_0. w = n d + m, so a block contributes d sum(n x) + m sum(x).
    nb = d.shape[1] // 10
    xsum = _block_sums(x, x.size // nb)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = _zeros16()
        offset = np.float32(0.0)
        for b in range(nb):
            acc = _nibble_fma(acc, qr, b * 20 + 4, x, b * 32, _f16_to_f32(dr[b * 10]))
            offset += _f16_to_f32(dr[b * 10 + 1]) * xsum[b]
        out[r] = _sum16(acc) + offset


# ---------------------------------------------------------------------------
# Q5 and K-quants, on 16-lane vectors (see _field_fma): q is a row's bytes, h
# the same bytes as uint16 (the f16 fields, and Q5's 32-bit qh as two halves).
#
# Each K-quant type has a `_part` function: where sub-block j of super-block b
# lies in row qr, and its float scales, as (lo, lo_shift, hi, hi_shift, scale,
# low). The sub-block's weights l are scale * (w_l - bias) - low, with w_l the
# bit fields _field_fma reads at lo + l and hi + l (hi unused without high
# bits), the bit widths and bias in the type's _FIELDS. The matvec and the
# matmul's dequantizer both read it, so each layout is written once (layouts:
# runtime/dequant.py).
# ---------------------------------------------------------------------------

# (low bits, high bits, bias) of each K-quant's weights
_Q2_K_FIELDS = (2, 0, 0)
_Q3_K_FIELDS = (2, 1, 4)
_Q4_K_FIELDS = (4, 0, 0)
_Q5_K_FIELDS = (4, 1, 0)
_Q6_K_FIELDS = (4, 2, 32)

if _numba is not None:
    _fma_q5_0 = _q5_block_fma(bias=16)
    _fma_q5_1 = _q5_block_fma(bias=0)
    _fma_q2_k = _field_fma(*_Q2_K_FIELDS)
    _fma_q3_k = _field_fma(*_Q3_K_FIELDS)
    _fma_q4_k = _field_fma(*_Q4_K_FIELDS)
    _fma_q5_k = _field_fma(*_Q5_K_FIELDS)
    _fma_q6_k = _field_fma(*_Q6_K_FIELDS)


@_jit()
def _qh(hr, i):
    """Q5's 32 fifth bits, stored as the uint16 halves hr[i] (low) and hr[i + 1]."""
    return np.int64(hr[i]) | (np.int64(hr[i + 1]) << 16)


@_jit()
def _k4_scale_min(q, o, j):
    """Q4_K/Q5_K: scale and min j (0-7) of the 12 packed bytes at q[o], as
    float32 (6 bits each: see dequant._k4_scales_mins)."""
    if j < 4:
        return np.float32(q[o + j] & 63), np.float32(q[o + j + 4] & 63)
    return (np.float32((q[o + j + 4] & 15) | ((q[o + j - 4] >> 6) << 4)),
            np.float32((q[o + j + 4] >> 4) | ((q[o + j] >> 6) << 4)))


@_jit()
def _q3_k_scale(q, o, j):
    """Q3_K: scale j (0-15) of the 12 packed bytes at q[o], as float32: low 4
    bits in byte j % 8 (low nibble for j < 8), top 2 bits in byte 8 + j % 4 at
    bit 2 (j // 4), stored plus 32."""
    low = (q[o + (j & 7)] >> (4 * (j >> 3))) & 15
    high = (q[o + 8 + (j & 3)] >> (2 * (j >> 2))) & 3
    return np.float32((low | (high << 4)) - 32)


@_jit()
def _q2_k_part(qr, hr, b, j):
    # 84 bytes: scales[16] (low nibble scale, high nibble min), qs[64], f16 d
    # (hr[42 b + 40]), f16 dmin. Sub-block j, 16 weights: 2-bit field j // 2 % 4
    # of qs[32 (j // 8) + 16 (j % 2) + l].
    o = 84 * b
    sc = qr[o + j]
    return (o + 16 + 32 * (j >> 3) + 16 * (j & 1), 2 * ((j >> 1) & 3), 0, 0,
            _f16_to_f32(hr[42 * b + 40]) * np.float32(sc & 15),
            _f16_to_f32(hr[42 * b + 41]) * np.float32(sc >> 4))


@_jit()
def _q3_k_part(qr, hr, b, j):
    # 110 bytes: hmask[32], qs[64], scales[12], f16 d (hr[55 b + 54]). Sub-block
    # j, 16 weights: 2-bit field j // 2 % 4 of qs[32 (j // 8) + 16 (j % 2) + l],
    # over bit j // 2 of hmask[16 (j % 2) + l].
    o = 110 * b
    l0 = 16 * (j & 1)
    return (o + 32 + 32 * (j >> 3) + l0, 2 * ((j >> 1) & 3), o + l0, j >> 1,
            _f16_to_f32(hr[55 * b + 54]) * _q3_k_scale(qr, o + 96, j), np.float32(0.0))


@_jit()
def _q4_k_part(qr, hr, b, j):
    # 144 bytes: f16 d (hr[72 b]), f16 dmin, scales[12], qs[128]. Sub-block j,
    # 32 weights: nibble j % 2 of qs[32 (j // 2) + l].
    o = 144 * b
    sc, m = _k4_scale_min(qr, o + 4, j)
    return (o + 16 + 32 * (j >> 1), 4 * (j & 1), 0, 0,
            _f16_to_f32(hr[72 * b]) * sc, _f16_to_f32(hr[72 * b + 1]) * m)


@_jit()
def _q5_k_part(qr, hr, b, j):
    # 176 bytes: f16 d (hr[88 b]), f16 dmin, scales[12], qh[32], qs[128].
    # Sub-block j, 32 weights: nibble j % 2 of qs[32 (j // 2) + l], over bit j of qh[l].
    o = 176 * b
    sc, m = _k4_scale_min(qr, o + 4, j)
    return (o + 48 + 32 * (j >> 1), 4 * (j & 1), o + 16, j,
            _f16_to_f32(hr[88 * b]) * sc, _f16_to_f32(hr[88 * b + 1]) * m)


@_jit()
def _q6_k_part(qr, hr, b, j):
    # 210 bytes: ql[128], qh[64], int8 scales[16], f16 d (hr[105 b + 104]).
    # Sub-block j, 16 weights, in half n = j // 8 with k = j // 2 % 4: nibble
    # k // 2 of ql[64 n + 32 (k % 2) + 16 (j % 2) + l], over 2-bit field k of
    # qh[32 n + 16 (j % 2) + l].
    o = 210 * b
    n = j >> 3
    k = (j >> 1) & 3
    l0 = 16 * (j & 1)
    return (o + 64 * n + 32 * (k & 1) + l0, 4 * (k >> 1), o + 128 + 32 * n + l0, 2 * k,
            _f16_to_f32(hr[105 * b + 104]) * np.float32(np.int8(qr[o + 192 + j])), np.float32(0.0))


@_jit(parallel=True)
def _matvec_q5_0(q, h, x, out):
    # Block = 22 bytes: f16 d (h[11 b]), 32 fifth bits (h[11 b + 1 ...]), 16
    # nibble bytes as Q4_0 (q[22 b + 6 ...]). w = (n + 16 bit - 16) d.
    nb = h.shape[1] // 11
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros16()
        for b in range(nb):
            acc = _fma_q5_0(acc, qr, 22 * b + 6, _qh(hr, 11 * b + 1), x, 32 * b, _f16_to_f32(hr[11 * b]))
        out[r] = _sum16(acc)


@_jit(parallel=True)
def _matvec_q5_1(q, h, x, out):
    # Block = 24 bytes: f16 d (h[12 b]), f16 m (h[12 b + 1]), 32 fifth bits
    # (h[12 b + 2 ...]), 16 nibble bytes (q[24 b + 8 ...]). w = (n + 16 bit) d + m,
    # so a block also adds m sum(x).
    nb = h.shape[1] // 12
    xsum = _block_sums(x, x.size // nb)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            acc = _fma_q5_1(acc, qr, 24 * b + 8, _qh(hr, 12 * b + 2), x, 32 * b, _f16_to_f32(hr[12 * b]))
            lows += _f16_to_f32(hr[12 * b + 1]) * xsum[b]
        out[r] = _sum16(acc) + lows


# K-quant matvecs: sub-block j adds scale * sum(w x) to the vector sum and
# low * sum(x) to the scalar one. The sub-blocks run as two nested constant
# loops, which LLVM unrolls (the inner one at least): one flat loop over them
# ran 1.4-1.6x slower, its shifts and offsets computed at run time.

@_jit(parallel=True)
def _matvec_q2_k(q, h, x, out):
    nb = h.shape[1] // 42
    xsum = _block_sums(x, x.size // (16 * nb))  # 16 weights per sub-block
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            for n in range(2):
                for i in range(8):
                    j = 8 * n + i
                    lo, lo_shift, hi, hi_shift, scale, low = _q2_k_part(qr, hr, b, j)
                    acc = _fma_q2_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 16 * j, scale)
                    lows += low * xsum[16 * b + j]
        out[r] = _sum16(acc) - lows


@_jit(parallel=True)
def _matvec_q3_k(q, h, x, out):
    nb = h.shape[1] // 55
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros16()
        for b in range(nb):
            for n in range(2):
                for i in range(8):
                    j = 8 * n + i
                    lo, lo_shift, hi, hi_shift, scale, _ = _q3_k_part(qr, hr, b, j)
                    acc = _fma_q3_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 16 * j, scale)
        out[r] = _sum16(acc)


@_jit(parallel=True)
def _matvec_q4_k(q, h, x, out):
    nb = h.shape[1] // 72
    xsum = _block_sums(x, x.size // (8 * nb))  # 32 weights per sub-block
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            for c in range(4):
                for i in range(2):
                    j = 2 * c + i
                    lo, lo_shift, hi, hi_shift, scale, low = _q4_k_part(qr, hr, b, j)
                    acc = _fma_q4_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 32 * j, scale)
                    acc = _fma_q4_k(acc, qr, lo + 16, lo_shift, hi, hi_shift, x, 256 * b + 32 * j + 16, scale)
                    lows += low * xsum[8 * b + j]
        out[r] = _sum16(acc) - lows


@_jit(parallel=True)
def _matvec_q5_k(q, h, x, out):
    nb = h.shape[1] // 88
    xsum = _block_sums(x, x.size // (8 * nb))  # 32 weights per sub-block
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            for c in range(4):
                for i in range(2):
                    j = 2 * c + i
                    lo, lo_shift, hi, hi_shift, scale, low = _q5_k_part(qr, hr, b, j)
                    acc = _fma_q5_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 32 * j, scale)
                    acc = _fma_q5_k(acc, qr, lo + 16, lo_shift, hi + 16, hi_shift, x, 256 * b + 32 * j + 16, scale)
                    lows += low * xsum[8 * b + j]
        out[r] = _sum16(acc) - lows


@_jit(parallel=True)
def _matvec_q6_k(q, h, x, out):
    nb = h.shape[1] // 105
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros16()
        for b in range(nb):
            for n in range(2):
                for i in range(8):
                    j = 8 * n + i
                    lo, lo_shift, hi, hi_shift, scale, _ = _q6_k_part(qr, hr, b, j)
                    acc = _fma_q6_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 16 * j, scale)
        out[r] = _sum16(acc)


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
def _unpack_q5(qr, start, qh, scale, bias, low, out):
    """One Q5 block into out (32 floats): scale * (w - bias) + low (see _q5_block_fma)."""
    half = out.size // 2
    qb = qr[start:start + half]
    for j in range(half):
        out[j] = scale * np.float32(((qb[j] & 15) | (((qh >> j) & 1) << 4)) - bias) + low
        out[j + half] = scale * np.float32(((qb[j] >> 4) | (((qh >> (j + half)) & 1) << 4)) - bias) + low


@_jit()
def _dequant_rows_q5_0(q, h, r0, nr, out):
    nb = h.shape[1] // 11
    qk = out.shape[1] // nb
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            _unpack_q5(qr, 22 * b + 6, _qh(hr, 11 * b + 1), _f16_to_f32(hr[11 * b]), 16, np.float32(0.0),
                       out[i, b * qk:b * qk + qk])


@_jit()
def _dequant_rows_q5_1(q, h, r0, nr, out):
    nb = h.shape[1] // 12
    qk = out.shape[1] // nb
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            _unpack_q5(qr, 24 * b + 8, _qh(hr, 12 * b + 2), _f16_to_f32(hr[12 * b]), 0, _f16_to_f32(hr[12 * b + 1]),
                       out[i, b * qk:b * qk + qk])


@_jit()
def _unpack_k(qr, part, fields, out):
    """A K-quant sub-block into out (16 or 32 floats), given its _part and the type's _FIELDS."""
    lo, lo_shift, hi, hi_shift, scale, low = part
    low_bits, high_bits, bias = fields
    ql = qr[lo:lo + out.size]
    qh = qr[hi:hi + out.size]
    for l in range(out.size):
        w = ((ql[l] >> lo_shift) & ((1 << low_bits) - 1)) | (((qh[l] >> hi_shift) & ((1 << high_bits) - 1)) << low_bits)
        out[l] = scale * np.float32(w - bias) - low


@_jit()
def _dequant_rows_q2_k(q, h, r0, nr, out):
    nb = h.shape[1] // 42
    sub = out.shape[1] // (16 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(16):
                k = 16 * b + j
                _unpack_k(qr, _q2_k_part(qr, hr, b, j), _Q2_K_FIELDS, out[i, sub * k:sub * k + sub])


@_jit()
def _dequant_rows_q3_k(q, h, r0, nr, out):
    nb = h.shape[1] // 55
    sub = out.shape[1] // (16 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(16):
                k = 16 * b + j
                _unpack_k(qr, _q3_k_part(qr, hr, b, j), _Q3_K_FIELDS, out[i, sub * k:sub * k + sub])


@_jit()
def _dequant_rows_q4_k(q, h, r0, nr, out):
    nb = h.shape[1] // 72
    sub = out.shape[1] // (8 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(8):
                k = 8 * b + j
                _unpack_k(qr, _q4_k_part(qr, hr, b, j), _Q4_K_FIELDS, out[i, sub * k:sub * k + sub])


@_jit()
def _dequant_rows_q5_k(q, h, r0, nr, out):
    nb = h.shape[1] // 88
    sub = out.shape[1] // (8 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(8):
                k = 8 * b + j
                _unpack_k(qr, _q5_k_part(qr, hr, b, j), _Q5_K_FIELDS, out[i, sub * k:sub * k + sub])


@_jit()
def _dequant_rows_q6_k(q, h, r0, nr, out):
    nb = h.shape[1] // 105
    sub = out.shape[1] // (16 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(16):
                k = 16 * b + j
                _unpack_k(qr, _q6_k_part(qr, hr, b, j), _Q6_K_FIELDS, out[i, sub * k:sub * k + sub])


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


@_jit(parallel=True)
def _matmul_q5_0(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q5_0(q, h, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q5_1(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q5_1(q, h, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q2_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q2_k(q, h, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q3_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q3_k(q, h, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q4_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q4_k(q, h, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q5_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q5_k(q, h, r0, nr, block)
        _tiles_4x4(block, nr, x, out, r0)


@_jit(parallel=True)
def _matmul_q6_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q6_k(q, h, r0, nr, block)
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
    GGMLType.Q5_0: _TypeKernels(_quants_and_halves("u1"), _matvec_q5_0, _matmul_q5_0),
    GGMLType.Q5_1: _TypeKernels(_quants_and_halves("u1"), _matvec_q5_1, _matmul_q5_1),
    GGMLType.Q2_K: _TypeKernels(_quants_and_halves("u1"), _matvec_q2_k, _matmul_q2_k),
    GGMLType.Q3_K: _TypeKernels(_quants_and_halves("u1"), _matvec_q3_k, _matmul_q3_k),
    GGMLType.Q4_K: _TypeKernels(_quants_and_halves("u1"), _matvec_q4_k, _matmul_q4_k),
    GGMLType.Q5_K: _TypeKernels(_quants_and_halves("u1"), _matvec_q5_k, _matmul_q5_k),
    GGMLType.Q6_K: _TypeKernels(_quants_and_halves("u1"), _matvec_q6_k, _matmul_q6_k),
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


class WeightMatrix:
    """What every compressed (rows, ncols) matrix shares: input checks, the
    embedding lookup and the numpy matmul, on top of `_dequantize(index)` (the
    float32 rows at a slice or an array of row ids)."""

    shape: tuple[int, int]

    @property
    def rounds_input(self) -> bool:
        """True when matvec rounds x to int8 first (int8_matvec)."""
        return False

    def _dequantize(self, index: slice | np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` as float32 (len(ids), ncols): an embedding lookup."""
        ids = np.asarray(ids, dtype=np.intp)
        if ids.ndim != 1:
            raise ValueError(f"row ids must be one-dimensional, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]}), got {ids.min()}..{ids.max()}")
        return self._dequantize(ids)

    def _input(self, x: np.ndarray, ndim: int) -> np.ndarray:
        """x as C-contiguous writable float32 (one numba signature), shape-checked:
        the kernels do no bounds checks."""
        x = np.require(x, np.float32, ["C", "W"])
        if x.ndim != ndim or x.shape[-1] != self.shape[1]:
            want = "(ncols,)" if ndim == 1 else "(T, ncols)"
            raise ValueError(f"x must have shape {want} with ncols = {self.shape[1]}, got {x.shape}")
        return x

    @staticmethod
    def _padded(x: np.ndarray) -> np.ndarray:
        """x with zero rows up to a multiple of 4: the matmul kernels' 4x4 tiles."""
        padded = np.zeros((-(-x.shape[0] // 4) * 4, x.shape[1]), np.float32)
        padded[:x.shape[0]] = x
        return padded

    def _numpy_matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T by chunks of rows, never holding all of W as float32."""
        rows, ncols = self.shape
        out = np.empty((x.shape[0], rows), np.float32)
        step = max(1, _NUMPY_CHUNK // ncols)
        for r0 in range(0, rows, step):
            out[:, r0:r0 + step] = x @ self._dequantize(slice(r0, r0 + step)).T
        return out


class QuantMatrix(WeightMatrix):
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
        from .int8_matvec import matvec_for  # imports this module
        self._matvec = matvec_for(ggml_type) or self._kernels.matvec

    @property
    def rounds_input(self) -> bool:
        return _numba is not None and self._matvec is not self._kernels.matvec

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """W @ x for x float32 (ncols,) -> float32 (rows,)."""
        x = self._input(x, 1)
        if _numba is None:
            return self._numpy_matmul(x[None, :])[0]
        out = np.empty(self.shape[0], np.float32)
        _apply_threads()
        self._matvec(*self._views, x, out)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x float32 (T, ncols) -> float32 (T, rows)."""
        x = self._input(x, 2)
        if _numba is None:
            return self._numpy_matmul(x)
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]
        padded = self._padded(x)
        out = np.empty((padded.shape[0], self.shape[0]), np.float32)
        _apply_threads()
        self._kernels.matmul(*self._views, padded, out)
        return out[:x.shape[0]]

    def _dequantize(self, index: slice | np.ndarray) -> np.ndarray:
        return dequantize(self._raw[index], self.ggml_type, self.shape[1])

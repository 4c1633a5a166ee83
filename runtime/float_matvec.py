"""Matrix x vector with x in float32: every weight turned into a float before it is multiplied.

The decode kernels for the types without an int8 kernel (F32, F16, BF16,
Q2_K, Q3_K), and for every type on CPUs without an integer dot-product
instruction or with LLAMAZIP_FLOAT_MATVEC=1: their results equal a float32
reference. One output per row; rows are split evenly between the threads.

Why the kernels look the way they do (measured on 2-core AVX-512 machines):
- Quantized rows are dotted block by block, s = sum(q x), scaled once per
  block; the block size is read at run time, never the constant 32 (with a
  constant, LLVM unrolls the block and vectorises across blocks with gathers,
  5-20x slower).
- Q4, Q5 and Q8 blocks and the K-quant sub-blocks are multiplied by
  hand-built 16-lane intrinsics (below) into a running vector sum reduced once
  per row; numba's own loops ran 1.5-4x slower.
- The K-quant sub-blocks run as two nested constant loops, which LLVM unrolls:
  one flat loop ran 1.4-1.6x slower, its shifts and offsets computed at run time.

The kernels of similar types are written out one by one rather than made by a
factory over their layout and intrinsic: numba's on-disk cache cannot store a
function that closes over another jitted one (numba issue #6264), and every
start would compile them again.
"""

from __future__ import annotations

import numpy as np

from .block_layouts import (Q2_K_FIELDS, Q3_K_FIELDS, Q4_K_FIELDS, Q5_K_FIELDS, Q6_K_FIELDS, block_sums,
                            q2_k_part, q3_k_part, q4_k_part, q5_k_part, q5_high_bits, q6_k_part)
from .jit import jit, numba_enabled, prange

if numba_enabled():
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from .simd import (BYTES16, FAST, FLOATS16, SHORTS16, bf16_to_f32, constant, f16_to_f32, f32x16, field,
                       int64, load_vector, splat, sum16, zeros16)

    def _nibble_block(context, builder, q_type, q, q_start, x_type, x, x_start):
        """The 16 lanes (q & 15) x[..16] + (q >> 4) x[16..32] of one Q4 block."""
        ints16 = ir.VectorType(ir.IntType(32), 16)
        packed = builder.zext(load_vector(context, builder, q_type, q, q_start, BYTES16), ints16)
        low = builder.uitofp(builder.and_(packed, constant(ints16, 15)), FLOATS16)
        high = builder.uitofp(builder.lshr(packed, constant(ints16, 4)), FLOATS16)
        x_low = load_vector(context, builder, x_type, x, x_start, FLOATS16)
        x_high = load_vector(context, builder, x_type, x, builder.add(x_start, int64(16)), FLOATS16)
        return builder.fadd(builder.fmul(low, x_low, flags=FAST), builder.fmul(high, x_high, flags=FAST),
                            flags=FAST)

    @intrinsic
    def _nibble_fma(typingctx, acc, q, q_start, x, x_start, scale):
        """acc + scale * (one Q4 block's 16-lane products, as _nibble_block): the
        row's sum stays a vector, reduced once per row (see f32x16)."""
        def codegen(context, builder, signature, args):
            acc, q, q_start, x, x_start, scale = args
            block = _nibble_block(context, builder, signature.args[1], q, q_start, signature.args[3], x, x_start)
            scaled = builder.fmul(block, splat(builder, scale, FLOATS16), flags=FAST)
            return builder.fadd(acc, scaled, flags=FAST)
        index = types.intp
        return f32x16(acc, q, index, x, index, types.float32), codegen

    @intrinsic
    def _int8_fma(typingctx, acc, q, q_start, x, x_start, scale):
        """acc + scale * (q[j] x[j] + q[16 + j] x[16 + j]) for the 16 lanes j:
        one Q8_0 block of 32 signed bytes."""
        def codegen(context, builder, signature, args):
            acc, q, q_start, x, x_start, scale = args
            block = None
            for half in range(2):
                start = builder.add(q_start, int64(16 * half))
                w = builder.sitofp(load_vector(context, builder, signature.args[1], q, start, BYTES16), FLOATS16)
                x_at = builder.add(x_start, int64(16 * half))
                xs = load_vector(context, builder, signature.args[3], x, x_at, FLOATS16)
                product = builder.fmul(w, xs, flags=FAST)
                block = product if block is None else builder.fadd(block, product, flags=FAST)
            scaled = builder.fmul(block, splat(builder, scale, FLOATS16), flags=FAST)
            return builder.fadd(acc, scaled, flags=FAST)
        index = types.intp
        return f32x16(acc, q, index, x, index, types.float32), codegen

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
                w = field(context, builder, q_type, q, lo, lo_shift, low_bits)
                if high_bits:
                    top = field(context, builder, q_type, q, hi, hi_shift, high_bits)
                    w = builder.or_(w, builder.shl(top, constant(SHORTS16, low_bits)))
                w = builder.sitofp(builder.sub(w, constant(SHORTS16, bias)), FLOATS16)
                weights = builder.fmul(w, splat(builder, scale, FLOATS16), flags=FAST)
                xs = load_vector(context, builder, signature.args[6], x, x_start, FLOATS16)
                return builder.fadd(acc, builder.fmul(weights, xs, flags=FAST), flags=FAST)
            index = types.intp
            return f32x16(acc, q, index, index, index, index, x, index, types.float32), codegen
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
                lane = ir.Constant(SHORTS16, list(range(16)))
                block = None
                for h in range(2):
                    nibbles = field(context, builder, signature.args[1], q, start, int64(4 * h), 4)
                    qh_half = splat(builder, builder.lshr(qh, int64(16 * h)), SHORTS16)
                    fifth = builder.and_(builder.lshr(qh_half, lane), constant(SHORTS16, 1))
                    w = builder.or_(nibbles, builder.shl(fifth, constant(SHORTS16, 4)))
                    w = builder.sitofp(builder.sub(w, constant(SHORTS16, bias)), FLOATS16)
                    x_at = builder.add(x_start, int64(16 * h))
                    xs = load_vector(context, builder, signature.args[4], x, x_at, FLOATS16)
                    product = builder.fmul(w, xs, flags=FAST)
                    block = product if block is None else builder.fadd(block, product, flags=FAST)
                scaled = builder.fmul(block, splat(builder, scale, FLOATS16), flags=FAST)
                return builder.fadd(acc, scaled, flags=FAST)
            index = types.intp
            return f32x16(acc, q, index, index, x, index, types.float32), codegen
        return fma

    # One intrinsic per bias and bit layout.
    _fma_q5_0 = _q5_block_fma(bias=16)
    _fma_q5_1 = _q5_block_fma(bias=0)
    _fma_q2_k = _field_fma(*Q2_K_FIELDS)
    _fma_q3_k = _field_fma(*Q3_K_FIELDS)
    _fma_q4_k = _field_fma(*Q4_K_FIELDS)
    _fma_q5_k = _field_fma(*Q5_K_FIELDS)
    _fma_q6_k = _field_fma(*Q6_K_FIELDS)


@jit(parallel=True)
def matvec_f32(w, x, out):
    for r in prange(w.shape[0]):
        wr = w[r]
        s = np.float32(0.0)
        for i in range(x.size):
            s += wr[i] * x[i]
        out[r] = s


@jit(parallel=True)
def matvec_f16(w, x, out):
    for r in prange(w.shape[0]):
        wr = w[r]
        s = np.float32(0.0)
        for i in range(x.size):
            s += f16_to_f32(wr[i]) * x[i]
        out[r] = s


@jit(parallel=True)
def matvec_bf16(w, x, out):
    for r in prange(w.shape[0]):
        wr = w[r]
        s = np.float32(0.0)
        for i in range(x.size):
            s += bf16_to_f32(wr[i]) * x[i]
        out[r] = s


@jit(parallel=True)
def matvec_q8_0(q, d, x, out):
    # Block = 34 bytes: f16 scale (d[17 b]), then 32 int8 (q[34 b + 2 ...]).
    nb = d.shape[1] // 17
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        for b in range(nb):
            acc = _int8_fma(acc, qr, b * 34 + 2, x, b * 32, f16_to_f32(dr[b * 17]))
        out[r] = sum16(acc)


@jit(parallel=True)
def matvec_q4_0(q, d, x, out):
    # Block = 18 bytes: f16 scale (d[9 b]), 16 bytes of nibbles: byte j holds
    # weight j (low) and j + 16 (high). w = (n - 8) d, so a block contributes
    # d (sum(n x) - 8 sum(x)).
    nb = d.shape[1] // 9
    xsum = block_sums(x, x.size // nb)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        offset = np.float32(0.0)
        for b in range(nb):
            scale = f16_to_f32(dr[b * 9])
            acc = _nibble_fma(acc, qr, b * 18 + 2, x, b * 32, scale)
            offset += scale * xsum[b]
        out[r] = sum16(acc) - np.float32(8.0) * offset


@jit(parallel=True)
def matvec_q4_1(q, d, x, out):
    # Block = 20 bytes: f16 scale d (d[10 b]), f16 offset m (d[10 b + 1]), 16
    # nibble bytes as Q4_0. w = n d + m, so a block contributes d sum(n x) + m sum(x).
    nb = d.shape[1] // 10
    xsum = block_sums(x, x.size // nb)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        offset = np.float32(0.0)
        for b in range(nb):
            acc = _nibble_fma(acc, qr, b * 20 + 4, x, b * 32, f16_to_f32(dr[b * 10]))
            offset += f16_to_f32(dr[b * 10 + 1]) * xsum[b]
        out[r] = sum16(acc) + offset


@jit(parallel=True)
def matvec_q5_0(q, h, x, out):
    # Block = 22 bytes: f16 d (h[11 b]), 32 fifth bits (h[11 b + 1 ...]), 16
    # nibble bytes as Q4_0 (q[22 b + 6 ...]). w = (n + 16 bit - 16) d.
    nb = h.shape[1] // 11
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = zeros16()
        for b in range(nb):
            acc = _fma_q5_0(acc, qr, 22 * b + 6, q5_high_bits(hr, 11 * b + 1), x, 32 * b, f16_to_f32(hr[11 * b]))
        out[r] = sum16(acc)


@jit(parallel=True)
def matvec_q5_1(q, h, x, out):
    # Block = 24 bytes: f16 d (h[12 b]), f16 m (h[12 b + 1]), 32 fifth bits
    # (h[12 b + 2 ...]), 16 nibble bytes (q[24 b + 8 ...]). w = (n + 16 bit) d + m,
    # so a block also adds m sum(x).
    nb = h.shape[1] // 12
    xsum = block_sums(x, x.size // nb)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            acc = _fma_q5_1(acc, qr, 24 * b + 8, q5_high_bits(hr, 12 * b + 2), x, 32 * b, f16_to_f32(hr[12 * b]))
            lows += f16_to_f32(hr[12 * b + 1]) * xsum[b]
        out[r] = sum16(acc) + lows


# K-quant matvecs: sub-block j adds scale * sum(w x) to the vector sum and
# low * sum(x) to the scalar one. The sub-blocks run as two nested constant
# loops, which LLVM unrolls (the inner one at least): one flat loop over them
# ran 1.4-1.6x slower, its shifts and offsets computed at run time.


@jit(parallel=True)
def matvec_q2_k(q, h, x, out):
    nb = h.shape[1] // 42
    xsum = block_sums(x, x.size // (16 * nb))  # 16 weights per sub-block
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            for n in range(2):
                for i in range(8):
                    j = 8 * n + i
                    lo, lo_shift, hi, hi_shift, scale, low = q2_k_part(qr, hr, b, j)
                    acc = _fma_q2_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 16 * j, scale)
                    lows += low * xsum[16 * b + j]
        out[r] = sum16(acc) - lows


@jit(parallel=True)
def matvec_q3_k(q, h, x, out):
    nb = h.shape[1] // 55
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = zeros16()
        for b in range(nb):
            for n in range(2):
                for i in range(8):
                    j = 8 * n + i
                    lo, lo_shift, hi, hi_shift, scale, _ = q3_k_part(qr, hr, b, j)
                    acc = _fma_q3_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 16 * j, scale)
        out[r] = sum16(acc)


@jit(parallel=True)
def matvec_q4_k(q, h, x, out):
    nb = h.shape[1] // 72
    xsum = block_sums(x, x.size // (8 * nb))  # 32 weights per sub-block
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            for c in range(4):
                for i in range(2):
                    j = 2 * c + i
                    lo, lo_shift, hi, hi_shift, scale, low = q4_k_part(qr, hr, b, j)
                    acc = _fma_q4_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 32 * j, scale)
                    acc = _fma_q4_k(acc, qr, lo + 16, lo_shift, hi, hi_shift, x, 256 * b + 32 * j + 16, scale)
                    lows += low * xsum[8 * b + j]
        out[r] = sum16(acc) - lows


@jit(parallel=True)
def matvec_q5_k(q, h, x, out):
    nb = h.shape[1] // 88
    xsum = block_sums(x, x.size // (8 * nb))  # 32 weights per sub-block
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = zeros16()
        lows = np.float32(0.0)
        for b in range(nb):
            for c in range(4):
                for i in range(2):
                    j = 2 * c + i
                    lo, lo_shift, hi, hi_shift, scale, low = q5_k_part(qr, hr, b, j)
                    acc = _fma_q5_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 32 * j, scale)
                    acc = _fma_q5_k(acc, qr, lo + 16, lo_shift, hi + 16, hi_shift, x, 256 * b + 32 * j + 16, scale)
                    lows += low * xsum[8 * b + j]
        out[r] = sum16(acc) - lows


@jit(parallel=True)
def matvec_q6_k(q, h, x, out):
    nb = h.shape[1] // 105
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = zeros16()
        for b in range(nb):
            for n in range(2):
                for i in range(8):
                    j = 8 * n + i
                    lo, lo_shift, hi, hi_shift, scale, _ = q6_k_part(qr, hr, b, j)
                    acc = _fma_q6_k(acc, qr, lo, lo_shift, hi, hi_shift, x, 256 * b + 16 * j, scale)
        out[r] = sum16(acc)

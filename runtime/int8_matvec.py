"""Matrix x vector for decoding with integer dot products, as llama.cpp does.

The float kernels (float_matvec.py) turn every weight into a float before they
multiply: on the Q5 and K-quant types that is the bound (10-12 GB/s on two
cores, where memory gives ~28). Here x is first rounded to int8, per block of
32 with its own scale (llama.cpp's Q8_0 activations); each 32 weights are then
unpacked to bytes and multiplied by x's bytes with one instruction that sums
groups of four products into 32-bit lanes: VNNI's `vpdpbusd` where the CPU has
it, AVX2's `vpmaddubsw` + `vpmaddwd` elsewhere on x86. The 8 integer lanes
are converted to float once per 32 weights and scaled. 1.6-2x the float
kernels; Qwen2.5's Q5_0 matvec reaches ~25 GB/s on two threads.

The results differ from the float kernels by x's rounding: at most half a
step (1/254 of the block's largest |x|) per element, the same rounding
llama.cpp's CPU backend applies (it rounds K-quant activations per 256, more
coarsely). Prompt processing (matmul.py) stays in float.

Where neither instruction exists (other CPUs, or numba off), `AVAILABLE` is
False and the weight types table runs the float kernels instead: a generic
integer form compiled to 0.66-0.85x of them there.

Weights are presented to the instruction as unsigned bytes (its first
operand): types with signed weights subtract their bias afterwards, per block,
through x's block sums (sum(w x) - 16 sum(x) for Q5_0), except Q8_0, whose
bytes are signed: it multiplies |x| by the weight carrying x's sign.

As in float_matvec.py, each type's kernel is written out (no factory): numba's
on-disk cache cannot store closures over jitted functions.
"""

from __future__ import annotations

import numpy as np

from .block_layouts import q4_k_part, q5_high_bits, q5_k_part, q6_k_part
from .jit import jit, numba_enabled, prange

AVAILABLE = False  # whether this CPU has an integer dot-product instruction (below)

if numba_enabled():
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .simd import (BYTES16, DOT_FLAVOUR, FAST, SHORTS16, VNNI_512, constant, f16_to_f32, f32x16, float_vector,
                       load_vector, splat, sum16, zeros16)

    AVAILABLE = DOT_FLAVOUR is not None
    _I8 = ir.IntType(8)
    _BYTES32 = ir.VectorType(_I8, 32)
    _INTS8 = ir.VectorType(ir.IntType(32), 8)
    _FLOATS8 = ir.VectorType(ir.FloatType(), 8)

    _f32x8, _zeros8, _sum8 = float_vector(8)  # a row's running sum, reduced once per row

    def _dot(builder, unsigned, signed):
        """<8 x i32>: lane i = sum over bytes 4i..4i+3 of unsigned * signed.
        AVX2's pairwise 16-bit sums saturate past 32767: every caller keeps
        unsigned * |signed| * 2 below it (bytes under 128 times |x| <= 127)."""
        if DOT_FLAVOUR == "vnni":
            vpdpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_INTS8, [_INTS8] * 3), "llvm.x86.avx512.vpdpbusd.256")
            return builder.call(vpdpbusd, [constant(_INTS8, 0), builder.bitcast(unsigned, _INTS8),
                                           builder.bitcast(signed, _INTS8)])
        pmaddubsw = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(SHORTS16, [_BYTES32] * 2), "llvm.x86.avx2.pmadd.ub.sw")
        pmaddwd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_INTS8, [SHORTS16] * 2), "llvm.x86.avx2.pmadd.wd")
        return builder.call(pmaddwd, [builder.call(pmaddubsw, [unsigned, signed]), constant(SHORTS16, 1)])

    def _dot_fma(context, builder, acc, weights, xq_type, xq, x_start, scales):
        """acc + scales * (the 8 lanes of weights . xq[x_start:x_start + 32])."""
        xs = load_vector(context, builder, xq_type, xq, x_start, _BYTES32)
        products = builder.sitofp(_dot(builder, weights, xs), _FLOATS8)
        return builder.fadd(acc, builder.fmul(products, scales, flags=FAST), flags=FAST)

    def _nibbles(context, builder, q_type, q, start):
        """The 32 nibbles of the 16 bytes at q[start]: low ones first, then high ones."""
        packed = load_vector(context, builder, q_type, q, start, BYTES16)
        low = builder.and_(packed, constant(BYTES16, 15))
        high = builder.lshr(packed, constant(BYTES16, 4))
        return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))

    def _byte_field(context, builder, q_type, q, start, shift, bits):
        """(q[start + l] >> shift) & (2^bits - 1) for the 32 lanes l. Shifted in
        16-bit lanes (x86 has no byte shift): the mask drops what the high
        byte brings in, as every field lies inside its byte."""
        packed = builder.bitcast(load_vector(context, builder, q_type, q, start, _BYTES32), SHORTS16)
        shifted = builder.bitcast(builder.lshr(packed, splat(builder, shift, SHORTS16)), _BYTES32)
        return builder.and_(shifted, constant(_BYTES32, (1 << bits) - 1))

    index = types.intp

    @intrinsic
    def _q8_0_fma(typingctx, acc, q, start, xq, x_start, scale):
        """One Q8_0 block of signed bytes: |x| times w with x's sign (exact for
        weights in [-127, 127], all ggml writes)."""
        def codegen(context, builder, signature, args):
            acc, q, start, xq, x_start, scale = args
            w = load_vector(context, builder, signature.args[1], q, start, _BYTES32)
            xs = load_vector(context, builder, signature.args[3], xq, x_start, _BYTES32)
            negative = builder.icmp_signed("<", xs, constant(_BYTES32, 0))
            magnitude = builder.select(negative, builder.neg(xs), xs)
            signed_w = builder.select(negative, builder.neg(w), w)
            products = builder.sitofp(_dot(builder, magnitude, signed_w), _FLOATS8)
            scaled = builder.fmul(products, splat(builder, scale, _FLOATS8), flags=FAST)
            return builder.fadd(acc, scaled, flags=FAST)
        return _f32x8(acc, q, index, xq, index, types.float32), codegen

    @intrinsic
    def _q4_fma(typingctx, acc, q, start, xq, x_start, scale):
        """One Q4_0/Q4_1 block's nibbles (0-15), unbiased."""
        def codegen(context, builder, signature, args):
            acc, q, start, xq, x_start, scale = args
            w = _nibbles(context, builder, signature.args[1], q, start)
            return _dot_fma(context, builder, acc, w, signature.args[3], xq, x_start,
                            splat(builder, scale, _FLOATS8))
        return _f32x8(acc, q, index, xq, index, types.float32), codegen

    _BYTES64 = ir.VectorType(_I8, 64)
    _INTS16 = ir.VectorType(ir.IntType(32), 16)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)

    @intrinsic
    def _q4_pair_fma(typingctx, acc, q, start0, start1, xq, x_start, scale0, scale1):
        """Two Q4_0/Q4_1 blocks' nibbles (16 bytes at q[start0] and at q[start1])
        against xq[x_start:x_start + 64], in one 512-bit vpdpbusd: lanes 0-7 are
        the first block's sums, scaled by scale0, lanes 8-15 the second's. Only
        compiled where VNNI_512."""
        def codegen(context, builder, signature, args):
            acc, q, start0, start1, xq, x_start, scale0, scale1 = args
            # Both blocks' bytes in one 32-byte vector, split into nibbles there, then
            # ordered (low 0, high 0, low 1, high 1): unpacking each block on its own
            # and joining the halves made LLVM shuffle so much that it ran at half speed.
            q_type = signature.args[1]
            both = builder.shuffle_vector(load_vector(context, builder, q_type, q, start0, BYTES16),
                                          load_vector(context, builder, q_type, q, start1, BYTES16),
                                          ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
            low = builder.and_(both, constant(_BYTES32, 15))
            high = builder.lshr(both, constant(_BYTES32, 4))
            order = [*range(0, 16), *range(32, 48), *range(16, 32), *range(48, 64)]
            pair = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 64), order))
            xs = load_vector(context, builder, signature.args[4], xq, x_start, _BYTES64)
            vpdpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_INTS16, [_INTS16] * 3), "llvm.x86.avx512.vpdpbusd.512")
            sums = builder.call(vpdpbusd, [constant(_INTS16, 0), builder.bitcast(pair, _INTS16),
                                           builder.bitcast(xs, _INTS16)])
            scales = builder.shuffle_vector(splat(builder, scale0, _FLOATS8), splat(builder, scale1, _FLOATS8),
                                            ir.Constant(_INTS16, list(range(16))))
            products = builder.fmul(builder.sitofp(sums, _FLOATS16), scales, flags=FAST)
            return builder.fadd(acc, products, flags=FAST)
        f32 = types.float32
        return f32x16(acc, q, index, index, xq, index, f32, f32), codegen

    @intrinsic
    def _q5_fma(typingctx, acc, q, start, qh, xq, x_start, scale):
        """One Q5_0/Q5_1 block's 5-bit weights (0-31), unbiased: the nibbles,
        plus 16 where bit l of qh is set."""
        def codegen(context, builder, signature, args):
            acc, q, start, qh, xq, x_start, scale = args
            w = _nibbles(context, builder, signature.args[1], q, start)
            bits = builder.bitcast(builder.trunc(qh, ir.IntType(32)), ir.VectorType(ir.IntType(1), 32))
            w = builder.or_(w, builder.select(bits, constant(_BYTES32, 16), constant(_BYTES32, 0)))
            return _dot_fma(context, builder, acc, w, signature.args[4], xq, x_start,
                            splat(builder, scale, _FLOATS8))
        return _f32x8(acc, q, index, index, xq, index, types.float32), codegen

    def _k_fma(low_bits: int, high_bits: int):
        """An intrinsic fma(acc, q, lo, lo_shift, hi, hi_shift, xq, x_start, scale0, scale1):
        32 K-quant weights (unbiased) w = field(q[lo + l], lo_shift, low_bits) |
        field(q[hi + l], hi_shift, high_bits) << low_bits, their first 16 scaled
        by scale0 and the others by scale1 (two 16-weight sub-blocks, or one
        sub-block of 32 given the same scale twice)."""
        @intrinsic
        def fma(typingctx, acc, q, lo, lo_shift, hi, hi_shift, xq, x_start, scale0, scale1):
            def codegen(context, builder, signature, args):
                acc, q, lo, lo_shift, hi, hi_shift, xq, x_start, scale0, scale1 = args
                q_type = signature.args[1]
                w = _byte_field(context, builder, q_type, q, lo, lo_shift, low_bits)
                if high_bits:
                    top = _byte_field(context, builder, q_type, q, hi, hi_shift, high_bits)
                    w = builder.or_(w, builder.shl(top, constant(_BYTES32, low_bits)))
                halves = builder.shuffle_vector(splat(builder, scale0, _FLOATS8), splat(builder, scale1, _FLOATS8),
                                                ir.Constant(_INTS8, [0, 1, 2, 3, 12, 13, 14, 15]))
                return _dot_fma(context, builder, acc, w, signature.args[6], xq, x_start, halves)
            f32 = types.float32
            return _f32x8(acc, q, index, index, index, index, xq, index, f32, f32), codegen
        return fma

    _q4_k_fma = _k_fma(4, 0)
    _q5_k_fma = _k_fma(4, 1)
    _q6_k_fma = _k_fma(4, 2)


@jit()
def quantize_x(x):
    """x rounded to int8 per block of 32 (scale = the block's max |x| / 127,
    round half to even), the scales, and sums of the rounded x per 16 times
    their block's scale (for the biases and minimums)."""
    nb = x.size // 32
    xq = np.empty(x.size, np.int8)
    scales = np.empty(nb, np.float32)
    sums16 = np.empty(2 * nb, np.float32)
    for b in range(nb):
        xb = x[32 * b:32 * b + 32]
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(xb[j]))
        d = amax / np.float32(127.0)
        inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        for half in range(2):
            s = np.int32(0)
            for j in range(16 * half, 16 * half + 16):
                v = np.int32(np.rint(xb[j] * inverse))
                xq[32 * b + j] = v
                s += v
            sums16[2 * b + half] = np.float32(s) * d
        scales[b] = d
    return xq, scales, sums16


@jit(parallel=True)
def matvec_q8_0(q, d, x, out):
    nb = d.shape[1] // 17
    xq, xd, _ = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = _zeros8()
        for b in range(nb):
            acc = _q8_0_fma(acc, qr, 34 * b + 2, xq, 32 * b, f16_to_f32(dr[17 * b]) * xd[b])
        out[r] = _sum8(acc)


@jit()
def _block_sums32(xs16):
    """x's rounded sums per block of 32 (times their scale), from those per 16."""
    sums = np.empty(xs16.size // 2, np.float32)
    for b in range(sums.size):
        sums[b] = xs16[2 * b] + xs16[2 * b + 1]
    return sums


@jit(parallel=True)
def _matvec_q4_0_wide(q, d, x, out):
    """matvec_q4_0 two blocks at a time (VNNI_512). An odd last block is added
    in a loop of its own: a branch for it inside the row loop halved the speed."""
    nb = d.shape[1] // 9
    xq, xd, xs16 = quantize_x(x)
    xs = _block_sums32(xs16)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        bias = np.float32(0.0)
        for c in range(nb // 2):
            b = 2 * c
            s0 = f16_to_f32(dr[9 * b])
            s1 = f16_to_f32(dr[9 * b + 9])
            acc = _q4_pair_fma(acc, qr, 18 * b + 2, 18 * b + 20, xq, 32 * b, s0 * xd[b], s1 * xd[b + 1])
            bias += s0 * xs[b] + s1 * xs[b + 1]
        out[r] = sum16(acc) - np.float32(8.0) * bias
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            scale = f16_to_f32(d[r, 9 * b])
            tail = _sum8(_q4_fma(_zeros8(), q[r], 18 * b + 2, xq, 32 * b, scale * xd[b]))
            out[r] += tail - np.float32(8.0) * scale * xs[b]


@jit(parallel=True)
def _matvec_q4_1_wide(q, d, x, out):
    """matvec_q4_1 two blocks at a time (VNNI_512), an odd last block as in _matvec_q4_0_wide."""
    nb = d.shape[1] // 10
    xq, xd, xs16 = quantize_x(x)
    xs = _block_sums32(xs16)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        lows = np.float32(0.0)
        for c in range(nb // 2):
            b = 2 * c
            acc = _q4_pair_fma(acc, qr, 20 * b + 4, 20 * b + 24, xq, 32 * b,
                               f16_to_f32(dr[10 * b]) * xd[b], f16_to_f32(dr[10 * b + 10]) * xd[b + 1])
            lows += f16_to_f32(dr[10 * b + 1]) * xs[b] + f16_to_f32(dr[10 * b + 11]) * xs[b + 1]
        out[r] = sum16(acc) + lows
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            tail = _sum8(_q4_fma(_zeros8(), q[r], 20 * b + 4, xq, 32 * b, f16_to_f32(d[r, 10 * b]) * xd[b]))
            out[r] += tail + f16_to_f32(d[r, 10 * b + 1]) * xs[b]


@jit(parallel=True)
def matvec_q4_0(q, d, x, out):
    # w = (n - 8) d: a block adds d dx (sum(n xq) - 8 sum(xq)).
    nb = d.shape[1] // 9
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = _zeros8()
        bias = np.float32(0.0)
        for b in range(nb):
            scale = f16_to_f32(dr[9 * b])
            acc = _q4_fma(acc, qr, 18 * b + 2, xq, 32 * b, scale * xd[b])
            bias += scale * (xs[2 * b] + xs[2 * b + 1])
        out[r] = _sum8(acc) - np.float32(8.0) * bias


@jit(parallel=True)
def matvec_q4_1(q, d, x, out):
    # w = n d + m: a block adds d dx sum(n xq) + m dx sum(xq).
    nb = d.shape[1] // 10
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = _zeros8()
        lows = np.float32(0.0)
        for b in range(nb):
            acc = _q4_fma(acc, qr, 20 * b + 4, xq, 32 * b, f16_to_f32(dr[10 * b]) * xd[b])
            lows += f16_to_f32(dr[10 * b + 1]) * (xs[2 * b] + xs[2 * b + 1])
        out[r] = _sum8(acc) + lows


@jit(parallel=True)
def matvec_q5_0(q, h, x, out):
    # w = (n + 16 bit - 16) d
    nb = h.shape[1] // 11
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros8()
        bias = np.float32(0.0)
        for b in range(nb):
            scale = f16_to_f32(hr[11 * b])
            acc = _q5_fma(acc, qr, 22 * b + 6, q5_high_bits(hr, 11 * b + 1), xq, 32 * b, scale * xd[b])
            bias += scale * (xs[2 * b] + xs[2 * b + 1])
        out[r] = _sum8(acc) - np.float32(16.0) * bias


@jit(parallel=True)
def matvec_q5_1(q, h, x, out):
    # w = (n + 16 bit) d + m
    nb = h.shape[1] // 12
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros8()
        lows = np.float32(0.0)
        for b in range(nb):
            acc = _q5_fma(acc, qr, 24 * b + 8, q5_high_bits(hr, 12 * b + 2), xq, 32 * b,
                          f16_to_f32(hr[12 * b]) * xd[b])
            lows += f16_to_f32(hr[12 * b + 1]) * (xs[2 * b] + xs[2 * b + 1])
        out[r] = _sum8(acc) + lows


# K-quants: the layouts are block_layouts' `*_part` functions; sub-block j's
# weights are scale * w - low. Constant nested loops, as in float_matvec.py.


@jit(parallel=True)
def matvec_q4_k(q, h, x, out):
    nb = h.shape[1] // 72
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros8()
        lows = np.float32(0.0)
        for b in range(nb):
            for c in range(4):
                for i in range(2):
                    j = 2 * c + i
                    lo, lo_shift, hi, hi_shift, scale, low = q4_k_part(qr, hr, b, j)
                    sub = 8 * b + j  # x's 32-weight block
                    scale = scale * xd[sub]
                    acc = _q4_k_fma(acc, qr, lo, lo_shift, hi, hi_shift, xq, 32 * sub, scale, scale)
                    lows += low * (xs[2 * sub] + xs[2 * sub + 1])
        out[r] = _sum8(acc) - lows


@jit(parallel=True)
def matvec_q5_k(q, h, x, out):
    nb = h.shape[1] // 88
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros8()
        lows = np.float32(0.0)
        for b in range(nb):
            for c in range(4):
                for i in range(2):
                    j = 2 * c + i
                    lo, lo_shift, hi, hi_shift, scale, low = q5_k_part(qr, hr, b, j)
                    sub = 8 * b + j
                    scale = scale * xd[sub]
                    acc = _q5_k_fma(acc, qr, lo, lo_shift, hi, hi_shift, xq, 32 * sub, scale, scale)
                    lows += low * (xs[2 * sub] + xs[2 * sub + 1])
        out[r] = _sum8(acc) - lows


@jit(parallel=True)
def matvec_q6_k(q, h, x, out):
    # Sub-blocks of 16 taken in pairs (j, j + 1): their bytes lie side by side.
    # w = scale (n - 32).
    nb = h.shape[1] // 105
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        acc = _zeros8()
        bias = np.float32(0.0)
        for b in range(nb):
            for n in range(2):
                for i in range(4):
                    j = 8 * n + 2 * i
                    lo, lo_shift, hi, hi_shift, scale0, _ = q6_k_part(qr, hr, b, j)
                    scale1 = q6_k_part(qr, hr, b, j + 1)[4]
                    sub = 8 * b + j // 2
                    acc = _q6_k_fma(acc, qr, lo, lo_shift, hi, hi_shift, xq, 32 * sub,
                                    scale0 * xd[sub], scale1 * xd[sub])
                    bias += scale0 * xs[2 * sub] + scale1 * xs[2 * sub + 1]
        out[r] = _sum8(acc) - np.float32(32.0) * bias


# Where the CPU has 512-bit VNNI, the types that have a two-block form use it.
if AVAILABLE and VNNI_512:
    matvec_q4_0 = _matvec_q4_0_wide  # noqa: F811
    matvec_q4_1 = _matvec_q4_1_wide  # noqa: F811

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

What bounds these loops is instructions and chains of dependent additions,
not the multiplies, so: the 32-weight types step through pairs of blocks (one
load, mask and shift unpack both blocks' nibbles, against x re-laid per pair
by `pair_x`); the K-quants decode a 256-weight block's 8 scales into one
vector and multiply them by x's scales there; every row keeps two or more
running sums. On AVX2 (Zen 3, one thread, 1024x4096 from cache) that made
Q4_0 1.6x, Q4_1 2.1x, Q4_K 1.5-2.1x, Q5_K 1.6x and Q6_K 1.7-2.3x faster;
Q5_0's fifth bits (7 instructions per 32 weights to spread) keep it at 1.1x.

As in float_matvec.py, each type's kernel is written out (no factory): numba's
on-disk cache cannot store closures over jitted functions. The steps are code
generators that int8_batch.py (several rows of x at once) shares, their float
operations kept in the order written (simd.ORDERED), so both round alike.
"""

from __future__ import annotations

import numpy as np

from .block_layouts import k4_scale_min_bytes, q5_high_bits
from .jit import jit, numba_enabled, prange

AVAILABLE = False  # whether this CPU has an integer dot-product instruction (below)

if numba_enabled():
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .simd import (BYTES16, DOT_FLAVOUR, FLOATS16, ORDERED, PREFETCH_AHEAD, SHORTS16, VNNI_512, constant, f16_splat,
                       f16_to_f32, f16_two_pairs, float_vector, int64, prefetch, load_vector, rounded_block, splat)

    AVAILABLE = DOT_FLAVOUR is not None
    _I8 = ir.IntType(8)
    BYTES32 = ir.VectorType(_I8, 32)
    INTS8 = ir.VectorType(ir.IntType(32), 8)
    FLOATS8 = ir.VectorType(ir.FloatType(), 8)

    # A row's running sums, reduced once per row, in a fixed order (see simd.ORDERED).
    f32x8, zeros8, sum8 = float_vector(8, ordered=True)
    f32x16, zeros16, sum16 = float_vector(16, ordered=True)

    def byte_dot(builder, unsigned, signed):
        """<8 x i32>: lane i = sum over bytes 4i..4i+3 of unsigned * signed.
        AVX2's pairwise 16-bit sums saturate past 32767: every caller keeps
        unsigned * |signed| * 2 below it (bytes under 128 times |x| <= 127)."""
        if DOT_FLAVOUR == "vnni":
            vpdpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(INTS8, [INTS8] * 3), "llvm.x86.avx512.vpdpbusd.256")
            return builder.call(vpdpbusd, [constant(INTS8, 0), builder.bitcast(unsigned, INTS8),
                                           builder.bitcast(signed, INTS8)])
        pmaddubsw = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(SHORTS16, [BYTES32] * 2), "llvm.x86.avx2.pmadd.ub.sw")
        pmaddwd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(INTS8, [SHORTS16] * 2), "llvm.x86.avx2.pmadd.wd")
        return builder.call(pmaddwd, [builder.call(pmaddubsw, [unsigned, signed]), constant(SHORTS16, 1)])

    def dot_fma(context, builder, acc, weights, xq_type, xq, x_start, scales):
        """acc + scales * (the 8 lanes of weights . xq[x_start:x_start + 32])."""
        xs = load_vector(context, builder, xq_type, xq, x_start, BYTES32)
        products = builder.sitofp(byte_dot(builder, weights, xs), FLOATS8)
        return builder.fadd(acc, builder.fmul(products, scales, flags=ORDERED), flags=ORDERED)

    def block_nibbles(context, builder, q_type, q, start):
        """The 32 nibbles of the 16 bytes at q[start]: low ones first, then high ones."""
        packed = load_vector(context, builder, q_type, q, start, BYTES16)
        low = builder.and_(packed, constant(BYTES16, 15))
        high = builder.lshr(packed, constant(BYTES16, 4))
        return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))

    def byte_field(context, builder, q_type, q, start, shift, bits):
        """(q[start + l] >> shift) & (2^bits - 1) for the 32 lanes l. Shifted in
        16-bit lanes (x86 has no byte shift): the mask drops what the high
        byte brings in, as every field lies inside its byte."""
        packed = builder.bitcast(load_vector(context, builder, q_type, q, start, BYTES32), SHORTS16)
        shifted = builder.bitcast(builder.lshr(packed, splat(builder, shift, SHORTS16)), BYTES32)
        return builder.and_(shifted, constant(BYTES32, (1 << bits) - 1))

    index = types.intp

    @intrinsic
    def q8_0_fma(typingctx, acc, q, start, xq, x_start, scale):
        """One Q8_0 block of signed bytes: |x| times w with x's sign (exact for
        weights in [-127, 127], all ggml writes)."""
        def codegen(context, builder, signature, args):
            acc, q, start, xq, x_start, scale = args
            w = load_vector(context, builder, signature.args[1], q, start, BYTES32)
            xs = load_vector(context, builder, signature.args[3], xq, x_start, BYTES32)
            negative = builder.icmp_signed("<", xs, constant(BYTES32, 0))
            magnitude = builder.select(negative, builder.neg(xs), xs)
            signed_w = builder.select(negative, builder.neg(w), w)
            products = builder.sitofp(byte_dot(builder, magnitude, signed_w), FLOATS8)
            scaled = builder.fmul(products, splat(builder, scale, FLOATS8), flags=ORDERED)
            return builder.fadd(acc, scaled, flags=ORDERED)
        return f32x8(acc, q, index, xq, index, types.float32), codegen

    @intrinsic
    def q4_fma(typingctx, acc, q, start, xq, x_start, scale):
        """One Q4_0/Q4_1 block's nibbles (0-15), unbiased."""
        def codegen(context, builder, signature, args):
            acc, q, start, xq, x_start, scale = args
            w = block_nibbles(context, builder, signature.args[1], q, start)
            return dot_fma(context, builder, acc, w, signature.args[3], xq, x_start,
                            splat(builder, scale, FLOATS8))
        return f32x8(acc, q, index, xq, index, types.float32), codegen

    BYTES64 = ir.VectorType(_I8, 64)
    INTS16 = ir.VectorType(ir.IntType(32), 16)

    def wide_pair_nibbles(context, builder, q_type, q, start0, start1):
        """<64 x i8>: two Q4_0/Q4_1 blocks' nibbles (16 bytes at q[start0] and at
        q[start1]) in the order of their weights."""
        # Both blocks' bytes in one 32-byte vector, split into nibbles there, then
        # ordered (low 0, high 0, low 1, high 1): unpacking each block on its own
        # and joining the halves made LLVM shuffle so much that it ran at half speed.
        both = builder.shuffle_vector(load_vector(context, builder, q_type, q, start0, BYTES16),
                                      load_vector(context, builder, q_type, q, start1, BYTES16),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
        low = builder.and_(both, constant(BYTES32, 15))
        high = builder.lshr(both, constant(BYTES32, 4))
        order = [*range(0, 16), *range(32, 48), *range(16, 32), *range(48, 64)]
        return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 64), order))

    def pair_splat(builder, scale0, scale1):
        """[scale0 x8, scale1 x8]: a pair of blocks' scales, lane for lane with their sums."""
        return builder.shuffle_vector(splat(builder, scale0, FLOATS8), splat(builder, scale1, FLOATS8),
                                      ir.Constant(INTS16, list(range(16))))

    def wide_pair_fma(context, builder, acc, pair, x_type, xq, x_start, scales):
        """acc + scales * (64 weights `pair` . xq[x_start:x_start + 64]), in one 512-bit
        vpdpbusd: lanes 0-7 the first 32 weights' sums, 8-15 the others' (scales:
        pair_splat of the two blocks' scales)."""
        xs = load_vector(context, builder, x_type, xq, x_start, BYTES64)
        vpdpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(INTS16, [INTS16] * 3), "llvm.x86.avx512.vpdpbusd.512")
        sums = builder.call(vpdpbusd, [constant(INTS16, 0), builder.bitcast(pair, INTS16),
                                       builder.bitcast(xs, INTS16)])
        products = builder.fmul(builder.sitofp(sums, FLOATS16), scales, flags=ORDERED)
        return builder.fadd(acc, products, flags=ORDERED)

    @intrinsic
    def q4_pair_fma(typingctx, acc, q, start0, start1, xq, x_start, scale0, scale1):
        """Two Q4_0/Q4_1 blocks' nibbles (16 bytes at q[start0] and at q[start1])
        against xq[x_start:x_start + 64] (wide_pair_fma). Only compiled where VNNI_512."""
        def codegen(context, builder, signature, args):
            acc, q, start0, start1, xq, x_start, scale0, scale1 = args
            pair = wide_pair_nibbles(context, builder, signature.args[1], q, start0, start1)
            return wide_pair_fma(context, builder, acc, pair, signature.args[4], xq, x_start,
                                 pair_splat(builder, scale0, scale1))
        f32 = types.float32
        return f32x16(acc, q, index, index, xq, index, f32, f32), codegen

    @intrinsic
    def q8_0_pair_fma(typingctx, acc, q, start0, start1, xq, x_start, lane_sums, lanes, scale0, scale1):
        """Two Q8_0 blocks (32 signed bytes at q[start0] and at q[start1]) against
        xq[x_start:x_start + 64], in one 512-bit vpdpbusd: the weights as unsigned
        bytes w + 128, their sums started from minus what the 128 adds
        (lane_sums[lanes:lanes + 16], minus_lane_sums128), which leaves exactly the
        signed products' sums. Only compiled where VNNI_512."""
        def codegen(context, builder, signature, args):
            acc, q, start0, start1, xq, x_start, lane_sums, lanes, scale0, scale1 = args
            return q8_0_wide_fma(context, builder, signature.args, acc, q, start0, start1, xq, x_start, lane_sums,
                                 lanes, pair_splat(builder, scale0, scale1))
        f32 = types.float32
        return f32x16(acc, q, index, index, xq, index, lane_sums, index, f32, f32), codegen

    def q8_0_wide_fma(context, builder, arg_types, acc, q, start0, start1, xq, x_start, lane_sums, lanes, scales):
        """q8_0_pair_fma's step with the pair's scales as a vector (pair_splat);
        arg_types are the types of its first eight arguments."""
        both = builder.shuffle_vector(load_vector(context, builder, arg_types[1], q, start0, BYTES32),
                                      load_vector(context, builder, arg_types[1], q, start1, BYTES32),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 64), list(range(64))))
        unsigned = builder.xor(both, constant(BYTES64, -128))
        xs = load_vector(context, builder, arg_types[4], xq, x_start, BYTES64)
        vpdpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(INTS16, [INTS16] * 3), "llvm.x86.avx512.vpdpbusd.512")
        # the sums start from what the 128 adds, taken off: no subtraction per step
        offsets = load_vector(context, builder, arg_types[6], lane_sums, lanes, INTS16)
        sums = builder.call(vpdpbusd, [offsets, builder.bitcast(unsigned, INTS16), builder.bitcast(xs, INTS16)])
        products = builder.fmul(builder.sitofp(sums, FLOATS16), scales, flags=ORDERED)
        return builder.fadd(acc, products, flags=ORDERED)

    @intrinsic
    def q5_fma(typingctx, acc, q, start, qh, xq, x_start, scale):
        """One Q5_0/Q5_1 block's 5-bit weights (0-31), unbiased: the nibbles,
        plus 16 where bit l of qh is set."""
        def codegen(context, builder, signature, args):
            acc, q, start, qh, xq, x_start, scale = args
            w = block_nibbles(context, builder, signature.args[1], q, start)
            bits = builder.bitcast(builder.trunc(qh, ir.IntType(32)), ir.VectorType(ir.IntType(1), 32))
            w = builder.or_(w, builder.select(bits, constant(BYTES32, 16), constant(BYTES32, 0)))
            return dot_fma(context, builder, acc, w, signature.args[4], xq, x_start,
                            splat(builder, scale, FLOATS8))
        return f32x8(acc, q, index, index, xq, index, types.float32), codegen

    def k_weights(context, builder, q_type, q, lo, lo_shift, hi, hi_shift, low_bits: int, high_bits: int):
        """32 K-quant weights (unbiased) w = field(q[lo + l], lo_shift, low_bits) |
        field(q[hi + l], hi_shift, high_bits) << low_bits."""
        w = byte_field(context, builder, q_type, q, lo, lo_shift, low_bits)
        if high_bits:
            top = byte_field(context, builder, q_type, q, hi, hi_shift, high_bits)
            w = builder.or_(w, builder.shl(top, constant(BYTES32, low_bits)))
        return w

    def sub_block_pair_fma(context, builder, acc, w, x_type, xq, x_start, scale0, scale1):
        """acc + (32 weights w . xq[x_start:x_start + 32]), the first 16 products
        scaled by scale0 and the others by scale1 (two 16-weight sub-blocks, or one
        sub-block of 32 given the same scale twice)."""
        halves = builder.shuffle_vector(splat(builder, scale0, FLOATS8), splat(builder, scale1, FLOATS8),
                                        ir.Constant(INTS8, [0, 1, 2, 3, 12, 13, 14, 15]))
        return dot_fma(context, builder, acc, w, x_type, xq, x_start, halves)

    # Two blocks per step (the 32-weight types): both blocks' 16 quant bytes in one
    # 32-byte vector, so one mask and one shift unpack 64 nibbles, against x laid out
    # per pair of blocks by `pair_x`; two blocks' scales come as one vector. On AVX2
    # this halved the instructions per block (Q4_0 4096x4096 on one thread: 1.74x).
    _SHORTS8 = ir.VectorType(ir.IntType(16), 8)

    def half_pair(context, builder, h_type, h, i0, i1):
        """[h[i0] x4, h[i1] x4] as floats: two blocks' float16 fields, one per half."""
        data = context.make_array(h_type)(context, builder, h).data
        both = ir.Constant(_SHORTS8, ir.Undefined)
        for lane, i in enumerate((i0, i1)):
            both = builder.insert_element(both, builder.load(builder.gep(data, [i])), ir.Constant(ir.IntType(32), lane))
        spread = builder.shuffle_vector(both, ir.Constant(_SHORTS8, ir.Undefined),
                                        ir.Constant(INTS8, [0] * 4 + [1] * 4))
        return builder.fpext(builder.bitcast(spread, ir.VectorType(ir.HalfType(), 8)), FLOATS8)

    def pair_byte_dot(builder, low, x_low, high, x_high):
        """<8 x i32>: byte_dot(low, x_low) + byte_dot(high, x_high). AVX2 adds the 16-bit pair
        sums before widening them, once for both: each is at most 2 * 31 * 127, so
        their sum stays below 32767."""
        if DOT_FLAVOUR == "vnni":
            return builder.add(byte_dot(builder, low, x_low), byte_dot(builder, high, x_high))
        pmaddubsw = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(SHORTS16, [BYTES32] * 2), "llvm.x86.avx2.pmadd.ub.sw")
        pmaddwd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(INTS8, [SHORTS16] * 2), "llvm.x86.avx2.pmadd.wd")
        pair_sums = builder.add(builder.call(pmaddubsw, [low, x_low]), builder.call(pmaddubsw, [high, x_high]))
        return builder.call(pmaddwd, [pair_sums, constant(SHORTS16, 1)])

    def fifth_bits(builder, bits):
        """32 bytes of 16 where bit l of the i64 `bits` is set, else 0."""
        mask = builder.bitcast(builder.trunc(bits, ir.IntType(32)), ir.VectorType(ir.IntType(1), 32))
        return builder.select(mask, constant(BYTES32, 16), constant(BYTES32, 0))

    def pair_nibbles(context, builder, q_type, q, start0, start1, high_low, high_high):
        """Two blocks' weights (16 quant bytes at q[start0] and q[start1]) in the order
        of `pair_x`: (low nibbles of both, high nibbles of both), each nibble plus 16
        where its fifth bit (high_low for the low nibbles, high_high for the high
        ones) is set, when those are given (not None)."""
        both = builder.shuffle_vector(load_vector(context, builder, q_type, q, start0, BYTES16),
                                      load_vector(context, builder, q_type, q, start1, BYTES16),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
        low = builder.and_(both, constant(BYTES32, 15))
        shifted = builder.lshr(builder.bitcast(both, SHORTS16), constant(SHORTS16, 4))
        high = builder.and_(builder.bitcast(shifted, BYTES32), constant(BYTES32, 15))
        if high_low is not None:
            low = builder.or_(low, fifth_bits(builder, high_low))
            high = builder.or_(high, fifth_bits(builder, high_high))
        return low, high

    def two_block_fma(context, builder, signature, acc, low, high, weight_scales, xp, xd8, sums8, p, bias: int):
        """acc + weight_scales() * xd8[8p:8p+8] * (w . x - bias * sums8[8p:8p+8]) for the
        pair of blocks p, w = (low, high) from pair_nibbles; xp, xd8 and sums8 are
        the last three arguments but one of `signature` (pair_x's layout). The
        weights' scales are emitted where this order needs them: with fast-math,
        LLVM's reassociation follows the order of instructions, and the batched
        kernels (int8_batch.py) must round as the matvecs do, bit for bit."""
        x_type, xd8_type, sums8_type = signature.args[-4:-1]
        x_low = load_vector(context, builder, x_type, xp, builder.mul(p, int64(64)), BYTES32)
        x_high = load_vector(context, builder, x_type, xp, builder.add(builder.mul(p, int64(64)), int64(32)),
                             BYTES32)
        dot = pair_byte_dot(builder, low, x_low, high, x_high)
        lanes = builder.mul(p, int64(8))
        if bias:
            sums = load_vector(context, builder, sums8_type, sums8, lanes, INTS8)
            dot = builder.sub(dot, builder.mul(sums, constant(INTS8, bias)))
        x_scales = load_vector(context, builder, xd8_type, xd8, lanes, FLOATS8)
        scales = builder.fmul(weight_scales(), x_scales, flags=ORDERED)
        products = builder.fmul(builder.sitofp(dot, FLOATS8), scales, flags=ORDERED)
        return builder.fadd(acc, products, flags=ORDERED)

    def _two_block_fma(fifth_bit: bool, bias: int):
        """An intrinsic fma(acc, q, start0, start1, high_low, high_high, h, i0, i1, xp, xd8, sums8, p):
        acc + [d0 x4, d1 x4] * xd8[8p:8p+8] * (n . x - bias * sums8[8p:8p+8]) for the
        pair of blocks p, whose quant bytes lie at q[start0] and q[start1] and float16
        scales at h[i0] and h[i1]; n are the nibbles, plus 16 where the fifth bits
        (high_low for the low nibbles, high_high for the high ones) are set."""
        @intrinsic
        def fma(typingctx, acc, q, start0, start1, high_low, high_high, h, i0, i1, xp, xd8, sums8, p):
            def codegen(context, builder, signature, args):
                acc, q, start0, start1, high_low, high_high, h, i0, i1, xp, xd8, sums8, p = args
                low, high = pair_nibbles(context, builder, signature.args[1], q, start0, start1,
                                         *((high_low, high_high) if fifth_bit else (None, None)))
                def weight_scales():
                    return half_pair(context, builder, signature.args[6], h, i0, i1)
                return two_block_fma(context, builder, signature, acc, low, high, weight_scales, xp, xd8, sums8, p,
                                     bias)
            return f32x8(acc, q, index, index, types.int64, types.int64, h, index, index, xp, xd8, sums8,
                         index), codegen
        return fma

    # K-quants, a 256-weight block at a time: its 8 sub-block scales (and minimums)
    # decoded together into one vector and multiplied by x's 8 scales there; each
    # sub-block then takes its lane. Scalar scale arithmetic per sub-block had been
    # most of the loop.
    def byte_values(context, builder, packed, h_type, h, i):
        """float(byte j of the uint64 packed) * the float16 h[i], j = 0-7."""
        values = builder.uitofp(builder.zext(builder.bitcast(packed, ir.VectorType(_I8, 8)), INTS8), FLOATS8)
        return builder.fmul(values, f16_splat(context, builder, h_type, h, i, 8), flags=ORDERED)

    @intrinsic
    def byte_lanes(typingctx, packed, h, i, v, start):
        """float(byte j of the uint64 packed) * the float16 h[i] * v[start + j], j = 0-7."""
        def codegen(context, builder, signature, args):
            packed, h, i, v, start = args
            scaled = byte_values(context, builder, packed, signature.args[1], h, i)
            return builder.fmul(scaled, load_vector(context, builder, signature.args[3], v, start, FLOATS8),
                                flags=ORDERED)
        return f32x8(types.uint64, h, index, v, index), codegen

    @intrinsic
    def add8(typingctx, a, b):
        def codegen(context, builder, signature, args):
            return builder.fadd(args[0], args[1], flags=ORDERED)
        return a(a, b), codegen

    def nibble_halves(context, builder, q_type, q, start, high_bits, shift):
        """Two 32-weight K-quant sub-blocks from the 32 bytes at q[start]: (low
        nibbles, high nibbles), plus, when high_bits is not None, bits shift and
        shift + 1 of the 32 bytes at q[high_bits] as each one's fifth bit."""
        low = builder.and_(load_vector(context, builder, q_type, q, start, BYTES32), constant(BYTES32, 15))
        high = byte_field(context, builder, q_type, q, start, int64(4), 4)
        if high_bits is not None:
            low = builder.or_(low, builder.shl(byte_field(context, builder, q_type, q, high_bits, shift, 1),
                                               constant(BYTES32, 4)))
            high = builder.or_(high, builder.shl(byte_field(context, builder, q_type, q, high_bits,
                                                            builder.add(shift, int64(1)), 1),
                                                 constant(BYTES32, 4)))
        return low, high

    def halves_fma(context, builder, acc, low, high, x_type, xq, x_start, scales, j):
        """acc + lane j of scales * (low . xq[x_start:+32]) + lane j + 1 * (high . the next 32)."""
        first = byte_dot(builder, low, load_vector(context, builder, x_type, xq, x_start, BYTES32))
        second = byte_dot(builder, high, load_vector(context, builder, x_type, xq,
                                                     builder.add(x_start, int64(32)), BYTES32))
        scale0 = splat(builder, builder.extract_element(scales, j), FLOATS8)
        scale1 = splat(builder, builder.extract_element(scales, builder.add(j, int64(1))), FLOATS8)
        both = builder.fadd(builder.fmul(builder.sitofp(first, FLOATS8), scale0, flags=ORDERED),
                            builder.fmul(builder.sitofp(second, FLOATS8), scale1, flags=ORDERED), flags=ORDERED)
        return builder.fadd(acc, both, flags=ORDERED)

    @intrinsic
    def nibble_halves_fma(typingctx, acc, q, start, xq, x_start, scales, j, high_bits, shift):
        """Two 32-weight sub-blocks j, j + 1 from the 32 bytes at q[start] (nibble_halves:
        the low nibbles are j's weights, against xq[x_start:+32], the high ones j + 1's,
        against the next 32): halves_fma."""
        def codegen(context, builder, signature, args):
            acc, q, start, xq, x_start, scales, j, high_bits, shift = args
            fifth = None if isinstance(signature.args[7], types.NoneType) else high_bits
            low, high = nibble_halves(context, builder, signature.args[1], q, start, fifth, shift)
            return halves_fma(context, builder, acc, low, high, signature.args[3], xq, x_start, scales, j)
        return f32x8(acc, q, index, xq, index, scales, index, high_bits, index), codegen

    _SHORTS32 = ir.VectorType(ir.IntType(16), 32)

    def twice_field(context, builder, q_type, q, start, shift0, shift1, bits):
        """<64 x i8>: the 32 bytes at q[start] twice, lanes 0-31 (q[start + l] >> shift0)
        & (2^bits - 1) and lanes 32-63 the same with shift1: both halves of a K-quant
        byte (or two of its bit fields) in one 512-bit shift, where byte_field took
        one 256-bit shift each and a join."""
        packed = load_vector(context, builder, q_type, q, start, BYTES32)
        both = builder.shuffle_vector(packed, packed, ir.Constant(ir.VectorType(ir.IntType(32), 64), list(range(64))))
        shifts = builder.shuffle_vector(splat(builder, shift0, SHORTS16), splat(builder, shift1, SHORTS16),
                                        ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
        shifted = builder.lshr(builder.bitcast(both, _SHORTS32), shifts)
        return builder.and_(builder.bitcast(shifted, BYTES64), constant(BYTES64, (1 << bits) - 1))

    def spread_lanes(builder, scales, first, width):
        """<16 x float>: lanes width * i..width * (i + 1) - 1 all scales[first + i], from the
        8-lane `scales`: one vpermps (a shuffle once `first` is a constant), where
        extracting and broadcasting each lane took several instructions."""
        doubled = builder.shuffle_vector(scales, scales, ir.Constant(INTS16, list(range(16))))
        picks = builder.add(splat(builder, first, INTS16), ir.Constant(INTS16, [i // width for i in range(16)]))
        permute = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(FLOATS16, [FLOATS16, INTS16]), "llvm.x86.avx512.permvar.sf.512")
        return builder.call(permute, [doubled, picks])

    def wide_fma(context, builder, acc, weights, x_type, xq, x_start, scales, first, width):
        """wide_pair_fma of 64 weights, lanes width * i.. scaled by scales[first + i]."""
        return wide_pair_fma(context, builder, acc, weights, x_type, xq, x_start,
                             spread_lanes(builder, scales, first, width))

    @intrinsic
    def nibble_halves_wide_fma(typingctx, acc, q, start, xq, x_start, scales, j, high_bits, shift):
        """nibble_halves_fma in one 512-bit step (VNNI_512): both sub-blocks' 64 weights
        against xq[x_start:x_start + 64] in one vpdpbusd (wide_pair_fma), lanes 0-7
        sub-block j's sums and 8-15 sub-block j + 1's, each scaled by its lane of scales.
        Half the instructions per row of x of the two 256-bit steps."""
        def codegen(context, builder, signature, args):
            acc, q, start, xq, x_start, scales, j, high_bits, shift = args
            q_type = signature.args[1]
            pair = twice_field(context, builder, q_type, q, start, int64(0), int64(4), 4)
            if not isinstance(signature.args[7], types.NoneType):  # the fifth bits: bits shift, shift + 1
                fifth = twice_field(context, builder, q_type, q, high_bits, shift, builder.add(shift, int64(1)), 1)
                pair = builder.or_(pair, builder.shl(fifth, constant(BYTES64, 4)))
            return wide_fma(context, builder, acc, pair, signature.args[3], xq, x_start, scales, j, 8)
        return f32x16(acc, q, index, xq, index, scales, index, high_bits, index), codegen

    # The K-quants' sub-block pairs (matvec_q4_k, matvec_q5_k and int8_batch's tiles of
    # them, which must round alike): one 512-bit step where the CPU has 512-bit VNNI,
    # else two 256-bit ones. The 512-bit form halves the float work per row of x (the
    # part the rows of a batch do not share): on Emerald Rapids, from the cache, Q4_K's
    # matvec took 0.76-0.89x the time of the 256-bit form and four rows 0.66-0.81x;
    # Q5_K 1.0x and 0.73x; Q6_K (q6_k_quad) 0.79-1.04x and 0.69-0.89x. A 1B Q4_K_M
    # model decoded 1.37x llama.cpp (1.28x before), four rows from memory 0.83x.
    if VNNI_512:
        k_zeros, k_sum, k_halves_fma = zeros16, sum16, nibble_halves_wide_fma
    else:
        k_zeros, k_sum, k_halves_fma = zeros8, sum8, nibble_halves_fma

    def q6_k_quad_fma(context, builder, acc, weights, x_type, xq, x_start, scales, lane):
        """acc + Q6_K's four 16-weight sub-blocks lane..lane + 3: 64 weights (q6_k_quad_weights'
        form) against xq[x_start:x_start + 64], each sub-block scaled by its lane of the
        8-lane scales. One 512-bit vpdpbusd where the CPU has 512-bit VNNI (lanes 4i..4i + 3
        are sub-block lane + i's), else two 256-bit steps (sub_block_pair_fma)."""
        if VNNI_512:
            return wide_fma(context, builder, acc, weights[0], x_type, xq, x_start, scales, lane, 4)
        for half, w in enumerate(weights):
            acc = sub_block_pair_fma(context, builder, acc, w, x_type, xq, builder.add(x_start, int64(32 * half)),
                                     builder.extract_element(scales, builder.add(lane, int64(2 * half))),
                                     builder.extract_element(scales, builder.add(lane, int64(2 * half + 1))))
        return acc

    def q6_k_quad_weights(context, builder, q_type, q, lo, hi, shift):
        """The 64 Q6_K weights whose low 4 bits are bits shift.. of q[lo:lo + 64] and high 2
        bits are bits shift.. (the first 32) and shift + 2.. (the others) of q[hi:hi + 32]:
        one <64 x i8> where the CPU has 512-bit VNNI (512-bit shifts: the low bits from 64
        bytes, the high ones from 32 twice), else two <32 x i8> (k_weights)."""
        if VNNI_512:
            words = builder.bitcast(load_vector(context, builder, q_type, q, lo, BYTES64), _SHORTS32)
            low = builder.bitcast(builder.lshr(words, splat(builder, shift, _SHORTS32)), BYTES64)
            top = twice_field(context, builder, q_type, q, hi, shift, builder.add(shift, int64(2)), 2)
            return [builder.or_(builder.and_(low, constant(BYTES64, 15)), builder.shl(top, constant(BYTES64, 4)))]
        return [k_weights(context, builder, q_type, q, lo, shift, hi, shift, 4, 2),
                k_weights(context, builder, q_type, q, builder.add(lo, int64(32)), shift, hi,
                          builder.add(shift, int64(2)), 4, 2)]

    @intrinsic
    def q6_k_quad(typingctx, acc, q, lo, hi, shift, xq, x_start, scales, lane):
        """q6_k_quad_fma of q6_k_quad_weights(q, lo, hi, shift)."""
        def codegen(context, builder, signature, args):
            acc, q, lo, hi, shift, xq, x_start, scales, lane = args
            weights = q6_k_quad_weights(context, builder, signature.args[1], q, lo, hi, shift)
            return q6_k_quad_fma(context, builder, acc, weights, signature.args[5], xq, x_start, scales, lane)
        return acc(acc, q, index, index, index, xq, index, scales, index), codegen

    @intrinsic
    def int8_lanes(typingctx, q, start, h, i):
        """float(int8 q[start + j]) * the float16 h[i], j = 0-7 (Q6_K's sub-block scales)."""
        def codegen(context, builder, signature, args):
            q, start, h, i = args
            signed = load_vector(context, builder, signature.args[0], q, start, ir.VectorType(_I8, 8))
            values = builder.sitofp(builder.sext(signed, INTS8), FLOATS8)
            return builder.fmul(values, f16_splat(context, builder, signature.args[2], h, i, 8), flags=ORDERED)
        return f32x8(q, index, h, index), codegen

    @intrinsic
    def pairwise_scaled(typingctx, scales, v, start):
        """scales[j] * v[start + j // 2], j = 0-7: sub-blocks of 16 times x's scale per 32."""
        def codegen(context, builder, signature, args):
            scales, v, start = args
            four = load_vector(context, builder, signature.args[1], v, start, ir.VectorType(ir.FloatType(), 4))
            doubled = builder.shuffle_vector(four, four, ir.Constant(INTS8, [0, 0, 1, 1, 2, 2, 3, 3]))
            return builder.fmul(scales, doubled, flags=ORDERED)
        return scales(scales, v, index), codegen

    @intrinsic
    def vector_lane(typingctx, vector, j):
        def codegen(context, builder, signature, args):
            return builder.extract_element(args[0], args[1])
        return types.float32(vector, index), codegen

    @intrinsic
    def fma8(typingctx, acc, a, v, start):
        """acc + a * v[start:start + 8]."""
        def codegen(context, builder, signature, args):
            acc, a, v, start = args
            values = load_vector(context, builder, signature.args[2], v, start, FLOATS8)
            return builder.fadd(acc, builder.fmul(a, values, flags=ORDERED), flags=ORDERED)
        return acc(acc, a, v, index), codegen

    _q4_0_two = _two_block_fma(False, 8)
    _q4_1_two = _two_block_fma(False, 0)
    _q5_0_two = _two_block_fma(True, 16)
    _q5_1_two = _two_block_fma(True, 0)

    @intrinsic
    def _mins_fma(typingctx, acc, h, i0, i1, sums8, p):
        """acc + [m0 x4, m1 x4] * sums8[8p:8p+8]: the pair of blocks p's float16
        minimums (h[i0], h[i1]) times x's scaled sums."""
        def codegen(context, builder, signature, args):
            acc, h, i0, i1, sums8, p = args
            mins = half_pair(context, builder, signature.args[1], h, i0, i1)
            sums = load_vector(context, builder, signature.args[4], sums8, builder.mul(p, int64(8)), FLOATS8)
            return builder.fadd(acc, builder.fmul(mins, sums, flags=ORDERED), flags=ORDERED)
        return f32x8(acc, h, index, index, sums8, index), codegen

    @intrinsic
    def _round_block(typingctx, x, at, xq):
        """x[at:at + 32] rounded (simd.rounded_block) into xq[at:at + 32]: (the scale,
        the sum of the first 16 rounded values, of the last 16). Vector instructions:
        a loop over the values took ~3 ns each, 10 us of every SmolLM2 product of 4
        rows, before any thread started."""
        def codegen(context, builder, signature, args):
            x, at, xq = args
            ints = ir.VectorType(ir.IntType(32), 32)
            d, _, rounded = rounded_block(builder, load_vector(context, builder, signature.args[0], x, at,
                                                               ir.VectorType(ir.FloatType(), 32)))
            whole = builder.fptosi(rounded, ints)
            data = context.make_array(signature.args[2])(context, builder, xq).data
            builder.store(builder.trunc(whole, BYTES32), builder.bitcast(builder.gep(data, [at]), BYTES32.as_pointer()),
                          align=1)
            add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [INTS16]),
                                                 "llvm.vector.reduce.add.v16i32")
            sums = [builder.call(add, [builder.shuffle_vector(whole, whole, ir.Constant(INTS16, list(range(
                first, first + 16))))]) for first in (0, 16)]
            return context.make_tuple(builder, signature.return_type, [d] + sums)
        return types.Tuple((types.float32, types.int32, types.int32))(x, index, xq), codegen


@jit()
def quantize_x(x):
    """x rounded to int8 per block of 32 (scale = the block's max |x| / 127,
    round half to even), the scales, and sums of the rounded x per 16 times
    their block's scale (for the biases and minimums). x must be contiguous."""
    nb = x.size // 32
    xq = np.empty(x.size, np.int8)
    scales = np.empty(nb, np.float32)
    sums16 = np.empty(2 * nb, np.float32)
    for b in range(nb):
        d, low, high = _round_block(x, 32 * b, xq)
        sums16[2 * b] = np.float32(low) * d
        sums16[2 * b + 1] = np.float32(high) * d
        scales[b] = d
    return xq, scales, sums16


@jit(parallel=True, ordered=True)
def matvec_q8_0(q, d, x, out):
    nb = d.shape[1] // 17
    xq, xd, _ = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros8()
        for b in range(nb):
            prefetch(qr, 34 * b + PREFETCH_AHEAD)
            scale = f16_two_pairs(dr, 17 * b, 17 * b)[0]
            acc = q8_0_fma(acc, qr, 34 * b + 2, xq, 32 * b, scale * xd[b])
        out[r] = sum8(acc)


@jit()
def minus_lane_sums128(xq):
    """-128 times the sum of each 4 bytes of xq, as int32: minus what unsigned weights
    w + 128 add to each vpdpbusd lane beyond the signed ones (q8_0_pair_fma)."""
    sums = np.empty(xq.size // 4, np.int32)
    for i in range(sums.size):
        sums[i] = np.int32(-128) * (np.int32(xq[4 * i]) + np.int32(xq[4 * i + 1]) + np.int32(xq[4 * i + 2])
                                   + np.int32(xq[4 * i + 3]))
    return sums


@jit(parallel=True, ordered=True)
def _matvec_q8_0_wide(q, d, x, out):
    """matvec_q8_0 two blocks at a time (VNNI_512): the weights' bytes made
    unsigned (q8_0_pair_fma), no per-block sign handling of x; an odd last block
    as in _matvec_q4_0_wide."""
    nb = d.shape[1] // 17
    xq, xd, _ = quantize_x(x)
    lane_sums = minus_lane_sums128(xq)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        for c in range(nb // 2):
            b = 2 * c
            prefetch(qr, 34 * b + PREFETCH_AHEAD)
            s0 = f16_two_pairs(dr, 17 * b, 17 * b)[0]
            s1 = f16_two_pairs(dr, 17 * b + 17, 17 * b + 17)[0]
            acc = q8_0_pair_fma(acc, qr, 34 * b + 2, 34 * b + 36, xq, 32 * b, lane_sums, 8 * b, s0 * xd[b],
                                s1 * xd[b + 1])
        out[r] = sum16(acc)
    if nb % 2:
        q8_0_last_block(q, d, xq, xd, out)


@jit(ordered=True)
def q8_0_last_block(q, d, xq, xd, out):
    """An odd last Q8_0 block's products added to out (the wide forms' last block)."""
    b = d.shape[1] // 17 - 1
    for r in range(q.shape[0]):
        scale = f16_two_pairs(d[r], 17 * b, 17 * b)[0]
        out[r] += sum8(q8_0_fma(zeros8(), q[r], 34 * b + 2, xq, 32 * b, scale * xd[b]))


@jit()
def block_sums32(xs16):
    """x's rounded sums per block of 32 (times their scale), from those per 16."""
    sums = np.empty(xs16.size // 2, np.float32)
    for b in range(sums.size):
        sums[b] = xs16[2 * b] + xs16[2 * b + 1]
    return sums


@jit(parallel=True, ordered=True)
def _matvec_q4_0_wide(q, d, x, out):
    """matvec_q4_0 two blocks at a time (VNNI_512). An odd last block is added
    in a loop of its own: a branch for it inside the row loop halved the speed."""
    nb = d.shape[1] // 9
    xq, xd, xs16 = quantize_x(x)
    xs = block_sums32(xs16)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        bias = np.float32(0.0)
        for c in range(nb // 2):
            b = 2 * c
            prefetch(qr, 18 * b + PREFETCH_AHEAD)
            s0, _, s1, _ = f16_two_pairs(dr, 9 * b, 9 * b + 9)
            acc = q4_pair_fma(acc, qr, 18 * b + 2, 18 * b + 20, xq, 32 * b, s0 * xd[b], s1 * xd[b + 1])
            bias += s0 * xs[b] + s1 * xs[b + 1]
        out[r] = sum16(acc) - np.float32(8.0) * bias
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            scale = f16_to_f32(d[r, 9 * b])
            tail = sum8(q4_fma(zeros8(), q[r], 18 * b + 2, xq, 32 * b, scale * xd[b]))
            out[r] += tail - np.float32(8.0) * scale * xs[b]


@jit(parallel=True, ordered=True)
def _matvec_q4_1_wide(q, d, x, out):
    """matvec_q4_1 two blocks at a time (VNNI_512), an odd last block as in _matvec_q4_0_wide."""
    nb = d.shape[1] // 10
    xq, xd, xs16 = quantize_x(x)
    xs = block_sums32(xs16)
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        acc = zeros16()
        lows = np.float32(0.0)
        for c in range(nb // 2):
            b = 2 * c
            prefetch(qr, 20 * b + PREFETCH_AHEAD)
            d0, m0, d1, m1 = f16_two_pairs(dr, 10 * b, 10 * b + 10)
            acc = q4_pair_fma(acc, qr, 20 * b + 4, 20 * b + 24, xq, 32 * b, d0 * xd[b], d1 * xd[b + 1])
            lows += m0 * xs[b] + m1 * xs[b + 1]
        out[r] = sum16(acc) + lows
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            tail = sum8(q4_fma(zeros8(), q[r], 20 * b + 4, xq, 32 * b, f16_to_f32(d[r, 10 * b]) * xd[b]))
            out[r] += tail + f16_to_f32(d[r, 10 * b + 1]) * xs[b]


@jit()
def pair_x(xq, xd):
    """x's rounding (quantize_x's xq and xd) laid out for the two-block kernels:
    per pair of blocks p, xp[64p:64p+64] holds the first block's x 0-15, the
    second's 0-15, the first's 16-31, the second's 16-31 (the order of their
    nibbles); xd8[8p:8p+8] the two scales, four lanes each; isums8 the two
    blocks' sums of xq in lanes 0 and 4 (zeros elsewhere) and fsums8 the same
    times their scale."""
    pairs = xd.size // 2
    xp = np.empty(64 * pairs, np.int8)
    xd8 = np.empty(8 * pairs, np.float32)
    isums8 = np.zeros(8 * pairs, np.int32)
    fsums8 = np.zeros(8 * pairs, np.float32)
    for p in range(pairs):
        for half in range(2):
            b = 2 * p + half
            total = np.int32(0)
            for k in range(16):
                low, high = xq[32 * b + k], xq[32 * b + 16 + k]
                xp[64 * p + 16 * half + k] = low
                xp[64 * p + 32 + 16 * half + k] = high
                total += np.int32(low) + np.int32(high)
            for lane in range(4):
                xd8[8 * p + 4 * half + lane] = xd[b]
            isums8[8 * p + 4 * half] = total
            fsums8[8 * p + 4 * half] = np.float32(total) * xd[b]
    return xp, xd8, isums8, fsums8


@jit()
def fifth_bit_pairs(hr, i0, i1):
    """Q5's fifth bits of two blocks (q5_high_bits at hr[i0] and hr[i1]) in the
    order of the two-block kernels' nibbles: weights 0-15 of each, then 16-31."""
    a = q5_high_bits(hr, i0)
    b = q5_high_bits(hr, i1)
    return (a & 0xFFFF) | ((b & 0xFFFF) << 16), (a >> 16) | (b & 0xFFFF0000)


# The 32-weight types step through pairs of blocks with two running sums (one
# sum's chain of dependent additions held the loop back); an odd last block is
# added in a loop of its own, as in the wide kernels.


@jit(parallel=True, ordered=True)
def matvec_q4_0(q, d, x, out):
    # w = (n - 8) d: a block adds d dx (sum(n xq) - 8 sum(xq)).
    nb = d.shape[1] // 9
    xq, xd, xs = quantize_x(x)
    xp, xd8, isums8, _ = pair_x(xq, xd)
    pairs = nb // 2
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        even = zeros8()
        odd = zeros8()
        for k in range(pairs // 2):
            p = 2 * k
            prefetch(qr, 36 * p + PREFETCH_AHEAD)
            even = _q4_0_two(even, qr, 36 * p + 2, 36 * p + 20, 0, 0, dr, 18 * p, 18 * p + 9, xp, xd8, isums8, p)
            p += 1
            odd = _q4_0_two(odd, qr, 36 * p + 2, 36 * p + 20, 0, 0, dr, 18 * p, 18 * p + 9, xp, xd8, isums8, p)
        if pairs % 2:
            p = pairs - 1
            even = _q4_0_two(even, qr, 36 * p + 2, 36 * p + 20, 0, 0, dr, 18 * p, 18 * p + 9, xp, xd8, isums8, p)
        out[r] = sum8(even) + sum8(odd)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            scale = f16_to_f32(d[r, 9 * b])
            tail = sum8(q4_fma(zeros8(), q[r], 18 * b + 2, xq, 32 * b, scale * xd[b]))
            out[r] += tail - np.float32(8.0) * scale * (xs[2 * b] + xs[2 * b + 1])


@jit(parallel=True, ordered=True)
def matvec_q4_1(q, d, x, out):
    # w = n d + m: a block adds d dx sum(n xq) + m dx sum(xq).
    nb = d.shape[1] // 10
    xq, xd, xs = quantize_x(x)
    xp, xd8, isums8, fsums8 = pair_x(xq, xd)
    pairs = nb // 2
    for r in prange(q.shape[0]):
        qr = q[r]
        dr = d[r]
        even = zeros8()
        odd = zeros8()
        lows = zeros8()
        for k in range(pairs // 2):
            p = 2 * k
            prefetch(qr, 40 * p + PREFETCH_AHEAD)
            even = _q4_1_two(even, qr, 40 * p + 4, 40 * p + 24, 0, 0, dr, 20 * p, 20 * p + 10, xp, xd8, isums8, p)
            lows = _mins_fma(lows, dr, 20 * p + 1, 20 * p + 11, fsums8, p)
            p += 1
            odd = _q4_1_two(odd, qr, 40 * p + 4, 40 * p + 24, 0, 0, dr, 20 * p, 20 * p + 10, xp, xd8, isums8, p)
            lows = _mins_fma(lows, dr, 20 * p + 1, 20 * p + 11, fsums8, p)
        if pairs % 2:
            p = pairs - 1
            even = _q4_1_two(even, qr, 40 * p + 4, 40 * p + 24, 0, 0, dr, 20 * p, 20 * p + 10, xp, xd8, isums8, p)
            lows = _mins_fma(lows, dr, 20 * p + 1, 20 * p + 11, fsums8, p)
        out[r] = sum8(even) + sum8(odd) + sum8(lows)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            tail = sum8(q4_fma(zeros8(), q[r], 20 * b + 4, xq, 32 * b, f16_to_f32(d[r, 10 * b]) * xd[b]))
            out[r] += tail + f16_to_f32(d[r, 10 * b + 1]) * (xs[2 * b] + xs[2 * b + 1])


@jit(parallel=True, ordered=True)
def matvec_q5_0(q, h, x, out):
    # w = (n + 16 bit - 16) d
    nb = h.shape[1] // 11
    xq, xd, xs = quantize_x(x)
    xp, xd8, isums8, _ = pair_x(xq, xd)
    pairs = nb // 2
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        even = zeros8()
        odd = zeros8()
        for k in range(pairs // 2):
            p = 2 * k
            prefetch(qr, 44 * p + PREFETCH_AHEAD)
            low, high = fifth_bit_pairs(hr, 22 * p + 1, 22 * p + 12)
            even = _q5_0_two(even, qr, 44 * p + 6, 44 * p + 28, low, high, hr, 22 * p, 22 * p + 11,
                             xp, xd8, isums8, p)
            p += 1
            low, high = fifth_bit_pairs(hr, 22 * p + 1, 22 * p + 12)
            odd = _q5_0_two(odd, qr, 44 * p + 6, 44 * p + 28, low, high, hr, 22 * p, 22 * p + 11,
                            xp, xd8, isums8, p)
        if pairs % 2:
            p = pairs - 1
            low, high = fifth_bit_pairs(hr, 22 * p + 1, 22 * p + 12)
            even = _q5_0_two(even, qr, 44 * p + 6, 44 * p + 28, low, high, hr, 22 * p, 22 * p + 11,
                             xp, xd8, isums8, p)
        out[r] = sum8(even) + sum8(odd)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            hr = h[r]
            scale = f16_to_f32(hr[11 * b])
            tail = sum8(q5_fma(zeros8(), q[r], 22 * b + 6, q5_high_bits(hr, 11 * b + 1), xq, 32 * b,
                                 scale * xd[b]))
            out[r] += tail - np.float32(16.0) * scale * (xs[2 * b] + xs[2 * b + 1])


@jit(parallel=True, ordered=True)
def matvec_q5_1(q, h, x, out):
    # w = (n + 16 bit) d + m
    nb = h.shape[1] // 12
    xq, xd, xs = quantize_x(x)
    xp, xd8, isums8, fsums8 = pair_x(xq, xd)
    pairs = nb // 2
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        even = zeros8()
        odd = zeros8()
        lows = zeros8()
        for k in range(pairs // 2):
            p = 2 * k
            prefetch(qr, 48 * p + PREFETCH_AHEAD)
            low, high = fifth_bit_pairs(hr, 24 * p + 2, 24 * p + 14)
            even = _q5_1_two(even, qr, 48 * p + 8, 48 * p + 32, low, high, hr, 24 * p, 24 * p + 12,
                             xp, xd8, isums8, p)
            lows = _mins_fma(lows, hr, 24 * p + 1, 24 * p + 13, fsums8, p)
            p += 1
            low, high = fifth_bit_pairs(hr, 24 * p + 2, 24 * p + 14)
            odd = _q5_1_two(odd, qr, 48 * p + 8, 48 * p + 32, low, high, hr, 24 * p, 24 * p + 12,
                            xp, xd8, isums8, p)
            lows = _mins_fma(lows, hr, 24 * p + 1, 24 * p + 13, fsums8, p)
        if pairs % 2:
            p = pairs - 1
            low, high = fifth_bit_pairs(hr, 24 * p + 2, 24 * p + 14)
            even = _q5_1_two(even, qr, 48 * p + 8, 48 * p + 32, low, high, hr, 24 * p, 24 * p + 12,
                             xp, xd8, isums8, p)
            lows = _mins_fma(lows, hr, 24 * p + 1, 24 * p + 13, fsums8, p)
        out[r] = sum8(even) + sum8(odd) + sum8(lows)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            hr = h[r]
            tail = sum8(q5_fma(zeros8(), q[r], 24 * b + 8, q5_high_bits(hr, 12 * b + 2), xq, 32 * b,
                                 f16_to_f32(hr[12 * b]) * xd[b]))
            out[r] += tail + f16_to_f32(hr[12 * b + 1]) * (xs[2 * b] + xs[2 * b + 1])


# K-quants: the layouts are block_layouts' `*_part` functions; sub-block j's
# weights are scale * w - low. Constant nested loops, as in float_matvec.py.


@jit(parallel=True, ordered=True)
def matvec_q4_k(q, h, x, out):
    # w = d scale_j n - dmin min_j per sub-block j of 32.
    nb = h.shape[1] // 72
    xq, xd, xs = quantize_x(x)
    xs32 = block_sums32(xs)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        a0 = k_zeros()
        a1 = k_zeros()
        lows = zeros8()
        for b in range(nb):
            prefetch(qr, 144 * b + PREFETCH_AHEAD)
            prefetch(qr, 144 * b + PREFETCH_AHEAD + 64)
            prefetch(qr, 144 * b + PREFETCH_AHEAD + 128)
            packed_scales, packed_mins = k4_scale_min_bytes(qr, 144 * b + 4)
            scales = byte_lanes(packed_scales, hr, 72 * b, xd, 8 * b)
            lows = add8(lows, byte_lanes(packed_mins, hr, 72 * b + 1, xs32, 8 * b))
            o = 144 * b + 16
            a0 = k_halves_fma(a0, qr, o, xq, 256 * b, scales, 0, None, 0)
            a1 = k_halves_fma(a1, qr, o + 32, xq, 256 * b + 64, scales, 2, None, 0)
            a0 = k_halves_fma(a0, qr, o + 64, xq, 256 * b + 128, scales, 4, None, 0)
            a1 = k_halves_fma(a1, qr, o + 96, xq, 256 * b + 192, scales, 6, None, 0)
        out[r] = k_sum(a0) + k_sum(a1) - sum8(lows)


@jit(parallel=True, ordered=True)
def matvec_q5_k(q, h, x, out):
    # As Q4_K, each weight over bit j of qh[l] (the 32 bytes at 176 b + 16).
    nb = h.shape[1] // 88
    xq, xd, xs = quantize_x(x)
    xs32 = block_sums32(xs)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        a0 = k_zeros()
        a1 = k_zeros()
        lows = zeros8()
        for b in range(nb):
            prefetch(qr, 176 * b + PREFETCH_AHEAD)
            prefetch(qr, 176 * b + PREFETCH_AHEAD + 64)
            prefetch(qr, 176 * b + PREFETCH_AHEAD + 128)
            packed_scales, packed_mins = k4_scale_min_bytes(qr, 176 * b + 4)
            scales = byte_lanes(packed_scales, hr, 88 * b, xd, 8 * b)
            lows = add8(lows, byte_lanes(packed_mins, hr, 88 * b + 1, xs32, 8 * b))
            o = 176 * b + 48
            qh = 176 * b + 16
            a0 = k_halves_fma(a0, qr, o, xq, 256 * b, scales, 0, qh, 0)
            a1 = k_halves_fma(a1, qr, o + 32, xq, 256 * b + 64, scales, 2, qh, 2)
            a0 = k_halves_fma(a0, qr, o + 64, xq, 256 * b + 128, scales, 4, qh, 4)
            a1 = k_halves_fma(a1, qr, o + 96, xq, 256 * b + 192, scales, 6, qh, 6)
        out[r] = k_sum(a0) + k_sum(a1) - sum8(lows)


@jit(parallel=True, ordered=True)
def matvec_q6_k(q, h, x, out):
    # 210 bytes a block (see block_layouts.q6_k_part): ql[128], qh[64], int8
    # scales[16], f16 d. Sub-blocks of 16 taken in pairs (j, j + 1): their bytes lie
    # side by side; half n = j // 8 of the block, k = j // 2 % 4. w = d scale (n - 32).
    nb = h.shape[1] // 105
    xq, xd, xs = quantize_x(x)
    for r in prange(q.shape[0]):
        qr = q[r]
        hr = h[r]
        first = k_zeros()
        second = k_zeros()
        bias = zeros8()
        for b in range(nb):
            o = 210 * b
            prefetch(qr, o + PREFETCH_AHEAD)
            prefetch(qr, o + PREFETCH_AHEAD + 64)
            prefetch(qr, o + PREFETCH_AHEAD + 128)
            prefetch(qr, o + PREFETCH_AHEAD + 192)
            scales0 = int8_lanes(qr, o + 192, hr, 105 * b + 104)  # sub-blocks 0-7, times d
            scales1 = int8_lanes(qr, o + 200, hr, 105 * b + 104)
            bias = fma8(fma8(bias, scales0, xs, 16 * b), scales1, xs, 16 * b + 8)
            scales0 = pairwise_scaled(scales0, xd, 8 * b)
            scales1 = pairwise_scaled(scales1, xd, 8 * b + 4)
            for m in range(2):  # sub-blocks 4m..4m + 3 of each half
                first = q6_k_quad(first, qr, o, o + 128, 4 * m, xq, 256 * b + 64 * m, scales0, 4 * m)
                second = q6_k_quad(second, qr, o + 64, o + 160, 4 * m, xq, 256 * b + 128 + 64 * m, scales1, 4 * m)
        out[r] = k_sum(first) + k_sum(second) - np.float32(32.0) * sum8(bias)


# Where the CPU has 512-bit VNNI, the types that have a two-block form use it.
if AVAILABLE and VNNI_512:
    matvec_q4_0 = _matvec_q4_0_wide  # noqa: F811
    matvec_q4_1 = _matvec_q4_1_wide  # noqa: F811
    matvec_q8_0 = _matvec_q8_0_wide  # noqa: F811

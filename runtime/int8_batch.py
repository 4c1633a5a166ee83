"""Matrix x a few vectors for decoding several tokens at once (2-16 rows of x),
with integer dot products: each weight row is unpacked once and dotted with
every row of x.

Decoding is bound by reading and unpacking the weights (int8_matvec.py), so
the rows of x share that work, in one of two forms:
- Tiles (Q4_0, Q4_1 where the CPU has 512-bit VNNI, Q8_0, Q5_0, Q4_K, Q5_K):
  four rows of x at a time against each weight row, each with its own running
  sums in registers, the matvec's steps written out once per row of x. The
  weights' loads and unpacking are then the same expressions on read-only
  memory, which LLVM computes once for the four. With 512-bit VNNI, Q5_0
  (whose matvec takes 256-bit steps) holds two rows of x in each vector: one
  instruction per step for both; the 512-bit pair forms (Q4_0, Q4_1, Q8_0)
  take their per-row float work as vectors (see _tile_offsets). On a CPU
  where the weights sit in the cache (a 300 MiB L3 holds SmolLM2 whole),
  decoding is bound by instructions, not memory, and the rows' own dot
  products are most of them: the buffered form below gave 4 rows for 2.7x one
  matvec on SmolLM2's Q4_1 matrices, the tile 1.7-1.9x (Emerald Rapids); Q4_K
  as a tile 2.6-2.9x, buffered 2.9-3.2x; with 512-bit VNNI's K-quant steps
  (int8_matvec.k_halves_fma) 2.4-2.7x.
- Buffers (the others, and Q6_K: as a tile, 4.1-4.8x one matvec against
  3.1-3.3x, its 6-bit unpacking not shared by LLVM; 2.7-3.1x in 512-bit steps,
  int8_matvec.q6_k_quad_fma): each task unpacks one
  weight row at a time into bytes (and its scales into float32) in a small
  buffer that stays in the L1 cache, then runs, for each row of x, the
  matvec's own loop over that buffer.

Each task (ROWS_PER_TASK weight rows) is one function call that takes x's rows
once per tile and then loops over its weight rows: a call per weight row, with
x's rows taken as views each time, cost more than the products on short rows
(Qwen2.5 0.5B's 896 columns, Q5_0, 2 rows of x: 2.4x one matvec; now 1.4x).

Each row of the result equals, bit for bit, what the int8 matvec gives for
that row of x alone (a token's text must not depend on who else is being
served): x is rounded as the matvec rounds it (`quantize_x`, `pair_x`), the
integer sums are exact whatever their order, and the float steps are the
matvec's own code generators (int8_matvec.py), run in the matvec's order
with the same running sums: the loops below keep the matvecs' shape (even and
odd sums, an odd last block in a loop of its own). Both are compiled without
fast-math's reassociation (jit's `ordered`, simd.ORDERED): with it, the same
steps rounded differently in two kernels, and in one kernel just compiled or
loaded from numba's cache. The tests compare the two on every type.

Speed, 4096x4096 on one thread (Cascade Lake, a busy machine), n rows against
n matvecs: Q4_0 0.74x (n = 2) to 0.45x (n = 16), Q8_0 0.59-0.41x, Q6_K
0.84-0.54x; bench/kernels.py --batch measures it.

One `matmul_<type>` per type, written out, for the reason int8_matvec.py gives.
"""

from __future__ import annotations

import numpy as np

from .block_layouts import k4_scale_min_bytes, q5_high_bits
from .int8_matvec import (AVAILABLE, block_sums32, fifth_bit_pairs, minus_lane_sums128, pair_x,
                          q8_0_last_block, quantize_x)
from .jit import jit, numba_enabled, prange

ROWS_PER_TASK = 16  # weight rows per task: the buffers are allocated once per task

if numba_enabled() and AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .int8_matvec import (BYTES32, BYTES64, FLOATS8, INTS8, add8, byte_lanes, f32x8, f32x16, fma8, half_pair,
                              int8_lanes, k_halves_fma, k_sum, k_zeros, pair_nibbles, pair_splat, pairwise_scaled,
                              q4_fma, q5_fma, q6_k_quad_fma, q6_k_quad_weights, q8_0_fma, q8_0_wide_fma, sum8, sum16,
                              two_block_fma, vector_lane, wide_pair_fma, wide_pair_nibbles, zeros8, zeros16)
    from .simd import (FLOATS16, ORDERED, PREFETCH_AHEAD, VNNI_512, constant, f16_to_f32, f16_two_pairs, float_vector,
                       int64, load_vector, prefetch, splat, store_vector)

    index = types.intp

    # Unpacking: a weight row into the buffers, in the order the loops below read it.

    @intrinsic
    def _unpack_pair(typingctx, q, start0, start1, high_low, high_high, wq, p):
        """pair_nibbles of two blocks into wq[64p:64p+64] (low nibbles, then high ones)."""
        def codegen(context, builder, signature, args):
            q, start0, start1, high_low, high_high, wq, p = args
            fifth = not isinstance(signature.args[3], types.NoneType)
            low, high = pair_nibbles(context, builder, signature.args[0], q, start0, start1,
                                     high_low if fifth else None, high_high if fifth else None)
            at = builder.mul(p, int64(64))
            store_vector(context, builder, signature.args[5], wq, at, low)
            return store_vector(context, builder, signature.args[5], wq, builder.add(at, int64(32)), high)
        return types.void(q, index, index, high_low, high_high, wq, index), codegen

    @intrinsic
    def _unpack_half_pair(typingctx, h, i0, i1, w8, p):
        """half_pair of the float16 fields h[i0], h[i1] into w8[8p:8p+8]."""
        def codegen(context, builder, signature, args):
            h, i0, i1, w8, p = args
            pair = half_pair(context, builder, signature.args[0], h, i0, i1)
            return store_vector(context, builder, signature.args[3], w8, builder.mul(p, int64(8)), pair)
        return types.void(h, index, index, w8, index), codegen

    @intrinsic
    def _unpack_q6_k_quad(typingctx, q, lo, hi, shift, wq, at):
        """q6_k_quad_weights(q, lo, hi, shift) into wq[at:at + 64]."""
        def codegen(context, builder, signature, args):
            q, lo, hi, shift, wq, at = args
            for i, w in enumerate(q6_k_quad_weights(context, builder, signature.args[0], q, lo, hi, shift)):
                store_vector(context, builder, signature.args[4], wq, builder.add(at, int64(32 * i)), w)
            return context.get_dummy_value()
        return types.void(q, index, index, index, wq, index), codegen

    @intrinsic
    def _store8(typingctx, vector, w8, at):
        def codegen(context, builder, signature, args):
            vector, w8, at = args
            return store_vector(context, builder, signature.args[1], w8, at, vector)
        return types.void(vector, w8, index), codegen

    # The matvecs' steps, on the unpacked buffers.

    @intrinsic
    def _load8(typingctx, w8, at):
        def codegen(context, builder, signature, args):
            return load_vector(context, builder, signature.args[0], args[0], args[1], FLOATS8)
        return f32x8(w8, index), codegen

    def _two_from_buffer(bias: int):
        """An intrinsic fma(acc, wq, ws8, xp, xd8, sums8, p): two_block_fma of the pair
        of blocks p unpacked by _unpack_pair, its scales by _unpack_half_pair."""
        @intrinsic
        def fma(typingctx, acc, wq, ws8, xp, xd8, sums8, p):
            def codegen(context, builder, signature, args):
                acc, wq, ws8, xp, xd8, sums8, p = args
                at = builder.mul(p, int64(64))
                low = load_vector(context, builder, signature.args[1], wq, at, BYTES32)
                high = load_vector(context, builder, signature.args[1], wq, builder.add(at, int64(32)), BYTES32)

                def weight_scales():
                    return load_vector(context, builder, signature.args[2], ws8, builder.mul(p, int64(8)), FLOATS8)
                return two_block_fma(context, builder, signature, acc, low, high, weight_scales, xp, xd8, sums8, p,
                                     bias)
            return f32x8(acc, wq, ws8, xp, xd8, sums8, index), codegen
        return fma

    _two_biased = _two_from_buffer(1)  # x's sums times the bias come with x
    _two_unbiased = _two_from_buffer(0)

    @intrinsic
    def _quad_from_buffer(typingctx, acc, wq, at, xq, x_start, scales, lane):
        """q6_k_quad_fma of the 64 weights unpacked at wq[at] by _unpack_q6_k_quad."""
        def codegen(context, builder, signature, args):
            acc, wq, at, xq, x_start, scales, lane = args
            shapes = [BYTES64] if VNNI_512 else [BYTES32, BYTES32]
            weights = [load_vector(context, builder, signature.args[1], wq, builder.add(at, int64(32 * i)), shape)
                       for i, shape in enumerate(shapes)]
            return q6_k_quad_fma(context, builder, acc, weights, signature.args[3], xq, x_start, scales, lane)
        return acc(acc, wq, index, xq, index, scales, index), codegen

    def _fifth_bit_pairs(context, builder, h_type, h, i0, i1):
        """fifth_bit_pairs(h, i0, i1) in line: a call in a loop made LLVM save and restore
        every vector register (the running sums of four rows of x) around it."""
        data = context.make_array(h_type)(context, builder, h).data
        i64 = ir.IntType(64)

        def word(i):
            pointer = builder.bitcast(builder.gep(data, [i]), ir.IntType(32).as_pointer())
            return builder.zext(builder.load(pointer, align=1), i64)
        a, b = word(i0), word(i1)
        halves = ir.Constant(i64, 0xFFFF)
        low = builder.or_(builder.and_(a, halves), builder.shl(builder.and_(b, halves), ir.Constant(i64, 16)))
        high = builder.or_(builder.lshr(a, ir.Constant(i64, 16)), builder.and_(b, ir.Constant(i64, 0xFFFF0000)))
        return low, high

    @intrinsic
    def _q5_0_pair_fma(typingctx, acc, q, start0, start1, h, i0, i1, xp, xd8, sums8, p):
        """matvec_q5_0's step over the pair of blocks p: quant bytes at q[start0] and
        q[start1], scales at h[i0] and h[i1], fifth bits after them. The same code
        generators, so the same rounding; sums8 are x's sums times the bias of 16
        already (integers: the same products)."""
        def codegen(context, builder, signature, args):
            acc, q, start0, start1, h, i0, i1, xp, xd8, sums8, p = args
            one = ir.Constant(i0.type, 1)
            high_low, high_high = _fifth_bit_pairs(context, builder, signature.args[4], h, builder.add(i0, one),
                                                   builder.add(i1, one))
            low, high = pair_nibbles(context, builder, signature.args[1], q, start0, start1, high_low, high_high)

            def weight_scales():
                return half_pair(context, builder, signature.args[4], h, i0, i1)
            return two_block_fma(context, builder, signature, acc, low, high, weight_scales, xp, xd8, sums8, p, 1)
        return f32x8(acc, q, index, index, h, index, index, xp, xd8, sums8, index), codegen


    # Two rows of x in one 512-bit vector, where the CPU has 512-bit VNNI: row a in
    # lanes 0-7, row b in lanes 8-15, each lane through the 8-lane form's operations
    # (so rounded alike), one instruction doing the work of two.
    _INTS16 = ir.VectorType(ir.IntType(32), 16)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)
    _JOIN8 = ir.Constant(_INTS16, list(range(16)))
    _JOIN32 = ir.Constant(ir.VectorType(ir.IntType(32), 64), list(range(64)))

    @intrinsic
    def _q5_0_pair_fma_rows(typingctx, acc, q, start0, start1, h, i0, i1, xj, dj, sj, p):
        """_q5_0_pair_fma for two rows of x (a and b) in one acc of 16 lanes, from x's
        rows joined by join_rows: xj[128p:] a's 32 bytes against the low nibbles, b's,
        then both against the high ones; dj[16p:] and sj[16p:] a's 8 lanes, then b's."""
        def codegen(context, builder, signature, args):
            acc, q, start0, start1, h, i0, i1, xj, dj, sj, p = args
            arg = signature.args
            one = ir.Constant(i0.type, 1)
            high_low, high_high = _fifth_bit_pairs(context, builder, arg[4], h, builder.add(i0, one),
                                                   builder.add(i1, one))
            low, high = pair_nibbles(context, builder, arg[1], q, start0, start1, high_low, high_high)
            at = builder.mul(p, int64(128))
            vpdpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_INTS16, [_INTS16] * 3), "llvm.x86.avx512.vpdpbusd.512")

            def dot(weights, offset):
                x = load_vector(context, builder, arg[7], xj, builder.add(at, int64(offset)), BYTES64)
                both = builder.shuffle_vector(weights, weights, _JOIN32)
                return builder.call(vpdpbusd, [constant(_INTS16, 0), builder.bitcast(both, _INTS16),
                                               builder.bitcast(x, _INTS16)])
            lanes = builder.mul(p, int64(16))
            sums = load_vector(context, builder, arg[9], sj, lanes, _INTS16)
            dots = builder.sub(builder.add(dot(low, 0), dot(high, 64)), sums)
            weight_scales = half_pair(context, builder, arg[4], h, i0, i1)
            scales = builder.fmul(builder.shuffle_vector(weight_scales, weight_scales, _JOIN8),
                                  load_vector(context, builder, arg[8], dj, lanes, _FLOATS16), flags=ORDERED)
            products = builder.fmul(builder.sitofp(dots, _FLOATS16), scales, flags=ORDERED)
            return builder.fadd(acc, products, flags=ORDERED)
        return f32x16(acc, q, index, index, h, index, index, xj, dj, sj, index), codegen

    def _lanes_from(start: int):
        """An intrinsic: lanes start..start+7 of a two-row sum (one row's)."""
        @intrinsic
        def lanes(typingctx, acc):
            def codegen(context, builder, signature, args):
                return builder.shuffle_vector(args[0], args[0], ir.Constant(INTS8, list(range(start, start + 8))))
            return f32x8(acc), codegen
        return lanes

    _row_a = _lanes_from(0)
    _row_b = _lanes_from(8)

    # The 512-bit pair forms (Q4_0, Q4_1, Q8_0), their per-row float work as
    # vectors: a weight row's pair of scales is splat once and multiplied, for
    # each row of x, by x's pair of scales laid out the same way (block_scales16):
    # the same products the matvec takes lane by lane from two scalar ones. The
    # weights' offsets times x's block sums (Q4_0's bias, Q4_1's minimums) take a
    # lane per row of the tile (tile_sums): the matvec's scalar steps, four at
    # once. Per row of x, 1.6x less work than the scalar steps (Q4_1, 4 rows).
    f32x4, zeros4, _ = float_vector(4, ordered=True)
    _FLOATS4 = ir.VectorType(ir.FloatType(), 4)

    @intrinsic
    def _pair_scales(typingctx, scale0, scale1):
        """pair_splat(scale0, scale1)."""
        def codegen(context, builder, signature, args):
            return pair_splat(builder, *args)
        return f32x16(types.float32, types.float32), codegen

    def _scaled(context, builder, w16, xd16_type, xd16, at):
        return builder.fmul(w16, load_vector(context, builder, xd16_type, xd16, at, FLOATS16), flags=ORDERED)

    @intrinsic
    def _q4_pair_scaled_fma(typingctx, acc, q, start0, start1, xq, x_start, w16, xd16, at):
        """q4_pair_fma with its scales w16 * xd16[at:at + 16]."""
        def codegen(context, builder, signature, args):
            acc, q, start0, start1, xq, x_start, w16, xd16, at = args
            pair = wide_pair_nibbles(context, builder, signature.args[1], q, start0, start1)
            return wide_pair_fma(context, builder, acc, pair, signature.args[4], xq, x_start,
                                 _scaled(context, builder, w16, signature.args[7], xd16, at))
        return f32x16(acc, q, index, index, xq, index, w16, xd16, index), codegen

    @intrinsic
    def _q8_0_pair_scaled_fma(typingctx, acc, q, start0, start1, xq, x_start, lane_sums, lanes, w16, xd16, at):
        """q8_0_pair_fma with its scales w16 * xd16[at:at + 16]."""
        def codegen(context, builder, signature, args):
            acc, q, start0, start1, xq, x_start, lane_sums, lanes, w16, xd16, at = args
            return q8_0_wide_fma(context, builder, signature.args, acc, q, start0, start1, xq, x_start, lane_sums,
                                 lanes, _scaled(context, builder, w16, signature.args[9], xd16, at))
        return f32x16(acc, q, index, index, xq, index, lane_sums, index, w16, xd16, index), codegen

    @intrinsic
    def _tile_offsets(typingctx, acc, w0, w1, sums, at):
        """acc + (w0 * sums[at:at + 4] + w1 * sums[at + 4:at + 8]): a pair of blocks'
        offsets times x's block sums, a lane per row of the tile (tile_sums)."""
        def codegen(context, builder, signature, args):
            acc, w0, w1, sums, at = args
            first, second = (builder.fmul(splat(builder, w, _FLOATS4), load_vector(
                context, builder, signature.args[3], sums, builder.add(at, int64(4 * k)), _FLOATS4), flags=ORDERED)
                for k, w in enumerate((w0, w1)))
            return builder.fadd(acc, builder.fadd(first, second, flags=ORDERED), flags=ORDERED)
        return f32x4(acc, types.float32, types.float32, sums, index), codegen


# x's rows, rounded as the matvecs round one.


@jit()
def quantize_rows(x):
    """quantize_x of each row of x (n, cols): xq (n, cols), xd (n, cols / 32), sums16 (n, cols / 16)."""
    n, cols = x.shape
    xq = np.empty((n, cols), np.int8)
    xd = np.empty((n, cols // 32), np.float32)
    xs = np.empty((n, cols // 16), np.float32)
    for i in range(n):
        xq[i], xd[i], xs[i] = quantize_x(x[i])
    return xq, xd, xs


@jit()
def pair_rows(xq, xd):
    """pair_x of each row: xp, xd8, isums8, fsums8, one row each per row of x."""
    n, cols = xq.shape
    pairs = xd.shape[1] // 2
    xp = np.empty((n, 64 * pairs), np.int8)
    xd8 = np.empty((n, 8 * pairs), np.float32)
    isums8 = np.empty((n, 8 * pairs), np.int32)
    fsums8 = np.empty((n, 8 * pairs), np.float32)
    for i in range(n):
        xp[i], xd8[i], isums8[i], fsums8[i] = pair_x(xq[i], xd[i])
    return xp, xd8, isums8, fsums8


@jit()
def sums32_rows(xs16):
    """block_sums32 of each row of sums per 16."""
    sums = np.empty((xs16.shape[0], xs16.shape[1] // 2), np.float32)
    for i in range(xs16.shape[0]):
        sums[i] = block_sums32(xs16[i])
    return sums


TILE = 4  # rows of x taken together against each weight row (the tiled kernels)


@jit()
def tile_rows(t, n):
    """Rows t..t+3 of x's n, and whether all four are taken (three or more left) or
    only the first two (the tile functions skip the others' steps); a row past the
    last is the last again (computed twice)."""
    return t, min(t + 1, n - 1), min(t + 2, n - 1), min(t + 3, n - 1), n - t >= 3


@jit()
def block_scales16(xd):
    """x's scales per block (n, blocks), each in 8 lanes (n, 8 blocks): a pair of
    blocks' 16 lanes line up with pair_splat's."""
    n, nb = xd.shape
    out = np.empty((n, 8 * nb), np.float32)
    for i in range(n):
        for b in range(nb):
            for lane in range(8):  # element loops: slice assignments compile slowly (token_ops._gate)
                out[i, 8 * b + lane] = xd[i, b]
    return out


@jit()
def tile_sums(xs):
    """x's block sums (n, blocks) per tile of TILE rows (tiles, TILE blocks): lane j
    of block b in tile t is row t TILE + j's (the last row's past the end, as
    tile_rows repeats it)."""
    n, nb = xs.shape
    tiles = (n + TILE - 1) // TILE
    out = np.empty((tiles, TILE * nb), np.float32)
    for t in range(tiles):
        for j in range(TILE):
            i = min(TILE * t + j, n - 1)
            for b in range(nb):
                out[t, TILE * b + j] = xs[i, b]
    return out


@jit()
def task_rows(task, rows):
    """The weight rows of task `task` (ROWS_PER_TASK of them, fewer at the end)."""
    start = task * ROWS_PER_TASK
    return start, min(rows, start + ROWS_PER_TASK)


@jit()
def task_count(rows):
    return (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK


# One row of x against an unpacked weight row: the matvecs' loops.


@jit(ordered=True)
def _pairs_biased(wq, ws8, xp, xd8, bias_sums8, pairs):
    """matvec_q4_0's and matvec_q5_0's row loop (the pair form), their bias of 8 or
    16 already in x's sums (integers: the products are the same)."""
    even = zeros8()
    odd = zeros8()
    for k in range(pairs // 2):
        p = 2 * k
        even = _two_biased(even, wq, ws8, xp, xd8, bias_sums8, p)
        p += 1
        odd = _two_biased(odd, wq, ws8, xp, xd8, bias_sums8, p)
    if pairs % 2:
        even = _two_biased(even, wq, ws8, xp, xd8, bias_sums8, pairs - 1)
    return sum8(even) + sum8(odd)


@jit(ordered=True)
def _pairs_with_mins(wq, ws8, wm8, xp, xd8, isums8, fsums8, pairs):
    """matvec_q4_1's and matvec_q5_1's row loop (the pair form)."""
    even = zeros8()
    odd = zeros8()
    lows = zeros8()
    for k in range(pairs // 2):
        p = 2 * k
        even = _two_unbiased(even, wq, ws8, xp, xd8, isums8, p)
        lows = fma8(lows, _load8(wm8, 8 * p), fsums8, 8 * p)
        p += 1
        odd = _two_unbiased(odd, wq, ws8, xp, xd8, isums8, p)
        lows = fma8(lows, _load8(wm8, 8 * p), fsums8, 8 * p)
    if pairs % 2:
        p = pairs - 1
        even = _two_unbiased(even, wq, ws8, xp, xd8, isums8, p)
        lows = fma8(lows, _load8(wm8, 8 * p), fsums8, 8 * p)
    return sum8(even) + sum8(odd) + sum8(lows)


@jit()
def _unpack_pairs(qr, hr, bytes_per_block, halves_per_block, quant_offset, wq, ws8, wm8):
    """A row of Q4_0/Q4_1 blocks (pairs of them) into the buffers: quants at
    quant_offset bytes into each block, d at its first float16, m (when wm8 is
    not None) at the next."""
    pairs = hr.size // halves_per_block // 2
    for p in range(pairs):
        b = 2 * p
        prefetch(qr, bytes_per_block * b + PREFETCH_AHEAD)
        _unpack_pair(qr, bytes_per_block * b + quant_offset, bytes_per_block * (b + 1) + quant_offset,
                     None, None, wq, p)
        _unpack_half_pair(hr, halves_per_block * b, halves_per_block * (b + 1), ws8, p)
        if wm8 is not None:
            _unpack_half_pair(hr, halves_per_block * b + 1, halves_per_block * (b + 1) + 1, wm8, p)


@jit()
def _unpack_q5_pairs(qr, hr, halves_per_block, wq, ws8, wm8):
    """A row of Q5_0 (11 halves a block) or Q5_1 (12) blocks into the buffers."""
    pairs = hr.size // halves_per_block // 2
    mins = halves_per_block == 12
    high = 1 + mins  # the fifth bits' first half
    for p in range(pairs):
        b = 2 * p
        i0 = halves_per_block * b
        i1 = i0 + halves_per_block
        prefetch(qr, 2 * i0 + PREFETCH_AHEAD)
        low, top = fifth_bit_pairs(hr, i0 + high, i1 + high)
        _unpack_pair(qr, 2 * i0 + 2 * high + 4, 2 * i1 + 2 * high + 4, low, top, wq, p)
        _unpack_half_pair(hr, i0, i1, ws8, p)
        if mins:
            _unpack_half_pair(hr, i0 + 1, i1 + 1, wm8, p)


# The 32-weight types. An odd last block is added afterwards, as the matvecs add it.


@jit(parallel=True, ordered=True)
def _matmul_q4_0_pairs(q, d, x, out):
    nb = d.shape[1] // 9
    xq, xd, xs = quantize_rows(x)
    xp, xd8, isums8, _ = pair_rows(xq, xd)
    bias_sums8 = isums8 * np.int32(8)
    pairs = nb // 2
    for task in prange(task_count(q.shape[0])):
        wq = np.empty(64 * pairs, np.uint8)
        ws8 = np.empty(8 * pairs, np.float32)
        start, stop = task_rows(task, q.shape[0])
        for r in range(start, stop):
            _unpack_pairs(q[r], d[r], 18, 9, 2, wq, ws8, None)
            for i in range(x.shape[0]):
                out[i, r] = _pairs_biased(wq, ws8, xp[i], xd8[i], bias_sums8[i], pairs)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            scale = f16_to_f32(d[r, 9 * b])
            for i in range(x.shape[0]):
                tail = sum8(q4_fma(zeros8(), q[r], 18 * b + 2, xq[i], 32 * b, scale * xd[i, b]))
                out[i, r] += tail - np.float32(8.0) * scale * (xs[i, 2 * b] + xs[i, 2 * b + 1])


@jit(parallel=True, ordered=True)
def _matmul_q4_1_pairs(q, d, x, out):
    nb = d.shape[1] // 10
    xq, xd, xs = quantize_rows(x)
    xp, xd8, isums8, fsums8 = pair_rows(xq, xd)
    pairs = nb // 2
    for task in prange(task_count(q.shape[0])):
        wq = np.empty(64 * pairs, np.uint8)
        ws8 = np.empty(8 * pairs, np.float32)
        wm8 = np.empty(8 * pairs, np.float32)
        start, stop = task_rows(task, q.shape[0])
        for r in range(start, stop):
            _unpack_pairs(q[r], d[r], 20, 10, 4, wq, ws8, wm8)
            for i in range(x.shape[0]):
                out[i, r] = _pairs_with_mins(wq, ws8, wm8, xp[i], xd8[i], isums8[i], fsums8[i], pairs)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            for i in range(x.shape[0]):
                tail = sum8(q4_fma(zeros8(), q[r], 20 * b + 4, xq[i], 32 * b, f16_to_f32(d[r, 10 * b]) * xd[i, b]))
                out[i, r] += tail + f16_to_f32(d[r, 10 * b + 1]) * (xs[i, 2 * b] + xs[i, 2 * b + 1])


@jit(ordered=True)
def _q5_0_task(q, h, xp, xd8, sums8, task, out):
    """matvec_q5_0's row loop for the weight rows of task `task`, four rows of x at a time."""
    start, stop = task_rows(task, q.shape[0])
    n, pairs = xp.shape[0], h.shape[1] // 22
    for t in range(0, n, TILE):
        i0, i1, i2, i3, four = tile_rows(t, n)
        p0, p1, p2, p3 = xp[i0], xp[i1], xp[i2], xp[i3]
        d0, d1, d2, d3 = xd8[i0], xd8[i1], xd8[i2], xd8[i3]
        s0, s1, s2, s3 = sums8[i0], sums8[i1], sums8[i2], sums8[i3]
        for r in range(start, stop):
            qr, hr = q[r], h[r]
            e0, e1, e2, e3 = zeros8(), zeros8(), zeros8(), zeros8()
            o0, o1, o2, o3 = zeros8(), zeros8(), zeros8(), zeros8()
            for k in range(pairs // 2):
                p = 2 * k
                prefetch(qr, 44 * p + PREFETCH_AHEAD)
                e0 = _q5_0_pair_fma(e0, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p0, d0, s0, p)
                e1 = _q5_0_pair_fma(e1, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p1, d1, s1, p)
                if four:
                    e2 = _q5_0_pair_fma(e2, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p2, d2, s2, p)
                    e3 = _q5_0_pair_fma(e3, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p3, d3, s3, p)
                p += 1
                o0 = _q5_0_pair_fma(o0, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p0, d0, s0, p)
                o1 = _q5_0_pair_fma(o1, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p1, d1, s1, p)
                if four:
                    o2 = _q5_0_pair_fma(o2, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p2, d2, s2, p)
                    o3 = _q5_0_pair_fma(o3, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p3, d3, s3, p)
            if pairs % 2:
                p = pairs - 1
                e0 = _q5_0_pair_fma(e0, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p0, d0, s0, p)
                e1 = _q5_0_pair_fma(e1, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p1, d1, s1, p)
                if four:
                    e2 = _q5_0_pair_fma(e2, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p2, d2, s2, p)
                    e3 = _q5_0_pair_fma(e3, qr, 44 * p + 6, 44 * p + 28, hr, 22 * p, 22 * p + 11, p3, d3, s3, p)
            out[i0, r], out[i1, r] = sum8(e0) + sum8(o0), sum8(e1) + sum8(o1)
            if four:
                out[i2, r], out[i3, r] = sum8(e2) + sum8(o2), sum8(e3) + sum8(o3)


@jit(ordered=True)
def _q5_0_last_block(q, h, xq, xd, xs, out):
    """An odd last Q5_0 block's products, added to out[i] for each row i of x (as matvec_q5_0 adds it)."""
    b = h.shape[1] // 11 - 1
    for r in range(q.shape[0]):
        hr = h[r]
        scale = f16_to_f32(hr[11 * b])
        for i in range(xq.shape[0]):
            tail = sum8(q5_fma(zeros8(), q[r], 22 * b + 6, q5_high_bits(hr, 11 * b + 1), xq[i], 32 * b,
                               scale * xd[i, b]))
            out[i, r] += tail - np.float32(16.0) * scale * (xs[i, 2 * b] + xs[i, 2 * b + 1])


@jit(parallel=True, ordered=True)
def _matmul_q5_0_pairs(q, h, x, out):
    nb = h.shape[1] // 11
    xq, xd, xs = quantize_rows(x)
    xp, xd8, isums8, _ = pair_rows(xq, xd)
    bias_sums8 = isums8 * np.int32(16)
    for task in prange(task_count(q.shape[0])):
        _q5_0_task(q, h, xp, xd8, bias_sums8, task, out)
    if nb % 2:
        _q5_0_last_block(q, h, xq, xd, xs, out)


@jit()
def join_rows(xp, xd8, sums8):
    """x's rows in pairs (rows 2j and 2j + 1, the last row again past the end, as
    tile_rows repeats it) for _q5_0_pair_fma_rows: per pair of blocks, each row's 32
    bytes against the low nibbles, then against the high ones; its 8 scales and
    sums. Joined once per product, not at every step."""
    n, pairs = xp.shape[0], xd8.shape[1] // 8
    m = (n + 1) // 2
    xj = np.empty((m, 128 * pairs), np.int8)
    dj = np.empty((m, 16 * pairs), np.float32)
    sj = np.empty((m, 16 * pairs), np.int32)
    for j in range(m):
        for half in range(2):
            i = min(2 * j + half, n - 1)
            for p in range(pairs):  # element loops, as block_scales16
                for k in range(32):
                    xj[j, 128 * p + 32 * half + k] = xp[i, 64 * p + k]
                    xj[j, 128 * p + 64 + 32 * half + k] = xp[i, 64 * p + 32 + k]
                for k in range(8):
                    dj[j, 16 * p + 8 * half + k] = xd8[i, 8 * p + k]
                    sj[j, 16 * p + 8 * half + k] = sums8[i, 8 * p + k]
    return xj, dj, sj


@jit(ordered=True)
def _q5_0_wide_task(q, h, xj, dj, sj, n, task, out):
    """_q5_0_task with two rows of x in each vector (_q5_0_pair_fma_rows; x's rows joined by join_rows)."""
    start, stop = task_rows(task, q.shape[0])
    pairs = h.shape[1] // 22
    for t in range(0, n, TILE):
        i0, i1, i2, i3, four = tile_rows(t, n)
        ja, jb = t // 2, min(t // 2 + 1, xj.shape[0] - 1)
        xa, xb, da, db, sa, sb = xj[ja], xj[jb], dj[ja], dj[jb], sj[ja], sj[jb]
        for r in range(start, stop):
            qr, hr = q[r], h[r]
            e01, e23, o01, o23 = zeros16(), zeros16(), zeros16(), zeros16()
            for k in range(pairs // 2):
                p = 2 * k
                prefetch(qr, 44 * p + PREFETCH_AHEAD)
                a, b = 44 * p + 6, 22 * p
                e01 = _q5_0_pair_fma_rows(e01, qr, a, a + 22, hr, b, b + 11, xa, da, sa, p)
                if four:
                    e23 = _q5_0_pair_fma_rows(e23, qr, a, a + 22, hr, b, b + 11, xb, db, sb, p)
                p += 1
                a, b = 44 * p + 6, 22 * p
                o01 = _q5_0_pair_fma_rows(o01, qr, a, a + 22, hr, b, b + 11, xa, da, sa, p)
                if four:
                    o23 = _q5_0_pair_fma_rows(o23, qr, a, a + 22, hr, b, b + 11, xb, db, sb, p)
            if pairs % 2:
                p = pairs - 1
                a, b = 44 * p + 6, 22 * p
                e01 = _q5_0_pair_fma_rows(e01, qr, a, a + 22, hr, b, b + 11, xa, da, sa, p)
                if four:
                    e23 = _q5_0_pair_fma_rows(e23, qr, a, a + 22, hr, b, b + 11, xb, db, sb, p)
            out[i0, r] = sum8(_row_a(e01)) + sum8(_row_a(o01))
            out[i1, r] = sum8(_row_b(e01)) + sum8(_row_b(o01))
            if four:
                out[i2, r] = sum8(_row_a(e23)) + sum8(_row_a(o23))
                out[i3, r] = sum8(_row_b(e23)) + sum8(_row_b(o23))


@jit(parallel=True, ordered=True)
def _matmul_q5_0_wide(q, h, x, out):
    nb = h.shape[1] // 11
    xq, xd, xs = quantize_rows(x)
    xp, xd8, isums8, _ = pair_rows(xq, xd)
    xj, dj, sj = join_rows(xp, xd8, isums8 * np.int32(16))
    for task in prange(task_count(q.shape[0])):
        _q5_0_wide_task(q, h, xj, dj, sj, x.shape[0], task, out)
    if nb % 2:
        _q5_0_last_block(q, h, xq, xd, xs, out)


@jit(parallel=True, ordered=True)
def matmul_q5_1(q, h, x, out):
    nb = h.shape[1] // 12
    xq, xd, xs = quantize_rows(x)
    xp, xd8, isums8, fsums8 = pair_rows(xq, xd)
    pairs = nb // 2
    for task in prange(task_count(q.shape[0])):
        wq = np.empty(64 * pairs, np.uint8)
        ws8 = np.empty(8 * pairs, np.float32)
        wm8 = np.empty(8 * pairs, np.float32)
        start, stop = task_rows(task, q.shape[0])
        for r in range(start, stop):
            _unpack_q5_pairs(q[r], h[r], 12, wq, ws8, wm8)
            for i in range(x.shape[0]):
                out[i, r] = _pairs_with_mins(wq, ws8, wm8, xp[i], xd8[i], isums8[i], fsums8[i], pairs)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            hr = h[r]
            for i in range(x.shape[0]):
                tail = sum8(q5_fma(zeros8(), q[r], 24 * b + 8, q5_high_bits(hr, 12 * b + 2), xq[i], 32 * b,
                                   f16_to_f32(hr[12 * b]) * xd[i, b]))
                out[i, r] += tail + f16_to_f32(hr[12 * b + 1]) * (xs[i, 2 * b] + xs[i, 2 * b + 1])


# Q4_0 and Q4_1 where the CPU has 512-bit VNNI: the matvecs' two-blocks-per-vpdpbusd form.


@jit(ordered=True)
def _q4_0_wide_task(q, d, xq, xd16, sums, task, out):
    """_matvec_q4_0_wide's row loop for the weight rows of task `task`, four rows of x at a time (the vector
    form above): per row, the nibbles' sum, and x's block sums times the scales (the bias of 8 is taken
    through them)."""
    start, stop = task_rows(task, q.shape[0])
    n, nb = xq.shape[0], d.shape[1] // 9
    eight = np.float32(8.0)
    for t in range(0, n, TILE):
        i0, i1, i2, i3, four = tile_rows(t, n)
        x0, x1, x2, x3 = xq[i0], xq[i1], xq[i2], xq[i3]
        d0, d1, d2, d3 = xd16[i0], xd16[i1], xd16[i2], xd16[i3]
        tile = sums[t // TILE]
        for r in range(start, stop):
            qr, dr = q[r], d[r]
            a0, a1, a2, a3 = zeros16(), zeros16(), zeros16(), zeros16()
            biases = zeros4()
            for c in range(nb // 2):
                b = 2 * c
                prefetch(qr, 18 * b + PREFETCH_AHEAD)
                w0, _, w1, _ = f16_two_pairs(dr, 9 * b, 9 * b + 9)
                w16 = _pair_scales(w0, w1)
                biases = _tile_offsets(biases, w0, w1, tile, TILE * b)
                a0 = _q4_pair_scaled_fma(a0, qr, 18 * b + 2, 18 * b + 20, x0, 32 * b, w16, d0, 8 * b)
                a1 = _q4_pair_scaled_fma(a1, qr, 18 * b + 2, 18 * b + 20, x1, 32 * b, w16, d1, 8 * b)
                if four:
                    a2 = _q4_pair_scaled_fma(a2, qr, 18 * b + 2, 18 * b + 20, x2, 32 * b, w16, d2, 8 * b)
                    a3 = _q4_pair_scaled_fma(a3, qr, 18 * b + 2, 18 * b + 20, x3, 32 * b, w16, d3, 8 * b)
            out[i0, r] = sum16(a0) - eight * vector_lane(biases, 0)
            out[i1, r] = sum16(a1) - eight * vector_lane(biases, 1)
            if four:
                out[i2, r] = sum16(a2) - eight * vector_lane(biases, 2)
                out[i3, r] = sum16(a3) - eight * vector_lane(biases, 3)


@jit(ordered=True)
def _q4_1_wide_task(q, d, xq, xd16, sums, task, out):
    """_q4_0_wide_task for Q4_1: x's block sums times the minimums are added."""
    start, stop = task_rows(task, q.shape[0])
    n, nb = xq.shape[0], d.shape[1] // 10
    for t in range(0, n, TILE):
        i0, i1, i2, i3, four = tile_rows(t, n)
        x0, x1, x2, x3 = xq[i0], xq[i1], xq[i2], xq[i3]
        d0, d1, d2, d3 = xd16[i0], xd16[i1], xd16[i2], xd16[i3]
        tile = sums[t // TILE]
        for r in range(start, stop):
            qr, dr = q[r], d[r]
            a0, a1, a2, a3 = zeros16(), zeros16(), zeros16(), zeros16()
            lows = zeros4()
            for c in range(nb // 2):
                b = 2 * c
                prefetch(qr, 20 * b + PREFETCH_AHEAD)
                w0, m0, w1, m1 = f16_two_pairs(dr, 10 * b, 10 * b + 10)
                w16 = _pair_scales(w0, w1)
                lows = _tile_offsets(lows, m0, m1, tile, TILE * b)
                a0 = _q4_pair_scaled_fma(a0, qr, 20 * b + 4, 20 * b + 24, x0, 32 * b, w16, d0, 8 * b)
                a1 = _q4_pair_scaled_fma(a1, qr, 20 * b + 4, 20 * b + 24, x1, 32 * b, w16, d1, 8 * b)
                if four:
                    a2 = _q4_pair_scaled_fma(a2, qr, 20 * b + 4, 20 * b + 24, x2, 32 * b, w16, d2, 8 * b)
                    a3 = _q4_pair_scaled_fma(a3, qr, 20 * b + 4, 20 * b + 24, x3, 32 * b, w16, d3, 8 * b)
            out[i0, r], out[i1, r] = sum16(a0) + vector_lane(lows, 0), sum16(a1) + vector_lane(lows, 1)
            if four:
                out[i2, r], out[i3, r] = sum16(a2) + vector_lane(lows, 2), sum16(a3) + vector_lane(lows, 3)


@jit(parallel=True, ordered=True)
def _matmul_q4_0_wide(q, d, x, out):
    nb = d.shape[1] // 9
    xq, xd, xs16 = quantize_rows(x)
    xs = sums32_rows(xs16)
    n = x.shape[0]
    xd16, sums = block_scales16(xd), tile_sums(xs)
    for task in prange(task_count(q.shape[0])):
        _q4_0_wide_task(q, d, xq, xd16, sums, task, out)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            scale = f16_to_f32(d[r, 9 * b])
            for i in range(n):
                tail = sum8(q4_fma(zeros8(), q[r], 18 * b + 2, xq[i], 32 * b, scale * xd[i, b]))
                out[i, r] += tail - np.float32(8.0) * scale * xs[i, b]


@jit(parallel=True, ordered=True)
def _matmul_q4_1_wide(q, d, x, out):
    nb = d.shape[1] // 10
    xq, xd, xs16 = quantize_rows(x)
    xs = sums32_rows(xs16)
    n = x.shape[0]
    xd16, sums = block_scales16(xd), tile_sums(xs)
    for task in prange(task_count(q.shape[0])):
        _q4_1_wide_task(q, d, xq, xd16, sums, task, out)
    if nb % 2:
        b = nb - 1
        for r in range(q.shape[0]):
            for i in range(n):
                tail = sum8(q4_fma(zeros8(), q[r], 20 * b + 4, xq[i], 32 * b, f16_to_f32(d[r, 10 * b]) * xd[i, b]))
                out[i, r] += tail + f16_to_f32(d[r, 10 * b + 1]) * xs[i, b]


@jit(ordered=True)
def _q8_0_task(q, d, xq, xd, task, out):
    """matvec_q8_0's row loop for the weight rows of task `task`, four rows of x at a time."""
    start, stop = task_rows(task, q.shape[0])
    n, nb = xq.shape[0], d.shape[1] // 17
    for t in range(0, n, TILE):
        i0, i1, i2, i3, four = tile_rows(t, n)
        x0, x1, x2, x3 = xq[i0], xq[i1], xq[i2], xq[i3]
        d0, d1, d2, d3 = xd[i0], xd[i1], xd[i2], xd[i3]
        for r in range(start, stop):
            qr, dr = q[r], d[r]
            a0, a1, a2, a3 = zeros8(), zeros8(), zeros8(), zeros8()
            for b in range(nb):
                prefetch(qr, 34 * b + PREFETCH_AHEAD)
                w = f16_two_pairs(dr, 17 * b, 17 * b)[0]
                a0 = q8_0_fma(a0, qr, 34 * b + 2, x0, 32 * b, w * d0[b])
                a1 = q8_0_fma(a1, qr, 34 * b + 2, x1, 32 * b, w * d1[b])
                if four:
                    a2 = q8_0_fma(a2, qr, 34 * b + 2, x2, 32 * b, w * d2[b])
                    a3 = q8_0_fma(a3, qr, 34 * b + 2, x3, 32 * b, w * d3[b])
            out[i0, r], out[i1, r] = sum8(a0), sum8(a1)
            if four:
                out[i2, r], out[i3, r] = sum8(a2), sum8(a3)


@jit(parallel=True, ordered=True)
def matmul_q8_0(q, d, x, out):
    xq, xd, _ = quantize_rows(x)
    for task in prange(task_count(q.shape[0])):
        _q8_0_task(q, d, xq, xd, task, out)


@jit(ordered=True)
def _q8_0_wide_task(q, d, xq, xd16, lane_sums, task, out):
    """_matvec_q8_0_wide's row loop for the weight rows of task `task`, four rows of x at a time (vector scales)."""
    start, stop = task_rows(task, q.shape[0])
    n, nb = xq.shape[0], d.shape[1] // 17
    for t in range(0, n, TILE):
        i0, i1, i2, i3, four = tile_rows(t, n)
        x0, x1, x2, x3 = xq[i0], xq[i1], xq[i2], xq[i3]
        d0, d1, d2, d3 = xd16[i0], xd16[i1], xd16[i2], xd16[i3]
        l0, l1, l2, l3 = lane_sums[i0], lane_sums[i1], lane_sums[i2], lane_sums[i3]
        for r in range(start, stop):
            qr, dr = q[r], d[r]
            a0, a1, a2, a3 = zeros16(), zeros16(), zeros16(), zeros16()
            for c in range(nb // 2):
                b = 2 * c
                prefetch(qr, 34 * b + PREFETCH_AHEAD)
                w16 = _pair_scales(f16_two_pairs(dr, 17 * b, 17 * b)[0], f16_two_pairs(dr, 17 * b + 17, 17 * b + 17)[0])
                a0 = _q8_0_pair_scaled_fma(a0, qr, 34 * b + 2, 34 * b + 36, x0, 32 * b, l0, 8 * b, w16, d0, 8 * b)
                a1 = _q8_0_pair_scaled_fma(a1, qr, 34 * b + 2, 34 * b + 36, x1, 32 * b, l1, 8 * b, w16, d1, 8 * b)
                if four:
                    a2 = _q8_0_pair_scaled_fma(a2, qr, 34 * b + 2, 34 * b + 36, x2, 32 * b, l2, 8 * b, w16, d2, 8 * b)
                    a3 = _q8_0_pair_scaled_fma(a3, qr, 34 * b + 2, 34 * b + 36, x3, 32 * b, l3, 8 * b, w16, d3, 8 * b)
            out[i0, r], out[i1, r] = sum16(a0), sum16(a1)
            if four:
                out[i2, r], out[i3, r] = sum16(a2), sum16(a3)


@jit()
def _lane_sums_rows(xq):
    """minus_lane_sums128 of each row of x."""
    sums = np.empty((xq.shape[0], xq.shape[1] // 4), np.int32)
    for i in range(xq.shape[0]):
        sums[i] = minus_lane_sums128(xq[i])
    return sums


@jit(parallel=True, ordered=True)
def _matmul_q8_0_wide(q, d, x, out):
    xq, xd, _ = quantize_rows(x)
    lane_sums = _lane_sums_rows(xq)
    xd16 = block_scales16(xd)
    for task in prange(task_count(q.shape[0])):
        _q8_0_wide_task(q, d, xq, xd16, lane_sums, task, out)
    if (d.shape[1] // 17) % 2:
        _q8_0_last_blocks(q, d, xq, xd, out)


@jit(ordered=True)
def _q8_0_last_blocks(q, d, xq, xd, out):
    """An odd last Q8_0 block's products for each row of x, as _matvec_q8_0_wide adds them."""
    for i in range(xq.shape[0]):
        q8_0_last_block(q, d, xq[i], xd[i], out[i])


# K-quants: a 256-weight block's bytes unpacked in the order of its weights
# (256 bytes), its sub-block scales (and minimums) times d (and dmin) as float32.


@jit(ordered=True)
def _k4_task(q, h, xq, xd, xs32, task, out, bytes_per_block):
    """matvec_q4_k's (bytes_per_block 144) or matvec_q5_k's (176: the fifth bits) row loop
    for the weight rows of task `task`, four rows of x at a time: the same steps, written
    out per row of x, on the same weight bytes (unpacked once: LLVM computes the
    expressions once for the four)."""
    start, stop = task_rows(task, q.shape[0])
    n, halves = xq.shape[0], bytes_per_block // 2
    nb = h.shape[1] // halves
    fifth = bytes_per_block == 176
    quants = 48 if fifth else 16
    for t in range(0, n, TILE):
        i0, i1, i2, i3, four = tile_rows(t, n)
        x0, x1, x2, x3 = xq[i0], xq[i1], xq[i2], xq[i3]
        d0, d1, d2, d3 = xd[i0], xd[i1], xd[i2], xd[i3]
        s0, s1, s2, s3 = xs32[i0], xs32[i1], xs32[i2], xs32[i3]
        for r in range(start, stop):
            qr, hr = q[r], h[r]
            e0, e1, e2, e3 = k_zeros(), k_zeros(), k_zeros(), k_zeros()
            o0, o1, o2, o3 = k_zeros(), k_zeros(), k_zeros(), k_zeros()
            l0, l1, l2, l3 = zeros8(), zeros8(), zeros8(), zeros8()
            for b in range(nb):
                block = bytes_per_block * b
                prefetch(qr, block + PREFETCH_AHEAD)
                prefetch(qr, block + PREFETCH_AHEAD + 64)
                prefetch(qr, block + PREFETCH_AHEAD + 128)
                packed_scales, packed_mins = k4_scale_min_bytes(qr, block + 4)
                c0 = byte_lanes(packed_scales, hr, halves * b, d0, 8 * b)
                c1 = byte_lanes(packed_scales, hr, halves * b, d1, 8 * b)
                c2 = byte_lanes(packed_scales, hr, halves * b, d2, 8 * b)
                c3 = byte_lanes(packed_scales, hr, halves * b, d3, 8 * b)
                l0 = add8(l0, byte_lanes(packed_mins, hr, halves * b + 1, s0, 8 * b))
                l1 = add8(l1, byte_lanes(packed_mins, hr, halves * b + 1, s1, 8 * b))
                l2 = add8(l2, byte_lanes(packed_mins, hr, halves * b + 1, s2, 8 * b))
                l3 = add8(l3, byte_lanes(packed_mins, hr, halves * b + 1, s3, 8 * b))
                o = block + quants
                qh = block + 16
                for k in range(4):
                    at, xs = o + 32 * k, 256 * b + 64 * k
                    if fifth:
                        if k % 2 == 0:
                            e0 = k_halves_fma(e0, qr, at, x0, xs, c0, 2 * k, qh, 2 * k)
                            e1 = k_halves_fma(e1, qr, at, x1, xs, c1, 2 * k, qh, 2 * k)
                            if four:
                                e2 = k_halves_fma(e2, qr, at, x2, xs, c2, 2 * k, qh, 2 * k)
                                e3 = k_halves_fma(e3, qr, at, x3, xs, c3, 2 * k, qh, 2 * k)
                        else:
                            o0 = k_halves_fma(o0, qr, at, x0, xs, c0, 2 * k, qh, 2 * k)
                            o1 = k_halves_fma(o1, qr, at, x1, xs, c1, 2 * k, qh, 2 * k)
                            if four:
                                o2 = k_halves_fma(o2, qr, at, x2, xs, c2, 2 * k, qh, 2 * k)
                                o3 = k_halves_fma(o3, qr, at, x3, xs, c3, 2 * k, qh, 2 * k)
                    elif k % 2 == 0:
                        e0 = k_halves_fma(e0, qr, at, x0, xs, c0, 2 * k, None, 0)
                        e1 = k_halves_fma(e1, qr, at, x1, xs, c1, 2 * k, None, 0)
                        if four:
                            e2 = k_halves_fma(e2, qr, at, x2, xs, c2, 2 * k, None, 0)
                            e3 = k_halves_fma(e3, qr, at, x3, xs, c3, 2 * k, None, 0)
                    else:
                        o0 = k_halves_fma(o0, qr, at, x0, xs, c0, 2 * k, None, 0)
                        o1 = k_halves_fma(o1, qr, at, x1, xs, c1, 2 * k, None, 0)
                        if four:
                            o2 = k_halves_fma(o2, qr, at, x2, xs, c2, 2 * k, None, 0)
                            o3 = k_halves_fma(o3, qr, at, x3, xs, c3, 2 * k, None, 0)
            out[i0, r] = k_sum(e0) + k_sum(o0) - sum8(l0)
            out[i1, r] = k_sum(e1) + k_sum(o1) - sum8(l1)
            if four:
                out[i2, r] = k_sum(e2) + k_sum(o2) - sum8(l2)
                out[i3, r] = k_sum(e3) + k_sum(o3) - sum8(l3)


@jit(parallel=True, ordered=True)
def matmul_q4_k(q, h, x, out):
    xq, xd, xs = quantize_rows(x)
    xs32 = sums32_rows(xs)
    for task in prange(task_count(q.shape[0])):
        _k4_task(q, h, xq, xd, xs32, task, out, 144)


@jit(parallel=True, ordered=True)
def matmul_q5_k(q, h, x, out):
    xq, xd, xs = quantize_rows(x)
    xs32 = sums32_rows(xs)
    for task in prange(task_count(q.shape[0])):
        _k4_task(q, h, xq, xd, xs32, task, out, 176)


@jit(ordered=True)
def _q6_k_row(wq, wsc, xq, xd, xs, nb):
    """matvec_q6_k's row loop."""
    first = k_zeros()
    second = k_zeros()
    bias = zeros8()
    for b in range(nb):
        scales0 = _load8(wsc, 16 * b)
        scales1 = _load8(wsc, 16 * b + 8)
        bias = fma8(fma8(bias, scales0, xs, 16 * b), scales1, xs, 16 * b + 8)
        scales0 = pairwise_scaled(scales0, xd, 8 * b)
        scales1 = pairwise_scaled(scales1, xd, 8 * b + 4)
        for m in range(2):
            at = 256 * b + 64 * m
            first = _quad_from_buffer(first, wq, at, xq, at, scales0, 4 * m)
            second = _quad_from_buffer(second, wq, at + 128, xq, at + 128, scales1, 4 * m)
    return k_sum(first) + k_sum(second) - np.float32(32.0) * sum8(bias)


@jit(parallel=True, ordered=True)
def matmul_q6_k(q, h, x, out):
    nb = h.shape[1] // 105
    xq, xd, xs = quantize_rows(x)
    for task in prange(task_count(q.shape[0])):
        wq = np.empty(256 * nb, np.uint8)
        wsc = np.empty(16 * nb, np.float32)
        start, stop = task_rows(task, q.shape[0])
        for r in range(start, stop):
            qr = q[r]
            hr = h[r]
            for b in range(nb):
                o = 210 * b
                for line in range(0, 210, 64):
                    prefetch(qr, o + PREFETCH_AHEAD + line)
                _store8(int8_lanes(qr, o + 192, hr, 105 * b + 104), wsc, 16 * b)
                _store8(int8_lanes(qr, o + 200, hr, 105 * b + 104), wsc, 16 * b + 8)
                for m in range(2):
                    _unpack_q6_k_quad(qr, o, o + 128, 4 * m, wq, 256 * b + 64 * m)
                    _unpack_q6_k_quad(qr, o + 64, o + 160, 4 * m, wq, 256 * b + 128 + 64 * m)
            for i in range(x.shape[0]):
                out[i, r] = _q6_k_row(wq, wsc, xq[i], xd[i], xs[i], nb)


# Where the CPU has 512-bit VNNI: Q4_0 and Q4_1 take the form their matvecs take there, Q5_0 two rows of x a vector.
matmul_q4_0 = _matmul_q4_0_pairs
matmul_q4_1 = _matmul_q4_1_pairs
matmul_q5_0 = _matmul_q5_0_pairs
if numba_enabled() and AVAILABLE and VNNI_512:
    matmul_q4_0 = _matmul_q4_0_wide
    matmul_q4_1 = _matmul_q4_1_wide
    matmul_q5_0 = _matmul_q5_0_wide
    matmul_q8_0 = _matmul_q8_0_wide  # noqa: F811

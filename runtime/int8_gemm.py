"""Matrix x matrix for prompts with integer dot products (512-bit VNNI), as precise as float32.

A prompt multiplies every weight by each of its T tokens, so it is bound by
arithmetic, not by reading the weights: in float32 (matmul.py) Qwen2.5 0.5B's
256-token prompt ran at ~45 GFLOP/s a core. Here the weights are unpacked to
bytes and `vpdpbusd` does 64 multiply-adds an instruction.

x is rounded to int8 per block of 32 as decoding rounds it
(int8_matvec.quantize_x), and what that rounding left is rounded to int8 again,
in steps of 1/254 of a step: x = scale (rounded + remainder / 254), each
element within 1/508 of a step (~1e-5 of the block's largest |x|), and two
integer products. Rounded once, as llama.cpp rounds its prompts, SmolLM2
answered "What is the capital of France?" with "L'" (0.08 ahead of "The",
where transformers has "The" 0.08 ahead), as llama.cpp does; its logits moved
from transformers' as far as llama.cpp's (0.79 against 0.77, the mean largest
error along 16 greedy tokens of 5 prompts; float32 prompts 0.58). Twice, 0.61,
"The capital of France is Paris.", at 0.6x the speed of once.

Each task takes TILE_ROWS (32) weight rows and unpacks them once into a tile
laid out for the instruction: for every 4 weights of a row (a chunk), a
64-byte line holds those 4 bytes of 16 rows, so a vector of weights times x's
4 bytes broadcast to every lane sums 4 products into each row's lane. Chunks
come in groups that share a scale (a block of 32, or a K-quant's sub-block of
16): per group and row of x, the integer sums become floats once, times the
weights' scales (one per row, a vector) and x's scale, plus the weights'
offsets (a bias or minimum, per row) times x's scaled sum. The tile is then
run against all of x, X_ROWS rows at a time with their sums in registers.
Weights are unsigned bytes (the instruction's first operand): Q8_0's signed
bytes are stored plus 128, taken back through the offset.

Measured (one thread, T = 256, against matmul.py's float tiles): 2-4x; 32 weight
rows a tile against 16, 1.1-1.3x.

Prompts only: decoding keeps int8_matvec (one row of x, bit-exact with the
batched kernels). Where the CPU lacks 512-bit VNNI, `AVAILABLE` is False and
prompts stay in float32.

One driver per weight type, for the reason matmul.py gives.
"""

from __future__ import annotations

import numpy as np

from .block_layouts import q4_k_part, q5_high_bits, q5_k_part, q6_k_part
from .jit import jit, numba_enabled, prange

REMAINDER_STEPS = 254  # x = scale (rounded + remainder / 254): both int8, 2 products
TILE_ROWS = 32  # weight rows per tile: 4 bytes of each 16 in a 64-byte line
VECTORS = TILE_ROWS // 16
X_ROWS = 4  # rows of x whose running sums a tile product keeps in registers

AVAILABLE = False

if numba_enabled():
    from .simd import VNNI_512, f16_to_f32

    AVAILABLE = VNNI_512

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .int8_matvec import BYTES32, block_nibbles, fifth_bits, k_weights
    from .simd import FAST, constant, int64, load_vector, rounded_block

    _I32 = ir.IntType(32)
    _DWORDS8 = ir.VectorType(_I32, 8)
    _INTS16 = ir.VectorType(_I32, 16)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)
    index = types.intp

    def _pointer(context, builder, array_type, array, at, pointee):
        """&array.flat[at] as a pointer to `pointee` (C-contiguous arrays, unchecked)."""
        data = context.make_array(array_type)(context, builder, array).data
        return builder.bitcast(builder.gep(data, [at]), pointee.as_pointer())

    def _broadcast(builder, value, vector_type):
        lane0 = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
        return builder.shuffle_vector(lane0, ir.Constant(vector_type, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count))

    def _to_tile(context, builder, tile_type, tile, weights, chunk0, row):
        """32 weights (bytes) of one row into the tile: their 4-byte chunks to chunks
        chunk0 .. chunk0 + 7, each in the row's 4 bytes of the chunk's line."""
        dwords = builder.bitcast(weights, _DWORDS8)
        lane = builder.mul(row, int64(4))
        for c in range(8):
            at = builder.add(builder.mul(builder.add(chunk0, int64(c)), int64(4 * TILE_ROWS)), lane)
            builder.store(builder.extract_element(dwords, ir.Constant(_I32, c)),
                          _pointer(context, builder, tile_type, tile, at, _I32), align=4)
        return context.get_dummy_value()

    @intrinsic
    def _nibbles_to_tile(typingctx, q, start, tile, chunk0, row):
        """A Q4_0/Q4_1 block's 32 nibbles (the 16 bytes at q[start])."""
        def codegen(context, builder, signature, args):
            q, start, tile, chunk0, row = args
            w = block_nibbles(context, builder, signature.args[0], q, start)
            return _to_tile(context, builder, signature.args[2], tile, w, chunk0, row)
        return types.void(q, index, tile, index, index), codegen

    @intrinsic
    def _q5_to_tile(typingctx, q, start, qh, tile, chunk0, row):
        """A Q5_0/Q5_1 block's 5-bit weights: the nibbles, plus 16 where bit l of qh is set."""
        def codegen(context, builder, signature, args):
            q, start, qh, tile, chunk0, row = args
            w = builder.or_(block_nibbles(context, builder, signature.args[0], q, start), fifth_bits(builder, qh))
            return _to_tile(context, builder, signature.args[3], tile, w, chunk0, row)
        return types.void(q, index, types.int64, tile, index, index), codegen

    @intrinsic
    def _q8_to_tile(typingctx, q, start, tile, chunk0, row):
        """A Q8_0 block's signed bytes plus 128 (flipping the top bit)."""
        def codegen(context, builder, signature, args):
            q, start, tile, chunk0, row = args
            w = builder.xor(load_vector(context, builder, signature.args[0], q, start, BYTES32),
                            constant(BYTES32, -128))
            return _to_tile(context, builder, signature.args[2], tile, w, chunk0, row)
        return types.void(q, index, tile, index, index), codegen

    def _k_to_tile(low_bits: int, high_bits: int):
        """An intrinsic to_tile(q, lo, lo_shift, hi, hi_shift, tile, chunk0, row): the
        32 K-quant weights int8_matvec.k_weights cuts out of q."""
        @intrinsic
        def to_tile(typingctx, q, lo, lo_shift, hi, hi_shift, tile, chunk0, row):
            def codegen(context, builder, signature, args):
                q, lo, lo_shift, hi, hi_shift, tile, chunk0, row = args
                w = k_weights(context, builder, signature.args[0], q, lo, lo_shift, hi, hi_shift, low_bits, high_bits)
                return _to_tile(context, builder, signature.args[5], tile, w, chunk0, row)
            return types.void(q, index, index, index, index, tile, index, index), codegen
        return to_tile

    _q4_k_to_tile = _k_to_tile(4, 0)
    _q5_k_to_tile = _k_to_tile(4, 1)
    _q6_k_to_tile = _k_to_tile(4, 2)

    _FLOATS32 = ir.VectorType(ir.FloatType(), 32)

    @intrinsic
    def floats_to_tile(typingctx, w, at, tile, chunk0, row):
        """32 float weights (w.flat[at:at + 32]) rounded to int8 as x is (Q8_0's rule),
        plus 128, into the tile as _to_tile puts them; returns their scale."""
        def codegen(context, builder, signature, args):
            w, at, tile, chunk0, row = args
            values = builder.load(_pointer(context, builder, signature.args[0], w, at, _FLOATS32), align=4)
            d, _, rounded = rounded_block(builder, values)
            biased = builder.xor(builder.trunc(builder.fptosi(rounded, ir.VectorType(_I32, 32)), BYTES32),
                                 constant(BYTES32, -128))
            _to_tile(context, builder, signature.args[2], tile, biased, chunk0, row)
            return d
        return types.float32(w, index, tile, index, index), codegen

    @intrinsic
    def _round_block(typingctx, x, at, xq, rounded_at, left_at):
        """x.flat[at:at + 32] rounded as quantize_x rounds a block, into xq.flat[rounded_at:],
        and what rounding left (in steps of 1/254 of the scale, also int8) into
        xq.flat[left_at:]: (scale, sum of the first 16 rounded values, of the last 16,
        of the first 16 remainders, of the last 16), in vector instructions
        (quantize_x's loops took 3 ns a value, as long as the product)."""
        def codegen(context, builder, signature, args):
            x, at, xq, rounded_at, left_at = args
            ints = ir.VectorType(_I32, 32)
            values = builder.load(_pointer(context, builder, signature.args[0], x, at, _FLOATS32), align=4)
            d, scaled, rounded = rounded_block(builder, values)
            rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS32, [_FLOATS32]),
                                                  "llvm.rint.v32f32")
            left = builder.call(rint, [builder.fmul(builder.fsub(scaled, rounded),
                                                    constant(_FLOATS32, float(REMAINDER_STEPS)))])
            add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_INTS16]),
                                                 "llvm.vector.reduce.add.v16i32")
            sums = []
            for part, start in ((rounded, rounded_at), (left, left_at)):
                whole = builder.fptosi(part, ints)
                builder.store(builder.trunc(whole, BYTES32),
                              _pointer(context, builder, signature.args[2], xq, start, BYTES32), align=1)
                sums += [builder.call(add, [builder.shuffle_vector(whole, whole, ir.Constant(
                    ir.VectorType(_I32, 16), list(range(first, first + 16))))]) for first in (0, 16)]
            return context.make_tuple(builder, signature.return_type, [d] + sums)
        return types.Tuple((types.float32,) + (types.int32,) * 4)(x, index, xq, index, index), codegen

    def _tile_product(chunks: int):
        """An intrinsic product(tile, scales, offsets, xq, xd, xs, t0, out, column): rows
        t0 .. t0 + X_ROWS - 1 of x times the tile's weight rows, into out[t, column:
        column + TILE_ROWS]. Groups of `chunks` chunks share a scale: scales[TILE_ROWS g
        + i] and offsets[TILE_ROWS g + i] are weight row i's in group g, xs[t, g] x's
        scaled sum there, and xd[t, b] x's scale in its block b of 32. A row of xq is
        x rounded, then the remainders (quantize_rows)."""
        @intrinsic
        def product(typingctx, tile, scales, offsets, xq, xd, xs, t0, out, column):
            def codegen(context, builder, signature, args):
                tile, scales, offsets, xq, xd, xs, t0, out, column = args
                kinds = signature.args
                shape = cgutils.unpack_tuple(builder, context.make_array(kinds[3])(context, builder, xq).shape)
                ncols = builder.lshr(shape[1], int64(1))  # each row of xq: x rounded, then the remainders
                nblocks = cgutils.unpack_tuple(builder, context.make_array(kinds[4])(context, builder, xd).shape)[1]
                ngroups = cgutils.unpack_tuple(builder, context.make_array(kinds[5])(context, builder, xs).shape)[1]
                out_cols = cgutils.unpack_tuple(builder, context.make_array(kinds[7])(context, builder, out).shape)[1]
                vpdpbusd = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(_INTS16, [_INTS16] * 3), "llvm.x86.avx512.vpdpbusd.512")
                rows = [builder.add(t0, int64(r)) for r in range(X_ROWS)]
                x_rows = [builder.mul(t, shape[1]) for t in rows]
                block_rows = [builder.mul(t, nblocks) for t in rows]
                group_rows = [builder.mul(t, ngroups) for t in rows]
                pairs = [(r, v) for r in range(X_ROWS) for v in range(VECTORS)]
                sums = {p: cgutils.alloca_once_value(builder, constant(_FLOATS16, 0.0)) for p in pairs}
                with cgutils.for_range(builder, ngroups) as loop:
                    g = loop.index
                    line = builder.mul(g, int64(TILE_ROWS))
                    w_scales = [load_vector(context, builder, kinds[1], scales, builder.add(line, int64(16 * v)),
                                            _FLOATS16) for v in range(VECTORS)]
                    w_offsets = [load_vector(context, builder, kinds[2], offsets, builder.add(line, int64(16 * v)),
                                             _FLOATS16) for v in range(VECTORS)]
                    dots = {p: constant(_INTS16, 0) for p in pairs}
                    lows = {p: constant(_INTS16, 0) for p in pairs}
                    for c in range(chunks):
                        chunk = builder.add(builder.mul(g, int64(chunks)), int64(c))
                        at = builder.mul(chunk, int64(4 * TILE_ROWS))
                        w = [builder.load(_pointer(context, builder, kinds[0], tile, builder.add(at, int64(64 * v)),
                                                   _INTS16), align=4) for v in range(VECTORS)]
                        x_at = builder.mul(chunk, int64(4))
                        for r in range(X_ROWS):
                            x4 = _broadcast(builder, builder.load(_pointer(
                                context, builder, kinds[3], xq, builder.add(x_rows[r], x_at), _I32), align=1), _INTS16)
                            low4 = _broadcast(builder, builder.load(_pointer(
                                context, builder, kinds[3], xq, builder.add(builder.add(x_rows[r], ncols), x_at), _I32),
                                align=1), _INTS16)
                            for v in range(VECTORS):
                                dots[r, v] = builder.call(vpdpbusd, [dots[r, v], w[v], x4])
                                lows[r, v] = builder.call(vpdpbusd, [lows[r, v], w[v], low4])
                    block = g if chunks == 8 else builder.lshr(g, int64(1))
                    for r in range(X_ROWS):
                        dx = _broadcast(builder, builder.load(_pointer(
                            context, builder, kinds[4], xd, builder.add(block_rows[r], block), ir.FloatType())), _FLOATS16)
                        sx = _broadcast(builder, builder.load(_pointer(
                            context, builder, kinds[5], xs, builder.add(group_rows[r], g), ir.FloatType())), _FLOATS16)
                        for v in range(VECTORS):
                            dot = builder.fadd(builder.sitofp(dots[r, v], _FLOATS16),
                                               builder.fmul(builder.sitofp(lows[r, v], _FLOATS16),
                                                            constant(_FLOATS16, 1.0 / REMAINDER_STEPS), flags=FAST),
                                               flags=FAST)
                            scaled = builder.fmul(dot, builder.fmul(w_scales[v], dx, flags=FAST), flags=FAST)
                            offset = builder.fmul(w_offsets[v], sx, flags=FAST)
                            total = builder.fadd(builder.load(sums[r, v]), builder.fadd(scaled, offset, flags=FAST),
                                                 flags=FAST)
                            builder.store(total, sums[r, v])
                for r, v in pairs:
                    at = builder.add(builder.add(builder.mul(rows[r], out_cols), column), int64(16 * v))
                    builder.store(builder.load(sums[r, v]), _pointer(context, builder, kinds[7], out, at, _FLOATS16),
                                  align=4)
                return context.get_dummy_value()
            return types.void(tile, scales, offsets, xq, xd, xs, index, out, index), codegen
        return product

    _product_of_blocks = _tile_product(8)  # groups of 32 weights
    _product_of_halves = _tile_product(4)  # groups of 16 (Q6_K's sub-blocks)


def quantize_rows(x: np.ndarray):
    """x (T, ncols) rounded to int8 per block of 32 as quantize_x rounds one row, then
    the remainders, in rows padded with zeros to a multiple of X_ROWS: (xq (T', 2
    ncols): the rounded values, then the remainders; x's scales per block; the sums
    of x as rounded twice, per 16 and per 32), what every driver below takes."""
    padded = -(-x.shape[0] // X_ROWS) * X_ROWS
    return _quantize_rows(x, padded)


@jit(parallel=True)
def _quantize_rows(x, padded):
    rows, ncols = x.shape
    nb = ncols // 32
    xq = np.zeros((padded, 2 * ncols), np.int8)
    xd = np.zeros((padded, nb), np.float32)
    xs16 = np.zeros((padded, 2 * nb), np.float32)
    xs32 = np.zeros((padded, nb), np.float32)
    for t in prange(rows):
        for b in range(nb):
            d, low, high, low_left, high_left = _round_block(x, t * ncols + 32 * b, xq, 2 * t * ncols + 32 * b,
                                                             (2 * t + 1) * ncols + 32 * b)
            xd[t, b] = d
            xs16[t, 2 * b] = (np.float32(low) + np.float32(low_left) / np.float32(REMAINDER_STEPS)) * d
            xs16[t, 2 * b + 1] = (np.float32(high) + np.float32(high_left) / np.float32(REMAINDER_STEPS)) * d
            xs32[t, b] = xs16[t, 2 * b] + xs16[t, 2 * b + 1]
    return xq, xd, xs16, xs32


@jit()
def tile_buffers(ngroups, chunks):
    return (np.empty(ngroups * chunks * 4 * TILE_ROWS, np.uint8), np.empty(ngroups * TILE_ROWS, np.float32),
            np.empty(ngroups * TILE_ROWS, np.float32))


@jit()
def blocks_times_x(tile, scales, offsets, xq, xd, xs, out, column):
    for t0 in range(0, xq.shape[0], X_ROWS):
        _product_of_blocks(tile, scales, offsets, xq, xd, xs, t0, out, column)


@jit()
def _halves_times_x(tile, scales, offsets, xq, xd, xs, out, column):
    for t0 in range(0, xq.shape[0], X_ROWS):
        _product_of_halves(tile, scales, offsets, xq, xd, xs, t0, out, column)


# The drivers: out (T, rows rounded up to TILE_ROWS) = x W^T for x from
# quantize_rows (its T padded). A last tile past the matrix's rows repeats its
# last row into columns the caller drops.


@jit(parallel=True)
def gemm_q8_0(q, d, xq, xd, xs16, xs32, out):
    rows, nb = q.shape[0], d.shape[1] // 17
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(nb, 8)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                _q8_to_tile(q[r], 34 * b + 2, tile, 8 * b, i)
                s = f16_to_f32(d[r, 17 * b])
                scales[TILE_ROWS * b + i] = s
                offsets[TILE_ROWS * b + i] = np.float32(-128.0) * s
        blocks_times_x(tile, scales, offsets, xq, xd, xs32, out, tile_index * TILE_ROWS)


@jit(parallel=True)
def gemm_q4_0(q, d, xq, xd, xs16, xs32, out):
    rows, nb = q.shape[0], d.shape[1] // 9
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(nb, 8)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                _nibbles_to_tile(q[r], 18 * b + 2, tile, 8 * b, i)
                s = f16_to_f32(d[r, 9 * b])
                scales[TILE_ROWS * b + i] = s
                offsets[TILE_ROWS * b + i] = np.float32(-8.0) * s
        blocks_times_x(tile, scales, offsets, xq, xd, xs32, out, tile_index * TILE_ROWS)


@jit(parallel=True)
def gemm_q4_1(q, d, xq, xd, xs16, xs32, out):
    rows, nb = q.shape[0], d.shape[1] // 10
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(nb, 8)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                _nibbles_to_tile(q[r], 20 * b + 4, tile, 8 * b, i)
                scales[TILE_ROWS * b + i] = f16_to_f32(d[r, 10 * b])
                offsets[TILE_ROWS * b + i] = f16_to_f32(d[r, 10 * b + 1])
        blocks_times_x(tile, scales, offsets, xq, xd, xs32, out, tile_index * TILE_ROWS)


@jit(parallel=True)
def gemm_q5_0(q, h, xq, xd, xs16, xs32, out):
    rows, nb = q.shape[0], h.shape[1] // 11
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(nb, 8)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                _q5_to_tile(q[r], 22 * b + 6, q5_high_bits(h[r], 11 * b + 1), tile, 8 * b, i)
                s = f16_to_f32(h[r, 11 * b])
                scales[TILE_ROWS * b + i] = s
                offsets[TILE_ROWS * b + i] = np.float32(-16.0) * s
        blocks_times_x(tile, scales, offsets, xq, xd, xs32, out, tile_index * TILE_ROWS)


@jit(parallel=True)
def gemm_q5_1(q, h, xq, xd, xs16, xs32, out):
    rows, nb = q.shape[0], h.shape[1] // 12
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(nb, 8)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                _q5_to_tile(q[r], 24 * b + 8, q5_high_bits(h[r], 12 * b + 2), tile, 8 * b, i)
                scales[TILE_ROWS * b + i] = f16_to_f32(h[r, 12 * b])
                offsets[TILE_ROWS * b + i] = f16_to_f32(h[r, 12 * b + 1])
        blocks_times_x(tile, scales, offsets, xq, xd, xs32, out, tile_index * TILE_ROWS)


@jit(parallel=True)
def gemm_q4_k(q, h, xq, xd, xs16, xs32, out):
    rows, nb = q.shape[0], h.shape[1] // 72
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(8 * nb, 8)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                for j in range(8):
                    lo, lo_shift, hi, hi_shift, scale, low = q4_k_part(q[r], h[r], b, j)
                    g = 8 * b + j
                    _q4_k_to_tile(q[r], lo, lo_shift, hi, hi_shift, tile, 8 * g, i)
                    scales[TILE_ROWS * g + i] = scale
                    offsets[TILE_ROWS * g + i] = -low
        blocks_times_x(tile, scales, offsets, xq, xd, xs32, out, tile_index * TILE_ROWS)


@jit(parallel=True)
def gemm_q5_k(q, h, xq, xd, xs16, xs32, out):
    rows, nb = q.shape[0], h.shape[1] // 88
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(8 * nb, 8)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                for j in range(8):
                    lo, lo_shift, hi, hi_shift, scale, low = q5_k_part(q[r], h[r], b, j)
                    g = 8 * b + j
                    _q5_k_to_tile(q[r], lo, lo_shift, hi, hi_shift, tile, 8 * g, i)
                    scales[TILE_ROWS * g + i] = scale
                    offsets[TILE_ROWS * g + i] = -low
        blocks_times_x(tile, scales, offsets, xq, xd, xs32, out, tile_index * TILE_ROWS)


@jit(parallel=True)
def gemm_q6_k(q, h, xq, xd, xs16, xs32, out):
    # Groups of 16 (the sub-blocks); sub-blocks j and j + 1 lie side by side, one to_tile for both.
    rows, nb = q.shape[0], h.shape[1] // 105
    for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        tile, scales, offsets = tile_buffers(16 * nb, 4)
        for i in range(TILE_ROWS):
            r = min(tile_index * TILE_ROWS + i, rows - 1)
            for b in range(nb):
                for j in range(0, 16, 2):
                    lo, lo_shift, hi, hi_shift, scale, _ = q6_k_part(q[r], h[r], b, j)
                    g = 16 * b + j
                    _q6_k_to_tile(q[r], lo, lo_shift, hi, hi_shift, tile, 4 * g, i)
                    next_scale = q6_k_part(q[r], h[r], b, j + 1)[4]
                    scales[TILE_ROWS * g + i] = scale
                    offsets[TILE_ROWS * g + i] = np.float32(-32.0) * scale
                    scales[TILE_ROWS * (g + 1) + i] = next_scale
                    offsets[TILE_ROWS * (g + 1) + i] = np.float32(-32.0) * next_scale
        _halves_times_x(tile, scales, offsets, xq, xd, xs16, out, tile_index * TILE_ROWS)

"""Q4_0 and Q4_1 weights repacked 16 rows to a vector, for decoding small models.

GGML keeps each row's blocks together, and the int8 matvec (int8_matvec.py)
makes one row's dot product at a time: per 64 weights, every row of x pays an
integer dot, a conversion and a scaled add, on lanes that hold partial sums of
that one row. Repacked so that a 512-bit vector holds 4 bytes of each of 16
weight rows (a lane per row), one `vpdpbusd` against 4 bytes of x broadcast
to every lane advances all 16 rows, and a block's float work (convert, scale,
minimum) is one vector for 16 rows. Where the weights sit in the cache (a
small model in a large L3) decoding is bound by those instructions:
bench/interleaved_layout.py measured one row of x in 0.33-0.54x the GGML
layout's time (Emerald Rapids, 2 threads), and from memory ~10% more read
bandwidth.

The products then read a copy, not the memory map (llama.cpp repacks Q4_0
for its CPU kernels too): made only where the model's Q4_0/Q4_1 weights fit
the CPU's last-level cache (`worth_repacking`), where the gain is largest and
the copy small; larger models stay mapped (the gain from memory does not pay
for twice the memory). LLAMAZIP_INTERLEAVE=0 never repacks, =1 whatever the
size. The GGML bytes still serve the embedding lookup and prompt products
(int8_gemm.py).

Q4_0 is taken as Q4_1 with the minimum -8d (exact in float16: 8 is a power of
two). The sums run in a different order from the GGML-layout matvec's, so the
results differ from it by float rounding; a batched row (matmul) equals this
matvec bit for bit: the same steps per row of x, in the same order.

Needs 512-bit VNNI (`AVAILABLE`); elsewhere the GGML-layout kernels run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .ggml_types import GGMLType
from .jit import jit, numba_enabled, prange

GROUP = 16  # weight rows in a vector: a 32-bit lane each
BLOCK_BYTES = GROUP * 16  # a block's nibbles for a group: four vectors
SWITCH = "LLAMAZIP_INTERLEAVE"  # =0: never repack (the weights stay mapped); =1: whatever the model's size
_LAYOUT = {GGMLType.Q4_0: (18, 2), GGMLType.Q4_1: (20, 4)}  # block bytes, where the nibbles start
TYPES = frozenset(_LAYOUT)



def last_level_cache_bytes() -> int:
    """The size of CPU 0's largest cache (Linux sysfs), 0 when it cannot be read."""
    sizes = [0]
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size.read_text().strip()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes)


def worth_repacking(q4_bytes: int) -> bool:
    """Whether a model with q4_bytes of Q4_0/Q4_1 matrices decodes them from a repacked copy."""
    setting = os.environ.get(SWITCH)
    if setting in ("0", "1"):
        return setting == "1"
    return q4_bytes <= last_level_cache_bytes()


AVAILABLE = False
if numba_enabled():
    from .simd import VNNI_512
    AVAILABLE = VNNI_512

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .int8_batch import quantize_rows
    from .simd import ORDERED, constant, float_vector, int64, load_vector, prefetch, splat, store_vector

    _BYTES64 = ir.VectorType(ir.IntType(8), 64)
    _INTS16 = ir.VectorType(ir.IntType(32), 16)
    _SHORTS16 = ir.VectorType(ir.IntType(16), 16)
    _HALFS16 = ir.VectorType(ir.HalfType(), 16)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)
    f32x16, zeros16, _ = float_vector(16, ordered=True)

    def _block_step(x_rows: int):
        """An intrinsic: block b of a group (its nibbles at nibbles[at], scales and
        minimums at [scale_at]) against `x_rows` rows of x, each row's 16 running sums
        (a lane per weight row) in a tuple. Every row takes the same steps in the same
        order, whatever x_rows: a row's sums are the same bits alone or in a tile."""
        @intrinsic
        def step(typingctx, sums, nibbles, at, scales, minimums, scale_at, xq, x_rows_at, block, xd, x_sums):
            def codegen(context, builder, signature, args):
                sums, nibbles, at, scales, minimums, scale_at, xq, x_rows_at, block, xd, x_sums = args
                arg = signature.args
                vpdpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_INTS16, [_INTS16] * 3),
                                                          "llvm.x86.avx512.vpdpbusd.512")
                low_nibble = constant(_BYTES64, 0x0F)
                lows, highs = [], []  # weights 4t..4t+3 and 16+4t..16+4t+3 of each row, as bytes
                for t in range(4):
                    packed = load_vector(context, builder, arg[1], nibbles, builder.add(at, int64(64 * t)), _BYTES64)
                    lows.append(builder.bitcast(builder.and_(packed, low_nibble), _INTS16))
                    highs.append(builder.bitcast(builder.and_(builder.lshr(packed, constant(_BYTES64, 4)),
                                                              low_nibble), _INTS16))

                def halves(array_type, array):
                    bits = load_vector(context, builder, array_type, array, scale_at, _SHORTS16)
                    return builder.fpext(builder.bitcast(bits, _HALFS16), _FLOATS16)
                weight_scales, weight_minimums = halves(arg[3], scales), halves(arg[4], minimums)
                x_bytes = context.make_array(arg[6])(context, builder, xq).data
                x_words = builder.bitcast(x_bytes, ir.IntType(32).as_pointer())
                xd_data = context.make_array(arg[9])(context, builder, xd).data
                x_sum_data = context.make_array(arg[10])(context, builder, x_sums).data
                out = []
                for k in range(x_rows):
                    acc, row_at = builder.extract_value(sums, k), builder.extract_value(x_rows_at, k)
                    # row_at: where the row starts in xq (bytes) and in xd and x_sums (blocks)
                    first_word = builder.add(builder.udiv(row_at, int64(4)), builder.mul(block, int64(8)))
                    dot = constant(_INTS16, 0)
                    for t in range(4):
                        for weights, word in ((lows[t], t), (highs[t], 4 + t)):
                            x4 = builder.load(builder.gep(x_words, [builder.add(first_word, int64(word))]), align=4)
                            dot = builder.call(vpdpbusd, [dot, weights, splat(builder, x4, _INTS16)])
                    at_x = builder.add(builder.udiv(row_at, int64(32)), block)
                    x_scale = splat(builder, builder.load(builder.gep(xd_data, [at_x])), _FLOATS16)
                    x_sum = splat(builder, builder.load(builder.gep(x_sum_data, [at_x])), _FLOATS16)
                    scaled = builder.fmul(builder.sitofp(dot, _FLOATS16),
                                          builder.fmul(weight_scales, x_scale, flags=ORDERED), flags=ORDERED)
                    acc = builder.fadd(acc, scaled, flags=ORDERED)
                    acc = builder.fadd(acc, builder.fmul(weight_minimums, x_sum, flags=ORDERED), flags=ORDERED)
                    out.append(acc)
                return context.make_tuple(builder, signature.return_type, out)
            index = types.intp
            return types.UniTuple(f32x16, x_rows)(sums, nibbles, index, scales, minimums, index, xq, x_rows_at,
                                                  index, xd, x_sums), codegen
        return step

    _step1, _step4 = _block_step(1), _block_step(4)

    @intrinsic
    def _store16(typingctx, out, at, sums):
        def codegen(context, builder, signature, args):
            return store_vector(context, builder, signature.args[0], args[0], args[1], args[2])
        return types.void(out, types.intp, sums), codegen


@jit(parallel=True)
def _repack_nibbles(q, start, block_bytes, out):
    """Rows (rows, bytes) of 4-bit blocks into groups: per group and block, four vectors
    of 64 bytes, vector t holding bytes 4t..4t+3 of each of the group's rows."""
    rows = q.shape[0]
    blocks = q.shape[1] // block_bytes
    for g in prange(rows // GROUP):
        for b in range(blocks):
            base = (g * blocks + b) * BLOCK_BYTES
            for r in range(GROUP):
                source = q[g * GROUP + r]
                at = block_bytes * b + start
                for t in range(4):
                    for k in range(4):
                        out[base + 64 * t + 4 * r + k] = source[at + 4 * t + k]


def _per_group(halves: np.ndarray) -> np.ndarray:
    """float16 bits (rows, blocks) as (group, block, row in group), flattened."""
    rows, blocks = halves.shape
    return np.ascontiguousarray(halves.reshape(rows // GROUP, GROUP, blocks).transpose(0, 2, 1)).reshape(-1)


def repack(raw: np.ndarray, ggml_type: GGMLType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0/Q4_1 rows (rows, bytes; rows a multiple of GROUP) as (nibbles, scales, minimums):
    the arguments of matvec and matmul."""
    block_bytes, start = _LAYOUT[ggml_type]
    rows = raw.shape[0]
    if rows % GROUP:
        raise ValueError(f"interleaving takes rows in groups of {GROUP}, got {rows}")
    halves = raw.view("<u2")
    scales = halves[:, 0::block_bytes // 2]
    if ggml_type == GGMLType.Q4_1:
        minimums = halves[:, 1::block_bytes // 2]
    else:  # w = d (q - 8) = d q + (-8 d)
        minimums = (np.float32(-8) * scales.view(np.float16).astype(np.float32)).astype(np.float16).view(np.uint16)
    nibbles = np.empty(rows * (raw.shape[1] // block_bytes) * 16, np.uint8)
    _repack_nibbles(raw, start, block_bytes, nibbles)
    return nibbles, _per_group(scales), _per_group(minimums)


@jit()
def _x_rows(x):
    """x's rows rounded as the int8 matvecs round them: the bytes (n, cols), the block
    scales and each block's sum times its scale (n, blocks), flattened."""
    xq, xd, xs16 = quantize_rows(x)
    n, blocks = xd.shape
    sums = np.empty(n * blocks, np.float32)
    for i in range(n):
        for b in range(blocks):
            sums[i * blocks + b] = xs16[i, 2 * b] + xs16[i, 2 * b + 1]
    return xq.reshape(-1), xd.reshape(-1), sums


@jit(parallel=True, ordered=True)
def matvec(nibbles, scales, minimums, x, out):
    """out = W x for one row x (cols,), W repacked; x rounded to int8 per block as the matvecs do."""
    xq, xd, sums = _x_rows(x.reshape(1, -1))
    blocks = x.size // 32
    for g in prange(out.size // GROUP):
        acc = (zeros16(),)
        for b in range(blocks):
            at = g * blocks + b
            prefetch(nibbles, BLOCK_BYTES * at + 2048)
            acc = _step1(acc, nibbles, BLOCK_BYTES * at, scales, minimums, GROUP * at, xq, (0,), b, xd, sums)
        _store16(out, GROUP * g, acc[0])


@jit(parallel=True, ordered=True)
def matmul(nibbles, scales, minimums, x, out):
    """out = x W^T for a few rows of x (n, cols), each row's result matvec's bit for bit:
    four rows of x at a time against each group of weight rows."""
    n, cols = x.shape
    rows = out.shape[1]
    xq, xd, sums = _x_rows(x)
    blocks = cols // 32
    flat = out.reshape(-1)
    for g in prange(rows // GROUP):
        for t in range(0, n, 4):
            # rows past the last are the last again (computed twice, stored once)
            tile = (t * cols, min(t + 1, n - 1) * cols, min(t + 2, n - 1) * cols, min(t + 3, n - 1) * cols)
            acc = (zeros16(), zeros16(), zeros16(), zeros16())
            for b in range(blocks):
                at = g * blocks + b
                prefetch(nibbles, BLOCK_BYTES * at + 2048)
                acc = _step4(acc, nibbles, BLOCK_BYTES * at, scales, minimums, GROUP * at, xq, tile, b, xd, sums)
            _store16(flat, t * rows + GROUP * g, acc[0])
            if t + 1 < n:
                _store16(flat, (t + 1) * rows + GROUP * g, acc[1])
            if t + 2 < n:
                _store16(flat, (t + 2) * rows + GROUP * g, acc[2])
            if t + 3 < n:
                _store16(flat, (t + 3) * rows + GROUP * g, acc[3])

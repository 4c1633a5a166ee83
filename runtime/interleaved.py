"""Q4_0, Q4_1 and Q8_0 weights repacked 16 rows to a vector, for decoding small models.

GGML keeps each row's blocks together, and the int8 matvec (int8_matvec.py)
makes one row's dot product at a time: per 64 weights, every row of x pays an
integer dot, a conversion and a scaled add, on lanes that hold partial sums of
that one row. Repacked so that a 512-bit vector holds 4 bytes of each of 16
weight rows (a lane per row), one `vpdpbusd` against 4 bytes of x broadcast
to every lane advances all 16 rows, and a block's float work (convert, scale,
minimum) is one vector for 16 rows. Where the weights sit in the cache (a
small model in a large L3) decoding is bound by those instructions:
bench/interleaved_layout.py measured one row of x in 0.33-0.54x the GGML
layout's time for Q4_1 (Emerald Rapids, 2 threads); from memory both layouts
read alike (within 10%, either way, run to run).

The products then read a copy, not the memory map (llama.cpp repacks Q4_0
for its CPU kernels too): made only where the model's weights fit the CPU's
last-level cache (`worth_repacking`), where the gain is largest and the copy
small; larger models stay mapped (from memory there is nothing to gain for
twice the memory). LLAMAZIP_INTERLEAVE=0 never repacks, =1 whatever the
size. The GGML bytes still serve the embedding lookup and prompt products
(int8_gemm.py).

Per block of 32 weights and group of 16 rows:
- Q4_0/Q4_1: four vectors of nibbles (vector t: bytes 4t..4t+3 of each row's
  16, low nibbles weights 4t.., high ones 16 + 4t..); the scales and the
  minimums as float16. Q4_0 is taken as Q4_1 with the minimum -8d (exact in
  float16: 8 is a power of two).
- Q8_0: eight vectors of bytes (vector t: weights 4t..4t+3 of each row), each
  plus 128 (`vpdpbusd` takes one unsigned operand): the sums start from -128
  times x's block sum, which leaves the signed products' sums exactly.
The sums run in a different order from the GGML-layout matvec's, so the
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
SWITCH = "LLAMAZIP_INTERLEAVE"  # =0: never repack (the weights stay mapped); =1: whatever the model's size
# Per type: block bytes, where its weights start, bytes of weights (nibbles or bytes) per row.
_LAYOUT = {GGMLType.Q4_0: (18, 2, 16), GGMLType.Q4_1: (20, 4, 16), GGMLType.Q8_0: (34, 2, 32)}
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


def worth_repacking(weight_bytes: int) -> bool:
    """Whether a model of weight_bytes decodes its Q4_0/Q4_1/Q8_0 matrices from repacked copies."""
    setting = os.environ.get(SWITCH)
    if setting in ("0", "1"):
        return setting == "1"
    return weight_bytes <= last_level_cache_bytes()


AVAILABLE = False
if numba_enabled():
    from .simd import VNNI_512
    AVAILABLE = VNNI_512

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .int8_batch import quantize_rows, sums32_rows
    from .simd import ORDERED, constant, float_vector, int64, load_vector, prefetch, splat, store_vector

    _BYTES64 = ir.VectorType(ir.IntType(8), 64)
    _INTS16 = ir.VectorType(ir.IntType(32), 16)
    _SHORTS16 = ir.VectorType(ir.IntType(16), 16)
    _HALFS16 = ir.VectorType(ir.HalfType(), 16)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)
    f32x16, zeros16, _ = float_vector(16, ordered=True)

    def _block_step(x_rows: int, nibbles: bool):
        """An intrinsic: block b of a group (its weights at w[at], scales and minimums at
        [scale_at]) against `x_rows` rows of x, each row's 16 running sums (a lane per
        weight row) in a tuple. Every row takes the same steps in the same order,
        whatever x_rows: a row's sums are the same bits alone or in a tile.
        nibbles: Q4_0/Q4_1 (x_sums: x's block sums times their scale, for the
        minimums); else Q8_0 (x_sums: x's integer block sums, for the 128 added)."""
        @intrinsic
        def step(typingctx, sums, w, at, scales, minimums, scale_at, xq, x_rows_at, block, xd, x_sums):
            def codegen(context, builder, signature, args):
                sums, w, at, scales, minimums, scale_at, xq, x_rows_at, block, xd, x_sums = args
                arg = signature.args
                vpdpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_INTS16, [_INTS16] * 3),
                                                          "llvm.x86.avx512.vpdpbusd.512")
                # weights[k] against x's word k of the block (bytes 4k..4k+3)
                if nibbles:
                    low_nibble = constant(_BYTES64, 0x0F)
                    weights = [None] * 8
                    for t in range(4):
                        packed = load_vector(context, builder, arg[1], w, builder.add(at, int64(64 * t)), _BYTES64)
                        weights[t] = builder.bitcast(builder.and_(packed, low_nibble), _INTS16)
                        weights[4 + t] = builder.bitcast(builder.and_(builder.lshr(packed, constant(_BYTES64, 4)),
                                                                      low_nibble), _INTS16)
                else:
                    weights = [builder.bitcast(load_vector(context, builder, arg[1], w,
                                                           builder.add(at, int64(64 * t)), _BYTES64), _INTS16)
                               for t in range(8)]

                def halves(array_type, array):
                    bits = load_vector(context, builder, array_type, array, scale_at, _SHORTS16)
                    return builder.fpext(builder.bitcast(bits, _HALFS16), _FLOATS16)
                weight_scales = halves(arg[3], scales)
                weight_minimums = halves(arg[4], minimums) if nibbles else None
                x_words = builder.bitcast(context.make_array(arg[6])(context, builder, xq).data,
                                          ir.IntType(32).as_pointer())
                xd_data = context.make_array(arg[9])(context, builder, xd).data
                x_sum_data = context.make_array(arg[10])(context, builder, x_sums).data
                out = []
                for k in range(x_rows):
                    acc, row_at = builder.extract_value(sums, k), builder.extract_value(x_rows_at, k)
                    # row_at: where the row starts in xq (bytes); its blocks start at row_at / 32
                    first_word = builder.add(builder.udiv(row_at, int64(4)), builder.mul(block, int64(8)))
                    at_x = builder.add(builder.udiv(row_at, int64(32)), block)
                    x_sum = builder.load(builder.gep(x_sum_data, [at_x]))
                    # Two chains of sums (words 0-3, 4-7), added at the end: each vpdpbusd waits
                    # for the one before it in its chain. Integers: the same sums in any order.
                    if nibbles:
                        chains = [constant(_INTS16, 0), constant(_INTS16, 0)]
                    else:  # minus what the 128 added to every weight brings
                        chains = [splat(builder, builder.mul(x_sum, ir.Constant(x_sum.type, -128)), _INTS16),
                                  constant(_INTS16, 0)]
                    for word, vector in enumerate(weights):
                        x4 = builder.load(builder.gep(x_words, [builder.add(first_word, int64(word))]), align=4)
                        chains[word // 4] = builder.call(vpdpbusd, [chains[word // 4], vector,
                                                                   splat(builder, x4, _INTS16)])
                    dot = builder.add(chains[0], chains[1])
                    x_scale = splat(builder, builder.load(builder.gep(xd_data, [at_x])), _FLOATS16)
                    scaled = builder.fmul(builder.sitofp(dot, _FLOATS16),
                                          builder.fmul(weight_scales, x_scale, flags=ORDERED), flags=ORDERED)
                    acc = builder.fadd(acc, scaled, flags=ORDERED)
                    if nibbles:
                        minimums_scaled = builder.fmul(weight_minimums, splat(builder, x_sum, _FLOATS16), flags=ORDERED)
                        acc = builder.fadd(acc, minimums_scaled, flags=ORDERED)
                    out.append(acc)
                return context.make_tuple(builder, signature.return_type, out)
            index = types.intp
            return types.UniTuple(f32x16, x_rows)(sums, w, index, scales, minimums, index, xq, x_rows_at,
                                                  index, xd, x_sums), codegen
        return step

    _q4_step1, _q4_step4 = _block_step(1, True), _block_step(4, True)
    _q8_step1, _q8_step4 = _block_step(1, False), _block_step(4, False)

    @intrinsic
    def _word(typingctx, q, at):
        """The 4 bytes at q[at] as a uint32 (little-endian; any alignment)."""
        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(32).as_pointer())
            return builder.load(pointer, align=1)
        return types.uint32(q, types.intp), codegen

    @intrinsic
    def _store16(typingctx, out, at, sums):
        def codegen(context, builder, signature, args):
            return store_vector(context, builder, signature.args[0], args[0], args[1], args[2])
        return types.void(out, types.intp, sums), codegen


@jit(parallel=True)
def _repack(q, halves, start, block_bytes, weight_bytes, flip, minimum_at, weights, scales, minimums):
    """Rows (rows, bytes) of blocks into groups: per group and block, weight_bytes / 4
    vectors of 64 bytes, vector t holding bytes 4t..4t+3 of each of the group's rows'
    weights (at `start` in each block), XOR flip (in every byte), into `weights` as
    uint32 (a word at a time: a byte at a time took twice as long); the rows' float16
    scales (the block's first field) and, with minimum_at > 0, the field there (Q4_1's
    minimums), 16 to a group and block."""
    rows = q.shape[0]
    blocks = q.shape[1] // block_bytes
    vectors = weight_bytes // 4
    for g in prange(rows // GROUP):
        for b in range(blocks):
            at_group = g * blocks + b
            for r in range(GROUP):
                row = g * GROUP + r
                at = block_bytes * b + start
                for t in range(vectors):
                    weights[at_group * GROUP * vectors + GROUP * t + r] = _word(q[row], at + 4 * t) ^ flip
                scales[at_group * GROUP + r] = halves[row, b * block_bytes // 2]
                if minimum_at:
                    minimums[at_group * GROUP + r] = halves[row, (b * block_bytes + minimum_at) // 2]


def repack(raw: np.ndarray, ggml_type: GGMLType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a type in TYPES (rows, bytes; rows a multiple of GROUP) as (weights,
    scales, minimums): the arguments of matvec and matmul (Q8_0's minimums: none)."""
    block_bytes, start, weight_bytes = _LAYOUT[ggml_type]
    rows, blocks = raw.shape[0], raw.shape[1] // block_bytes
    if rows % GROUP:
        raise ValueError(f"interleaving takes rows in groups of {GROUP}, got {rows}")
    weights = np.empty(rows * blocks * weight_bytes // 4, np.uint32)
    scales = np.empty(rows * blocks, np.uint16)
    minimums = np.empty(rows * blocks if ggml_type != GGMLType.Q8_0 else 0, np.uint16)
    flip = np.uint32(0x80808080 if ggml_type == GGMLType.Q8_0 else 0)
    _repack(raw, raw.view("<u2"), start, block_bytes, weight_bytes, flip, 2 if ggml_type == GGMLType.Q4_1 else 0,
            weights, scales, minimums)
    if ggml_type == GGMLType.Q4_0:  # w = d (q - 8) = d q + (-8 d)
        minimums[:] = (np.float32(-8) * scales.view(np.float16).astype(np.float32)).astype(np.float16).view(np.uint16)
    return weights.view(np.uint8), scales, minimums


@jit()
def _x_rows(x, integer_sums):
    """x's rows rounded as the int8 matvecs round them: the bytes (n, cols), the block
    scales, and each block's sum: of the rounded bytes (integer_sums, as int32) or of
    the rounded values (times the scale) as float32 (n, blocks), flattened."""
    xq, xd, xs16 = quantize_rows(x)
    n, blocks = xd.shape
    int_sums = np.zeros(n * blocks if integer_sums else 0, np.int32)
    if integer_sums:
        for i in range(n):
            for b in range(blocks):
                total = 0
                for j in range(32):
                    total += xq[i, 32 * b + j]
                int_sums[i * blocks + b] = total
    float_sums = sums32_rows(xs16).reshape(-1)
    return xq.reshape(-1), xd.reshape(-1), float_sums, int_sums


@jit(parallel=True, ordered=True)
def matvec(weights, scales, minimums, x, out):
    """out = W x for one row x (cols,), W repacked; x rounded to int8 per block as the matvecs do."""
    nibbles = minimums.size > 0
    xq, xd, float_sums, int_sums = _x_rows(x.reshape(1, -1), not nibbles)
    blocks = x.size // 32
    block_bytes = GROUP * (16 if nibbles else 32)
    for g in prange(out.size // GROUP):
        acc = (zeros16(),)
        for b in range(blocks):
            at = g * blocks + b
            prefetch(weights, block_bytes * at + 2048)
            if nibbles:
                acc = _q4_step1(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, (0,), b, xd,
                                float_sums)
            else:
                acc = _q8_step1(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, (0,), b, xd,
                                int_sums)
        _store16(out, GROUP * g, acc[0])


@jit(parallel=True, ordered=True)
def matmul(weights, scales, minimums, x, out):
    """out = x W^T for a few rows of x (n, cols), each row's result matvec's bit for bit:
    four rows of x at a time against each group of weight rows."""
    n, cols = x.shape
    rows = out.shape[1]
    nibbles = minimums.size > 0
    xq, xd, float_sums, int_sums = _x_rows(x, not nibbles)
    blocks = cols // 32
    block_bytes = GROUP * (16 if nibbles else 32)
    flat = out.reshape(-1)
    for g in prange(rows // GROUP):
        for t in range(0, n, 4):
            # rows past the last are the last again (computed twice, stored once)
            tile = (t * cols, min(t + 1, n - 1) * cols, min(t + 2, n - 1) * cols, min(t + 3, n - 1) * cols)
            acc = (zeros16(), zeros16(), zeros16(), zeros16())
            for b in range(blocks):
                at = g * blocks + b
                prefetch(weights, block_bytes * at + 2048)
                if nibbles:
                    acc = _q4_step4(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, tile, b, xd,
                                    float_sums)
                else:
                    acc = _q8_step4(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, tile, b, xd,
                                    int_sums)
            _store16(flat, t * rows + GROUP * g, acc[0])
            if t + 1 < n:
                _store16(flat, (t + 1) * rows + GROUP * g, acc[1])
            if t + 2 < n:
                _store16(flat, (t + 2) * rows + GROUP * g, acc[2])
            if t + 3 < n:
                _store16(flat, (t + 3) * rows + GROUP * g, acc[3])

"""A proposed weight layout, measured before it is built (the runtime does not use it).

Q4_1 weights interleaved 16 rows to a vector: a 512-bit vector holds 4 bytes of
each of 16 weight rows (a lane per row), so one vpdpbusd makes 16 rows' dot
products with 4 bytes of x broadcast to every lane, and the float work of a
block (convert, scale, minimum) is one vector for 16 rows, not one per row.
Today's kernels (int8_matvec.matvec_q4_1, int8_batch.matmul_q4_1) read GGML's
row layout. For each shape, one row of x and four, today's kernels beside the
interleaved one: in the cache (one matrix again and again, as a small model
sits in a large L3) and from memory (matrices cycled past the L3's size).

    .venv/bin/python bench/interleaved_layout.py

Needs 512-bit VNNI. Both layouts' results match the dequantized float product
to x's int8 rounding (printed: the largest error over the largest value), not
each other bit for bit: their sums are ordered differently.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from llamazip.runtime import int8_batch, int8_matvec, jit  # noqa: E402
from llamazip.runtime.ggml_types import GGMLType  # noqa: E402
from llamazip.runtime.simd import (VNNI_512, constant, float_vector, int64, load_vector, prefetch,  # noqa: E402
                                   splat, store_vector)
from llamazip.runtime.weight_types import dequantize  # noqa: E402

GROUP = 16  # weight rows interleaved: one 32-bit lane each in a 512-bit vector
BLOCK_BYTES = GROUP * 16  # a block's nibbles for the group: four vectors
BYTES64 = ir.VectorType(ir.IntType(8), 64)
INTS16 = ir.VectorType(ir.IntType(32), 16)
SHORTS16 = ir.VectorType(ir.IntType(16), 16)
HALFS16 = ir.VectorType(ir.HalfType(), 16)
FLOATS16 = ir.VectorType(ir.FloatType(), 16)
ORDERED = tuple(sorted(jit.ORDERED_FASTMATH))
f32x16, zeros16, _ = float_vector(16, ordered=True)


def interleaved(raw: np.ndarray, rows: int, cols: int):
    """Q4_1 rows (rows, bytes) as groups of 16: nibbles (group, block, dword t, row, 4 bytes),
    scales and minimums (group, block, row) as float16 bits, each flattened."""
    blocks = cols // 32
    fields = raw.reshape(rows, blocks, 20)
    scales = fields[:, :, 0:2].copy().view(np.uint16)[..., 0]
    minimums = fields[:, :, 2:4].copy().view(np.uint16)[..., 0]
    nibbles = fields[:, :, 4:20].reshape(rows // GROUP, GROUP, blocks, 4, 4).transpose(0, 2, 3, 1, 4)

    def per_group(a):
        return np.ascontiguousarray(a.reshape(rows // GROUP, GROUP, blocks).transpose(0, 2, 1)).reshape(-1)
    return np.ascontiguousarray(nibbles).reshape(-1), per_group(scales), per_group(minimums)


def _block_step(x_rows: int):
    """An intrinsic: one block of one group against `x_rows` rows of x, each row's 16
    running sums (one lane per weight row) in a tuple."""
    @intrinsic
    def step(typingctx, sums, nibbles, at, scales, minimums, scale_at, x_words, x_stride, block, rows, x_scales,
             x_sums, blocks):
        def codegen(context, builder, signature, args):
            sums, nibbles, at, scales, minimums, scale_at, x_words, x_stride, block, rows, x_scales, x_sums, \
                blocks = args
            arg = signature.args
            vpdpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(INTS16, [INTS16] * 3),
                                                      "llvm.x86.avx512.vpdpbusd.512")
            low_nibble = constant(BYTES64, 0x0F)
            lows, highs = [], []  # weights 4t..4t+3 and 16+4t..16+4t+3 of each row, as bytes
            for t in range(4):
                packed = load_vector(context, builder, arg[1], nibbles, builder.add(at, int64(64 * t)), BYTES64)
                lows.append(builder.bitcast(builder.and_(packed, low_nibble), INTS16))
                high = builder.and_(builder.lshr(packed, constant(BYTES64, 4)), low_nibble)
                highs.append(builder.bitcast(high, INTS16))

            def halves(array_type, array):
                bits = load_vector(context, builder, array_type, array, scale_at, SHORTS16)
                return builder.fpext(builder.bitcast(bits, HALFS16), FLOATS16)
            weight_scales, weight_minimums = halves(arg[3], scales), halves(arg[4], minimums)
            words = context.make_array(arg[6])(context, builder, x_words).data
            x_scale_data = context.make_array(arg[10])(context, builder, x_scales).data
            x_sum_data = context.make_array(arg[11])(context, builder, x_sums).data
            out = []
            for k in range(x_rows):
                acc, row = builder.extract_value(sums, k), builder.extract_value(rows, k)
                first = builder.add(builder.mul(row, x_stride), builder.mul(block, int64(8)))
                dot = constant(INTS16, 0)
                for t in range(4):
                    for weights, word in ((lows[t], t), (highs[t], 4 + t)):
                        x4 = builder.load(builder.gep(words, [builder.add(first, int64(word))]))
                        dot = builder.call(vpdpbusd, [dot, weights, splat(builder, x4, INTS16)])
                at_x = builder.add(builder.mul(row, blocks), block)
                x_scale = splat(builder, builder.load(builder.gep(x_scale_data, [at_x])), FLOATS16)
                x_sum = splat(builder, builder.load(builder.gep(x_sum_data, [at_x])), FLOATS16)
                scaled = builder.fmul(builder.sitofp(dot, FLOATS16),
                                      builder.fmul(weight_scales, x_scale, flags=ORDERED), flags=ORDERED)
                acc = builder.fadd(acc, scaled, flags=ORDERED)
                acc = builder.fadd(acc, builder.fmul(weight_minimums, x_sum, flags=ORDERED), flags=ORDERED)
                out.append(acc)
            return context.make_tuple(builder, signature.return_type, out)
        return types.UniTuple(f32x16, x_rows)(sums, nibbles, types.intp, scales, minimums, types.intp, x_words,
                                              types.intp, types.intp, rows, x_scales, x_sums, types.intp), codegen
    return step


_step4, _step1 = _block_step(4), _block_step(1)


@intrinsic
def _store16(typingctx, out, at, sums):
    def codegen(context, builder, signature, args):
        return store_vector(context, builder, signature.args[0], args[0], args[1], args[2])
    return types.void(out, types.intp, sums), codegen


_FASTMATH = set(jit.ORDERED_FASTMATH)


@numba.njit(parallel=True, fastmath=_FASTMATH, nogil=True)
def matvec_interleaved(nibbles, scales, minimums, x_words, x_scales, x_sums, out, groups, blocks):
    for g in prange(groups):
        sums = (zeros16(),)
        for b in range(blocks):
            at = g * blocks + b
            prefetch(nibbles, BLOCK_BYTES * at + 2048)
            sums = _step1(sums, nibbles, BLOCK_BYTES * at, scales, minimums, GROUP * at, x_words, 0, b, (0,),
                          x_scales, x_sums, blocks)
        _store16(out, GROUP * g, sums[0])


@numba.njit(parallel=True, fastmath=_FASTMATH, nogil=True)
def matmul_interleaved(nibbles, scales, minimums, x_words, x_scales, x_sums, out, groups, blocks, x_stride):
    n, rows = out.shape
    flat = out.reshape(-1)
    for g in prange(groups):
        for t0 in range(0, n, 4):
            tile = (t0, min(t0 + 1, n - 1), min(t0 + 2, n - 1), min(t0 + 3, n - 1))
            sums = (zeros16(), zeros16(), zeros16(), zeros16())
            for b in range(blocks):
                at = g * blocks + b
                prefetch(nibbles, BLOCK_BYTES * at + 2048)
                sums = _step4(sums, nibbles, BLOCK_BYTES * at, scales, minimums, GROUP * at, x_words, x_stride, b,
                              tile, x_scales, x_sums, blocks)
            for k in range(4):
                if t0 + k < n:
                    _store16(flat, (t0 + k) * rows + GROUP * g, sums[k])


class Case:
    """One Q4_1 matrix in both layouts, and x's rows rounded once for both."""

    def __init__(self, rows: int, cols: int, rng: np.random.Generator):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        quantized = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1).reshape(rows, -1)
        self.raw = np.ascontiguousarray(quantized.view(np.uint8))
        self.rows, self.cols = rows, cols
        self.packed = interleaved(self.raw, rows, cols)

    def today(self, x: np.ndarray, out: np.ndarray) -> None:
        if len(x) == 1:
            int8_matvec.matvec_q4_1(self.raw, self.raw.view("<u2"), x[0], out[0])
        else:
            int8_batch.matmul_q4_1(self.raw, self.raw.view("<u2"), x, out)

    def proposed(self, rounded: tuple, out: np.ndarray) -> None:
        x_words, x_scales, x_sums = rounded
        groups, blocks = self.rows // GROUP, self.cols // 32
        if len(out) == 1:
            matvec_interleaved(*self.packed, x_words, x_scales, x_sums, out.reshape(-1), groups, blocks)
        else:
            matmul_interleaved(*self.packed, x_words, x_scales, x_sums, out, groups, blocks, self.cols // 4)


def rounded(x: np.ndarray) -> tuple:
    """x's rows rounded to int8 per block as the matvecs round them: the bytes as int32
    words, the block scales, and each block's scale times its sum (Q4_1's minimums)."""
    xq, xd, sums16 = int8_batch.quantize_rows(x)
    block_sums = (sums16[:, 0::2] + sums16[:, 1::2]).astype(np.float32)
    return (np.ascontiguousarray(xq).view(np.int32).reshape(-1), np.ascontiguousarray(xd).reshape(-1),
            np.ascontiguousarray(block_sums).reshape(-1))


def in_cache(rows: int, cols: int, reps: int) -> None:
    rng = np.random.default_rng(0)
    case = Case(rows, cols, rng)
    reference = dequantize(case.raw, GGMLType.Q4_1, cols)
    times = {}
    for n in (1, 4):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        r = rounded(x)
        out_today, out_proposed = np.empty((n, rows), np.float32), np.zeros((n, rows), np.float32)
        case.today(x, out_today)
        case.proposed(r, out_proposed)
        exact = x @ reference.T
        error = [np.abs(out - exact).max() / np.abs(exact).max() for out in (out_today, out_proposed)]
        spent = {"today": [], "interleaved": []}
        for _ in range(reps):
            for name, run in (("today", lambda: case.today(x, out_today)),
                              ("interleaved", lambda: case.proposed(r, out_proposed))):
                started = time.perf_counter()
                run()
                spent[name].append(time.perf_counter() - started)
        times[n] = {name: float(np.median(v)) for name, v in spent.items()} | {"error": error}
    one, four = times[1], times[4]
    print(f"{rows}x{cols} in cache: 1 row {1e6 * one['today']:.1f} us today, {1e6 * one['interleaved']:.1f} "
          f"interleaved; 4 rows {1e6 * four['today']:.1f} / {1e6 * four['interleaved']:.1f} us "
          f"(4 rows / 1: {four['today'] / one['today']:.2f} today, {four['interleaved'] / one['interleaved']:.2f} "
          f"interleaved; interleaved 4 rows / today's 1: {four['interleaved'] / one['today']:.2f}; "
          f"error {max(one['error'][0], four['error'][0]):.1e} today, "
          f"{max(one['error'][1], four['error'][1]):.1e} interleaved)")


def from_memory(rows: int, cols: int, count: int, reps: int) -> None:
    rng = np.random.default_rng(1)
    cases = [Case(rows, cols, rng) for _ in range(count)]
    total = sum(c.raw.nbytes for c in cases)
    speeds = {}
    for n in (1, 4):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        r = rounded(x)
        out = np.empty((n, rows), np.float32)
        for case in cases[:1]:  # compiled before the clock starts
            case.today(x, out)
            case.proposed(r, out)
        for name, run in (("today", lambda c: c.today(x, out)), ("interleaved", lambda c: c.proposed(r, out))):
            started = time.perf_counter()
            for _ in range(reps):
                for case in cases:
                    run(case)
            speeds[n, name] = total * reps / (time.perf_counter() - started) / 1e9
    print(f"{count} x {rows}x{cols} from memory ({total / 1e6:.0f} MB): 1 row {speeds[1, 'today']:.1f} GB/s today, "
          f"{speeds[1, 'interleaved']:.1f} interleaved; 4 rows {speeds[4, 'today']:.1f} / "
          f"{speeds[4, 'interleaved']:.1f} GB/s")


def main() -> int:
    if not VNNI_512:
        print("error: this CPU has no 512-bit VNNI, which the interleaved kernel uses", file=sys.stderr)
        return 1
    jit.set_threads(2)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    for rows, cols in ((1536, 576), (576, 1536), (4864, 896), (4096, 4096), (14336, 4096)):
        in_cache(rows, cols, 200 if rows * cols < 4e6 else 30)
    from_memory(14336, 4096, 14, 3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

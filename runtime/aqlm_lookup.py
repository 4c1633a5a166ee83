"""AQLM 2x8 matrix x vector through byte-table lookups in vector registers (AVX-512 VBMI).

The scalar kernel (aqlm.py) looks up float tables one entry at a time: ~1.6 G
lookups/s per thread, so a 2-bit model ran slower than a 4-bit one. Here each
group's two 256-entry tables are rounded to bytes, and a 256-byte table fits
in four 512-bit registers: `vpermi2b` looks 64 codes up in two of them at once
(bit 6 of a code picks the register of the pair, bits 0-5 the byte), and the
code's top bit chooses between the two pairs (a masked merge). So one step
handles 64 rows of one group: 4 permutes for its two codebooks, then the sum.
Codes lie group-major, (groups, 2, rows), so 64 rows' codes of one group are
64 contiguous bytes.

Rounding: a block of `GROUPS_PER_SCALE` groups shares one scale (its tables'
largest |entry| / 127), stored biased by 128 as unsigned bytes (1-255). Two
lookups per group summed over a block stay below 2^16 (2 * 255 * 16), so sums
run in 16-bit lanes and turn into floats once per block. A 16-bit lane pair
holds two rows' bytes: the low byte (even row) and the high one (odd row) are
cut out with a mask and a shift and summed apart. Relative error against the
float tables on random data: ~1e-2 (llama.cpp rounds activations per 32 to
int8 for its 4-bit matvecs: ~5e-3), well inside AQLM's own weight error.

Compiled only where the CPU has AVX-512 VBMI (`AVAILABLE`): LLVM aborts the
process when asked for an instruction the target lacks.
"""

from __future__ import annotations

import numpy as np

from .jit import jit, numba_enabled, prange


@jit()
def lookup_table(cb_t, x, table):
    """table[g, c, k] = x[8 g: 8 g + 8] . codebooks[c, k], from cb_t = codebooks
    transposed to (2, 8, 256): the innermost loop runs over the 256 entries, the
    8 products written out (a loop over them kept each partial sum in memory: 2x slower)."""
    for g in range(table.shape[0]):
        x0, x1, x2, x3 = x[8 * g], x[8 * g + 1], x[8 * g + 2], x[8 * g + 3]
        x4, x5, x6, x7 = x[8 * g + 4], x[8 * g + 5], x[8 * g + 6], x[8 * g + 7]
        for c in range(2):
            t = table[g, c]
            cb = cb_t[c]
            for k in range(256):
                t[k] = (x0 * cb[0, k] + x1 * cb[1, k] + x2 * cb[2, k] + x3 * cb[3, k]
                        + x4 * cb[4, k] + x5 * cb[5, k] + x6 * cb[6, k] + x7 * cb[7, k])


@jit()
def _largest_magnitude(floats):
    """max |floats| through the bits with the sign cleared, which order as
    integers: numba's float max() did not vectorise (8x slower)."""
    bits = floats.view(np.uint32)
    largest = np.uint32(0)
    for k in range(bits.size):
        largest = max(largest, bits[k] & np.uint32(0x7FFFFFFF))
    box = np.empty(1, np.uint32)
    box[0] = largest
    return box.view(np.float32)[0]


GROUPS_PER_SCALE = 16
ROWS_PER_STEP = 64

AVAILABLE = False  # whether this CPU has VBMI (below)
if numba_enabled():
    from .simd import HAS_VBMI as AVAILABLE

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .simd import FAST, constant, float_vector, int_vector, load_vector, splat

    _BYTES64 = ir.VectorType(ir.IntType(8), 64)
    _TABLE = ir.VectorType(ir.IntType(8), 256)
    _SHORTS32 = ir.VectorType(ir.IntType(16), 32)
    _SHORTS64 = ir.VectorType(ir.IntType(16), 64)
    _FLOATS64 = ir.VectorType(ir.FloatType(), 64)
    _u16x64, _short_zeros = int_vector(16, 64)
    _f32x64, _float_zeros, _ = float_vector(64)
    index = types.intp

    def _lookup(builder, table, codes):
        """table[codes[l]] for the 64 lanes l: two vpermi2b, one per half of the
        table, merged on each code's top bit."""
        permute = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_BYTES64, [_BYTES64] * 3), "llvm.x86.avx512.vpermi2var.qi.512")

        def quarter(k):
            return builder.shuffle_vector(table, table, ir.Constant(ir.VectorType(ir.IntType(32), 64),
                                                                    list(range(64 * k, 64 * k + 64))))
        low = builder.call(permute, [quarter(0), codes, quarter(1)])
        high = builder.call(permute, [quarter(2), codes, quarter(3)])
        return builder.select(builder.icmp_signed("<", codes, constant(_BYTES64, 0)), high, low)

    @intrinsic
    def _add_group(typingctx, sums, table8, t_start, codes, c_start, rows):
        """sums + the 64 rows' two lookups of one group: table8[t_start:+256] is
        codebook 0's table, the next 256 bytes codebook 1's; codes[c_start:+64]
        and codes[c_start + rows:+64] their codes. Lanes 0-31 of sums hold the
        even rows of the 64, lanes 32-63 the odd ones."""
        def codegen(context, builder, signature, args):
            sums, table8, t_start, codes, c_start, rows = args
            t_type, c_type = signature.args[1], signature.args[3]
            total = sums
            for book in range(2):
                table = load_vector(context, builder, t_type, table8,
                                    builder.add(t_start, ir.Constant(ir.IntType(64), 256 * book)), _TABLE)
                start = builder.add(c_start, builder.mul(rows, ir.Constant(ir.IntType(64), book)))
                words = builder.bitcast(_lookup(builder, table, load_vector(context, builder, c_type, codes, start,
                                                                            _BYTES64)), _SHORTS32)
                even = builder.and_(words, constant(_SHORTS32, 0xFF))
                odd = builder.lshr(words, constant(_SHORTS32, 8))
                both = builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(ir.IntType(32), 64),
                                                                     list(range(64))))
                total = builder.add(total, both)
            return total
        return _u16x64(sums, table8, index, codes, index, index), codegen

    @intrinsic
    def _scaled_add(typingctx, acc, start, sums, scale, bias):
        """acc[start:+64] += scale * (float(sums) - bias): a block's 16-bit sums into the floats."""
        def codegen(context, builder, signature, args):
            acc, start, sums, scale, bias = args
            data = context.make_array(signature.args[0])(context, builder, acc).data
            pointer = builder.bitcast(builder.gep(data, [start]), _FLOATS64.as_pointer())
            values = builder.fsub(builder.uitofp(sums, _FLOATS64), splat(builder, bias, _FLOATS64), flags=FAST)
            total = builder.fadd(builder.load(pointer, align=4),
                                 builder.fmul(values, splat(builder, scale, _FLOATS64), flags=FAST), flags=FAST)
            builder.store(total, pointer, align=4)
            return context.get_dummy_value()
        return types.void(acc, index, sums, types.float32, types.float32), codegen

    @intrinsic
    def _store_rows(typingctx, out, acc, start, scales):
        """out[start + r] = row r of acc[start:+64] * scales[start + r], r = 0-63:
        the even and odd rows interleaved back into order."""
        def codegen(context, builder, signature, args):
            out, acc, start, scales = args
            rows = load_vector(context, builder, signature.args[1], acc, start, _FLOATS64)
            order = [i // 2 + 32 * (i % 2) for i in range(64)]
            rows = builder.shuffle_vector(rows, rows, ir.Constant(ir.VectorType(ir.IntType(32), 64), order))
            row_scales = load_vector(context, builder, signature.args[3], scales, start, _FLOATS64)
            data = context.make_array(signature.args[0])(context, builder, out).data
            pointer = builder.bitcast(builder.gep(data, [start]), _FLOATS64.as_pointer())
            builder.store(builder.fmul(rows, row_scales, flags=FAST), pointer, align=4)
            return context.get_dummy_value()
        return types.void(out, acc, index, scales), codegen

    @jit()
    def _byte_tables(cb_t, x, b0, b1, table8, table_scales):
        """Blocks b0..b1 of the rounded tables: table8[g, c, k] = 128 +
        round(x[8 g: 8 g + 8] . codebooks[c, k] / scale of g's block)."""
        n_groups = table8.shape[0]
        floats = np.empty((GROUPS_PER_SCALE, 2, 256), np.float32)
        for b in range(b0, b1):
            g0 = b * GROUPS_PER_SCALE
            n = min(GROUPS_PER_SCALE, n_groups - g0)
            lookup_table(cb_t, x[8 * g0:8 * (g0 + n)], floats[:n])
            flat = floats[:n].reshape(-1)
            scale = _largest_magnitude(flat) / np.float32(127.0)
            inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
            table_scales[b] = scale
            t8 = table8[g0:g0 + n].reshape(-1)
            for k in range(flat.size):
                # truncating t / scale + 128.5 (in 1.5-255.5) rounds half up
                t8[k] = np.uint8(np.int32(flat[k] * inverse + np.float32(128.5)))

    @jit()
    def _row_steps(codes, table8, table_scales, s0, s1, acc):
        """The block sums of rows 64 s0 .. 64 s1 into acc (floats, each 64 rows'
        even rows then odd ones). Block by block, so that each group's codes
        stream in row order and the block's tables (8 KiB) stay in L1: a step of
        64 rows through all groups at once jumped 2 * rows bytes per group."""
        n_groups, _, rows = codes.shape
        for b in range(table_scales.size):
            g0 = b * GROUPS_PER_SCALE
            g1 = min(g0 + GROUPS_PER_SCALE, n_groups)
            scale = table_scales[b]
            bias = np.float32(256.0 * (g1 - g0))
            for step in range(s0, s1):
                r = step * ROWS_PER_STEP
                sums = _short_zeros()
                for g in range(g0, g1):
                    sums = _add_group(sums, table8, g * 512, codes, 2 * g * rows + r, rows)
                _scaled_add(acc, r, sums, scale, bias)

    @jit()
    def _rows_scalar(codes, table8, table_scales, scales, r0, r1, out):
        """out for rows r0..r1 one at a time (rows past the last full step of 64),
        with the same rounded tables."""
        n_groups = codes.shape[0]
        for r in range(r0, r1):
            acc = np.float32(0.0)
            for b in range(table_scales.size):
                g0 = b * GROUPS_PER_SCALE
                g1 = min(g0 + GROUPS_PER_SCALE, n_groups)
                s = np.int32(0)
                for g in range(g0, g1):
                    s += np.int32(table8[g, 0, codes[g, 0, r]]) + np.int32(table8[g, 1, codes[g, 1, r]])
                acc += table_scales[b] * np.float32(s - 256 * (g1 - g0))
            out[r] = acc * scales[r]

    def _matvec(codes, cb_t, scales, x, n_tasks, out):
        n_groups, _, rows = codes.shape
        n_blocks = (n_groups + GROUPS_PER_SCALE - 1) // GROUPS_PER_SCALE
        table8 = np.empty((n_groups, 2, 256), np.uint8)
        table_scales = np.empty(n_blocks, np.float32)
        for task in prange(n_tasks):
            _byte_tables(cb_t, x, task * n_blocks // n_tasks, (task + 1) * n_blocks // n_tasks, table8,
                         table_scales)
        steps = rows // ROWS_PER_STEP
        acc = np.zeros(rows, np.float32)
        for task in prange(n_tasks):
            s0 = task * steps // n_tasks
            s1 = (task + 1) * steps // n_tasks
            _row_steps(codes, table8, table_scales, s0, s1, acc)
            for step in range(s0, s1):
                _store_rows(out, acc, step * ROWS_PER_STEP, scales)
        _rows_scalar(codes, table8, table_scales, scales, steps * ROWS_PER_STEP, rows, out)

    matvec_parallel = jit(parallel=True)(_matvec)
    matvec_serial = jit()(_matvec)

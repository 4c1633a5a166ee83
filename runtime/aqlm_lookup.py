"""AQLM 2x8 matrix x vector through byte-table lookups in vector registers (AVX-512 VBMI).

The scalar kernel (aqlm.py) looks up float tables one entry at a time: ~1.6 G
lookups/s per thread, so a 2-bit model ran slower than a 4-bit one. Here each
group's two 256-entry tables are rounded to bytes, and a 256-byte table fits
in four 512-bit registers: `vpermi2b` looks 64 codes up in two of them at once
(bit 6 of a code picks the register of the pair, bits 0-5 the byte), and the
code's top bit chooses between the two pairs (a masked merge). So one step
handles 64 rows of one group: 4 permutes for its two codebooks, then the sum.
Codes lie group-major, (groups, 2, rows), so 64 rows' codes of one group are
64 contiguous bytes. One group at a time sweeps all the rows, its two tables
in registers, its 16-bit sums kept in memory (the L1 cache) between groups;
several x rows (several sequences decoded together) take turns on each 256
rows' codes, read from memory once.

Per token, the tables (each 8-wide slice of x dotted with the 512 codebook
vectors) are built in 512-bit vectors, one block of groups at a time just
before its lookups, by the thread that looks them up: threads split the
groups, not the rows, so no thread waits for another's tables.

Rounding: a block of `GROUPS_PER_SCALE` groups has one step, its tables'
largest |entry| / 127, and each group rounds to that step / 2^e, with e the
largest in 0..MAX_SHIFT that keeps its entries within 127 steps: stored biased
by 128 as unsigned bytes (1-255). A group's two lookups are summed in 16-bit
lanes and shifted left by MAX_SHIFT - e, so a block's sums stay below 2^16
(16 * 2 * 255 * 2^3) and turn into floats once per block. On real
activations a few outlier dimensions set a block's step for every group
beside them: with one step per 16 groups and no shift, SmolLM2 AQLM's decode
products erred by 2.1-3.8e-2 (relative), and perplexity with every scored
logit decoded moved by up to 6.2% against the float tables
(`bench/aqlm_quality.py --decode-tables`); with the shifts, 1.0-1.4e-2 (a
step per group: 0.8-1.2e-2, at 1.2-1.6x the time with 2 threads). A 16-bit
lane pair holds two rows' bytes: the low byte (even row) and the high one
(odd row) are cut out with a mask and a shift and summed apart. (llama.cpp
rounds activations per 32 to int8 for its 4-bit matvecs: ~5e-3 on random
data.)

Compiled only where the CPU has AVX-512 VBMI (`AVAILABLE`): LLVM aborts the
process when asked for an instruction the target lacks.
"""

from __future__ import annotations

import numpy as np

from .jit import jit, numba_enabled, prange, serial_and_parallel


@jit(ordered=True)
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


GROUPS_PER_SCALE = 16  # see the module docstring
MAX_SHIFT = 3  # a group's step may be 2^-3 of its block's: 16 groups' sums, 2 * 255 * 2^3 each, fit 16 bits
GROUP_SLICES = 2  # parts of the input groups summed apart (see _products)
CODES_AHEAD = 1024  # bytes of a group's codes asked for ahead of the lookups, in the sweep's stream

AVAILABLE = False  # whether this CPU has VBMI (below)
if numba_enabled():
    from .simd import HAS_VBMI as AVAILABLE

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .simd import ORDERED, constant, float_vector, int64, load_vector, prefetch, splat, store_vector

    _BYTES64 = ir.VectorType(ir.IntType(8), 64)
    _TABLE = ir.VectorType(ir.IntType(8), 256)
    _SHORTS32 = ir.VectorType(ir.IntType(16), 32)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)
    _FLOATS64 = ir.VectorType(ir.FloatType(), 64)
    _f32x16, _float_zeros16, _ = float_vector(16)
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

    def _split_rows(builder, looked_up):
        """64 looked-up bytes as 16-bit lanes: lanes 0-31 the even rows, 32-63 the odd ones."""
        words = builder.bitcast(looked_up, _SHORTS32)
        even = builder.and_(words, constant(_SHORTS32, 0xFF))
        odd = builder.lshr(words, constant(_SHORTS32, 8))
        return builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(ir.IntType(32), 64), list(range(64))))

    def _add_group_lookups(subs: int):
        """An intrinsic: one group's two lookups for `subs` runs of 64 rows, added
        to their 16-bit sums held in memory.

        add(sums16, s_start, table8, t_start, codes, c_start, rows, shift):
        table8[t_start:+256] is codebook 0's table, the next 256 bytes codebook
        1's; run s's codes are codes[c_start + 64 s:+64] and, for codebook 1,
        `rows` bytes further; the group's two lookups are summed, shifted left by
        `shift` (its tables' finer step, see _block_table) and added to
        sums16[s_start + 64 s:+64]: run s's even rows, then its odd ones. The
        two tables are loaded into registers once for all the runs."""
        lanes = 64 * subs
        sums_type = ir.VectorType(ir.IntType(16), lanes)

        @intrinsic
        def add(typingctx, sums16, s_start, table8, t_start, codes, c_start, rows, shift):
            def codegen(context, builder, signature, args):
                sums16, s_start, table8, t_start, codes, c_start, rows, shift = args
                s_type, t_type, c_type = signature.args[0], signature.args[2], signature.args[4]
                tables = [load_vector(context, builder, t_type, table8, builder.add(t_start, int64(256 * book)), _TABLE)
                          for book in range(2)]
                runs = []
                for sub in range(subs):
                    run = None
                    for book in range(2):
                        start = builder.add(c_start, builder.add(builder.mul(rows, int64(book)), int64(64 * sub)))
                        looked_up = _split_rows(builder, _lookup(builder, tables[book],
                                                                 load_vector(context, builder, c_type, codes, start,
                                                                             _BYTES64)))
                        run = looked_up if run is None else builder.add(run, looked_up)
                    runs.append(run)
                while len(runs) > 1:  # concatenate the runs' lanes
                    runs = [builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 2 * a.type.count),
                                                                     list(range(2 * a.type.count))))
                            for a, b in zip(runs[::2], runs[1::2])]
                shifted = builder.shl(runs[0], splat(builder, shift, sums_type))
                total = builder.add(load_vector(context, builder, s_type, sums16, s_start, sums_type), shifted)
                return store_vector(context, builder, s_type, sums16, s_start, total)
            return types.void(sums16, index, table8, index, codes, index, index, index), codegen
        return add

    def _scaled_add(lanes: int):
        """An intrinsic: acc[start:+lanes] += scale * (float(sums16[s_start:+lanes]) - bias),
        a block's 16-bit sums into floats."""
        floats = ir.VectorType(ir.FloatType(), lanes)
        shorts = ir.VectorType(ir.IntType(16), lanes)

        @intrinsic
        def scaled_add(typingctx, acc, start, sums16, s_start, scale, bias):
            def codegen(context, builder, signature, args):
                acc, start, sums16, s_start, scale, bias = args
                sums = load_vector(context, builder, signature.args[2], sums16, s_start, shorts)
                data = context.make_array(signature.args[0])(context, builder, acc).data
                pointer = builder.bitcast(builder.gep(data, [start]), floats.as_pointer())
                values = builder.fsub(builder.uitofp(sums, floats), splat(builder, bias, floats), flags=ORDERED)
                total = builder.fadd(builder.load(pointer, align=4),
                                     builder.fmul(values, splat(builder, scale, floats), flags=ORDERED), flags=ORDERED)
                builder.store(total, pointer, align=4)
                return context.get_dummy_value()
            return types.void(acc, index, sums16, index, types.float32, types.float32), codegen
        return scaled_add

    _add_lookups64, _add_lookups256 = _add_group_lookups(1), _add_group_lookups(4)
    _scaled_add64, _scaled_add256 = _scaled_add(64), _scaled_add(256)

    @intrinsic
    def _in_row_order(typingctx, acc, start):
        """acc[start:+64], held as 64 rows' even rows then odd ones, put back in row order."""
        def codegen(context, builder, signature, args):
            acc, start = args
            rows = load_vector(context, builder, signature.args[0], acc, start, _FLOATS64)
            order = [i // 2 + 32 * (i % 2) for i in range(64)]
            rows = builder.shuffle_vector(rows, rows, ir.Constant(ir.VectorType(ir.IntType(32), 64), order))
            data = context.make_array(signature.args[0])(context, builder, acc).data
            builder.store(rows, builder.bitcast(builder.gep(data, [start]), _FLOATS64.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(acc, index), codegen

    @intrinsic
    def _group_table(typingctx, cb_t, x, x_start, floats, f_start, largest):
        """floats[f_start:+512] = one group's float tables, x[x_start:+8] dotted with
        the 512 codebook vectors (cb_t: codebooks transposed to (2, 8, 256)), in
        512-bit vectors (numba's own loop got 256-bit ones on this CPU family);
        returns the running lane-wise max of |entry| with `largest`."""
        def codegen(context, builder, signature, args):
            cb_t, x, x_start, floats, f_start, largest = args
            cb_type, x_type, f_type = signature.args[0], signature.args[1], signature.args[3]
            x_data = context.make_array(x_type)(context, builder, x).data
            xs = [splat(builder, builder.load(builder.gep(x_data, [builder.add(x_start, int64(j))])), _FLOATS16)
                  for j in range(8)]
            fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS16, [_FLOATS16]),
                                                  "llvm.fabs.v16f32")
            maxnum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS16, [_FLOATS16] * 2),
                                                    "llvm.maxnum.v16f32")
            data = context.make_array(f_type)(context, builder, floats).data
            for book in range(2):
                for k in range(0, 256, 16):
                    entry = None
                    for j in range(8):
                        column = load_vector(context, builder, cb_type, cb_t, int64(book * 2048 + j * 256 + k),
                                             _FLOATS16)
                        product = builder.fmul(xs[j], column, flags=ORDERED)
                        entry = product if entry is None else builder.fadd(entry, product, flags=ORDERED)
                    pointer = builder.gep(data, [builder.add(f_start, int64(book * 256 + k))])
                    builder.store(entry, builder.bitcast(pointer, _FLOATS16.as_pointer()), align=4)
                    largest = builder.call(maxnum, [largest, builder.call(fabs, [entry])])
            return largest
        return _f32x16(cb_t, x, index, floats, index, largest), codegen

    @intrinsic
    def _largest_lane(typingctx, largest):
        def codegen(context, builder, signature, args):
            reduce_max = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [_FLOATS16]),
                                                        "llvm.vector.reduce.fmax.v16f32")
            return builder.call(reduce_max, [args[0]])
        return types.float32(largest), codegen

    @intrinsic
    def _round_to_bytes(typingctx, floats, start, inverse, table8):
        """table8[start:+64] = 128 + floats[start:+64] * inverse rounded half up,
        as bytes (1-255): truncating t + 128.5, which lies in 1.5-255.5."""
        def codegen(context, builder, signature, args):
            floats, start, inverse, table8 = args
            values = load_vector(context, builder, signature.args[0], floats, start, _FLOATS64)
            shifted = builder.fadd(builder.fmul(values, splat(builder, inverse, _FLOATS64), flags=ORDERED),
                                   constant(_FLOATS64, 128.5), flags=ORDERED)
            bytes_ = builder.trunc(builder.fptosi(shifted, ir.VectorType(ir.IntType(32), 64)), _BYTES64)
            data = context.make_array(signature.args[3])(context, builder, table8).data
            builder.store(bytes_, builder.bitcast(builder.gep(data, [start]), _BYTES64.as_pointer()), align=1)
            return context.get_dummy_value()
        return types.void(floats, index, types.float32, table8), codegen

    @jit(ordered=True)
    def _block_table(cb_t, x, g0, n, floats, table8, shifts, group_largest):
        """Groups g0..g0+n's tables rounded to biased bytes in table8 (flat, n x 512):
        group i's entries are 128 + round(x[8 g: 8 g + 8] . codebooks[c, k] * 2^e_i / step)
        with e_i the largest in 0..MAX_SHIFT that keeps them within 127 (a group
        whose entries are small gets a finer step), shifts[i] = MAX_SHIFT - e_i;
        returns step / 2^MAX_SHIFT, with step the block's largest |entry| / 127.
        group_largest: room for n floats."""
        largest = np.float32(0.0)
        for i in range(n):
            group_largest[i] = _largest_lane(_group_table(cb_t, x, 8 * (g0 + i), floats, 512 * i, _float_zeros16()))
            largest = max(largest, group_largest[i])
        step = largest / np.float32(127.0)
        for i in range(n):
            group, e = group_largest[i], 0
            while e < MAX_SHIFT and group * np.float32(2 ** (e + 1)) <= largest:
                e += 1
            shifts[i] = MAX_SHIFT - e
            inverse = np.float32(2 ** e) / step if step > 0 else np.float32(0.0)
            for k in range(512 * i, 512 * i + 512, 64):
                _round_to_bytes(floats, k, inverse, table8)
        return step / np.float32(2 ** MAX_SHIFT)

    @jit(ordered=True)
    def _block_sums(codes, g0, n, tables, scales, shifts, acc, sums16, r0, r1):
        """acc[i] += one block's lookups (groups g0..g0+n) for rows r0..r1, through
        the tables of x row i (tables[i]: the block's groups' tables, 512 bytes
        each; scales[i] their step, shifts[i] each group's shift): in acc, each
        64 rows' even rows then odd ones; rows past the last 64 in order.

        One group at a time over all the rows, its tables in registers: its codes
        are two runs of r1 - r0 bytes side by side, and the block's groups follow
        each other, so the codes are read in one sweep, not as 32 streams (one
        per group and codebook, rows * 2 bytes apart) side by side. On a Zen 5
        machine, in spells when those streams read 5-6 GB/s on one core whatever
        was prefetched (4096x4096 random codes; the 8B-shaped model then decoded
        2.7 tok/s, 5 at other times), the sweep read 11.6-12.9 GB/s in the same
        process; at other times both take the same time (0.47-0.48 ms on the
        8B's 4096x4096, one thread). The 16-bit sums wait in sums16 (room for
        (x rows, r1 - r0)): 2 bytes a row, in the L1 cache. The x rows take
        turns on each 256 rows' codes, read from memory once."""
        rows = codes.shape[2]
        n_x = tables.shape[0]
        body = r0 + (r1 - r0) // 64 * 64
        sums16[:, :body - r0] = 0
        for g in range(g0, g0 + n):
            t = (g - g0) * 512
            r = r0
            while r + 256 <= body:
                c = 2 * g * rows + r + CODES_AHEAD
                for line in range(0, 256, 64):
                    prefetch(codes, c + line)
                    prefetch(codes, c + rows + line)
                for i in range(n_x):
                    _add_lookups256(sums16[i], r - r0, tables[i], t, codes, 2 * g * rows + r, rows, shifts[i, g - g0])
                r += 256
            while r < body:
                for i in range(n_x):
                    _add_lookups64(sums16[i], r - r0, tables[i], t, codes, 2 * g * rows + r, rows, shifts[i, g - g0])
                r += 64
        for i in range(n_x):
            bias = 0  # what the bytes' bias of 128 adds to a row's sum, shifted
            for j in range(n):
                bias += 256 << shifts[i, j]
            r = r0
            while r + 256 <= body:
                _scaled_add256(acc[i], r, sums16[i], r - r0, scales[i], np.float32(bias))
                r += 256
            while r < body:
                _scaled_add64(acc[i], r, sums16[i], r - r0, scales[i], np.float32(bias))
                r += 64
            for row in range(body, r1):
                s = 0
                for g in range(g0, g0 + n):
                    t = (g - g0) * 512
                    pair = np.int64(tables[i, t + codes[g, 0, row]]) + np.int64(tables[i, t + 256 + codes[g, 1, row]])
                    s += pair << shifts[i, g - g0]
                acc[i, row] += scales[i] * (np.float32(s) - np.float32(bias))

    def _products(codes, cb_t, scales, xs, row_slices, out):
        """out[i] = W xs[i] for each row of xs (one for a decoded token; several
        for several sequences' tokens, which then share each read of the codes).

        Tasks split the groups in GROUP_SLICES (and the output rows in
        `row_slices`): each builds the tables of its own blocks and sums their
        lookups into its own vectors, with no wait between the two (splitting
        only the rows would make every task wait for all the tables); the
        slices' vectors are added at the end, in order. Each task reads a
        contiguous part of the codes. The arithmetic depends only on the group
        slices, so a row's result is the same for any thread count, serial or
        parallel, alone or in a batch."""
        n_groups, _, rows = codes.shape
        n_x = xs.shape[0]
        n_blocks = (n_groups + GROUPS_PER_SCALE - 1) // GROUPS_PER_SCALE
        runs = (rows + 63) // 64
        partial = np.zeros((GROUP_SLICES, n_x, rows), np.float32)
        for task in prange(GROUP_SLICES * row_slices):
            k, j = task % GROUP_SLICES, task // GROUP_SLICES
            r0 = 64 * (j * runs // row_slices)
            r1 = min(rows, 64 * ((j + 1) * runs // row_slices))
            floats = np.empty(GROUPS_PER_SCALE * 512, np.float32)
            tables = np.empty((n_x, GROUPS_PER_SCALE * 512), np.uint8)
            table_scales = np.empty(n_x, np.float32)
            shifts = np.empty((n_x, GROUPS_PER_SCALE), np.int64)
            group_largest = np.empty(GROUPS_PER_SCALE, np.float32)
            sums16 = np.empty((n_x, r1 - r0), np.uint16)
            for b in range(k * n_blocks // GROUP_SLICES, (k + 1) * n_blocks // GROUP_SLICES):
                g0 = b * GROUPS_PER_SCALE
                n = min(GROUPS_PER_SCALE, n_groups - g0)
                for i in range(n_x):
                    table_scales[i] = _block_table(cb_t, xs[i], g0, n, floats, tables[i], shifts[i], group_largest)
                _block_sums(codes, g0, n, tables, table_scales, shifts, partial[k], sums16, r0, r1)
        _slices_summed(partial, scales, out)

    @jit(ordered=True)
    def _slices_summed(partial, scales, out):
        """out[i] = the group slices' sums of x row i, added in order, in row order, scaled.
        A function of its own: written inline after the parallel loop, these few
        microseconds of work took ~0.7 ms (a 14336-row matrix) and the kernel
        no longer gained from a second thread."""
        rows = partial.shape[2]
        for i in range(partial.shape[1]):
            acc = partial[0, i]
            for k in range(1, GROUP_SLICES):
                part = partial[k, i]
                for r in range(rows):
                    acc[r] += part[r]
            for r in range(0, rows - rows % 64, 64):
                _in_row_order(acc, r)
            for r in range(rows):
                out[i, r] = acc[r] * scales[r]

    products_serial, products_parallel = serial_and_parallel(_products, ordered=True)

"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K weights repacked 16 rows to a vector, for decoding.

GGML keeps each row's blocks together, and the int8 matvec (int8_matvec.py)
makes one row's dot product at a time: per 64 weights, every row of x pays an
integer dot, a conversion and a scaled add, on lanes that hold partial sums of
that one row. Repacked so that a 512-bit vector holds 4 bytes of each of 16
weight rows (a lane per row), one `vpdpbusd` against 4 bytes of x broadcast
to every lane advances all 16 rows, and a block's float work (convert, scale,
minimum) is one vector for 16 rows. Where the weights sit in the cache (a
small model in a large L3) decoding is bound by those instructions:
bench/interleaved_layout.py measured one row of x in 0.33-0.54x the GGML
layout's time for Q4_1 (Emerald Rapids, 2 threads). From memory too, with
every cache line of a block prefetched 4 KiB ahead (one line per block left
the copy no faster than GGML's layout): one row 0.79-0.88x, four rows
0.60-0.69x (Q4_0, Q5_0, Q8_0, 1.3-2.5 GB of matrices; bench/interleaved_layout.py).

The products then read a copy, not the memory map (llama.cpp repacks Q4_0
for its CPU kernels too): made where the model's weights fit the CPU's
last-level cache, where the gain is largest and the copy small, for a
server's batched steps where memory allows, and for the plain block types
wherever the copy is small beside the memory available (`repacked_types`);
other models stay mapped. LLAMAZIP_INTERLEAVE=0 never repacks, =1 whatever the
size. The GGML bytes still serve the embedding lookup and prompt products
(int8_gemm.py).

Per block of 32 weights and group of 16 rows:
- Q4_0/Q4_1: four vectors of nibbles (vector t: bytes 4t..4t+3 of each row's
  16, low nibbles weights 4t.., high ones 16 + 4t..); the scales and the
  minimums as float16. Q4_0 is taken as Q4_1 with the minimum -8d (exact in
  float16: 8 is a power of two).
- Q5_0/Q5_1: as Q4_1 (Q5_0's minimum -16d), and a fifth vector of each
  row's 32 fifth bits, transposed so that one shift and mask put a word's
  four at bit 4 of its bytes: lane bit 8j + k holds weight 4k + j's.
- Q8_0: eight vectors of bytes (vector t: weights 4t..4t+3 of each row), each
  plus 128 (`vpdpbusd` takes one unsigned operand): the sums start from -128
  times x's block sum, which leaves the signed products' sums exactly.
- Q4_K (per super-block of 256): its 128 bytes of nibbles as they are, 32
  vectors (the low nibbles of vector 8j + t are weights 4t.. of sub-block 2j,
  the high ones of 2j + 1), then the sub-blocks' 6-bit scales and mins a byte
  per row; d and dmin as float16 (d times a scale is exact in float32).
- Q6_K (per super-block): its weights unpacked to bytes 0..63 (8 bits for
  its 6.56: a kernel as plain as Q8_0's, which from memory reads one row in
  1.18x the GGML kernel's time), 8 vectors per block of 32, then the 16 int8
  scales a byte per row; each half block sums apart, from -32 times x's sum
  over it.
The sums run in a different order from the GGML-layout matvec's, so the
results differ from it by float rounding; a batched row (matmul) equals this
matvec bit for bit: the same steps per row of x, in the same order.

Needs 512-bit VNNI (`AVAILABLE`); elsewhere the GGML-layout kernels run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .ggml_types import GGMLType
from .jit import jit, numba_enabled, prange

GROUP = 16  # weight rows in a vector: a 32-bit lane each
SWITCH = "LLAMAZIP_INTERLEAVE"  # =0: never repack (the weights stay mapped); =1: whatever the model's size
# Per type: block bytes, where its weights start, bytes of weights (nibbles or bytes), where
# its minimum is (0: none), where its fifth bits are (0: none).
_LAYOUT = {GGMLType.Q4_0: (18, 2, 16, 0, 0), GGMLType.Q4_1: (20, 4, 16, 2, 0),
           GGMLType.Q5_0: (22, 6, 16, 0, 2), GGMLType.Q5_1: (24, 8, 16, 2, 4),
           GGMLType.Q8_0: (34, 2, 32, 0, 0)}
# A minimum the type leaves out, in units of the scale: w = d q + this d.
_IMPLIED_MINIMUM = {GGMLType.Q4_0: -8, GGMLType.Q5_0: -16}
TYPES = frozenset(_LAYOUT) | {GGMLType.Q4_K, GGMLType.Q6_K}
PREFETCH_AHEAD = 4096  # bytes (2048 measured 15-20% slower from memory, 8192 alike)
# The copy's bytes per row and block (K-quants: super-block of 256), which tell the kernels the kind.
_Q4_BYTES, _Q5_BYTES, _Q8_BYTES, _K4_BYTES, _K6_BYTES = 16, 20, 32, 144, 272


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


def available_memory_bytes() -> int:
    """Memory the kernel can give without swapping (Linux MemAvailable), 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


# A copy of the model's weights at most this share of the memory available costs
# little (SmolLM2's 96 MB, Qwen2.5 0.5B's 0.4 GB, Llama 3.2 1B's 0.7 GB on 24 GB).
SMALL_COPY_SHARE = 1 / 16


def repacked_types(weight_bytes: int, batched: bool = False) -> frozenset[GGMLType]:
    """The types whose matrices a model of weight_bytes decodes from repacked copies:
    - every one of TYPES where the weights fit the last-level cache (one stream
      gains most there);
    - for a model that decodes several sequences at once (batched: the server's
      slots), all but Q4_K where the copy takes at most a quarter of the memory
      available: from memory a step of 4 rows takes 0.72x the GGML layout's time
      (8B-shaped Q4_0, Emerald Rapids); Q6_K's copy, a byte a weight, 0.62x there
      (0.88x on Zen 5); Q4_K's GGML kernels read as fast;
    - else the plain block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) where the copy is
      small (SMALL_COPY_SHARE): one row from memory in 0.88x the GGML layout's
      time on Emerald Rapids, 0.63-0.74x on Zen 5 (Q4_0, Q4_1; Q8_0 equal), whose
      one thread reads 30 GB/s, more than the GGML kernels unpack (SmolLM2,
      Qwen2.5 0.5B and Gemma 3 decode 1.34-1.48x faster on one thread). The
      K-quants' copies read one row slower from memory (Q6_K 0.64x the speed,
      Q4_K 0.81x on Zen 5), so those stay mapped.
    Larger models stay mapped for one stream: twice the memory for ~10%."""
    setting = os.environ.get(SWITCH)
    if setting in ("0", "1"):
        return TYPES if setting == "1" else frozenset()
    if weight_bytes <= last_level_cache_bytes():
        return TYPES
    available = available_memory_bytes()
    if batched and 4 * weight_bytes <= available:
        return TYPES - {GGMLType.Q4_K}
    if weight_bytes <= SMALL_COPY_SHARE * available:
        return frozenset(_LAYOUT)
    return frozenset()


AVAILABLE = False
if numba_enabled():
    from .simd import VNNI_512
    AVAILABLE = VNNI_512

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .block_layouts import k4_scale_min_bytes, q6_k_fields
    from .int8_batch import quantize_rows, sums32_rows
    from .simd import ORDERED, constant, float_vector, int64, load_vector, prefetch, splat, store_vector

    _BYTES64 = ir.VectorType(ir.IntType(8), 64)
    _BYTES16 = ir.VectorType(ir.IntType(8), 16)
    _INTS16 = ir.VectorType(ir.IntType(32), 16)
    _SHORTS16 = ir.VectorType(ir.IntType(16), 16)
    _HALFS16 = ir.VectorType(ir.HalfType(), 16)
    _FLOATS16 = ir.VectorType(ir.FloatType(), 16)
    f32x16, zeros16, _ = float_vector(16, ordered=True)

    class _StepCode:
        """What a step's code generation reads, named: the arguments of every step
        intrinsic (sums, w, at, scales, minimums, scale_at, xq, x_rows_at, block, xd,
        x_sums; see _block_step), and the loads and sums they share."""

        def __init__(self, context, builder, signature, args):
            self.context, self.builder, self.types = context, builder, signature.args
            (self.sums, self.w, self.at, self.scales, self.minimums, self.scale_at, xq, self.x_rows_at, self.block,
             xd, x_sums) = args
            self._vpdpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_INTS16, [_INTS16] * 3), "llvm.x86.avx512.vpdpbusd.512")
            self._x_words = builder.bitcast(context.make_array(self.types[6])(context, builder, xq).data,
                                            ir.IntType(32).as_pointer())
            self._xd = context.make_array(self.types[9])(context, builder, xd).data
            self._x_sums = context.make_array(self.types[10])(context, builder, x_sums).data

        def weights(self, offset: int, vector_type=_BYTES64):
            """The copy's bytes at w[at + offset]."""
            return load_vector(self.context, self.builder, self.types[1], self.w,
                               self.builder.add(self.at, int64(offset)), vector_type)

        def halves(self, minimums: bool = False):
            """16 float16 (a row each) of scales, or minimums, at scale_at, as float32."""
            which = 4 if minimums else 3  # the argument's place
            array = self.minimums if minimums else self.scales
            bits = load_vector(self.context, self.builder, self.types[which], array, self.scale_at, _SHORTS16)
            return self.builder.fpext(self.builder.bitcast(bits, _HALFS16), _FLOATS16)

        def x_block(self, k: int, block_in_step: int = 0, blocks_per_step: int = 1) -> tuple:
            """Row k of x's block (block * blocks_per_step + block_in_step): the index of
            its first word in xq and of the block (xd, block sums). x_rows_at holds
            where each row starts in xq (bytes): its blocks start at row_at / 32."""
            builder = self.builder
            row_at = builder.extract_value(self.x_rows_at, k)
            block = builder.add(builder.mul(self.block, int64(blocks_per_step)), int64(block_in_step))
            return (builder.add(builder.udiv(row_at, int64(4)), builder.mul(block, int64(8))),
                    builder.add(builder.udiv(row_at, int64(32)), block))

        def dot(self, start, weights, first_word, words):
            """start plus each weights[word] times x's words[word] (4 bytes broadcast), one vpdpbusd each."""
            builder = self.builder
            for word in words:
                x4 = builder.load(builder.gep(self._x_words, [builder.add(first_word, int64(word))]), align=4)
                start = builder.call(self._vpdpbusd, [start, weights[word], splat(builder, x4, _INTS16)])
            return start

        def x_scale(self, at_x):
            return splat(self.builder, self.builder.load(self.builder.gep(self._xd, [at_x])), _FLOATS16)

        def x_sum(self, at):
            return self.builder.load(self.builder.gep(self._x_sums, [at]))

        def scaled_sum(self, dot, weight_scale, x_scale):
            """dot (int32) * weight_scale * x_scale, as the matvecs round it."""
            builder = self.builder
            return builder.fmul(builder.sitofp(dot, _FLOATS16), builder.fmul(weight_scale, x_scale, flags=ORDERED),
                                flags=ORDERED)

    def _step_intrinsic(x_rows: int, emit):
        """A step over `x_rows` rows of x whose code emit(code: _StepCode, sums: list)
        writes, returning each row's new 16 running sums."""
        @intrinsic
        def step(typingctx, sums, w, at, scales, minimums, scale_at, xq, x_rows_at, block, xd, x_sums):
            def codegen(context, builder, signature, args):
                code = _StepCode(context, builder, signature, args)
                accs = emit(code, [builder.extract_value(code.sums, k) for k in range(x_rows)])
                return context.make_tuple(builder, signature.return_type, accs)
            index = types.intp
            return types.UniTuple(f32x16, x_rows)(sums, w, index, scales, minimums, index, xq, x_rows_at,
                                                  index, xd, x_sums), codegen
        return step

    def _nibbles(code: _StepCode, packed):
        """A vector of bytes as its low nibbles and its high ones, each as 16 int32 lanes."""
        builder, low = code.builder, constant(_BYTES64, 0x0F)
        return (builder.bitcast(builder.and_(packed, low), _INTS16),
                builder.bitcast(builder.and_(builder.lshr(packed, constant(_BYTES64, 4)), low), _INTS16))

    def _block_step(x_rows: int, row_bytes: int):
        """An intrinsic: block b of a group (its weights at w[at], scales and minimums at
        [scale_at]) against `x_rows` rows of x, each row's 16 running sums (a lane per
        weight row) in a tuple. Every row takes the same steps in the same order,
        whatever x_rows: a row's sums are the same bits alone or in a tile.
        row_bytes: the copy's bytes per row and block: _Q4_BYTES, _Q5_BYTES (x_sums:
        x's block sums times their scale, for the minimums) or _Q8_BYTES (x_sums:
        x's integer block sums, for the 128 added)."""
        nibbles = row_bytes != _Q8_BYTES

        def emit(code: _StepCode, accs: list) -> list:
            builder = code.builder
            # weights[k] against x's word k of the block (bytes 4k..4k+3)
            if nibbles:
                weights = [None] * 8
                for t in range(4):
                    weights[t], weights[4 + t] = _nibbles(code, code.weights(64 * t))
                if row_bytes == _Q5_BYTES:  # word k's fifth bits are lane bits 8j + k: to bit 4 of byte j
                    fifth = builder.bitcast(code.weights(256), _INTS16)
                    for k in range(8):
                        shifted = (builder.lshr(fifth, constant(_INTS16, k - 4)) if k > 4 else
                                   builder.shl(fifth, constant(_INTS16, 4 - k)) if k < 4 else fifth)
                        weights[k] = builder.or_(weights[k], builder.and_(shifted, constant(_INTS16, 0x10101010)))
            else:
                weights = [builder.bitcast(code.weights(64 * t), _INTS16) for t in range(8)]
            weight_scales = code.halves()
            weight_minimums = code.halves(minimums=True) if nibbles else None
            for k in range(x_rows):
                first_word, at_x = code.x_block(k)
                x_sum = code.x_sum(at_x)
                # Two chains of sums (words 0-3, 4-7), added at the end: each vpdpbusd waits
                # for the one before it in its chain. Integers: the same sums in any order.
                if nibbles:
                    first = constant(_INTS16, 0)
                else:  # minus what the 128 added to every weight brings
                    first = splat(builder, builder.mul(x_sum, ir.Constant(x_sum.type, -128)), _INTS16)
                dot = builder.add(code.dot(first, weights, first_word, range(4)),
                                  code.dot(constant(_INTS16, 0), weights, first_word, range(4, 8)))
                acc = builder.fadd(accs[k], code.scaled_sum(dot, weight_scales, code.x_scale(at_x)), flags=ORDERED)
                if nibbles:
                    minimums_scaled = builder.fmul(weight_minimums, splat(builder, x_sum, _FLOATS16), flags=ORDERED)
                    acc = builder.fadd(acc, minimums_scaled, flags=ORDERED)
                accs[k] = acc
            return accs
        return _step_intrinsic(x_rows, emit)

    def _k4_step(x_rows: int):
        """An intrinsic: super-block b (256 weights) of a Q4_K group against `x_rows` rows
        of x, as _block_step: at w[at] 32 vectors of nibbles (vector v: bytes 4v..4v+3
        of each row's 128, as Q4_K keeps them: the low nibbles of vector 8j + t are
        weights 4t.. of sub-block 2j, the high ones of sub-block 2j + 1), then the
        8 sub-blocks' scales as 16 bytes each (a byte per row), then their mins;
        d and dmin as float16 in scales and minimums [scale_at]. Per sub-block s:
        sums += dot * (d scale_s) * x's scale - (dmin min_s) * x's scaled sum."""
        def emit(code: _StepCode, accs: list) -> list:
            builder = code.builder
            d, dmin = code.halves(), code.halves(minimums=True)
            # A pair of sub-blocks at a time, every row of x against it: 16 vectors of
            # nibbles live, not the super-block's 64 (which spilled).
            for j in range(4):
                nibbles = [[None] * 8, [None] * 8]  # sub-block 2j's, 2j + 1's: words t of each row
                for t in range(8):
                    nibbles[0][t], nibbles[1][t] = _nibbles(code, code.weights(64 * (8 * j + t)))
                for half in range(2):
                    sub = 2 * j + half
                    # exact: an 11-bit float16 times a 6-bit integer
                    weight_scale = builder.fmul(d, builder.uitofp(code.weights(2048 + 16 * sub, _BYTES16), _FLOATS16),
                                                flags=ORDERED)
                    weight_min = builder.fmul(dmin, builder.uitofp(code.weights(2048 + 128 + 16 * sub, _BYTES16),
                                                                   _FLOATS16), flags=ORDERED)
                    for k in range(x_rows):
                        first_word, at_x = code.x_block(k, sub, 8)
                        dot = builder.add(code.dot(constant(_INTS16, 0), nibbles[half], first_word, range(4)),
                                          code.dot(constant(_INTS16, 0), nibbles[half], first_word, range(4, 8)))
                        acc = builder.fadd(accs[k], code.scaled_sum(dot, weight_scale, code.x_scale(at_x)),
                                           flags=ORDERED)
                        x_sum = splat(builder, code.x_sum(at_x), _FLOATS16)
                        accs[k] = builder.fsub(acc, builder.fmul(weight_min, x_sum, flags=ORDERED), flags=ORDERED)
            return accs
        return _step_intrinsic(x_rows, emit)

    def _k6_step(x_rows: int):
        """An intrinsic: super-block b (256 weights) of a Q6_K group against `x_rows` rows
        of x, as _block_step: at w[at] per block k of 32 weights 8 vectors of bytes
        (vector 8k + t: weights 4t..4t+3 of each row, unpacked to 0..63), then the 16
        sub-blocks' int8 scales, 16 bytes each (a byte per row); d as float16 in
        scales[scale_at]. Per block, each half of 16 weights sums apart (its own
        scale), from -32 times x's sum over it (x_sums: x's integer sums per 16):
        sums += (dot_a sc_a + dot_b sc_b) * d * x's scale."""
        def emit(code: _StepCode, accs: list) -> list:
            builder = code.builder
            d = code.halves()
            for k in range(8):
                weights = [builder.bitcast(code.weights(64 * (8 * k + t)), _INTS16) for t in range(8)]
                sub_scales = [builder.sitofp(code.weights(4096 + 16 * sub, _BYTES16), _FLOATS16)
                              for sub in (2 * k, 2 * k + 1)]
                for r in range(x_rows):
                    first_word, at_x = code.x_block(r, k, 8)
                    total = None
                    for half in range(2):
                        x_sum = code.x_sum(builder.add(builder.mul(at_x, int64(2)), int64(half)))
                        start = splat(builder, builder.mul(x_sum, ir.Constant(x_sum.type, -32)), _INTS16)
                        dot = code.dot(start, weights, first_word, range(4 * half, 4 * half + 4))
                        part = builder.fmul(builder.sitofp(dot, _FLOATS16), sub_scales[half], flags=ORDERED)
                        total = part if total is None else builder.fadd(total, part, flags=ORDERED)
                    scaled = builder.fmul(total, builder.fmul(d, code.x_scale(at_x), flags=ORDERED), flags=ORDERED)
                    accs[r] = builder.fadd(accs[r], scaled, flags=ORDERED)
            return accs
        return _step_intrinsic(x_rows, emit)

    _q4_step1, _q4_step4 = _block_step(1, _Q4_BYTES), _block_step(4, _Q4_BYTES)
    _q5_step1, _q5_step4 = _block_step(1, _Q5_BYTES), _block_step(4, _Q5_BYTES)
    _q8_step1, _q8_step4 = _block_step(1, _Q8_BYTES), _block_step(4, _Q8_BYTES)
    _k4_step1, _k4_step4 = _k4_step(1), _k4_step(4)
    _k6_step1, _k6_step4 = _k6_step(1), _k6_step(4)

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


@jit()
def _fifth_bits_transposed(bits):
    """A Q5 block's 32 fifth bits (bit i: weight i's) with bit 4k + j moved to 8j + k:
    byte j gathers every fourth bit from j, which a shift by k - 4 and a mask of
    bit 4 in each byte then hand to the word of weights 4k..4k+3."""
    out = np.uint32(0)
    for j in range(4):
        gathered = (bits >> np.uint32(j)) & np.uint32(0x11111111)  # bits 4k -> k, k = 0..7:
        gathered = (gathered | (gathered >> np.uint32(3))) & np.uint32(0x03030303)
        gathered = (gathered | (gathered >> np.uint32(6))) & np.uint32(0x000F000F)
        gathered = (gathered | (gathered >> np.uint32(12))) & np.uint32(0xFF)
        out |= gathered << np.uint32(8 * j)
    return out


@jit(parallel=True)
def _repack(q, halves, layout, flip, implied, weights, scales, minimums):
    """Rows (rows, bytes) of blocks into groups: per group and block, the rows' weights
    as weight_bytes / 4 vectors of 64 bytes, vector t holding bytes 4t..4t+3 of each
    of the group's rows' weights, XOR flip (in every byte), and with fifth bits a
    vector of each row's, transposed; into `weights` as uint32 (a word at a time: a
    byte at a time took twice as long); the rows' float16 scales (the block's first
    field) and minimums where the block has them, or implied[scale] where `implied`
    has entries (_implied_minimum_table), 16 to a group and block.
    layout: _LAYOUT's fields."""
    block_bytes, start, weight_bytes, minimum_at, fifth_at = layout
    rows = q.shape[0]
    blocks = q.shape[1] // block_bytes
    vectors = weight_bytes // 4 + (1 if fifth_at else 0)
    for g in prange(rows // GROUP):
        for b in range(blocks):
            at_group = g * blocks + b
            for r in range(GROUP):
                row = g * GROUP + r
                at = block_bytes * b
                base = at_group * GROUP * vectors + r
                for t in range(weight_bytes // 4):
                    weights[base + GROUP * t] = _word(q[row], at + start + 4 * t) ^ flip
                if fifth_at:
                    weights[base + GROUP * (vectors - 1)] = _fifth_bits_transposed(_word(q[row], at + fifth_at))
                scales[at_group * GROUP + r] = halves[row, at // 2]
                if minimum_at:
                    minimums[at_group * GROUP + r] = halves[row, (at + minimum_at) // 2]
                elif implied.size:
                    minimums[at_group * GROUP + r] = implied[halves[row, at // 2]]


@jit(parallel=True)
def _repack_q4_k(q, halves, weights, weight_bytes, scales, minimums):
    """Q4_K rows (rows, bytes) into groups (see _k4_step): per group and super-block the
    32 vectors of nibbles (words of each row's 128 bytes, as they are), the 8
    scales and 8 mins a byte per row; d and dmin into scales and minimums."""
    rows = q.shape[0]
    blocks = q.shape[1] // 144
    for g in prange(rows // GROUP):
        for b in range(blocks):
            at_group = g * blocks + b
            base = at_group * GROUP * 144
            for r in range(GROUP):
                row = g * GROUP + r
                at = 144 * b
                for v in range(32):
                    weights[base // 4 + GROUP * v + r] = _word(q[row], at + 16 + 4 * v)
                packed_scales, packed_mins = k4_scale_min_bytes(q[row], at + 4)
                for sub in range(8):
                    weight_bytes[base + 2048 + 16 * sub + r] = (packed_scales >> np.uint64(8 * sub)) & np.uint64(63)
                    weight_bytes[base + 2048 + 128 + 16 * sub + r] = (packed_mins >> np.uint64(8 * sub)) & np.uint64(63)
                scales[at_group * GROUP + r] = halves[row, at // 2]
                minimums[at_group * GROUP + r] = halves[row, at // 2 + 1]


@jit(parallel=True)
def _repack_q6_k(q, halves, weights, weight_bytes, scales):
    """Q6_K rows (rows, bytes) into groups (see _k6_step): per group and super-block its
    weights unpacked to bytes 0..63 in vectors of 4 per row, then the 16 sub-block
    scales a byte per row; d into scales. Four weights at a time: a word of their
    low nibbles' bytes and one of their high bits' make the row's word of the
    vector (a byte at a time ran 0.5 GB/s). `weights` and `weight_bytes`: one
    buffer as uint32 and as bytes."""
    rows = q.shape[0]
    blocks = q.shape[1] // 210
    for g in prange(rows // GROUP):
        for b in range(blocks):
            at_group = g * blocks + b
            base = at_group * GROUP * _K6_BYTES
            for r in range(GROUP):
                row = q[g * GROUP + r]
                for sub in range(16):
                    low_at, low_shift, high_at, high_shift = q6_k_fields(b, sub)
                    for m in range(4):  # weights 16 sub + 4m.. make the word of vector 4 sub + m
                        low = (_word(row, low_at + 4 * m) >> np.uint32(low_shift)) & np.uint32(0x0F0F0F0F)
                        high = (_word(row, high_at + 4 * m) >> np.uint32(high_shift)) & np.uint32(0x03030303)
                        weights[base // 4 + GROUP * (4 * sub + m) + r] = low | (high << np.uint32(4))
                    weight_bytes[base + 4096 + 16 * sub + r] = row[210 * b + 192 + sub]
                scales[at_group * GROUP + r] = halves[g * GROUP + r, 105 * b + 104]


@functools.cache
def _implied_minimum_table(ggml_type: GGMLType) -> np.ndarray:
    """The float16 bits of _IMPLIED_MINIMUM * d for each of the 65536 float16 bits of d:
    looked up, not converted (numpy's float16 conversions of every scale of a 1B
    model took 0.8 s, twice the repacking itself)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # the bits of infinities and NaNs: never a block's scale
        return (np.float32(_IMPLIED_MINIMUM[ggml_type]) * every).astype(np.float16).view(np.uint16)


def repack(raw: np.ndarray, ggml_type: GGMLType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a type in TYPES (rows, bytes; rows a multiple of GROUP) as (weights,
    scales, minimums): the arguments of matvec and matmul (Q8_0's minimums: none).
    The weights' bytes per scale tell the kernels the kind of block."""
    rows = raw.shape[0]
    if rows % GROUP:
        raise ValueError(f"interleaving takes rows in groups of {GROUP}, got {rows}")
    if ggml_type == GGMLType.Q6_K:
        blocks = raw.shape[1] // 210
        weights = np.empty(rows * blocks * _K6_BYTES // 4, np.uint32)
        scales = np.empty(rows * blocks, np.uint16)
        _repack_q6_k(raw, raw.view("<u2"), weights, weights.view(np.uint8), scales)
        return weights.view(np.uint8), scales, np.empty(0, np.uint16)
    if ggml_type == GGMLType.Q4_K:
        blocks = raw.shape[1] // 144
        weights = np.empty(rows * blocks * _K4_BYTES // 4, np.uint32)
        scales, minimums = np.empty(rows * blocks, np.uint16), np.empty(rows * blocks, np.uint16)
        _repack_q4_k(raw, raw.view("<u2"), weights, weights.view(np.uint8), scales, minimums)
        return weights.view(np.uint8), scales, minimums
    layout = _LAYOUT[ggml_type]
    block_bytes, _, weight_bytes, _, fifth_at = layout
    blocks = raw.shape[1] // block_bytes
    weights = np.empty(rows * blocks * (weight_bytes + (4 if fifth_at else 0)) // 4, np.uint32)
    scales = np.empty(rows * blocks, np.uint16)
    minimums = np.empty(rows * blocks if ggml_type != GGMLType.Q8_0 else 0, np.uint16)
    flip = np.uint32(0x80808080 if ggml_type == GGMLType.Q8_0 else 0)
    # e.g. Q4_0: w = d (q - 8) = d q + (-8 d), exact in float16
    implied = _implied_minimum_table(ggml_type) if ggml_type in _IMPLIED_MINIMUM else np.empty(0, np.uint16)
    _repack(raw, raw.view("<u2"), layout, flip, implied, weights, scales, minimums)
    return weights.view(np.uint8), scales, minimums


@jit()
def _x_rows(x, integer_sum_width):
    """x's rows rounded as the int8 matvecs round them: the bytes (n, cols), the block
    scales, each block's sum of the rounded values (times the scale) as float32
    (n, blocks), and, with integer_sum_width (32 or 16; 0: none), the integer sums
    of the rounded bytes over each run of that many; all flattened."""
    xq, xd, xs16 = quantize_rows(x)
    n, cols = xq.shape
    runs = cols // integer_sum_width if integer_sum_width else 0
    int_sums = np.zeros(n * runs, np.int32)
    for i in range(n):
        for run in range(runs):
            total = 0
            for j in range(integer_sum_width):
                total += xq[i, integer_sum_width * run + j]
            int_sums[i * runs + run] = total
    float_sums = sums32_rows(xs16).reshape(-1)
    return xq.reshape(-1), xd.reshape(-1), float_sums, int_sums


@jit()
def _integer_sum_width(row_bytes):
    """The runs of x whose integer sums a kind of block needs (0: none)."""
    return 32 if row_bytes == _Q8_BYTES else 16 if row_bytes == _K6_BYTES else 0


@jit()
def _weights_per_block(row_bytes):
    return 256 if row_bytes == _K4_BYTES or row_bytes == _K6_BYTES else 32


@jit(parallel=True, ordered=True)
def matvec(weights, scales, minimums, x, out):
    """out = W x for one row x (cols,), W repacked; x rounded to int8 per block as the matvecs do."""
    row_bytes = weights.size // scales.size
    xq, xd, float_sums, int_sums = _x_rows(x.reshape(1, -1), _integer_sum_width(row_bytes))
    blocks = x.size // _weights_per_block(row_bytes)
    block_bytes = GROUP * row_bytes
    for g in prange(out.size // GROUP):
        acc = (zeros16(),)
        for b in range(blocks):
            at = g * blocks + b
            for line in range(0, block_bytes, 64):  # every line: see the module's note
                prefetch(weights, block_bytes * at + PREFETCH_AHEAD + line)
            if row_bytes == _Q4_BYTES:
                acc = _q4_step1(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, (0,), b, xd,
                                float_sums)
            elif row_bytes == _Q5_BYTES:
                acc = _q5_step1(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, (0,), b, xd,
                                float_sums)
            elif row_bytes == _K4_BYTES:
                acc = _k4_step1(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, (0,), b, xd,
                                float_sums)
            elif row_bytes == _K6_BYTES:
                acc = _k6_step1(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, (0,), b, xd,
                                int_sums)
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
    row_bytes = weights.size // scales.size
    xq, xd, float_sums, int_sums = _x_rows(x, _integer_sum_width(row_bytes))
    blocks = cols // _weights_per_block(row_bytes)
    block_bytes = GROUP * row_bytes
    flat = out.reshape(-1)
    for g in prange(rows // GROUP):
        for t in range(0, n, 4):
            # rows past the last are the last again (computed twice, stored once)
            tile = (t * cols, min(t + 1, n - 1) * cols, min(t + 2, n - 1) * cols, min(t + 3, n - 1) * cols)
            acc = (zeros16(), zeros16(), zeros16(), zeros16())
            for b in range(blocks):
                at = g * blocks + b
                for line in range(0, block_bytes, 64):
                    prefetch(weights, block_bytes * at + PREFETCH_AHEAD + line)
                if row_bytes == _Q4_BYTES:
                    acc = _q4_step4(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, tile, b, xd,
                                    float_sums)
                elif row_bytes == _Q5_BYTES:
                    acc = _q5_step4(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, tile, b, xd,
                                    float_sums)
                elif row_bytes == _K4_BYTES:
                    acc = _k4_step4(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, tile, b, xd,
                                    float_sums)
                elif row_bytes == _K6_BYTES:
                    acc = _k6_step4(acc, weights, block_bytes * at, scales, minimums, GROUP * at, xq, tile, b, xd,
                                    int_sums)
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

"""LLVM vector intrinsics for numba kernels: the toolkit every hand-vectorised kernel builds on.

numba's loops leave much on the table for packed weights (LLVM unrolls a
constant-size block and vectorises across blocks with gathers, 5-20x slower),
so the block kernels are written as vector expressions through `@intrinsic`.
This module holds the generic pieces: float16/bfloat16 conversion, a
float-vector type whose running sum stays in registers (`float_vector`),
unchecked vector loads (`lanes`), broadcasts and constants, 16-bit bit fields,
and the choice of integer dot-product instruction for this CPU
(`DOT_FLAVOUR`). Import it only when numba loads (`jit.numba_enabled()`).

A row's running sum stays a vector and is reduced to one float once per row,
not once per block: the reductions were half the instructions (K-quant matvec
1.6-2x faster). Bit fields are cut out in 16-bit lanes, where x86 can shift
by a run-time amount in one instruction (bytes cannot). Vector loads from
numpy buffers use byte alignment: a wider alignment is not guaranteed (and
segfaulted).
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .jit import ORDERED_FASTMATH, numba


@intrinsic
def f16_to_f32(typingctx, bits):
    """float16 bits (uint16) -> float32; one F16C instruction, vectorisable."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


def f16_splat(context, builder, array_type, array, i, lanes):
    """The float16 at array[i] (a uint16 array) as `lanes` floats: a broadcast
    load, then one conversion. A scalar conversion (f16_to_f32) then a broadcast
    made LLVM insert the bits into whatever register was at hand (vpinsrw),
    tying each conversion to the last use of that register, often a running sum."""
    data = context.make_array(array_type)(context, builder, array).data
    shorts = ir.VectorType(ir.IntType(16), lanes)
    lane0 = builder.insert_element(ir.Constant(shorts, ir.Undefined), builder.load(builder.gep(data, [i])),
                                   ir.Constant(ir.IntType(32), 0))
    spread = builder.shuffle_vector(lane0, ir.Constant(shorts, ir.Undefined),
                                    ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
    return builder.fpext(builder.bitcast(spread, ir.VectorType(ir.HalfType(), lanes)),
                         ir.VectorType(ir.FloatType(), lanes))


@intrinsic
def f16_two_pairs(typingctx, array, i, j):
    """(array[i], array[i + 1], array[j], array[j + 1]) of a uint16 array of
    float16 bits, as floats, from one conversion of the 16 halves at array[i]
    (unchecked: callers keep i + 16 inside the array and j + 1 < i + 16).
    Four scalar conversions where the target has no AVX-512.

    A scalar conversion without AVX-512 FP16 loads its half into whatever
    register is at hand (vpinsrw), often the row's running sum: each block's
    scales then waited for the last block's sum, and the Q4 matvecs ran at
    0.5-0.6x the speed of the same code on a CPU with FP16. The intrinsic asks
    for exceptions suppressed (sae), which keeps LLVM from turning it back into
    scalar conversions; the values are the same (the conversion is exact)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        if "avx512f" not in _enabled_features():
            one = ir.Constant(args[1].type, 1)
            at = (args[1], builder.add(args[1], one), args[2], builder.add(args[2], one))
            halves = [builder.bitcast(builder.load(builder.gep(data, [i])), ir.HalfType()) for i in at]
            return context.make_tuple(builder, signature.return_type,
                                      [builder.fpext(h, ir.FloatType()) for h in halves])
        pointer = builder.bitcast(builder.gep(data, [args[1]]), SHORTS16.as_pointer())
        floats = ir.VectorType(ir.FloatType(), 16)
        convert = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            floats, [SHORTS16, floats, ir.IntType(16), ir.IntType(32)]), "llvm.x86.avx512.mask.vcvtph2ps.512")
        all_lanes, suppress_exceptions = ir.Constant(ir.IntType(16), -1), ir.Constant(ir.IntType(32), 8)
        converted = builder.call(convert, [builder.load(pointer, align=2), ir.Constant(floats, None),
                                           all_lanes, suppress_exceptions])
        k = builder.trunc(builder.sub(args[2], args[1]), ir.IntType(32))
        one = ir.Constant(ir.IntType(32), 1)
        lanes = (ir.Constant(ir.IntType(32), 0), one, k, builder.add(k, one))
        return context.make_tuple(builder, signature.return_type,
                                  [builder.extract_element(converted, lane) for lane in lanes])
    return types.UniTuple(types.float32, 4)(array, types.intp, types.intp), codegen


@intrinsic
def bf16_to_f32(typingctx, bits):
    """bfloat16 bits (uint16) -> float32: they are the top half of the float32."""
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


# 16 lanes: half a block of 32 weights as bytes, as 16-bit fields, as floats.
BYTES16 = ir.VectorType(ir.IntType(8), 16)
SHORTS16 = ir.VectorType(ir.IntType(16), 16)
FLOATS16 = ir.VectorType(ir.FloatType(), 16)
FAST = ("fast",)
# Fast-math but for reassociation (jit.ORDERED_FASTMATH): LLVM keeps the order of
# float operations as written. It reorders fast ones following the order their
# instructions happen to be emitted in, so the same steps written in two kernels
# rounded differently; ORDERED ones round alike (int8_matvec.py, int8_batch.py).
ORDERED = tuple(sorted(ORDERED_FASTMATH))


class F32Vector(types.Type):
    """`lanes` float32 lanes held in vector registers: a row's running sum."""
    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__(name=f"F32x{lanes}")


@register_model(F32Vector)
class _F32VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.lanes))


def _zeros_intrinsic(vector_type, llvm_type, zero):
    @intrinsic
    def zeros(typingctx):
        def codegen(context, builder, signature, args):
            return constant(llvm_type, zero)
        return vector_type(), codegen
    return zeros


def float_vector(lanes: int, ordered: bool = False):
    """The vector type of `lanes` floats, and intrinsics for one of zeros and for its
    sum: in an order LLVM chooses, or (ordered) halves added until one lane is left."""
    vector_type = F32Vector(lanes)
    llvm_type = ir.VectorType(ir.FloatType(), lanes)

    zeros = _zeros_intrinsic(vector_type, llvm_type, 0.0)

    def halves_added(builder, vector, width):
        while width > 1:
            width //= 2
            low, high = (builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                                            list(range(start, start + width))))
                         for start in (0, width))
            vector = builder.fadd(low, high, flags=ORDERED)
        return builder.extract_element(vector, ir.Constant(ir.IntType(32), 0))

    @intrinsic
    def total(typingctx, acc):
        def codegen(context, builder, signature, args):
            if ordered:
                return halves_added(builder, args[0], lanes)
            reduce_add = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), llvm_type]),
                f"llvm.vector.reduce.fadd.v{lanes}f32")
            return builder.call(reduce_add, [ir.Constant(ir.FloatType(), 0.0), args[0]], fastmath=FAST)
        return types.float32(acc), codegen

    return vector_type, zeros, total


def load_vector(context, builder, array_type, array, start, vector_type):
    """vector_type's worth of array[start:], unchecked: callers keep inside the array."""
    data = context.make_array(array_type)(context, builder, array).data
    align = 4 if vector_type.element == ir.FloatType() else 1
    return builder.load(builder.bitcast(builder.gep(data, [start]), vector_type.as_pointer()), align=align)


def store_vector(context, builder, array_type, array, start, value):
    """value (a vector) into array[start:], unchecked: callers keep inside the array."""
    data = context.make_array(array_type)(context, builder, array).data
    align = 4 if value.type.element == ir.FloatType() else 1
    builder.store(value, builder.bitcast(builder.gep(data, [start]), value.type.as_pointer()), align=align)
    return context.get_dummy_value()


@intrinsic
def word32(typingctx, q, start):
    """The 4 bytes from element `start` of the uint8 or uint16 array q, as a
    little-endian uint64, unchecked. Indexing element by element made numba test
    each index for wrapping around (a compare and a move per byte)."""
    def codegen(context, builder, signature, args):
        q, start = args
        data = context.make_array(signature.args[0])(context, builder, q).data
        word = builder.load(builder.bitcast(builder.gep(data, [start]), ir.IntType(32).as_pointer()), align=1)
        return builder.zext(word, ir.IntType(64))
    return types.uint64(q, types.intp), codegen


# How far ahead of the bytes being multiplied a matvec asks for its weights: 2 KiB
# ahead (in a row or the next: rows lie back to back) took an 8B-shaped model's
# Q4_0 matrices on Zen 3 from 4.6 to 5.9 GB/s on one thread (256 B: none; 4 KiB: 5.6).
PREFETCH_AHEAD = 2048


@intrinsic
def prefetch(typingctx, q, start):
    """Ask for the cache line at element `start` of q (a hint: never faults, even past the end)."""
    def codegen(context, builder, signature, args):
        q, start = args
        data = context.make_array(signature.args[0])(context, builder, q).data
        pointer = builder.bitcast(builder.gep(data, [start]), ir.IntType(8).as_pointer())
        hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [ir.IntType(8).as_pointer()] + [ir.IntType(32)] * 3), "llvm.prefetch.p0i8")
        # read, keep in every cache level, data (not instructions)
        builder.call(hint, [pointer] + [ir.Constant(ir.IntType(32), v) for v in (0, 3, 1)])
        return context.get_dummy_value()
    return types.void(q, types.intp), codegen


def splat(builder, value, vector_type):
    """The scalar `value` in every lane, truncated to the lane width if an integer."""
    if isinstance(vector_type.element, ir.IntType):
        value = builder.trunc(value, vector_type.element)
    lane0 = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(lane0, ir.Constant(vector_type, ir.Undefined), zeros)


def constant(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def int64(value: int):
    return ir.Constant(ir.IntType(64), value)


_FLOATS32 = ir.VectorType(ir.FloatType(), 32)


def rounded_block(builder, values):
    """32 floats (a vector) rounded to int8 with one scale, as int8_matvec.quantize_x
    rounds a block (scale = largest |value| / 127, round half to even): (scale,
    values / scale, rounded, as floats). Works on any target: LLVM splits the
    vectors to the registers it has."""
    fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS32, [_FLOATS32]),
                                          "llvm.fabs.v32f32")
    fmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [_FLOATS32]),
                                          "llvm.vector.reduce.fmax.v32f32")
    rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS32, [_FLOATS32]),
                                          "llvm.rint.v32f32")
    d = builder.fdiv(builder.call(fmax, [builder.call(fabs, [values])]), ir.Constant(ir.FloatType(), 127.0))
    zero = ir.Constant(ir.FloatType(), 0.0)
    inverse = builder.select(builder.fcmp_ordered(">", d, zero),
                             builder.fdiv(ir.Constant(ir.FloatType(), 1.0), d), zero)
    scaled = builder.fmul(values, splat(builder, inverse, _FLOATS32))
    return d, scaled, builder.call(rint, [scaled])


def exp_vector(builder, x):
    """e^x for each lane of a float vector, without libm (numba finds no vector exp
    here: its exp is a call per value, ~6 ns). Cephes' expf: x = k ln 2 + r with
    |r| <= ln 2 / 2, e^r by a degree-7 polynomial, 2^k through the exponent bits;
    within 2 ulp of e^x. x is clamped to [-87.3, 88]: past them e^x is not a
    normal float32 (the results stay finite: 1.2e-38 and 1.7e38). Plain IEEE
    operations, in the order written: every lane rounds alike on every target."""
    vector_type = x.type
    lanes = vector_type.count

    def const(value):
        return constant(vector_type, value)
    fmin = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type] * 2),
                                          f"llvm.minnum.v{lanes}f32")
    fmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type] * 2),
                                          f"llvm.maxnum.v{lanes}f32")
    rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type]),
                                          f"llvm.rint.v{lanes}f32")
    x = builder.call(fmax, [builder.call(fmin, [x, const(88.0)]), const(-87.3)])
    k = builder.call(rint, [builder.fmul(x, const(1.44269504088896341))])
    r = builder.fsub(builder.fsub(x, builder.fmul(k, const(0.693359375))), builder.fmul(k, const(-2.12194440e-4)))
    p = const(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = builder.fadd(builder.fmul(p, r), const(c))
    p = builder.fadd(builder.fadd(builder.fmul(p, builder.fmul(r, r)), r), const(1.0))
    ints = ir.VectorType(ir.IntType(32), lanes)
    power = builder.bitcast(builder.shl(builder.add(builder.fptosi(k, ints), constant(ints, 127)), constant(ints, 23)),
                            vector_type)
    return builder.fmul(p, power)


def field(context, builder, array_type, q, start, shift, bits):
    """(q[start + l] >> shift) & (2^bits - 1) for the 16 lanes l, as 16-bit ints."""
    packed = builder.zext(load_vector(context, builder, array_type, q, start, BYTES16), SHORTS16)
    mask = constant(SHORTS16, (1 << bits) - 1)
    return builder.and_(builder.lshr(packed, splat(builder, shift, SHORTS16)), mask)


f32x16, zeros16, sum16 = float_vector(16)  # the float kernels' running sum


def _dot_flavour() -> str | None:
    """'vnni', 'avx2' or None: the integer dot-product instruction of the CPU that
    numba compiles for (NUMBA_CPU_FEATURES when set, else the host's). Chosen
    before compiling: LLVM aborts the process when asked for an instruction the
    target lacks."""
    if not llvm.get_process_triple().startswith(("x86_64", "i686", "i386")):
        return None
    enabled = _enabled_features()
    if {"avx512vnni", "avx512vl"} <= enabled or "avxvnni" in enabled:
        return "vnni"
    return "avx2" if "avx2" in enabled else None


def _enabled_features() -> set[str]:
    features = numba.config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return {f[1:] for f in features.split(",") if f.startswith("+")}


DOT_FLAVOUR = _dot_flavour()
# 512-bit integer dot products (AVX-512 VNNI with byte and word arithmetic): two
# 32-weight blocks per instruction. AVX-VNNI CPUs (no AVX-512) keep 256 bits.
VNNI_512 = DOT_FLAVOUR == "vnni" and {"avx512vnni", "avx512bw", "avx512f"} <= _enabled_features()
# Byte permutes across a 512-bit register pair (vpermi2b): AQLM's table lookups.
HAS_VBMI = DOT_FLAVOUR is not None and {"avx512vbmi", "avx512bw", "avx512f"} <= _enabled_features()


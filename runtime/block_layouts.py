"""Where the weights and scales of each block type lie in a row: compiled
accessors that the float matvecs, the int8 matvecs and the matmul dequantizer
share, so each layout is written once (the byte layouts themselves are
described in dequant.py, the numpy reference).

Arguments: `qr` is one row's bytes (uint8), `hr` the same bytes as uint16
(the float16 fields, and Q5's 32-bit qh as two halves).

Each K-quant type has a `*_part` function: where sub-block j of super-block b
lies in the row, and its float scales, as (lo, lo_shift, hi, hi_shift,
scale, low). Weight l of the sub-block is scale * (w_l - bias) - low, where
w_l = (qr[lo + l] >> lo_shift) & (2^low_bits - 1), plus, with high bits,
((qr[hi + l] >> hi_shift) & (2^high_bits - 1)) << low_bits; the bit widths
and bias are the type's `*_FIELDS`.
"""

from __future__ import annotations

import numpy as np

from .jit import jit, numba_enabled

if numba_enabled():
    from .simd import f16_to_f32, word32

# (low bits, high bits, bias) of each K-quant's weights
Q2_K_FIELDS = (2, 0, 0)
Q3_K_FIELDS = (2, 1, 4)
Q4_K_FIELDS = (4, 0, 0)
Q5_K_FIELDS = (4, 1, 0)
Q6_K_FIELDS = (4, 2, 32)


@jit()
def block_sums(x, qk):
    """Sum of x over each block of qk: lets Q4_0's -8 and Q4_1's m be applied per block."""
    nb = x.size // qk
    sums = np.empty(nb, np.float32)
    for b in range(nb):
        xb = x[b * qk:b * qk + qk]
        s = np.float32(0.0)
        for j in range(qk):
            s += xb[j]
        sums[b] = s
    return sums


@jit()
def q5_high_bits(hr, i):
    """Q5's 32 fifth bits, stored as the uint16 halves hr[i] (low) and hr[i + 1]."""
    return np.int64(word32(hr, i))


@jit()
def k4_scale_min(q, o, j):
    """Q4_K/Q5_K: scale and min j (0-7) of the 12 packed bytes at q[o], as
    float32 (6 bits each: see dequant._k4_scales_mins)."""
    if j < 4:
        return np.float32(q[o + j] & 63), np.float32(q[o + j + 4] & 63)
    return (np.float32((q[o + j + 4] & 15) | ((q[o + j - 4] >> 6) << 4)),
            np.float32((q[o + j + 4] >> 4) | ((q[o + j] >> 6) << 4)))


@jit()
def k4_scale_min_bytes(q, o):
    """Q4_K/Q5_K: all 8 scales and 8 mins of the 12 packed bytes at q[o] (the
    fields of k4_scale_min), one per byte of two uint64s: byte j is scale j
    (mins). Whole words at once: the top two bits of the first 8 bytes
    complete fields 4-7."""
    a, b, c = word32(q, o), word32(q, o + 4), word32(q, o + 8)
    six, four, two = np.uint64(0x3F3F3F3F), np.uint64(0x0F0F0F0F), np.uint64(0x03030303)
    scales_high = (c & four) | (((a >> np.uint64(6)) & two) << np.uint64(4))
    mins_high = ((c >> np.uint64(4)) & four) | (((b >> np.uint64(6)) & two) << np.uint64(4))
    return (a & six) | (scales_high << np.uint64(32)), (b & six) | (mins_high << np.uint64(32))


@jit()
def q3_k_scale(q, o, j):
    """Q3_K: scale j (0-15) of the 12 packed bytes at q[o], as float32: low 4
    bits in byte j % 8 (low nibble for j < 8), top 2 bits in byte 8 + j % 4 at
    bit 2 (j // 4), stored plus 32."""
    low = (q[o + (j & 7)] >> (4 * (j >> 3))) & 15
    high = (q[o + 8 + (j & 3)] >> (2 * (j >> 2))) & 3
    return np.float32((low | (high << 4)) - 32)


@jit()
def q2_k_part(qr, hr, b, j):
    # 84 bytes: scales[16] (low nibble scale, high nibble min), qs[64], f16 d
    # (hr[42 b + 40]), f16 dmin. Sub-block j, 16 weights: 2-bit field j // 2 % 4
    # of qs[32 (j // 8) + 16 (j % 2) + l].
    o = 84 * b
    sc = qr[o + j]
    return (o + 16 + 32 * (j >> 3) + 16 * (j & 1), 2 * ((j >> 1) & 3), 0, 0,
            f16_to_f32(hr[42 * b + 40]) * np.float32(sc & 15),
            f16_to_f32(hr[42 * b + 41]) * np.float32(sc >> 4))


@jit()
def q3_k_part(qr, hr, b, j):
    # 110 bytes: hmask[32], qs[64], scales[12], f16 d (hr[55 b + 54]). Sub-block
    # j, 16 weights: 2-bit field j // 2 % 4 of qs[32 (j // 8) + 16 (j % 2) + l],
    # over bit j // 2 of hmask[16 (j % 2) + l].
    o = 110 * b
    l0 = 16 * (j & 1)
    return (o + 32 + 32 * (j >> 3) + l0, 2 * ((j >> 1) & 3), o + l0, j >> 1,
            f16_to_f32(hr[55 * b + 54]) * q3_k_scale(qr, o + 96, j), np.float32(0.0))


@jit()
def q4_k_part(qr, hr, b, j):
    # 144 bytes: f16 d (hr[72 b]), f16 dmin, scales[12], qs[128]. Sub-block j,
    # 32 weights: nibble j % 2 of qs[32 (j // 2) + l].
    o = 144 * b
    sc, m = k4_scale_min(qr, o + 4, j)
    return (o + 16 + 32 * (j >> 1), 4 * (j & 1), 0, 0,
            f16_to_f32(hr[72 * b]) * sc, f16_to_f32(hr[72 * b + 1]) * m)


@jit()
def q5_k_part(qr, hr, b, j):
    # 176 bytes: f16 d (hr[88 b]), f16 dmin, scales[12], qh[32], qs[128].
    # Sub-block j, 32 weights: nibble j % 2 of qs[32 (j // 2) + l], over bit j of qh[l].
    o = 176 * b
    sc, m = k4_scale_min(qr, o + 4, j)
    return (o + 48 + 32 * (j >> 1), 4 * (j & 1), o + 16, j,
            f16_to_f32(hr[88 * b]) * sc, f16_to_f32(hr[88 * b + 1]) * m)


@jit()
def q6_k_fields(b, j):
    """Where sub-block j (16 weights) of Q6_K block b keeps its bits: (ql index of its
    first weight, the nibble's shift, qh index, the 2-bit field's shift).
    210 bytes a block: ql[128], qh[64], int8 scales[16], f16 d. Sub-block j lies in
    half n = j // 8 with k = j // 2 % 4: nibble k // 2 of ql[64 n + 32 (k % 2) +
    16 (j % 2) + l], over 2-bit field k of qh[32 n + 16 (j % 2) + l]."""
    o = 210 * b
    n = j >> 3
    k = (j >> 1) & 3
    l0 = 16 * (j & 1)
    return o + 64 * n + 32 * (k & 1) + l0, 4 * (k >> 1), o + 128 + 32 * n + l0, 2 * k


@jit()
def q6_k_part(qr, hr, b, j):
    # q6_k_fields, and the sub-block's scale: d (hr[105 b + 104]) times its int8 scale.
    lo, lo_shift, hi, hi_shift = q6_k_fields(b, j)
    return (lo, lo_shift, hi, hi_shift,
            f16_to_f32(hr[105 * b + 104]) * np.float32(np.int8(qr[210 * b + 192 + j])), np.float32(0.0))

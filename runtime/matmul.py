"""Matrix x matrix for prompts: x (T, ncols) float32 times the weights, in float32.

Each task dequantizes ROW_BLOCK weight rows into a small float32 block (a
cost shared by all T rows of x), then multiplies it by x in 4 x 4 register
tiles (`tiles_4x4`; 16 accumulators: as fast as OpenBLAS sgemm here). x
arrives padded to a multiple of 4 rows. These kernels never call BLAS: numba's
and OpenBLAS's thread pools alternating cost 7-190x.

One `matmul_<type>` per type although their bodies differ only in the
dequantizer they call: numba's on-disk cache cannot store a kernel that closes
over another jitted function (numba issue #6264), and a run must not compile
them again each start. Generating them would hide thirteen 5-line functions
behind a code generator; written out, each reads on its own.
"""

from __future__ import annotations

import numpy as np

from .block_layouts import (Q2_K_FIELDS, Q3_K_FIELDS, Q4_K_FIELDS, Q5_K_FIELDS, Q6_K_FIELDS, q2_k_part,
                            q3_k_part, q4_k_part, q5_k_part, q5_high_bits, q6_k_part)
from .jit import jit, numba_enabled, prange

if numba_enabled():
    from .simd import bf16_to_f32, f16_to_f32


ROW_BLOCK = 8  # weight rows per task; a multiple of the tile's 4


@jit()
def _dequant_rows_f32(w, r0, nr, out):
    """Weight rows r0 .. r0 + nr - 1 as float32 into out[:nr]; one such function per type."""
    for i in range(nr):
        src = w[r0 + i]
        dst = out[i]
        for k in range(src.size):
            dst[k] = src[k]


@jit()
def _dequant_rows_f16(w, r0, nr, out):
    for i in range(nr):
        src = w[r0 + i]
        dst = out[i]
        for k in range(src.size):
            dst[k] = f16_to_f32(src[k])


@jit()
def _dequant_rows_bf16(w, r0, nr, out):
    for i in range(nr):
        src = w[r0 + i]
        dst = out[i]
        for k in range(src.size):
            dst[k] = bf16_to_f32(src[k])


@jit()
def _dequant_rows_q8_0(q, d, r0, nr, out):
    nb = d.shape[1] // 17
    qk = out.shape[1] // nb
    for i in range(nr):
        qr = q[r0 + i]
        dr = d[r0 + i]
        for b in range(nb):
            qb = qr[b * 34 + 2:b * 34 + 34]
            wb = out[i, b * qk:b * qk + qk]
            scale = f16_to_f32(dr[b * 17])
            for j in range(qk):
                wb[j] = scale * np.float32(qb[j])


@jit()
def _dequant_rows_q4_0(q, d, r0, nr, out):
    nb = d.shape[1] // 9
    qk = out.shape[1] // nb
    half = qk // 2
    for i in range(nr):
        qr = q[r0 + i]
        dr = d[r0 + i]
        for b in range(nb):
            qb = qr[b * 18 + 2:b * 18 + 18]
            wb = out[i, b * qk:b * qk + qk]
            scale = f16_to_f32(dr[b * 9])
            for j in range(half):
                wb[j] = scale * (np.float32(qb[j] & 15) - np.float32(8.0))
                wb[j + half] = scale * (np.float32(qb[j] >> 4) - np.float32(8.0))


@jit()
def _dequant_rows_q4_1(q, d, r0, nr, out):
    nb = d.shape[1] // 10
    qk = out.shape[1] // nb
    half = qk // 2
    for i in range(nr):
        qr = q[r0 + i]
        dr = d[r0 + i]
        for b in range(nb):
            qb = qr[b * 20 + 4:b * 20 + 20]
            wb = out[i, b * qk:b * qk + qk]
            scale = f16_to_f32(dr[b * 10])
            low = f16_to_f32(dr[b * 10 + 1])
            for j in range(half):
                wb[j] = scale * np.float32(qb[j] & 15) + low
                wb[j + half] = scale * np.float32(qb[j] >> 4) + low


@jit()
def _unpack_q5(qr, start, qh, scale, bias, low, out):
    """One Q5 block into out (32 floats): scale * (w - bias) + low (see _q5_block_fma)."""
    half = out.size // 2
    qb = qr[start:start + half]
    for j in range(half):
        out[j] = scale * np.float32(((qb[j] & 15) | (((qh >> j) & 1) << 4)) - bias) + low
        out[j + half] = scale * np.float32(((qb[j] >> 4) | (((qh >> (j + half)) & 1) << 4)) - bias) + low


@jit()
def _dequant_rows_q5_0(q, h, r0, nr, out):
    nb = h.shape[1] // 11
    qk = out.shape[1] // nb
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            _unpack_q5(qr, 22 * b + 6, q5_high_bits(hr, 11 * b + 1), f16_to_f32(hr[11 * b]), 16, np.float32(0.0),
                       out[i, b * qk:b * qk + qk])


@jit()
def _dequant_rows_q5_1(q, h, r0, nr, out):
    nb = h.shape[1] // 12
    qk = out.shape[1] // nb
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            _unpack_q5(qr, 24 * b + 8, q5_high_bits(hr, 12 * b + 2), f16_to_f32(hr[12 * b]), 0,
                       f16_to_f32(hr[12 * b + 1]), out[i, b * qk:b * qk + qk])


@jit()
def _unpack_k(qr, part, fields, out):
    """A K-quant sub-block into out (16 or 32 floats), given its _part and the type's _FIELDS."""
    lo, lo_shift, hi, hi_shift, scale, low = part
    low_bits, high_bits, bias = fields
    ql = qr[lo:lo + out.size]
    qh = qr[hi:hi + out.size]
    for l in range(out.size):
        w = ((ql[l] >> lo_shift) & ((1 << low_bits) - 1)) | (((qh[l] >> hi_shift) & ((1 << high_bits) - 1)) << low_bits)
        out[l] = scale * np.float32(w - bias) - low


@jit()
def _dequant_rows_q2_k(q, h, r0, nr, out):
    nb = h.shape[1] // 42
    sub = out.shape[1] // (16 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(16):
                k = 16 * b + j
                _unpack_k(qr, q2_k_part(qr, hr, b, j), Q2_K_FIELDS, out[i, sub * k:sub * k + sub])


@jit()
def _dequant_rows_q3_k(q, h, r0, nr, out):
    nb = h.shape[1] // 55
    sub = out.shape[1] // (16 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(16):
                k = 16 * b + j
                _unpack_k(qr, q3_k_part(qr, hr, b, j), Q3_K_FIELDS, out[i, sub * k:sub * k + sub])


@jit()
def _dequant_rows_q4_k(q, h, r0, nr, out):
    nb = h.shape[1] // 72
    sub = out.shape[1] // (8 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(8):
                k = 8 * b + j
                _unpack_k(qr, q4_k_part(qr, hr, b, j), Q4_K_FIELDS, out[i, sub * k:sub * k + sub])


@jit()
def _dequant_rows_q5_k(q, h, r0, nr, out):
    nb = h.shape[1] // 88
    sub = out.shape[1] // (8 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(8):
                k = 8 * b + j
                _unpack_k(qr, q5_k_part(qr, hr, b, j), Q5_K_FIELDS, out[i, sub * k:sub * k + sub])


@jit()
def _dequant_rows_q6_k(q, h, r0, nr, out):
    nb = h.shape[1] // 105
    sub = out.shape[1] // (16 * nb)
    for i in range(nr):
        qr = q[r0 + i]
        hr = h[r0 + i]
        for b in range(nb):
            for j in range(16):
                k = 16 * b + j
                _unpack_k(qr, q6_k_part(qr, hr, b, j), Q6_K_FIELDS, out[i, sub * k:sub * k + sub])


@jit()
def _store4(out, t, r, s0, s1, s2, s3, valid):
    """Write one weight row's results for columns t..t+3 (skipping the padding rows)."""
    if valid:
        out[t, r] = s0
        out[t + 1, r] = s1
        out[t + 2, r] = s2
        out[t + 3, r] = s3


@jit()
def tiles_4x4(w, nr, x, out, r0):
    """out[t, r0 + i] = w[i] . x[t] for i < nr; w has ROW_BLOCK rows, x a multiple of 4."""
    n = x.shape[1]
    for i in range(0, w.shape[0], 4):
        w0 = w[i]
        w1 = w[i + 1]
        w2 = w[i + 2]
        w3 = w[i + 3]
        for t in range(0, x.shape[0], 4):
            x0 = x[t]
            x1 = x[t + 1]
            x2 = x[t + 2]
            x3 = x[t + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for k in range(n):
                a0, a1, a2, a3 = w0[k], w1[k], w2[k], w3[k]
                b0, b1, b2, b3 = x0[k], x1[k], x2[k], x3[k]
                s00 += a0 * b0; s01 += a0 * b1; s02 += a0 * b2; s03 += a0 * b3  # noqa: E702
                s10 += a1 * b0; s11 += a1 * b1; s12 += a1 * b2; s13 += a1 * b3  # noqa: E702
                s20 += a2 * b0; s21 += a2 * b1; s22 += a2 * b2; s23 += a2 * b3  # noqa: E702
                s30 += a3 * b0; s31 += a3 * b1; s32 += a3 * b2; s33 += a3 * b3  # noqa: E702
            _store4(out, t, r0 + i, s00, s01, s02, s03, i < nr)
            _store4(out, t, r0 + i + 1, s10, s11, s12, s13, i + 1 < nr)
            _store4(out, t, r0 + i + 2, s20, s21, s22, s23, i + 2 < nr)
            _store4(out, t, r0 + i + 3, s30, s31, s32, s33, i + 3 < nr)


@jit()
def _n_tasks(rows):
    return (rows + ROW_BLOCK - 1) // ROW_BLOCK


@jit()
def _task(blk, rows, ncols):
    """Task `blk`'s first row, its row count, and a float32 block for its rows,
    zeroed: garbage in the padding rows could be denormals, which are slow."""
    r0 = blk * ROW_BLOCK
    return r0, min(ROW_BLOCK, rows - r0), np.zeros((ROW_BLOCK, ncols), np.float32)


@jit(parallel=True)
def matmul_f32(w, x, out):
    for blk in prange(_n_tasks(w.shape[0])):
        r0, nr, block = _task(blk, w.shape[0], x.shape[1])
        _dequant_rows_f32(w, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_f16(w, x, out):
    for blk in prange(_n_tasks(w.shape[0])):
        r0, nr, block = _task(blk, w.shape[0], x.shape[1])
        _dequant_rows_f16(w, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_bf16(w, x, out):
    for blk in prange(_n_tasks(w.shape[0])):
        r0, nr, block = _task(blk, w.shape[0], x.shape[1])
        _dequant_rows_bf16(w, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q8_0(q, d, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q8_0(q, d, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q4_0(q, d, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q4_0(q, d, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q4_1(q, d, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q4_1(q, d, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q5_0(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q5_0(q, h, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q5_1(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q5_1(q, h, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q2_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q2_k(q, h, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q3_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q3_k(q, h, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q4_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q4_k(q, h, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q5_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q5_k(q, h, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)


@jit(parallel=True)
def matmul_q6_k(q, h, x, out):
    for blk in prange(_n_tasks(q.shape[0])):
        r0, nr, block = _task(blk, q.shape[0], x.shape[1])
        _dequant_rows_q6_k(q, h, r0, nr, block)
        tiles_4x4(block, nr, x, out, r0)

"""Which GGML type each tensor gets under a --quantize scheme, and the numpy
quantizers that produce llama.cpp's bytes.

Rules (after llama.cpp's llama_tensor_get_type, simplified):
- 1-D tensors (norms, biases, RoPE factors) stay F32: they are tiny and the
  runtime reads them as F32.
- keep: the source's own type (F64 becomes F32).
- f16, bf16, q8_0: every matrix gets that type.
- q4_0, q4_1, q5_0, q4_k: the token embedding and the output head (one tensor
  when tied) get Q6_K, because low-bit errors there reach every token; q4_k
  also gives Q6_K to attn_v and ffn_down, as llama.cpp's Q4_K_M does.
- q6_k: every matrix Q6_K.
- A row width that is not a whole number of blocks falls back: K-quants (256
  wide) to Q5_0 (from Q4_K) or Q8_0 (from Q6_K), 32-wide types to F16.

Q8_0, Q4_0, Q4_1, Q5_0 and BF16 come from gguf-py's reference quantizers, which
reproduce ggml-quants.c bit for bit; Q4_K and Q6_K are written here after
quantize_row_q4_K_ref / quantize_row_q6_K_ref, vectorised over blocks, with
sums accumulated in the same order in float32 so the bytes are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants

from ..runtime.ggml_types import BLOCK_GEOMETRY, GGMLType

SCHEMES = ("keep", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q6_k")
_SCHEME_TYPES = {"f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0,
                 "q4_1": GGMLType.Q4_1, "q5_0": GGMLType.Q5_0, "q4_k": GGMLType.Q4_K, "q6_k": GGMLType.Q6_K}
_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q6_K: GGMLType.Q8_0}
_HEADS = ("token_embd.weight", "output.weight")
GROUP_MAX_EPS = np.float32(1e-15)
QK_K = 256
# Rows quantized per numpy batch: bounds the temporaries of the K-quant search.
_BATCH_WEIGHTS = 1 << 20


def target_type(name: str, shape: tuple[int, ...], source: GGMLType, scheme: str) -> GGMLType:
    """The type tensor `name` (numpy shape) is stored as under `scheme`."""
    if len(shape) < 2:
        return GGMLType.F32
    if scheme == "keep":
        return GGMLType.F32 if source == GGMLType.F64 else source
    wanted = _SCHEME_TYPES[scheme]
    if scheme in ("q4_0", "q4_1", "q5_0", "q4_k") and name in _HEADS:
        wanted = GGMLType.Q6_K
    elif scheme == "q4_k" and name.endswith(("attn_v.weight", "ffn_down.weight")):
        wanted = GGMLType.Q6_K
    cols = shape[-1]
    if cols % BLOCK_GEOMETRY[wanted][0]:
        wanted = _FALLBACK.get(wanted, GGMLType.F16)
    if cols % BLOCK_GEOMETRY[wanted][0]:
        wanted = GGMLType.F16
    return wanted


def quantize(data: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """float32 (rows, cols) or (n,) -> the stored form: float32/float16 values, or
    uint8 bytes of shape (rows, bytes per row) for block and BF16 types."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == GGMLType.F32:
        return data
    if ggml_type == GGMLType.F16:
        return data.astype(np.float16)
    rows = data.reshape(-1, data.shape[-1])
    if ggml_type == GGMLType.Q4_K:
        return _batched(rows, _q4_k, BLOCK_GEOMETRY[ggml_type][1])
    if ggml_type == GGMLType.Q6_K:
        return _batched(rows, _q6_k, BLOCK_GEOMETRY[ggml_type][1])
    return gguf_quants.quantize(rows, QT(int(ggml_type)))


def quantize_rows(raw: np.ndarray, to_float32: Callable[[np.ndarray], np.ndarray], ggml_type: GGMLType) -> np.ndarray:
    """Quantize stored rows `raw` (rows, ...) batch by batch: `to_float32` decodes a
    batch of rows to float32 (rows, cols). Only the output and one batch's
    temporaries are in memory at once, however large the tensor."""
    n_rows = raw.shape[0]
    step = max(1, _BATCH_WEIGHTS * 16 // max(1, raw[:1].size * max(1, raw.dtype.itemsize)))
    out = None
    for start in range(0, n_rows, step):
        chunk = quantize(to_float32(raw[start:start + step]), ggml_type)
        if out is None:
            out = np.empty((n_rows,) + chunk.shape[1:], chunk.dtype)
        out[start:start + len(chunk)] = chunk
    return out if out is not None else quantize(to_float32(raw), ggml_type)


def _batched(rows: np.ndarray, quantize_blocks: Callable[[np.ndarray], np.ndarray], block_bytes: int) -> np.ndarray:
    """K-quant rows a batch at a time: the search's temporaries are many times the input."""
    n_rows, cols = rows.shape
    if cols % QK_K:
        raise ValueError(f"K-quant rows must be a multiple of {QK_K} wide, got {cols}")
    step = max(1, _BATCH_WEIGHTS // cols)
    out = [quantize_blocks(rows[i:i + step].reshape(-1, QK_K)).reshape(min(step, n_rows - i), -1)
           for i in range(0, n_rows, step)]
    return np.concatenate(out) if out else np.zeros((0, cols // QK_K * block_bytes), np.uint8)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even, in float32."""
    return np.rint(x).astype(np.int32)


def _sum_in_order(terms: np.ndarray) -> np.ndarray:
    """Sum (n, groups) over n one term after another, as a C loop adds: numpy
    reduces a non-contiguous axis row by row (pairwise summation is only for the
    contiguous one), which the byte-for-byte tests against ggml confirm."""
    return np.add.reduce(terms, axis=0, dtype=np.float32)


def _f16_round(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the float16 bits, their value back in float32)."""
    half = x.astype(np.float16)
    return half, half.astype(np.float32)


# --- Q6_K ---------------------------------------------------------------------------

def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) for each row of x (groups, n):
    (scale per group, L per weight in 0..2*nmax-1). Works on the transpose, so
    that the i-th weights of all groups, which the C loop adds in turn, are
    contiguous."""
    f32 = np.float32
    first_max = np.argmax(np.abs(x), axis=1)  # the first index holding the largest |x|, as the strict > loop
    vmax = x[np.arange(len(x)), first_max]
    zero = np.abs(vmax) < GROUP_MAX_EPS
    safe_max = np.where(zero, f32(1), vmax)
    xt = np.ascontiguousarray(x.T)
    wx = xt * xt * xt  # w * x with w = x * x, as the C code multiplies

    def try_scale(iscale: np.ndarray):
        q = np.clip(_nearest_int(iscale * xt), -nmax, nmax - 1)
        qf = q.astype(f32)
        wq = xt * xt * qf
        return q, _sum_in_order(wx * qf), _sum_in_order(wq * qf)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = -f32(nmax) / safe_max
        q, sumlx, suml2 = try_scale(iscale)
        L = q + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0)).astype(f32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(f32(nmax) + f32(0.1) * f32(step)) / safe_max
            q, sumlx, suml2 = try_scale(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, q + nmax, L)
            new_scale = np.where(better, sumlx / suml2, scale).astype(f32)
            best = np.where(better, new_scale * sumlx, best).astype(f32)
            scale = new_scale
    scale = np.where(zero, f32(0), scale)
    L = np.where(zero, 0, L)
    return scale, L.T


def _q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref over blocks x (blocks, 256) -> (blocks, 210) bytes."""
    f32 = np.float32
    nb = len(x)
    scales, L = _make_qx_quants_rmse1(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 256)
    first = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(nb), first]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(empty, f32(1), -f32(128) / np.where(empty, f32(1), max_scale)).astype(f32)
        d_bits, d = _f16_round((f32(1) / iscale).astype(f32))
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
        dj = (d[:, None] * sc.astype(f32)).astype(f32)  # (nb, 16)
        xs = x.reshape(nb, 16, 16)
        q = np.clip(_nearest_int(xs / dj[:, :, None]), -32, 31) + 32
    L = np.where((dj != 0)[:, :, None], q, L.reshape(nb, 16, 16)).reshape(nb, 2, 4, 32).astype(np.uint8)
    # per 128 weights: ql[64] packs quarters (0,2) and (1,3) as nibbles, qh[32] their top 2 bits
    ql = np.concatenate([L[:, :, 0] & 0xF | (L[:, :, 2] & 0xF) << 4,
                         L[:, :, 1] & 0xF | (L[:, :, 3] & 0xF) << 4], axis=2).reshape(nb, 128)
    qh = (L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6).reshape(nb, 64)
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    d_bits = np.where(empty, np.float16(0), d_bits)
    ql = np.where(empty[:, None], 0, ql).astype(np.uint8)
    qh = np.where(empty[:, None], 0, qh).astype(np.uint8)
    return np.concatenate([ql, qh, sc.view(np.uint8), d_bits.reshape(nb, 1).view(np.uint8)], axis=1)


# --- Q4_K ---------------------------------------------------------------------------

def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(..., use_mad=false) for each row of x (groups, n):
    (scale, -min, L in 0..nmax). Works on the transposes, as _make_qx_quants_rmse1."""
    f32 = np.float32
    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(weights.T)
    vmin = np.minimum(x.min(axis=1), f32(0))
    vmax = x.max(axis=1)
    sum_w, sum_x = _sum_in_order(wt), _sum_in_order(wt * xt)
    flat = vmax == vmin

    def squared_error(scale: np.ndarray, minimum: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = scale * lf + minimum - xt
        return _sum_in_order(wt * (diff * diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = np.where(flat, f32(1), vmax - vmin)
        iscale = f32(nmax) / span
        scale = f32(1) / iscale
        L = np.clip(_nearest_int(iscale * (xt - vmin)), 0, nmax)
        best_error = squared_error(scale, vmin, L.astype(f32))
        for step in range(nstep + 1):
            # the C code moves `min` to each better solution, and later steps start from it
            span = np.where(flat, f32(1), vmax - vmin)
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
            laux = np.clip(_nearest_int(iscale * (xt - vmin)), 0, nmax)
            lf = laux.astype(f32)
            wl = wt * lf
            wll, wlx = wl * lf, wl * xt
            sum_l, sum_l2, sum_xl = _sum_in_order(wl), _sum_in_order(wll), _sum_in_order(wlx)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, f32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur_error = squared_error(this_scale, this_min, lf)
            better = (D > 0) & (cur_error < best_error)
            L = np.where(better, laux, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            vmin = np.where(better, this_min, vmin)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat, 0, L)
    return scale.astype(f32), (-vmin).astype(f32), L.T


def _q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref over blocks x (blocks, 256) -> (blocks, 144) bytes."""
    f32 = np.float32
    nb = len(x)
    groups = x.reshape(nb * 8, 32)
    sum_x2 = np.zeros(len(groups), f32)
    for i in range(32):
        sum_x2 += groups[:, i] * groups[:, i]
    av_x = np.sqrt(sum_x2 / f32(32))
    weights = av_x[:, None] + np.abs(groups)
    scales, mins, L = _make_qkx2_quants(groups, weights, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
        inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
        # the C code stores nearest_int's result in a uint8 before taking min(63, .)
        ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
        lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
        d_bits, d = _f16_round((max_scale / f32(63)).astype(f32))
        dmin_bits, dmin = _f16_round((max_min / f32(63)).astype(f32))
        dj = (d[:, None] * ls.astype(f32)).astype(f32)
        dmj = (dmin[:, None] * lm.astype(f32)).astype(f32)
        q = np.clip(_nearest_int((x.reshape(nb, 8, 32) + dmj[:, :, None]) / dj[:, :, None]), 0, 15)
    L = np.where((dj != 0)[:, :, None], q, L).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4
    # per 64 weights: 32 bytes, the first 32 weights in the low nibbles
    L = L.reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | L[:, :, 1] << 4).reshape(nb, 128)
    return np.concatenate([d_bits.reshape(nb, 1).view(np.uint8), dmin_bits.reshape(nb, 1).view(np.uint8),
                           packed, qs], axis=1)

"""Plain numpy dequantizers: GGML weight bytes -> float32.

The reference the kernels are tested against, and the arithmetic of the numpy
fallback path. Each function takes uint8 rows (rows, row_bytes) in llama.cpp's
block layout and returns a new float32 array (rows, ncols); weight_types.py
names the one for each type (its `dequantize` checks the rows first).

Block layouts (llama.cpp's ggml-common.h; all little-endian). 32 weights per block:
    Q8_0: f16 d, 32 x int8 q                         w = q * d
    Q4_0: f16 d, 16 bytes: byte j holds weight j in its low nibble and
          weight j + 16 in its high nibble            w = (q - 8) * d
    Q4_1: f16 d, f16 m, 16 nibble bytes as Q4_0       w = q * d + m
    Q5_0: f16 d, u32 qh, 16 nibble bytes as Q4_0; bit j of qh is bit 4 of
          weight j                                    w = (q - 16) * d
    Q5_1: f16 d, f16 m, u32 qh, 16 nibble bytes       w = q * d + m

K-quants: super-blocks of 256 weights, in sub-blocks of 16 or 32 that each have
a small integer scale (and min), times the super-block's f16 d (and dmin).
Their packed arrays fill bytes field-major: each run of R bytes holds
8 / width * R consecutive weights, the first R in the lowest `width` bits of
its bytes, the next R in the bits above, and so on.
    Q2_K: scales[16] (low nibble scale, high nibble min, per 16 weights),
          qs[64] (2-bit, R = 32), f16 d, f16 dmin      w = d sc q - dmin m
    Q3_K: hmask[32] (bit 2 of q, R = 32), qs[64] (bits 0-1, R = 32),
          scales[12] (16 6-bit scales, see _q3_k_scales), f16 d
                                                       w = d (sc - 32) (q - 4)
    Q4_K: f16 d, f16 dmin, scales[12] (8 6-bit scales and 8 6-bit mins, per
          32 weights, see _k4_scales_mins), qs[128] (4-bit, R = 32)
                                                       w = d sc q - dmin m
    Q5_K: as Q4_K with qh[32] (bit 4 of q, R = 32) before qs
    Q6_K: ql[128] (bits 0-3, R = 64), qh[64] (bits 4-5, R = 32), int8
          scales[16] (per 16 weights), f16 d            w = d sc (q - 32)
"""

from __future__ import annotations

import numpy as np

from .ggml_types import BLOCK_GEOMETRY, GGMLType


def f32(raw: np.ndarray, ncols: int) -> np.ndarray:
    return raw.view("<f4").astype(np.float32)


def f16(raw: np.ndarray, ncols: int) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def bf16(raw: np.ndarray, ncols: int) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _blocks(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """View the rows as (rows, blocks, bytes per block)."""
    type_size = BLOCK_GEOMETRY[ggml_type][1]
    return raw.reshape(raw.shape[0], -1, type_size)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at `offset` in every block, as float32 of shape (rows, blocks, 1)."""
    return blocks[:, :, offset:offset + 2].copy().view("<f2").astype(np.float32)


def _fields(packed: np.ndarray, width: int, run: int) -> np.ndarray:
    """Unpack the last axis of `packed` (uint8) into its `width`-bit fields, in
    weight order: each run of `run` bytes holds its lowest fields first."""
    runs = packed.reshape(*packed.shape[:-1], -1, 1, run)
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(-1, 1)
    fields = (runs >> shifts) & np.uint8((1 << width) - 1)
    return fields.reshape(*packed.shape[:-1], -1)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """16 packed bytes per block -> 32 values 0..15: low nibbles first, then high."""
    return _fields(packed, 4, 16)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 qh bytes per block -> bit 4 (16 or 0) of each of the 32 weights."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4)


def q8_0(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q8_0)
    q = blocks[:, :, 2:].view(np.int8)
    return (q * _f16_field(blocks, 0)).reshape(raw.shape[0], ncols)


def q4_0(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q4_0)
    q = _nibbles(blocks[:, :, 2:]).astype(np.int8) - 8
    return (q * _f16_field(blocks, 0)).reshape(raw.shape[0], ncols)


def q4_1(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q4_1)
    q = _nibbles(blocks[:, :, 4:])
    return (q * _f16_field(blocks, 0) + _f16_field(blocks, 2)).reshape(raw.shape[0], ncols)


def q5_0(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q5_0)
    q = (_nibbles(blocks[:, :, 6:]) | _fifth_bits(blocks[:, :, 2:6])).astype(np.int8) - 16
    return (q * _f16_field(blocks, 0)).reshape(raw.shape[0], ncols)


def q5_1(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q5_1)
    q = _nibbles(blocks[:, :, 8:]) | _fifth_bits(blocks[:, :, 4:8])
    return (q * _f16_field(blocks, 0) + _f16_field(blocks, 2)).reshape(raw.shape[0], ncols)


def _sub_blocks(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None = None) -> np.ndarray:
    """K-quant weights scale * q (- minimum) as float32 rows: q (rows, blocks,
    256) quants, scale and minimum (rows, blocks, sub-blocks) float32."""
    rows, nb, n = q.shape
    w = scale[..., None] * q.reshape(rows, nb, scale.shape[-1], -1)
    if minimum is not None:
        w -= minimum[..., None]
    return w.reshape(rows, nb * n)


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> 8 6-bit scales and 8 6-bit mins. Bytes 0-3
    hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales and mins
    4-7 take their low 4 bits from bytes 8-11 (low and high nibble) and their
    top 2 bits from the top of bytes 0-3 and 4-7."""
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low & 63, (high & 15) | (low >> 6 << 4)], axis=-1)
    mins = np.concatenate([mid & 63, (high >> 4) | (mid >> 6 << 4)], axis=-1)
    return scales, mins


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes -> 16 signed scales: low 4 bits from bytes 0-7
    (R = 8), top 2 bits from bytes 8-11 (R = 4), stored plus 32."""
    sc = _fields(packed[..., :8], 4, 8) | (_fields(packed[..., 8:], 2, 4) << np.uint8(4))
    return sc.astype(np.int8) - np.int8(32)


def q2_k(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q2_K)
    scales = blocks[:, :, :16]
    q = _fields(blocks[:, :, 16:80], 2, 32)
    return _sub_blocks(q, _f16_field(blocks, 80) * (scales & 15), _f16_field(blocks, 82) * (scales >> 4))


def q3_k(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q3_K)
    q = _fields(blocks[:, :, 32:96], 2, 32) | (_fields(blocks[:, :, :32], 1, 32) << np.uint8(2))
    q = q.astype(np.int8) - 4
    return _sub_blocks(q, _f16_field(blocks, 108) * _q3_k_scales(blocks[:, :, 96:108]))


def q4_k(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q4_K)
    scales, mins = _k4_scales_mins(blocks[:, :, 4:16])
    q = _fields(blocks[:, :, 16:], 4, 32)
    return _sub_blocks(q, _f16_field(blocks, 0) * scales, _f16_field(blocks, 2) * mins)


def q5_k(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q5_K)
    scales, mins = _k4_scales_mins(blocks[:, :, 4:16])
    q = _fields(blocks[:, :, 48:], 4, 32) | (_fields(blocks[:, :, 16:48], 1, 32) << np.uint8(4))
    return _sub_blocks(q, _f16_field(blocks, 0) * scales, _f16_field(blocks, 2) * mins)


def q6_k(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q6_K)
    q = _fields(blocks[:, :, :128], 4, 64) | (_fields(blocks[:, :, 128:192], 2, 32) << np.uint8(4))
    q = q.astype(np.int8) - 32
    return _sub_blocks(q, _f16_field(blocks, 208) * blocks[:, :, 192:208].view(np.int8))

"""Plain numpy dequantizers: GGML weight bytes -> float32.

The reference the kernels are tested against, and the arithmetic of the numpy
fallback path. Each function takes uint8 rows (rows, row_bytes) in llama.cpp's
block layout and returns a new float32 array (rows, ncols). Supporting another
type means writing one function and adding it to `DEQUANTIZERS`.

Block layouts (32 weights per block, all little-endian):
    Q8_0: f16 d, 32 x int8 q                         w = q * d
    Q4_0: f16 d, 16 bytes: byte j holds weight j in its low nibble and
          weight j + 16 in its high nibble            w = (q - 8) * d
    Q4_1: f16 d, f16 m, 16 nibble bytes as Q4_0       w = q * d + m
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .ggml_types import BLOCK_GEOMETRY, GGMLType, row_bytes


def _f32(raw: np.ndarray, ncols: int) -> np.ndarray:
    return raw.view("<f4").astype(np.float32)


def _f16(raw: np.ndarray, ncols: int) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def _bf16(raw: np.ndarray, ncols: int) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _blocks(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """View the rows as (rows, blocks, bytes per block)."""
    type_size = BLOCK_GEOMETRY[ggml_type][1]
    return raw.reshape(raw.shape[0], -1, type_size)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at `offset` in every block, as float32 of shape (rows, blocks, 1)."""
    return blocks[:, :, offset:offset + 2].copy().view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """16 packed bytes per block -> 32 values 0..15: low nibbles first, then high."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _q8_0(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q8_0)
    q = blocks[:, :, 2:].view(np.int8)
    return (q * _f16_field(blocks, 0)).reshape(raw.shape[0], ncols)


def _q4_0(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q4_0)
    q = _nibbles(blocks[:, :, 2:]).astype(np.int8) - 8
    return (q * _f16_field(blocks, 0)).reshape(raw.shape[0], ncols)


def _q4_1(raw: np.ndarray, ncols: int) -> np.ndarray:
    blocks = _blocks(raw, GGMLType.Q4_1)
    q = _nibbles(blocks[:, :, 4:])
    return (q * _f16_field(blocks, 0) + _f16_field(blocks, 2)).reshape(raw.shape[0], ncols)


DEQUANTIZERS: dict[GGMLType, Callable[[np.ndarray, int], np.ndarray]] = {
    GGMLType.F32: _f32,
    GGMLType.F16: _f16,
    GGMLType.BF16: _bf16,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
}


def check_raw(raw: np.ndarray, ggml_type: GGMLType, ncols: int) -> None:
    """Raise ValueError unless `raw` holds uint8 rows of `ncols` weights of `ggml_type`."""
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"expected uint8 rows (rows, row_bytes), got {raw.dtype} of shape {raw.shape}")
    expected = row_bytes(ggml_type, ncols)
    if raw.shape[1] != expected:
        raise ValueError(f"{ggml_type.name} rows of {ncols} weights take {expected} bytes, got {raw.shape[1]}")


def dequantize(raw: np.ndarray, ggml_type: GGMLType, ncols: int) -> np.ndarray:
    """Decode uint8 rows (rows, row_bytes) of `ggml_type` into float32 (rows, ncols)."""
    ggml_type = GGMLType(ggml_type)
    if ggml_type not in DEQUANTIZERS:
        supported = ", ".join(t.name for t in DEQUANTIZERS)
        raise ValueError(f"tensor type {ggml_type.name} is not supported (supported: {supported})")
    check_raw(raw, ggml_type, ncols)
    return DEQUANTIZERS[ggml_type](raw, ncols)

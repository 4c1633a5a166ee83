"""The weight types the runtime computes with: one row per type, as llama.cpp keeps `type_traits`.

Each row says how a tensor's bytes are viewed by the kernels (zero-copy),
which kernels multiply it (float matvec, int8 matvec or none, matmul) and
which numpy function dequantizes it (the reference and the numpy path). The
block geometry of every GGUF type, computable or not, is in ggml_types.py.

Adding a quant type: its layout accessors (block_layouts.py, when the kernels
share them), its kernels (float_matvec.py, matmul.py and, if the integer
instruction suits it, int8_matvec.py), its numpy dequantizer (dequant.py), one
row here, and a case in tests/test_kernels.py (every row is tested on every path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import dequant, float_matvec, int8_batch, int8_gemm, int8_matvec, matmul
from .ggml_types import GGMLType, row_bytes

FLOAT_SWITCH = "LLAMAZIP_FLOAT_MATVEC"  # =1: decode with x in float32 (slower; closest to a float reference)


@dataclass(frozen=True)
class WeightType:
    ggml_type: GGMLType
    views: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # the kernels' arguments, from the uint8 rows
    float_matvec: Callable  # (*views, x, out): out = W x, x float32
    int8_matvec: Callable | None  # same arguments; x rounded to int8 per 32 (None: the type has none)
    int8_matmul: Callable | None  # (*views, x, out): out = x W^T for 2-16 rows of x, each row as int8_matvec's
    matmul: Callable  # (*views, x, out): out = x W^T, x (T padded to 4, ncols)
    int8_gemm: Callable | None  # (*views, *int8_gemm.quantize_rows(x), out): a prompt's x W^T, integer products
    dequantize: Callable[[np.ndarray, int], np.ndarray]  # (uint8 rows, ncols) -> float32 rows

    def decode_matvec(self) -> tuple[Callable, bool]:
        """The matvec decoding runs on this machine, and whether it rounds x to int8."""
        if self.int8_matvec is not None and int8_matvec.AVAILABLE and os.environ.get(FLOAT_SWITCH) != "1":
            return self.int8_matvec, True
        return self.float_matvec, False

    def prompt_gemm(self) -> Callable | None:
        """The integer product prompts run on this machine, or None: they stay in float32
        (no 512-bit VNNI, or decoding itself is in float)."""
        if self.int8_gemm is not None and int8_gemm.AVAILABLE and self.decode_matvec()[1]:
            return self.int8_gemm
        return None


def _whole(dtype: str):
    return lambda raw: (raw.view(dtype),)


def _quants_and_halves(quant_dtype: str):
    """The block bytes as `quant_dtype`, and the same bytes as uint16 for the f16 fields."""
    return lambda raw: (raw.view(quant_dtype), raw.view("<u2"))


def _row(ggml_type: GGMLType, views: Callable, int8: Callable | None) -> WeightType:
    """A type's row: its float matvec, matmul, dequantizer and (with an int8 matvec)
    batched int8 product and prompt product are named after it in their modules."""
    name = ggml_type.name.lower()
    int8_matmul = getattr(int8_batch, f"matmul_{name}") if int8 is not None else None
    gemm = getattr(int8_gemm, f"gemm_{name}") if int8 is not None else None
    return WeightType(ggml_type, views, getattr(float_matvec, f"matvec_{name}"), int8, int8_matmul,
                      getattr(matmul, f"matmul_{name}"), gemm, getattr(dequant, name))


WEIGHT_TYPES: dict[GGMLType, WeightType] = {row.ggml_type: row for row in (
    _row(GGMLType.F32, _whole("<f4"), None),
    _row(GGMLType.F16, _whole("<u2"), None),
    _row(GGMLType.BF16, _whole("<u2"), None),
    _row(GGMLType.Q8_0, _quants_and_halves("i1"), int8_matvec.matvec_q8_0),
    _row(GGMLType.Q4_0, _quants_and_halves("u1"), int8_matvec.matvec_q4_0),
    _row(GGMLType.Q4_1, _quants_and_halves("u1"), int8_matvec.matvec_q4_1),
    _row(GGMLType.Q5_0, _quants_and_halves("u1"), int8_matvec.matvec_q5_0),
    _row(GGMLType.Q5_1, _quants_and_halves("u1"), int8_matvec.matvec_q5_1),
    _row(GGMLType.Q2_K, _quants_and_halves("u1"), None),
    _row(GGMLType.Q3_K, _quants_and_halves("u1"), None),
    _row(GGMLType.Q4_K, _quants_and_halves("u1"), int8_matvec.matvec_q4_k),
    _row(GGMLType.Q5_K, _quants_and_halves("u1"), int8_matvec.matvec_q5_k),
    _row(GGMLType.Q6_K, _quants_and_halves("u1"), int8_matvec.matvec_q6_k),
)}


def weight_type(ggml_type: GGMLType) -> WeightType:
    """The row of `ggml_type`; ValueError naming the supported types when it has none."""
    ggml_type = GGMLType(ggml_type)
    if ggml_type not in WEIGHT_TYPES:
        supported = ", ".join(t.name for t in sorted(WEIGHT_TYPES))
        raise ValueError(f"tensor type {ggml_type.name} is not supported (supported: {supported})")
    return WEIGHT_TYPES[ggml_type]


def check_raw(raw: np.ndarray, ggml_type: GGMLType, ncols: int) -> None:
    """Raise ValueError unless `raw` holds uint8 rows of `ncols` weights of `ggml_type`."""
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"expected uint8 rows (rows, row_bytes), got {raw.dtype} of shape {raw.shape}")
    expected = row_bytes(ggml_type, ncols)
    if raw.shape[1] != expected:
        raise ValueError(f"{ggml_type.name} rows of {ncols} weights take {expected} bytes, got {raw.shape[1]}")


def dequantize(raw: np.ndarray, ggml_type: GGMLType, ncols: int) -> np.ndarray:
    """Decode uint8 rows (rows, row_bytes) of `ggml_type` into float32 (rows, ncols), with numpy."""
    row = weight_type(ggml_type)
    check_raw(raw, row.ggml_type, ncols)
    return row.dequantize(raw, ncols)


"""Weight rows in GGML encodings for the kernel tests and bench/kernels.py.

gguf-py quantizes the 32-weight types like llama.cpp does; it cannot quantize
the K-quants (NotImplementedError in gguf 0.19), so those rows are random bits
with small finite float16 scales: every bit pattern of the quants and packed
sub-block scales is fair game for a decoder.
"""

from __future__ import annotations

import gguf
import numpy as np

from llamazip.runtime.ggml_types import BLOCK_GEOMETRY, GGMLType, row_bytes

# Byte offsets of the float16 fields (d, dmin) in a block, for the types gguf-py cannot quantize.
F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}


def quantized(ggml_type: GGMLType, rows: int, ncols: int, seed: int = 0) -> np.ndarray:
    """Realistic uint8 rows (rows, row_bytes) whose scales vary 1000x from row to row:
    random weights quantized by gguf-py, or random blocks where it cannot."""
    rng = np.random.default_rng(seed)
    row_scale = np.float32(10.0) ** rng.uniform(-2, 1, (rows, 1)).astype(np.float32)
    if ggml_type in F16_FIELDS:
        return random_blocks(ggml_type, rows, ncols, row_scale, rng)
    weights = rng.standard_normal((rows, ncols), dtype=np.float32) * row_scale
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType(int(ggml_type)))
    return raw.view(np.uint8).reshape(rows, row_bytes(ggml_type, ncols))


def random_blocks(ggml_type: GGMLType, rows: int, ncols: int, row_scale: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Random bytes, except each float16 field: uniform in +-row_scale / 64."""
    raw = rng.integers(0, 256, (rows, row_bytes(ggml_type, ncols)), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, BLOCK_GEOMETRY[ggml_type][1])
    for offset in F16_FIELDS[ggml_type]:
        values = rng.uniform(-1, 1, blocks.shape[:2]) * row_scale / 64
        blocks[:, :, offset:offset + 2] = values.astype(np.float16)[:, :, None].view(np.uint8)
    return raw

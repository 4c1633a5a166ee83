"""Fine-tuning's two AQLM kernels: W rebuilt from its codes, and the gradients of
the codebooks and scales from the loss's gradient dL/dW.

W[r, 8 g + j] = scales[r] (cb[0, c0, j] + cb[1, c1, j]), codes in the file's
layout (groups, 2, rows) as runtime/aqlm.py reads them. In torch the same takes
a gather per codebook for W and a scatter-add (index_add_) per codebook for the
gradient; the scatter-add alone was 31% of a SmolLM2 step (one element at a
time, 20 ns each). Without numba, numpy forms (W: runtime/aqlm.dequantize).

The codebook gradient is summed in a fixed number of row chunks, then the chunks
in order: the same bits on any number of threads.
"""

from __future__ import annotations

import numpy as np

from ..runtime import aqlm
from ..runtime.jit import jit, numba_enabled, prange

_CHUNKS = 16  # row chunks of the codebook gradient; fixed, so the sum order is too


@jit(parallel=True)
def _weight(codes, codebooks, scales, w):
    groups, _, rows = codes.shape
    gs = codebooks.shape[2]
    for r in prange(rows):
        s = scales[r]
        for g in range(groups):
            v0 = codebooks[0, codes[g, 0, r]]
            v1 = codebooks[1, codes[g, 1, r]]
            for j in range(gs):
                w[r, g * gs + j] = (v0[j] + v1[j]) * s


@jit(parallel=True)
def _gradients(codes, codebooks, scales, grad_w, grad_codebooks, grad_scales):
    groups, _, rows = codes.shape
    gs = codebooks.shape[2]
    partial = np.zeros((_CHUNKS,) + codebooks.shape, np.float32)
    per_chunk = (rows + _CHUNKS - 1) // _CHUNKS
    for chunk in prange(_CHUNKS):
        for r in range(chunk * per_chunk, min(rows, (chunk + 1) * per_chunk)):
            s = scales[r]
            total = np.float32(0.0)
            for g in range(groups):
                c0 = codes[g, 0, r]
                c1 = codes[g, 1, r]
                for j in range(gs):
                    d = grad_w[r, g * gs + j]
                    total += d * (codebooks[0, c0, j] + codebooks[1, c1, j])
                    partial[chunk, 0, c0, j] += d * s
                    partial[chunk, 1, c1, j] += d * s
            grad_scales[r] = total
    for chunk in range(_CHUNKS):
        grad_codebooks += partial[chunk]


def weight(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The (rows, in) float32 matrix."""
    groups, _, rows = codes.shape
    if not numba_enabled():
        return np.ascontiguousarray(aqlm.dequantize(codes, codebooks, scales))
    w = np.empty((rows, groups * codebooks.shape[2]), np.float32)
    _weight(codes, codebooks, scales, w)
    return w


def gradients(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
              grad_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dL/dcodebooks (2, 256, 8) and dL/dscales (rows,) from dL/dW (rows, in)."""
    groups, _, rows = codes.shape
    gs = codebooks.shape[2]
    if not numba_enabled():
        per_group = grad_w.reshape(rows, groups, gs)
        vectors = (codebooks[0][codes[:, 0]] + codebooks[1][codes[:, 1]]).transpose(1, 0, 2)  # (rows, groups, 8)
        grad_scales = (per_group * vectors).sum((1, 2)).astype(np.float32)
        scaled = (per_group * scales[:, None, None]).reshape(-1, gs)
        grad_codebooks = np.zeros_like(codebooks)
        for book in range(len(codebooks)):
            np.add.at(grad_codebooks[book], codes[:, book].T.reshape(-1), scaled)
        return grad_codebooks, grad_scales
    grad_codebooks = np.zeros_like(codebooks)
    grad_scales = np.empty(rows, np.float32)
    _gradients(codes, codebooks, scales, np.ascontiguousarray(grad_w, np.float32), grad_codebooks, grad_scales)
    return grad_codebooks, grad_scales

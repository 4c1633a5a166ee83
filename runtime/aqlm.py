"""AQLM 2x8 weights: each group of 8 input weights of a row is the sum of one
vector from each of two 256-entry codebooks, times one scale per output row
(2 bits per weight, plus the small codebooks).

Stored in GGUF as three ordinary tensors per matrix, for a matrix the model
knows as `NAME.weight` (e.g. `blk.0.attn_q.weight`):
    NAME.codes      I8 (read as uint8), numpy shape (in/8, 2, out): group-major,
                    so a sweep over rows reads each group's codes contiguously
    NAME.codebooks  F32, numpy shape (2, 256, 8)
    NAME.scales     F32, numpy shape (out,)
and the metadata keys aqlm.in_group_size = 8, aqlm.num_codebooks = 2,
aqlm.nbits_per_codebook = 8, aqlm.codes_layout = "group_major".
    W[r, 8 g + j] = scales[r] * (codebooks[0, codes[g, 0, r], j] + codebooks[1, codes[g, 1, r], j])

Matrix x vector (the decode step): first a table of each 8-wide slice of x
dotted with all 512 codebook vectors (x . codebook for every entry), then each
output is a sum of two table lookups per group, scaled. Threads own disjoint
blocks of rows and write only their own outputs (small matrices run on one). Matrix x matrix (prompts):
threads dequantize blocks of rows and multiply them through int8_gemm's integer product
(the rows rounded to int8 per block of 32) or, without 512-bit VNNI, with 4x4 register tiles.
Without numba, numpy does the same arithmetic (slower).
"""

from __future__ import annotations

import os

import numpy as np

from . import aqlm_lookup, int8_gemm
from .aqlm_lookup import lookup_table
from .gguf import GGUFError, GGUFFile
from .jit import apply_threads, jit, num_threads, numba_enabled, prange, serial_and_parallel
from .matmul import tiles_4x4
from .weight_matrix import BATCH_ROWS, NUMPY_CHUNK, RoundedRows, WeightMatrix, integer_prompt_product
from .weight_types import FLOAT_SWITCH

IN_GROUP_SIZE = 8
NUM_CODEBOOKS = 2
CODEBOOK_SIZE = 256
PARTS = ("codes", "codebooks", "scales")
METADATA = {"aqlm.in_group_size": IN_GROUP_SIZE, "aqlm.num_codebooks": NUM_CODEBOOKS,
            "aqlm.nbits_per_codebook": 8, "aqlm.codes_layout": "group_major"}

def tensor_names(weight_name: str) -> dict[str, str]:
    """The GGUF tensor names of a matrix's AQLM parts: 'blk.0.attn_q.weight' ->
    {'codes': 'blk.0.attn_q.codes', ...}."""
    base = weight_name.removesuffix(".weight")
    return {part: f"{base}.{part}" for part in PARTS}


def is_stored(gguf: GGUFFile, weight_name: str) -> bool:
    return tensor_names(weight_name)["codes"] in gguf.tensors


# ---------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------

@jit()
def _table_slice(cb_t, x, table, task, n_tasks):
    """Task `task`'s share of the groups' float tables."""
    n_groups, gs = table.shape[0], cb_t.shape[1]
    g0 = task * n_groups // n_tasks
    g1 = (task + 1) * n_groups // n_tasks
    lookup_table(cb_t, x[g0 * gs:g1 * gs], table[g0:g1])


@jit()
def _rows_looked_up(codes, table, scales, out, task, n_tasks):
    """Task `task`'s share of the output rows: their sums of lookups, scaled."""
    n_groups, _, rows = codes.shape
    r0 = task * rows // n_tasks
    n = (task + 1) * rows // n_tasks - r0
    acc = np.zeros(n, np.float32)
    for g in range(n_groups):
        c0 = codes[g, 0, r0:r0 + n]
        c1 = codes[g, 1, r0:r0 + n]
        t0 = table[g, 0]
        t1 = table[g, 1]
        for i in range(n):
            acc[i] += t0[c0[i]] + t1[c1[i]]
    for i in range(n):
        out[r0 + i] = acc[i] * scales[r0 + i]


def _matvec(codes, cb_t, scales, x, n_tasks, out):
    # The table in slices of groups, one per task, then the lookups: the table is
    # as much work as the lookups when out is near in, so it is split too. The
    # loops' bodies are functions of their own: written inline, the parallel
    # kernel gained nothing from a second thread.
    table = np.empty((codes.shape[0], 2, cb_t.shape[2]), np.float32)
    for task in prange(n_tasks):
        _table_slice(cb_t, x, table, task, n_tasks)
    for task in prange(n_tasks):
        _rows_looked_up(codes, table, scales, out, task, n_tasks)


# Small matrices run serially: the kernel's two parallel regions (table, lookups)
# cost more than they save below about half a million weights (measured at 576 x 576).
_matvec_serial, _matvec_parallel = serial_and_parallel(_matvec)
_SERIAL_WEIGHTS = 1 << 19


@jit()
def _dequant_rows(codes, codebooks, scales, r0, n, w):
    """w[i] = row r0 + i of the matrix, for i < n."""
    n_groups = codes.shape[0]
    gs = codebooks.shape[2]
    for g in range(n_groups):
        c0 = codes[g, 0, r0:r0 + n]
        c1 = codes[g, 1, r0:r0 + n]
        for i in range(n):
            v0 = codebooks[0, c0[i]]
            v1 = codebooks[1, c1[i]]
            wi = w[i, g * gs:g * gs + gs]
            for j in range(gs):
                wi[j] = v0[j] + v1[j]
    for i in range(n):
        s = scales[r0 + i]
        wi = w[i]
        for k in range(wi.size):
            wi[k] *= s


_ROW_BLOCK = 16  # rows dequantized per task in the matmul

if int8_gemm.AVAILABLE:
    from .int8_gemm import TILE_ROWS, blocks_times_x, floats_to_tile, tile_buffers

    @jit(parallel=True)
    def _integer_matmul(codes, codebooks, scales, xq, xd, xs16, xs32, out):
        """A prompt's x W^T through int8_gemm's integer product (out has the rows of a
        whole last tile): each tile's rows dequantized, then rounded to int8 per block
        of 32 as Q8_0 rounds weights (within 1/254 of the block's largest weight:
        finer than the decode's byte tables)."""
        rows = codes.shape[2]
        ncols = codes.shape[0] * codebooks.shape[2]
        nb = ncols // 32
        for tile_index in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
            r0 = tile_index * TILE_ROWS
            w = np.zeros((TILE_ROWS, ncols), np.float32)  # zero rows past the matrix: scale 0, nothing added
            _dequant_rows(codes, codebooks, scales, r0, min(TILE_ROWS, rows - r0), w)
            tile, w_scales, offsets = tile_buffers(nb, 8)
            for i in range(TILE_ROWS):
                for b in range(nb):
                    d = floats_to_tile(w[i], 32 * b, tile, 8 * b, i)
                    w_scales[TILE_ROWS * b + i] = d
                    offsets[TILE_ROWS * b + i] = np.float32(-128.0) * d
            blocks_times_x(tile, w_scales, offsets, xq, xd, xs32, out, r0)


@jit(parallel=True)
def _matmul(codes, codebooks, scales, x, out):
    """out[t, r] = W[r] . x[t]; x has a multiple of 4 rows (zero padding)."""
    rows = codes.shape[2]
    ncols = x.shape[1]
    for blk in prange((rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
        r0 = blk * _ROW_BLOCK
        nr = min(_ROW_BLOCK, rows - r0)
        w = np.zeros((_ROW_BLOCK, ncols), np.float32)  # zeros: no denormal garbage in padding rows
        _dequant_rows(codes, codebooks, scales, r0, nr, w)
        tiles_4x4(w, nr, x, out, r0)  # the quantized types' 4x4 register tiles


# ---------------------------------------------------------------------------
# numpy reference and fallback
# ---------------------------------------------------------------------------

def dequantize(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
               rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """The float32 rows `rows` of the matrix, (n, in)."""
    c = codes[:, :, rows]  # (groups, 2, n)
    w = codebooks[0][c[:, 0]] + codebooks[1][c[:, 1]]  # (groups, n, 8)
    w = w.transpose(1, 0, 2).reshape(c.shape[2], -1)
    return (w * scales[rows][:, None]).astype(np.float32)


def _numpy_matvec(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, x: np.ndarray) -> np.ndarray:
    n_groups, _, rows = codes.shape
    table = np.einsum("gj,ckj->gck", x.reshape(n_groups, -1), codebooks, dtype=np.float32)  # (groups, 2, 256)
    out = np.empty(rows, np.float32)
    step = max(1, NUMPY_CHUNK // n_groups)
    g = np.arange(n_groups)[:, None]
    for r0 in range(0, rows, step):
        c = codes[:, :, r0:r0 + step]
        sums = table[g, 0, c[:, 0]] + table[g, 1, c[:, 1]]  # (groups, n)
        out[r0:r0 + step] = sums.sum(axis=0) * scales[r0:r0 + step]
    return out


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

class AqlmMatrix(WeightMatrix):
    """A (rows, ncols) AQLM 2x8 matrix, multiplied without being dequantized
    (decode) or a block of rows at a time (prompts). Same interface as QuantMatrix."""

    def __init__(self, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray):
        if codes.ndim != 3 or codes.shape[1] != NUM_CODEBOOKS:
            raise ValueError(f"AQLM codes must have shape (groups, {NUM_CODEBOOKS}, rows), got {codes.shape}")
        n_groups, _, rows = codes.shape
        if codebooks.shape != (NUM_CODEBOOKS, CODEBOOK_SIZE, IN_GROUP_SIZE):
            raise ValueError(f"AQLM codebooks must have shape {(NUM_CODEBOOKS, CODEBOOK_SIZE, IN_GROUP_SIZE)}, "
                             f"got {codebooks.shape}")
        if scales.shape != (rows,):
            raise ValueError(f"AQLM scales must have shape ({rows},), got {scales.shape}")
        # Read-only C-contiguous views (file maps are read-only): one numba signature.
        self._codes = np.ascontiguousarray(codes.view(np.uint8)).view()
        self._codebooks = np.ascontiguousarray(codebooks, dtype=np.float32).view()
        self._scales = np.ascontiguousarray(scales, dtype=np.float32).view()
        self._cb_t = np.ascontiguousarray(self._codebooks.transpose(0, 2, 1))
        for a in (self._codes, self._codebooks, self._scales, self._cb_t):
            a.flags.writeable = False
        self.shape = (rows, n_groups * IN_GROUP_SIZE)
        self.nbytes = self._codes.nbytes + self._codebooks.nbytes + self._scales.nbytes
        # Decode through tables rounded to bytes (4-5x the float tables' scalar
        # lookups) where the CPU can look them up in registers, unless asked for float.
        self._byte_tables = aqlm_lookup.AVAILABLE and os.environ.get(FLOAT_SWITCH) != "1"
        self._serial = rows * self.shape[1] <= _SERIAL_WEIGHTS

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, weight_name: str, rows: int, cols: int) -> AqlmMatrix:
        """The matrix stored as `weight_name`'s AQLM parts, checked against (rows, cols)."""
        names = tensor_names(weight_name)
        for key, value in METADATA.items():
            if gguf.get(key) != value:
                raise GGUFError(f"{gguf.path}: AQLM tensor {names['codes']!r} needs metadata {key} = {value!r}, "
                                f"found {gguf.get(key)!r}")
        expected = {"codes": ((cols // IN_GROUP_SIZE, NUM_CODEBOOKS, rows), "I8"),
                    "codebooks": ((NUM_CODEBOOKS, CODEBOOK_SIZE, IN_GROUP_SIZE), "F32"),
                    "scales": ((rows,), "F32")}
        arrays = {}
        for part, (shape, type_name) in expected.items():
            info = gguf.tensors.get(names[part])
            if info is None:
                raise GGUFError(f"{gguf.path}: missing tensor {names[part]!r}")
            if cols % IN_GROUP_SIZE or info.shape != shape or info.ggml_type.name != type_name:
                raise GGUFError(f"{gguf.path}: tensor {names[part]!r} is {info.ggml_type.name} {info.shape}, "
                                f"expected {type_name} {shape}")
            data = gguf.tensor_data(names[part])
            arrays[part] = data.reshape(shape) if part == "codes" else data.view(np.float32).reshape(shape)
        return cls(arrays["codes"], arrays["codebooks"], arrays["scales"])

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """W @ x for x float32 (ncols,) -> float32 (rows,)."""
        x = self._input(x, 1)
        if not numba_enabled():
            return _numpy_matvec(self._codes, self._codebooks, self._scales, x)
        if self._byte_tables:
            return self._byte_table_products(x[None, :])[0]
        out = np.empty(self.shape[0], np.float32)
        apply_threads()
        # Enough tasks that each thread gets a block; at most ~2048 rows each keeps acc in L1.
        n_tasks = max(num_threads(), -(-self.shape[0] // 2048))
        kernel = _matvec_serial if self._serial else _matvec_parallel
        kernel(self._codes, self._cb_t, self._scales, x, min(n_tasks, self.shape[0]), out)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x float32 (T, ncols) -> float32 (T, rows). Up to BATCH_ROWS
        rows (several sequences' tokens) each get the matvec's own result (with
        byte tables the codes are read once for all of them); more rows (prompts)
        are dequantized a block at a time and multiplied in float."""
        x = self._input(x, 2)
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]
        if not numba_enabled():
            return self._numpy_matmul(x)
        if x.shape[0] <= BATCH_ROWS:  # several sequences' tokens: each as matvec gives it alone
            if self._byte_tables:
                return self._byte_table_products(x)
            return np.stack([self.matvec(row) for row in x])
        return self.prompt_matmul(x)

    def prompt_matmul(self, x: np.ndarray, rounded: RoundedRows | None = None, in_float: bool = False) -> np.ndarray:
        """x @ W.T for a prompt's tokens: through int8_gemm's integer product, the weights
        rounded to int8 per block of 32 (a 256-token prompt of Qwen2.5 0.5B in AQLM 2x8:
        2.0x float32 on 1 and 2 threads; SmolLM2's 1.0x / 1.6x; perplexity +0.5%),
        where the CPU has 512-bit VNNI and decoding uses the byte tables;
        else (or `in_float`) dequantized a block at a time and multiplied in float32."""
        x = self._input(x, 2)
        if not numba_enabled():
            return self._numpy_matmul(x)
        if self._byte_tables and int8_gemm.AVAILABLE and not in_float and self.shape[1] % 32 == 0:
            return integer_prompt_product(_integer_matmul, (self._codes, self._codebooks, self._scales), x,
                                          self.shape[0], rounded)
        padded = self._padded(x)
        out = np.empty((padded.shape[0], self.shape[0]), np.float32)
        apply_threads()
        _matmul(self._codes, self._codebooks, self._scales, padded, out)
        return out[:x.shape[0]]

    def _byte_table_products(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], self.shape[0]), np.float32)
        apply_threads()
        kernel = aqlm_lookup.products_serial if self._serial else aqlm_lookup.products_parallel
        row_slices = 1 if self._serial else -(-num_threads() // aqlm_lookup.GROUP_SLICES)
        kernel(self._codes, self._cb_t, self._scales, np.ascontiguousarray(x), row_slices, out)
        return out

    def dequantize_rows(self, index: slice | np.ndarray) -> np.ndarray:
        return dequantize(self._codes, self._codebooks, self._scales, index)

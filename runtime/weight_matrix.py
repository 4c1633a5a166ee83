"""Weight matrices multiplied where they lie: the interface every weight type shares.

`QuantMatrix` wraps the uint8 rows of one GGML tensor (usually a read-only
view of the memory-mapped file) and multiplies them without copying or
converting the bulk bytes; its kernels come from its row in weight_types.py.
`aqlm.AqlmMatrix` is the same interface over AQLM codes. `OutputHead` is the
policy the output head adds on top of a matrix: int8 speed for all logits,
float32 exactness for the ones that pick the token.

Without numba (it cannot load, or LLAMAZIP_NO_NUMBA=1) matrices dequantize a
few rows at a time and multiply with numpy: slower, same results, numba never
imported.
"""

from __future__ import annotations

import numpy as np

from . import int8_gemm, interleaved
from .ggml_types import GGMLType
from .jit import apply_threads, numba_enabled
from .weight_types import check_raw, dequantize, weight_type

NUMPY_CHUNK = 1 << 20  # weights dequantized at a time on the numpy path (4 MiB of float32)
BATCH_ROWS = 16  # up to this many rows of x, matmul rounds them to int8 as the matvec does (int8_batch.py)


class WeightMatrix:
    """What every compressed (rows, ncols) matrix shares: input checks, the
    embedding lookup and the numpy matmul, on top of `dequantize_rows(index)`."""

    shape: tuple[int, int]
    nbytes: int  # bytes of weights one matvec reads

    @property
    def rounds_input(self) -> bool:
        """True when matvec rounds x to int8 first (int8_matvec)."""
        return False

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """W @ x for x float32 (ncols,) -> float32 (rows,)."""
        raise NotImplementedError

    def prompt_matvec(self, x: np.ndarray) -> np.ndarray:
        """matvec for a prompt's one token (a one-token prompt, a prompt's last logits):
        the same product, but never one that must first prepare a decoding layout
        (InterleavedMatrix), which would delay the first token."""
        return self.matvec(x)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x float32 (T, ncols) -> float32 (T, rows). Up to BATCH_ROWS rows
        (several sequences' tokens, drafted tokens) each get exactly matvec's result
        for that row alone (rounded to int8 as matvec rounds them, through one pass
        over the weights); more rows are multiplied in float32 (prompts)."""
        raise NotImplementedError

    def prompt_matmul(self, x: np.ndarray, rounded: RoundedRows | None = None, in_float: bool = False) -> np.ndarray:
        """x @ W.T for a prompt's tokens x (T, ncols): through integer products as precise
        as float32 (int8_gemm.py) where the CPU has 512-bit VNNI and decoding rounds x
        too, else (or `in_float`) in float32. `rounded` shares x's rounding among the
        matrices that multiply it."""
        return self.matmul(x)

    def dequantize_rows(self, index: slice | np.ndarray) -> np.ndarray:
        """The float32 rows at a slice or an array of row ids."""
        raise NotImplementedError

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` as float32 (len(ids), ncols): an embedding lookup."""
        ids = np.asarray(ids, dtype=np.intp)
        if ids.ndim != 1:
            raise ValueError(f"row ids must be one-dimensional, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]}), got {ids.min()}..{ids.max()}")
        return self.dequantize_rows(ids)

    def _input(self, x: np.ndarray, ndim: int) -> np.ndarray:
        """x as C-contiguous writable float32 (one numba signature), shape-checked:
        the kernels do no bounds checks."""
        if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
            x = np.require(x, np.float32, ["C", "W"])  # the check alone is cheap; a decode step makes ~200 of these
        if x.ndim != ndim or x.shape[-1] != self.shape[1]:
            want = "(ncols,)" if ndim == 1 else "(T, ncols)"
            raise ValueError(f"x must have shape {want} with ncols = {self.shape[1]}, got {x.shape}")
        return x

    @staticmethod
    def _padded(x: np.ndarray) -> np.ndarray:
        """x with zero rows up to a multiple of 4: the matmul kernels' 4x4 tiles."""
        padded = np.zeros((-(-x.shape[0] // 4) * 4, x.shape[1]), np.float32)
        padded[:x.shape[0]] = x
        return padded

    def _numpy_matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T by chunks of rows, never holding all of W as float32."""
        rows, ncols = self.shape
        out = np.empty((x.shape[0], rows), np.float32)
        step = max(1, NUMPY_CHUNK // ncols)
        for r0 in range(0, rows, step):
            out[:, r0:r0 + step] = x @ self.dequantize_rows(slice(r0, r0 + step)).T
        return out


class RoundedRows:
    """A prompt's x rounded for int8_gemm once, for all the matrices that multiply
    that same array (q, k and v; gate and up). It keeps the last x it
    rounded: give it arrays that are not changed in place while it is in use."""

    def __init__(self):
        self._x: np.ndarray | None = None
        self._rounded: tuple[np.ndarray, ...] = ()

    def of(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        if self._x is not x:
            self._x, self._rounded = x, int8_gemm.quantize_rows(x)
        return self._rounded


def integer_prompt_product(driver, weights: tuple, x: np.ndarray, rows: int,
                           rounded: RoundedRows | None) -> np.ndarray:
    """x @ W.T (x (T, ncols) float32) through an int8_gemm driver(*weights, *rounded x,
    out), whose out has whole tiles of rows and whole passes of rows of x."""
    out = np.empty((-(-x.shape[0] // int8_gemm.X_ROWS) * int8_gemm.X_ROWS,
                    -(-rows // int8_gemm.TILE_ROWS) * int8_gemm.TILE_ROWS), np.float32)
    apply_threads()
    driver(*weights, *(rounded or RoundedRows()).of(x), out)
    return out[:x.shape[0]] if out.shape[1] == rows else np.ascontiguousarray(out[:x.shape[0], :rows])


class QuantMatrix(WeightMatrix):
    """A (rows, ncols) weight matrix kept in its GGML encoding, multiplied in place."""

    def __init__(self, raw: np.ndarray, ggml_type: GGMLType, ncols: int):
        self.weight_type = weight_type(ggml_type)
        self.ggml_type = self.weight_type.ggml_type
        check_raw(raw, self.ggml_type, ncols)
        if not raw.flags.c_contiguous:
            raise ValueError("weight rows must be C-contiguous (a view of the file, never a strided copy)")
        # A read-only view whatever the caller passed, so numba compiles one
        # signature per type (file maps are read-only).
        self._raw = raw.view()
        self._raw.flags.writeable = False
        self.shape = (raw.shape[0], ncols)
        self.nbytes = raw.nbytes
        self._views = self.weight_type.views(self._raw)
        self._matvec, self._rounds = self.weight_type.decode_matvec()
        self._gemm = self.weight_type.prompt_gemm()

    @property
    def rounds_input(self) -> bool:
        return self._rounds and numba_enabled()

    def matvec(self, x: np.ndarray) -> np.ndarray:
        x = self._input(x, 1)
        if not numba_enabled():
            return self._numpy_matmul(x[None, :])[0]
        out = np.empty(self.shape[0], np.float32)
        apply_threads()
        self._matvec(*self._views, x, out)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        x = self._input(x, 2)
        if not numba_enabled():
            return self._numpy_matmul(x)
        if x.shape[0] == 1:
            return self.matvec(x[0])[None, :]
        if x.shape[0] <= BATCH_ROWS:  # a few tokens decoded together: each row as matvec gives it alone
            if not self._rounds:
                return np.stack([self.matvec(row) for row in x])
            out = np.empty((x.shape[0], self.shape[0]), np.float32)
            apply_threads()
            self.weight_type.int8_matmul(*self._views, x, out)
            return out
        return self._float_matmul(x)

    def prompt_matmul(self, x: np.ndarray, rounded: RoundedRows | None = None, in_float: bool = False) -> np.ndarray:
        x = self._input(x, 2)
        if not numba_enabled():
            return self._numpy_matmul(x)
        if self._gemm is None or in_float:
            return self._float_matmul(x)
        return integer_prompt_product(self._gemm, self._views, x, self.shape[0], rounded)

    def _float_matmul(self, x: np.ndarray) -> np.ndarray:
        padded = self._padded(x)
        out = np.empty((padded.shape[0], self.shape[0]), np.float32)
        apply_threads()
        self.weight_type.matmul(*self._views, padded, out)
        return out[:x.shape[0]]

    def dequantize_rows(self, index: slice | np.ndarray) -> np.ndarray:
        return dequantize(self._raw[index], self.ggml_type, self.shape[1])


class InterleavedMatrix(QuantMatrix):
    """A matrix of interleaved.TYPES whose decoding products (one row of x or a few) run on a
    copy repacked 16 rows to a vector (interleaved.py); prompts, the embedding
    lookup and dequantizing read the GGML bytes as QuantMatrix does. Made only
    where interleaved.AVAILABLE and decoding rounds x to int8."""

    def __init__(self, raw: np.ndarray, ggml_type: GGMLType, ncols: int):
        super().__init__(raw, ggml_type, ncols)
        self._packed: tuple[np.ndarray, ...] | None = None

    @property
    def packed(self) -> tuple[np.ndarray, ...]:
        """The repacked copy, made at the first decoding product (unless make_copy
        came first): a prompt, whose products read the GGML bytes (prompt_matvec,
        prompt_matmul), gives the first token without waiting for it."""
        self.make_copy()
        return self._packed

    def make_copy(self) -> None:
        """Repack, unless done already."""
        if self._packed is None:
            apply_threads()
            self._packed = interleaved.repack(self._raw, self.ggml_type)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        x = self._input(x, 1)
        out = np.empty(self.shape[0], np.float32)
        packed = self.packed
        apply_threads()
        interleaved.matvec(*packed, x, out)
        return out

    def prompt_matvec(self, x: np.ndarray) -> np.ndarray:
        return QuantMatrix.matvec(self, x)  # the GGML bytes: no repacking before the first token

    def matmul(self, x: np.ndarray) -> np.ndarray:
        x = self._input(x, 2)
        if not 1 < x.shape[0] <= BATCH_ROWS:
            return super().matmul(x)  # one row: matvec; a prompt's many: in float32
        out = np.empty((x.shape[0], self.shape[0]), np.float32)
        packed = self.packed
        apply_threads()
        interleaved.matmul(*packed, x, out)
        return out


def interleaves(ggml_type: GGMLType, rows: int) -> bool:
    """Whether a (rows, ...) matrix of ggml_type can decode through InterleavedMatrix here."""
    return (interleaved.AVAILABLE and ggml_type in interleaved.TYPES and rows % interleaved.GROUP == 0
            and weight_type(ggml_type).decode_matvec()[1])


# The head's exact re-scoring: the least margin below the largest logit
# (int8 rounding errors seen on the real models: 0.05-0.3), and a cap on the
# rows re-scored (each one a float32 dot product).
RESCORE_MARGIN = 1.0
RESCORE_LIMIT = 4096
_PROBE_ROWS = 32  # rows spread over the vocabulary whose rounding error sizes the margin


class OutputHead:
    """Logits from the normed last state h, through the output matrix.

    Where the matrix's matvec rounds h to int8, the leading logits, which pick
    the token, are computed again from h in float32: every logit within a
    margin of the largest, the margin at least 4x the largest rounding error
    seen (on a fixed spread of rows and on the leading ones), so a token left
    out would need twice that error to have won. Rounded, SmolLM2 took "L'"
    over "The" (0.09 apart) in answering "What is the capital of France?".
    """

    def __init__(self, matrix: WeightMatrix):
        self.matrix = matrix
        self._probe_rows = np.unique(np.linspace(0, matrix.shape[0] - 1, _PROBE_ROWS).astype(np.int64))
        self._probe: np.ndarray | None = None  # those rows in float32, once (every token's logits use them)

    def logits(self, h: np.ndarray, prompt: bool = False) -> np.ndarray:
        """Logits of one state h (dim,): the ones that can win exact to float32. A
        prompt's last token's through the matrix's prompt_matvec."""
        return self._exact_leading(h, self.matrix.prompt_matvec(h) if prompt else self.matrix.matvec(h))

    def logits_of_rows(self, h: np.ndarray) -> np.ndarray:
        """logits() of each of up to BATCH_ROWS states h (n, dim), bit for bit, with
        one pass over the matrix for all of them (several sequences' tokens)."""
        rows = self.matrix.matmul(np.ascontiguousarray(h, dtype=np.float32))
        for i in range(len(h)):
            self._exact_leading(h[i], rows[i])  # in place: rows[i] is a view
        return rows

    def _exact_leading(self, h: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """logits with the leading ones computed again in float32, in place."""
        if not self.matrix.rounds_input:
            return logits
        if self._probe is None:
            self._probe = self.matrix.rows(self._probe_rows)
        worst = float(np.abs(self._probe @ h - logits[self._probe_rows]).max())
        margin = max(np.float32(RESCORE_MARGIN), 4 * worst)
        while True:
            leading = np.flatnonzero(logits >= logits.max() - margin)
            if len(leading) > RESCORE_LIMIT:  # a flat distribution: the largest of them
                leading = leading[np.argpartition(logits[leading], -RESCORE_LIMIT)[-RESCORE_LIMIT:]]
            exact = self.matrix.rows(leading) @ h
            worst = max(worst, float(np.abs(exact - logits[leading]).max()))
            if 4 * worst <= margin or len(leading) >= RESCORE_LIMIT:
                break
            margin = 4 * worst
        logits[leading] = exact
        return logits

    def all_logits(self, h: np.ndarray) -> np.ndarray:
        """Logits of many states h (T, dim) in float32 (perplexity scores every position)."""
        return self.matrix.prompt_matmul(np.ascontiguousarray(h, dtype=np.float32))

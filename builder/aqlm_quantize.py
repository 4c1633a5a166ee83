"""Quantize a GGUF model's linear layers to AQLM 2x8 (2 bits per weight; the
tensor layout is described in runtime/aqlm.py).

Per matrix W (out x in), with H = X^T X the Gram matrix of that layer's inputs
X, captured by running a calibration text through the source model (H = I
without one, i.e. plain weight error):
1. Rows are divided by their RMS, so one pair of codebooks suits every row.
2. Codebooks start from residual k-means over the 8-wide groups: k-means on
   the groups, then k-means on what the first codebook leaves.
3. Rounds of: code updates, group by group from left to right, minimising the
   output error ||(W - W^) X^T|| with the errors of each group pushed onto the
   columns not yet quantized (GPTQ's update, through the Cholesky factor of
   H^-1, as GPTVQ does for vectors); each group's pair of codes by a beam
   search; then least-squares codebooks for the codes.
4. Least-squares scales, one per row, on the output error.
Cost is linear in the number of weights (times the layer width, as GPTQ).
Run it with single-threaded BLAS (OPENBLAS_NUM_THREADS=1, as the llamazip
command sets): its thousands of small products crawl when OpenBLAS threads
spin against other work. Same seed and BLAS threads, same file.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import gguf
import numpy as np

from ..errors import UserError
from ..runtime import aqlm
from ..runtime.ggml_types import GGMLType
from ..runtime.gguf import GGUFFile
from ..runtime.jit import numba_enabled
from ..runtime.weight_types import dequantize
from . import calibration_data
from .gguf_rewrite import Tensor, rewrite_gguf
from .progress import Progress

LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
DEFAULT_CALIBRATION_TOKENS = 8192  # well over the widest layer input, so X^T X has full rank
# The model's own text costs a decode step a token: at most this many 512-token
# sequences of it (~3 min on SmolLM2, 2 threads), repeated in turn by longer fine-tunings.
GENERATED_SEQUENCES = 48
_K = aqlm.CODEBOOK_SIZE
_GS = aqlm.IN_GROUP_SIZE
# Beam 4 and 2 rounds, against beam 2 and 1 round: SmolLM2's perplexity 17.7 -> 16.1, 1.9x the time.
_BEAM = 4  # first-codebook candidates tried per group
_ROUNDS = 2  # code + codebook rounds before the final codes
_KMEANS_ITERS = 12
_KMEANS_SAMPLE = 1 << 15  # groups k-means looks at
_DAMP = 0.2  # H += 20% of its mean diagonal: less overfitting to a few thousand tokens than 1%
_BLOCK = 128  # columns per lazy GPTQ update


AqlmParts = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes, codebooks, scales as runtime/aqlm.py stores them


class QuantizeError(UserError, ValueError):
    """An input that cannot be quantized (one line for the user)."""


# ---------------------------------------------------------------------------
# Calibration: the Gram matrix of each linear layer's inputs
# ---------------------------------------------------------------------------

class _Recorder:
    """Stands in for a layer's matrix: adds x^T x of its inputs to `gram`, then multiplies."""

    def __init__(self, matrix, gram: np.ndarray | None):
        self.matrix, self.gram = matrix, gram  # gram None: a sibling records the same inputs
        self.shape, self.nbytes = matrix.shape, matrix.nbytes

    def _record(self, x: np.ndarray) -> None:
        if self.gram is not None:
            x = np.asarray(x, np.float32).reshape(-1, self.shape[1])
            self.gram += x.T @ x

    def matvec(self, x: np.ndarray) -> np.ndarray:
        self._record(x)
        return self.matrix.matvec(x)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        self._record(x)
        return self.matrix.matmul(x)

    def prompt_matmul(self, x: np.ndarray, rounded=None, in_float: bool = False) -> np.ndarray:
        """In float32 always: calibration follows the float model, on every CPU alike."""
        self._record(x)
        return self.matrix.prompt_matmul(x, in_float=True)


# Matrices that read the same input share one Gram matrix.
_SAME_INPUT = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))
_GGUF_NAME = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
              "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


def _record_layer(layer, index: int) -> dict[str, np.ndarray]:
    """Put recorders in place of `layer`'s matrices: weight name -> its Gram sum (shared
    by the matrices that read the same input)."""
    grams = {}
    for names in _SAME_INPUT:
        gram = np.zeros((getattr(layer, names[0]).shape[1],) * 2, np.float32)
        for j, name in enumerate(names):
            grams[f"blk.{index}.{_GGUF_NAME[name]}.weight"] = gram
            setattr(layer, name, _Recorder(getattr(layer, name), gram if j == 0 else None))
    return grams


def grams_of(src: GGUFFile, sequences: list[np.ndarray]) -> dict[str, np.ndarray]:
    """weight name -> X^T X / tokens (float32; one array for the matrices that read
    the same input) over the inputs that the token sequences send through that
    matrix in the source model. quantize_matrix takes it to float64 one matrix at
    a time: all of Qwen2.5-0.5B's in float64, one per matrix, held ~5 GiB."""
    from ..runtime.model import Model

    model = Model(src, n_ctx=max(map(len, sequences)))
    grams: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model.layers):
        grams.update(_record_layer(layer, i))
    progress = Progress("calibration: each layer's inputs", len(sequences), "sequences")
    for tokens in sequences:
        model.forward(tokens, 0)
        progress.step()
    n_rows = sum(map(len, sequences))
    for gram in {id(g): g for g in grams.values()}.values():
        gram /= n_rows
    return grams


# ---------------------------------------------------------------------------
# One matrix
# ---------------------------------------------------------------------------

def _nearest(t: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of t (n, 8): the closest codebook entry and its squared distance."""
    d = t @ (-2.0 * codebook.T)
    d += (codebook * codebook).sum(1)[None, :]
    best = d.argmin(1)
    return best, np.take_along_axis(d, best[:, None], 1)[:, 0] + (t * t).sum(1)


def _kmeans(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """256 centres for the rows of v (n, 8), Lloyd's algorithm from random rows."""
    if len(v) > _KMEANS_SAMPLE:
        v = v[rng.choice(len(v), _KMEANS_SAMPLE, replace=False)]
    centres = v[rng.choice(len(v), _K, replace=len(v) < _K)].copy()
    for _ in range(_KMEANS_ITERS):
        assign, _ = _nearest(v, centres)
        counts = np.bincount(assign, minlength=_K)
        sums = np.stack([np.bincount(assign, v[:, j], minlength=_K) for j in range(v.shape[1])], 1)
        empty = counts == 0
        centres[~empty] = sums[~empty] / counts[~empty, None]
        centres[empty] = v[rng.choice(len(v), int(empty.sum()))]  # restart unused centres
    return centres


def _beam_codes(t: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (c0, c1) with cb[0][c0] + cb[1][c1] close to each row of t (n, 8): the
    _BEAM best first entries, each with its best second entry, then one sweep of
    coordinate descent from the best pair."""
    n = len(t)
    d0 = (cb[0] * cb[0]).sum(1)[None, :] - 2.0 * (t @ cb[0].T)
    cands = np.argpartition(d0, _BEAM, axis=1)[:, :_BEAM]
    best_err = np.full(n, np.inf)
    c0 = np.zeros(n, np.intp)
    c1 = np.zeros(n, np.intp)
    for b in range(_BEAM):
        cand = cands[:, b]
        second, err = _nearest(t - cb[0][cand], cb[1])
        better = err < best_err
        c0[better], c1[better], best_err[better] = cand[better], second[better], err[better]
    c0, _ = _nearest(t - cb[1][c1], cb[0])
    c1, _ = _nearest(t - cb[0][c0], cb[1])
    return c0, c1


def _nearest_entry(t, cb_t, norms):
    """Index of the entry of cb_t (8, 256; the codebook transposed) closest to t,
    and its squared distance minus ||t||^2."""
    d = norms.copy()
    for j in range(cb_t.shape[0]):
        tj = np.float32(-2.0) * t[j]
        row = cb_t[j]
        for k in range(d.size):
            d[k] += tj * row[k]
    best = 0
    for k in range(1, d.size):
        if d[k] < d[best]:
            best = k
    return best, d[best]


def _beam_codes_numba(t, cb, n_beam, c0, c1):
    """_beam_codes fused per row: no (rows, 256) temporaries. Serial: a matrix has
    thousands of groups, and a parallel region per group costs more than it saves."""
    cb_t0 = np.ascontiguousarray(cb[0].T)
    cb_t1 = np.ascontiguousarray(cb[1].T)
    norm0 = (cb[0] * cb[0]).sum(1)
    norm1 = (cb[1] * cb[1]).sum(1)
    gs = t.shape[1]
    res = np.empty(gs, np.float32)
    tried = np.full(n_beam, -1)
    for r in range(t.shape[0]):
        tr = t[r]
        best_err = np.inf
        b0 = 0
        b1 = 0
        for b in range(n_beam):
            # the b-th closest first entry: the closest not tried yet
            k0 = -1
            kd = np.inf
            d = norm0.copy()
            for j in range(gs):
                tj = np.float32(-2.0) * tr[j]
                row = cb_t0[j]
                for k in range(d.size):
                    d[k] += tj * row[k]
            for i in range(b):
                d[tried[i]] = np.inf
            for k in range(d.size):
                if d[k] < kd:
                    kd = d[k]
                    k0 = k
            tried[b] = k0
            for j in range(gs):
                res[j] = tr[j] - cb[0, k0, j]
            k1, e = _nearest_entry(res, cb_t1, norm1)
            err = e
            for j in range(gs):
                err += res[j] * res[j]
            if err < best_err:
                best_err = err
                b0 = k0
                b1 = k1
        # one sweep of coordinate descent
        for j in range(gs):
            res[j] = tr[j] - cb[1, b1, j]
        b0, _ = _nearest_entry(res, cb_t0, norm0)
        for j in range(gs):
            res[j] = tr[j] - cb[0, b0, j]
        b1, _ = _nearest_entry(res, cb_t1, norm1)
        c0[r] = b0
        c1[r] = b1


if numba_enabled():
    import numba

    _nearest_entry = numba.njit(fastmath=True, cache=True, nogil=True)(_nearest_entry)
    _beam_codes_numba = numba.njit(fastmath=True, cache=True, nogil=True)(_beam_codes_numba)


def _codes_for(t: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_beam_codes, by the numba kernel when numba is there."""
    if not numba_enabled():
        return _beam_codes(t, cb)
    c0 = np.empty(len(t), np.intp)
    c1 = np.empty(len(t), np.intp)
    _beam_codes_numba(np.ascontiguousarray(t, np.float32), np.ascontiguousarray(cb, np.float32), _BEAM, c0, c1)
    return c0, c1


def _cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper U with H^-1 = U^T U (GPTQ's factor), H damped first."""
    h = h + _DAMP * np.mean(np.diag(h)) * np.eye(len(h))
    inv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, H^-1 = L^-T L^-1
    return np.linalg.cholesky(inv.T @ inv).T


def _gptq_codes(w: np.ndarray, u: np.ndarray, cb: np.ndarray):
    """Codes for every group of w (out, in), left to right, each group's error
    pushed onto the later columns through U. Returns codes (out, groups, 2), the
    targets each group was fitted to (out, in) and per-group whitening (groups, 8, 8):
    the group's error is ||(target - code vector) A_g||^2."""
    out_dim, in_dim = w.shape
    w = w.astype(np.float32, copy=True)
    u = u.astype(np.float32)
    n_groups = in_dim // _GS
    codes = np.empty((out_dim, n_groups, 2), np.uint8)
    targets = np.empty_like(w)
    whiten = np.empty((n_groups, _GS, _GS), np.float32)
    for b0 in range(0, in_dim, _BLOCK):
        b1 = min(b0 + _BLOCK, in_dim)
        errors = np.empty((out_dim, b1 - b0), np.float32)
        for k0 in range(b0, b1, _GS):
            k1 = k0 + _GS
            a = np.linalg.inv(u[k0:k1, k0:k1])
            whiten[k0 // _GS] = a
            t = w[:, k0:k1]
            targets[:, k0:k1] = t
            cb_a = cb @ a  # codebooks in the whitened space (the sum is linear)
            t_a = t @ a
            c0, c1 = _codes_for(t_a, cb_a)
            codes[:, k0 // _GS, 0], codes[:, k0 // _GS, 1] = c0, c1
            e = t_a - cb_a[0][c0] - cb_a[1][c1]
            errors[:, k0 - b0:k1 - b0] = e
            w[:, k1:b1] -= e @ u[k0:k1, k1:b1]
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return codes, targets, whiten


def _fit_codebooks(cb: np.ndarray, codes: np.ndarray, targets: np.ndarray, whiten: np.ndarray,
                   row_weight: np.ndarray) -> np.ndarray:
    """Least-squares codebooks for fixed codes: per coordinate j, the 512 entries
    minimising sum over rows r and groups g of weight * (target - cb0[c0] - cb1[c1])^2,
    weight = row_weight[r] * (A_g A_g^T)[j, j] (the whitening's diagonal)."""
    out_dim, n_groups, _ = codes.shape
    c0 = codes[:, :, 0].astype(np.intp).ravel()
    c1 = codes[:, :, 1].astype(np.intp).ravel()
    pair = c0 * _K + c1
    col_weight = np.einsum("gjk,gjk->gj", whiten, whiten)  # (groups, 8)
    t = targets.reshape(out_dim, n_groups, _GS)
    new = cb.copy()
    for j in range(_GS):
        wt = (row_weight[:, None] * col_weight[None, :, j]).ravel()
        tj = t[:, :, j].ravel()
        a = np.zeros((2 * _K, 2 * _K))
        a[:_K, :_K] = np.diag(np.bincount(c0, wt, _K))
        a[_K:, _K:] = np.diag(np.bincount(c1, wt, _K))
        a[:_K, _K:] = np.bincount(pair, wt, _K * _K).reshape(_K, _K)
        a[_K:, :_K] = a[:_K, _K:].T
        rhs = np.concatenate([np.bincount(c0, wt * tj, _K), np.bincount(c1, wt * tj, _K)])
        ridge = 1e-4 * np.trace(a) / len(a) + 1e-12  # unused entries stay where they were
        x_old = np.concatenate([cb[0][:, j], cb[1][:, j]])
        x = np.linalg.solve(a + ridge * np.eye(len(a)), rhs + ridge * x_old)
        new[0][:, j], new[1][:, j] = x[:_K], x[_K:]
    return new


def _decode(codes: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """(out, groups, 2) codes -> (out, in) sums of codebook vectors."""
    v = cb[0][codes[:, :, 0]] + cb[1][codes[:, :, 1]]
    return v.reshape(codes.shape[0], -1)


def quantize_matrix(w: np.ndarray, gram: np.ndarray | None, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AQLM 2x8 form of w (out, in) for inputs with Gram matrix `gram` (None: weight
    error). Returns codes (in/8, 2, out) uint8, codebooks (2, 256, 8) and scales (out,)
    float32, as runtime/aqlm.py stores them."""
    w = np.asarray(w, np.float64)
    in_dim = w.shape[1]
    if in_dim % _GS:
        raise QuantizeError(f"AQLM needs rows that are a multiple of {_GS} wide, got {in_dim}")
    h = np.eye(in_dim) if gram is None else np.array(gram, np.float64)
    dead = np.diag(h) <= 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w = np.where(dead[None, :], 0.0, w)
    rms = np.sqrt((w * w).mean(1))
    rms[rms == 0] = 1.0
    wn = (w / rms[:, None]).astype(np.float32)

    groups = wn.reshape(-1, _GS)
    cb = np.empty((2, _K, _GS), np.float32)
    cb[0] = _kmeans(groups, rng)
    first, _ = _nearest(groups, cb[0])
    cb[1] = _kmeans(groups - cb[0][first], rng)

    u = _cholesky_of_inverse(h)
    row_weight = rms * rms
    for _ in range(_ROUNDS):
        codes, targets, whiten = _gptq_codes(wn, u, cb)
        cb = _fit_codebooks(cb, codes, targets, whiten, row_weight).astype(np.float32)
    codes, _, _ = _gptq_codes(wn, u, cb)

    # Scales: per row, the least-squares factor on the output error (w - s b) H (w - s b)^T.
    b = _decode(codes, cb).astype(np.float64)
    bh = b @ h
    denom = np.einsum("ij,ij->i", bh, b)
    scales = np.where(denom > 0, np.einsum("ij,ij->i", bh, w) / np.where(denom > 0, denom, 1.0), 0.0)
    return (np.ascontiguousarray(codes.transpose(1, 2, 0)), cb.astype(np.float32), scales.astype(np.float32))


def output_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray | None) -> float:
    """||(W - W^) X^T||^2 / ||W X^T||^2 for inputs with Gram matrix `gram` (None: weight error)."""
    d = np.asarray(w, np.float64) - w_hat
    w = np.asarray(w, np.float64)
    if gram is None:
        return float((d * d).sum() / (w * w).sum())
    return float(np.einsum("ij,ij->", d @ gram, d) / np.einsum("ij,ij->", w @ gram, w))


def rtn2(w: np.ndarray, group_size: int = 8) -> np.ndarray:
    """w rounded to 4 levels between the min and max of each group of `group_size`: the baseline."""
    g = np.asarray(w, np.float32).reshape(w.shape[0], -1, group_size)
    lo, hi = g.min(2, keepdims=True), g.max(2, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 3, 1.0)
    return (lo + np.clip(np.round((g - lo) / step), 0, 3) * step).reshape(w.shape)


# ---------------------------------------------------------------------------
# Whole files
# ---------------------------------------------------------------------------

def _float_rows(data: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(shape[0], -1)
    return dequantize(raw, ggml_type, shape[1])


def _open(src: Path) -> GGUFFile:
    if not Path(src).is_file():
        raise QuantizeError(f"{src}: no such file")
    return GGUFFile(src)


def quantize_sequentially(src: GGUFFile, sequences: list[np.ndarray], seed: int, names: list[str],
                          progress: Progress) -> dict[str, AqlmParts]:
    """weight name -> its AQLM parts, layer by layer: each layer's Gram matrices come
    from the calibration sequences run through the layers before it already
    quantized, so each layer is fitted to the inputs it will see, as the AQLM
    reference does. Within a layer, every matrix sees the layer's quantized
    input and original attention. The target stays W X_q (not W X_original):
    measured on SmolLM2, held-out perplexity rose 7-33% against Gram matrices
    from the original model, in-domain fell 1.5%."""
    from ..runtime.layer_steps import PromptSteps
    from ..runtime.model import Model

    model = Model(src, n_ctx=max(map(len, sequences)))
    n_rows = sum(map(len, sequences))

    def steps(tokens: np.ndarray) -> PromptSteps:
        return PromptSteps(model.config, 0, len(tokens))

    xs = [model.embed(steps(t), t) for t in sequences]  # each sequence's residual stream
    parts: dict[str, AqlmParts] = {}
    for i, layer in enumerate(model.layers):
        grams = _record_layer(layer, i)
        for tokens, x in zip(sequences, xs):
            model.run_layer(steps(tokens), layer, x)
        for attr, short in _GGUF_NAME.items():
            name = f"blk.{i}.{short}.weight"
            info = src.tensors[name]
            w = _float_rows(src.tensor_data(name), info.ggml_type, info.shape)
            rng = np.random.default_rng([seed, names.index(name)])
            parts[name] = quantize_matrix(w, grams[name].astype(np.float64) / n_rows, rng)
            setattr(layer, attr, aqlm.AqlmMatrix(*parts[name]))
            progress.step(name)
        xs = [model.run_layer(steps(tokens), layer, x) for tokens, x in zip(sequences, xs)]
    return parts


def _independently(src: GGUFFile, grams: dict[str, np.ndarray], seed: int, names: list[str],
                   progress: Progress) -> dict[str, AqlmParts]:
    """weight name -> its AQLM parts, each matrix on its own Gram matrix (or none),
    one matrix per core at a time: the beam search (numba, nogil) and the
    single-threaded BLAS products run outside the GIL (SmolLM2 on 2 cores: 255 ->
    ~120 s). Each matrix has its own seed, so the order they finish in changes nothing."""

    def one(index: int, name: str) -> AqlmParts:
        info = src.tensors[name]
        w = _float_rows(src.tensor_data(name), info.ggml_type, info.shape)
        return quantize_matrix(w, grams.get(name), np.random.default_rng([seed, index]))

    parts = {}
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        futures = {pool.submit(one, index, name): name for index, name in enumerate(names)}
        for future in as_completed(futures):
            parts[futures[future]] = future.result()
            progress.step(futures[future])
    return {name: parts[name] for name in names}


def quantize_gguf_aqlm(src: Path, dst: Path, *, calibration_text: str | None, seed: int,
                       calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS, calibrate: bool = True,
                       sequential: bool = False, finetune_steps: int = 0) -> None:
    """Write dst: src with its linear layers in AQLM 2x8 form, everything else copied
    (embeddings and head in float are stored as Q8_0). calibration_text None: the
    default mix of prose, code and the model's own text (builder/calibration_data.py);
    calibrate=False fits the weights themselves (no calibration pass, no
    fine-tuning). The Gram matrices come from the first calibration_tokens tokens.
    sequential: each layer's inputs from the model with the layers before it
    quantized (quantize_sequentially; measured worse on held-out text than inputs
    from the original, see the README). finetune_steps > 0: distil src into the
    quantized model afterwards, one calibration sequence per step
    (builder/aqlm_finetune.py; needs torch)."""
    src, dst = Path(src), Path(dst)
    started = time.monotonic()
    model = _open(src)
    if calibration_text is not None and not calibration_text.strip():
        raise QuantizeError("the calibration text is empty")
    names = [n for n in model.tensors if LINEAR.fullmatch(n)]
    if not names:
        raise QuantizeError(f"{src}: no linear layers (blk.N.attn_q.weight, ...) to quantize")
    for name in names:
        if model.tensors[name].shape[1] % _GS:
            raise QuantizeError(f"{src}: {name} rows are {model.tensors[name].shape[1]} wide, "
                                f"not a multiple of {_GS}")
    tune = None
    if finetune_steps > 0 and calibrate:
        tune = _finetune_module()  # before the long part: a missing torch fails at once
    if calibrate:
        sequences, gram_sequences = _calibration(model, calibration_text, seed, calibration_tokens, finetune_steps)
        if sequential:
            parts = quantize_sequentially(model, gram_sequences, seed, names, _progress(names))
        else:
            parts = _independently(model, grams_of(model, gram_sequences), seed, names, _progress(names))
    else:
        parts = _independently(model, {}, seed, names, _progress(names))
    vectors: dict[str, np.ndarray] = {}
    if tune is not None:
        parts, vectors = tune.finetune(model, parts, sequences, finetune_steps, seed)

    write_aqlm_gguf(src, dst, parts, vectors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"  AQLM: {time.monotonic() - started:.0f} s, peak memory {peak:.1f} GiB", file=sys.stderr)


def _progress(names: list[str]) -> Progress:
    return Progress("quantizing", len(names), "matrices")


def _calibration(model: GGUFFile, text: str | None, seed: int, gram_tokens: int,
                 steps: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The calibration sequences (enough for one per fine-tuning step) and the first
    of them, those the Gram matrices read."""
    n_ctx = calibration_data.SEQUENCE_TOKENS
    n_gram = max(1, -(-gram_tokens // n_ctx))
    count = max(n_gram, steps)
    if text is not None:
        sequences = calibration_data.text_sequences(model, text, count * n_ctx)
    else:
        sequences = calibration_data.default_sequences(model, count, seed, generated=GENERATED_SEQUENCES)
    return sequences, sequences[:n_gram]


def write_aqlm_gguf(src: Path, dst: Path, parts: dict[str, AqlmParts], vectors: dict[str, np.ndarray]) -> None:
    """dst: src with the matrices of `parts` in AQLM form, the float vectors of
    `vectors` (tuned norms) in place of src's, and float matrices left as Q8_0."""

    def replace(tensor: Tensor) -> list[Tensor] | None:
        name, shape, ggml_type = tensor.name, tensor.shape, tensor.ggml_type
        if name in parts:
            codes, cb, scales = parts[name]
            names = aqlm.tensor_names(name)
            return [Tensor.of(names["codes"], codes.view(np.int8)), Tensor.of(names["codebooks"], cb),
                    Tensor.of(names["scales"], scales)]
        if name in vectors:
            return [Tensor.of(name, vectors[name].astype(np.float32))]
        if len(shape) == 2 and ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) and shape[1] % 32 == 0:
            q = gguf.quants.quantize(_float_rows(tensor.data, ggml_type, shape), gguf.GGMLQuantizationType.Q8_0)
            return [Tensor(name, shape, GGMLType.Q8_0, q)]
        return None

    rewrite_gguf(src, dst, replace, aqlm.METADATA)


def _finetune_module():
    try:
        from . import aqlm_finetune
    except ImportError as e:
        raise QuantizeError(f"fine-tuning needs torch ({e}): pip install 'llamazip[finetune]'") from None
    return aqlm_finetune

"""The Llama-family transformer: weights straight from a GGUF map, a KV cache,
and one forward pass for both prompt processing (many tokens) and decoding (one).

Per layer, with x the residual stream of shape (tokens, dim):
    h = rmsnorm(x) * attn_norm
    q, k, v = h Wq, h Wk, h Wv; rotate q and k (RoPE); append k, v to the cache
    x += attention(q, cache) Wo            (grouped-query, causal)
    h = rmsnorm(x) * ffn_norm
    x += (silu(h Wgate) * (h Wup)) Wdown   (SwiGLU)
then logits = rmsnorm(x) * output_norm Woutput (the embedding when tied).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .ggml_types import GGMLType
from .gguf import GGUFError, GGUFFile
from .kernels import SUPPORTED_TYPES, QuantMatrix


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: QuantMatrix
    wk: QuantMatrix
    wv: QuantMatrix
    wo: QuantMatrix
    ffn_norm: np.ndarray
    w_gate: QuantMatrix
    w_up: QuantMatrix
    w_down: QuantMatrix


class _WeightLoader:
    """Looks tensors up by name and checks their shapes and types."""

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.gguf.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.gguf.path}: missing tensor {name!r}")
        if info.shape != shape:
            raise GGUFError(f"{self.gguf.path}: tensor {name!r} has shape {info.shape}, expected {shape}")
        return info

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def vector(self, name: str, size: int) -> np.ndarray:
        info = self._info(name, (size,))
        if info.ggml_type != GGMLType.F32:
            raise GGUFError(f"{self.gguf.path}: tensor {name!r} is {info.ggml_type.name}, expected F32")
        return self.gguf.tensor_data(name).view(np.float32).reshape(size)

    def matrix(self, name: str, rows: int, cols: int) -> QuantMatrix:
        info = self._info(name, (rows, cols))
        if info.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(f"{self.gguf.path}: tensor {name!r} has type {info.ggml_type.name}, "
                            f"which this runtime cannot compute with yet")
        return QuantMatrix(self.gguf.tensor_data(name), info.ggml_type, cols)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class Model:
    """A loaded model with its KV cache of `n_ctx` positions."""

    def __init__(self, gguf: GGUFFile, n_ctx: int | None = None):
        self.gguf = gguf
        cfg = self.config = ModelConfig.from_gguf(gguf)
        self.n_ctx = n_ctx or min(cfg.context_length, 4096)
        load = _WeightLoader(gguf)
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim

        self.token_embd = load.matrix("token_embd.weight", cfg.vocab_size, cfg.dim)
        self.output_norm = load.vector("output_norm.weight", cfg.dim)
        # Tied models read the embedding as the output head.
        self.output = (load.matrix("output.weight", cfg.vocab_size, cfg.dim)
                       if load.has("output.weight") else self.token_embd)
        self.layers = [
            Layer(
                attn_norm=load.vector(f"blk.{i}.attn_norm.weight", cfg.dim),
                wq=load.matrix(f"blk.{i}.attn_q.weight", q_dim, cfg.dim),
                wk=load.matrix(f"blk.{i}.attn_k.weight", kv_dim, cfg.dim),
                wv=load.matrix(f"blk.{i}.attn_v.weight", kv_dim, cfg.dim),
                wo=load.matrix(f"blk.{i}.attn_output.weight", cfg.dim, q_dim),
                ffn_norm=load.vector(f"blk.{i}.ffn_norm.weight", cfg.dim),
                w_gate=load.matrix(f"blk.{i}.ffn_gate.weight", cfg.n_ff, cfg.dim),
                w_up=load.matrix(f"blk.{i}.ffn_up.weight", cfg.n_ff, cfg.dim),
                w_down=load.matrix(f"blk.{i}.ffn_down.weight", cfg.dim, cfg.n_ff),
            )
            for i in range(cfg.n_layer)
        ]
        # Llama 3.1-style models divide each RoPE frequency by a stored factor.
        freq_factors = load.vector("rope_freqs.weight", cfg.n_rot // 2) if load.has("rope_freqs.weight") else None
        self._rope_cos, self._rope_sin = _rope_tables(cfg, self.n_ctx, freq_factors)

        # np.zeros maps untouched pages lazily: a large -c costs memory only as it fills.
        cache_shape = (cfg.n_layer, cfg.n_head_kv, self.n_ctx, cfg.head_dim)
        self.cache_k = np.zeros(cache_shape, dtype=np.float32)
        self.cache_v = np.zeros(cache_shape, dtype=np.float32)

    @property
    def weight_bytes_per_token(self) -> int:
        """Weight bytes one decoded token reads (what bounds decode speed)."""
        mats = [self.output] + [m for layer in self.layers
                                for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down)]
        return sum(m.nbytes for m in mats)

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Run `tokens` at positions start.. and return the logits of the last one.

        The cache must hold positions 0..start-1 already; entries from `start` on are
        overwritten, which is how a caller rewinds (e.g. to regenerate).
        """
        cfg = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n == 0 or start < 0 or start + n > self.n_ctx:
            raise ValueError(f"positions {start}..{start + n} do not fit the context of {self.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token id out of range 0..{cfg.vocab_size - 1}")

        x = self.token_embd.rows(tokens)
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, cfg.norm_eps)
            x = x + _linear(layer.wo, self._attention(i, layer, h, start))
            h = _rms_norm(x, layer.ffn_norm, cfg.norm_eps)
            x = x + _linear(layer.w_down, _silu(_linear(layer.w_gate, h)) * _linear(layer.w_up, h))
        last = _rms_norm(x[-1], self.output_norm, cfg.norm_eps)
        return self.output.matvec(np.ascontiguousarray(last, dtype=np.float32))

    def _attention(self, index: int, layer: Layer, h: np.ndarray, start: int) -> np.ndarray:
        cfg = self.config
        n, hd, n_kv = len(h), cfg.head_dim, cfg.n_head_kv
        group = cfg.n_head // n_kv
        q = _linear(layer.wq, h).reshape(n, cfg.n_head, hd)
        k = _linear(layer.wk, h).reshape(n, n_kv, hd)
        v = _linear(layer.wv, h).reshape(n, n_kv, hd)
        self._rotate(q, start)
        self._rotate(k, start)
        end = start + n
        self.cache_k[index, :, start:end] = k.transpose(1, 0, 2)
        self.cache_v[index, :, start:end] = v.transpose(1, 0, 2)
        keys, values = self.cache_k[index, :, :end], self.cache_v[index, :, :end]

        # Consecutive query heads share one key/value head: group them so one
        # batched product per key/value head covers all its queries.
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n, hd)
        scores = (qg @ keys.transpose(0, 2, 1)).reshape(n_kv, group, n, end)
        scores *= np.float32(1.0 / np.sqrt(hd))
        if n > 1:  # causal: query t (at position start+t) sees keys 0..start+t
            future = np.arange(end)[None, :] > (start + np.arange(n))[:, None]
            scores[:, :, future] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores.reshape(n_kv, group * n, end) @ values  # (n_kv, group*n, hd)
        return out.reshape(n_kv, group, n, hd).transpose(2, 0, 1, 3).reshape(n, cfg.n_head * hd)

    def _rotate(self, x: np.ndarray, start: int) -> None:
        """RoPE in place on (tokens, heads, head_dim), GGUF llama layout: adjacent pairs rotate."""
        n, half = len(x), self.config.n_rot // 2
        cos = self._rope_cos[start:start + n, None, :]
        sin = self._rope_sin[start:start + n, None, :]
        even = x[..., 0:2 * half:2].copy()
        odd = x[..., 1:2 * half:2]
        x[..., 0:2 * half:2] = even * cos - odd * sin
        x[..., 1:2 * half:2] = even * sin + odd * cos


def _linear(w: QuantMatrix, x: np.ndarray) -> np.ndarray:
    """x (tokens, in) -> (tokens, out): the matrix-vector kernel for one token."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 1:
        return w.matvec(x[0])[None, :]
    return w.matmul(x)


def _rope_tables(cfg: ModelConfig, n_ctx: int, freq_factors: np.ndarray | None):
    half = cfg.n_rot // 2
    inv_freq = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2 / cfg.n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = (np.arange(n_ctx, dtype=np.float64) / cfg.rope_linear_scale)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

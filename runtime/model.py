"""The Llama-family transformer: weights straight from a GGUF map, a KV cache,
and one forward pass for both prompt processing (many tokens) and decoding (one).

Per layer, with x the residual stream of shape (tokens, dim):
    h = rmsnorm(x) * attn_norm
    q, k, v = h Wq, h Wk, h Wv; rotate q and k (RoPE); append k, v to the cache
    x += attention(q, cache) Wo            (grouped-query, causal)
    h = rmsnorm(x) * ffn_norm
    x += (silu(h Wgate) * (h Wup)) Wdown   (SwiGLU)
then logits = rmsnorm(x) * output_norm Woutput (the embedding when tied).

Other architectures change a few steps (see `ArchitectureTraits`):
- qwen2: q, k, v get biases; RoPE rotates in the NEOX layout (halves, not pairs).
- gemma3: x starts as embedding * sqrt(dim); q and k heads are RMS-normed before
  RoPE; the attention and FFN outputs are RMS-normed before being added to x; the
  FFN gate is GELU (tanh form); local layers see only the last `sliding_window`
  positions and have their own RoPE base; logits may be soft-capped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .ggml_types import GGMLType
from .gguf import GGUFError, GGUFFile
from . import token_ops
from .jit import numba_enabled
from .weight_matrix import QuantMatrix
from .weight_types import WEIGHT_TYPES as SUPPORTED_TYPES
from .thread_tuner import ThreadTuner


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
    # Present only in architectures that have them; None elsewhere.
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # per head, shared by all heads
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None


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
        return name in self.gguf.tensors or self._is_aqlm(name)

    def _is_aqlm(self, name: str) -> bool:
        """Whether matrix `name` is stored as AQLM codes, codebooks and scales (see aqlm.py)."""
        from .aqlm import is_stored

        return name not in self.gguf.tensors and is_stored(self.gguf, name)

    def vector(self, name: str, size: int) -> np.ndarray:
        info = self._info(name, (size,))
        if info.ggml_type != GGMLType.F32:
            raise GGUFError(f"{self.gguf.path}: tensor {name!r} is {info.ggml_type.name}, expected F32")
        return self.gguf.tensor_data(name).view(np.float32).reshape(size)

    def optional_vector(self, name: str, size: int) -> np.ndarray | None:
        return self.vector(name, size) if self.has(name) else None

    def matrix(self, name: str, rows: int, cols: int) -> QuantMatrix:
        if self._is_aqlm(name):
            from .aqlm import AqlmMatrix

            return AqlmMatrix.from_gguf(self.gguf, name, rows, cols)  # same interface as QuantMatrix
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


_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return np.float32(0.5) * x * (1.0 + np.tanh(_GELU_C * (x + np.float32(0.044715) * x * x * x)))


_ACTIVATIONS = {"silu": _silu, "gelu_tanh": _gelu_tanh}


# The head's exact re-scoring (Model._head): the least margin below the
# largest logit (int8 rounding errors seen on the real models: 0.05-0.3), and
# a cap on the rows re-scored (each one a float32 dot product).
_RESCORE_MARGIN = 1.0
_RESCORE_LIMIT = 4096
_PROBE_ROWS = 32  # rows spread over the vocabulary whose rounding error sizes the margin


class Model:
    """A loaded model with its KV cache of `n_ctx` positions."""

    # Set to pick the decoding thread count by timing tokens (runtime/thread_tuner.py).
    thread_tuner: ThreadTuner | None = None

    def __init__(self, gguf: GGUFFile, n_ctx: int | None = None):
        self.gguf = gguf
        cfg = self.config = ModelConfig.from_gguf(gguf)
        self.n_ctx = n_ctx or min(cfg.context_length, 4096)
        load = _WeightLoader(gguf)

        self.token_embd = load.matrix("token_embd.weight", cfg.vocab_size, cfg.dim)
        self.output_norm = load.vector("output_norm.weight", cfg.dim)
        # Tied models read the embedding as the output head.
        self.output = (load.matrix("output.weight", cfg.vocab_size, cfg.dim)
                       if load.has("output.weight") else self.token_embd)
        self._probe_rows = np.unique(np.linspace(0, cfg.vocab_size - 1, _PROBE_ROWS).astype(np.int64))
        self.layers = [_load_layer(load, cfg, i) for i in range(cfg.n_layer)]
        # Llama 3.1-style models divide each RoPE frequency by a stored factor.
        freq_factors = load.optional_vector("rope_freqs.weight", cfg.n_rot // 2)
        # (cos, sin) per layer; layers with the same RoPE base and scale share their tables.
        tables = {rope: _rope_tables(cfg.n_rot, *rope, self.n_ctx, freq_factors)
                  for rope in {cfg.layer_rope(i) for i in range(cfg.n_layer)}}
        self._rope = [tables[cfg.layer_rope(i)] for i in range(cfg.n_layer)]

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

    def forward(self, tokens: np.ndarray, start: int, logits_from: int | None = None) -> np.ndarray:
        """Run `tokens` at positions start.. and return the logits of the last one,
        (vocab,); or, with `logits_from` = i, those of tokens i.. as (n - i, vocab)
        (perplexity scores every position of a chunk).

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

        if logits_from is not None and not 0 <= logits_from < n:
            raise ValueError(f"logits_from {logits_from} is not a position of the {n} tokens")
        if n == 1 and logits_from is None and numba_enabled():
            if self.thread_tuner is not None:
                return self.thread_tuner.run(lambda: self._decode_token(int(tokens[0]), start))
            return self._decode_token(int(tokens[0]), start)
        x = self.token_embd.rows(tokens)
        if cfg.traits.scale_embedding:
            x = x * np.float32(np.sqrt(cfg.dim))
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, cfg.norm_eps)
            attn = _linear(layer.wo, self._attention(i, layer, h, start))
            x = x + self._post_norm(attn, layer.post_attn_norm)
            h = _rms_norm(x, layer.ffn_norm, cfg.norm_eps)
            x = x + self._post_norm(self._ffn(layer, h), layer.post_ffn_norm)
        if logits_from is None:
            last = _rms_norm(x[-1], self.output_norm, cfg.norm_eps)
            logits = self._head(np.ascontiguousarray(last, dtype=np.float32))
        else:
            logits = _linear(self.output, _rms_norm(x[logits_from:], self.output_norm, cfg.norm_eps))
        if cfg.final_logit_softcap:
            cap = np.float32(cfg.final_logit_softcap)
            logits = cap * np.tanh(logits / cap)
        return logits

    def _decode_token(self, token: int, pos: int) -> np.ndarray:
        """forward() for one token: the same steps with the vector work between
        the matrix products done by compiled calls (see token_ops)."""
        cfg = self.config
        eps = np.float32(cfg.norm_eps)
        x = self.token_embd.rows(np.array([token]))[0]
        if cfg.traits.scale_embedding:
            x *= np.float32(np.sqrt(cfg.dim))
        h = np.empty(cfg.dim, np.float32)
        attn = np.empty((cfg.n_head, cfg.head_dim), np.float32)
        gate_up = token_ops.gelu_tanh_mul if cfg.traits.ffn_activation == "gelu_tanh" else token_ops.silu_mul
        no_norm = np.zeros(0, np.float32)
        scale = np.float32(cfg.attention_scale)
        for i, layer in enumerate(self.layers):
            token_ops.rms_norm_into(x, layer.attn_norm, eps, h)
            q = _add_bias(layer.wq.matvec(h), layer.q_bias).reshape(cfg.n_head, cfg.head_dim)
            k = _add_bias(layer.wk.matvec(h), layer.k_bias).reshape(cfg.n_head_kv, cfg.head_dim)
            v = _add_bias(layer.wv.matvec(h), layer.v_bias).reshape(cfg.n_head_kv, cfg.head_dim)
            window = cfg.layer_window(i)
            first = max(0, pos - window + 1) if window else 0
            cos, sin = self._rope[i]
            long = (pos + 1 - first) * cfg.n_head > token_ops.SERIAL_ATTENTION_PAIRS
            attend = token_ops.attend_parallel if long else token_ops.attend
            attend(q, k, v, self.cache_k[i], self.cache_v[i], pos, first, cos[pos], sin[pos],
                             cfg.traits.rope_neox,
                             layer.q_norm if layer.q_norm is not None else no_norm,
                             layer.k_norm if layer.k_norm is not None else no_norm,
                             eps, scale, attn)
            self._add_residual(x, layer.wo.matvec(attn.reshape(-1)), layer.post_attn_norm, eps)
            token_ops.rms_norm_into(x, layer.ffn_norm, eps, h)
            gate = layer.w_gate.matvec(h)
            gate_up(gate, layer.w_up.matvec(h))
            self._add_residual(x, layer.w_down.matvec(gate), layer.post_ffn_norm, eps)
        token_ops.rms_norm_into(x, self.output_norm, eps, h)
        logits = self._head(h)
        if cfg.final_logit_softcap:
            cap = np.float32(cfg.final_logit_softcap)
            logits = cap * np.tanh(logits / cap)
        return logits

    def _head(self, h: np.ndarray) -> np.ndarray:
        """Logits for the normed last state h. Where the head's matvec rounds h
        to int8 (int8_matvec), the leading logits, which pick the token, are
        then computed again from h in float32: every logit within a margin of
        the largest, the margin at least 4x the largest rounding error seen
        (on a fixed spread of rows and on the leading ones), so a token left
        out would need twice that error to have won. Rounded, SmolLM2 took
        "L'" over "The" (0.09 apart) in answering "What is the capital of France?"."""
        logits = self.output.matvec(h)
        if not self.output.rounds_input:
            return logits
        worst = float(np.abs(self.output.rows(self._probe_rows) @ h - logits[self._probe_rows]).max())
        margin = max(np.float32(_RESCORE_MARGIN), 4 * worst)
        while True:
            leading = np.flatnonzero(logits >= logits.max() - margin)
            if len(leading) > _RESCORE_LIMIT:  # a flat distribution: the largest of them
                leading = leading[np.argpartition(logits[leading], -_RESCORE_LIMIT)[-_RESCORE_LIMIT:]]
            exact = self.output.rows(leading) @ h
            worst = max(worst, float(np.abs(exact - logits[leading]).max()))
            if 4 * worst <= margin or len(leading) >= _RESCORE_LIMIT:
                break
            margin = 4 * worst
        logits[leading] = exact
        return logits

    @staticmethod
    def _add_residual(x: np.ndarray, h: np.ndarray, post_norm: np.ndarray | None, eps: np.float32) -> None:
        if post_norm is None:
            x += h
        else:
            token_ops.add_normed(x, h, post_norm, eps)

    def _post_norm(self, h: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        return h if weight is None else _rms_norm(h, weight, self.config.norm_eps)

    def _ffn(self, layer: Layer, h: np.ndarray) -> np.ndarray:
        activation = _ACTIVATIONS[self.config.traits.ffn_activation]
        return _linear(layer.w_down, activation(_linear(layer.w_gate, h)) * _linear(layer.w_up, h))

    def _attention(self, index: int, layer: Layer, h: np.ndarray, start: int) -> np.ndarray:
        cfg = self.config
        n, hd, n_kv = len(h), cfg.head_dim, cfg.n_head_kv
        group = cfg.n_head // n_kv
        q = _linear(layer.wq, h, layer.q_bias).reshape(n, cfg.n_head, hd)
        k = _linear(layer.wk, h, layer.k_bias).reshape(n, n_kv, hd)
        v = _linear(layer.wv, h, layer.v_bias).reshape(n, n_kv, hd)
        if cfg.traits.qk_norm:
            q = _rms_norm(q, layer.q_norm, cfg.norm_eps)
            k = _rms_norm(k, layer.k_norm, cfg.norm_eps)
        self._rotate(q, index, start)
        self._rotate(k, index, start)
        end = start + n
        self.cache_k[index, :, start:end] = k.transpose(1, 0, 2)
        self.cache_v[index, :, start:end] = v.transpose(1, 0, 2)
        # A sliding-window layer reads only the keys its earliest query can see.
        window = cfg.layer_window(index)
        first = max(0, start - window + 1) if window else 0
        keys, values = self.cache_k[index, :, first:end], self.cache_v[index, :, first:end]
        n_keys = end - first

        # Consecutive query heads share one key/value head: group them so one
        # batched product per key/value head covers all its queries.
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n, hd)
        scores = (qg @ keys.transpose(0, 2, 1)).reshape(n_kv, group, n, n_keys)
        scores *= np.float32(cfg.attention_scale)
        hidden = _hidden_keys(start, n, first, window)
        if hidden is not None:
            scores[:, :, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores.reshape(n_kv, group * n, n_keys) @ values  # (n_kv, group*n, hd)
        return out.reshape(n_kv, group, n, hd).transpose(2, 0, 1, 3).reshape(n, cfg.n_head * hd)

    def _rotate(self, x: np.ndarray, index: int, start: int) -> None:
        """RoPE in place on (tokens, heads, head_dim) with layer `index`'s tables."""
        n, half = len(x), self.config.n_rot // 2
        cos, sin = self._rope[index]
        cos, sin = cos[start:start + n, None, :], sin[start:start + n, None, :]
        if self.config.traits.rope_neox:  # dimension i turns with i + half
            a, b = slice(0, half), slice(half, 2 * half)
        else:  # GGUF llama layout: adjacent pairs (2i, 2i+1) turn together
            a, b = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
        first = x[..., a].copy()
        second = x[..., b]
        x[..., a] = first * cos - second * sin
        x[..., b] = first * sin + second * cos


def _load_layer(load: _WeightLoader, cfg: ModelConfig, i: int) -> Layer:
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    traits = cfg.traits
    return Layer(
        attn_norm=load.vector(f"blk.{i}.attn_norm.weight", cfg.dim),
        wq=load.matrix(f"blk.{i}.attn_q.weight", q_dim, cfg.dim),
        wk=load.matrix(f"blk.{i}.attn_k.weight", kv_dim, cfg.dim),
        wv=load.matrix(f"blk.{i}.attn_v.weight", kv_dim, cfg.dim),
        wo=load.matrix(f"blk.{i}.attn_output.weight", cfg.dim, q_dim),
        ffn_norm=load.vector(f"blk.{i}.ffn_norm.weight", cfg.dim),
        w_gate=load.matrix(f"blk.{i}.ffn_gate.weight", cfg.n_ff, cfg.dim),
        w_up=load.matrix(f"blk.{i}.ffn_up.weight", cfg.n_ff, cfg.dim),
        w_down=load.matrix(f"blk.{i}.ffn_down.weight", cfg.dim, cfg.n_ff),
        # Biases are optional in any architecture, as in llama.cpp (qwen2 has them).
        q_bias=load.optional_vector(f"blk.{i}.attn_q.bias", q_dim),
        k_bias=load.optional_vector(f"blk.{i}.attn_k.bias", kv_dim),
        v_bias=load.optional_vector(f"blk.{i}.attn_v.bias", kv_dim),
        q_norm=load.vector(f"blk.{i}.attn_q_norm.weight", cfg.head_dim) if traits.qk_norm else None,
        k_norm=load.vector(f"blk.{i}.attn_k_norm.weight", cfg.head_dim) if traits.qk_norm else None,
        post_attn_norm=load.vector(f"blk.{i}.post_attention_norm.weight", cfg.dim) if traits.post_norms else None,
        post_ffn_norm=load.vector(f"blk.{i}.post_ffw_norm.weight", cfg.dim) if traits.post_norms else None,
    )


def _hidden_keys(start: int, n: int, first: int, window: int) -> np.ndarray | None:
    """(queries, keys) mask of the keys first..start+n-1 that queries at start..start+n-1
    must not see: later positions (causal) and, with a window, positions `window` or
    more behind. None when every key is visible (one decoded token, no window cut)."""
    query_pos = start + np.arange(n)[:, None]
    key_pos = first + np.arange(start + n - first)[None, :]
    hidden = key_pos > query_pos
    if window:
        hidden |= query_pos - key_pos >= window
    return hidden if hidden.any() else None


def _linear(w: QuantMatrix, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x (tokens, in) -> (tokens, out), plus the bias if any: the matrix-vector kernel for one token."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = w.matvec(x[0])[None, :] if len(x) == 1 else w.matmul(x)
    if bias is not None:
        out += bias
    return out


def _add_bias(out: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    if bias is not None:
        out += bias
    return out


def _rope_tables(n_rot: int, base: float, linear_scale: float, n_ctx: int,
                 freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    half = n_rot // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2 / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = (np.arange(n_ctx, dtype=np.float64) / linear_scale)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

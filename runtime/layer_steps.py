"""The steps of a transformer layer: for many tokens of one sequence, for one
token, and for one token of each of several sequences.

`Model.forward` states the layer's math once, as calls to a steps object:
- `PromptSteps`: x is (tokens, dim); numpy array operations and the matmul
  kernels, where each call has enough work for numpy to be fast.
- `TokenSteps`: x is (dim,), one decoded token; the matvec kernels, and the
  vector work between them (norms, RoPE, the cache write, attention, the FFN
  gate) as compiled calls (token_ops.py) into buffers reused across layers.
  As numpy calls those steps cost ~150 us per layer, a third of SmolLM2's
  decode time, almost all of it call overhead on 576-float vectors.
- `BatchSteps`: x is (sequences, dim), one decoded token of each of several
  sequences, each at its own position in its own slot of the KV cache. The
  linear layers take all rows in one `matmul` (the weights read once per step,
  not once per sequence); every other step is one compiled call over all rows
  running TokenSteps' kernel on each, so a row differs from its own TokenSteps
  pass only where matmul's row differs from matvec.
All give the same results up to float32 rounding.

The cache holds `n_slots` independent sequences: a layer's cache is
(n_slots, n_kv, n_ctx, head_dim) and each steps object reads and writes its slot's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import token_ops
from .config import ModelConfig
from .jit import numba_enabled
from .weight_matrix import OutputHead, RoundedRows, WeightMatrix

_NO_HEAD_NORM = np.zeros(0, np.float32)  # token_ops' "no per-head norm" (architectures without QK-norm)


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention needs besides q, k and v."""

    # float32, or float16 bits (uint16) where decoding rounds to int8 (Model)
    cache_k: np.ndarray  # (n_slots, n_kv, blocks, head_dim, KEY_BLOCK): this layer's keys (token_ops.KEY_BLOCK)
    cache_v: np.ndarray  # (n_slots, n_kv, n_ctx, head_dim)
    cos: np.ndarray  # (n_ctx, n_rot / 2) RoPE tables of this layer's base and scale
    sin: np.ndarray
    window: int  # a sliding-window layer sees the last `window` positions; 0: all
    q_norm: np.ndarray | None  # per-head RMSNorm weights (QK-norm architectures), else None
    k_norm: np.ndarray | None

    def first_visible(self, pos: int) -> int:
        """The earliest position a query at `pos` sees."""
        return max(0, pos - self.window + 1) if self.window else 0


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return np.float32(0.5) * x * (1.0 + np.tanh(_GELU_C * (x + np.float32(0.044715) * x * x * x)))


# The FFN gate's activation by ArchitectureTraits.ffn_activation: (numpy, compiled in place).
_ACTIVATIONS = {"silu": (_silu, token_ops.silu_mul), "gelu_tanh": (_gelu_tanh, token_ops.gelu_tanh_mul)}


class PromptSteps:
    """The layer's steps over x of shape (tokens, dim), for tokens at positions start..
    of the sequence in cache slot `slot`."""

    def __init__(self, config: ModelConfig, start: int, n: int, slot: int = 0):
        self.cfg, self.start, self.n, self.slot = config, start, n, slot
        self._activation = _ACTIVATIONS[config.traits.ffn_activation]
        self._rounded = RoundedRows()  # each layer's normed x, rounded once for q, k and v (gate and up)

    def norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """x RMS-normed along its last axis, a new array (numpy's took 3-4 passes and
        temporaries: 4% of Gemma 3's prompt, four norms a layer)."""
        if not numba_enabled():
            return rms_norm(x, weight, self.cfg.norm_eps)
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        out = np.empty_like(rows)
        token_ops.rms_norm_rows(rows, weight, np.float32(self.cfg.norm_eps), out)
        return out.reshape(x.shape)

    def linear(self, w: WeightMatrix, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """x (tokens, in) -> (tokens, out), plus the bias if any: the matvec kernel for one token."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = w.prompt_matvec(x[0])[None, :] if len(x) == 1 else w.prompt_matmul(x, self._rounded)
        if bias is not None:
            out += bias
        return out

    def gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        if not numba_enabled():
            return self._activation[0](gate) * up
        gate = np.ascontiguousarray(gate)
        self._activation[1](gate.reshape(-1), np.ascontiguousarray(up).reshape(-1))  # in place
        return gate

    def add(self, x: np.ndarray, h: np.ndarray, post_norm: np.ndarray | None) -> np.ndarray:
        """x + h, h RMS-normed first where the architecture has post-norms; a new array
        (AQLM's calibration runs a layer twice on the same x)."""
        if post_norm is None or not numba_enabled():
            return x + (h if post_norm is None else self.norm(h, post_norm))
        out = np.array(x, dtype=np.float32)
        token_ops.add_normed_rows(out, np.ascontiguousarray(h, dtype=np.float32), post_norm,
                                  np.float32(self.cfg.norm_eps))
        return out

    def attend(self, layer: LayerAttention, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Causal grouped-query attention of the tokens' q (tokens, n_head * hd) over the
        cache, after storing their k and v in it; returns (tokens, n_head * hd)."""
        cfg, n, start = self.cfg, self.n, self.start
        hd, n_kv = cfg.head_dim, cfg.n_head_kv
        group = cfg.n_head // n_kv
        q, k, v = q.reshape(n, cfg.n_head, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        if numba_enabled():
            out = np.empty((n, cfg.n_head, hd), np.float32)
            firsts = np.array([layer.first_visible(start + i) for i in range(n)], np.int64)
            token_ops.attend_prompt(
                np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
                layer.cache_k[self.slot], layer.cache_v[self.slot], start, firsts, layer.cos, layer.sin,
                cfg.traits.rope_neox, _head_norm(layer.q_norm), _head_norm(layer.k_norm), np.float32(cfg.norm_eps),
                np.float32(cfg.attention_scale), out)
            return out.reshape(n, cfg.n_head * hd)
        if layer.q_norm is not None:
            q = self.norm(q, layer.q_norm)
            k = self.norm(k, layer.k_norm)
        self._rotate(q, layer)
        self._rotate(k, layer)
        end = start + n
        cache_k, cache_v = layer.cache_k[self.slot], layer.cache_v[self.slot]
        stored = np.arange(start, end)
        cache_k[:, stored // token_ops.KEY_BLOCK, :, stored % token_ops.KEY_BLOCK] = k  # (n, n_kv, hd): the indexed axes come first
        cache_v[:, start:end] = v.transpose(1, 0, 2)
        # A sliding-window layer reads only the keys its earliest query can see.
        first = layer.first_visible(start)
        seen = np.arange(first, end)
        keys = cache_k[:, seen // token_ops.KEY_BLOCK, :, seen % token_ops.KEY_BLOCK].transpose(1, 0, 2)
        values = cache_v[:, first:end]
        n_keys = end - first

        # Consecutive query heads share one key/value head: group them so one
        # batched product per key/value head covers all its queries.
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n, hd)
        scores = (qg @ keys.transpose(0, 2, 1)).reshape(n_kv, group, n, n_keys)
        scores *= np.float32(cfg.attention_scale)
        hidden = _hidden_keys(start, n, first, layer.window)
        if hidden is not None:
            scores[:, :, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores.reshape(n_kv, group * n, n_keys) @ values  # (n_kv, group*n, hd)
        return out.reshape(n_kv, group, n, hd).transpose(2, 0, 1, 3).reshape(n, cfg.n_head * hd)

    def _rotate(self, x: np.ndarray, layer: LayerAttention) -> None:
        """RoPE in place on (tokens, heads, head_dim)."""
        half = self.cfg.n_rot // 2
        cos = layer.cos[self.start:self.start + self.n, None, :]
        sin = layer.sin[self.start:self.start + self.n, None, :]
        if self.cfg.traits.rope_neox:  # dimension i turns with i + half
            a, b = slice(0, half), slice(half, 2 * half)
        else:  # GGUF llama layout: adjacent pairs (2i, 2i+1) turn together
            a, b = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
        first = x[..., a].copy()
        second = x[..., b]
        x[..., a] = first * cos - second * sin
        x[..., b] = first * sin + second * cos

    @staticmethod
    def embed(embedding: WeightMatrix, tokens: np.ndarray) -> np.ndarray:
        return embedding.rows(tokens)

    def logits(self, head: OutputHead, x: np.ndarray, norm: np.ndarray, logits_from: int | None) -> np.ndarray:
        """The last token's logits (vocab,), or with logits_from = i those of tokens i.. (n - i, vocab)."""
        if logits_from is None:
            return head.logits(np.ascontiguousarray(self.norm(x[-1], norm), dtype=np.float32), prompt=True)
        return head.all_logits(self.norm(x[logits_from:], norm))


class TokenSteps:
    """The layer's steps over x of shape (dim,): one token at position `pos` of cache slot `slot`.

    norm() writes into one buffer that every layer reuses: its result is read
    (by the q, k, v or gate and up products) before the next norm overwrites it.
    """

    def __init__(self, config: ModelConfig, pos: int, slot: int = 0):
        self.cfg, self.pos, self.slot = config, pos, slot
        self.eps = np.float32(config.norm_eps)
        self._scale = np.float32(config.attention_scale)
        self._h = np.empty(config.dim, np.float32)
        self._attn = np.empty((config.n_head, config.head_dim), np.float32)
        self._activation = _ACTIVATIONS[config.traits.ffn_activation][1]

    def norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        token_ops.rms_norm_into(x, weight, self.eps, self._h)
        return self._h

    @staticmethod
    def linear(w: WeightMatrix, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        out = w.matvec(x)
        if bias is not None:
            out += bias
        return out

    def gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        self._activation(gate, up)  # in place
        return gate

    def add(self, x: np.ndarray, h: np.ndarray, post_norm: np.ndarray | None) -> np.ndarray:
        if post_norm is None:
            x += h
        else:
            token_ops.add_normed(x, h, post_norm, self.eps)
        return x

    def attend(self, layer: LayerAttention, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        _attend_token(self.cfg, layer, q, k, v, self.pos, self.slot, self.eps, self._scale, self._attn)
        return self._attn.reshape(-1)

    @staticmethod
    def embed(embedding: WeightMatrix, tokens: np.ndarray) -> np.ndarray:
        return embedding.rows(tokens)[0]

    def logits(self, head: OutputHead, x: np.ndarray, norm: np.ndarray, logits_from: int | None) -> np.ndarray:
        return head.logits(self.norm(x, norm))


class BatchSteps:
    """The layer's steps over x of shape (sequences, dim): row i is one token at
    position positions[i] of the sequence in cache slot slots[i] (a slot may take
    several rows, at consecutive positions: drafted tokens).

    The linear layers multiply all rows at once (`WeightMatrix.matmul`: one pass
    over the weights); norms, attention and the gate are one compiled call for
    all rows, each row through TokenSteps' own kernel against its own slot and
    position. Row by row from Python, those calls had cost as much per row as a
    whole small matrix product (SmolLM2: 5 calls a layer a row).
    """

    def __init__(self, config: ModelConfig, positions: list[int], slots: list[int], logits_rows: list[int]):
        self.cfg, self.positions, self.slots, self.logits_rows = config, positions, slots, logits_rows
        n = len(positions)
        self.eps = np.float32(config.norm_eps)
        self._scale = np.float32(config.attention_scale)
        self._h = np.empty((n, config.dim), np.float32)
        self._attn = np.empty((n, config.n_head, config.head_dim), np.float32)
        self._activation = _ACTIVATIONS[config.traits.ffn_activation][1]
        self._positions = np.array(positions, np.int64)
        self._slots = np.array(slots, np.int64)
        self._firsts: dict[int, np.ndarray] = {}  # per attention window: the first key each row sees

    def norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        token_ops.rms_norm_rows(x, weight, self.eps, self._h)
        return self._h

    @staticmethod
    def linear(w: WeightMatrix, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        out = w.matmul(x)
        if bias is not None:
            out += bias
        return out

    def gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        self._activation(gate.reshape(-1), up.reshape(-1))  # elementwise, in place: all rows in one call
        return gate

    def add(self, x: np.ndarray, h: np.ndarray, post_norm: np.ndarray | None) -> np.ndarray:
        if post_norm is None:
            x += h
        else:
            token_ops.add_normed_rows(x, h, post_norm, self.eps)
        return x

    def attend(self, layer: LayerAttention, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        cfg, n = self.cfg, len(self.positions)
        firsts = self._firsts.get(layer.window)
        if firsts is None:
            firsts = self._firsts[layer.window] = np.array([layer.first_visible(p) for p in self.positions], np.int64)
        pairs = int((self._positions + 1 - firsts).sum()) * cfg.n_head
        attend = token_ops.attend_rows_parallel if pairs > token_ops.SERIAL_ROWS_PAIRS else token_ops.attend_rows
        attend(
            q.reshape(n, cfg.n_head, cfg.head_dim), k.reshape(n, cfg.n_head_kv, cfg.head_dim),
            v.reshape(n, cfg.n_head_kv, cfg.head_dim), layer.cache_k, layer.cache_v, self._positions,
            self._slots, firsts, layer.cos, layer.sin, cfg.traits.rope_neox, _head_norm(layer.q_norm),
            _head_norm(layer.k_norm), self.eps, self._scale, self._attn)
        return self._attn.reshape(n, -1)

    @staticmethod
    def embed(embedding: WeightMatrix, tokens: np.ndarray) -> np.ndarray:
        return embedding.rows(tokens)

    def logits(self, head: OutputHead, x: np.ndarray, norm: np.ndarray, logits_from: int | None) -> np.ndarray:
        """(len(logits_rows), vocab): each row what OutputHead.logits gives it alone, the head read once."""
        if not self.logits_rows:
            return np.empty((0, head.matrix.shape[0]), np.float32)
        h = self.norm(x, norm)
        return head.logits_of_rows(h if len(self.logits_rows) == len(h) else h[self.logits_rows])


def _head_norm(weight: np.ndarray | None) -> np.ndarray:
    """token_ops' per-head norm weights: size 0 for "none" (architectures without QK-norm)."""
    return _NO_HEAD_NORM if weight is None else weight


def _attend_token(cfg: ModelConfig, layer: LayerAttention, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  pos: int, slot: int, eps: np.float32, scale: np.float32, out: np.ndarray) -> None:
    """One token's attention at `pos` of cache slot `slot`, compiled, into out (n_head, head_dim)."""
    first = layer.first_visible(pos)
    long = (pos + 1 - first) * cfg.n_head > token_ops.SERIAL_ATTENTION_PAIRS
    attend = token_ops.attend_parallel if long else token_ops.attend
    attend(q.reshape(cfg.n_head, cfg.head_dim), k.reshape(cfg.n_head_kv, cfg.head_dim),
           v.reshape(cfg.n_head_kv, cfg.head_dim), layer.cache_k[slot], layer.cache_v[slot], pos, first,
           layer.cos[pos], layer.sin[pos], cfg.traits.rope_neox, _head_norm(layer.q_norm), _head_norm(layer.k_norm),
           eps, scale, out)


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

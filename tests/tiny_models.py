"""Tiny random Llama, Qwen2 and Gemma 3 models written as GGUF with gguf-py (a
writer we did not write), each with an independent float64 forward pass written
from the architecture's math (explicit loops, one token at a time), to check our
runtime against.

The vocabulary is byte-level: 256 single-byte tokens and two control tokens, so
the same file also drives the tokenizer and the CLI. TinyQwen2 and TinyGemma3
reuse TinyLlama's vocabulary, weights and writer, and add what their
architecture adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import gguf
import numpy as np

# bytes_to_unicode of GPT-2: printable stand-ins for every byte.
_PRINTABLE = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))


def _byte_strings() -> list[str]:
    mapping, extra = {}, 0
    for b in range(256):
        if b in _PRINTABLE:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x) + eps) * weight


def _rope_neox(vec: np.ndarray, pos: float, base: float) -> np.ndarray:
    """NEOX layout: dimension i turns with dimension i + d/2, by pos * base^(-2i/d)."""
    half = len(vec) // 2
    out = vec.copy()
    for i in range(half):
        angle = pos * base ** (-2.0 * i / len(vec))
        a, b = vec[i], vec[i + half]
        out[i] = a * np.cos(angle) - b * np.sin(angle)
        out[i + half] = a * np.sin(angle) + b * np.cos(angle)
    return out


def _attend(query: np.ndarray, keys: list[np.ndarray], values: list[np.ndarray], scale: float) -> np.ndarray:
    scores = np.array([scale * (query @ key) for key in keys])
    p = np.exp(scores - scores.max())
    p /= p.sum()
    return sum(pj * value for pj, value in zip(p, values))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@dataclass
class TinyLlama:
    ARCH: ClassVar[str] = "llama"

    dim: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 96
    head_dim: int = 0  # 0: dim // n_head
    rope_base: float = 10000.0
    eps: float = 1e-5
    tied: bool = True
    add_bos: bool = True
    weight_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    seed: int = 0
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # float32, numpy shapes

    @property
    def vocab(self) -> list[str]:
        return _byte_strings() + ["<|bos|>", "<|eos|>"]

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_head
        rng = self.rng = np.random.default_rng(self.seed)  # subclasses draw their extra weights from it
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        v = len(self.vocab)

        def mat(rows, cols):
            return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

        def norm():
            return (1.0 + 0.1 * rng.standard_normal(self.dim)).astype(np.float32)

        t = self.tensors
        t["token_embd.weight"] = rng.standard_normal((v, self.dim)).astype(np.float32)
        t["output_norm.weight"] = norm()
        if not self.tied:
            t["output.weight"] = mat(v, self.dim)
        for i in range(self.n_layer):
            t[f"blk.{i}.attn_norm.weight"] = norm()
            t[f"blk.{i}.attn_q.weight"] = mat(q, self.dim)
            t[f"blk.{i}.attn_k.weight"] = mat(kv, self.dim)
            t[f"blk.{i}.attn_v.weight"] = mat(kv, self.dim)
            t[f"blk.{i}.attn_output.weight"] = mat(self.dim, q)
            t[f"blk.{i}.ffn_norm.weight"] = norm()
            t[f"blk.{i}.ffn_gate.weight"] = mat(self.n_ff, self.dim)
            t[f"blk.{i}.ffn_up.weight"] = mat(self.n_ff, self.dim)
            t[f"blk.{i}.ffn_down.weight"] = mat(self.dim, self.n_ff)

    def write(self, path: Path) -> Path:
        w = gguf.GGUFWriter(str(path), self.ARCH)
        w.add_block_count(self.n_layer)
        w.add_context_length(256)
        w.add_embedding_length(self.dim)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(self.rope_base)
        w.add_layer_norm_rms_eps(self.eps)
        if self.head_dim != self.dim // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        self.add_hyperparameters(w)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(self.vocab)
        w.add_token_types([1] * 256 + [3, 3])
        w.add_token_merges([])
        w.add_bos_token_id(256)
        w.add_eos_token_id(257)
        w.add_add_bos_token(self.add_bos)
        for name, data in self.tensors.items():
            if data.ndim == 2 and self.weight_type != gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, gguf.quants.quantize(data, self.weight_type), raw_dtype=self.weight_type)
            else:
                w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    def add_hyperparameters(self, w: gguf.GGUFWriter) -> None:
        """Metadata an architecture adds to Llama's (for subclasses)."""

    def stored(self, name: str) -> np.ndarray:
        """The weight as the file holds it (after quantization), in float64."""
        data = self.tensors[name]
        if data.ndim == 2 and self.weight_type != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.dequantize(gguf.quants.quantize(data, self.weight_type), self.weight_type)
        return data.astype(np.float64)

    def reference_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position, float64, one token at a time with explicit loops."""
        hd = self.head_dim
        group = self.n_head // self.n_head_kv
        w = self.stored

        def rope(vec, pos):
            # pairs (2i, 2i+1) as complex numbers, turned by pos * base^(-2i/hd)
            pairs = vec[0::2] + 1j * vec[1::2]
            pairs = pairs * np.exp(1j * pos * self.rope_base ** (-np.arange(hd // 2) * 2.0 / hd))
            out = np.empty_like(vec)
            out[0::2], out[1::2] = pairs.real, pairs.imag
            return out

        keys = [[] for _ in range(self.n_layer)]
        values = [[] for _ in range(self.n_layer)]
        all_logits = []
        for pos, token in enumerate(tokens):
            x = w("token_embd.weight")[token].copy()
            for i in range(self.n_layer):
                h = _rms(x, w(f"blk.{i}.attn_norm.weight"), self.eps)
                q = (w(f"blk.{i}.attn_q.weight") @ h).reshape(self.n_head, hd)
                k = (w(f"blk.{i}.attn_k.weight") @ h).reshape(self.n_head_kv, hd)
                v = (w(f"blk.{i}.attn_v.weight") @ h).reshape(self.n_head_kv, hd)
                keys[i].append(np.array([rope(k[j], pos) for j in range(self.n_head_kv)]))
                values[i].append(v)
                heads = []
                for head in range(self.n_head):
                    kvh = head // group
                    qh = rope(q[head], pos)
                    scores = np.array([qh @ kk[kvh] for kk in keys[i]]) / np.sqrt(hd)
                    p = np.exp(scores - scores.max())
                    p /= p.sum()
                    heads.append(sum(pj * vv[kvh] for pj, vv in zip(p, values[i])))
                x = x + w(f"blk.{i}.attn_output.weight") @ np.concatenate(heads)
                h = _rms(x, w(f"blk.{i}.ffn_norm.weight"), self.eps)
                gate = w(f"blk.{i}.ffn_gate.weight") @ h
                up = w(f"blk.{i}.ffn_up.weight") @ h
                x = x + w(f"blk.{i}.ffn_down.weight") @ (_silu(gate) * up)
            head_w = w("token_embd.weight") if self.tied else w("output.weight")
            all_logits.append(head_w @ _rms(x, w("output_norm.weight"), self.eps))
        return np.array(all_logits)


@dataclass
class TinyQwen2(TinyLlama):
    """Llama plus biases on q, k and v, with NEOX RoPE; untied head by default."""

    ARCH: ClassVar[str] = "qwen2"
    tied: bool = False

    def __post_init__(self):
        super().__post_init__()
        for i in range(self.n_layer):
            for name, size in (("q", self.n_head), ("k", self.n_head_kv), ("v", self.n_head_kv)):
                bias = 0.5 * self.rng.standard_normal(size * self.head_dim)
                self.tensors[f"blk.{i}.attn_{name}.bias"] = bias.astype(np.float32)

    def reference_logits(self, tokens: list[int]) -> np.ndarray:
        hd, group, w = self.head_dim, self.n_head // self.n_head_kv, self.stored
        keys = [[] for _ in range(self.n_layer)]
        values = [[] for _ in range(self.n_layer)]
        all_logits = []
        for pos, token in enumerate(tokens):
            x = w("token_embd.weight")[token].copy()
            for i in range(self.n_layer):
                h = _rms(x, w(f"blk.{i}.attn_norm.weight"), self.eps)
                q, k, v = ((w(f"blk.{i}.attn_{n}.weight") @ h + w(f"blk.{i}.attn_{n}.bias")).reshape(-1, hd)
                           for n in "qkv")
                keys[i].append([_rope_neox(kh, pos, self.rope_base) for kh in k])
                values[i].append(v)
                heads = [_attend(_rope_neox(q[head], pos, self.rope_base),
                                 [kk[head // group] for kk in keys[i]],
                                 [vv[head // group] for vv in values[i]], 1 / np.sqrt(hd))
                         for head in range(self.n_head)]
                x = x + w(f"blk.{i}.attn_output.weight") @ np.concatenate(heads)
                h = _rms(x, w(f"blk.{i}.ffn_norm.weight"), self.eps)
                gate = _silu(w(f"blk.{i}.ffn_gate.weight") @ h)
                x = x + w(f"blk.{i}.ffn_down.weight") @ (gate * (w(f"blk.{i}.ffn_up.weight") @ h))
            head_w = w("token_embd.weight") if self.tied else w("output.weight")
            all_logits.append(head_w @ _rms(x, w("output_norm.weight"), self.eps))
        return np.array(all_logits)


@dataclass
class TinyGemma3(TinyLlama):
    """Gemma 3: scaled embedding, QK-norm, post-norms, GELU FFN, and local layers
    (all but every 6th) that see only the last `sliding_window` positions and
    have their own RoPE base. Norm weights are used as stored (the +1 is in them)."""

    ARCH: ClassVar[str] = "gemma3"
    n_layer: int = 7  # local layers 0-4 and 6, global layer 5
    head_dim: int = 32  # heads wider than dim / n_head, as in Gemma 3
    n_head_kv: int = 1
    rope_base: float = 1e6
    eps: float = 1e-6
    sliding_window: int = 4
    rope_base_local: float | None = None  # None: not in the file (then 10000)
    rope_scale: float = 1.0  # linear RoPE scaling of the global layers (1: none in the file)
    softcap: float = 0.0  # final logit soft-capping (0: none in the file)

    def __post_init__(self):
        super().__post_init__()
        for i in range(self.n_layer):
            for name, size in (("attn_q_norm", self.head_dim), ("attn_k_norm", self.head_dim),
                               ("post_attention_norm", self.dim), ("post_ffw_norm", self.dim)):
                norm = 1.0 + 0.1 * self.rng.standard_normal(size)
                self.tensors[f"blk.{i}.{name}.weight"] = norm.astype(np.float32)

    def add_hyperparameters(self, w: gguf.GGUFWriter) -> None:
        w.add_sliding_window(self.sliding_window)
        if self.rope_base_local is not None:
            w.add_rope_freq_base_swa(self.rope_base_local)
        if self.rope_scale != 1.0:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(self.rope_scale)
        if self.softcap:
            w.add_final_logit_softcapping(self.softcap)

    def is_local(self, layer: int) -> bool:
        return (layer + 1) % 6 != 0

    def reference_logits(self, tokens: list[int]) -> np.ndarray:
        hd, group, w = self.head_dim, self.n_head // self.n_head_kv, self.stored
        keys = [[] for _ in range(self.n_layer)]
        values = [[] for _ in range(self.n_layer)]
        all_logits = []
        for pos, token in enumerate(tokens):
            x = w("token_embd.weight")[token] * np.sqrt(self.dim)
            for i in range(self.n_layer):
                if self.is_local(i):
                    base, rope_pos = self.rope_base_local or 10000.0, pos
                    visible = [p for p in range(pos + 1) if pos - p < self.sliding_window]
                else:
                    base, rope_pos = self.rope_base, pos / self.rope_scale
                    visible = list(range(pos + 1))
                h = _rms(x, w(f"blk.{i}.attn_norm.weight"), self.eps)
                q, k, v = ((w(f"blk.{i}.attn_{n}.weight") @ h).reshape(-1, hd) for n in "qkv")
                keys[i].append([_rope_neox(_rms(kh, w(f"blk.{i}.attn_k_norm.weight"), self.eps), rope_pos, base)
                                for kh in k])
                values[i].append(v)
                heads = []
                for head in range(self.n_head):
                    qh = _rope_neox(_rms(q[head], w(f"blk.{i}.attn_q_norm.weight"), self.eps), rope_pos, base)
                    heads.append(_attend(qh, [keys[i][p][head // group] for p in visible],
                                         [values[i][p][head // group] for p in visible], 1 / np.sqrt(hd)))
                attn = w(f"blk.{i}.attn_output.weight") @ np.concatenate(heads)
                x = x + _rms(attn, w(f"blk.{i}.post_attention_norm.weight"), self.eps)
                h = _rms(x, w(f"blk.{i}.ffn_norm.weight"), self.eps)
                gate = _gelu_tanh(w(f"blk.{i}.ffn_gate.weight") @ h)
                ffn = w(f"blk.{i}.ffn_down.weight") @ (gate * (w(f"blk.{i}.ffn_up.weight") @ h))
                x = x + _rms(ffn, w(f"blk.{i}.post_ffw_norm.weight"), self.eps)
            head_w = w("token_embd.weight") if self.tied else w("output.weight")
            logits = head_w @ _rms(x, w("output_norm.weight"), self.eps)
            if self.softcap:
                logits = self.softcap * np.tanh(logits / self.softcap)
            all_logits.append(logits)
        return np.array(all_logits)

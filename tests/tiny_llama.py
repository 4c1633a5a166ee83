"""Tiny random Llama models written as GGUF with gguf-py (a writer we did not
write), plus an independent float64 forward pass to check ours against.

The vocabulary is byte-level: 256 single-byte tokens and two control tokens, so
the same file also drives the tokenizer and the CLI.
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

        def rms(x, weight):
            return x / np.sqrt(np.mean(x * x) + self.eps) * weight

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
                h = rms(x, w(f"blk.{i}.attn_norm.weight"))
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
                h = rms(x, w(f"blk.{i}.ffn_norm.weight"))
                gate = w(f"blk.{i}.ffn_gate.weight") @ h
                up = w(f"blk.{i}.ffn_up.weight") @ h
                x = x + w(f"blk.{i}.ffn_down.weight") @ (gate / (1 + np.exp(-gate)) * up)
            head_w = w("token_embd.weight") if self.tied else w("output.weight")
            all_logits.append(head_w @ rms(x, w("output_norm.weight")))
        return np.array(all_logits)

"""Hugging Face checkpoint (config.json, tokenizer.json, *.safetensors) -> GGUF,
in the layout our runtime and llama.cpp read: llama, qwen2 and gemma3.

The GGUF's metadata and tensor list are known from config.json and the
safetensors headers alone, so the header is written first and then each
tensor is read, changed, quantized and written one at a time: memory holds one
tensor, whatever the model's size. Tensors come in the order their bytes lie in
the shards, which is also the only order a compressed zip member can be read in.

What changes on the way (as llama.cpp's converter does it, so that llama.cpp reads our files):
- llama: the rows of q_proj and k_proj are permuted from HF's rotate-half RoPE
  layout back to the interleaved pairs GGUF llama uses.
- gemma3: RMSNorm weights get +1 (HF computes x * (1 + w), GGUF stores 1 + w).
- Llama 3.1-style "llama3" RoPE scaling becomes a rope_freqs tensor of
  per-frequency divisors.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gguf
import numpy as np

from ..errors import UserError
from ..runtime.ggml_types import BLOCK_GEOMETRY, GGMLType
from .hf_tokenizer import TokenizerConvertError, convert_tokenizer
from .quantize import quantize, quantize_rows, target_type
from .safetensors_reader import FLOAT_DTYPES, TensorEntry, to_float32

# HF architectures -> GGUF architecture
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
}
_SOURCE_TYPES = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16, "F64": GGMLType.F64}
# Per-layer HF names -> GGUF names. post_attention_layernorm is the FFN's
# pre-norm in Llama and Qwen2 but the attention output's post-norm in Gemma 3.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GEMMA3_LAYER_NAMES = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Multimodal Gemma 3 checkpoints hold the language model under one of these prefixes.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_IGNORED = ("rotary_emb.inv_freq",)
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class ConvertError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message is one line."""


class Shard(Protocol):
    entries: list[TensorEntry]

    def iter_tensors(self) -> Iterator[tuple[TensorEntry, np.ndarray]]: ...


class CheckpointSource(Protocol):
    """A Hugging Face model folder, wherever it lies (a directory, a zip)."""
    name: str  # for messages: the path given
    stem: str  # the model's name: the folder's, or the zip's without .zip

    def read_text(self, name: str) -> str | None: ...

    def read_json(self, name: str) -> dict | None: ...

    def shard_names(self) -> list[str]: ...

    def open_shard(self, name: str) -> Shard: ...


@dataclass
class _Planned:
    shard: int
    source_name: str
    name: str
    shape: tuple[int, ...]
    out_type: GGMLType
    transform: Callable[[np.ndarray], np.ndarray] | None
    source_dtype: str


def _hparams(config: dict) -> tuple[str, dict]:
    archs = config.get("architectures") or []
    hf_arch = next((a for a in archs if a in ARCHITECTURES), None)
    if hf_arch is None:
        named = ", ".join(map(str, archs)) or f"model_type {config.get('model_type')!r}"
        raise ConvertError(f"unsupported architecture {named} (supported: {', '.join(ARCHITECTURES)})")
    hparams = config.get("text_config", config) if hf_arch == "Gemma3ForConditionalGeneration" else config
    return ARCHITECTURES[hf_arch], hparams


def _rope(hparams: dict, kind: str = "full_attention") -> dict:
    """RoPE parameters: transformers 5's rope_parameters (per layer kind for Gemma 3)
    or the older rope_theta / rope_scaling keys."""
    params = hparams.get("rope_parameters")
    if isinstance(params, dict):
        return params.get(kind, params)
    out = dict(hparams.get("rope_scaling") or {})
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out["type"]
    if kind == "sliding_attention":
        return {"rope_theta": hparams.get("rope_local_base_freq", 10000.0)}
    out.setdefault("rope_theta", hparams.get("rope_theta", 10000.0))
    return out


def _need(hparams: dict, key: str) -> Any:
    if key not in hparams or hparams[key] is None:
        raise ConvertError(f"config.json has no {key!r}")
    return hparams[key]


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factors = []
    for freq in freqs.astype(np.float64):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _permute(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF rotate-half rows -> GGUF llama's interleaved pairs, per head."""
    def apply(w: np.ndarray) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return apply


def _plus_one(w: np.ndarray) -> np.ndarray:
    return w + np.float32(1)


class _Converter:
    def __init__(self, source: CheckpointSource, scheme: str):
        self.source, self.scheme = source, scheme
        config = source.read_json("config.json")
        if config is None:
            raise ConvertError(f"{source.name}: no config.json (not a Hugging Face model folder)")
        self.config = config
        self.arch, self.hp = _hparams(config)
        hp = self.hp
        self.n_layer = int(_need(hp, "num_hidden_layers"))
        self.dim = int(_need(hp, "hidden_size"))
        self.n_head = int(_need(hp, "num_attention_heads"))
        self.n_head_kv = int(hp.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(hp.get("head_dim") or self.dim // self.n_head)
        self.tied = bool(hp.get("tie_word_embeddings", config.get("tie_word_embeddings", self.arch == "gemma3")))

    # -- tensors --

    def _gguf_name(self, name: str) -> tuple[str, Callable | None] | None:
        """GGUF name and change for an HF tensor; None to leave it out."""
        for prefix, replacement in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = replacement + name[len(prefix):]
        if name.startswith(_NOT_TEXT) or name.endswith(_IGNORED):
            return None
        gemma = self.arch == "gemma3"
        if name == "model.embed_tokens.weight":
            return "token_embd.weight", None
        if name == "model.norm.weight":
            return "output_norm.weight", _plus_one if gemma else None
        if name == "lm_head.weight":
            return None if self.tied else ("output.weight", None)
        m = _LAYER.fullmatch(name)
        if m is None:
            raise ConvertError(f"{self.source.name}: unexpected tensor {name!r} for {self.arch}")
        layer, rest = int(m.group(1)), m.group(2)
        table = dict(_LAYER_NAMES, **(_GEMMA3_LAYER_NAMES if gemma else
                                      {"post_attention_layernorm.weight": "ffn_norm.weight"}))
        if rest not in table or layer >= self.n_layer:
            raise ConvertError(f"{self.source.name}: unexpected tensor {name!r} for {self.arch}")
        gguf_name = f"blk.{layer}.{table[rest]}"
        if gemma and rest.endswith("norm.weight"):
            return gguf_name, _plus_one
        if self.arch == "llama" and rest == "self_attn.q_proj.weight":
            return gguf_name, _permute(self.n_head)
        if self.arch == "llama" and rest == "self_attn.k_proj.weight":
            return gguf_name, _permute(self.n_head_kv)
        return gguf_name, None

    def plan(self, shards: list[Shard]) -> list[_Planned]:
        planned, seen = [], set()
        for index, shard in enumerate(shards):
            for entry in shard.entries:
                mapped = self._gguf_name(entry.name)
                if mapped is None:
                    continue
                name, transform = mapped
                if name in seen:
                    raise ConvertError(f"{self.source.name}: tensor {entry.name!r} appears twice")
                seen.add(name)
                if entry.dtype not in FLOAT_DTYPES:
                    raise ConvertError(f"{self.source.name}: tensor {entry.name!r} has dtype {entry.dtype}; "
                                       f"only {', '.join(FLOAT_DTYPES)} checkpoints can be converted")
                if len(entry.shape) not in (1, 2) or 0 in entry.shape:
                    raise ConvertError(f"{self.source.name}: tensor {entry.name!r} has shape {list(entry.shape)}")
                out_type = target_type(name, entry.shape, _SOURCE_TYPES[entry.dtype], self.scheme)
                planned.append(_Planned(index, entry.name, name, entry.shape, out_type, transform, entry.dtype))
        for needed in ("token_embd.weight", "output_norm.weight"):
            if needed not in seen:
                raise ConvertError(f"{self.source.name}: the checkpoint has no {needed.split('.')[0]} tensor "
                                   "(missing or truncated shards?)")
        if not self.tied and "output.weight" not in seen:
            raise ConvertError(f"{self.source.name}: the checkpoint has no lm_head.weight and does not tie it")
        return planned

    # -- metadata --

    def write_metadata(self, w: gguf.GGUFWriter, n_vocab: int) -> None:
        hp, arch = self.hp, self.arch
        w.add_name(self.source.stem)
        w.add_block_count(self.n_layer)
        w.add_context_length(int(hp.get("max_position_embeddings") or 2048))
        w.add_embedding_length(self.dim)
        w.add_feed_forward_length(int(_need(hp, "intermediate_size")))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps") or 1e-6))
        w.add_vocab_size(n_vocab)
        if self.head_dim != self.dim // self.n_head or arch == "gemma3":
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if arch == "llama":
            w.add_rope_dimension_count(self.head_dim)
        rope = _rope(hp)
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", "default")
        if rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif rope_type not in ("default", None) and not (arch == "llama" and rope_type == "llama3"):
            raise ConvertError(f"unsupported RoPE scaling {rope_type!r} (supported: linear, and llama3 for llama)")
        if arch == "gemma3":
            self._gemma3_metadata(w)

    def _gemma3_metadata(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        # The runtime and llama.cpp scale queries by head_dim**-0.5 (by (dim/heads)**-0.5 for the 62-layer 27B).
        scalar = hp.get("query_pre_attn_scalar", self.head_dim)
        expected = self.dim // self.n_head if self.n_layer == 62 else self.head_dim
        if scalar != expected:
            raise ConvertError(f"query_pre_attn_scalar {scalar} is not supported (expected {expected})")
        if hp.get("attn_logit_softcapping"):
            raise ConvertError("attention logit soft-capping is not supported")
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
        w.add_rope_freq_base_swa(float(_rope(hp, "sliding_attention").get("rope_theta", 10000.0)))
        window = hp.get("sliding_window")
        layer_types = hp.get("layer_types")
        if window:
            w.add_sliding_window(int(window))
            if layer_types and len(layer_types) == self.n_layer:
                local = [t == "sliding_attention" for t in layer_types]
                if local != [(i + 1) % 6 != 0 for i in range(self.n_layer)]:
                    w.add_array(f"{self.arch}.attention.sliding_window_pattern", local)
            elif (pattern := hp.get("sliding_window_pattern", 6)) != 6:
                w.add_uint32(f"{self.arch}.attention.sliding_window_pattern", int(pattern))

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        rope = _rope(self.hp)
        if self.arch == "llama" and rope.get("rope_type") == "llama3":
            return [("rope_freqs.weight", _llama3_rope_factors(rope, self.head_dim))]
        return []


def _stored(planned: _Planned, raw: np.ndarray) -> np.ndarray:
    """The tensor's bytes as the GGUF stores them."""
    if planned.transform is None and planned.out_type == _SOURCE_TYPES[planned.source_dtype] \
            and planned.out_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return np.ascontiguousarray(raw)  # already in the target type: copy the bytes as they are
    if planned.transform is not None:  # q/k permutations and norms: small tensors, done whole
        return quantize(planned.transform(to_float32(raw, planned.source_dtype)), planned.out_type)
    rows = raw.reshape(1, -1) if raw.ndim == 1 else raw
    return quantize_rows(rows, lambda batch: to_float32(batch, planned.source_dtype), planned.out_type)


def _nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    block, size = BLOCK_GEOMETRY[ggml_type]
    return math.prod(shape) // block * size


def _chat_template(source: CheckpointSource, tokenizer_config: dict) -> str | None:
    """chat_template.jinja (what transformers writes now) or tokenizer_config.json's."""
    text = source.read_text("chat_template.jinja")
    if text:
        return text
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def convert_checkpoint(source: CheckpointSource, dst: Path, scheme: str = "keep",
                       progress: Callable[[int, int], None] | None = None) -> None:
    """Write `dst` (a GGUF) from the checkpoint; `progress(done, total)` in bytes read."""
    converter = _Converter(source, scheme)
    tokenizer_json = source.read_json("tokenizer.json")
    if tokenizer_json is None:
        raise ConvertError(f"{source.name}: no tokenizer.json")
    names = source.shard_names()
    if not names:
        raise ConvertError(f"{source.name}: no *.safetensors weights")
    shards = [source.open_shard(name) for name in names]
    planned = converter.plan(shards)
    embd = next(p for p in planned if p.name == "token_embd.weight")
    n_vocab = embd.shape[0]
    tokenizer_config = source.read_json("tokenizer_config.json") or {}
    try:
        tokenizer = convert_tokenizer(tokenizer_json, tokenizer_config, _chat_template(source, tokenizer_config),
                                      converter.config, n_vocab)
    except TokenizerConvertError as e:
        raise ConvertError(f"{source.name}: {e}") from None

    w = gguf.GGUFWriter(str(dst), converter.arch)
    converter.write_metadata(w, n_vocab)
    tokenizer.add_to(w)
    extra = converter.extra_tensors()
    for p in planned:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.out_type),
                          raw_dtype=gguf.GGMLQuantizationType(int(p.out_type)))
    for name, data in extra:
        w.add_tensor_info(name, data.shape, data.dtype, data.nbytes)
    by_shard: dict[int, dict[str, _Planned]] = {}
    for p in planned:
        by_shard.setdefault(p.shard, {})[p.source_name] = p
    total = sum(e.nbytes for shard in shards for e in shard.entries) or 1
    done = 0
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for index, shard in enumerate(shards):
            wanted = by_shard.get(index, {})
            for entry, raw in shard.iter_tensors():
                p = wanted.get(entry.name)
                if p is not None:
                    w.write_tensor_data(_stored(p, raw))
                done += entry.nbytes
                if progress:
                    progress(done, total)
        for _, data in extra:
            w.write_tensor_data(data)
    finally:
        w.close()  # on failure the caller removes the partial file


class StderrProgress:
    """A one-line percentage on stderr, redrawn as it grows; `close` ends the line
    (so that an error printed next starts a line of its own)."""

    def __init__(self, label: str):
        self.label, self._shown, self._open = label, -1, False

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent != self._shown:
            self._shown, self._open = percent, True
            print(f"\r  {self.label}: {percent}%", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._open:
            print(file=sys.stderr, flush=True)
            self._open = False

    def __enter__(self) -> "StderrProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Model hyper-parameters, read from GGUF metadata and checked at load time.

Everything the forward pass needs is decided here, so that an unsupported model
is refused before a single weight is touched, with a message naming what is
missing or unsupported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .gguf import GGUFFile, GGUFError


@dataclass(frozen=True)
class ArchitectureTraits:
    """How an architecture's forward pass departs from Llama's (facts from llama.cpp's graphs)."""

    rope_neox: bool = False  # RoPE turns dimension i with i + n_rot/2 (GPT-NeoX layout), not with i + 1
    scale_embedding: bool = False  # token embeddings are multiplied by sqrt(dim)
    ffn_activation: str = "silu"  # of the FFN gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE
    post_norms: bool = False  # RMSNorm on the attention and FFN outputs before each residual add
    # When the file gives a sliding window, the layers that use it are all but
    # every n-th by default (the file may give another n or list the layers);
    # 0: the architecture has no sliding-window layers.
    swa_pattern: int = 0


ARCHITECTURES = {
    "llama": ArchitectureTraits(),
    "qwen2": ArchitectureTraits(rope_neox=True),
    "gemma3": ArchitectureTraits(rope_neox=True, scale_embedding=True, ffn_activation="gelu_tanh",
                                 qk_norm=True, post_norms=True, swa_pattern=6),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# llama.cpp's RoPE base for sliding-window layers when the file names none (Gemma 3's local base).
DEFAULT_ROPE_BASE_LOCAL = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    traits: ArchitectureTraits
    n_layer: int
    dim: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int  # leading dimensions of each head that RoPE rotates
    rope_base: float
    rope_linear_scale: float  # positions are divided by this (1.0 = none); global layers only
    norm_eps: float
    context_length: int  # what the model was trained for
    vocab_size: int
    attention_scale: float  # multiplies each query-key dot product
    final_logit_softcap: float = 0.0  # logits become cap * tanh(logits / cap) (0 = none)
    sliding_window: int = 0  # keys a local layer sees, its own position included (0 = none)
    local_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window and the local RoPE base
    rope_base_local: float = DEFAULT_ROPE_BASE_LOCAL

    def layer_window(self, index: int) -> int:
        """The sliding window of layer `index`, 0 for a layer that sees every earlier key."""
        return self.sliding_window if self.sliding_window and self.local_layers[index] else 0

    def layer_rope(self, index: int) -> tuple[float, float]:
        """(base, linear scale) of layer `index`'s RoPE: local layers use their own base, unscaled."""
        if self.layer_window(index):
            return self.rope_base_local, 1.0
        return self.rope_base, self.rope_linear_scale

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        arch = gguf.architecture
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{gguf.path}: unsupported architecture {arch!r} "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        traits = ARCHITECTURES[arch]

        def key(name: str, default=None):
            value = gguf.get(f"{arch}.{name}", default)
            if value is None:
                gguf.require(f"{arch}.{name}")  # raises, naming the key
            return value

        n_layer = int(key("block_count"))
        dim = int(key("embedding_length"))
        n_head = int(key("attention.head_count"))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise GGUFError(f"{gguf.path}: {n_head} attention heads cannot share {n_head_kv} key/value heads")
        head_dim = int(key("attention.key_length", dim // n_head))
        value_dim = int(key("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise GGUFError(f"{gguf.path}: value heads of size {value_dim} differ from key heads of size "
                            f"{head_dim}, which this runtime does not support")
        n_rot = int(key("rope.dimension_count", head_dim))
        if n_rot % 2 or n_rot > head_dim:
            raise GGUFError(f"{gguf.path}: rope.dimension_count {n_rot} does not fit head size {head_dim}")

        scaling = gguf.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise GGUFError(f"{gguf.path}: unsupported RoPE scaling {scaling!r} (supported: none, linear)")
        linear_scale = float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0

        # Gemma 3 27B scales queries by its width per head rather than its head size
        # (gemma_pytorch's query_pre_attn_scalar; llama.cpp picks it out by its 62 layers).
        scale_dim = dim // n_head if arch == "gemma3" and n_layer == 62 else head_dim

        sliding_window = int(key("attention.sliding_window", 0)) if traits.swa_pattern else 0
        local_layers = _local_layers(gguf, arch, n_layer, traits.swa_pattern) if sliding_window > 0 else ()

        tokens = gguf.get("tokenizer.ggml.tokens")
        vocab_size = int(key("vocab_size", len(tokens) if tokens is not None else 0))
        return cls(
            architecture=arch,
            traits=traits,
            n_layer=n_layer,
            dim=dim,
            n_ff=int(key("feed_forward_length")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=n_rot,
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_linear_scale=linear_scale or 1.0,
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(key("context_length", 2048)),
            vocab_size=vocab_size,
            attention_scale=1.0 / math.sqrt(scale_dim),
            final_logit_softcap=float(key("final_logit_softcapping", 0.0)),
            sliding_window=sliding_window,
            local_layers=local_layers,
            rope_base_local=float(key("rope.freq_base_swa", DEFAULT_ROPE_BASE_LOCAL)),
        )


def _local_layers(gguf: GGUFFile, arch: str, n_layer: int, default_pattern: int) -> tuple[bool, ...]:
    """Which layers use the sliding window: listed per layer in the file, or every
    layer but each n-th (n from the file or the architecture; n = 0: all of them)."""
    pattern = gguf.get(f"{arch}.attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, (list, np.ndarray)):
        if len(pattern) != n_layer:
            raise GGUFError(f"{gguf.path}: {arch}.attention.sliding_window_pattern lists "
                            f"{len(pattern)} layers, the model has {n_layer}")
        return tuple(bool(p) for p in pattern)
    n = int(pattern)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))

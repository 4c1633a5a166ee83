"""Model hyper-parameters, read from GGUF metadata and checked at load time.

Everything the forward pass needs is decided here, so that an unsupported model
is refused before a single weight is touched, with a message naming what is
missing or unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf import GGUFFile, GGUFError

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layer: int
    dim: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int  # leading dimensions of each head that RoPE rotates
    rope_base: float
    rope_linear_scale: float  # positions are divided by this (1.0 = none)
    norm_eps: float
    context_length: int  # what the model was trained for
    vocab_size: int

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        arch = gguf.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{gguf.path}: unsupported architecture {arch!r} "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def key(name: str, default=None):
            value = gguf.get(f"{arch}.{name}", default)
            if value is None:
                gguf.require(f"{arch}.{name}")  # raises, naming the key
            return value

        dim = int(key("embedding_length"))
        n_head = int(key("attention.head_count"))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise GGUFError(f"{gguf.path}: {n_head} attention heads cannot share {n_head_kv} key/value heads")
        head_dim = int(key("attention.key_length", dim // n_head))
        n_rot = int(key("rope.dimension_count", head_dim))
        if n_rot % 2 or n_rot > head_dim:
            raise GGUFError(f"{gguf.path}: rope.dimension_count {n_rot} does not fit head size {head_dim}")

        scaling = gguf.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise GGUFError(f"{gguf.path}: unsupported RoPE scaling {scaling!r} (supported: none, linear)")
        linear_scale = float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0

        tokens = gguf.get("tokenizer.ggml.tokens")
        vocab_size = int(key("vocab_size", len(tokens) if tokens is not None else 0))
        return cls(
            architecture=arch,
            n_layer=int(key("block_count")),
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
        )

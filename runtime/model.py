"""The Llama-family transformer: weights straight from a GGUF map, a KV cache,
and one forward pass for both prompt processing (many tokens) and decoding (one):
the layer's math is written once, in `Model._run`, over steps for many
tokens or one (layer_steps.py).

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

import mmap
from dataclasses import dataclass, replace

import numpy as np

from . import aqlm, interleaved
from .aqlm import AqlmMatrix
from .config import ModelConfig
from .ggml_types import GGMLType
from .gguf import GGUFError, GGUFFile
from .jit import numba_enabled
from .layer_steps import BatchSteps, LayerAttention, PromptSteps, TokenSteps
from .thread_tuner import ThreadTuner
from .token_ops import KEY_BLOCK
from .weight_matrix import InterleavedMatrix, OutputHead, QuantMatrix, WeightMatrix, interleaves
from .weight_types import WEIGHT_TYPES


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: WeightMatrix
    wk: WeightMatrix
    wv: WeightMatrix
    wo: WeightMatrix
    ffn_norm: np.ndarray
    w_gate: WeightMatrix
    w_up: WeightMatrix
    w_down: WeightMatrix
    attention: LayerAttention  # its cache, RoPE tables, window and head norms
    # Present only in architectures that have them; None elsewhere.
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None

    def matrices(self) -> tuple[WeightMatrix, ...]:
        return self.wq, self.wk, self.wv, self.wo, self.w_gate, self.w_up, self.w_down


class _WeightLoader:
    """Looks tensors up by name and checks their shapes and types."""

    def __init__(self, gguf: GGUFFile, batched: bool = False):
        self.gguf = gguf
        # Small models' (and a server's) matrices of interleaved.TYPES decode from a repacked copy.
        self.interleaved_types = interleaved.repacked_types(sum(info.nbytes for info in gguf.tensors.values()),
                                                            batched)

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
        return name not in self.gguf.tensors and aqlm.is_stored(self.gguf, name)

    def vector(self, name: str, size: int) -> np.ndarray:
        info = self._info(name, (size,))
        if info.ggml_type != GGMLType.F32:
            raise GGUFError(f"{self.gguf.path}: tensor {name!r} is {info.ggml_type.name}, expected F32")
        return self.gguf.tensor_data(name).view(np.float32).reshape(size)

    def optional_vector(self, name: str, size: int) -> np.ndarray | None:
        return self.vector(name, size) if self.has(name) else None

    def matrix(self, name: str, rows: int, cols: int) -> WeightMatrix:
        if self._is_aqlm(name):
            return AqlmMatrix.from_gguf(self.gguf, name, rows, cols)
        info = self._info(name, (rows, cols))
        if info.ggml_type not in WEIGHT_TYPES:
            raise GGUFError(f"{self.gguf.path}: tensor {name!r} has type {info.ggml_type.name}, "
                            f"which this runtime cannot compute with yet")
        if info.ggml_type in self.interleaved_types and interleaves(info.ggml_type, rows):
            return InterleavedMatrix(self.gguf.tensor_data(name), info.ggml_type, cols)
        return QuantMatrix(self.gguf.tensor_data(name), info.ggml_type, cols)


class Model:
    """A loaded model with its KV cache: `n_slots` sequences of up to `n_ctx` positions each.

    Each slot is a sequence of its own (the server's parallel slots); `slot`
    arguments say which one a pass reads and writes. Every slot gets the whole
    `n_ctx`, rather than a share of it: a request can use the context the user
    set whatever the number of slots, and the cache costs memory only as its
    positions fill (an anonymous map), so idle slots cost nothing.
    """

    # Set to pick the decoding thread count by timing tokens (runtime/thread_tuner.py).
    thread_tuner: ThreadTuner | None = None

    def __init__(self, gguf: GGUFFile, n_ctx: int | None = None, n_slots: int = 1):
        self.gguf = gguf
        cfg = self.config = ModelConfig.from_gguf(gguf)
        self.n_ctx = n_ctx or min(cfg.context_length, 4096)
        if n_slots < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        self.n_slots = n_slots
        load = _WeightLoader(gguf, batched=n_slots > 1)

        self.token_embd = load.matrix("token_embd.weight", cfg.vocab_size, cfg.dim)
        self.output_norm = load.vector("output_norm.weight", cfg.dim)
        # Tied models read the embedding as the output head.
        self.output = (load.matrix("output.weight", cfg.vocab_size, cfg.dim)
                       if load.has("output.weight") else self.token_embd)
        self.head = OutputHead(self.output)

        # Llama 3.1-style models divide each RoPE frequency by a stored factor.
        freq_factors = load.optional_vector("rope_freqs.weight", cfg.n_rot // 2)
        # (cos, sin) per RoPE base and scale; layers with the same ones share their tables.
        tables = {rope: _rope_tables(cfg.n_rot, *rope, self.n_ctx, freq_factors)
                  for rope in {cfg.layer_rope(i) for i in range(cfg.n_layer)}}
        self.layers = [_load_layer(load, cfg, i, tables[cfg.layer_rope(i)]) for i in range(cfg.n_layer)]

        # Pages of the cache become memory only as positions fill (a large -c costs nothing up front).
        # Keys in blocks of positions, each dimension a vector of positions (token_ops.KEY_BLOCK).
        # Where decoding rounds every layer's input to int8, keys and values are kept as
        # float16 (their bits in uint16: the kernels convert), as llama.cpp keeps them by
        # default: float16 rounds finer than int8, and a token reads half the bytes (the
        # cache's short streams read at ~11 GB/s on one core: attention was 30% of a
        # 4-row server pass of SmolLM2 at 250 positions). The float path keeps float32:
        # it gives transformers' tokens exactly.
        rounding = numba_enabled() and all(m.rounds_input for layer in self.layers for m in layer.matrices())
        dtype = np.dtype(np.uint16 if rounding else np.float32)
        blocks = -(-self.n_ctx // KEY_BLOCK)
        self.cache_k = _lazy_zeros((cfg.n_layer, n_slots, cfg.n_head_kv, blocks, cfg.head_dim, KEY_BLOCK), dtype)
        self.cache_v = _lazy_zeros((cfg.n_layer, n_slots, cfg.n_head_kv, self.n_ctx, cfg.head_dim), dtype)
        for i, layer in enumerate(self.layers):
            layer.attention = replace(layer.attention, cache_k=self.cache_k[i], cache_v=self.cache_v[i])

    def _decoded_matrices(self) -> list[WeightMatrix]:
        return [self.output] + [m for layer in self.layers for m in layer.matrices()]

    @property
    def weight_bytes_per_token(self) -> int:
        """Weight bytes one decoded token reads (what bounds decode speed)."""
        return sum(m.nbytes for m in self._decoded_matrices())

    def make_decoding_copies(self) -> None:
        """Repack now the matrices that decode from a copy (InterleavedMatrix), which is
        otherwise made at the first decoding step: a server does it while loading,
        rather than in its first request (2.5 s for an 8B-shaped model)."""
        for matrix in self._decoded_matrices():
            if isinstance(matrix, InterleavedMatrix):
                matrix.make_copy()

    def forward(self, tokens: np.ndarray, start: int, logits_from: int | None = None, slot: int = 0,
                prompt: bool = False) -> np.ndarray:
        """Run `tokens` at positions start.. of cache slot `slot` and return the logits
        of the last one, (vocab,); or, with `logits_from` = i, those of tokens i.. as
        (n - i, vocab) (perplexity scores every position of a chunk).

        The slot must hold positions 0..start-1 already; entries from `start` on are
        overwritten, which is how a caller rewinds (e.g. to regenerate).
        `prompt`: the tokens are (a piece of) a prompt: a lone token takes the prompt's
        steps too, whose products never wait for a decoding layout to be prepared
        (WeightMatrix.prompt_matvec): the first token comes without that delay.
        """
        tokens = self._checked(tokens, start, slot)
        n = len(tokens)
        if logits_from is not None and not 0 <= logits_from < n:
            raise ValueError(f"logits_from {logits_from} is not a position of the {n} tokens")
        # One decoded token takes the compiled steps (without numba, the numpy ones).
        if n == 1 and logits_from is None and not prompt and numba_enabled():
            steps = TokenSteps(self.config, start, slot)
            if self.thread_tuner is not None:
                return self.thread_tuner.run(lambda: self._run(steps, tokens, None))
        else:
            steps = PromptSteps(self.config, start, n, slot)
        return self._run(steps, tokens, logits_from)

    def forward_batch(self, tokens: list[int], positions: list[int], slots: list[int],
                      logits_rows: list[int] | None = None) -> np.ndarray:
        """One decoded token for each of several sequences in one pass over the weights:
        tokens[i] at positions[i] of cache slot slots[i]. A slot may take several
        rows at consecutive positions (drafted tokens, prompt_lookup.py; a piece of
        a prompt, slots.py): each row then sees the keys and values of the rows
        before it, as one-token passes would.
        Returns the logits (len(tokens), vocab), or only those of the rows
        `logits_rows` (a prompt's rows but its last need none); row i is what
        forward([tokens[i]], positions[i], slot=slots[i]) gives, up to the
        difference between the weights' matmul rows and their matvec.

        Without numba each sequence takes its own forward: the numpy steps have no
        per-row compiled calls to share, and the results are then exactly forward's.
        """
        if not len(tokens) == len(positions) == len(slots) or not tokens:
            raise ValueError("forward_batch takes one position and one slot per token, and at least one token")
        follows: dict[int, int] = {}  # slot -> the position its next row must take
        for pos, slot in zip(positions, slots):
            if follows.get(slot, pos) != pos:
                raise ValueError(f"a slot's tokens in one pass must take consecutive positions, "
                                 f"got slots {slots} at positions {positions}")
            follows[slot] = pos + 1
        for token, pos, slot in zip(tokens, positions, slots):
            self._checked(np.array([token]), pos, slot)
        wanted = list(range(len(tokens))) if logits_rows is None else list(logits_rows)
        if any(not 0 <= i < len(tokens) for i in wanted):
            raise ValueError(f"logits_rows {wanted} are not rows of the {len(tokens)} tokens")
        if len(tokens) == 1 or not numba_enabled():
            rows = [self.forward(np.array([t]), p, slot=s) for t, p, s in zip(tokens, positions, slots)]
            return np.stack([rows[i] for i in wanted]) if wanted else np.empty((0, self.config.vocab_size), np.float32)
        return self._run(BatchSteps(self.config, list(positions), list(slots), wanted),
                         np.asarray(tokens, np.int64), None)

    def hidden_states(self, tokens: np.ndarray, start: int = 0, slot: int = 0) -> np.ndarray:
        """The last hidden state (after the final norm) of each token at positions start..,
        (n, dim): what embeddings pool. Fills the slot's cache as forward does."""
        tokens = self._checked(tokens, start, slot)
        steps = PromptSteps(self.config, start, len(tokens), slot)
        return steps.norm(self._layers(steps, tokens), self.output_norm)

    def _checked(self, tokens: np.ndarray, start: int, slot: int) -> np.ndarray:
        """tokens as int64, after checking that they, their positions and the slot are valid."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n == 0 or start < 0 or start + n > self.n_ctx:
            raise ValueError(f"positions {start}..{start + n} do not fit the context of {self.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token id out of range 0..{self.config.vocab_size - 1}")
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not one of the cache's {self.n_slots}")
        return tokens

    def _run(self, steps: PromptSteps | TokenSteps | BatchSteps, tokens: np.ndarray,
             logits_from: int | None) -> np.ndarray:
        """The transformer, each step done by `steps` (see the module docstring)."""
        cfg = self.config
        x = self._layers(steps, tokens)
        logits = steps.logits(self.head, x, self.output_norm, logits_from)
        if cfg.final_logit_softcap:
            cap = np.float32(cfg.final_logit_softcap)
            logits = cap * np.tanh(logits / cap)
        return logits

    def _layers(self, steps: PromptSteps | TokenSteps | BatchSteps, tokens: np.ndarray) -> np.ndarray:
        """The residual stream after the last layer (before the final norm)."""
        x = self.embed(steps, tokens)
        for layer in self.layers:
            x = self.run_layer(steps, layer, x)
        return x

    def embed(self, steps: PromptSteps | TokenSteps | BatchSteps, tokens: np.ndarray) -> np.ndarray:
        """The residual stream before the first layer."""
        x = steps.embed(self.token_embd, tokens)
        if self.config.traits.scale_embedding:
            x *= np.float32(np.sqrt(self.config.dim))
        return x

    @staticmethod
    def run_layer(steps: PromptSteps | TokenSteps | BatchSteps, layer: Layer, x: np.ndarray) -> np.ndarray:
        """One layer on the residual stream x (AQLM's sequential calibration runs
        the layers one at a time over many sequences)."""
        h = steps.norm(x, layer.attn_norm)
        q = steps.linear(layer.wq, h, layer.q_bias)
        k = steps.linear(layer.wk, h, layer.k_bias)
        v = steps.linear(layer.wv, h, layer.v_bias)
        attn = steps.attend(layer.attention, q, k, v)  # (QK-norm,) RoPE, cache, softmax(q k^T) v
        x = steps.add(x, steps.linear(layer.wo, attn), layer.post_attn_norm)
        h = steps.norm(x, layer.ffn_norm)
        gated = steps.gate(steps.linear(layer.w_gate, h), steps.linear(layer.w_up, h))  # act(h Wg) * h Wu
        x = steps.add(x, steps.linear(layer.w_down, gated), layer.post_ffn_norm)
        return x


def _lazy_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros in an anonymous map, each 4 KiB page made resident when first written.
    np.zeros asks the kernel for 2 MiB pages on large arrays, and the first token's
    write to each (layer, head) row then made the whole cache resident (1 GiB of
    private memory for an 8B-shaped model at -c 4096)."""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(count * dtype.itemsize, 4)), dtype, count=count).reshape(shape)


def _load_layer(load: _WeightLoader, cfg: ModelConfig, i: int, rope: tuple[np.ndarray, np.ndarray]) -> Layer:
    """Layer i, its attention without a cache yet (Model gives it one, of the type its matrices decide)."""
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    traits = cfg.traits
    empty = np.empty((0,) * 4, np.float32)
    attention = LayerAttention(
        cache_k=empty, cache_v=empty, cos=rope[0], sin=rope[1], window=cfg.layer_window(i),
        q_norm=load.vector(f"blk.{i}.attn_q_norm.weight", cfg.head_dim) if traits.qk_norm else None,
        k_norm=load.vector(f"blk.{i}.attn_k_norm.weight", cfg.head_dim) if traits.qk_norm else None)
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
        attention=attention,
        post_attn_norm=load.vector(f"blk.{i}.post_attention_norm.weight", cfg.dim) if traits.post_norms else None,
        post_ffn_norm=load.vector(f"blk.{i}.post_ffw_norm.weight", cfg.dim) if traits.post_norms else None,
    )


def _rope_tables(n_rot: int, base: float, linear_scale: float, n_ctx: int,
                 freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    half = n_rot // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2 / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = (np.arange(n_ctx, dtype=np.float64) / linear_scale)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

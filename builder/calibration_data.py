"""The token sequences AQLM calibrates and fine-tunes on.

A quantized model fitted to one kind of text loses most on the others
(SmolLM2 fine-tuned on the pydoc topics alone: 1.56x the original's perplexity
on pydoc, 3.0x on a short story). So by default the sequences take turns among
three sources that every builder has, none of them a held-out text
(bench/heldout/):
- technical prose: Python's pydoc topics, all but their last 24,000
  characters (bench/aqlm_quality.py scores those);
- code: the Python standard library's own modules;
- the model's own text: continuations it samples (temperature 1) from short
  openings of many kinds of writing. They cost a decode step per token, but
  they cover what no shipped corpus does (stories, letters, chat), and they
  are the distribution the quantized model must match.
A user's calibration text (`--calibration FILE`) replaces all three.
Deterministic for a seed on one machine and Python.
"""

from __future__ import annotations

import functools
import glob
import sysconfig
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runtime.gguf import GGUFFile
from .progress import Progress

SEQUENCE_TOKENS = 512
HELD_OUT_PYDOC_CHARS = 24000  # the tail bench/aqlm_quality.py scores (its "pydoc_tail")
GENERATION_SLOTS = 4  # sequences sampled side by side: one batched pass per token for all
# Openings for the model's own text: many kinds of writing, in plain text, so
# that base and chat models alike continue them.
OPENINGS = (
    "Once upon a time", "Dear Sir or Madam,", "Chapter 1\n\n", "In this article, we", "The meeting was called to order",
    "The following terms and conditions", "Q: ", "Recipe:", "It was raining when", "The history of",
    "Abstract\n\n", "Hello! I", "## Installation\n\n", "She looked at", "1.", "Breaking news:",
    "The patient", "Section 1. Definitions", "My favourite", "Yesterday I", "function ", "import ",
    "#include", "class ", "User: ", "Thank you for your letter", "WHEREAS", "Step 1:",
)


class CalibrationError(UserError, ValueError):
    """Calibration text the quantizer cannot use (one line for the user)."""


def pydoc_text() -> str:
    """English technical prose shipped with every Python: the pydoc topics, less the scored tail."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:-HELD_OUT_PYDOC_CHARS]


def stdlib_code() -> str:
    """The standard library's top-level modules, in name order."""
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))
    return "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)


def text_sequences(src: GGUFFile, text: str, n_tokens: int, n_ctx: int = SEQUENCE_TOKENS) -> list[np.ndarray]:
    """The first n_tokens tokens of `text` in sequences of at most n_ctx (BOS first
    when the model adds one)."""
    tokenizer, bos, n_ctx = _tokenizer_bos_ctx(src, n_ctx)
    # Tokens run to several characters: encode only a prefix long enough for n_tokens.
    ids = tokenizer.encode(text[:16 * n_tokens], add_special=False)[:n_tokens]
    if len(ids) < 16:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens; it needs at least 16")
    seq = n_ctx - len(bos)
    return [np.array(bos + ids[start:start + seq], np.int64) for start in range(0, len(ids), seq)]


def generated_sequences(src: GGUFFile, count: int, seed: int, n_ctx: int = SEQUENCE_TOKENS,
                        progress: Progress | None = None) -> list[np.ndarray]:
    """`count` sequences of n_ctx tokens sampled from the model itself: each starts
    at a seeded random opening; after an end of text another opening follows."""
    from ..runtime.model import Model
    from ..runtime.sampling import Sampler, SamplingParams

    tokenizer, bos, n_ctx = _tokenizer_bos_ctx(src, n_ctx)
    slots = min(GENERATION_SLOTS, count)
    model = Model(src, n_ctx=n_ctx, n_slots=slots)
    rng = np.random.default_rng([seed, 1])
    samplers = [Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.02, seed=seed * 1000 + s))
                for s in range(slots)]
    openings = [tokenizer.encode(text, add_special=False) for text in OPENINGS]
    done: list[np.ndarray] = []
    streams: list[list[int]] = [[] for _ in range(slots)]
    fed = [0] * slots  # tokens of each stream already in its slot's cache

    def opening() -> list[int]:
        return openings[rng.integers(len(openings))]

    for s in range(slots):
        streams[s] = bos + opening()
    pending = list(range(slots))
    while len(done) < count:
        # One pass feeds every slot's unfed tokens (an opening is several at once).
        tokens, positions, rows_of = [], [], []
        for s in pending:
            new = streams[s][fed[s]:]
            tokens += new
            positions += range(fed[s], fed[s] + len(new))
            rows_of += [s] * len(new)
            fed[s] = len(streams[s])
        logits = model.forward_batch(tokens, positions, rows_of)
        last = {s: row for s, row in zip(rows_of, logits)}  # each slot's last row
        pending = []
        for s, row in last.items():
            token = samplers[s].sample(row, streams[s])
            streams[s].append(token)
            if token in tokenizer.eog_ids:
                streams[s] += opening()
            if len(streams[s]) >= n_ctx:
                done.append(np.array(streams[s][:n_ctx], np.int64))
                if progress is not None:
                    progress.step()
                streams[s], fed[s] = bos + opening(), 0
            if len(done) < count:
                pending.append(s)
    return done[:count]


def default_sequences(src: GGUFFile, count: int, seed: int, generated: int,
                      n_ctx: int = SEQUENCE_TOKENS) -> list[np.ndarray]:
    """`count` sequences taking turns among pydoc prose, standard-library code and
    the model's own text (of that, `generated` sequences, repeated in turn if
    fewer than its share)."""
    shares = [count - 2 * (count // 3), count // 3, count // 3]  # prose, code, own text
    _, bos, n_ctx = _tokenizer_bos_ctx(src, n_ctx)
    per_sequence = n_ctx - len(bos)  # text tokens in a sequence
    prose = text_sequences(src, pydoc_text(), shares[0] * per_sequence, n_ctx)
    code = text_sequences(src, stdlib_code(), shares[1] * per_sequence, n_ctx) if shares[1] else []
    own: list[np.ndarray] = []
    if shares[2]:
        n_own = max(1, min(generated, shares[2]))
        progress = Progress("calibration: the model's own text", n_own, "sequences")
        own = generated_sequences(src, n_own, seed, n_ctx, progress)
    sources = [prose, code, [own[i % len(own)] for i in range(shares[2])] if own else []]
    out = []
    for i in range(max(map(len, sources))):
        out += [source[i] for source in sources if i < len(source)]
    return out[:count]


def _tokenizer_bos_ctx(src: GGUFFile, n_ctx: int):
    tokenizer, context_length = _tokenizer_and_context(src)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    return tokenizer, bos, min(n_ctx, context_length)  # never past what the model was trained on


@functools.lru_cache(maxsize=2)
def _tokenizer_and_context(src: GGUFFile):
    """Built once per model file: the mix asks for it from each source (Gemma 3's
    262,144-token vocabulary takes a while)."""
    from ..runtime.config import ModelConfig
    from ..runtime.tokenizer import Tokenizer

    return Tokenizer.from_metadata(src.metadata), ModelConfig.from_gguf(src).context_length

"""Perplexity of a model on a text, computed as llama.cpp's `llama-perplexity` does:
- the whole text is tokenized once (with BOS if the model adds one) and cut into
  chunks of n_ctx tokens (a partial last chunk is dropped);
- each chunk is run from an empty cache, its first token replaced by BOS when the
  model adds one;
- only the second half of each chunk is scored: the log-probability of token
  j + 1 from the logits at j, for n_ctx/2 <= j < n_ctx - 1, so that every scored
  token sees at least n_ctx/2 tokens of context;
- PPL = exp(mean negative log-likelihood), +/- its standard error through exp.

Each chunk runs as one prompt (`Model.forward` with `logits_from`), which gives
the logits of every scored position at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .model import Model


class PerplexityError(UserError, ValueError):
    """A text or context size perplexity cannot be computed for (one line for the user)."""


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float  # standard error of the estimate
    n_chunks: int
    n_scored: int  # tokens scored


def _log_prob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], in float64."""
    z = logits.astype(np.float64)
    top = z.max()
    return float(z[token] - top - math.log(np.exp(z - top).sum()))


def perplexity(model: Model, tokens: list[int], n_ctx: int, bos_id: int | None,
               max_chunks: int = -1, on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """tokens: the tokenized text (BOS first when the model adds one); bos_id: the BOS that
    replaces each chunk's first token, or None. on_chunk(i, running ppl) after chunk i (from 1)."""
    if n_ctx < 4:
        raise PerplexityError(f"the context size must be at least 4 tokens, got {n_ctx}")
    if n_ctx > model.n_ctx:
        raise PerplexityError(f"the context size {n_ctx} is larger than the model's cache of {model.n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise PerplexityError(f"the text has {len(tokens)} tokens; perplexity with a context of {n_ctx} "
                              f"needs at least {2 * n_ctx} (use a longer text or a smaller -c)")
    n_chunks = len(tokens) // n_ctx
    if max_chunks > 0:
        n_chunks = min(n_chunks, max_chunks)
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(n_chunks):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        all_logits = model.forward(np.array(chunk), 0, logits_from=first)
        for j in range(first, n_ctx - 1):
            logits = all_logits[j - first]
            lp = -_log_prob(logits, chunk[j + 1])
            nll += lp
            nll2 += lp * lp
            count += 1
        if on_chunk is not None:
            on_chunk(i + 1, math.exp(nll / count))
    mean = nll / count
    ppl = math.exp(mean)
    var = nll2 / count - mean * mean
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, err, n_chunks, count)

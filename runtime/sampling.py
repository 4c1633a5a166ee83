"""Choosing the next token from logits, in llama.cpp's order:
penalties (repeat; OpenAI's presence and frequency) -> top-k -> top-p -> min-p
-> temperature -> draw.

Temperature 0 (or below) is greedy. The same seed gives the same draws.

A constraint (a grammar the answer must follow) is checked after the draw:
only a token it refuses makes the sampler mask the logits and draw again
(see constrained_decoding for why that is the masked distribution).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence in what was generated
    seed: int | None = None  # None = a fresh random seed

    def check(self) -> None:
        """Raise ValueError with a user-facing message for values out of range."""
        if not np.isfinite(self.temperature):
            raise ValueError("temperature must be a finite number")
        if self.top_k < 0:
            raise ValueError("top-k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top-p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min-p must be in [0, 1]")
        if not self.repeat_penalty > 0.0:
            raise ValueError("repeat penalty must be > 0")
        if self.repeat_last_n < 0:
            raise ValueError("repeat-last-n must be >= 0")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError("presence and frequency penalties must be in [-2, 2]")


class TokenConstraint(Protocol):
    """What the sampler asks of a grammar that generated tokens must follow."""

    def allows(self, token: int) -> bool: ...

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of forbidden tokens to -inf, in place."""

    def accept(self, token: int) -> None: ...


class Sampler:
    def __init__(self, params: SamplingParams, constraint: TokenConstraint | None = None):
        params.check()
        self.params = params
        self.constraint = constraint
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = (), generated: Sequence[int] = ()) -> int:
        """The next token after `history` (all tokens so far), of which `generated` is
        the generated tail (what presence and frequency penalties look at)."""
        token = self._draw(logits, history, generated)
        if self.constraint is not None:
            if not self.constraint.allows(token):
                masked = np.array(logits, dtype=np.float64)
                self.constraint.mask(masked)
                token = self._draw(masked, history, generated)
            self.constraint.accept(token)
        return token

    def _draw(self, logits: np.ndarray, history: Sequence[int], generated: Sequence[int]) -> int:
        p = self.params
        repeats = p.repeat_penalty != 1.0 and p.repeat_last_n and len(history)
        presence = (p.presence_penalty or p.frequency_penalty) and len(generated)
        if p.temperature <= 0.0 and not (repeats or presence):
            return int(np.argmax(logits))  # float64 would pick the same: no copy of the vocabulary's logits
        logits = np.asarray(logits, dtype=np.float64)
        if repeats:
            logits = self._penalize(logits, history[-p.repeat_last_n:])
        if presence:
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            logits = logits.copy()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if p.temperature <= 0.0:
            return int(np.argmax(logits))

        # Candidates sorted by logit, best first; each filter keeps a prefix.
        k = len(logits) if p.top_k == 0 else min(p.top_k, len(logits))
        ids = np.argpartition(-logits, k - 1)[:k] if k < len(logits) else np.arange(len(logits))
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        probs = _softmax(logits[ids])
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, probs = ids[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            ids = ids[keep]
        probs = _softmax(logits[ids] / p.temperature)
        return int(ids[self._rng.choice(len(ids), p=probs)])

    def _penalize(self, logits: np.ndarray, recent: Sequence[int]) -> np.ndarray:
        """Make recently seen tokens less likely: positive logits shrink, negative ones grow."""
        logits = logits.copy()
        seen = np.unique(np.asarray(recent, dtype=np.int64))
        penalty = self.params.repeat_penalty
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()

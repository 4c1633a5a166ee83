"""The generation loop: process a prompt, then sample one token at a time."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .model import Model
from .sampling import Sampler

# Prompt tokens per forward pass: bounds the attention scores' memory for long prompts.
PROMPT_BATCH = 256


class PromptError(UserError, ValueError):
    """A prompt the model cannot take: empty, or too long for the context."""


class PromptTooLongError(PromptError):
    pass


def check_prompt(tokens: list[int], n_ctx: int) -> None:
    if not tokens:
        raise PromptError("the prompt is empty: nothing to continue from")
    if len(tokens) >= n_ctx:
        raise PromptTooLongError(f"the prompt is {len(tokens)} tokens but the context holds {n_ctx} "
                                 f"(raise it with -c, or shorten the prompt)")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end of generation token), "length" (-n or context), or ""

    def summary(self) -> str:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.1f} tok/s" if s > 0 else "-"

        return (f"prompt: {self.prompt_tokens} tokens, {rate(self.prompt_tokens, self.prompt_seconds)}; "
                f"generated: {self.generated_tokens} tokens, {rate(self.generated_tokens, self.generate_seconds)}")


def process_prompt(model: Model, tokens: list[int], n_past: int = 0) -> np.ndarray:
    """Feed tokens[n_past:] (the cache holds tokens[:n_past]); return the last logits."""
    check_prompt(tokens, model.n_ctx)
    if len(tokens) <= n_past:
        raise ValueError("nothing to process: the cache already holds the whole prompt")
    for start in range(n_past, len(tokens), PROMPT_BATCH):
        logits = model.forward(np.array(tokens[start:start + PROMPT_BATCH]), start)
    return logits


def generate(model: Model, tokens: list[int], sampler: Sampler, max_tokens: int = -1,
             stop_ids: Collection[int] = (), n_past: int = 0,
             stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new tokens after `tokens` until a stop id, `max_tokens` (-1 = no limit)
    or a full context. `tokens` is extended in place with what is generated."""
    stats = stats if stats is not None else GenerationStats()
    if max_tokens == 0:
        stats.finish_reason = "length"
        return
    started = time.perf_counter()
    logits = process_prompt(model, tokens, n_past)
    stats.prompt_tokens = len(tokens) - n_past
    stats.prompt_seconds = time.perf_counter() - started

    started = time.perf_counter()
    first_new = len(tokens)
    try:
        while True:
            token = sampler.sample(logits, tokens, tokens[first_new:])
            if token in stop_ids:
                stats.finish_reason = "stop"
                return
            tokens.append(token)
            stats.generated_tokens += 1
            yield token
            if stats.generated_tokens == max_tokens or len(tokens) >= model.n_ctx:
                stats.finish_reason = "length"
                return
            logits = model.forward(np.array([token]), len(tokens) - 1)
    finally:
        stats.generate_seconds = time.perf_counter() - started

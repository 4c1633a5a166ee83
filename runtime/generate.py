"""The generation loop: process a prompt, then sample one token at a time."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .model import Model
from .prompt_lookup import Drafter, draft_room
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
    drafted_tokens: int = 0  # tokens guessed from the context (prompt lookup)
    accepted_tokens: int = 0  # of which the model kept
    draft_passes: int = 0  # batched passes with a draft

    def count_draft(self, drafted: int, accepted: int) -> None:
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.draft_passes += 1

    def summary(self) -> str:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.1f} tok/s" if s > 0 else "-"

        drafts = (f"; drafted {self.drafted_tokens} tokens in {self.draft_passes} passes, "
                  f"accepted {self.accepted_tokens}" if self.draft_passes else "")
        return (f"prompt: {self.prompt_tokens} tokens, {rate(self.prompt_tokens, self.prompt_seconds)}; "
                f"generated: {self.generated_tokens} tokens, {rate(self.generated_tokens, self.generate_seconds)}"
                + drafts)


def process_prompt(model: Model, tokens: list[int], n_past: int = 0) -> np.ndarray:
    """Feed tokens[n_past:] (the cache holds tokens[:n_past]); return the last logits."""
    check_prompt(tokens, model.n_ctx)
    if len(tokens) <= n_past:
        raise ValueError("nothing to process: the cache already holds the whole prompt")
    for start in range(n_past, len(tokens), PROMPT_BATCH):
        logits = model.forward(np.array(tokens[start:start + PROMPT_BATCH]), start, prompt=True)
    return logits


def generate(model: Model, tokens: list[int], sampler: Sampler, max_tokens: int = -1,
             stop_ids: Collection[int] = (), n_past: int = 0,
             stats: GenerationStats | None = None, drafter: Drafter | None = None) -> Iterator[int]:
    """Yield new tokens after `tokens` until a stop id, `max_tokens` (-1 = no limit)
    or a full context. `tokens` is extended in place with what is generated.

    With a drafter (prompt_lookup.py), tokens it guesses from the context are run
    through the model together with the last token, in one pass, and kept as
    long as the sampler picks them from their rows: the same tokens as without
    it (greedy), or the same distribution (sampling), in fewer passes."""
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
    rows = [logits]  # the logits to sample from in turn, each one continuing the last
    draft: list[int] = []
    try:
        while True:
            for i, logits in enumerate(rows):
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
                if i == len(draft) or token != draft[i]:
                    break  # the rows after this one continue a token that was not chosen
            if draft:
                drafter.feedback(len(draft), i)
                stats.count_draft(len(draft), i)
            room = draft_room(model.n_ctx, len(tokens), max_tokens, stats.generated_tokens)
            draft = drafter.propose(tokens)[:room] if drafter is not None else []
            pass_started = time.perf_counter()
            if draft:
                pos = len(tokens) - 1
                rows = list(model.forward_batch([token] + draft, list(range(pos, pos + len(draft) + 1)),
                                                [0] * (len(draft) + 1)))
            else:
                rows = [model.forward(np.array([token]), len(tokens) - 1)]
            if drafter is not None:
                drafter.timed(len(rows), time.perf_counter() - pass_started)
    finally:
        stats.generate_seconds = time.perf_counter() - started

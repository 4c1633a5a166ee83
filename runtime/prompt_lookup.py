"""Prompt-lookup decoding: draft tokens from the context itself, no draft model.

Much of what a chat model writes repeats its context (code it edits, text it
quotes, an earlier answer it revises). When the last few tokens also occur
earlier in the context, the tokens that followed them there are a good guess
for what comes next. `Drafter.propose` makes that guess (the longest n-gram
match, the most recent occurrence; where that occurrence runs into the last
tokens, the text is looping and the draft goes round the loop again: SmolLM2
135M renaming a function in a file fell into such a loop, and its drafts of
2 tokens became 4.5); the generation loop then runs the last token and the
draft through the model in one batched pass and keeps the draft tokens for as
long as the sampler, run on each row's logits in turn, picks them. Each row's
logits are exactly those one-token decoding would give (see
`Model.forward_batch`), so greedy text is the same with or without drafting;
sampling each row with the ordinary sampler and comparing with the draft
accepts a draft token with exactly its probability, so sampled text keeps its
distribution (speculative sampling with a draft that is certain of itself).

A batched pass over k + 1 rows costs more than one row (each row's products
and attention are its own; only the reading of the weights is shared), so
drafting pays only when enough of the draft is kept. `Drafter` decides from
two measurements: how likely a drafted token has lately been to be kept (a),
kept apart for each n-gram size, since a match of 4 tokens predicts far
better than one of 2 in free text, and what a pass of n rows costs relative
to a one-token pass (C(n)), timed on the passes themselves and kept across
answers (`RowCost`: a property of the model on this machine). C is kept per
row count, not as a slope: the batched kernels take x's rows four at a time,
so on SmolLM2 4 rows cost 1.54 passes and 5 rows 2.16 (3: 1.51, 8: 2.77, 9:
3.44). A draft of k tokens yields 1 + a + a^2 + ... + a^k tokens, expected,
for C(k + 1) passes' time: it drafts the k that maximises that ratio, and
nothing when no k beats 1 (then, every
EXPLORE_EVERY proposals, a short draft anyway, so that a text that turns
repetitive is noticed). An answer starts from a hopeful a (PRIOR_KEPT,
PRIOR_REFUSED): a wrong start costs a few rows, a cautious one cost most of
the gain on short answers that repeat their context.
"""

from __future__ import annotations

from collections.abc import Sequence

from .weight_matrix import BATCH_ROWS

# The most tokens drafted at once: the last token and the draft must fit one
# batched product whose rows equal the one-token products (weight_matrix.BATCH_ROWS).
MAX_DRAFT = BATCH_ROWS - 1
NGRAM_SIZES = (8, 4, 3, 2)  # longest first: a longer match predicts better
EXPLORE_EVERY = 16
EXPLORE_DRAFT = 2
MEMORY = 0.8  # weight of the past in the running estimates (per pass)
PRIOR_KEPT, PRIOR_REFUSED = 2.0, 0.5  # an answer's first drafts: a = 0.8
FIRST_EXTRA_ROW_COST = 0.5  # the slope before any pass is timed


def draft_room(n_ctx: int, n_tokens: int, max_tokens: int, generated: int) -> int:
    """The most tokens a draft after n_tokens may hold: the context's room beside the
    last token's row, and the tokens still wanted (max_tokens -1: no limit; the row
    after the last draft token yields one more)."""
    room = n_ctx - n_tokens - 1
    if max_tokens > 0:
        room = min(room, max_tokens - generated - 1)
    return max(room, 0)


class RowCost:
    """What a batched pass of n rows costs, in one-token passes, from the passes'
    own times. One per model (the engine's, the slots'): every answer drafts on
    what earlier ones measured."""

    def __init__(self):
        self.one_row_seconds: float | None = None
        self.extra_row = FIRST_EXTRA_ROW_COST  # the slope over all passes: for counts not yet timed
        self._passes: dict[int, float] = {}  # rows -> a pass's time over a one-token pass's, as timed
        self._seen: set[int] = set()  # counts whose first pass has been left out

    def timed(self, rows: int, seconds: float) -> None:
        """A pass of `rows` rows took `seconds`."""
        if rows not in self._seen:  # a count's first pass also loads its kernels (tens of ms): not its cost
            self._seen.add(rows)
            return
        if rows == 1:
            one = self.one_row_seconds
            self.one_row_seconds = seconds if one is None else MEMORY * one + (1 - MEMORY) * seconds
        elif self.one_row_seconds:
            ratio = seconds / self.one_row_seconds
            self.extra_row = MEMORY * self.extra_row + (1 - MEMORY) * max(0.0, ratio - 1) / (rows - 1)
            known = self._passes.get(rows)
            self._passes[rows] = ratio if known is None else MEMORY * known + (1 - MEMORY) * ratio

    def passes(self, rows: int) -> float:
        """A pass of `rows` rows in one-token passes: as timed, or, for a count not
        yet timed, the nearest timed count below plus the slope for the rest (a
        guess low enough to be tried, and then timed, when it would pay)."""
        if rows in self._passes:
            return self._passes[rows]
        below = max((n for n in self._passes if n < rows), default=1)
        return (self._passes[below] if below > 1 else 1.0) + self.extra_row * (rows - below)


class Drafter:
    """Proposes tokens that continue `tokens` the way an earlier occurrence of
    its last n-gram continued, as many as pay (at most `max_draft`)."""

    def __init__(self, max_draft: int, row_cost: RowCost | None = None):
        if not 0 <= max_draft <= MAX_DRAFT:
            raise ValueError(f"the draft length must be in 0..{MAX_DRAFT}")
        self.max_draft = max_draft
        self.row_cost = row_cost if row_cost is not None else RowCost()
        # Per n-gram size, drafted tokens kept and drafts refused (decaying counts):
        # a = (kept + PRIOR_KEPT) / (kept + refused + PRIOR_KEPT + PRIOR_REFUSED).
        self._kept = dict.fromkeys(NGRAM_SIZES, 0.0)
        self._refused = dict.fromkeys(NGRAM_SIZES, 0.0)
        self._matched = NGRAM_SIZES[0]  # the n-gram size of the last proposal
        self._declined = 0
        # n-gram -> the position just after its most recent occurrence, for the
        # tokens seen so far (indexed incrementally: each token once per size).
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0

    def propose(self, tokens: Sequence[int]) -> list[int]:
        """The draft after `tokens` (the whole sequence so far), or [] for none."""
        if self.max_draft == 0:
            return []
        # Index every n-gram that ends before the last token: the current one must
        # be found earlier, never matched with itself.
        self._index_up_to(tokens, len(tokens) - 1)
        for n in NGRAM_SIZES:
            if len(tokens) > n and (start := self._index.get(tuple(tokens[-n:]))) is not None:
                found = list(tokens[start:start + self.max_draft])
                # An occurrence that ends in the present is a loop of this period
                # (a model repeating itself): the draft goes round it again.
                period = len(tokens) - start
                while len(found) < self.max_draft:
                    found.append(found[-period])
                break
        else:
            return []
        self._matched = n
        length = self._paying_length(n)
        if not length:
            self._declined += 1
            if self._declined < EXPLORE_EVERY:
                return []
            length = EXPLORE_DRAFT
        self._declined = 0
        return found[:length]

    def _paying_length(self, n: int) -> int:
        """The draft length with the most tokens per unit of time after a match of
        n tokens (0: none pays)."""
        kept, refused = self._kept[n], self._refused[n]
        a = (kept + PRIOR_KEPT) / (kept + refused + PRIOR_KEPT + PRIOR_REFUSED)
        best, best_rate, expected = 0, 1.0, 1.0
        for k in range(1, self.max_draft + 1):
            expected += a ** k
            rate = expected / self.row_cost.passes(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def _index_up_to(self, tokens: Sequence[int], end: int) -> None:
        for stop in range(max(self._indexed, 1), end + 1):
            for n in NGRAM_SIZES:
                if stop >= n:
                    self._index[tuple(tokens[stop - n:stop])] = stop
        self._indexed = max(self._indexed, end + 1)

    def feedback(self, drafted: int, accepted: int) -> None:
        """After a batched pass: `accepted` of the `drafted` tokens of the last
        proposal were kept (the ones after the first refused were never tried)."""
        n = self._matched
        self._kept[n] = MEMORY * self._kept[n] + accepted
        self._refused[n] = MEMORY * self._refused[n] + (accepted < drafted)

    def timed(self, rows: int, seconds: float) -> None:
        """A pass of `rows` rows took `seconds`: the cost estimates follow."""
        self.row_cost.timed(rows, seconds)

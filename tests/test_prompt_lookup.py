"""Prompt-lookup decoding (runtime/prompt_lookup.py): the drafter, and the generation
loop's promise that drafting changes the number of passes, never the text."""

import gguf
import numpy as np
import pytest

from llamazip.runtime.generate import GenerationStats, generate
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.prompt_lookup import EXPLORE_DRAFT, FIRST_EXTRA_ROW_COST, MAX_DRAFT, Drafter, RowCost
from llamazip.runtime.sampling import Sampler, SamplingParams
from scripted_drafter import ScriptedDrafter
from tiny_models import TinyLlama

Q = gguf.GGMLQuantizationType


class PayingDrafter(Drafter):
    """A drafter whose drafts always pay: every match is proposed in full."""

    def _paying_length(self, n: int) -> int:
        return self.max_draft


def test_drafts_what_followed_the_last_ngram_before():
    drafter = PayingDrafter(4)
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [5, 1, 2, 3, 9, 8, 7, 1, 2, 3]
    assert drafter.propose(tokens) == [9, 8, 7, 1]  # after the earlier 1 2 3
    assert drafter.propose(tokens + [4]) == []  # "2 3 4" and "3 4" never occurred before


def test_the_most_recent_and_longest_match_wins():
    tokens = [1, 2, 6, 6, 0, 1, 2, 7, 7, 3, 1, 2]
    assert PayingDrafter(3).propose(tokens) == [7, 7, 3]  # "1 2" twice before: the later one
    tokens = [9, 1, 2, 5, 5, 0, 1, 2, 6, 6, 9, 1, 2]
    assert PayingDrafter(3).propose(tokens) == [5, 5, 0]  # "9 1 2" (3 tokens) beats the later "1 2"


def test_no_draft_from_the_sequence_itself_or_too_short():
    assert PayingDrafter(4).propose([3, 3]) == []
    assert PayingDrafter(4).propose([1, 2, 1, 2]) == [1, 2, 1, 2]  # the "1 2" at 0..2 continues "1 2", a loop
    assert PayingDrafter(4).propose([4, 4, 4]) == [4, 4, 4, 4]  # the earlier "4 4" ends just before the last token


def test_a_loop_is_drafted_round_again():
    """A match whose continuation reaches the last tokens is a text repeating itself
    (small models loop): the draft follows the loop past the present, not just up to it."""
    #          0  1  2  3  4  5  6  7  8  9 10
    tokens = [9, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    assert PayingDrafter(8).propose(tokens) == [7, 8, 5, 6, 7, 8, 5, 6]  # period 4: "5 6 7 8"
    assert PayingDrafter(3).propose([1, 2, 3, 4, 1, 2]) == [3, 4, 1]  # the occurrence itself holds enough


def test_draft_length_follows_what_pays():
    drafter = Drafter(8)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    # Kept drafts and cheap extra rows: long drafts.
    for _ in range(6):
        drafter.propose(tokens)
        drafter.feedback(8, 8)
        drafter.timed(1, 1.0)
        drafter.timed(9, 3.4)  # an extra row: 0.3 of a pass
    assert len(drafter.propose(tokens)) == 8
    # Refused drafts: none, but a short one now and then to notice a change.
    for _ in range(30):
        drafter.feedback(4, 0)
    proposals = [drafter.propose(tokens) for _ in range(40)]
    assert [len(p) for p in proposals if p] == [EXPLORE_DRAFT, EXPLORE_DRAFT]


def test_acceptance_is_kept_apart_per_ngram_size():
    """Refused drafts after 2-token matches (free text) do not stop drafting after
    4-token ones (a passage being repeated)."""
    drafter = Drafter(8)
    tokens = [1, 2, 3, 4, 5, 6, 0, 8, 9, 1, 2]  # only the last "1 2" occurred before
    for _ in range(20):
        assert drafter.propose(tokens)[:1] in ([], [3])
        drafter.feedback(2, 0)
    assert drafter.propose(tokens) == []
    tokens += [3, 4]  # now "1 2 3 4" did
    draft = drafter.propose(tokens)
    assert draft and draft == [5, 6, 0, 8, 9, 1, 2, 3][:len(draft)]


def test_the_row_cost_is_shared_between_answers():
    """What an extra row costs is the model's, measured once: the next answer
    drafts on it from its first proposal."""
    cost = RowCost()
    first = Drafter(8, cost)
    for _ in range(20):
        first.timed(1, 1.0)
        first.timed(9, 5.0)  # an extra row costs half a pass
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4]
    costly = len(Drafter(8, cost).propose(tokens))
    cheap = len(Drafter(8).propose(tokens))  # the first guess, 0.5: as costly; now measure cheap rows
    for _ in range(20):
        cost.timed(1, 1.0)
        cost.timed(9, 1.4)
    assert 0 < costly == cheap < len(Drafter(8, cost).propose(tokens)) == 8


def test_draft_length_follows_the_cost_of_each_row_count():
    """The batched kernels take x's rows four at a time: a draft that fills a
    pass's last four rows pays where one more row would begin four more."""
    cost = RowCost()
    passes = {2: 1.2, 3: 1.5, 4: 1.55, 5: 2.2, 6: 2.3, 7: 2.7, 8: 2.8, 9: 3.5}  # SmolLM2's, rounded
    for _ in range(10):
        cost.timed(1, 1.0)
        for rows, seconds in passes.items():
            cost.timed(rows, seconds)
    assert cost.passes(4) == pytest.approx(1.55) and cost.passes(12) == pytest.approx(3.5 + 3 * cost.extra_row)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4]
    drafter = Drafter(8, cost)
    assert len(drafter.propose(tokens)) == 3  # kept with 0.8 (the first guess): 4 rows
    for _ in range(6):
        drafter.feedback(8, 8)
    assert len(drafter.propose(tokens)) == 7  # kept nearly always: 8 rows, not 9 (as costly as 8 and a half)


def test_a_row_count_not_yet_timed_is_guessed_from_the_nearest_below():
    cost = RowCost()
    cost.timed(1, 30.0)  # the first pass of each count loads its kernels: left out
    cost.timed(1, 1.0)
    cost.timed(4, 40.0)
    assert cost.passes(4) == pytest.approx(1 + 3 * cost.extra_row) and cost.extra_row == FIRST_EXTRA_ROW_COST
    cost.timed(4, 1.6)
    assert cost.passes(4) == pytest.approx(1.6)
    assert cost.passes(6) == pytest.approx(1.6 + 2 * cost.extra_row)
    assert cost.passes(3) == pytest.approx(1 + 2 * cost.extra_row)


def test_bad_draft_length():
    with pytest.raises(ValueError, match="draft length"):
        Drafter(MAX_DRAFT + 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyLlama(weight_type=Q.Q8_0, seed=11, n_layer=3).write(tmp_path_factory.mktemp("pl") / "tiny.gguf")


PROMPT = [256, 72, 101, 108, 108, 111, 32, 72, 101, 108, 108, 111]


def _run(path, sampling: SamplingParams, drafter=None, n=48):
    model = Model(GGUFFile(path), n_ctx=128)
    tokens, stats = list(PROMPT), GenerationStats()
    out = list(generate(model, tokens, Sampler(sampling), n, stats=stats, drafter=drafter))
    return out, stats


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0),
                                      SamplingParams(temperature=0.9, top_k=40, seed=7, repeat_penalty=1.1)])
@pytest.mark.parametrize("wrong", [1, 2, 3, 1000])
def test_drafting_changes_the_passes_never_the_tokens(tiny, sampling, wrong):
    """Each row's logits are the one-token pass's, bit for bit, and each emitted token
    is one sampler call: greedy and seeded sampling give the same tokens."""
    plain, _ = _run(tiny, sampling)
    drafter = ScriptedDrafter(list(PROMPT) + plain, wrong)
    drafted, stats = _run(tiny, sampling, drafter)
    assert drafted == plain
    assert stats.draft_passes > 0 and stats.accepted_tokens > 0
    assert (stats.accepted_tokens == stats.drafted_tokens) == (wrong > 100)  # every draft right, or some wrong


def test_drafting_stops_at_the_token_limit_and_the_context(tiny):
    truth, _ = _run(tiny, SamplingParams(temperature=0), n=40)
    for n in (1, 2, 7):
        drafted, stats = _run(tiny, SamplingParams(temperature=0), ScriptedDrafter(list(PROMPT) + truth, 1000), n)
        assert drafted == truth[:n] and stats.generated_tokens == n

"""AQLM's calibration sequences (builder/calibration_data.py): the default mix
takes turns among prose, code and the model's own text, keeps clear of the
scored pydoc tail, and the model's own text is what the model samples, each
token from its own stream's context."""

from __future__ import annotations

import numpy as np
import pytest
from llamazip.builder import calibration_data as data
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.tokenizer import Tokenizer
from tiny_models import TinyLlama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return GGUFFile(TinyLlama(seed=2).write(tmp_path_factory.mktemp("calibration") / "tiny.gguf"))


def test_pydoc_text_leaves_out_the_scored_tail():
    from pydoc_data.topics import topics

    whole = "\n\n".join(topics[key] for key in sorted(topics))
    text = data.pydoc_text()
    assert whole.startswith(text) and len(whole) - len(text) == data.HELD_OUT_PYDOC_CHARS


def test_text_sequences_are_bos_and_the_text_in_order(tiny):
    tokenizer = Tokenizer.from_metadata(tiny.metadata)
    text = "".join(chr(ord("a") + i % 26) for i in range(600))
    sequences = data.text_sequences(tiny, text, 500, n_ctx=128)
    assert [len(s) for s in sequences] == [128, 128, 128, 120]  # 127 text tokens each after BOS
    assert all(s[0] == tokenizer.bos_id for s in sequences)
    assert np.concatenate([s[1:] for s in sequences]).tolist() == tokenizer.encode(text, add_special=False)[:500]
    with pytest.raises(data.CalibrationError, match="needs at least 16"):
        data.text_sequences(tiny, "short", 100)


def test_generated_sequences_are_seeded_and_full_length(tiny):
    a = data.generated_sequences(tiny, 5, seed=1, n_ctx=64)
    assert len(a) == 5 and all(len(s) == 64 for s in a)
    bos = Tokenizer.from_metadata(tiny.metadata).bos_id
    assert all(s[0] == bos for s in a)
    again = data.generated_sequences(tiny, 5, seed=1, n_ctx=64)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))
    other = data.generated_sequences(tiny, 5, seed=2, n_ctx=64)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))


def test_default_sequences_take_turns_among_the_sources(tiny, monkeypatch):
    made = []
    monkeypatch.setattr(data, "pydoc_text", lambda: "p" * 5000)
    monkeypatch.setattr(data, "stdlib_code", lambda: "c" * 5000)

    def own(src, count, seed, n_ctx, progress=None):
        made.append(count)
        return [np.full(n_ctx, 1000 + i) for i in range(count)]

    monkeypatch.setattr(data, "generated_sequences", own)
    sequences = data.default_sequences(tiny, 8, seed=0, generated=2, n_ctx=32)
    tokenizer = Tokenizer.from_metadata(tiny.metadata)
    p, c = tokenizer.encode("p", add_special=False)[0], tokenizer.encode("c", add_special=False)[0]
    kinds = ["prose" if s[1] == p else "code" if s[1] == c else f"own {s[0] - 1000}" for s in sequences]
    # shares 4, 2, 2; the two generated sequences each once
    assert kinds == ["prose", "code", "own 0", "prose", "code", "own 1", "prose", "prose"]
    assert made == [2]
    sequences = data.default_sequences(tiny, 9, seed=0, generated=1, n_ctx=32)  # own text repeated in turn
    assert [s[0] for s in sequences[2::3]] == [1000, 1000, 1000]
    assert len(data.default_sequences(tiny, 2, seed=0, generated=1, n_ctx=32)) == 2  # prose only: no empty source


@pytest.mark.model
def test_generated_text_is_sampled_from_each_streams_own_context(smollm2_path):
    """Every sampled token must pass the sampler's min-p filter under its own
    sequence's decode passes, one token at a time: four streams share one batched
    pass, whose rows equal those passes bit for bit, and a token drawn from another
    stream's context (a cache mix-up) would often fail. (Against a prompt pass, in
    float-precise products, the filter's edge moved by the decode's int8 rounding:
    a token sampled at p >= 0.02 scored 0.0167 there.)"""
    src = GGUFFile(smollm2_path)
    tokenizer = Tokenizer.from_metadata(src.metadata)
    openings = [tokenizer.encode(t, add_special=False) for t in data.OPENINGS]
    model = Model(src, n_ctx=96, n_slots=data.GENERATION_SLOTS)  # as the generator's: the same kernels
    checked = 0
    for seq in data.generated_sequences(src, 4, seed=3, n_ctx=96):
        first = int(tokenizer.add_bos)
        body = seq[first:].tolist()  # after BOS (if the model adds one): an opening, then sampled tokens
        start = first + max(len(o) for o in openings if body[:len(o)] == o)
        logits = np.array([model.forward(seq[i:i + 1], i) for i in range(len(seq) - 1)], np.float64)
        for i in range(start, len(seq)):
            if seq[i - 1] in tokenizer.eog_ids:
                break  # an opening follows: not sampled
            p = np.exp(logits[i - 1] - logits[i - 1].max())
            assert p[seq[i]] >= 0.02 * (1 - 1e-9), (i, p[seq[i]])
            checked += 1
    assert checked > 150

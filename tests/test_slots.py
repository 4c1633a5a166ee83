"""Parallel slots: the batched decode step against each sequence's own forward pass,
and the scheduler that runs several generations at once (runtime/slots.py)."""

import numpy as np
import pytest
import gguf

from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.weight_matrix import QuantMatrix
from llamazip.runtime.weight_types import FLOAT_SWITCH
from tiny_models import TinyGemma3, TinyLlama, TinyQwen2

Q = gguf.GGMLQuantizationType
# Prompts of different lengths: their sequences decode at different positions.
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 87, 111, 114, 108, 100, 33, 32, 65], [256, 66, 121],
           [256, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116]]
NEXT = [44, 32, 119, 101]  # the token each sequence decodes next


def _filled(model: Model, prompts: list[list[int]]) -> None:
    for slot, prompt in enumerate(prompts):
        model.forward(np.array(prompt), 0, slot=slot)


def _own_logits(path, prompts: list[list[int]]) -> np.ndarray:
    """Each sequence alone in a one-slot model: its prompt, then its next token."""
    rows = []
    for prompt, token in zip(prompts, NEXT):
        alone = Model(GGUFFile(path), n_ctx=32)
        alone.forward(np.array(prompt), 0)
        rows.append(alone.forward(np.array([token]), len(prompt)))
    return np.stack(rows)


def _rows_as_matvec(monkeypatch) -> None:
    """matmul computed as one matvec per row: what the batched int8 kernel gives."""
    monkeypatch.setattr(QuantMatrix, "matmul", lambda self, x: np.stack([self.matvec(row) for row in x]))


@pytest.mark.parametrize("architecture", [TinyLlama, TinyQwen2, TinyGemma3])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_batched_step_equals_each_sequence_alone_when_rows_equal_matvec(tmp_path, monkeypatch, architecture, n):
    """Everything in the batched step but the weights' product is the single-token
    step's own compiled code, row by row: with matmul rows equal to matvec, the
    logits are bit for bit each sequence's own."""
    _rows_as_matvec(monkeypatch)
    path = architecture(weight_type=Q.Q8_0, n_head_kv=2, seed=n, tied=False).write(tmp_path / "tiny.gguf")
    model = Model(GGUFFile(path), n_ctx=32, n_slots=4)
    prompts = PROMPTS[:n]
    # Slots out of order: row i belongs to slot slots[i].
    slots = list(reversed(range(n)))
    _filled(model, [prompts[slots.index(s)] for s in range(n)])
    batched = model.forward_batch(NEXT[:n], [len(p) for p in prompts], slots)
    np.testing.assert_array_equal(batched, _own_logits(path, prompts))


@pytest.mark.parametrize("weight_type", [Q.F32, Q.Q8_0, Q.Q4_0])
def test_batched_step_with_todays_matmul_is_within_rounding(tmp_path, weight_type):
    """With the prompt kernels' float matmul under the batched rows, the logits
    differ from the int8 matvec's by int8 rounding; on the float path
    (LLAMAZIP_FLOAT_MATVEC=1) by float32 summation order only."""
    path = TinyLlama(weight_type=weight_type, seed=7, tied=False).write(tmp_path / "tiny.gguf")
    for float_path, tolerance in ((True, 1e-5), (False, 2e-2)):
        with pytest.MonkeyPatch.context() as patch:
            if float_path:
                patch.setenv(FLOAT_SWITCH, "1")
            model = Model(GGUFFile(path), n_ctx=32, n_slots=4)
            _filled(model, PROMPTS)
            batched = model.forward_batch(NEXT, [len(p) for p in PROMPTS], [0, 1, 2, 3])
            own = _own_logits(path, PROMPTS)
        scale = np.abs(own).max()
        np.testing.assert_allclose(batched, own, rtol=0, atol=tolerance * scale)


def test_slots_keep_their_own_caches(tmp_path):
    """A sequence in slot 1 leaves slot 0's cache as it was."""
    path = TinyLlama(seed=4).write(tmp_path / "tiny.gguf")
    model = Model(GGUFFile(path), n_ctx=32, n_slots=2)
    model.forward(np.array(PROMPTS[0]), 0, slot=0)
    model.forward(np.array(PROMPTS[1]), 0, slot=1)
    after = model.forward(np.array([NEXT[0]]), len(PROMPTS[0]), slot=0)
    np.testing.assert_array_equal(after, _own_logits(path, PROMPTS[:1])[0])


def test_forward_batch_refuses_bad_slots(tmp_path):
    model = Model(GGUFFile(TinyLlama().write(tmp_path / "tiny.gguf")), n_ctx=8, n_slots=2)
    with pytest.raises(ValueError, match="one token per pass"):
        model.forward_batch([1, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="slot 2"):
        model.forward_batch([1], [0], [2])
    with pytest.raises(ValueError, match="do not fit"):
        model.forward_batch([1, 2], [0, 8], [0, 1])

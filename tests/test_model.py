"""Our forward pass against an independent float64 reference on tiny random Llamas."""

import gguf
import numpy as np
import pytest

from llamazip.runtime import generate as generate_module
from llamazip.runtime.generate import process_prompt
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from tiny_llama import TinyLlama

Q = gguf.GGMLQuantizationType
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119]  # BOS "Hello, w"


def _close(ours, reference):
    # float32 accumulation against float64: compare relative to the logits' scale
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-4 * scale)


@pytest.mark.parametrize("weight_type", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_prompt_then_decode_matches_reference(tmp_path, weight_type):
    tiny = TinyLlama(weight_type=weight_type, seed=int(weight_type))
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=32)
    continuation = [101, 114, 108, 100]
    reference = tiny.reference_logits(PROMPT + continuation)

    _close(model.forward(np.array(PROMPT), 0), reference[len(PROMPT) - 1])
    for i, token in enumerate(continuation):
        pos = len(PROMPT) + i
        _close(model.forward(np.array([token]), pos), reference[pos])


def test_untied_head_and_grouped_heads(tmp_path):
    tiny = TinyLlama(tied=False, n_head=8, n_head_kv=2, dim=64, n_layer=3, seed=7)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    _close(model.forward(np.array(PROMPT), 0), tiny.reference_logits(PROMPT)[-1])


def test_prompt_in_batches_equals_one_pass(tmp_path, monkeypatch):
    tiny = TinyLlama(seed=3)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    whole = process_prompt(model, PROMPT)
    monkeypatch.setattr(generate_module, "PROMPT_BATCH", 4)
    np.testing.assert_allclose(process_prompt(model, PROMPT), whole, rtol=1e-5, atol=1e-5)


def test_rewind_overwrites_the_cache(tmp_path):
    tiny = TinyLlama(seed=4)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    model.forward(np.array(PROMPT), 0)
    first = model.forward(np.array([1]), len(PROMPT))
    model.forward(np.array([2]), len(PROMPT))  # a different token at the same position
    np.testing.assert_allclose(model.forward(np.array([1]), len(PROMPT)), first, rtol=1e-6, atol=1e-6)

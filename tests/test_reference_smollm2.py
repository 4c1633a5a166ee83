"""SmolLM2 through our runtime against transformers loading the same GGUF.

transformers dequantizes the GGUF with gguf-py and runs its own Llama code: an
implementation we did not write. Both are fed the same token ids (the tokenizer
has its own test against llama.cpp), and greedy decoding must agree.
"""

import numpy as np
import pytest

from llamazip.runtime.generate import generate
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.sampling import Sampler, SamplingParams
from llamazip.runtime.tokenizer import Tokenizer

import torch  # noqa: E402
import transformers  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4,",
]
N_TOKENS = 16


@pytest.fixture(scope="module")
def ours(smollm2_path):
    gguf = GGUFFile(smollm2_path)
    return Model(gguf, n_ctx=256), Tokenizer.from_metadata(gguf.metadata)


@pytest.fixture(scope="module")
def theirs(smollm2_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


def _their_greedy(model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    ids = list(prompt)
    first_logits = None
    with torch.no_grad():
        for _ in range(N_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
            first_logits = logits if first_logits is None else first_logits
            ids.append(int(np.argmax(logits)))
    return ids[len(prompt):], first_logits


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(ours, theirs, prompt):
    model, tokenizer = ours
    ids = tokenizer.encode(prompt, add_special=True, parse_special=True)
    expected, their_logits = _their_greedy(theirs, ids)

    tokens = list(ids)
    got = list(generate(model, tokens, Sampler(SamplingParams(temperature=0)), max_tokens=N_TOKENS))
    assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))

    our_logits = model.forward(np.array(ids), 0)
    scale = np.abs(their_logits).max()
    np.testing.assert_allclose(our_logits, their_logits, rtol=0, atol=2e-3 * scale)


def test_capital_of_france_continues_sensibly(ours):
    model, tokenizer = ours
    tokens = tokenizer.encode("The capital of France is", add_special=True)
    text = tokenizer.decode(generate(model, tokens, Sampler(SamplingParams(temperature=0)), max_tokens=8))
    assert "Paris" in text

"""SmolLM2 through our runtime against transformers (and llama.cpp) loading the
same GGUF: see decode_reference for the two checks. Both are fed the same
token ids (the tokenizer has its own test against llama.cpp).
"""

import pytest
from decode_reference import Runtimes

from llamazip.runtime.generate import generate
from llamazip.runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> Runtimes:
    return Runtimes(smollm2_path, n_ctx=256)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_float_path_gives_transformers_greedy_tokens(smollm2, prompt):
    smollm2.check_float_path(prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_path_is_as_close_to_transformers_as_llama_cpp(smollm2, prompt):
    smollm2.check_default_path(prompt)


def test_capital_of_france_continues_sensibly(smollm2):
    tokens = smollm2.encode("The capital of France is")
    text = smollm2.tokenizer.decode(generate(smollm2.model, tokens, Sampler(SamplingParams(temperature=0)),
                                             max_tokens=8))
    assert "Paris" in text

"""Qwen2.5-Coder 0.5B and Gemma 3 270M through our runtime against transformers
(and llama.cpp) loading the same GGUF: see decode_reference for the two checks.
Both are fed the same token ids (the tokenizers have their own tests against
llama.cpp).
"""

import pytest
from decode_reference import Runtimes

from llamazip.runtime.generate import generate
from llamazip.runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.model

QWEN_PROMPTS = [
    "def fibonacci(n):\n",
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
# The counting prompt (~670 tokens) runs past Gemma's 512-token sliding window.
GEMMA_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    ", ".join(str(i) for i in range(1, 151)) + ",",
]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def qwen(qwen_path) -> Runtimes:
    return Runtimes(qwen_path)


@pytest.fixture(scope="module")
def gemma(gemma3_path) -> Runtimes:
    return Runtimes(gemma3_path)


@pytest.mark.parametrize("prompt", QWEN_PROMPTS, ids=lambda p: p[:30])
def test_qwen_float_path_gives_transformers_greedy_tokens(qwen, prompt):
    qwen.check_float_path(prompt)


@pytest.mark.parametrize("prompt", QWEN_PROMPTS, ids=lambda p: p[:30])
def test_qwen_default_path_is_as_close_to_transformers_as_llama_cpp(qwen, prompt):
    qwen.check_default_path(prompt)


@pytest.mark.parametrize("prompt", GEMMA_PROMPTS, ids=lambda p: p[:30])
def test_gemma_float_path_gives_transformers_greedy_tokens(gemma, prompt):
    gemma.check_float_path(prompt)


@pytest.mark.parametrize("prompt", GEMMA_PROMPTS, ids=lambda p: p[:30])
def test_gemma_default_path_is_as_close_to_transformers_as_llama_cpp(gemma, prompt):
    gemma.check_default_path(prompt)


def test_qwen_chat_answers_two_plus_two(qwen):
    # ChatML written out by hand: rendering the Jinja template is another issue.
    prompt = (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
              "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n"
              "<|im_start|>assistant\n")
    tokens = qwen.tokenizer.encode(prompt, add_special=True, parse_special=True)
    answer = qwen.tokenizer.decode(generate(qwen.model, tokens, Sampler(SamplingParams(temperature=0)),
                                            max_tokens=8, stop_ids=qwen.tokenizer.eog_ids))
    assert "4" in answer, answer

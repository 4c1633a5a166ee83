"""Qwen2.5-Coder 0.5B and Gemma 3 270M through our runtime against transformers
loading the same GGUF (its own Qwen2 and Gemma 3 code, weights dequantized by
gguf-py): greedy tokens must agree and first-step logits be close. Both sides are
fed the same token ids (the tokenizers have their own tests against llama.cpp).
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

N_TOKENS = 16
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


class Pair:
    """Our model and tokenizer beside transformers' model, loaded from one GGUF."""

    def __init__(self, path):
        gguf = GGUFFile(path)
        self.model = Model(gguf, n_ctx=1024)
        self.tokenizer = Tokenizer.from_metadata(gguf.metadata)
        self.theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def their_greedy(self, prompt: list[int]) -> tuple[list[int], np.ndarray]:
        """N_TOKENS greedy tokens after `prompt`, and the logits of the first step."""
        with torch.no_grad():
            out = self.theirs(torch.tensor([prompt]), use_cache=True)
            first_logits = out.logits[0, -1].numpy()
            ids = [int(np.argmax(first_logits))]
            for _ in range(N_TOKENS - 1):
                out = self.theirs(torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
                ids.append(int(out.logits[0, -1].argmax()))
        return ids, first_logits

    def check_against_transformers(self, prompt: str) -> None:
        ids = self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        expected, their_logits = self.their_greedy(ids)

        got = list(generate(self.model, list(ids), Sampler(SamplingParams(temperature=0)), max_tokens=N_TOKENS))
        assert got == expected, (self.tokenizer.decode(got), self.tokenizer.decode(expected))

        our_logits = self.model.forward(np.array(ids), 0)
        scale = np.abs(their_logits).max()
        np.testing.assert_allclose(our_logits, their_logits, rtol=0, atol=2e-3 * scale)


@pytest.fixture(scope="module")
def qwen(qwen_path) -> Pair:
    return Pair(qwen_path)


@pytest.fixture(scope="module")
def gemma(gemma3_path) -> Pair:
    return Pair(gemma3_path)


@pytest.mark.parametrize("prompt", QWEN_PROMPTS, ids=lambda p: p[:30])
def test_qwen_greedy_tokens_match_transformers(qwen, prompt):
    qwen.check_against_transformers(prompt)


@pytest.mark.parametrize("prompt", GEMMA_PROMPTS, ids=lambda p: p[:30])
def test_gemma_greedy_tokens_match_transformers(gemma, prompt):
    gemma.check_against_transformers(prompt)


def test_qwen_chat_answers_two_plus_two(qwen):
    # ChatML written out by hand: rendering the Jinja template is another issue.
    prompt = (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
              "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n"
              "<|im_start|>assistant\n")
    tokens = qwen.tokenizer.encode(prompt, add_special=True, parse_special=True)
    answer = qwen.tokenizer.decode(generate(qwen.model, tokens, Sampler(SamplingParams(temperature=0)),
                                            max_tokens=8, stop_ids=qwen.tokenizer.eog_ids))
    assert "4" in answer, answer

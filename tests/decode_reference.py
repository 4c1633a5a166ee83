"""Our model beside transformers and llama.cpp on one GGUF, for the real-model tests.

Two runtimes we did not write: transformers (its own model code, weights
dequantized by gguf-py, float32 all the way) and llama.cpp (llama-cpp-python).
Two checks:
- exact: our float path (LLAMAZIP_FLOAT_MATVEC=1) must give transformers'
  greedy tokens and logits within float32 rounding;
- default: decoding rounds each layer's input to int8 (runtime/int8_matvec.py),
  as llama.cpp does, so logits move by that rounding. Fed transformers' greedy
  tokens (teacher forcing), our logits must stay as close to transformers' as
  llama.cpp's do, and our top token may differ only where transformers' top
  two lie within twice our error of each other.
"""

from __future__ import annotations

import os

import llama_cpp
import numpy as np
import pytest

from llamazip.runtime.generate import generate
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.weight_types import FLOAT_SWITCH
from llamazip.runtime.model import Model
from llamazip.runtime.sampling import Sampler, SamplingParams
from llamazip.runtime.tokenizer import Tokenizer

import torch  # noqa: E402
import transformers  # noqa: E402

N_TOKENS = 16


class Runtimes:
    """Our model (default and float paths), tokenizer, transformers' model and
    llama.cpp, all loaded from the GGUF at `path`."""

    def __init__(self, path, n_ctx: int = 1024):
        gguf = GGUFFile(path)
        self.model = Model(gguf, n_ctx=n_ctx)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(FLOAT_SWITCH, "1")
            self.float_model = Model(gguf, n_ctx=n_ctx)
        self.tokenizer = Tokenizer.from_metadata(gguf.metadata)
        self.theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        self.llama_cpp = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                         n_threads=min(2, os.cpu_count() or 1), verbose=False)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special=True, parse_special=True)

    def their_greedy(self, ids: list[int]) -> tuple[list[int], np.ndarray]:
        """transformers' N_TOKENS greedy tokens after `ids`, and its logits at each of those steps."""
        steps = []
        with torch.no_grad():
            out = self.theirs(torch.tensor([ids]), use_cache=True)
            steps.append(out.logits[0, -1].numpy())
            tokens = [int(np.argmax(steps[-1]))]
            for _ in range(N_TOKENS - 1):
                out = self.theirs(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits[0, -1].numpy())
                tokens.append(int(np.argmax(steps[-1])))
        return tokens, np.array(steps)

    def check_float_path(self, prompt: str) -> None:
        """Exact: transformers' greedy tokens, and its first logits within float32 rounding."""
        ids = self.encode(prompt)
        expected, their_logits = self.their_greedy(ids)
        got = list(generate(self.float_model, list(ids), Sampler(SamplingParams(temperature=0)),
                            max_tokens=N_TOKENS))
        assert got == expected, (self.tokenizer.decode(got), self.tokenizer.decode(expected))
        ours = self.float_model.forward(np.array(ids), 0)
        np.testing.assert_allclose(ours, their_logits[0], rtol=0, atol=2e-3 * np.abs(their_logits[0]).max())

    def check_default_path(self, prompt: str) -> None:
        """As close to transformers as llama.cpp, along transformers' greedy tokens."""
        ids = self.encode(prompt)
        expected, theirs = self.their_greedy(ids)
        ours = [self.model.forward(np.array(ids), 0)]  # the prompt pass, then one token at a time
        for i, token in enumerate(expected[:-1]):
            ours.append(self.model.forward(np.array([token]), len(ids) + i))
        ours = np.array(ours)
        self.llama_cpp.reset()
        self.llama_cpp.eval(ids + expected[:-1])
        cpp = np.array(self.llama_cpp.scores[len(ids) - 1:len(ids) + N_TOKENS - 1])

        our_error = np.abs(ours - theirs).max(axis=1)
        cpp_error = np.abs(cpp - theirs).max(axis=1)
        assert our_error.mean() <= cpp_error.mean(), (our_error.round(3), cpp_error.round(3))
        top_two = np.sort(theirs, axis=1)[:, -2:]
        margin = top_two[:, 1] - top_two[:, 0]
        differs = ours.argmax(axis=1) != theirs.argmax(axis=1)
        assert np.all(margin[differs] <= 2 * our_error[differs]), (margin[differs], our_error[differs])

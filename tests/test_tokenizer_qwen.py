"""Qwen2.5's real byte-level BPE vocabulary (pre-tokenizer qwen2) against llama.cpp."""

import pytest

from llama_cpp_tokenizer import TRICKY, assert_encodes_like, llama, short_repr
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.model

QWEN_EXTRA = [
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>", "<|fim_prefix|>def f():<|fim_suffix|>",
    "x = [1, 22, 333, 4444, 55555]", "    indented   code\t\ttabs", "αβγ Ελληνικά Кириллица",
]


@pytest.fixture(scope="module")
def ours(qwen_path):
    return Tokenizer.from_metadata(GGUFFile(qwen_path).metadata)


@pytest.fixture(scope="module")
def llm(qwen_path):
    return llama(qwen_path)


@pytest.mark.parametrize("text", TRICKY + QWEN_EXTRA, ids=short_repr)
def test_encode_matches_llama_cpp(ours, llm, text):
    assert_encodes_like(ours, llm, text)


def test_end_of_generation_ids_match_llama_cpp(ours, llm):
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    theirs = {t for t in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    assert ours.eog_ids == theirs

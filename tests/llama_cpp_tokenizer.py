"""llama.cpp's tokenizer as the reference for ours (llama-cpp-python loading a
vocabulary only), the texts the tokenizer tests try, and vocabulary-only GGUFs."""

from __future__ import annotations

import ctypes
import itertools
from pathlib import Path

import gguf
import llama_cpp  # the reference; `make setup-test` installs it
import numpy as np

TRICKY = [
    "", " ", "  ", "   leading", "trailing   ", "a  b   c", "multiple      spaces",
    "\n", "\n\n\n", "\r\n", "a\r\nb\r\n\r\nc", "line\n  indented\n\tx", " \n x",
    "12345", "3.14159", "1,000,000", "abc123def", " 42", "  42", "x 1 2  3", "2024-11-21",
    "1234567890123", "v1.2.3-rc4",
    "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "I'm", "DON'T", "they'll we've you'd she's", "'s'", "I'M YOU'RE", "rock 'n' roll",
    "🙂👍🏽 emoji 🎉", "👨‍👩‍👧", "日本語のテキスト", "中文 测试，标点。", "한국어",
    "café naïve résumé", "Ünïcödé", "e\u0301", "¡Hola! ¿Qué tal?",
    "<|im_start|>user\nhello<|im_end|>\n", "<|im_start|><|im_start|>", "<|im_start", "<|im_end|>text",
    "<reponame>x<filename>y",
    "a\u00a0b", "x\u3000y", "٣٤٥ ١٢", "Ⅻ ½", "hello, world... ?!", "$100 + 5 = <x> ^ ~ |", "`code` ~~strike~~",
]


def short_repr(text: str) -> str:
    return repr(text)[:40]


def llama(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_piece(llm: llama_cpp.Llama, token: int, special: bool) -> bytes:
    """llama_token_to_piece with a buffer that fits (llama-cpp-python's detokenize
    cuts pieces at 32 bytes)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def llama_detokenize(llm: llama_cpp.Llama, tokens: list[int]) -> bytes:
    """llama.cpp's own llama_detokenize (remove_special and unparse_special off);
    llama-cpp-python's detokenize applies a rule of its own to the first space."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids = (llama_cpp.llama_token * len(tokens))(*tokens)
    size = 64 + 64 * len(tokens)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, ids, len(tokens), buf, size, False, False)
    assert 0 <= n <= size
    return buf.raw[:n]


def assert_encodes_like(ours, llm: llama_cpp.Llama, text: str) -> None:
    for add_special, parse_special in itertools.product((False, True), repeat=2):
        expected = llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)
        got = ours.encode(text, add_special=add_special, parse_special=parse_special)
        assert got == expected, f"add_special={add_special} parse_special={parse_special}"


def write_vocab_gguf(path: Path, metadata: dict) -> Path:
    """A GGUF with no tensors: the llama hyperparameters and the tokenizer."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if not key.startswith(("llama.", "tokenizer.ggml.")):
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value.tolist() if isinstance(value, np.ndarray) else value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Byte-level BPE for GGUF vocabularies (`tokenizer.ggml.model == "gpt2"`).

The aim is llama.cpp's token ids for the same text (src/llama-vocab.cpp), with
tiktoken doing the heavy work:

- GGUF stores each token as GPT-2 "byte-level" text: every byte is stood in for by
  a printable character. We map those characters back to bytes.
- llama.cpp merges the pair with the lowest rank in `tokenizer.ggml.merges`;
  tiktoken merges the pair whose *result* has the lowest rank. The two agree when
  the result ranks follow merge order, so the ranks are: the 256 single bytes,
  then each merge's result in merge order. `_rank_to_id` turns them back into
  GGUF ids.
- The pre-tokenizer (the regex that cuts text into words before BPE) is chosen
  by `tokenizer.ggml.pre`. Where llama.cpp applies several regexes in sequence,
  one equivalent tiktoken regex stands in for the sequence.

Special tokens are cut out before text gets here (runtime/tokenizer.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tiktoken

# --- pre-tokenizers -----------------------------------------------------------------

_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_LLAMA3 = (r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"""
           r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

_QWEN2 = (r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"""
          r"""|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# llama.cpp first cuts out every digit (\p{N}), then runs _GPT2 on each piece. So a
# digit stands alone, never takes the space before it, and a whitespace run before
# a digit is the end of its piece: it is kept whole, as at the end of the text.
_SMOLLM = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# llama.cpp's default runs four regexes in sequence:
#   1. runs of punctuation and $+<=>^~| become words of their own;
#   2. _GPT2 on the rest, so the apostrophe of "'s" is always cut off first and a
#      whitespace run before punctuation is the end of its piece;
#   3. \p{N}+ takes the space back off " 123";
#   4. [0-9][0-9][0-9] cuts ASCII digits into threes from the left (digits that
#      are not three ASCII ones in a row stay together).
_PUNCT = r"\p{P}\$\+<=>\^\~\|"
_DEFAULT = (rf"""[{_PUNCT}]+| ?\p{{L}}+|[0-9]{{3}}|(?:(?![0-9]{{3}})\p{{N}})+"""
            rf"""| ?[^\s\p{{L}}\p{{N}}{_PUNCT}]+|\s+(?![^\s{_PUNCT}])|\s+""")


@dataclass(frozen=True)
class PreTokenizer:
    regex: str
    add_bos: bool = False  # llama.cpp's default when the metadata does not say


_LLAMA3_PRE = PreTokenizer(_LLAMA3, add_bos=True)
_QWEN2_PRE = PreTokenizer(_QWEN2)
_GPT2_PRE = PreTokenizer(_GPT2)
_SMOLLM_PRE = PreTokenizer(_SMOLLM)
DEFAULT_PRE = PreTokenizer(_DEFAULT)

# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp maps the names (embedding models'
# names, and names whose vocabularies need more than one of these regexes, are left out).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"], _LLAMA3_PRE),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open"], _QWEN2_PRE),
    **dict.fromkeys(["gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4", "mpt",
                     "olmo", "jais", "trillion", "granite-docling"], _GPT2_PRE),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b", "mellum2"], _SMOLLM_PRE),
    "default": DEFAULT_PRE,
}

_warned_pre: set[str] = set()


def pre_tokenizer(name: str | None) -> PreTokenizer:
    """The pre-tokenizer for a `tokenizer.ggml.pre` value; the default (with one
    warning per name) when it is missing or unknown."""
    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    if name not in _warned_pre:
        _warned_pre.add(name)
        what = "no tokenizer.ggml.pre" if name is None else f"unknown tokenizer.ggml.pre {name!r}"
        print(f"warning: {what}; using the default pre-tokenizer, tokens may differ from the model's",
              file=sys.stderr)
    return DEFAULT_PRE


# --- byte-level text ----------------------------------------------------------------

def _byte_level_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others take the characters from U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + extra))
            extra += 1
    return chars


BYTE_LEVEL_CHARS = _byte_level_chars()
# byte-level char -> the Latin-1 char of its byte. Latin-1 chars that are not
# byte-level go to one Latin-1 cannot encode, so a string with one fails loudly.
_TO_LATIN1 = {c: 0xFFFF for c in range(0x100)}
_TO_LATIN1.update({ord(c): b for b, c in enumerate(BYTE_LEVEL_CHARS)})


def byte_level_to_bytes(text: str) -> bytes | None:
    """The bytes a byte-level string stands for; None if it has other characters."""
    try:
        return text.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None


# --- the engine ---------------------------------------------------------------------

class BytePairEncoder:
    """Byte-level BPE over one GGUF vocabulary: text without special tokens -> ids."""

    def __init__(self, pre: PreTokenizer, tokens: list[str], token_id: dict[str, int], merges: Iterable[str]):
        raw = [byte_level_to_bytes(t) for t in tokens]
        self._bpe, self._rank_to_id = _build_bpe(pre.regex, raw, token_id, merges)
        # a character outside the byte-level set: llama.cpp prints garbage, we its UTF-8
        self.normal_pieces = [r if r is not None else t.encode("utf-8", "surrogateescape")
                              for r, t in zip(raw, tokens)]

    def encode(self, text: str, after_special: bool) -> list[int]:
        """Ids for `text`; BPE does not care what came before it."""
        ids = self._rank_to_id[self._bpe.encode_ordinary(text)]
        # -1: a byte the vocabulary lacks; llama.cpp drops it too
        return ids[ids >= 0].tolist()


def _build_bpe(pattern: str, raw: list[bytes | None], token_id: dict[str, int],
               merges: Iterable[str]) -> tuple[tiktoken.Encoding, np.ndarray]:
    """tiktoken's BPE over the vocabulary, and the array from its ranks to GGUF ids.

    Ranks: every byte (a byte missing from the vocabulary gets id -1), then each
    merge's result in merge order. A merge whose result is not in the vocabulary,
    or whose result an earlier merge already made, adds nothing.

    tiktoken takes a word that is itself a token whole, which llama.cpp does only
    for ignore_merges vocabularies; elsewhere both give the same ids as long as
    BPE on each token's own bytes rebuilds that token (true of all of SmolLM2's)."""
    ranks = {bytes([b]): b for b in range(256)}
    rank_to_id = [token_id.get(c, -1) for c in BYTE_LEVEL_CHARS]
    for merge in merges:
        space = merge.find(" ", 1)  # as llama.cpp splits "left right"
        i = token_id.get(merge[:space] + merge[space + 1:]) if space > 0 else None
        if i is None or raw[i] is None or raw[i] in ranks:
            continue
        ranks[raw[i]] = len(rank_to_id)
        rank_to_id.append(i)
    bpe = tiktoken.Encoding("gguf-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return bpe, np.asarray(rank_to_id, dtype=np.int64)

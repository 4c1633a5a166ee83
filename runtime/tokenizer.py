"""Byte-level BPE tokenizer for GGUF vocabularies (`tokenizer.ggml.model == "gpt2"`).

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
- Special tokens are cut out of the text first, the way llama.cpp's
  `tokenizer_st_partition` does it; the pieces between them go through BPE.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tiktoken

# GGUF token types (tokenizer.ggml.token_type)
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

# llama.cpp's default BOS/EOS id for a "gpt2" vocabulary whose metadata names none.
_GPT2_DEFAULT_SPECIAL_ID = 11


class TokenizerError(ValueError):
    """A vocabulary this tokenizer cannot run; the message is one line."""


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


# --- special tokens ----------------------------------------------------------------

# Found by text when the metadata gives no id (llama_vocab::impl::load); the token
# found becomes a control token. pad/rep/sep also end generation.
_FIM_TOKENS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # kind: (keys, texts)
    "pre": (("fim_pre_token_id", "prefix_token_id"),
            ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
             "<|code_prefix|>", "<|prefix|>")),
    "suf": (("fim_suf_token_id", "suffix_token_id"),
            ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
             "<|code_suffix|>", "<|suffix|>")),
    "mid": (("fim_mid_token_id", "middle_token_id"),
            ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
             "<|code_middle|>", "<|middle|>")),
    "pad": (("fim_pad_token_id",), ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    "rep": (("fim_rep_token_id",), ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    "sep": (("fim_sep_token_id",), ("<|file_sep|>",)),
}
_FIM_EOG_KINDS = ("pad", "rep", "sep")

# Tokens with these texts end generation and become control tokens. (llama.cpp also
# finds EOT/EOM ids by text; every text it looks for is in this list.)
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)
# gpt-oss: llama.cpp always prints these.
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _metadata_id(metadata: dict, key: str, n_vocab: int, default: int | None = None) -> int | None:
    """A token id from the metadata; `default` when absent or out of range (as llama.cpp)."""
    if default is not None and default >= n_vocab:
        default = None
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None or not 0 <= int(value) < n_vocab:
        return default
    return int(value)


def _end_of_generation(metadata: dict, tokens: list[str], token_id: dict[str, int],
                       types: np.ndarray, eos_id: int | None) -> frozenset[int]:
    """llama.cpp's end-of-generation set; promotes the tokens it finds by text to
    control tokens in `types`, as llama.cpp does."""
    n = len(tokens)

    def make_control(i: int) -> None:
        if types[i] not in (CONTROL, UNKNOWN):
            types[i] = CONTROL

    eog: set[int] = set()
    for kind, (keys, texts) in _FIM_TOKENS.items():
        found = next((i for k in keys if (i := _metadata_id(metadata, k, n)) is not None), None)
        if found is None:
            found = min((token_id[t] for t in texts if t in token_id), default=None)
            if found is not None:
                make_control(found)
        if found is not None and kind in _FIM_EOG_KINDS:
            eog.add(found)
    for text in _EOG_TEXTS:
        if text in token_id:
            eog.add(token_id[text])
            make_control(token_id[text])
    for text in _ALWAYS_RENDERED:
        if text in token_id:
            types[token_id[text]] = USER_DEFINED
    eog.update(i for i in (eos_id, _metadata_id(metadata, "eot_token_id", n),
                           _metadata_id(metadata, "eom_token_id", n)) if i is not None)

    texts = {tokens[i]: i for i in eog}
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        # gpt-oss / solar-open: <|end|> ends a message, not the generation
        eog.discard(texts["<|end|>"])
        types[texts["<|end|>"]] = USER_DEFINED
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
        types[texts["</s>"]] = NORMAL
    return frozenset(eog)


# --- the tokenizer --------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for a GGUF byte-level BPE vocabulary, as llama.cpp does it."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    eog_ids: frozenset[int]

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(f"unsupported tokenizer model {model!r}: only byte-level BPE ('gpt2') is supported")
        if metadata.get("tokenizer.ggml.tokens") is None:
            raise TokenizerError("the model has no tokenizer.ggml.tokens")
        return cls(metadata)

    def __init__(self, metadata: dict):
        tokens = list(metadata["tokenizer.ggml.tokens"])
        n = self.vocab_size = len(tokens)
        token_id = {text: i for i, text in enumerate(tokens)}
        types = metadata.get("tokenizer.ggml.token_type")
        if types is not None and len(types) < n:
            raise TokenizerError(f"the model has {len(types)} token types for {n} tokens")
        self._types = np.full(n, NORMAL, np.int8) if types is None else np.array(types[:n], np.int8)

        pre = pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
        self.bos_id = _metadata_id(metadata, "bos_token_id", n, _GPT2_DEFAULT_SPECIAL_ID)
        self.eos_id = _metadata_id(metadata, "eos_token_id", n, _GPT2_DEFAULT_SPECIAL_ID)
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", pre.add_bos))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        if self.add_bos and self.bos_id is None:
            raise TokenizerError("the model asks for a BOS token but has none")
        if self.add_eos and self.eos_id is None:
            raise TokenizerError("the model asks for an EOS token but has none")
        self.eog_ids = _end_of_generation(metadata, tokens, token_id, self._types, self.eos_id)

        raw = [byte_level_to_bytes(t) for t in tokens]
        # No merges (llama.cpp refuses the file; gguf-py writes no empty array): bytes only.
        merges = metadata.get("tokenizer.ggml.merges", [])
        self._bpe, self._rank_to_id = _build_bpe(pre.regex, raw, token_id, merges)
        self._pieces, self._texts = _pieces(tokens, raw, self._types)
        self._specials = _special_tokens(tokens, self._types)

    # -- encoding --

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`. add_special: add BOS/EOS as the metadata says.
        parse_special: control tokens written in the text become those tokens
        (user-defined tokens always do, as in llama.cpp)."""
        ids = [self.bos_id] if add_special and self.add_bos else []
        for fragment in self._split_special(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids.extend(self._encode_ordinary(fragment))
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of `text`: longest token text first, each at every
        place it occurs in the text not yet cut (llama.cpp's tokenizer_st_partition)."""
        fragments: list[str | int] = [text] if text else []
        for token, special_text, control in self._specials:
            if (control and not parse_special) or special_text not in text:
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or special_text not in fragment:
                    cut.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(special_text)):
                    if k:
                        cut.append(token)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = self._rank_to_id[self._bpe.encode_ordinary(text)]
        # -1: a byte the vocabulary lacks; llama.cpp drops it too
        return ids[ids >= 0].tolist()

    # -- decoding --

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; control tokens print as nothing."""
        return b"".join(self._piece(i) for i in ids).decode("utf-8", errors="replace")

    def _piece(self, token_id: int) -> bytes:
        """The bytes `token_id` prints as (llama.cpp's token_to_piece, special=false)."""
        return self._pieces[self._check(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for; a control token gives its text, e.g. b"<|im_end|>"."""
        return self._texts.get(token_id) or self._piece(token_id)

    def is_control(self, token_id: int) -> bool:
        return bool(self._types[self._check(token_id)] == CONTROL)

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id


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


def _pieces(tokens: list[str], raw: list[bytes | None],
            types: np.ndarray) -> tuple[list[bytes], dict[int, bytes]]:
    """What each token prints as, and the text of the tokens that print as nothing
    but have one (control and unknown tokens)."""
    pieces: list[bytes] = []
    texts: dict[int, bytes] = {}
    for i, (text, kind) in enumerate(zip(tokens, types.tolist())):
        if kind == NORMAL:
            # a character outside the byte-level set: llama.cpp prints garbage, we its UTF-8
            pieces.append(raw[i] if raw[i] is not None else text.encode("utf-8"))
        elif kind == USER_DEFINED:
            pieces.append(text.encode("utf-8"))
        elif kind == BYTE:  # "<0xXX>"
            pieces.append(bytes([int(text[3:5], 16)]))
        else:
            pieces.append(b"")
            if kind in (CONTROL, UNKNOWN):
                texts[i] = text.encode("utf-8")
    return pieces, texts


def _special_tokens(tokens: list[str], types: np.ndarray) -> list[tuple[int, str, bool]]:
    """(id, text, is control-like) of the tokens cut out before BPE, longest text first."""
    ids = np.nonzero(np.isin(types, (CONTROL, USER_DEFINED, UNKNOWN)))[0].tolist()
    ids.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))
    return [(i, tokens[i], bool(types[i] != USER_DEFINED)) for i in ids if tokens[i]]


class StreamDecoder:
    """Turns generated tokens into text as they come: a character whose UTF-8 bytes
    are split over several tokens is held back until it is complete."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer._piece(token_id))

    def flush(self) -> str:
        """The text still held back (an incomplete character prints as U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

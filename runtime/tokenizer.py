"""Text <-> token ids for GGUF vocabularies, as llama.cpp does it (src/llama-vocab.cpp).

What every vocabulary type shares lives here: which ids are special (BOS, EOS,
the tokens that end generation), cutting special tokens out of the text first
(llama.cpp's `tokenizer_st_partition`), and what each token prints as. The text
between special tokens goes to the engine for `tokenizer.ggml.model`:

- "gpt2": byte-level BPE on tiktoken (runtime/bpe.py);
- "llama": SentencePiece (runtime/spm.py).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import UserError
from .bpe import BytePairEncoder, pre_tokenizer
from .spm import SentencePieceEncoder

# GGUF token types (tokenizer.ggml.token_type)
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

# tokenizer.ggml.model values we run -> their names in messages
_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}


class TokenizerError(UserError, ValueError):
    """A vocabulary this tokenizer cannot run; the message is one line."""


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


def _special_tokens(tokens: list[str], types: np.ndarray, parse_special: bool) -> list[tuple[int, str]]:
    """(id, text) of the tokens cut out before the engine, longest text first: user-defined
    ones, and with parse_special control and unknown ones too."""
    kinds = (CONTROL, USER_DEFINED, UNKNOWN) if parse_special else (USER_DEFINED,)
    ids = [i for i in np.nonzero(np.isin(types, kinds))[0].tolist() if tokens[i]]
    ids.sort(key=lambda i: (-len(tokens[i].encode("utf-8", "surrogateescape")), i))
    return [(i, tokens[i]) for i in ids]


# --- settings per vocabulary type -----------------------------------------------------

class _Encoder(Protocol):
    """An engine: text without special tokens -> ids."""

    normal_pieces: list[bytes]  # what each token prints as if it is a normal token

    def encode(self, text: str, after_special: bool) -> list[int]: ...


@dataclass(frozen=True)
class _Defaults:
    """llama.cpp's settings for what the metadata leaves out."""
    bos_id: int
    eos_id: int
    add_bos: bool
    add_space_prefix: bool


def _defaults(metadata: dict) -> _Defaults:
    if metadata["tokenizer.ggml.model"] == "llama":
        return _Defaults(bos_id=1, eos_id=2, add_bos=True, add_space_prefix=True)
    pre = pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    return _Defaults(bos_id=11, eos_id=11, add_bos=pre.add_bos, add_space_prefix=False)


def _encoder(metadata: dict, tokens: list[str], token_id: dict[str, int], add_space_prefix: bool) -> _Encoder:
    """The engine for the vocabulary's type."""
    n = len(tokens)
    if metadata["tokenizer.ggml.model"] == "llama":
        scores = _per_token(metadata, "scores", n, np.float32)  # int scores too become floats, as in llama.cpp
        unk_id = _metadata_id(metadata, "unknown_token_id", n, 0)
        return SentencePieceEncoder(tokens, token_id, None if scores is None else scores.tolist(),
                                    add_space_prefix, unk_id)
    # No merges (llama.cpp refuses the file; gguf-py writes no empty array): bytes only.
    return BytePairEncoder(pre_tokenizer(metadata.get("tokenizer.ggml.pre")), tokens, token_id,
                           metadata.get("tokenizer.ggml.merges", []))


def _per_token(metadata: dict, key: str, n: int, dtype: type) -> np.ndarray | None:
    """A per-token array from the metadata (a copy, cut to `n`); None when absent."""
    values = metadata.get(f"tokenizer.ggml.{key}")
    if values is None:
        return None
    if len(values) < n:
        raise TokenizerError(f"the model has {len(values)} tokenizer.ggml.{key} values for {n} tokens")
    return np.array(values[:n], dtype)


# --- the tokenizer --------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for a GGUF vocabulary, as llama.cpp does it."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    eog_ids: frozenset[int]

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model")
        if model not in _MODELS:
            supported = " and ".join(f"{name} ({key!r})" for key, name in _MODELS.items())
            raise TokenizerError(f"unsupported tokenizer model {model!r}: only {supported} are supported")
        if metadata.get("tokenizer.ggml.tokens") is None:
            raise TokenizerError("the model has no tokenizer.ggml.tokens")
        return cls(metadata)

    def __init__(self, metadata: dict):
        tokens = list(metadata["tokenizer.ggml.tokens"])
        n = self.vocab_size = len(tokens)
        token_id = dict(zip(tokens, range(n)))
        types = _per_token(metadata, "token_type", n, np.int8)
        self._types = np.full(n, NORMAL, np.int8) if types is None else types

        defaults = _defaults(metadata)
        self.bos_id = _metadata_id(metadata, "bos_token_id", n, defaults.bos_id)
        self.eos_id = _metadata_id(metadata, "eos_token_id", n, defaults.eos_id)
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", defaults.add_bos))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        if self.add_bos and self.bos_id is None:
            raise TokenizerError("the model asks for a BOS token but has none")
        if self.add_eos and self.eos_id is None:
            raise TokenizerError("the model asks for an EOS token but has none")
        self._add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", defaults.add_space_prefix))
        self.eog_ids = _end_of_generation(metadata, tokens, token_id, self._types, self.eos_id)

        self._encoder = _encoder(metadata, tokens, token_id, self._add_space_prefix)
        self._pieces, self._texts = _pieces(tokens, self._types, self._encoder.normal_pieces)
        del self._encoder.normal_pieces  # built into _pieces; not kept (tokenizer_cache loads less)
        self._specials = {parse: _special_tokens(tokens, self._types, parse) for parse in (False, True)}

    # -- encoding --

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False,
               plain_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids for `text`. add_special: add BOS/EOS as the metadata says.
        parse_special: control tokens written in the text become those tokens
        (user-defined tokens always do, as in llama.cpp). plain_spans: (start, end)
        ranges of the text read as with parse_special off, whatever parse_special
        says (a chat's message text inside its rendered template)."""
        ids = [self.bos_id] if add_special and self.add_bos else []
        after_special = True  # the start of the text counts as following one
        if parse_special and plain_spans:
            fragments = self._split_special_outside(text, plain_spans)
        else:
            fragments = self._split_special(text, parse_special)
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids.extend(self._encoder.encode(fragment, after_special))
            after_special = isinstance(fragment, int)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of `text`: longest token text first, each at every
        place it occurs in the text not yet cut (llama.cpp's tokenizer_st_partition)."""
        fragments: list[str | int] = [text] if text else []
        for token, special_text in self._specials[parse_special]:
            if special_text not in text:
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

    def _split_special_outside(self, text: str, plain_spans: Sequence[tuple[int, int]]) -> list[str | int]:
        """As _split_special with parse_special on, except that inside plain_spans only
        user-defined tokens are cut (as with parse_special off). Same longest-first
        partition, on pieces that remember whether they are plain."""
        always = {token for token, _ in self._specials[False]}
        pieces: list[tuple[str, bool] | int] = []
        pos = 0
        for start, end in plain_spans:
            if start > pos:
                pieces.append((text[pos:start], False))
            pieces.append((text[start:end], True))
            pos = end
        if pos < len(text):
            pieces.append((text[pos:], False))
        for token, special_text in self._specials[True]:
            if special_text not in text:
                continue
            cut: list[tuple[str, bool] | int] = []
            for piece in pieces:
                if isinstance(piece, int) or special_text not in piece[0] or (piece[1] and token not in always):
                    cut.append(piece)
                    continue
                for k, part in enumerate(piece[0].split(special_text)):
                    if k:
                        cut.append(token)
                    if part:
                        cut.append((part, piece[1]))
            pieces = cut
        # Neighbouring text pieces are one fragment again, as the engine would have seen them.
        fragments: list[str | int] = []
        run: list[str] = []
        for piece in pieces:
            if isinstance(piece, int):
                if run:
                    fragments.append("".join(run))
                    run = []
                fragments.append(piece)
            else:
                run.append(piece[0])
        if run:
            fragments.append("".join(run))
        return fragments

    def special_texts(self) -> list[str]:
        """The text of every token that parse_special turns into a special token, longest first."""
        return [special_text for _, special_text in self._specials[True]]

    # -- decoding --

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` as llama.cpp's llama_detokenize gives it: control tokens
        print as nothing, and with add_space_prefix the first token loses one
        leading space (a BOS in front prints nothing and keeps the space)."""
        pieces = [self._piece(i) for i in ids]
        if self._add_space_prefix and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")

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


def _pieces(tokens: list[str], types: np.ndarray,
            normal_pieces: list[bytes]) -> tuple[list[bytes], dict[int, bytes]]:
    """What each token prints as, and the text of the tokens that print as nothing
    but have one (control and unknown tokens)."""
    pieces = list(normal_pieces)
    texts: dict[int, bytes] = {}
    for i in np.nonzero(types != NORMAL)[0].tolist():
        kind, text = types[i], tokens[i]
        if kind == USER_DEFINED:
            pieces[i] = text.encode("utf-8", "surrogateescape")
        elif kind == BYTE:  # "<0xXX>"
            pieces[i] = bytes([int(text[3:5], 16)])
        else:
            pieces[i] = b""
            if kind in (CONTROL, UNKNOWN):
                texts[i] = text.encode("utf-8", "surrogateescape")
    return pieces, texts


class StreamDecoder:
    """Turns generated tokens into text as they come: a character whose UTF-8 bytes
    are split over several tokens is held back until it is complete. No space is
    taken off the first token: these tokens follow a prompt (as in llama.cpp's
    generation loop)."""

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

"""A Hugging Face tokenizer (tokenizer.json, tokenizer_config.json) as GGUF
tokenizer metadata that our runtime and llama.cpp tokenize with like the HF
tokenizer does.

Two kinds of tokenizer.json are understood:
- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): GGUF model "gpt2", tokens as
  their byte-level strings, merges "left right" in rank order, and the
  pre-tokenizer named by `tokenizer.ggml.pre`, recognised from the
  pre-tokenizer steps (llama.cpp hashes the ids of a test string instead, which
  needs the tokenizer library; the steps say the same thing).
- SentencePiece-style BPE with byte fallback (Llama 2, Gemma) or Unigram: GGUF
  model "llama". llama.cpp merges the adjacent pair whose joined token has the
  highest score, HF the pair with the lowest merge rank, so a BPE token's score
  is minus the rank of the merge that makes it.
Added tokens become CONTROL (special) or USER_DEFINED tokens, as llama.cpp's
converter makes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gguf

from ..errors import UserError

SPACE = "\u2581"  # SentencePiece's ▁

# The pre-tokenizer regexes of tokenizer.json files -> their llama.cpp names.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


class TokenizerConvertError(UserError, ValueError):
    """A tokenizer that cannot be written as GGUF metadata; the message is one line."""


@dataclass
class GGUFTokenizer:
    """What the GGUF gets: everything llama.cpp's vocabulary loader reads."""
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for value, add in ((self.bos_id, w.add_bos_token_id), (self.eos_id, w.add_eos_token_id),
                           (self.unk_id, w.add_unk_token_id), (self.pad_id, w.add_pad_token_id)):
            if value is not None:
                add(value)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _steps(node: dict | None, list_key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for s in node.get(list_key, []) if isinstance(s, dict)]
    return [node]


def _byte_level_pre(tokenizer: dict) -> str:
    steps = _steps(tokenizer.get("pre_tokenizer"), "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    raise TokenizerConvertError(f"unsupported byte-level pre-tokenizer {kinds} "
                                "(supported: those of GPT-2, Llama 3, Qwen2 and SmolLM)")


def _merge_strings(merges: list) -> list[str]:
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(f"{m[0]} {m[1]}")
        else:
            raise TokenizerConvertError(f"tokenizer.json: bad merge {str(m)[:60]}")
    return out


def _is_sentencepiece(tokenizer: dict) -> tuple[bool, bool]:
    """(is SentencePiece-style, adds a space in front of the text)."""
    normalizers = _steps(tokenizer.get("normalizer"), "normalizers")
    pre = _steps(tokenizer.get("pre_tokenizer"), "pretokenizers")
    replaces_space = any(n.get("type") == "Replace" and n.get("content") == SPACE
                         and (n.get("pattern") or {}).get("String") == " " for n in normalizers)
    prepends = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers)
    metaspace = [p for p in pre if p.get("type") == "Metaspace"]
    if metaspace:
        scheme = metaspace[0].get("prepend_scheme", "always" if metaspace[0].get("add_prefix_space", True) else "never")
        return True, scheme in ("always", "first")
    return replaces_space, prepends


def convert_tokenizer(tokenizer: dict, tokenizer_config: dict, chat_template: str | None,
                      config: dict, n_vocab: int) -> GGUFTokenizer:
    """GGUF tokenizer metadata for tokenizer.json (parsed), tokenizer_config.json
    (parsed, may be empty), a chat template read from chat_template.jinja (or
    None) and config.json; `n_vocab` is the embedding's row count: ids up to it
    that the tokenizer lacks become unused padding tokens."""
    model = tokenizer.get("model") or {}
    kind = model.get("type")
    vocab = model.get("vocab")
    if kind == "Unigram":
        if not isinstance(vocab, list):
            raise TokenizerConvertError("tokenizer.json: a Unigram model needs a vocab list")
        vocab_ids = {}
        unigram_scores = {}
        for i, item in enumerate(vocab):
            vocab_ids.setdefault(str(item[0]), i)
            unigram_scores[i] = float(item[1])
    elif kind == "BPE":
        if not isinstance(vocab, dict):
            raise TokenizerConvertError("tokenizer.json: a BPE model needs a vocab object")
        vocab_ids = vocab
    else:
        raise TokenizerConvertError(f"unsupported tokenizer model {kind!r} in tokenizer.json (supported: BPE, Unigram)")

    added = {int(t["id"]): t for t in tokenizer.get("added_tokens", []) if isinstance(t, dict) and "id" in t}
    by_id: dict[int, str] = {}
    for text, i in vocab_ids.items():
        by_id.setdefault(int(i), text)
    for i, t in added.items():
        by_id[i] = t["content"]
    size = max(by_id, default=-1) + 1
    if size > n_vocab:
        raise TokenizerConvertError(f"the tokenizer has ids up to {size - 1}, the embedding only {n_vocab} rows")
    if min(by_id, default=0) < 0:
        raise TokenizerConvertError("tokenizer.json has negative token ids")

    spm, add_space_prefix = _is_sentencepiece(tokenizer)
    if kind == "Unigram":
        spm = True
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            # llama.cpp cuts user-defined tokens out of the text before SentencePiece's
            # space replacement, so they are stored with plain spaces.
            special = added[i].get("special", False)
            tokens.append(text if special or not spm else text.replace(SPACE, " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)

    ids = vocab_ids | {t["content"]: i for i, t in added.items()}
    specials = _special_ids(tokenizer, tokenizer_config, config, ids)
    unk = _token_text(model.get("unk_token")) if kind == "BPE" else None
    unk_id = model.get("unk_id") if kind == "Unigram" else vocab_ids.get(unk) if unk else None
    if unk_id is not None and 0 <= unk_id < n_vocab:
        types[unk_id] = gguf.TokenType.UNKNOWN

    result = GGUFTokenizer(model="llama" if spm else "gpt2", tokens=tokens, token_types=[int(t) for t in types],
                           unk_id=unk_id, chat_template=chat_template, **specials)
    if spm:
        result.add_space_prefix = add_space_prefix
        if kind == "Unigram":
            result.scores = [unigram_scores.get(i, 0.0) for i in range(n_vocab)]
        else:
            result.scores = _bpe_scores(model, vocab_ids, n_vocab)
    else:
        if kind != "BPE":
            raise TokenizerConvertError("a byte-level tokenizer must be a BPE model")
        result.pre = _byte_level_pre(tokenizer)
        result.merges = _merge_strings(model.get("merges", []))
    return result


def _bpe_scores(model: dict, vocab_ids: dict, n_vocab: int) -> list[float]:
    """Minus the rank of the first merge making each token; tokens no merge makes
    get a score below every merge's, so they are never preferred."""
    merges = _merge_strings(model.get("merges", []))
    scores = [-float(len(merges) + 1)] * n_vocab
    made: set[int] = set()
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        i = vocab_ids.get(left + right)
        if i is not None and i not in made and 0 <= i < n_vocab:
            made.add(i)
            scores[i] = -float(rank)
    return scores


def _special_ids(tokenizer: dict, tokenizer_config: dict, config: dict, ids: dict[str, int]) -> dict:
    """bos/eos/pad ids and whether BOS/EOS are added, as the HF tokenizer does it."""
    def token_id(key: str) -> int | None:
        text = _token_text(tokenizer_config.get(key))
        if text is not None and text in ids:
            return int(ids[text])
        value = config.get(f"{key}_id")
        if isinstance(value, list):  # several EOS ids: the first is the EOS token
            value = value[0] if value else None
        return value if isinstance(value, int) else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    # What the post-processor adds around a single text; tokenizer_config overrides it.
    template = [s for s in _steps(tokenizer.get("post_processor"), "processors")
                if s.get("type") == "TemplateProcessing"]
    add_bos = add_eos = False
    if template:
        single = template[0].get("single", [])
        if single and "SpecialToken" in single[0]:
            add_bos = True
            first = single[0]["SpecialToken"]["id"]
            bos_id = int(ids[first]) if first in ids else bos_id
        if len(single) > 1 and "SpecialToken" in single[-1]:
            add_eos = True
    add_bos = bool(tokenizer_config.get("add_bos_token", add_bos))
    add_eos = bool(tokenizer_config.get("add_eos_token", add_eos))
    return {"bos_id": bos_id, "eos_id": eos_id, "pad_id": token_id("pad_token"),
            "add_bos": add_bos, "add_eos": add_eos}

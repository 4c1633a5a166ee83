"""Constrained decoding: JSON schemas and grammars that a generation must follow, on llguidance.

A request's constraint is compiled to llguidance's grammar form (`Grammar`)
when it is read, and checked against the model's vocabulary when it starts
(`Guide.matcher`), so a bad schema or grammar is a ConstraintError (a 400)
before any token is generated. During generation a `GrammarMatcher` follows
the tokens: the sampler draws from the unmasked logits first and asks only
whether that token is allowed (cheap); the full mask over the vocabulary is
computed and applied (in compiled code) only when it is not. That draws from
exactly the masked distribution: an allowed token t is taken either at once
(p(t)) or after a rejection (1 - A) * p(t) / A, in all p(t) / A, A being the
allowed mass.

llguidance is imported only when a request needs it; without it such a
request gets a clear error and everything else works.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .jit import jit, numba_enabled
from .tokenizer import Tokenizer

SPECIAL_TOKEN_MARKER = b"\xff"  # llguidance's prefix for tokens that are special, not text
# JSON as models write it, single spaces after , and : and no other whitespace: no room to
# wander off into endless blank lines.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(UserError, ValueError):
    """A schema or grammar that cannot constrain a generation (or llguidance is missing)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("structured output (JSON schemas, grammars, tool calls) needs the llguidance "
                              "package, which this installation lacks (pip install llguidance)") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A constraint in llguidance's grammar form, with what it came from (for messages)."""

    source: str  # llguidance's serialized grammar
    kind: str  # "JSON schema", "grammar", ...
    param: str | None = None  # the request field it came from


def json_schema_grammar(schema: Any, param: str | None = None) -> Grammar:
    """A grammar that only JSON valid against `schema` (a dict, or its JSON text) satisfies,
    written as COMPACT_JSON."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ConstraintError(f"the JSON schema is not valid JSON: {e}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError("a JSON schema must be an object (or true/false)", param)
    llg = _llguidance()
    try:
        source = llg.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT_JSON)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"invalid JSON schema: {e}", param) from None
    return _checked(Grammar(source, "JSON schema", param))


def any_json_object_grammar(param: str | None = None) -> Grammar:
    """`response_format: json_object`: any JSON object."""
    return json_schema_grammar({"type": "object"}, param)


def text_grammar(text: str, param: str | None = None) -> Grammar:
    """A GBNF grammar (llama.cpp's) or a Lark grammar (llguidance's), told apart by llguidance."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError("a grammar must be non-empty text", param)
    llg = _llguidance()
    try:
        source = llg.grammar_from("grammar", text)
    except ValueError as e:
        raise ConstraintError(f"invalid grammar: {e}", param) from None
    return _checked(Grammar(source, "grammar", param))


def lark_grammar(text: str, param: str | None = None) -> Grammar:
    """A Lark grammar written by our own code (tool calls), checked as any other."""
    return _checked(Grammar(_llguidance().LLMatcher.grammar_from_lark(text), "grammar", param))


def _checked(grammar: Grammar) -> Grammar:
    """The grammar, once llguidance finds it sound (without a vocabulary: that check comes at the start)."""
    llg = _llguidance()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar.source)
    if is_error:
        raise ConstraintError(f"invalid {grammar.kind}: {messages[0]}", grammar.param)
    return grammar


class Guide:
    """A model's vocabulary as llguidance sees it, built once (about a second for 150k tokens)."""

    def __init__(self, tokenizer: Tokenizer, n_logits: int):
        self._tokenizer, self.n_logits = tokenizer, n_logits
        self._lock = threading.Lock()
        self._vocabulary = None
        self.build_seconds = 0.0

    def vocabulary(self):
        with self._lock:
            if self._vocabulary is None:
                started = time.perf_counter()
                self._vocabulary = _vocabulary(_llguidance(), self._tokenizer, self.n_logits)
                self.build_seconds = time.perf_counter() - started
            return self._vocabulary

    def matcher(self, grammar: Grammar) -> GrammarMatcher:
        """A matcher at the start of `grammar`; ConstraintError when the grammar does not fit this model."""
        llg = _llguidance()
        matcher = llg.LLMatcher(self.vocabulary(), grammar.source, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {grammar.kind}: {matcher.get_error()}", grammar.param)
        return GrammarMatcher(matcher, self.n_logits)


def _vocabulary(llg, tokenizer: Tokenizer, n_logits: int):
    """llguidance's tokenizer: each token's bytes (control tokens marked special), padded to the logits."""
    tokens = []
    for i in range(tokenizer.vocab_size):
        data = tokenizer.token_bytes(i)
        tokens.append(SPECIAL_TOKEN_MARKER + data if tokenizer.is_control(i) else data)
    tokens += [b""] * (n_logits - len(tokens))  # rows of the output layer no token uses

    class _Vocabulary:  # what llguidance's TokenizerWrapper reads
        eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
        bos_token_id = tokenizer.bos_id
        special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_control(i)]

        def __call__(self, text):
            if not isinstance(text, str):
                raise TypeError("text only")  # llguidance then hands over str
            return tokenizer.encode(text, add_special=False, parse_special=False)

    _Vocabulary.tokens = tokens
    # Every end-of-generation token ends a constrained answer too.
    eos = sorted(tokenizer.eog_ids) or [_Vocabulary.eos_token_id]
    return llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary()), eos_token=eos)


class GrammarMatcher:
    """Follows one generation through a grammar: what the sampler asks of a constraint."""

    def __init__(self, matcher, n_logits: int):
        self._matcher = matcher
        self._mask = np.zeros((n_logits + 31) // 32, dtype=np.int32)
        self.mask_count = 0  # how often the full mask was needed
        self.mask_seconds = 0.0

    def allows(self, token: int) -> bool:
        return self._matcher.validate_tokens([token]) == 1

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar forbids here to -inf, in place."""
        started = time.perf_counter()
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if not self._mask.any():
            raise ConstraintError(f"the grammar allows no token here: {self._matcher.get_error() or 'a dead end'}")
        apply_mask(logits, self._mask)
        self.mask_seconds += time.perf_counter() - started
        self.mask_count += 1

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (but the end)."""
        return self._matcher.is_stopped()


def apply_mask(logits: np.ndarray, mask: np.ndarray) -> None:
    """logits[i] = -inf where bit i of the packed little-endian mask is 0 (and past its end)."""
    if numba_enabled():
        _apply_mask(logits, mask.view(np.uint32))
        return
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:len(logits)]
    logits[:len(bits)][bits == 0] = -np.inf
    logits[len(bits):] = -np.inf


@jit()
def _apply_mask(logits, mask):
    n = logits.shape[0]
    full_words = min(mask.shape[0], n // 32)
    for word in range(full_words):
        bits = mask[word]
        start = word * 32
        if bits == np.uint32(0xFFFFFFFF):  # all allowed
            continue
        if bits == 0:  # all forbidden: most words of a tight grammar
            logits[start:start + 32] = -np.inf
            continue
        for j in range(32):
            if not (bits >> np.uint32(j)) & np.uint32(1):
                logits[start + j] = -np.inf
    for i in range(full_words * 32, n):  # a last partial word, and logits past the mask's end
        word = i >> 5
        if word >= mask.shape[0] or not (mask[word] >> np.uint32(i & 31)) & np.uint32(1):
            logits[i] = -np.inf

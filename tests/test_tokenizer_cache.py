"""A GGUF's built tokenizer kept between runs (runtime/tokenizer_cache.py): loaded
without decoding the vocabulary, the same ids and text as one built from the
metadata, and a cache that is broken or cannot be written is built around."""

import pytest

from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.tokenizer import Tokenizer
from llamazip.runtime.tokenizer_cache import cache_key, load_tokenizer

pytestmark = pytest.mark.model

TEXT = "Hello, world!  <|im_start|>user\nünïcode 123 <start_of_turn> tabs\tand  spaces"


def _same(a: Tokenizer, b: Tokenizer) -> None:
    for parse_special in (False, True):
        ids = a.encode(TEXT, parse_special=parse_special)
        assert b.encode(TEXT, parse_special=parse_special) == ids
        assert b.decode(ids) == a.decode(ids)
    assert (b.vocab_size, b.bos_id, b.eos_id, b.eog_ids) == (a.vocab_size, a.bos_id, a.eos_id, a.eog_ids)


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])  # byte-pair and SentencePiece
def test_a_kept_tokenizer_loads_without_decoding_the_vocabulary(model, request, tmp_path, monkeypatch):
    path = request.getfixturevalue(model)
    monkeypatch.setenv("LLAMAZIP_CACHE", str(tmp_path))
    built = load_tokenizer(GGUFFile(path).metadata)
    assert len(list((tmp_path / "tokenizers").glob("*.pickle"))) == 1
    fresh = GGUFFile(path)
    loaded = load_tokenizer(fresh.metadata)
    assert fresh.metadata["tokenizer.ggml.tokens"]._items is None  # the cache's key reads the bytes only
    _same(Tokenizer.from_metadata(GGUFFile(path).metadata), loaded)
    _same(built, loaded)


def test_each_vocabulary_has_its_own_entry(smollm2_path, gemma3_path):
    assert cache_key(GGUFFile(smollm2_path).metadata) != cache_key(GGUFFile(gemma3_path).metadata)
    assert cache_key(GGUFFile(smollm2_path).metadata) == cache_key(GGUFFile(smollm2_path).metadata)


def test_a_broken_or_unwritable_cache_is_built_around(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAZIP_CACHE", str(tmp_path))
    want = Tokenizer.from_metadata(GGUFFile(smollm2_path).metadata)
    load_tokenizer(GGUFFile(smollm2_path).metadata)
    (entry,) = (tmp_path / "tokenizers").glob("*.pickle")
    entry.write_bytes(entry.read_bytes()[:1000])  # cut short, as by a full disk
    _same(want, load_tokenizer(GGUFFile(smollm2_path).metadata))
    _same(want, load_tokenizer(GGUFFile(smollm2_path).metadata))  # rewritten whole
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("LLAMAZIP_CACHE", str(blocked))  # no folder can be made under it
    _same(want, load_tokenizer(GGUFFile(smollm2_path).metadata))

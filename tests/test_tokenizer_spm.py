"""The SentencePiece tokenizer against llama.cpp (llama-cpp-python loading the
vocabulary only): Gemma 3's 262144-token vocabulary, and small vocabulary-only
GGUFs written here for what Gemma's does not show (add_space_prefix, default
settings, integer scores, merges across a space, equal scores)."""

from __future__ import annotations

import itertools
import time

import llama_cpp
import pytest
from llama_cpp_tokenizer import (TRICKY, assert_encodes_like, llama, llama_detokenize, llama_piece, short_repr,
                                 write_vocab_gguf)

from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.tokenizer import (BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, StreamDecoder, Tokenizer,
                                        TokenizerError)

GEMMA_TRICKY = [
    # Gemma's control tokens (cut out only with parse_special), also half-written
    "<start_of_turn>user\n", "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos><bos>x", "<eos>", "<pad><unk><mask>", "<unused0><unused99>x", "<start_of_turn", "start_of_turn>",
    "<end_of_turn>text", " <start_of_turn> user ",
    # user-defined tokens, cut out always: whitespace runs, HTML tags, </s> (which llama.cpp makes control)
    "a  b", "  \t\t  \n\n\n x", "\t\tcode\r\n", "</s> and <s>", "<b>bold</b> <h1>Title</h1>",
    "<table><tr><td>1</td></tr></table>", "[multimodal]", "<start_of_image><end_of_image>",
    # texts of byte tokens, and ▁ typed as text
    "<0x41><0xE6>", "▁literal▁", "\u2581 \u2581\u2581",
    # characters Gemma lacks: byte fallback
    "\U000E0041\U000E0042", "\x00\x01\x7f", "𓀀𓀁 🫨🪿", "\u0378ꙮ", "\U0010FFFF", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    # long runs, other scripts, symbols
    "a" * 50, "=" * 40, "." * 33, "-" * 64 + "\n" + "#" * 7, "∑∫√π ≈ ∞", "עברית العربية", "हिन्दी ਪੰਜਾਬੀ",
    "ไทย", "Ελληνικά Русский", "https://example.com/path?q=1&r=2#frag", "Hello\u200bworld", "\ufeffBOM",
]

# text split over byte tokens that Gemma lacks as a whole
SPLIT_CHARACTERS = ["𓀀 ok", "ǅ\U000E0041", "a𝔘b 🫨"]


@pytest.fixture(scope="module")
def gemma(gemma3_path) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(gemma3_path).metadata)


@pytest.fixture(scope="module")
def gemma_llm(gemma3_path):
    return llama(gemma3_path)


# --- Gemma 3 -------------------------------------------------------------------------

@pytest.mark.model
def test_gemma_settings(gemma, gemma_llm):
    assert (gemma.vocab_size, gemma.bos_id, gemma.eos_id, gemma.add_bos, gemma.add_eos) == (262144, 2, 1, True, False)
    vocab = llama_cpp.llama_model_get_vocab(gemma_llm.model)
    ids = range(gemma.vocab_size)
    assert gemma.eog_ids == {i for i in ids if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert {1, 106} <= gemma.eog_ids  # <eos>, <end_of_turn>
    assert [gemma.is_control(i) for i in ids] == [bool(llama_cpp.llama_vocab_is_control(vocab, i)) for i in ids]


@pytest.mark.parametrize("text", TRICKY + GEMMA_TRICKY, ids=short_repr)
@pytest.mark.model
def test_gemma_encodes_like_llama_cpp(gemma, gemma_llm, text):
    assert_encodes_like(gemma, gemma_llm, text)


@pytest.mark.model
def test_gemma_encodes_a_long_text_like_llama_cpp(gemma, gemma_llm):
    text = "\n".join(TRICKY + GEMMA_TRICKY) * 6  # about 9 KB
    assert len(text.encode()) > 8000
    started = time.perf_counter()
    ids = gemma.encode(text)
    assert time.perf_counter() - started < 2.0  # about 0.03 s: a guard against quadratic merging
    assert ids == gemma_llm.tokenize(text.encode(), add_bos=True, special=False)


@pytest.mark.model
def test_gemma_token_texts_encode_like_llama_cpp(gemma, gemma_llm):
    """Every 5th token's own text, through special-token cutting and merging."""
    mismatches = []
    for i in range(0, gemma.vocab_size, 5):
        data = gemma.token_bytes(i)
        text = data.decode("utf-8", errors="ignore")
        if gemma.encode(text, add_special=False) != gemma_llm.tokenize(text.encode(), add_bos=False, special=False):
            mismatches.append(text)
    assert not mismatches, mismatches[:20]


@pytest.mark.model
def test_gemma_token_pieces_match_llama_cpp(gemma, gemma_llm):
    for i in range(gemma.vocab_size):
        assert gemma._piece(i) == llama_piece(gemma_llm, i, special=False), i
        assert gemma.token_bytes(i) == llama_piece(gemma_llm, i, special=True), i


@pytest.mark.parametrize("text", TRICKY + GEMMA_TRICKY, ids=short_repr)
@pytest.mark.model
def test_gemma_decodes_like_llama_cpp(gemma, gemma_llm, text):
    for add_special in (False, True):
        for parse_special in (False, True):
            ids = gemma.encode(text, add_special=add_special, parse_special=parse_special)
            assert gemma.decode(ids).encode() == llama_detokenize(gemma_llm, ids)
        if "▁" not in text:  # typed, it comes back as a space, as in llama.cpp
            assert gemma.decode(gemma.encode(text, add_special=add_special)) == text


@pytest.mark.parametrize("text", SPLIT_CHARACTERS, ids=short_repr)
@pytest.mark.model
def test_gemma_stream_decoder_holds_back_split_characters(gemma, text):
    ids = gemma.encode(text, add_special=False)
    pieces = [gemma.token_bytes(i) for i in ids]
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces), "no byte tokens: the test proves nothing"
    decoder = StreamDecoder(gemma)
    out = ""
    for k, token in enumerate(ids):
        out += decoder.feed(token)
        assert "\ufffd" not in out
        assert out == b"".join(pieces[:k + 1]).decode("utf-8", errors="ignore")
    assert out + decoder.flush() == text


@pytest.mark.model
def test_gemma_stream_decoder_prints_control_tokens_as_nothing(gemma):
    decoder = StreamDecoder(gemma)
    ids = gemma.encode("<start_of_turn>model\nHi<end_of_turn>", add_special=False, parse_special=True)
    assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == "model\nHi"


# --- small vocabularies ---------------------------------------------------------------

def _small_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: <unk> <s> </s>, a control and a user-defined
    token, the 256 byte tokens, then pieces whose scores make merge order matter
    (a piece across a space, equal scores, a long way round to "hello")."""
    special = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<ctrl>", CONTROL), ("<ud>", USER_DEFINED)]
    pieces = {  # text: score
        "▁": -1, "a": -2, "b": -2, "c": -3, "h": -4, "e": -4, "l": -4, "o": -4, "w": -5, "r": -5, "d": -5,
        "1": -6, "2": -6, "é": -7, "日": -7,
        "ab": -10, "bc": -10, "▁a": -11, "▁ab": -12, "a▁": -8, "a▁b": -9, "▁▁": -13, "▁▁▁": -14,
        "12": -15, "21": -14, "he": -20, "ll": -21, "lo": -19, "llo": -22, "hel": -29, "hello": -23,
        "▁hello": -30, "▁w": -24, "or": -25, "ld": -26, "orld": -27, "▁world": -28,
    }
    tokens = [t for t, _ in special] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
    scores = [0.0] * (len(special) + 256) + [float(s) for s in pieces.values()]
    types = [k for _, k in special] + [BYTE] * 256 + [NORMAL] * len(pieces)
    return tokens, scores, types


SMALL_TOKENS, SMALL_SCORES, SMALL_TYPES = _small_vocab()

SMALL_TEXTS = [
    "", " ", "  ", "a", " a", "ab", "abc", "bca", "121", "a b", "a  b", " a b c ", "hello world", "helloworld",
    "  hello   world  ", "hello\nworld", "\tab\t", "12 1212 112", "é日é", "è", "日本", "🙂", "x\x00y",
    "<s>hello", "hello<s>", "<ctrl>ab<ctrl> ab", "<ud>ab", "ab<ud> ab<ud>", "<ud><ud>", "</s>", "a<unk>b",
    "▁a", "\u2581\u2581 \u2581",
]

# name -> metadata settings (None leaves the key out: llama.cpp's default)
SMALL_VARIANTS = {
    "defaults": {"tokenizer.ggml.add_space_prefix": None, "tokenizer.ggml.add_bos_token": None,
                 "tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None},
    "no space prefix": {"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.bos_token_id": 1},
    "space prefix, EOS, integer scores": {
        "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.scores": [int(s) for s in SMALL_SCORES]},
}


def _small_metadata(settings: dict) -> dict:
    metadata = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": SMALL_TOKENS,
        "tokenizer.ggml.scores": SMALL_SCORES, "tokenizer.ggml.token_type": SMALL_TYPES,
        "llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": 8,
        "llama.feed_forward_length": 8, "llama.attention.head_count": 1,
    }
    metadata.update({k: v for k, v in settings.items() if v is not None})
    return metadata


@pytest.fixture(scope="module", params=SMALL_VARIANTS)
def small(request, tmp_path_factory):
    metadata = _small_metadata(SMALL_VARIANTS[request.param])
    path = write_vocab_gguf(tmp_path_factory.mktemp("spm") / "vocab.gguf", metadata)
    return Tokenizer.from_metadata(GGUFFile(path).metadata), llama(path)


def test_small_vocab_encodes_like_llama_cpp(small):
    ours, llm = small
    for text in SMALL_TEXTS + TRICKY:
        assert_encodes_like(ours, llm, text)


def test_small_vocab_decodes_like_llama_cpp(small):
    """Including the space add_space_prefix put in front: llama.cpp takes it off
    the first token, but not when a BOS comes first."""
    ours, llm = small
    for text in SMALL_TEXTS:
        for add_special, parse_special in itertools.product((False, True), repeat=2):
            ids = ours.encode(text, add_special=add_special, parse_special=parse_special)
            assert ours.decode(ids).encode() == llama_detokenize(llm, ids), (text, ids)


def test_small_vocab_settings_and_pieces_match_llama_cpp(small):
    ours, llm = small
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert (ours.bos_id, ours.eos_id) == (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab))
    assert (ours.add_bos, ours.add_eos) == (llama_cpp.llama_vocab_get_add_bos(vocab),
                                            llama_cpp.llama_vocab_get_add_eos(vocab))
    ids = range(ours.vocab_size)
    assert ours.eog_ids == {i for i in ids if llama_cpp.llama_vocab_is_eog(vocab, i)}
    for i in ids:
        assert ours._piece(i) == llama_piece(llm, i, special=False), i
        assert ours.token_bytes(i) == llama_piece(llm, i, special=True), i


def _pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    return [tokenizer.token_bytes(i).decode() for i in tokenizer.encode(text, add_special=False)]


def test_merges_follow_scores():
    """The highest score merges first, the leftmost of equal scores, across a space too."""
    ours = Tokenizer.from_metadata(_small_metadata(SMALL_VARIANTS["no space prefix"]))
    assert [_pieces(ours, text) for text in ("abc", "bca", "121", "a b")] == [
        ["ab", "c"], ["bc", "a"], ["1", "21"], ["a b"]]


def test_missing_scores_merge_leftmost_first():
    metadata = _small_metadata(SMALL_VARIANTS["no space prefix"])
    del metadata["tokenizer.ggml.scores"]
    assert _pieces(Tokenizer.from_metadata(metadata), "121") == ["12", "1"]


def test_short_scores_are_one_clear_line():
    metadata = _small_metadata({"tokenizer.ggml.scores": [0.0, 0.0, 0.0]})
    expected = f"^the model has 3 tokenizer.ggml.scores values for {len(SMALL_TOKENS)} tokens$"
    with pytest.raises(TokenizerError, match=expected):
        Tokenizer.from_metadata(metadata)


def test_a_byte_without_a_token_becomes_unknown():
    """llama.cpp stops with an error here; we give the unknown token for each such byte."""
    metadata = _small_metadata(SMALL_VARIANTS["no space prefix"])
    keep = [i for i, t in enumerate(SMALL_TOKENS) if t not in ("<0xC3>", "<0xA8>")]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        metadata[key] = [metadata[key][i] for i in keep]
    ours = Tokenizer.from_metadata(metadata)
    assert ours.encode("aè", add_special=False) == [ours.encode("a", add_special=False)[0], 0, 0]

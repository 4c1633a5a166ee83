"""Tiny random Hugging Face checkpoints (Llama, Qwen2, Gemma 3) saved with
transformers, each with a small tokenizer trained here with the `tokenizers`
library in the style of the real model's: Llama 3's byte-level BPE, Qwen2's,
and Gemma's SentencePiece-style BPE with byte fallback."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "Hello, world! Hello again, wonderful world of tokens and merges.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "Numbers: 1, 22, 333, 4444, 55555 and 3.14159 or 2024-11-22.",
    "I'm sure they'll say we've done it, and you'd agree she's right.",
    "Café, naïve, résumé, Ünïcödé, 日本語のテキスト, 中文测试, 한국어, emoji 🙂🎉",
    "   leading spaces, trailing spaces   \n\n\ttabs\tand\r\nnewlines\n",
] * 4

TEXTS = [
    "Hello world", "The quick brown fox", " leading space", "trailing  ", "a  b   c",
    "line\n  indented\n\tx", "\n\n", "12345 678", "3.14159", "I'm sure they'll", "DON'T",
    "def f(x):\n    return x * 2\n", "Café naïve", "日本語", "🙂 unseen ☃ chars ж", "unknownwordzzz qq",
    "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user\nhi<end_of_turn>", "<|eot_id|>x",
]

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_level(regex: str, specials: list[str], vocab_size: int, ignore_merges: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama3_tokenizer() -> tuple[Tokenizer, dict]:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level(LLAMA3_REGEX, specials, 420, ignore_merges=True)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])])
    return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


def qwen2_tokenizer() -> tuple[Tokenizer, dict]:
    tok = _byte_level(QWEN2_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 400, ignore_merges=False)
    tok.normalizer = normalizers.NFC()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}


def gemma_tokenizer() -> tuple[Tokenizer, dict]:
    """SentencePiece-style BPE: spaces become ▁, no pre-splitting, byte fallback."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, show_progress=False))
    state = json.loads(trained.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials + ["<start_of_turn>", "<end_of_turn>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return tok, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


TOKENIZERS = {"llama": llama3_tokenizer, "qwen2": qwen2_tokenizer, "gemma3": gemma_tokenizer}


def _config(arch: str, tok: Tokenizer, special: dict, dim: int, n_ff: int, **extra):
    ids = {k: tok.token_to_id(v) for k, v in special.items() if k.endswith("_token")}
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=dim, intermediate_size=n_ff, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=ids.get("bos_token"), eos_token_id=ids.get("eos_token"),
                  pad_token_id=ids.get("pad_token"), initializer_range=dim ** -0.5)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=False, **extra))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=False, **extra))
    common.update(num_hidden_layers=7, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=4)
    return Gemma3ForCausalLM(Gemma3TextConfig(**common, rms_norm_eps=1e-6, **extra))


def make_checkpoint(folder: Path, arch: str, *, dim: int = 64, n_ff: int = 96, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, seed: int = 0, **config_extra) -> Path:
    """Save a random `arch` checkpoint and its tokenizer into `folder`."""
    tok, special = TOKENIZERS[arch]()
    torch.manual_seed(seed)
    model = _config(arch, tok, special, dim, n_ff, **config_extra)
    with torch.no_grad():  # norms away from their init value, biases non-zero: every tensor matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    template = special.pop("chat_template", None)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if template:
        hf_tok.chat_template = template
    hf_tok.save_pretrained(folder)
    return folder

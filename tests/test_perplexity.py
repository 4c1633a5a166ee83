"""`llamazip perplexity` on SmolLM2 against the same chunked computation done with
llama.cpp's logits (llama-cpp-python, an implementation we did not write) on the
same tokens, plus its output format and errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.perplexity import PerplexityError, perplexity
from llamazip.runtime.tokenizer import Tokenizer
from tiny_models import TinyGemma3, TinyLlama

N_CTX = 64
# Text shipped with Python (the reference manual's sections on loops).
TEXT = "\n\n".join(__import__("pydoc_data.topics", fromlist=["topics"]).topics[k] for k in ("for", "while"))


def run_cli(*args):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "llamazip", "perplexity", *map(str, args)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)


def llama_cpp_perplexity(path, tokens: list[int], n_ctx: int, bos: int) -> float:
    """The same chunks scored with llama.cpp's logits of every position."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    nll, count = 0.0, 0
    for i in range(len(tokens) // n_ctx):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[:n_ctx], np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            z = logits[j] - logits[j].max()
            nll -= z[chunk[j + 1]] - math.log(np.exp(z).sum())
            count += 1
    return math.exp(nll / count)


@pytest.mark.model
def test_matches_llama_cpp_on_smollm2(smollm2_path, tmp_path):
    gguf = GGUFFile(smollm2_path)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    tokens = tokenizer.encode(TEXT)[:2 * N_CTX + 5]  # two chunks, and a few tokens that are dropped
    assert tokenizer.add_bos is False or tokens[0] == tokenizer.bos_id
    n = 2
    seen = []
    ours = perplexity(Model(gguf, n_ctx=N_CTX), tokens, N_CTX,
                      tokenizer.bos_id if tokenizer.add_bos else None, on_chunk=lambda i, p: seen.append(i))
    assert seen == list(range(1, n + 1)) and ours.n_chunks == n and ours.n_scored == n * (N_CTX // 2 - 1)
    bos = tokenizer.bos_id if tokenizer.add_bos else tokens[0]
    theirs = llama_cpp_perplexity(smollm2_path, tokens, N_CTX, bos)
    assert 1.0 < ours.ppl < 100.0
    # llama.cpp multiplies Q4_1 weights with activations rounded to 8 bits: its logits differ
    # from ours by up to ~1 (of 36), ~0.1 nats per token, so the estimates agree to a few percent.
    assert abs(ours.ppl - theirs) / theirs < 0.05, (ours.ppl, theirs)
    assert 0 < ours.ppl_error < ours.ppl

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = run_cli("-m", smollm2_path, "-f", text, "-c", N_CTX, "-t", 2, "--chunks", 1)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("Final estimate: PPL = ") and " +/- " in line
    assert "[1]" in result.stderr


def test_errors(tmp_path):
    tiny = TinyLlama(seed=2).write(tmp_path / "tiny.gguf")
    short = tmp_path / "short.txt"
    short.write_text("far too short")
    result = run_cli("-m", tiny, "-f", short, "-c", 16)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: the text has ")
    assert "Traceback" not in result.stderr
    missing = run_cli("-m", tiny, "-f", tmp_path / "missing.txt")
    assert missing.returncode == 1 and "error: cannot read" in missing.stderr
    model = Model(GGUFFile(tiny), n_ctx=32)
    with pytest.raises(PerplexityError, match="larger than"):
        perplexity(model, list(range(200)), 64, None)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_model_against_direct_computation(tmp_path, arch):
    """Every scored position's log-probability from the float64 reference forward pass."""
    tiny_model = TinyLlama(seed=4) if arch == "llama" else TinyGemma3(seed=4, softcap=30.0)
    gguf = GGUFFile(tiny_model.write(tmp_path / "tiny.gguf"))
    rng = np.random.default_rng(0)
    tokens = [256] + list(rng.integers(0, 256, 40))
    n_ctx = 16
    got = perplexity(Model(gguf, n_ctx=n_ctx), tokens, n_ctx, 256)
    nll = []
    for i in range(len(tokens) // n_ctx):
        chunk = [256] + tokens[i * n_ctx + 1:(i + 1) * n_ctx]
        logits = tiny_model.reference_logits(chunk)
        for j in range(n_ctx // 2, n_ctx - 1):
            z = logits[j] - logits[j].max()
            nll.append(-(z[chunk[j + 1]] - math.log(np.exp(z).sum())))
    nll = np.array(nll)
    assert got.n_scored == len(nll)
    assert got.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-4)
    assert got.ppl_error == pytest.approx(math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(len(nll)), rel=1e-3)

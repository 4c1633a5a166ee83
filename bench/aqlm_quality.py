"""Perplexity of GGUF models on the held-out texts (bench/heldout/, see its
README) and on the in-domain tail of the pydoc topics (the README's AQLM
numbers): `llamazip perplexity -c 512` in one process, one line per text.

    python bench/aqlm_quality.py [--chunks N] MODEL.gguf [MODEL.gguf ...]

With two or more models, the ratio of each to the first is printed too (the
first is the reference, e.g. the Q4_1 original).

    python bench/aqlm_quality.py --decode-tables [--chunks N] AQLM.gguf

compares AQLM's two decode kernels instead: every scored logit comes from
one-token decoding (the first half of each chunk goes in as a prompt, then
the scored half token by token), once through the byte tables
(runtime/aqlm_lookup.py, where the CPU has them) and once through the float
tables; the byte tables' rounding must change perplexity by under 1%.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from llamazip.runtime import aqlm_lookup  # noqa: E402
from llamazip.runtime.aqlm import AqlmMatrix  # noqa: E402
from llamazip.runtime.gguf import GGUFFile  # noqa: E402
from llamazip.runtime.model import Model  # noqa: E402
from llamazip.runtime.perplexity import perplexity  # noqa: E402
from llamazip.runtime.tokenizer import Tokenizer  # noqa: E402

HELDOUT = Path(__file__).resolve().parent / "heldout"


def texts() -> dict[str, str]:
    """name -> text: each held-out file, and the last 24,000 characters of the pydoc
    topics (the default calibration text reads only its first ~8192 tokens)."""
    from pydoc_data.topics import topics

    pydoc = "\n\n".join(topics[key] for key in sorted(topics))
    out = {path.stem: path.read_text(encoding="utf-8") for path in sorted(HELDOUT.glob("*_*.*"))}
    out["pydoc_tail"] = pydoc[-24000:]
    return out


def measure(model_path: Path, n_ctx: int, chunks: int) -> dict[str, float]:
    gguf = GGUFFile(model_path)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    model = Model(gguf, n_ctx=n_ctx)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return {name: perplexity(model, tokenizer.encode(text), n_ctx, bos, chunks).ppl
            for name, text in texts().items()}


def decoded_nll(model: Model, tokens: list[int], n_ctx: int, bos: int | None, chunks: int) -> list[float]:
    """perplexity()'s chunks and scored positions, each scored logit from a one-token
    pass: the negative log-likelihood of each scored token."""
    first, nll = n_ctx // 2, []
    for c in range(min(chunks, len(tokens) // n_ctx)):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        logits = model.forward(np.array(chunk[:first + 1]), 0)  # the logits at `first`
        for j in range(first, n_ctx - 1):
            if j > first:
                logits = model.forward(np.array([chunk[j]]), j)
            z = logits.astype(np.float64)
            nll.append(float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[chunk[j + 1]]))
    return nll


def compare_decode_tables(model_path: Path, n_ctx: int, chunks: int) -> None:
    if not aqlm_lookup.AVAILABLE:
        sys.exit("this CPU has no byte-table kernel (AVX-512 VBMI): nothing to compare")
    gguf = GGUFFile(model_path)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    model = Model(gguf, n_ctx=n_ctx)
    matrices = [m for layer in model.layers for m in vars(layer).values() if isinstance(m, AqlmMatrix)]
    if not matrices:
        sys.exit(f"{model_path}: no AQLM matrices")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    pooled: dict[bool, list[float]] = {True: [], False: []}
    for name, text in list(texts().items()) + [("all texts", None)]:
        if text is None:
            nll = pooled
        else:
            nll = {}
            for byte_tables in (True, False):
                for m in matrices:
                    m._byte_tables = byte_tables
                nll[byte_tables] = decoded_nll(model, tokenizer.encode(text), n_ctx, bos, chunks)
                pooled[byte_tables] += nll[byte_tables]
        ppl = {k: float(np.exp(np.mean(v))) for k, v in nll.items()}
        print(f"{model_path.name} {name}: byte tables {ppl[True]:.3f}, float tables {ppl[False]:.3f} "
              f"({100 * (ppl[True] / ppl[False] - 1):+.2f}%)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4, help="chunks per text (default 4)")
    parser.add_argument("--decode-tables", action="store_true",
                        help="compare AQLM's byte-table and float-table decode kernels (see above)")
    args = parser.parse_args()
    if args.decode_tables:
        for path in args.models:
            compare_decode_tables(path, args.ctx_size, args.chunks)
        return
    first = None
    for path in args.models:
        ppl = measure(path, args.ctx_size, args.chunks)
        cells = [f"{name} {value:.2f}" + (f" ({value / first[name]:.2f}x)" if first else "")
                 for name, value in ppl.items()]
        print(f"{path.name}: " + ", ".join(cells), flush=True)
        first = first or ppl


if __name__ == "__main__":
    sys.exit(main())

"""Perplexity of GGUF models on the held-out texts (bench/heldout/, see its
README) and on the in-domain tail of the pydoc topics (the README's AQLM
numbers): `llamazip perplexity -c 512` in one process, one line per text.

    python bench/aqlm_quality.py [--chunks N] MODEL.gguf [MODEL.gguf ...]

With two or more models, the ratio of each to the first is printed too (the
first is the reference, e.g. the Q4_1 original).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4, help="chunks per text (default 4)")
    args = parser.parse_args()
    first = None
    for path in args.models:
        ppl = measure(path, args.ctx_size, args.chunks)
        cells = [f"{name} {value:.2f}" + (f" ({value / first[name]:.2f}x)" if first else "")
                 for name, value in ppl.items()]
        print(f"{path.name}: " + ", ".join(cells), flush=True)
        first = first or ppl


if __name__ == "__main__":
    sys.exit(main())

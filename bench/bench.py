"""`make bench`: prompt-processing and decode speed of the real models present.

For each model and thread count: a 256-token prompt (prompt processing, tok/s),
then 128 greedy tokens after it (decode, tok/s), with the weight bytes each
decoded token reads and the bandwidth that implies. Results print as a table
and go to bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numba owns the cores (see cli/main.py)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import REAL_MODELS  # noqa: E402

from llamazip.runtime import kernels  # noqa: E402
from llamazip.runtime.generate import process_prompt  # noqa: E402
from llamazip.runtime.gguf import GGUFFile  # noqa: E402
from llamazip.runtime.model import Model  # noqa: E402


def bench_model(path: Path, threads: list[int], n_prompt: int, n_gen: int) -> list[dict]:
    model = Model(GGUFFile(path), n_ctx=n_prompt + n_gen + 1)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, n_prompt).tolist()
    process_prompt(model, prompt[:8])  # compile (or load from cache) every kernel first
    model.forward(np.array([1]), 8)

    rows = []
    for n_threads in threads:
        kernels.set_threads(n_threads)
        started = time.perf_counter()
        logits = process_prompt(model, prompt)
        prompt_seconds = time.perf_counter() - started

        token, started = int(np.argmax(logits)), time.perf_counter()
        for pos in range(n_prompt, n_prompt + n_gen):
            token = int(np.argmax(model.forward(np.array([token]), pos)))
        decode_seconds = time.perf_counter() - started

        bytes_per_token = model.weight_bytes_per_token
        rows.append({
            "model": path.name,
            "threads": n_threads,
            "prompt_tok_s": n_prompt / prompt_seconds,
            "decode_tok_s": n_gen / decode_seconds,
            "weight_bytes_per_token": bytes_per_token,
            "decode_GB_s": bytes_per_token * n_gen / decode_seconds / 1e9,
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    present = [m.path for m in REAL_MODELS.values() if m.path.exists()]
    if not present:
        print("error: no model found: run `make models`", file=sys.stderr)
        return 1
    rows = []
    for path in present:
        print(f"benchmarking {path.name} ...", file=sys.stderr)
        rows += bench_model(path, threads, args.prompt_tokens, args.gen_tokens)

    print(f"{'model':<40} {'thr':>3} {'pp tok/s':>9} {'tg tok/s':>9} {'MB/token':>9} {'GB/s':>6}")
    for r in rows:
        print(f"{r['model']:<40} {r['threads']:>3} {r['prompt_tok_s']:>9.1f} {r['decode_tok_s']:>9.1f} "
              f"{r['weight_bytes_per_token'] / 1e6:>9.1f} {r['decode_GB_s']:>6.1f}")
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

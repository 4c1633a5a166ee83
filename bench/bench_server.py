"""`make bench`'s server section: total decode speed with several streamed chats at once.

For each real model present, a server with `--parallel 4` answers 1, 2, 4 and
8 concurrent streamed completions (8: four run, four wait for a slot), each a
different prompt, greedy, a fixed number of tokens. Total decode tok/s is the
streams' tokens while all of them decode (from the last stream's first token
to the first stream's end: before it the prompts are processed one after
another, which is not decoding); for 8 streams, and as
`N_streams_first_to_last_ratio`, all their tokens over the time from the
first stream's first token to the last stream's end. Each count's ratio is to
one stream alone. Then one stream
alone on `--parallel 4` against `--parallel 1` (two servers side by side,
alternating, best of --rounds each: the machine is shared and noisy). Then
the stall a newcomer's long prompt causes: while 3 streams decode, a 4th
request brings a 500-token prompt; the longest gap between two tokens of a
running stream while it is processed, over that stream's median gap: the
worst over STALL_NEWCOMERS newcomers (each its own prompt), and their median.
Results go to bench/results_server.json. `--gguf PATH` adds a model at a real
size (bench/big_models.py writes Llama shapes with random weights; their flat
logits make the head re-score thousands of rows a token, which real models'
peaked ones do not: read those ratios as a floor).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llamazip_server import Server  # noqa: E402
from models import REAL_MODELS  # noqa: E402

WORDS = ("river stone lantern orchard violin harbor meadow copper falcon ember willow canyon "
         "glacier saffron tundra marble beacon thistle quartz nomad").split()


def _prompt(i: int, words: int = 12) -> str:
    """A different prompt per stream: no stream reuses another's cache."""
    picked = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words)]
    return f"Story {i}: " + " ".join(picked) + ". Continue the story:"


def stream(port: int, prompt: str, max_tokens: int, times: list[float] | None = None) -> list[float]:
    """One streamed completion; the arrival time of each token's event (appended to
    `times` as they come, when given)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:200]!r}")
    times = [] if times is None else times
    for line in response:
        if line.startswith(b"data: {"):
            times.append(time.perf_counter())
    connection.close()
    return times


def concurrent(port: int, n: int, max_tokens: int, offset: int = 0) -> dict:
    results: list[list[float]] = [[] for _ in range(n)]

    def run(i: int) -> None:
        results[i] = stream(port, _prompt(offset + i), max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = sum(len(times) for times in results)
    first, last = min(times[0] for times in results), max(times[-1] for times in results)
    # While every stream decodes: from the last one's first token to the first one's end.
    # Before it, the streams' prompts are processed one after another (the first stream's
    # first token comes after its own prompt, its second after all of them): time that
    # is not decoding. Empty when streams wait for a slot (8 streams on 4).
    start, end = max(times[0] for times in results), min(times[-1] for times in results)
    decoded = sum(sum(1 for t in times if start < t <= end) for times in results)
    return {"streams": n, "tokens": tokens, "total_tok_s": tokens / (last - first),
            "all_decoding_tok_s": decoded / (end - start) if end > start else None}


STALL_STREAM_TOKENS = 512  # enough for the running streams to outlast the newcomer's prompt
STALL_NEWCOMERS = 3


def stall(port: int, long_prompt: str) -> dict:
    """3 streams decode; a 4th brings a long prompt. The running streams' longest gap
    while it is processed, over their median gap (None: they had ended first)."""
    results: list[list[float]] = [[] for _ in range(3)]
    marks = {}

    def run(i: int) -> None:
        stream(port, _prompt(100 + i), STALL_STREAM_TOKENS, results[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    # The newcomer comes once all three decode (a fixed wait had let a fast model's
    # streams end first: no gap was measured at all).
    deadline = time.monotonic() + 120
    while min(len(times) for times in results) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    marks["sent"] = time.perf_counter()
    newcomer = stream(port, long_prompt, 4)
    marks["first_token"] = newcomer[0]
    for t in threads:
        t.join()
    ratios = []
    for times in results:
        gaps = [b - a for a, b in zip(times, times[1:])]
        during = [b - a for a, b in zip(times, times[1:]) if b >= marks["sent"] and a <= marks["first_token"]]
        if gaps and during:
            ratios.append(max(during) / statistics.median(gaps))
    return {"worst_gap_over_median": max(ratios) if ratios else None,
            "newcomer_first_token_s": marks["first_token"] - marks["sent"]}


def bench_model(path: Path, args: argparse.Namespace, log_dir: Path) -> dict:
    # No prompt lookup: a lone stream would draft and the ratios would mix it with batching
    # (bench_lookup.py measures drafting).
    common = ("-c", "2048", "-t", str(args.threads), "--draft", "0")
    four = Server(path, log_dir / f"{path.stem}-np4.log", *common, "-np", "4")
    one = Server(path, log_dir / f"{path.stem}-np1.log", *common, "-np", "1")
    try:
        four.wait_until_healthy()
        one.wait_until_healthy()
        for server in (four, one):  # compile every kernel a step needs, batched and not
            concurrent(server.port, 4, 8)
        row: dict = {"model": path.name, "threads": args.threads}
        rounds: dict[int, float] = {}
        totals: dict[int, float] = {}
        for r in range(args.rounds):
            for n in (1, 2, 4, 8):
                result = concurrent(four.port, n, args.gen_tokens, offset=10 * r + n)
                rounds[n] = max(rounds.get(n, 0.0), result["all_decoding_tok_s"] or result["total_tok_s"])
                totals[n] = max(totals.get(n, 0.0), result["total_tok_s"])
        for n, speed in rounds.items():
            row[f"{n}_streams_tok_s"] = speed
            row[f"{n}_streams_ratio"] = speed / rounds[1]
            row[f"{n}_streams_first_to_last_ratio"] = totals[n] / totals[1]
        alone = {"np4": 0.0, "np1": 0.0}
        for r in range(args.rounds):  # alternating, best of each
            alone["np4"] = max(alone["np4"], concurrent(four.port, 1, args.gen_tokens, 50 + r)["total_tok_s"])
            alone["np1"] = max(alone["np1"], concurrent(one.port, 1, args.gen_tokens, 50 + r)["total_tok_s"])
        row["alone_np4_tok_s"], row["alone_np1_tok_s"] = alone["np4"], alone["np1"]
        row["alone_np4_over_np1"] = alone["np4"] / alone["np1"]
        # Several newcomers, each its own ~500-token prompt (SmolLM2 512, Qwen2.5 556; none
        # shares a cached prefix): one step slowed by the machine decides one newcomer's gap.
        stalls = [stall(four.port, " ".join(WORDS[(k + t) % len(WORDS)] + str(1000 * t + k) for k in range(150)))
                  for t in range(STALL_NEWCOMERS)]
        gaps = [s["worst_gap_over_median"] for s in stalls if s["worst_gap_over_median"] is not None]
        row["stalls"] = stalls
        row["worst_gap_over_median"] = max(gaps) if gaps else None
        row["median_newcomer_gap_over_median"] = statistics.median(gaps) if gaps else None
        return row
    finally:
        four.stop()
        one.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="smollm2,qwen2.5", help="comma-separated model names")
    parser.add_argument("--gguf", action="append", type=Path, default=[], metavar="PATH",
                        help="a further model file (repeatable): e.g. models/big/llama-1b-q4_k_m.gguf, "
                             "written by bench/big_models.py")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results_server.json"))
    args = parser.parse_args()
    present = [REAL_MODELS[n].path for n in args.models.split(",") if n in REAL_MODELS and REAL_MODELS[n].path.exists()]
    missing = [path for path in args.gguf if not path.is_file()]
    if missing:
        print(f"error: no such model file: {missing[0]}", file=sys.stderr)
        return 1
    present += args.gguf
    if not present:
        print("error: no model found: run `make models`", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as log_dir:
        for path in present:
            print(f"benchmarking the server on {path.name} ...", file=sys.stderr)
            rows.append(bench_model(path, args, Path(log_dir)))
    print(f"\n{'model':<34} {'1 tok/s':>8} {'2 (x1)':>7} {'4 (x1)':>7} {'4 f-l':>6} {'8 (x1)':>7} {'np4/np1':>8} "
          f"{'stall':>6} {'median':>6}")
    for r in rows:
        stalls = "".join(f" {r[key]:>6.1f}" if r[key] is not None else f" {'n/a':>6}"
                         for key in ("worst_gap_over_median", "median_newcomer_gap_over_median"))
        print(f"{r['model'][:34]:<34} {r['1_streams_tok_s']:>8.1f} {r['2_streams_ratio']:>7.2f} "
              f"{r['4_streams_ratio']:>7.2f} {r['4_streams_first_to_last_ratio']:>6.2f} {r['8_streams_ratio']:>7.2f} "
              f"{r['alone_np4_over_np1']:>8.2f}{stalls}")
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

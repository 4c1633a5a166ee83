"""`make bench-big`: decode speed at the sizes people run, beside llama.cpp.

For each Llama-shaped model of bench/big_models.py (1B, 3B, 8B; Q4_0,
Q4_K_M-like and AQLM 2x8) and each thread count: decode tok/s after a short
prompt, the weight bytes each token reads, the GB/s that implies and its
fraction of the read bandwidth measured in the same run; llama.cpp's decode on
the same file (it has no AQLM: beside our AQLM stands its Q4_0 of the same
shape); start-up (process start to the first generated token, warm page cache)
and our private memory (anonymous RSS: what the process holds beyond the
mapped weights). Each measurement runs in its own process, ours and llama.cpp's
alternating, best of --rounds. Last, the largest Q4_0 model is built into a
bundle (ZIP64: over 4 GiB) and run as a user runs it, with an empty cache and
then a warm one, its private memory sampled while it decodes. Results go to
bench/results-big.json.

    .venv/bin/python bench/bench_big.py [--shapes 1b,3b,8b] [--kinds q4_0,q4_k_m,aqlm] [--threads 1,2] [--no-bundle]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numba owns the cores (see llamazip/main.py)

HERE = Path(__file__).resolve().parent
WORKER = """
import json, sys, time
import numpy as np
kind, path, threads, n_gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompt = [1, 504, 3458, 282, 4649, 314, 253, 1848]

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

if kind == "ours":
    from llamazip.runtime import jit
    from llamazip.runtime.gguf import GGUFFile
    from llamazip.runtime.model import Model
    jit.set_threads(threads)
    model = Model(GGUFFile(path), n_ctx=len(prompt) + n_gen + 8)
    logits = model.forward(np.array(prompt), 0)
    step = lambda token, pos: model.forward(np.array([token]), pos)
    extra = {"weight_bytes_per_token": model.weight_bytes_per_token}
else:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n_gen + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    llm.eval(prompt)
    logits = llm.scores[llm.n_tokens - 1]

    def step(token, pos):
        llm.eval([token])
        return llm.scores[llm.n_tokens - 1]
    extra = {}
token, pos = int(np.argmax(logits)), len(prompt)
for _ in range(2):  # warm: every kernel compiled (or loaded from the cache), every page touched
    token, pos = int(np.argmax(step(token, pos))), pos + 1
started = time.perf_counter()
for _ in range(n_gen):
    token, pos = int(np.argmax(step(token, pos))), pos + 1
seconds = time.perf_counter() - started
print(json.dumps(dict(extra, decode_tok_s=n_gen / seconds, anon_mb=anon_mb())))
"""


def _worker(kind: str, path: Path, threads: int, n_gen: int) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, kind, str(path), str(threads), str(n_gen)],
                          capture_output=True, text=True, cwd=HERE)
    if done.returncode != 0:
        raise SystemExit(f"error: {kind} on {path.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _start_to_first_token(kind: str, path: Path, threads: int) -> float:
    if kind == "ours":
        cmd = [sys.executable, "-m", "llamazip", "run", "-m", str(path), "-p", "Hello", "-n", "1",
               "-t", str(threads), "--temp", "0"]
    else:
        cmd = [sys.executable, "-c", "import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], "
               "n_ctx=512, n_threads=int(sys.argv[2]), verbose=False); llm('Hello', max_tokens=1, temperature=0)",
               str(path), str(threads)]
    started = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, cwd=HERE)
    return time.perf_counter() - started


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc: the bundle's launcher execs, its bootstrap spawns)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _private_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _bundle_row(gguf_path: Path, threads: int) -> dict:
    """Build `gguf_path` into a bundle and run it: seconds to the first token with an
    empty cache and with a warm one, and the most private memory any of its processes
    held while decoding 16 tokens."""
    gguf_path = gguf_path.resolve()
    bundle = gguf_path.with_suffix(".llamazip")
    built = subprocess.run([sys.executable, "-m", "llamazip", "build", "-m", str(gguf_path), "-o", str(bundle)],
                           capture_output=True, text=True, cwd=HERE)
    if built.returncode:
        raise SystemExit(f"error: building {bundle.name} failed:\n{built.stderr[-2000:]}")
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, HOME=home, XDG_CACHE_HOME=os.path.join(home, "cache"))
        timings = []
        for _ in range(2):  # empty cache, then warm
            started = time.perf_counter()
            subprocess.run([str(bundle), "-p", "Hello", "-n", "1", "-t", str(threads), "--temp", "0"],
                           check=True, capture_output=True, env=env)
            timings.append(time.perf_counter() - started)
        run = subprocess.Popen([str(bundle), "-p", "Hello", "-n", "16", "-t", str(threads), "--temp", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        peak = 0.0
        while run.poll() is None:
            peak = max([peak] + [_private_mb(pid) for pid in _descendants(run.pid)])
            time.sleep(0.2)
    return {"bundle": bundle.name, "bundle_gb": bundle.stat().st_size / 1e9, "threads": threads,
            "first_run_s": timings[0], "warm_run_s": timings[1], "private_mb": peak,
            "weights_gb": gguf_path.stat().st_size / 1e9}


def main() -> int:
    import big_models
    from bench import read_bandwidth_gb_s

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1b,3b,8b")
    parser.add_argument("--kinds", default=",".join(big_models.KINDS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each runtime, alternating; best kept")
    parser.add_argument("--out", default=str(HERE / "results-big.json"))
    parser.add_argument("--no-bundle", action="store_true", help="skip building and running the bundle")
    args = parser.parse_args()
    shapes, kinds = args.shapes.split(","), args.kinds.split(",")
    threads_list = [int(t) for t in args.threads.split(",")]
    for shape in shapes:
        for kind in set(kinds) | {"q4_0"}:  # llama.cpp's peer of AQLM is the Q4_0 file
            big_models.write(shape, kind, log=lambda m: print(m, file=sys.stderr))

    bandwidth = {t: read_bandwidth_gb_s(t) for t in threads_list}
    rows = []
    for shape in shapes:
        for kind in kinds:
            path = big_models.path_for(shape, kind)
            peer = big_models.path_for(shape, "q4_0" if kind == "aqlm" else kind)
            for threads in threads_list:
                print(f"benchmarking {path.name}, {threads} thread(s) ...", file=sys.stderr)
                ours, theirs = {}, {}
                for _ in range(args.rounds):
                    for best, runtime, file in ((ours, "ours", path), (theirs, "llama_cpp", peer)):
                        result = _worker(runtime, file, threads, args.gen_tokens)
                        result["start_s"] = _start_to_first_token(runtime, file, threads)
                        for key, value in result.items():
                            better = max if key.endswith("tok_s") else min
                            best[key] = better(best.get(key, value), value)
                gb = ours["weight_bytes_per_token"] / 1e9
                rows.append({"model": path.name, "threads": threads, "ours": ours, "llama_cpp": theirs,
                             "llama_cpp_file": peer.name, "read_gb_s": bandwidth[threads],
                             "ours_gb_s": gb * ours["decode_tok_s"],
                             "of_bandwidth": gb * ours["decode_tok_s"] / bandwidth[threads]})
    bundle = None
    if not args.no_bundle:
        largest = big_models.path_for(shapes[-1], "q4_0")
        print(f"building and running {largest.with_suffix('.llamazip').name} ...", file=sys.stderr)
        bundle = _bundle_row(largest, max(threads_list))
    Path(args.out).write_text(json.dumps({"read_gb_s": bandwidth, "rows": rows, "bundle": bundle}, indent=1) + "\n")
    print(f"\nread bandwidth: " + ", ".join(f"{t} thread(s) {b:.1f} GB/s" for t, b in bandwidth.items()))
    print(f"{'model':28} {'thr':>3} {'tok/s':>7} {'l.cpp':>7} {'x':>5} {'GB/tok':>6} {'GB/s':>5} {'of bw':>5} "
          f"{'start s':>7} {'l.cpp s':>7} {'anon MB':>7}")
    for r in rows:
        o, t = r["ours"], r["llama_cpp"]
        print(f"{r['model']:28} {r['threads']:>3} {o['decode_tok_s']:>7.2f} {t['decode_tok_s']:>7.2f} "
              f"{o['decode_tok_s'] / t['decode_tok_s']:>5.2f} {o['weight_bytes_per_token'] / 1e9:>6.2f} "
              f"{r['ours_gb_s']:>5.1f} {r['of_bandwidth']:>5.0%} {o['start_s']:>7.2f} {t['start_s']:>7.2f} "
              f"{o['anon_mb']:>7.0f}")
    if bundle:
        print(f"\n{bundle['bundle']} ({bundle['bundle_gb']:.2f} GB, {bundle['threads']} threads): first token "
              f"{bundle['first_run_s']:.1f} s with an empty cache, {bundle['warm_run_s']:.1f} s warm; private "
              f"memory {bundle['private_mb']:.0f} MB ({bundle['private_mb'] / 1e3 / bundle['weights_gb']:.1%} "
              f"of the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

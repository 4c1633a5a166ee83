"""Kernel speed: matvec ms and GB/s per weight type, at 1 and 2 threads, beside
numpy's float32 matvec (OpenBLAS) of the same shape measured in the same run.

    .venv/bin/python bench/kernels.py [--shapes 4096x4096,49152x576] [--types Q8_0,Q4_1]
    .venv/bin/python bench/kernels.py --shapes 896x4864,4864x896 --types Q8_0,Q5_0,Q4_K,Q6_K  # Qwen2.5 0.5B
    .venv/bin/python bench/kernels.py --batch  # n rows at once (int8_batch.py) against n int8 matvecs

The machine is shared and noisy: read the ratios, not the absolute times. Each
cell is the best of several rounds; the weights rotate over enough copies to
exceed the last-level cache, so they stream from DRAM as in decoding. A short
matmul table (prompt processing, T = 256) follows. The weights are the tests'
(tests/ggml_weights.py): gguf-py's quantization, or random K-quant blocks.

numpy's baseline runs in a child process with OPENBLAS_NUM_THREADS set, so that
OpenBLAS's thread pool and numba's never run in the same process (they fight).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

# This process runs numba's threads: keep OpenBLAS's pool out of their way.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ggml_weights import quantized  # noqa: E402

from llamazip.runtime import aqlm, aqlm_lookup, jit  # noqa: E402
from llamazip.runtime.aqlm import AqlmMatrix  # noqa: E402
from llamazip.runtime.weight_matrix import QuantMatrix  # noqa: E402
from llamazip.runtime.weight_types import FLOAT_SWITCH, WEIGHT_TYPES  # noqa: E402
from llamazip.runtime.ggml_types import BLOCK_GEOMETRY, GGMLType  # noqa: E402

STREAM_BYTES = 256 << 20  # at least this many weight bytes per sweep: far more than the L3
BATCH_STREAM_BYTES = 96 << 20  # the same for the batch table (n matvecs a copy): still over twice the L3
ROUNDS = 7
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def sweep_seconds(fn, inputs: list) -> float:
    """Mean time of fn over all inputs, called one after the other."""
    start = time.perf_counter()
    for item in inputs:
        fn(item)
    return (time.perf_counter() - start) / len(inputs)


def best_seconds(fn, inputs: list) -> float:
    fn(inputs[0])  # compile or load the kernel first
    return min(sweep_seconds(fn, inputs) for _ in range(ROUNDS))


def best_seconds_per_thread_count(fn, inputs: list, threads: list[int]) -> dict[int, float]:
    """best_seconds at each thread count, the counts alternating round by round
    so that a noisy moment does not land on one of them only."""
    fn(inputs[0])
    best = {t: float("inf") for t in threads}
    for _ in range(ROUNDS):
        for t in threads:
            jit.set_threads(t)
            best[t] = min(best[t], sweep_seconds(fn, inputs))
    return best


def cold_copies(array: np.ndarray, stream_bytes: int = STREAM_BYTES) -> list[np.ndarray]:
    """The array and enough separate copies of it that a sweep over them all streams from DRAM."""
    return [array] + [array.copy() for _ in range(max(1, -(-stream_bytes // array.nbytes) - 1))]


def numpy_f32_child(rows: int, cols: int, tokens: int) -> None:
    """Child process: print numpy's float32 matvec (tokens = 1) or matmul seconds as JSON."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((rows, cols), dtype=np.float32)
    mats = cold_copies(weights) if tokens == 1 else [weights]
    if tokens == 1:
        x = rng.standard_normal(cols, dtype=np.float32)
        seconds = best_seconds(lambda w: w @ x, mats)
    else:
        x = rng.standard_normal((tokens, cols), dtype=np.float32)
        seconds = best_seconds(lambda w: x @ w.T, mats)
    print(json.dumps(seconds))


def numpy_f32_seconds(rows: int, cols: int, threads: int, tokens: int = 1) -> float:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, "--numpy-child", f"{rows}x{cols}x{tokens}"],
                          env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def fits(type_name: str, cols: int) -> bool:
    """Whether rows of `cols` weights are whole blocks of the type; says so when not."""
    block_size = BLOCK_GEOMETRY[GGMLType[type_name]][0]
    if cols % block_size:
        print(f"  {type_name:10s} | rows of {cols} are not whole {block_size}-weight blocks")
    return cols % block_size == 0


def quant_matrix(raw: np.ndarray, ggml_type: GGMLType, cols: int, float_path: bool) -> QuantMatrix:
    """A QuantMatrix on the float kernels (float_path) or on the default ones."""
    with mock.patch.dict(os.environ):  # restored on leaving
        os.environ.pop(FLOAT_SWITCH, None)
        if float_path:
            os.environ[FLOAT_SWITCH] = "1"
        return QuantMatrix(raw, ggml_type, cols)


def bench_matvec(shapes: list[tuple[int, int]], types: list[str], threads: list[int]) -> None:
    print("matvec: ms, GB/s of weight bytes, speed-up over numpy f32 at the same thread count"
          " (TYPE flt: the float kernel, where x is otherwise rounded to int8)")
    for rows, cols in shapes:
        base = {t: numpy_f32_seconds(rows, cols, t) for t in threads}
        f32_bytes = rows * cols * 4
        print(f"\n{rows}x{cols}")
        print(f"  {'f32 numpy':10s}" + "".join(
            f" | {t} thr {base[t] * 1e3:7.3f} ms {f32_bytes / base[t] / 1e9:5.1f} GB/s  1.00x" for t in threads))
        x = np.random.default_rng(1).standard_normal(cols, dtype=np.float32)
        for name in types:
            if not fits(name, cols):
                continue
            raws = cold_copies(quantized(GGMLType[name], rows, cols))
            # The default matvec (int8 x where int8_matvec has the type), then the float one beside it.
            paths = [(name, False)] + [(f"{name} flt", True)] * (WEIGHT_TYPES[GGMLType[name]].int8_matvec is not None)
            for label, float_path in paths:
                mats = [quant_matrix(raw, GGMLType[name], cols, float_path) for raw in raws]
                best = best_seconds_per_thread_count(lambda m: m.matvec(x), mats, threads)
                gbs = {t: mats[0].nbytes / best[t] / 1e9 for t in threads}
                print(f"  {label:10s}" + "".join(
                    f" | {t} thr {best[t] * 1e3:7.3f} ms {gbs[t]:5.1f} GB/s {base[t] / best[t]:5.2f}x"
                    for t in threads))


def bench_matmul(types: list[str], threads: list[int], rows: int, cols: int, tokens: int = 256) -> None:
    flops = 2 * rows * cols * tokens
    print(f"\nmatmul {rows}x{cols} by T={tokens}: ms, GFLOP/s, speed-up over numpy f32 sgemm")
    base = {t: numpy_f32_seconds(rows, cols, t, tokens) for t in threads}
    print(f"  {'f32 numpy':10s}" + "".join(
        f" | {t} thr {base[t] * 1e3:7.2f} ms {flops / base[t] / 1e9:6.1f} GFLOP/s  1.00x" for t in threads))
    x = np.random.default_rng(1).standard_normal((tokens, cols), dtype=np.float32)
    for name in types:
        if not fits(name, cols):
            continue
        matrix = QuantMatrix(quantized(GGMLType[name], rows, cols), GGMLType[name], cols)
        best = best_seconds_per_thread_count(matrix.matmul, [x], threads)
        print(f"  {name:10s}" + "".join(
            f" | {t} thr {best[t] * 1e3:7.2f} ms {flops / best[t] / 1e9:6.1f} GFLOP/s {base[t] / best[t]:5.2f}x"
            for t in threads))


def best_seconds_alternating(fns: dict, inputs: list, threads: list[int]) -> dict[tuple[str, int], float]:
    """best_seconds of each fn at each thread count, all of them taking turns round by round."""
    for fn in fns.values():
        fn(inputs[0])
    best = {(name, t): float("inf") for name in fns for t in threads}
    for _ in range(ROUNDS):
        for t in threads:
            jit.set_threads(t)
            jit.apply_threads()  # the raw kernels called here do not apply it themselves
            for name, fn in fns.items():
                best[name, t] = min(best[name, t], sweep_seconds(fn, inputs))
    return best


def bench_batch(shapes: list[tuple[int, int]], types: list[str], threads: list[int],
                ns: tuple[int, ...] = (1, 2, 4, 8, 16)) -> None:
    """The batched int8 product (int8_batch.py) of n rows against n int8 matvecs of
    the same rows, weights from DRAM: the time ratio (below 1: the batch is faster)."""
    print("\nbatched int8 product of n rows / n int8 matvecs, same weights and rows (time ratio; ms of the batch)")
    for rows, cols in shapes:
        print(f"\n{rows}x{cols}")
        for name in types:
            row = WEIGHT_TYPES[GGMLType[name]]
            if not fits(name, cols):
                continue
            if row.int8_matmul is None or not row.decode_matvec()[1]:
                print(f"  {name:10s} | no int8 kernels on this machine or for this type")
                continue
            raws = cold_copies(quantized(GGMLType[name], rows, cols), BATCH_STREAM_BYTES)
            for raw in raws:
                raw.flags.writeable = False  # the signature file maps give
            views = [row.views(raw) for raw in raws]
            cells = {t: [] for t in threads}
            for n in ns:
                x = np.random.default_rng(n).standard_normal((n, cols), dtype=np.float32)
                out = np.empty((n, rows), np.float32)
                one = np.empty(rows, np.float32)

                def batched(v):
                    row.int8_matmul(*v, x, out)

                def matvecs(v):
                    for i in range(n):
                        row.int8_matvec(*v, x[i], one)

                best = best_seconds_alternating({"batched": batched, "matvecs": matvecs}, views, threads)
                for t in threads:
                    ratio = best["batched", t] / best["matvecs", t]
                    cells[t].append(f"n={n} {ratio:4.2f} ({best['batched', t] * 1e3:6.2f})")
            print(f"  {name:10s}" + "".join(f" | {t} thr " + " ".join(cells[t]) for t in threads))


def random_aqlm(rows: int, cols: int, seed: int) -> AqlmMatrix:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (cols // aqlm.IN_GROUP_SIZE, aqlm.NUM_CODEBOOKS, rows), dtype=np.uint8)
    codes.flags.writeable = False
    codebooks = rng.standard_normal((aqlm.NUM_CODEBOOKS, aqlm.CODEBOOK_SIZE, aqlm.IN_GROUP_SIZE), np.float32)
    return AqlmMatrix(codes, codebooks, (0.5 + rng.random(rows)).astype(np.float32))


def bench_aqlm(shapes: list[tuple[int, int]], threads: list[int]) -> None:
    """AQLM 2x8's matvec, through byte tables (where the CPU has VBMI) and float
    tables, against the Q4_0 int8 matvec of the same shape (it reads ~2.25x the
    bytes), weights from DRAM, all taking turns: ms, and the time ratio to Q4_0."""
    print("\nAQLM 2x8 matvec against the Q4_0 int8 matvec of the same shape (ms; x Q4_0's time)")
    for rows, cols in shapes:
        quants = [quant_matrix(raw, GGMLType.Q4_0, cols, float_path=False)
                  for raw in cold_copies(quantized(GGMLType.Q4_0, rows, cols), STREAM_BYTES)]
        copies = max(2, -(-STREAM_BYTES // (rows * cols // 4)))  # AQLM: 2 bits a weight
        x = np.random.default_rng(0).standard_normal(cols, dtype=np.float32)
        inputs = {"q4_0": quants}
        with mock.patch.dict(os.environ, {FLOAT_SWITCH: "1"}):
            inputs["float tables"] = [random_aqlm(rows, cols, seed) for seed in range(copies)]
        if aqlm_lookup.AVAILABLE:  # the same codes, through the byte tables
            inputs["byte tables"] = [AqlmMatrix(m._codes, m._codebooks, m._scales) for m in inputs["float tables"]]
        matvec = lambda m: m.matvec(x)  # noqa: E731
        for t in threads:  # every kernel compiled (or loaded) first
            jit.set_threads(t)
            for matrices in inputs.values():
                matvec(matrices[0])
        best = {}
        for _ in range(ROUNDS):
            for t in threads:
                jit.set_threads(t)
                for name, matrices in inputs.items():
                    best[name, t] = min(best.get((name, t), float("inf")), sweep_seconds(matvec, matrices))
        for name in inputs:
            print(f"  {rows}x{cols} {name:12s}" + "".join(
                f" | {t} thr {best[name, t] * 1e3:7.3f} ms {best[name, t] / best['q4_0', t]:5.2f}x" for t in threads))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,49152x576", help="comma-separated ROWSxCOLS")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated GGML types")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--matmul", default="1536x1024", help="ROWSxCOLS of the matmul table")
    parser.add_argument("--no-matmul", action="store_true", help="skip the matmul table")
    parser.add_argument("--batch", action="store_true",
                        help="only the batched int8 product against n matvecs (default shapes 4096x4096,14336x4096,"
                             " types Q4_0,Q4_K,Q6_K,Q8_0 unless given)")
    parser.add_argument("--aqlm", action="store_true",
                        help="only AQLM 2x8 against Q4_0 (default shapes 4096x4096,14336x4096,4096x14336)")
    parser.add_argument("--numpy-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.numpy_child:
        numpy_f32_child(*(int(v) for v in args.numpy_child.split("x")))
        return
    types = args.types.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    if args.aqlm:
        shapes = args.shapes if args.shapes != parser.get_default("shapes") else "4096x4096,14336x4096,4096x14336"
        bench_aqlm(parse_shapes(shapes), threads)
        return
    if args.batch:
        shapes = args.shapes if args.shapes != parser.get_default("shapes") else "4096x4096,14336x4096"
        types = types if args.types != parser.get_default("types") else ["Q4_0", "Q4_K", "Q6_K", "Q8_0"]
        bench_batch(parse_shapes(shapes), types, threads)
        return
    bench_matvec(parse_shapes(args.shapes), types, threads)
    if not args.no_matmul:
        bench_matmul(types, threads, *parse_shapes(args.matmul)[0])


if __name__ == "__main__":
    main()

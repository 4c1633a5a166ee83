"""AQLM 2x8: the kernels against dequantize-then-multiply in float64 (numba and
numpy paths), the quantizer on a tiny model end to end (Model.forward against an
independent float64 forward pass, and `llamazip run`), and its error on real
SmolLM2 layers against 2-bit round-to-nearest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from llamazip.builder import aqlm_quantize as quant
from llamazip.builder.calibration_data import pydoc_text, text_sequences
from llamazip.runtime import aqlm, aqlm_lookup, jit
from llamazip.runtime.aqlm import AqlmMatrix
from llamazip.runtime.weight_types import dequantize as ggml_dequantize
from llamazip.runtime.gguf import GGUFError, GGUFFile
from llamazip.runtime.weight_types import FLOAT_SWITCH
from llamazip.runtime.model import Model
from tiny_models import TinyLlama


def random_matrix(rows: int, cols: int, seed: int = 0) -> AqlmMatrix:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (cols // 8, 2, rows), dtype=np.uint8)
    codebooks = rng.standard_normal((2, 256, 8)).astype(np.float32)
    scales = (0.5 + rng.random(rows)).astype(np.float32)
    return AqlmMatrix(codes, codebooks, scales)


def dense(m: AqlmMatrix) -> np.ndarray:
    """The matrix in float64, written from the format's definition with explicit loops over groups."""
    codes, codebooks, scales = m._codes, m._codebooks.astype(np.float64), m._scales.astype(np.float64)
    rows, cols = m.shape
    w = np.empty((rows, cols))
    for g in range(cols // 8):
        w[:, 8 * g:8 * g + 8] = codebooks[0][codes[g, 0]] + codebooks[1][codes[g, 1]]
    return w * scales[:, None]


@pytest.fixture(params=["numba", "numpy"])
def path(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(jit, "numba", None)
    elif not jit.numba_enabled():
        pytest.skip("numba is not available")
    monkeypatch.setenv(FLOAT_SWITCH, "1")  # float tables: exact (the byte tables have their own test)
    return request.param


SHAPES = [(1, 8), (3, 24), (37, 200), (130, 576), (2500, 216)]  # the last runs the parallel kernel


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_matvec_and_matmul_match_dequantized(path, rows, cols):
    m = random_matrix(rows, cols, seed=rows)
    w = dense(m)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(cols).astype(np.float32)
    tol = 1e-5 * np.sqrt(cols) * np.abs(w).max()
    np.testing.assert_allclose(m.matvec(x), w @ x, rtol=0, atol=tol)
    for n in (2, 5, 8):  # padded to 4 and not
        xs = rng.standard_normal((n, cols)).astype(np.float32)
        out = m.matmul(xs)
        assert out.shape == (n, rows) and out.dtype == np.float32
        np.testing.assert_allclose(out, xs @ w.T, rtol=0, atol=tol)
    np.testing.assert_allclose(m.matmul(x[None, :]), (w @ x)[None, :], rtol=0, atol=tol)
    ids = np.array([rows - 1, 0, rows // 2])
    np.testing.assert_allclose(m.rows(ids), w[ids], rtol=1e-6, atol=1e-6)


def rounded_table_matvec(m: AqlmMatrix, x: np.ndarray) -> np.ndarray:
    """W @ x as the byte-table kernel defines it, in numpy: each block of
    GROUPS_PER_SCALE groups has a step, its largest |entry| / 127; each group's
    tables are rounded (half up) to that step / 2^e, with e the largest in
    0..MAX_SHIFT that keeps them within 127 steps; the lookups summed exactly,
    then scaled."""
    codes, codebooks, scales = m._codes, m._codebooks, m._scales
    n_groups = codes.shape[0]
    table = np.einsum("gj,ckj->gck", x.reshape(n_groups, 8).astype(np.float64), codebooks.astype(np.float64))
    out = np.zeros(codes.shape[2])
    for g0 in range(0, n_groups, aqlm_lookup.GROUPS_PER_SCALE):
        block = table[g0:g0 + aqlm_lookup.GROUPS_PER_SCALE]
        largest = np.abs(block).max()
        for i, group in enumerate(block):
            e = 0
            while e < aqlm_lookup.MAX_SHIFT and np.abs(group).max() * 2 ** (e + 1) <= largest:
                e += 1
            step = largest / 127 / 2 ** e
            rounded = np.floor(group / step + 0.5)
            c = codes[g0 + i]
            out += step * (rounded[0, c[0]] + rounded[1, c[1]])
    return out * scales


@pytest.mark.skipif(not aqlm_lookup.AVAILABLE, reason="the CPU has no AVX-512 VBMI")
@pytest.mark.parametrize("rows,cols", [(64, 128), (200, 72), (4096, 1024), (150, 4096)])
def test_byte_table_matvec_matches_its_definition_and_the_float_product(rows, cols):
    m = random_matrix(rows, cols, seed=cols)
    assert m._byte_tables
    x = np.random.default_rng(2).standard_normal(cols).astype(np.float32)
    got = m.matvec(x)
    want = rounded_table_matvec(m, x)
    # float32 tables before rounding: a handful of entries may round the other way
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    exact = dense(m) @ x
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 2e-2


@pytest.mark.skipif(not aqlm_lookup.AVAILABLE, reason="the CPU has no AVX-512 VBMI")
@pytest.mark.parametrize("rows,cols", [(200, 72), (1100, 2048), (4096, 1024)])
def test_byte_table_rows_are_the_same_alone_in_a_batch_and_on_any_thread_count(rows, cols):
    """A sequence's result must not depend on who else is decoded with it, nor on
    the thread count (the thread tuner changes it between tokens)."""
    m = random_matrix(rows, cols, seed=cols)
    xs = np.random.default_rng(3).standard_normal((5, cols)).astype(np.float32)
    threads = jit.num_threads()
    try:
        results = []
        for t in sorted({1, 2, threads}):
            jit.set_threads(t)
            results.append(np.stack([m.matvec(x) for x in xs]))
            results.append(m.matmul(xs))
            results.append(m.matmul(xs[1:3]))
    finally:
        jit.set_threads(threads)
    for row_slices in (3, 5):  # as on machines with 5-10 threads
        out = np.empty((len(xs), rows), np.float32)
        aqlm_lookup.products_parallel(m._codes, m._cb_t, m._scales, xs, row_slices, out)
        results.append(out)
    alone = results[0]
    for got in results:
        np.testing.assert_array_equal(got, alone[1:3] if len(got) == 2 else alone)
    want = np.stack([rounded_table_matvec(m, x) for x in xs])
    np.testing.assert_allclose(alone, want, rtol=0, atol=2e-3 * np.abs(want).max())


FRESH_PROCESS_SCRIPT = """
import hashlib, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_aqlm import dense, random_matrix
from llamazip.runtime import aqlm_lookup
digest = hashlib.sha256()
for rows, cols in [(200, 72), (1100, 2048)]:  # the serial and the parallel kernel
    m = random_matrix(rows, cols, seed=cols)
    xs = np.random.default_rng(3).standard_normal((3, cols)).astype(np.float32)
    got = np.stack([m.matvec(x) for x in xs] + list(m.matmul(xs[:2])))
    exact = xs @ dense(m).T
    assert np.linalg.norm(got[:3] - exact) / np.linalg.norm(exact) < 2e-2
    digest.update(got.tobytes())
print(aqlm_lookup.AVAILABLE, digest.hexdigest())
"""


def run_in_fresh_process(env: dict) -> list[str]:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, tests_dir], env=env, cwd=tests_dir,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.parametrize("float_tables", [False, True])
def test_just_compiled_and_cached_kernels_give_the_same_bits(tmp_path, float_tables):
    """A run whose kernels numba has just compiled answers as one that loads them
    from its cache (fast-math reassociation once made them round differently)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop(FLOAT_SWITCH, None)
    if float_tables:
        env[FLOAT_SWITCH] = "1"
    compiled = run_in_fresh_process(env)
    assert any(tmp_path.rglob("*.nbc"))
    assert run_in_fresh_process(env) == compiled


def test_float_tables_on_a_cpu_without_vbmi(tmp_path):
    """Compiled for Haswell (AVX2, no AVX-512): the float-table kernel, never the VBMI one
    (LLVM would abort the process compiling it)."""
    from test_kernels import HASWELL_FEATURES
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES,
               NUMBA_CACHE_DIR=str(tmp_path))
    env.pop(FLOAT_SWITCH, None)
    assert run_in_fresh_process(env)[0] == "False"


def test_interface_and_bad_input():
    m = random_matrix(16, 40)
    assert m.shape == (16, 40)
    assert m.nbytes == 5 * 2 * 16 + 2 * 256 * 8 * 4 + 16 * 4  # codes, codebooks, scales
    with pytest.raises(ValueError, match="ncols = 40"):
        m.matvec(np.zeros(41, np.float32))
    with pytest.raises(ValueError, match="ncols = 40"):
        m.matmul(np.zeros((3, 8), np.float32))
    with pytest.raises(IndexError):
        m.rows(np.array([16]))
    with pytest.raises(ValueError, match="codebooks"):
        AqlmMatrix(np.zeros((5, 2, 16), np.uint8), np.zeros((2, 16, 8), np.float32), np.ones(16, np.float32))
    with pytest.raises(ValueError, match="scales"):
        AqlmMatrix(np.zeros((5, 2, 16), np.uint8), np.zeros((2, 256, 8), np.float32), np.ones(15, np.float32))


def test_numpy_path_in_a_fresh_process_never_imports_numba():
    code = ("import sys, numpy as np; from llamazip.runtime import aqlm; "
            "m = aqlm.AqlmMatrix(np.zeros((2, 2, 3), np.uint8), np.ones((2, 256, 8), np.float32), "
            "np.ones(3, np.float32)); print(m.matvec(np.ones(16, np.float32)).tolist(), 'numba' in sys.modules)")
    env = dict(os.environ, LLAMAZIP_NO_NUMBA="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["[32.0,", "32.0,", "32.0]", "False"]


# ---------------------------------------------------------------------------
# Quantizer, tiny model
# ---------------------------------------------------------------------------

def in_child(code: str, *args) -> str:
    """Run `code` in a fresh Python with single-threaded BLAS, as the llamazip command
    runs (llamazip/main.py): the quantizer's many small products crawl when OpenBLAS
    threads spin against other work on a busy machine. Returns its stdout."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, check=True,
                          capture_output=True, text=True).stdout


def quantize(src, dst, calibration_text: str | None, seed: int, calibrate: bool = True) -> None:
    in_child("import sys; from pathlib import Path; from llamazip.builder.aqlm_quantize import quantize_gguf_aqlm; "
             "quantize_gguf_aqlm(Path(sys.argv[1]), Path(sys.argv[2]), calibration_text=sys.argv[3] or None, "
             "seed=int(sys.argv[4]), calibrate=sys.argv[5] == 'yes')", src, dst, calibration_text or "", seed,
             "yes" if calibrate else "no")


CALIBRATION = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("aqlm")
    model = TinyLlama(seed=5, n_ff=128)
    src = model.write(d / "tiny.gguf")
    dst = d / "tiny-aqlm.gguf"
    quantize(src, dst, CALIBRATION, seed=3)
    return model, src, dst


def test_quantized_file_layout(tiny):
    _, _, dst = tiny
    g = GGUFFile(dst)
    for key, value in aqlm.METADATA.items():
        assert g.get(key) == value
    assert "blk.0.attn_q.weight" not in g.tensors
    assert g.tensors["blk.0.ffn_down.codes"].shape == (128 // 8, 2, 64)
    assert g.tensors["blk.0.ffn_down.codebooks"].shape == (2, 256, 8)
    assert g.tensors["blk.0.ffn_down.scales"].shape == (64,)
    assert g.tensors["token_embd.weight"].ggml_type.name == "Q8_0"  # the float embedding at 8 bits
    assert g.get("tokenizer.ggml.tokens") == GGUFFile(tiny[1]).get("tokenizer.ggml.tokens")


def test_quantized_model_matches_a_float64_forward_of_its_weights(tiny):
    _, _, dst = tiny
    g = GGUFFile(dst)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FLOAT_SWITCH, "1")  # the other matrices in float: this test is about the AQLM ones
        loaded = Model(g)
    assert isinstance(loaded.layers[1].w_down, AqlmMatrix)
    # The reference forward pass with the weights the file holds, dequantized independently.
    ref = TinyLlama(seed=5, n_ff=128)
    for name in list(ref.tensors):
        if quant.LINEAR.fullmatch(name):
            ref.tensors[name] = dense(AqlmMatrix.from_gguf(g, name, *ref.tensors[name].shape)).astype(np.float32)
    embd = g.tensors["token_embd.weight"]
    ref.tensors["token_embd.weight"] = ggml_dequantize(g.tensor_data("token_embd.weight"), embd.ggml_type, embd.shape[1])
    tokens = [256, 72, 101, 108, 108, 111, 33]
    want = ref.reference_logits(tokens)
    np.testing.assert_allclose(loaded.forward(np.array(tokens), 0), want[-1], rtol=0, atol=2e-3 * np.abs(want).max())
    # Decoding one token at a time (matvec) agrees with the prompt pass (matmul).
    loaded.forward(np.array(tokens[:4]), 0)
    for pos in range(4, len(tokens)):
        last = loaded.forward(np.array(tokens[pos:pos + 1]), pos)
    np.testing.assert_allclose(last, want[-1], rtol=0, atol=2e-3 * np.abs(want).max())
    # And the 2-bit model stays close to the original.
    original = Model(GGUFFile(tiny[1])).forward(np.array(tokens), 0)
    assert np.corrcoef(original, want[-1])[0, 1] > 0.9


@pytest.mark.parametrize("float_tables", [False, True])
def test_batched_decode_step_equals_each_sequence_alone(tiny, monkeypatch, float_tables):
    """Several sequences decoded in one step (parallel slots) get, bit for bit, the
    logits each gets alone: a user's text does not depend on who else is served."""
    if float_tables:
        monkeypatch.setenv(FLOAT_SWITCH, "1")
    prompts = [[256, 72, 101, 108], [256, 87, 111, 114, 108, 100, 33], [256, 66]]
    batch = Model(GGUFFile(tiny[2]), n_ctx=16, n_slots=3)
    alone = []
    for slot, prompt in enumerate(prompts):
        batch.forward(np.array(prompt), 0, slot=slot)
        model = Model(GGUFFile(tiny[2]), n_ctx=16)
        model.forward(np.array(prompt), 0)
        alone.append(model.forward(np.array([44]), len(prompt)))
    batched = batch.forward_batch([44] * 3, [len(p) for p in prompts], [0, 1, 2])
    np.testing.assert_array_equal(batched, np.stack(alone))


def test_llamazip_run_on_the_quantized_model(tiny):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "llamazip", "run", "-m", str(tiny[2]), "-p", "Hello",
                             "-n", "4", "--temp", "0"], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_same_seed_same_file_and_seed_matters(tiny, tmp_path):
    _, src, dst = tiny
    again = tmp_path / "again.gguf"
    quantize(src, again, CALIBRATION, seed=3)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(again) == digest(dst)
    quantize(src, again, CALIBRATION, seed=4)
    assert digest(again) != digest(dst)
    quantize(src, again, None, seed=3, calibrate=False)  # plain weight error
    assert digest(again) != digest(dst)
    quantize(src, again, None, seed=3)  # the default mix: prose, code, the model's own text
    assert digest(again) != digest(dst)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file


def test_bad_inputs(tmp_path, tiny):
    with pytest.raises(quant.QuantizeError, match="no such file"):
        quant.quantize_gguf_aqlm(tmp_path / "missing.gguf", tmp_path / "out.gguf", calibration_text=None, seed=0)
    with pytest.raises(quant.QuantizeError, match="empty"):
        quant.quantize_gguf_aqlm(tiny[1], tmp_path / "out.gguf", calibration_text=" ", seed=0)
    assert not (tmp_path / "out.gguf").exists()


def test_loader_refuses_aqlm_tensors_without_metadata(tmp_path):
    import gguf

    model = TinyLlama(seed=1)
    m = random_matrix(64, 64)
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.codes", m._codes.view(np.int8))
    w.add_tensor("blk.0.attn_q.codebooks", m._codebooks)
    w.add_tensor("blk.0.attn_q.scales", m._scales)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="aqlm.in_group_size"):
        AqlmMatrix.from_gguf(GGUFFile(tmp_path / "x.gguf"), "blk.0.attn_q.weight", 64, model.dim)


# ---------------------------------------------------------------------------
# Quality on real layers
# ---------------------------------------------------------------------------

LAYER_ERRORS = """
import json, sys
import numpy as np
from llamazip.builder import aqlm_quantize as quant
from llamazip.builder.calibration_data import pydoc_text, text_sequences
from llamazip.runtime import aqlm
from llamazip.runtime.weight_types import dequantize
from llamazip.runtime.gguf import GGUFFile
g = GGUFFile(sys.argv[1])
text = pydoc_text()
# Fit on one stretch of text, judge on another (held out).
fit = quant.grams_of(g, text_sequences(g, text, 640))
held_out = quant.grams_of(g, text_sequences(g, text[len(text) // 2:], 256))
errors = {}
for name in sys.argv[2:]:
    info = g.tensors[name]
    w = dequantize(g.tensor_data(name), info.ggml_type, info.shape[1])
    w_aqlm = aqlm.dequantize(*quant.quantize_matrix(w, fit[name], np.random.default_rng(0)))
    errors[name] = [quant.output_error(w, w_aqlm, held_out[name]), quant.output_error(w, quant.rtn2(w, 8), held_out[name])]
print(json.dumps(errors))
"""


@pytest.mark.model
def test_aqlm_beats_2bit_round_to_nearest_on_smollm2_layers(smollm2_path):
    errors = json.loads(in_child(LAYER_ERRORS, smollm2_path, "blk.2.attn_k.weight", "blk.20.attn_v.weight"))
    for name, (err_aqlm, err_rtn) in errors.items():
        assert err_aqlm < 0.6 * err_rtn, (name, err_aqlm, err_rtn)


def test_code_search_numba_and_numpy_agree():
    rng = np.random.default_rng(3)
    t = rng.standard_normal((300, 8)).astype(np.float32)
    cb = rng.standard_normal((2, 256, 8)).astype(np.float32)
    c0, c1 = quant._beam_codes(t, cb)  # numpy
    n0, n1 = quant._codes_for(t, cb)  # the numba kernel when numba is there
    # Same search; float rounding may break a near-tie the other way in a rare row.
    assert np.mean((c0 == n0) & (c1 == n1)) > 0.98
    err = ((t - cb[0][c0] - cb[1][c1]) ** 2).sum(1).mean()
    assert ((t - cb[0][n0] - cb[1][n1]) ** 2).sum(1).mean() == pytest.approx(err, rel=1e-3)
    # The pair found is much closer than a random pair.
    assert err < 0.5 * ((t - cb[0][c0[::-1]] - cb[1][c1[::-1]]) ** 2).sum(1).mean()

"""AQLM's fine-tuning after quantization (builder/aqlm_finetune.py) and its
sequential calibration, on tiny models: the torch forward pass equals the
runtime's, fine-tuning lowers the KL divergence to the original (measured by
the runtime, not by the torch code that minimised it), the tuned file equals
its own dequantized weights through the decode and prompt kernels, keeps its
codes and size, and the same seed gives the same bytes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from llamazip import builder
from llamazip.builder import aqlm_quantize as quant
from llamazip.builder.calibration_data import text_sequences
from llamazip.builder import aqlm_finetune as finetune
from llamazip.builder.aqlm_finetune import TorchModel
from llamazip.runtime import aqlm
from llamazip.runtime.aqlm import AqlmMatrix
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from llamazip.runtime.weight_types import FLOAT_SWITCH
from llamazip.runtime.weight_types import dequantize as ggml_dequantize
from tiny_models import TinyGemma3, TinyLlama, TinyQwen2

# Byte-level vocabulary: one token per character, 3 sequences of the tiny models' 256 positions.
CALIBRATION = ("A lighthouse keeper trims the wick at dusk; the harbour wall is crooked, "
               "and the boats come home on the evening tide. ") * 6
STEPS = 18  # each sequence 6 times


def in_child(code: str, *args) -> str:
    """Run `code` in a fresh Python with single-threaded BLAS, as the llamazip command runs."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, check=True,
                          capture_output=True, text=True).stdout


def quantize(src, dst, seed: int, steps: int, sequential: bool = False) -> None:
    in_child("import sys; from pathlib import Path; from llamazip.builder.aqlm_quantize import quantize_gguf_aqlm; "
             "quantize_gguf_aqlm(Path(sys.argv[1]), Path(sys.argv[2]), calibration_text=sys.argv[3], "
             "seed=int(sys.argv[4]), finetune_steps=int(sys.argv[5]), sequential=sys.argv[6] == 'yes')",
             src, dst, CALIBRATION, seed, steps, "yes" if sequential else "no")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source model, its file, quantized file, quantized and fine-tuned file)."""
    d = tmp_path_factory.mktemp("aqlm_finetune")
    model = TinyLlama(seed=5, n_ff=128)
    src = model.write(d / "tiny.gguf")
    plain, tuned = d / "plain.gguf", d / "tuned.gguf"
    quantize(src, plain, seed=3, steps=0)
    quantize(src, tuned, seed=3, steps=STEPS)
    return model, src, plain, tuned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [TinyLlama, TinyQwen2, TinyGemma3])
def test_torch_forward_equals_the_runtime(cls, dtype, tmp_path, monkeypatch):
    """Equal in float32 products; within bfloat16's rounding of the products' inputs."""
    monkeypatch.setattr(finetune, "MATMUL_DTYPE", dtype)
    model = Model(GGUFFile(cls(seed=1).write(tmp_path / "m.gguf")), n_ctx=64)
    tokens = np.array([256, *range(60, 110)])
    want = model.forward(tokens, 0, logits_from=0)
    torch_model = TorchModel(model, None)
    with torch.no_grad():
        got = torch_model(torch_model.embed(tokens)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=(1e-5 if dtype == torch.float32 else 3e-2) * np.abs(want).max())


def _random_parts(rng, out: int = 24, inp: int = 40):
    return (rng.integers(0, 256, (inp // 8, 2, out), dtype=np.uint8),
            rng.standard_normal((2, 256, 8)).astype(np.float32), rng.random(out).astype(np.float32) + 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aqlm_product_gradients_equal_autograd_through_torch_gathers(dtype, monkeypatch):
    """The product that rebuilds W in its backward pass (to keep memory flat), with
    aqlm_gradients' kernels, must give the gradients torch's autograd gives through
    W built by gathers: equal in float32, within bfloat16's rounding in bfloat16."""
    monkeypatch.setattr(finetune, "MATMUL_DTYPE", dtype)
    rng = np.random.default_rng(0)
    parts = _random_parts(rng)
    x = torch.from_numpy(rng.standard_normal((7, 40)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((7, 24)).astype(np.float32))

    def gathered(m, x):
        codes = m.codes.long()  # (groups, 2, out)
        w = (m.codebooks[0][codes[:, 0].T] + m.codebooks[1][codes[:, 1].T]).reshape(24, -1) * m.scales[:, None]
        return x @ w.T

    grads = []
    for product in (lambda m, x: m(x), gathered):
        m = finetune.AqlmLinear(parts)
        xi = x.clone().requires_grad_()
        (product(m, xi) * g).sum().backward()
        grads.append((xi.grad, m.codebooks.grad, m.scales.grad))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for mine, autograd in zip(*grads):
        torch.testing.assert_close(mine, autograd, rtol=tol, atol=tol * float(autograd.abs().max()))


def test_gradient_kernels_equal_their_numpy_form(monkeypatch):
    """aqlm_gradients' numba kernels against the numpy form fine-tuning takes without numba."""
    from llamazip.builder import aqlm_gradients

    rng = np.random.default_rng(1)
    codes, codebooks, scales = _random_parts(rng, out=37, inp=64)
    grad_w = rng.standard_normal((37, 64)).astype(np.float32)
    fast = aqlm_gradients.weight(codes, codebooks, scales), *aqlm_gradients.gradients(codes, codebooks, scales, grad_w)
    monkeypatch.setattr(aqlm_gradients, "numba_enabled", lambda: False)
    slow = aqlm_gradients.weight(codes, codebooks, scales), *aqlm_gradients.gradients(codes, codebooks, scales, grad_w)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def _kl(original: GGUFFile, quantized: GGUFFile, text: str) -> float:
    """Mean KL(original || quantized) of the next-token distributions over the text's
    positions, both models run by the runtime."""
    sequences = text_sequences(original, text, 8192)
    a, b = Model(original, n_ctx=256), Model(quantized, n_ctx=256)
    total, count = 0.0, 0
    for tokens in sequences:
        p = _log_softmax(a.forward(tokens, 0, logits_from=0))
        q = _log_softmax(b.forward(tokens, 0, logits_from=0))
        total += float((np.exp(p) * (p - q)).sum())
        count += len(tokens)
    return total / count


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_finetuning_lowers_the_kl_to_the_original(tiny):
    _, src, plain, tuned = tiny
    before = _kl(GGUFFile(src), GGUFFile(plain), CALIBRATION)
    after = _kl(GGUFFile(src), GGUFFile(tuned), CALIBRATION)
    assert after < 0.9 * before, (before, after)


def test_tuned_file_keeps_codes_and_size_and_changes_the_continuous_parts(tiny):
    _, _, plain, tuned = tiny
    a, b = GGUFFile(plain), GGUFFile(tuned)
    assert plain.stat().st_size == tuned.stat().st_size
    assert set(a.tensors) == set(b.tensors)
    for name in ("blk.0.attn_q", "blk.1.ffn_down"):
        np.testing.assert_array_equal(a.tensor_data(f"{name}.codes"), b.tensor_data(f"{name}.codes"))
        assert not np.array_equal(a.tensor_data(f"{name}.codebooks"), b.tensor_data(f"{name}.codebooks"))
        assert not np.array_equal(a.tensor_data(f"{name}.scales"), b.tensor_data(f"{name}.scales"))
    assert not np.array_equal(a.tensor_data("blk.0.attn_norm.weight"), b.tensor_data("blk.0.attn_norm.weight"))


def test_tuned_file_equals_its_dequantized_weights_through_both_kernels(tiny, monkeypatch):
    _, _, _, tuned = tiny
    g = GGUFFile(tuned)
    monkeypatch.setenv(FLOAT_SWITCH, "1")  # the embedding in float: this test is about the tuned parts
    loaded = Model(g)
    assert isinstance(loaded.layers[1].w_down, AqlmMatrix)
    # An independent float64 forward pass over the weights the file holds.
    ref = TinyLlama(seed=5, n_ff=128)
    for name, value in list(ref.tensors.items()):
        if quant.LINEAR.fullmatch(name):
            m = AqlmMatrix.from_gguf(g, name, *value.shape)
            ref.tensors[name] = aqlm.dequantize(m._codes, m._codebooks, m._scales)
        elif value.ndim == 1:
            ref.tensors[name] = g.tensor_data(name).view(np.float32).ravel().copy()  # the tuned norms
    embd = g.tensors["token_embd.weight"]
    ref.tensors["token_embd.weight"] = ggml_dequantize(g.tensor_data("token_embd.weight"), embd.ggml_type, embd.shape[1])
    tokens = [256, 65, 32, 108, 105, 103, 104, 116]
    want = ref.reference_logits(tokens)[-1]
    tol = 2e-3 * np.abs(want).max()
    np.testing.assert_allclose(loaded.forward(np.array(tokens), 0), want, rtol=0, atol=tol)  # prompt: matmul
    loaded.forward(np.array(tokens[:4]), 0)
    for pos in range(4, len(tokens)):  # decode: matvec, one token at a time
        last = loaded.forward(np.array(tokens[pos:pos + 1]), pos)
    np.testing.assert_allclose(last, want, rtol=0, atol=tol)


def test_same_seed_same_bytes(tiny, tmp_path):
    _, src, _, tuned = tiny
    again = tmp_path / "again.gguf"
    quantize(src, again, seed=3, steps=STEPS)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(again) == digest(tuned)


def test_missing_torch_is_one_clear_error_before_quantizing(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    monkeypatch.delitem(sys.modules, "llamazip.builder.aqlm_finetune", raising=False)
    monkeypatch.delattr(builder, "aqlm_finetune", raising=False)
    with pytest.raises(quant.QuantizeError, match=r"llamazip\[finetune\]"):
        quant.quantize_gguf_aqlm(tiny[1], tmp_path / "out.gguf", calibration_text=CALIBRATION, seed=0,
                                 finetune_steps=1)
    assert not (tmp_path / "out.gguf").exists()


def test_build_refuses_finetune_without_aqlm(tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "llamazip", "build", "-m", str(tiny[1]), "-q", "q8_0",
                             "--finetune", "1", "-o", str(tmp_path / "x.llamazip")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --calibration, --seed and --finetune apply only to --quantize aqlm-2x8"
    assert not (tmp_path / "x.llamazip").exists()


def test_finetune_option_counts_steps_with_a_default():
    import argparse

    from llamazip import bundle_commands

    parser = argparse.ArgumentParser()
    bundle_commands.add_parsers(parser.add_subparsers())
    build = ["build", "-m", "m.gguf", "-q", "aqlm-2x8", "-o", "x.llamazip"]
    assert parser.parse_args(build).finetune == 0
    assert parser.parse_args(build + ["--finetune"]).finetune == bundle_commands.DEFAULT_FINETUNE_STEPS
    assert parser.parse_args([build[0], "--finetune", *build[1:]]).finetune == bundle_commands.DEFAULT_FINETUNE_STEPS
    assert parser.parse_args(build + ["--finetune", "40"]).finetune == 40


def _parts(original: GGUFFile, quantized: GGUFFile) -> dict:
    parts = {}
    for name, info in original.tensors.items():
        if quant.LINEAR.fullmatch(name):
            m = AqlmMatrix.from_gguf(quantized, name, *info.shape)
            parts[name] = (np.array(m._codes), np.array(m._codebooks), np.array(m._scales))
    return parts


@pytest.mark.parametrize("fraction", [finetune.CODE_FRACTION_TRIED, 0.05, 0.9])
def test_code_step_never_raises_the_loss_it_measures(tiny, fraction):
    _, src, plain, _ = tiny
    original = GGUFFile(src)
    model = Model(original, n_ctx=256)
    teacher = finetune.Teacher(model)
    batch = [teacher(tokens) for tokens in text_sequences(original, CALIBRATION, 8192)]
    student = finetune.TorchModel(model, _parts(original, GGUFFile(plain)))
    codes = [m.codes.clone() for m in student.modules() if isinstance(m, finetune.AqlmLinear)]
    before, after = finetune.code_step(student, batch, fraction)
    with torch.no_grad():
        measured = np.mean([float(finetune.kl_divergence(student(x), t)) for x, t in batch])
    assert after <= before
    assert measured == pytest.approx(after, rel=1e-5)  # the codes it kept are the ones it measured
    changed = [not torch.equal(a, m.codes) for a, m in
               zip(codes, (m for m in student.modules() if isinstance(m, finetune.AqlmLinear)))]
    assert any(changed) == (after < before)


def test_sequential_calibration_writes_a_model_as_close_as_the_original_inputs_do(tiny, tmp_path):
    """Each layer fitted to the inputs of the model with its earlier layers quantized:
    same tensors, other codes, and (on the text it was fitted to) a KL to the
    original of the same order as Gram matrices from the original model give."""
    _, src, plain, _ = tiny
    seq = tmp_path / "sequential.gguf"
    quantize(src, seq, seed=3, steps=0, sequential=True)
    assert set(GGUFFile(seq).tensors) == set(GGUFFile(plain).tensors)
    assert seq.read_bytes() != plain.read_bytes()
    kl_seq = _kl(GGUFFile(src), GGUFFile(seq), CALIBRATION)
    kl_plain = _kl(GGUFFile(src), GGUFFile(plain), CALIBRATION)
    assert kl_seq < 2 * kl_plain, (kl_seq, kl_plain)

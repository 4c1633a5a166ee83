"""A checkpoint in the AQLM project's Hugging Face layout, written here, imported
into our GGUF form: every layer must equal its own HF dequantization (with
llama's q/k rows permuted as GGUF wants), and the model must run on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llamazip.builder import aqlm_import
from llamazip.runtime.aqlm import AqlmMatrix
from llamazip.runtime.weight_types import FLOAT_SWITCH
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model
from safetensors.numpy import save_file
from tiny_models import TinyLlama

MODULES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2,
          "hidden_size": 64, "quantization_config": {"quant_method": "aqlm", "in_group_size": 8,
                                                     "out_group_size": 1, "num_codebooks": 2,
                                                     "nbits_per_codebook": 8}}


def hf_dequantize(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The AQLM definition: W[o, 8 g + j] = scales[o] * sum_c codebooks[c, code mod 256, 0, j]."""
    unsigned = codes.astype(np.int64) % 256
    out_dim, n_groups, n_books = codes.shape
    w = np.zeros((out_dim, n_groups, 8))
    for c in range(n_books):
        w += codebooks[c, :, 0, :].astype(np.float64)[unsigned[:, :, c]]
    return w.reshape(out_dim, -1) * scales.reshape(-1, 1).astype(np.float64)


def hf_to_gguf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("aqlm_hf")
    model = TinyLlama(seed=9)
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(model.n_layer):
        for module, gguf_name in MODULES.items():
            out_dim, in_dim = model.tensors[f"blk.{i}.{gguf_name}.weight"].shape
            prefix = f"model.layers.{i}.{module}"
            # int8 storage of 0..255: half the codes are negative, as the AQLM project writes them
            tensors[f"{prefix}.codes"] = rng.integers(-128, 128, (out_dim, in_dim // 8, 2)).astype(np.int8)
            tensors[f"{prefix}.codebooks"] = (0.3 * rng.standard_normal((2, 256, 1, 8))).astype(np.float16)
            tensors[f"{prefix}.scales"] = (0.5 + rng.random((out_dim, 1, 1, 1))).astype(np.float16)
    tensors["model.embed_tokens.weight"] = model.tensors["token_embd.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(CONFIG))
    base = model.write(d / "base.gguf")
    return model, d, base, tensors


def test_import_matches_the_checkpoints_own_dequantization(checkpoint, tmp_path, monkeypatch):
    # The float path: exact (decoding's byte tables and the prompts' weights rounded
    # to int8, int8_gemm.py, have tests of their own).
    monkeypatch.setenv(FLOAT_SWITCH, "1")
    model, folder, base, hf = checkpoint
    tensors, config = aqlm_import.read_checkpoint(folder)
    converted, rest = aqlm_import.convert_checkpoint_tensors(tensors, config)
    assert list(rest) == ["model.embed_tokens.weight"]  # left for the regular converter
    dst = tmp_path / "imported.gguf"
    aqlm_import.write_gguf(base, converted, dst)
    g = GGUFFile(dst)
    assert "blk.0.attn_q.weight" not in g.tensors and "blk.0.attn_q.codes" in g.tensors

    ref = TinyLlama(seed=9)
    for i in range(model.n_layer):
        for module, gguf_name in MODULES.items():
            prefix = f"model.layers.{i}.{module}"
            want = hf_dequantize(hf[f"{prefix}.codes"], hf[f"{prefix}.codebooks"], hf[f"{prefix}.scales"])
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                want = hf_to_gguf_rows(want, 4 if module == "self_attn.q_proj" else 2)
            name = f"blk.{i}.{gguf_name}.weight"
            m = AqlmMatrix.from_gguf(g, name, *want.shape)
            got = m.rows(np.arange(want.shape[0]))
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            ref.tensors[name] = want.astype(np.float32)

    tokens = [256, 10, 20, 30, 40]
    logits = Model(g).forward(np.array(tokens), 0)
    want = ref.reference_logits(tokens)[-1]
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_refuses_other_schemes_and_broken_layers(checkpoint):
    _, _, _, hf = checkpoint
    for key, value in (("quant_method", "gptq"), ("num_codebooks", 1), ("nbits_per_codebook", 16),
                       ("in_group_size", 16), ("out_group_size", 2)):
        config = json.loads(json.dumps(CONFIG))
        config["quantization_config"][key] = value
        with pytest.raises(aqlm_import.AqlmImportError, match=key if key != "quant_method" else "not an AQLM"):
            aqlm_import.convert_checkpoint_tensors(hf, config)
    broken = dict(hf)
    del broken["model.layers.1.mlp.up_proj.scales"]
    with pytest.raises(aqlm_import.AqlmImportError, match="missing model.layers.1.mlp.up_proj.scales"):
        aqlm_import.convert_checkpoint_tensors(broken, CONFIG)
    bad = dict(hf)
    bad["model.layers.0.mlp.up_proj.codebooks"] = np.zeros((1, 65536, 1, 8), np.float16)
    with pytest.raises(aqlm_import.AqlmImportError, match="codebooks"):
        aqlm_import.convert_checkpoint_tensors(bad, CONFIG)


def test_build_takes_a_published_aqlm_checkpoint_folder(tmp_path):
    """`llamazip build -m FOLDER`: a transformers-made llama whose linear layers are
    replaced by AQLM tensors, as the AQLM project saves them, builds into a bundle
    whose layers equal the checkpoint's own dequantization."""
    import subprocess
    import sys

    from hf_tiny import make_checkpoint
    from llamazip.runtime.model_file import open_model
    from safetensors.numpy import load_file

    folder = make_checkpoint(tmp_path / "hf", "llama")
    weights = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = CONFIG["quantization_config"]
    rng = np.random.default_rng(1)
    aqlm_layers = {}
    for name in [n for n in weights if n.endswith("_proj.weight")]:
        out_dim, in_dim = weights.pop(name).shape
        prefix = name[:-len(".weight")]
        aqlm_layers[prefix] = (rng.integers(-128, 128, (out_dim, in_dim // 8, 2)).astype(np.int8),
                               (0.3 * rng.standard_normal((2, 256, 1, 8))).astype(np.float16),
                               (0.5 + rng.random((out_dim, 1, 1, 1))).astype(np.float16))
        for part, array in zip(("codes", "codebooks", "scales"), aqlm_layers[prefix]):
            weights[f"{prefix}.{part}"] = array
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))

    out = tmp_path / "aqlm.llamazip"
    result = subprocess.run([sys.executable, "-m", "llamazip", "build", "-m", str(folder), "-o", str(out),
                             "--no-deps"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    g = open_model(out)
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for prefix, (codes, codebooks, scales) in aqlm_layers.items():
        layer, module = prefix.split(".")[2], ".".join(prefix.split(".")[3:])
        want = hf_dequantize(codes, codebooks, scales)
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            want = hf_to_gguf_rows(want, n_head if module == "self_attn.q_proj" else n_head_kv)
        got = AqlmMatrix.from_gguf(g, f"blk.{layer}.{MODULES[module]}.weight", *want.shape)
        np.testing.assert_allclose(got.rows(np.arange(want.shape[0])), want, rtol=1e-6, atol=1e-6)
    run = subprocess.run([sys.executable, "-m", "llamazip", "run", "-m", str(out), "-p", "hello", "-n", "3",
                          "--temp", "0"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

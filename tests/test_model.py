"""Our forward pass against independent float64 references on tiny random Llama,
Qwen2 and Gemma 3 models."""

import subprocess
import sys

import gguf
import numpy as np
import pytest

from llamazip.runtime import generate as generate_module
from llamazip.runtime import int8_matvec
from llamazip.runtime.generate import process_prompt
from llamazip.runtime.config import ModelConfig
from llamazip.runtime.gguf import GGUFError, GGUFFile
from llamazip.runtime.jit import numba_enabled
from llamazip.runtime.weight_types import FLOAT_SWITCH
from llamazip.runtime.model import Model
from tiny_models import TinyGemma3, TinyLlama, TinyQwen2

Q = gguf.GGMLQuantizationType
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119]  # BOS "Hello, w"


# Decoding rounds each layer's input to int8 (runtime/int8_matvec.py), as
# llama.cpp does: its logits stay within this fraction of the largest.
INT8_TOLERANCE = 2e-2


def _close(ours, reference, tolerance=2e-4):
    # float32 accumulation against float64: compare relative to the logits' scale
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=tolerance * scale)


def _check_prompt_then_decode(tiny: TinyLlama, path) -> None:
    """The prompt pass, then one token at a time, against the float64 reference:
    on the float path (LLAMAZIP_FLOAT_MATVEC=1) exactly, on the default path
    within int8 rounding."""
    tiny.write(path)
    continuation = [101, 114, 108, 100]
    reference = tiny.reference_logits(PROMPT + continuation)
    for tolerance in (2e-4, INT8_TOLERANCE):
        with pytest.MonkeyPatch.context() as patch:
            if tolerance != INT8_TOLERANCE:
                patch.setenv(FLOAT_SWITCH, "1")
            model = Model(GGUFFile(path), n_ctx=32)
        _close(model.forward(np.array(PROMPT), 0), reference[len(PROMPT) - 1], tolerance)
        for i, token in enumerate(continuation):
            pos = len(PROMPT) + i
            _close(model.forward(np.array([token]), pos), reference[pos], tolerance)


@pytest.mark.parametrize("weight_type", [Q.Q8_0, Q.Q4_0])
def test_head_rescores_the_leading_logits_exactly(tmp_path, weight_type):
    """The head's int8 logits, with the leading ones computed again in float32:
    those equal the float path's, the rest lie within int8 rounding."""
    path = TinyLlama(weight_type=weight_type, seed=3, tied=False).write(tmp_path / "tiny.gguf")
    rounded = Model(GGUFFile(path), n_ctx=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FLOAT_SWITCH, "1")
        exact = Model(GGUFFile(path), n_ctx=8)
    assert rounded.output.rounds_input and not exact.output.rounds_input
    rng = np.random.default_rng(0)
    for _ in range(20):
        h = rng.standard_normal(rounded.config.dim).astype(np.float32)
        ours, want = rounded.head.logits(h), exact.head.logits(h)
        leading = want >= want.max() - 0.5  # inside the least margin (1.0), with room for rounding
        np.testing.assert_allclose(ours[leading], want[leading], rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert ours.argmax() == want.argmax()
        _close(ours, want, INT8_TOLERANCE)
        assert not np.array_equal(ours[~leading], want[~leading])  # the rest stayed rounded


def test_head_rescores_at_most_the_limit_of_a_flat_distribution(tmp_path, monkeypatch):
    from llamazip.runtime import weight_matrix

    monkeypatch.setattr(weight_matrix, "RESCORE_LIMIT", 8)
    path = TinyLlama(weight_type=Q.Q8_0, seed=3, tied=False).write(tmp_path / "tiny.gguf")
    rounded = Model(GGUFFile(path), n_ctx=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FLOAT_SWITCH, "1")
        exact = Model(GGUFFile(path), n_ctx=8)
    h = np.random.default_rng(1).standard_normal(rounded.config.dim).astype(np.float32) * 0.01
    ours, want = rounded.head.logits(h), exact.head.logits(h)
    assert want.max() - want.min() < 1.0  # every logit within the least margin
    assert np.sum(ours != rounded.output.matvec(h)) <= 8  # only the 8 largest were computed again
    assert ours.argmax() == want.argmax()
    assert ours.max() == pytest.approx(want.max(), rel=1e-5)


@pytest.mark.parametrize("weight_type", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_prompt_then_decode_matches_reference(tmp_path, weight_type):
    _check_prompt_then_decode(TinyLlama(weight_type=weight_type, seed=int(weight_type)), tmp_path / "tiny.gguf")


# The prompt (9 tokens) and decoding (to 13) both run past Gemma's window of 4.
@pytest.mark.parametrize("architecture", [TinyQwen2, TinyGemma3])
@pytest.mark.parametrize("weight_type", [Q.F32, Q.Q8_0, Q.Q4_0])
def test_other_architectures_match_reference(tmp_path, architecture, weight_type):
    _check_prompt_then_decode(architecture(weight_type=weight_type, seed=int(weight_type)), tmp_path / "tiny.gguf")


def test_qwen2_tied_head_and_grouped_heads(tmp_path):
    tiny = TinyQwen2(tied=True, n_head=8, n_head_kv=2, n_layer=3, seed=5)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    _close(model.forward(np.array(PROMPT), 0), tiny.reference_logits(PROMPT)[-1])


def test_gemma3_local_rope_base_global_scaling_and_softcap(tmp_path):
    # Global layers take the linear RoPE scaling, local ones their own base unscaled.
    tiny = TinyGemma3(rope_base_local=100.0, rope_scale=4.0, softcap=5.0, n_head_kv=2, tied=False, seed=9)
    _check_prompt_then_decode(tiny, tmp_path / "tiny.gguf")


def test_gemma3_prompt_in_chunks_keeps_the_window(tmp_path):
    # Chunks after the first start mid-sequence: their window reaches back into the cache.
    tiny = TinyGemma3(sliding_window=3, seed=11)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    reference = tiny.reference_logits(PROMPT)
    for start in range(0, len(PROMPT), 4):
        chunk = PROMPT[start:start + 4]
        _close(model.forward(np.array(chunk), start), reference[start + len(chunk) - 1])


@pytest.mark.parametrize("pattern, local", [
    (None, [True] * 5 + [False] + [True]),  # llama.cpp's default for Gemma 3: every 6th layer is global
    (3, [True, True, False] * 2 + [True]),
    ([False, True, True, False, True, True, True], [False, True, True, False, True, True, True]),
])
def test_gemma3_sliding_window_layers(tmp_path, pattern, local):
    class Patterned(TinyGemma3):
        def add_hyperparameters(self, w):
            super().add_hyperparameters(w)
            if pattern is not None:
                w.add_sliding_window_pattern(pattern)

    config = ModelConfig.from_gguf(GGUFFile(Patterned(seed=1).write(tmp_path / "tiny.gguf")))
    assert [config.layer_window(i) > 0 for i in range(config.n_layer)] == local


def test_unknown_architecture_is_refused_by_name(tmp_path):
    class TinyMamba(TinyLlama):
        ARCH = "mamba"

    with pytest.raises(GGUFError, match="unsupported architecture 'mamba'"):
        Model(GGUFFile(TinyMamba().write(tmp_path / "tiny.gguf")))


def test_untied_head_and_grouped_heads(tmp_path):
    tiny = TinyLlama(tied=False, n_head=8, n_head_kv=2, dim=64, n_layer=3, seed=7)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    _close(model.forward(np.array(PROMPT), 0), tiny.reference_logits(PROMPT)[-1])


def test_prompt_in_batches_equals_one_pass(tmp_path, monkeypatch):
    tiny = TinyLlama(seed=3)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    whole = process_prompt(model, PROMPT)
    monkeypatch.setattr(generate_module, "PROMPT_BATCH", 4)
    np.testing.assert_allclose(process_prompt(model, PROMPT), whole, rtol=1e-5, atol=1e-5)


def test_rewind_overwrites_the_cache(tmp_path):
    tiny = TinyLlama(seed=4)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    model.forward(np.array(PROMPT), 0)
    first = model.forward(np.array([1]), len(PROMPT))
    model.forward(np.array([2]), len(PROMPT))  # a different token at the same position
    np.testing.assert_allclose(model.forward(np.array([1]), len(PROMPT)), first, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weight_type, float_path", [(Q.Q8_0, False), (Q.Q4_0, True), (Q.F32, False)])
def test_keys_and_values_are_float16_only_where_decoding_rounds_to_int8(tmp_path, weight_type, float_path):
    """The cache holds float16 bits (uint16) where every layer's matvec rounds its
    input to int8; float32 on the float path (LLAMAZIP_FLOAT_MATVEC=1, float weights)."""
    path = TinyLlama(weight_type=weight_type, seed=5).write(tmp_path / "tiny.gguf")
    with pytest.MonkeyPatch.context() as patch:
        if float_path:
            patch.setenv(FLOAT_SWITCH, "1")
        model = Model(GGUFFile(path), n_ctx=32)
    rounds = all(m.rounds_input for layer in model.layers for m in layer.matrices())
    assert rounds == (weight_type != Q.F32 and not float_path and int8_matvec.AVAILABLE and numba_enabled())
    expected = np.uint16 if rounds else np.float32
    assert model.cache_k.dtype == expected and model.cache_v.dtype == expected
    assert all(layer.attention.cache_k.base is not None and layer.attention.cache_k.dtype == expected
               for layer in model.layers)
    model.forward(np.array(PROMPT), 0)
    assert model.cache_v[0, 0, :, :len(PROMPT)].any() and not model.cache_v[0, 0, :, len(PROMPT):].any()


@pytest.mark.parametrize("tiny", [TinyLlama(n_head=8, n_head_kv=2, dim=64, n_layer=2, seed=12),
                                  TinyGemma3(n_head=8, sliding_window=600, seed=13)], ids=["llama", "gemma3"])
def test_decoding_after_a_long_prompt_equals_the_prompt_path(tmp_path, tiny):
    # Past ~4096 (head, key) pairs a decoded token's attention runs on all
    # threads, a branch short prompts never reach: one token decoded after 900
    # must give what the same position gives inside a prompt (the numpy path).
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=1024)
    tokens = np.random.default_rng(5).integers(0, 256, 901)
    whole = model.forward(tokens, 0)
    model.forward(tokens[:-1], 0)
    _close(model.forward(tokens[-1:], 900), whole)


def test_logits_from_gives_every_later_position(tmp_path):
    tiny = TinyLlama(seed=14)
    model = Model(GGUFFile(tiny.write(tmp_path / "tiny.gguf")), n_ctx=16)
    reference = tiny.reference_logits(PROMPT)
    logits = model.forward(np.array(PROMPT), 0, logits_from=3)
    assert logits.shape == (len(PROMPT) - 3, len(tiny.vocab))
    for ours, theirs in zip(logits, reference[3:]):
        _close(ours, theirs)
    with pytest.raises(ValueError, match="logits_from"):
        model.forward(np.array(PROMPT), 0, logits_from=len(PROMPT))


KV_MEMORY_SCRIPT = """
import sys
import numpy as np
from llamazip.runtime.gguf import GGUFFile
from llamazip.runtime.model import Model

def private_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

# The same steps on a short context first: loading their compiled kernels takes ~16 MiB.
warm = Model(GGUFFile(sys.argv[1]), n_ctx=8)
warm.forward(np.array([1, 2, 3]), 0)
warm.forward(np.array([4]), 3)
model = Model(GGUFFile(sys.argv[1]), n_ctx=65536)
before = private_kib()
model.forward(np.array([1, 2, 3]), 0)
model.forward(np.array([4]), 3)
print(model.cache_k.nbytes + model.cache_v.nbytes, (private_kib() - before) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_kv_cache_becomes_memory_only_as_it_fills(tmp_path):
    """A long context costs private memory only for the positions written: 8 layers x
    8 key/value heads, 65536 positions (256 MiB of cache); 4 tokens may not make more
    than a few MiB of it resident (whole 2 MiB pages per head would be 256 MiB; one
    4 KiB page per layer, head, keys and values is 0.5 MiB)."""
    path = TinyLlama(n_layer=8, n_head=8, n_head_kv=8, seed=5).write(tmp_path / "tiny.gguf")
    done = subprocess.run([sys.executable, "-c", KV_MEMORY_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cache_bytes, grown = map(int, done.stdout.split())
    assert cache_bytes == 2 * 8 * 8 * 65536 * 8 * 4
    assert grown < 4 * 2**20, f"{grown / 2**20:.0f} MiB of private memory for 4 cached positions"

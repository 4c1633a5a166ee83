"""The compiled steps between a token's matrix products (runtime/token_ops.py):
the FFN gate's activations, against float64."""

import numpy as np
import pytest

from llamazip.runtime.jit import numba_enabled

pytestmark = pytest.mark.skipif(not numba_enabled(), reason="the compiled steps need numba")

if numba_enabled():
    from llamazip.runtime import token_ops

C = np.sqrt(2.0 / np.pi)


def _silu(g):
    return g / (1.0 + np.exp(-g))


def _gelu_tanh(g):
    # 0.5 (1 + tanh(u)) written as 1 / (1 + e^-2u): the same value, no cancellation in float64 either
    return g / (1.0 + np.exp(-2.0 * C * (g + 0.044715 * g ** 3)))


def _values(n: int, scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal(n) * scale).astype(np.float32)
    gate[:4] = [0.0, -0.0, 300.0, -300.0]  # past where e^-g is a float32
    return gate, rng.standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("name, kernel, reference, tolerance", [
    ("silu", "silu_mul", _silu, 1e-6),
    # g^3 in float32 already moves the argument by ~1e-7 relative; e^-2u turns that into ~1e-5
    ("gelu_tanh", "gelu_tanh_mul", _gelu_tanh, 3e-5)])
@pytest.mark.parametrize("scale", [0.05, 3.0, 40.0])
def test_gate_activations_against_float64(name, kernel, reference, tolerance, scale):
    gate, up = _values(4099, scale)  # not a multiple of 16: the padded last lanes too
    ours = gate.copy()
    with np.errstate(over="ignore"):
        exact = reference(gate.astype(np.float64)) * up
    getattr(token_ops, kernel)(ours, up)
    assert np.all(np.isfinite(ours))
    error = np.abs(ours - exact)
    assert np.all(error <= tolerance * np.abs(exact) + 1e-30), (name, float((error / np.abs(exact)).max()))


@pytest.mark.parametrize("kernel", ["silu_mul", "gelu_tanh_mul"])
def test_a_value_gets_the_same_bits_wherever_it_lies(kernel):
    """Several rows' values in one call (flattened, as a batched step gates them) equal
    each row's own call bit for bit, whatever their offset in the array: a batched
    step's row is its token's step alone."""
    rows, width = 5, 2051  # rows start at every offset mod 16
    gate, up = _values(rows * width, 2.0, seed=1)
    together = gate.copy()
    getattr(token_ops, kernel)(together, up)
    for i in range(rows):
        alone = gate[i * width:(i + 1) * width].copy()
        getattr(token_ops, kernel)(alone, up[i * width:(i + 1) * width].copy())
        np.testing.assert_array_equal(together[i * width:(i + 1) * width], alone)


@pytest.mark.parametrize("n_keys, first, n_head, n_kv, hd", [
    (1, 0, 6, 2, 64), (15, 0, 6, 2, 64), (16, 0, 6, 2, 64), (17, 0, 6, 2, 64), (300, 0, 6, 2, 64),
    (300, 37, 14, 2, 64),  # a window's first key inside a block; 7 heads a group (tiles of 4, then 3)
    (40, 5, 5, 1, 40),  # 5 heads on one: 4 and 1; a head size that is not whole vectors
    (50, 0, 4, 2, 96),  # 2 heads a group, as four (each repeated)
    (33, 16, 4, 4, 128), (70, 0, 8, 2, 256)])
def test_one_tokens_attention_against_float64(n_keys, first, n_head, n_kv, hd):
    """attend(): RoPE off (cos 1, sin 0), the token's key and value stored at its
    position, each query head against its key/value head's cached positions
    first..pos (keys in blocks of KEY_BLOCK positions; the softmax's e^x in
    vector lanes, the last few padded)."""
    rng = np.random.default_rng(n_keys + hd)
    pos, n_ctx = first + n_keys - 1, 512
    keys = rng.standard_normal((n_kv, n_ctx, hd))
    block = token_ops.KEY_BLOCK
    cache_k = np.ascontiguousarray(keys.reshape(n_kv, n_ctx // block, block, hd).transpose(0, 1, 3, 2), np.float32)
    cache_v = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float32)
    q = (rng.standard_normal((n_head, hd)) * 2).astype(np.float32)
    k, v = rng.standard_normal((n_kv, hd)).astype(np.float32), rng.standard_normal((n_kv, hd)).astype(np.float32)
    out = np.empty((n_head, hd), np.float32)
    none = np.empty(0, np.float32)
    token_ops.attend(q.copy(), k.copy(), v.copy(), cache_k, cache_v, pos, first, np.ones(hd // 2, np.float32),
                     np.zeros(hd // 2, np.float32), True, none, none, np.float32(1e-6), np.float32(0.125), out)
    assert np.array_equal(cache_k[:, pos // block, :, pos % block], k)
    keys, values = keys.astype(np.float32).astype(np.float64), cache_v.astype(np.float64)
    keys[:, pos], values[:, pos] = k, v
    for h in range(n_head):
        g = h // (n_head // n_kv)
        scores = keys[g, first:pos + 1] @ q[h].astype(np.float64) * 0.125
        p = np.exp(scores - scores.max())
        expected = (p / p.sum()) @ values[g, first:pos + 1]
        np.testing.assert_allclose(out[h], expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n_keys, first, n_head, n_kv, hd", [
    (17, 0, 6, 2, 64), (300, 37, 14, 2, 64), (40, 5, 5, 1, 40), (70, 0, 8, 2, 256)])
def test_a_half_precision_cache_attends_as_float32_holding_the_same_values(n_keys, first, n_head, n_kv, hd):
    """attend() on a cache of float16 bits (uint16, what Model keeps where decoding
    rounds to int8): the token's key and value stored rounded to nearest float16,
    and the output bit for bit what a float32 cache holding the same values gives."""
    rng = np.random.default_rng(n_keys + hd)
    pos, n_ctx, block = first + n_keys - 1, 512, token_ops.KEY_BLOCK
    halves_k = rng.standard_normal((n_kv, n_ctx // block, hd, block)).astype(np.float16)
    halves_v = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float16)
    q = (rng.standard_normal((n_head, hd)) * 2).astype(np.float32)
    k, v = rng.standard_normal((n_kv, hd)).astype(np.float32), rng.standard_normal((n_kv, hd)).astype(np.float32)
    none = np.empty(0, np.float32)
    outs = []
    for cache_k, cache_v in ((halves_k.view(np.uint16).copy(), halves_v.view(np.uint16).copy()),
                             (halves_k.astype(np.float32), halves_v.astype(np.float32))):
        # the float32 cache gets the token's key and value as float16 would round them
        kk, vv = (k, v) if cache_k.dtype == np.uint16 else (k.astype(np.float16).astype(np.float32),
                                                          v.astype(np.float16).astype(np.float32))
        out = np.empty((n_head, hd), np.float32)
        token_ops.attend(q.copy(), kk.copy(), vv.copy(), cache_k, cache_v, pos, first, np.ones(hd // 2, np.float32),
                         np.zeros(hd // 2, np.float32), True, none, none, np.float32(1e-6), np.float32(0.125), out)
        outs.append(out)
        if cache_k.dtype == np.uint16:
            assert np.array_equal(cache_k[:, pos // block, :, pos % block].view(np.float16), k.astype(np.float16))
            assert np.array_equal(cache_v[:, pos].view(np.float16), v.astype(np.float16))
    np.testing.assert_array_equal(outs[0], outs[1])

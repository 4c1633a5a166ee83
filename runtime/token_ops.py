"""The steps between the matrix products of one decoded token, compiled.

Decoding one token runs ~10 small vector operations per layer between its
matrix products (norms, RoPE, the cache write, attention, the FFN gate). As
numpy calls they cost ~150 us per layer, a third of SmolLM2's decode time,
almost all of it call overhead on 576-float vectors. Here each group of steps
is one numba call, made by layer_steps.TokenSteps. Prompts (many tokens) take
layer_steps.PromptSteps' numpy operations, where the work per call is large
enough for numpy to be fast, but for attention (attend_prompt), the FFN gate
(its e^x in vector instructions: numpy's, on one thread, was 10-15% of a
prompt on two) and the norms (numpy's passes and temporaries were 8% of Gemma
3's prompt, with its post-norms).

Only used when numba loads (see jit.numba_enabled); the results equal the
numpy steps up to float32 rounding. In `attend`, a q_norm of size 0 means the
architecture has no per-head norm.
"""

from __future__ import annotations

import math

import numpy as np

from .jit import jit, numba_enabled, prange

if numba_enabled():
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from .simd import ORDERED, SHORTS16, constant, exp_vector, float_vector, load_vector, splat, store_vector

    _LANES = 16
    _FLOATS = ir.VectorType(ir.FloatType(), _LANES)
    _GELU_C = math.sqrt(2.0 / math.pi)

    def _gated_lanes(gelu: bool):
        """An intrinsic gated(gate, up, at): gate[at:at + 16] = act(gate) * up[at:at + 16],
        act(g) = g / (1 + e^-a): a = g for SiLU; a = 2 sqrt(2 / pi) (g + 0.044715 g^3)
        for GELU's tanh form (0.5 (1 + tanh(u)) is 1 / (1 + e^-2u), without tanh's
        cancellation near 0)."""
        @intrinsic
        def gated(typingctx, gate, up, at):
            def codegen(context, builder, signature, args):
                gate, up, at = args
                g = load_vector(context, builder, signature.args[0], gate, at, _FLOATS)
                u = load_vector(context, builder, signature.args[1], up, at, _FLOATS)
                a = g
                if gelu:
                    cube = builder.fmul(builder.fmul(g, g), g)
                    a = builder.fmul(builder.fadd(g, builder.fmul(cube, constant(_FLOATS, 0.044715))),
                                     constant(_FLOATS, 2.0 * _GELU_C))
                e = exp_vector(builder, builder.fsub(constant(_FLOATS, 0.0), a))
                out = builder.fmul(builder.fdiv(g, builder.fadd(constant(_FLOATS, 1.0), e)), u)
                return store_vector(context, builder, signature.args[0], gate, at, out)
            return types.void(gate, up, types.intp), codegen
        return gated

    _silu_lanes = _gated_lanes(False)
    _gelu_lanes = _gated_lanes(True)

    @intrinsic
    def _exp_less(typingctx, row, at, top):
        """row[at:at + 16] = e^(row[at:at + 16] - top), in place (softmax's exponentials)."""
        def codegen(context, builder, signature, args):
            row, at, top = args
            values = load_vector(context, builder, signature.args[0], row, at, _FLOATS)
            out = exp_vector(builder, builder.fsub(values, splat(builder, top, _FLOATS)))
            return store_vector(context, builder, signature.args[0], row, at, out)
        return types.void(row, types.intp, types.float32), codegen

    _F32x16, _zeros16, _ = float_vector(_LANES)

    _HALVES = ir.VectorType(ir.HalfType(), _LANES)

    def _floats_at(context, builder, array_type, array, at):
        """The 16 values at flat index `at` of the C-contiguous `array` as floats: float32,
        or float16 bits in a uint16 array (a half-precision cache, see Model)."""
        if array_type.dtype == types.uint16:
            bits = load_vector(context, builder, array_type, array, at, SHORTS16)
            return builder.fpext(builder.bitcast(bits, _HALVES), _FLOATS)
        return load_vector(context, builder, array_type, array, at, _FLOATS)

    @intrinsic
    def _fma_lanes(typingctx, acc, s, array, at):
        """acc + s * the 16 values at flat index `at` of the C-contiguous `array` (float32 or
        float16 bits, _floats_at), unchecked."""
        def codegen(context, builder, signature, args):
            acc, s, array, at = args
            lanes = _floats_at(context, builder, signature.args[2], array, at)
            return builder.fadd(acc, builder.fmul(splat(builder, s, _FLOATS), lanes, flags=ORDERED), flags=ORDERED)
        return _F32x16(acc, types.float32, array, types.intp), codegen

    @intrinsic
    def _cache_get(typingctx, array, at):
        """array.flat[at] as float32: a cache entry, float32 or float16 bits (uint16)."""
        def codegen(context, builder, signature, args):
            array, at = args
            value = builder.load(builder.gep(context.make_array(signature.args[0])(context, builder, array).data, [at]))
            if signature.args[0].dtype == types.uint16:
                return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())
            return value
        return types.float32(array, types.intp), codegen

    @intrinsic
    def _cache_set(typingctx, array, at, value):
        """array.flat[at] = value: into a float32 cache, or one of float16 bits (uint16),
        rounded to nearest."""
        def codegen(context, builder, signature, args):
            array, at, value = args
            if signature.args[0].dtype == types.uint16:
                value = builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))
            builder.store(value, builder.gep(context.make_array(signature.args[0])(context, builder, array).data, [at]))
            return context.get_dummy_value()
        return types.void(array, types.intp, types.float32), codegen

    @intrinsic
    def _store_lanes(typingctx, array, at, lanes):
        """The 16 floats at flat index `at` of the C-contiguous `array` = lanes, unchecked."""
        def codegen(context, builder, signature, args):
            return store_vector(context, builder, signature.args[0], args[0], args[1], args[2])
        return types.void(array, types.intp, lanes), codegen

    @intrinsic
    def _store_sum(typingctx, array, at, a, b, scale):
        """The 16 floats at flat index `at` of the C-contiguous `array` = (a + b) * scale, unchecked."""
        def codegen(context, builder, signature, args):
            array, at, a, b, scale = args
            lanes = builder.fmul(builder.fadd(a, b, flags=ORDERED), splat(builder, scale, _FLOATS), flags=ORDERED)
            return store_vector(context, builder, signature.args[0], array, at, lanes)
        return types.void(array, types.intp, a, b, types.float32), codegen


@jit()
def _inverse_rms(x, eps):
    s = np.float32(0.0)
    for i in range(x.size):
        s += x[i] * x[i]
    return np.float32(1.0 / math.sqrt(s / x.size + eps))


@jit()
def rms_norm_into(x, weight, eps, out):
    """out = x / rms(x) * weight (out may be x)."""
    scale = _inverse_rms(x, eps)
    for i in range(x.size):
        out[i] = x[i] * scale * weight[i]


@jit()
def add_normed(x, h, weight, eps):
    """x += h / rms(h) * weight: Gemma's post-norm residual add."""
    scale = _inverse_rms(h, eps)
    for i in range(x.size):
        x[i] += h[i] * scale * weight[i]


# The FFN gate, in place on contiguous 1-D arrays (a decoded token's, or several
# rows' or a prompt's flattened), 16 lanes at a time (~0.4 ns a value: a prompt's
# on one thread is ~1% of its time; a parallel form's compile took seconds). The
# last few values go through the same lanes from a padded copy: each value rounds
# alike wherever it lies, so a row of a batch gets what it gets alone.


@jit()
def _gate(gate, up, gelu):
    body = gate.size // 16 * 16
    for at in range(0, body, 16):
        if gelu:
            _gelu_lanes(gate, up, at)
        else:
            _silu_lanes(gate, up, at)
    if body < gate.size:
        # element loops, not slice assignments: those compile numba's generic
        # setitem (broadcasting, its error messages), seconds for a few values
        g, u = np.zeros(16, np.float32), np.zeros(16, np.float32)
        for i in range(gate.size - body):
            g[i], u[i] = gate[body + i], up[body + i]
        if gelu:
            _gelu_lanes(g, u, 0)
        else:
            _silu_lanes(g, u, 0)
        for i in range(gate.size - body):
            gate[body + i] = g[i]


@jit()
def silu_mul(gate, up):
    """gate = silu(gate) * up, in place."""
    _gate(gate, up, False)


@jit()
def gelu_tanh_mul(gate, up):
    """gate = gelu_tanh(gate) * up, in place."""
    _gate(gate, up, True)


@jit()
def _norm_heads(x, weight, eps):
    """RMSNorm each row (head) of x (heads, head_dim) in place."""
    for h in range(x.shape[0]):
        rms_norm_into(x[h], weight, eps, x[h])


@jit()
def _rotate_heads(x, cos, sin, neox):
    """RoPE in place on x (heads, head_dim) at one position (cos, sin: n_rot / 2 each)."""
    half = cos.size
    for h in range(x.shape[0]):
        row = x[h]
        for i in range(half):
            a = i if neox else 2 * i  # NEOX turns i with i + half; GGUF llama turns pairs
            b = i + half if neox else 2 * i + 1
            first, second = row[a], row[b]
            row[a] = first * cos[i] - second * sin[i]
            row[b] = first * sin[i] + second * cos[i]


# The key cache holds each head's keys in blocks of this many positions, stored
# (n_kv, n_blocks, hd, KEY_BLOCK): a key block's dimension i is one vector of 16
# positions, so scores are vector products with no sum across lanes (the
# per-key horizontal sums were a third of the attention's time). A block of
# head size 64 is one 4 KiB page: the cache still becomes memory as it fills.
KEY_BLOCK = 16

# Up to this many (query head, key) pairs one thread attends (a 9-head,
# 300-key layer takes ~35 us): a parallel region would cost more than the work.
SERIAL_ATTENTION_PAIRS = 4096
# Several rows (attend_rows): above this many pairs in all, the rows' key/value heads
# are split between the threads (4 rows of SmolLM2's 9 heads: even at 40 keys a
# row, 0.6x the serial time at 70 and 0.5x at 300).
SERIAL_ROWS_PAIRS = 1536


@jit(ordered=True)
def attend(q, k, v, cache_k, cache_v, pos, first, cos, sin, neox, q_norm, k_norm, eps, scale, out):
    """One token's attention for one layer, from its q (n_head, hd), k and v (n_kv, hd).

    Normalises q and k per head when q_norm has entries (Gemma), turns them
    with RoPE, stores k and v at `pos` in the layer's cache (cache_k: n_kv key
    blocks, see _store_qk; cache_v: (n_kv, n_ctx, hd)), then each query head
    attends to the cached positions first..pos of its key/value head.
    out: (n_head, hd).
    """
    _store_qk(q, k, v, cache_k, cache_v, pos, cos, sin, neox, q_norm, k_norm, eps)
    n_kv = k.shape[0]
    group = q.shape[0] // n_kv
    for g in range(n_kv):
        _attend_group(q[g * group:(g + 1) * group], cache_k[g], cache_v[g], first, pos + 1, scale,
                      out[g * group:(g + 1) * group])


@jit(parallel=True, ordered=True)
def attend_parallel(q, k, v, cache_k, cache_v, pos, first, cos, sin, neox, q_norm, k_norm, eps, scale, out):
    """attend() with the query heads split between the threads, for long contexts.
    A separate kernel so that its compile (seconds: a parallel region) waits
    until a context is long enough to need it."""
    _store_qk(q, k, v, cache_k, cache_v, pos, cos, sin, neox, q_norm, k_norm, eps)
    group = q.shape[0] // k.shape[0]
    for h in prange(q.shape[0]):
        g = h // group
        _attend_group(q[h:h + 1], cache_k[g], cache_v[g], first, pos + 1, scale, out[h:h + 1])


@jit()
def _store_qk(q, k, v, cache_k, cache_v, pos, cos, sin, neox, q_norm, k_norm, eps):
    if q_norm.size:
        _norm_heads(q, q_norm, eps)
        _norm_heads(k, k_norm, eps)
    _rotate_heads(q, cos, sin, neox)
    _rotate_heads(k, cos, sin, neox)
    block, lane = pos // KEY_BLOCK, pos % KEY_BLOCK
    n_blocks, hd, n_ctx = cache_k.shape[1], k.shape[1], cache_v.shape[1]
    for g in range(k.shape[0]):  # flat indices: the caches are C-contiguous, float32 or float16 bits
        for i in range(hd):
            _cache_set(cache_k, ((g * n_blocks + block) * hd + i) * KEY_BLOCK + lane, k[g, i])
            _cache_set(cache_v, (g * n_ctx + pos) * hd + i, v[g, i])


@jit(ordered=True)
def _attend_group(q, keys, values, first, end, scale, out):
    """out = softmax(scale q keys^T) values for the query heads q (group, hd) of
    one key/value head, over its positions first..end - 1: keys in blocks
    (n_blocks, hd, KEY_BLOCK), values (n_ctx, hd), both C-contiguous. Vectors run
    along the positions for the scores (a key block's dimension i is 16
    positions side by side: no sum across a vector's lanes) and along hd for the
    values, four query heads at a time where the group has four more, so each
    key and value vector is loaded once for four heads. The attention kernels are
    `ordered` (no reassociation): inlined into the serial and the split kernels,
    one just compiled and one from numba's cache, with it they rounded apart (a
    full test run: split rows 5e-7 off their own steps)."""
    group, hd = q.shape
    n_keys = end - first
    b0 = first // KEY_BLOCK
    n_blocks = (end + KEY_BLOCK - 1) // KEY_BLOCK - b0
    off = first - KEY_BLOCK * b0  # where position `first` lies in the first block
    scores = np.empty((group, KEY_BLOCK * n_blocks), np.float32)
    # heads four at a time; the last 2-3 as four, the last repeated (its sums stored
    # again, the same): three passes of one head read the keys three times, 1.2x as
    # long; a last single head alone
    fours = group // 4 * 4 if group % 4 == 1 else (group + 3) // 4 * 4
    for j in range(0, fours, 4):
        _scores4(q, j, keys, b0, n_blocks, scale, scores)
    for j in range(fours, group):
        _scores1(q, j, keys, b0, n_blocks, scale, scores)
    # plain loops rather than array expressions, which multiplied the compile time
    body = n_keys // 16 * 16
    last = np.empty(16, np.float32)  # the last few scores, padded to a vector's lanes
    for j in range(group):
        row = scores[j, off:off + n_keys]
        top = row[0]
        for t in range(n_keys):
            top = max(top, row[t])
        for t in range(0, body, 16):
            _exp_less(row, t, top)
        if body < n_keys:  # element loops: see _gate
            for t in range(16):
                last[t] = row[body + t] if body + t < n_keys else top
            _exp_less(last, 0, top)
            for t in range(body, n_keys):
                row[t] = last[t - body]
        total = np.float32(0.0)
        for t in range(n_keys):
            total += row[t]
        inverse = np.float32(1.0) / total
        for t in range(n_keys):
            row[t] *= inverse
    # values: eight or four running sums at once (four heads x 2 vectors of hd, or
    # one head x 4), enough to keep the FMA units busy; one alone waits on each sum
    vectors = hd // 16 * 16
    for j in range(0, fours, 4):
        for c in range(0, vectors // 32 * 32, 32):
            _values4x2(scores, j, off, values, first, n_keys, c, out)
        if vectors % 32:
            for h in range(j, min(j + 4, group)):
                _values1x1(scores, h, off, values, first, n_keys, vectors - 16, out)
    for j in range(fours, group):
        for c in range(0, vectors // 64 * 64, 64):
            _values1x4(scores, j, off, values, first, n_keys, c, out)
        for c in range(vectors // 64 * 64, vectors, 16):
            _values1x1(scores, j, off, values, first, n_keys, c, out)
    for j in range(group):  # a head size that is not whole vectors: the rest one by one
        for i in range(vectors, hd):
            total = np.float32(0.0)
            for t in range(n_keys):
                total += scores[j, off + t] * _cache_get(values, (first + t) * hd + i)
            out[j, i] = total


# The scores of query heads j.. (four, or one) against key blocks b0.., into
# scores[j.., 16 b:16 b + 16]. Two sums per head, even and odd dimensions (hd is
# even: RoPE turns pairs), half as long: float32's rounding over 256 dimensions
# had doubled with one.

@jit(ordered=True)
def _scores4(q, j, keys, b0, n_blocks, scale, scores):
    group, hd, width = q.shape[0], q.shape[1], scores.shape[1]
    j1, j2, j3 = min(j + 1, group - 1), min(j + 2, group - 1), min(j + 3, group - 1)
    for b in range(n_blocks):
        a0, a1, a2, a3 = _zeros16(), _zeros16(), _zeros16(), _zeros16()
        e0, e1, e2, e3 = _zeros16(), _zeros16(), _zeros16(), _zeros16()
        base = (b0 + b) * hd * KEY_BLOCK
        for i in range(0, hd, 2):
            at = base + KEY_BLOCK * i
            a0 = _fma_lanes(a0, q[j, i], keys, at)
            a1 = _fma_lanes(a1, q[j1, i], keys, at)
            a2 = _fma_lanes(a2, q[j2, i], keys, at)
            a3 = _fma_lanes(a3, q[j3, i], keys, at)
            e0 = _fma_lanes(e0, q[j, i + 1], keys, at + KEY_BLOCK)
            e1 = _fma_lanes(e1, q[j1, i + 1], keys, at + KEY_BLOCK)
            e2 = _fma_lanes(e2, q[j2, i + 1], keys, at + KEY_BLOCK)
            e3 = _fma_lanes(e3, q[j3, i + 1], keys, at + KEY_BLOCK)
        # a repeated head is stored twice, the same sums
        _store_sum(scores, j * width + KEY_BLOCK * b, a0, e0, scale)
        _store_sum(scores, j1 * width + KEY_BLOCK * b, a1, e1, scale)
        _store_sum(scores, j2 * width + KEY_BLOCK * b, a2, e2, scale)
        _store_sum(scores, j3 * width + KEY_BLOCK * b, a3, e3, scale)


@jit(ordered=True)
def _scores1(q, j, keys, b0, n_blocks, scale, scores):
    """One head: two blocks at a time (four running sums, as the units need), an odd last block alone."""
    hd, width = q.shape[1], scores.shape[1]
    for b in range(0, n_blocks - 1, 2):
        a, e, a2, e2 = _zeros16(), _zeros16(), _zeros16(), _zeros16()
        base = (b0 + b) * hd * KEY_BLOCK
        for i in range(0, hd, 2):
            at = base + KEY_BLOCK * i
            a = _fma_lanes(a, q[j, i], keys, at)
            e = _fma_lanes(e, q[j, i + 1], keys, at + KEY_BLOCK)
            a2 = _fma_lanes(a2, q[j, i], keys, at + hd * KEY_BLOCK)
            e2 = _fma_lanes(e2, q[j, i + 1], keys, at + hd * KEY_BLOCK + KEY_BLOCK)
        _store_sum(scores, j * width + KEY_BLOCK * b, a, e, scale)
        _store_sum(scores, j * width + KEY_BLOCK * (b + 1), a2, e2, scale)
    if n_blocks % 2:
        b = n_blocks - 1
        a, e = _zeros16(), _zeros16()
        base = (b0 + b) * hd * KEY_BLOCK
        for i in range(0, hd, 2):
            at = base + KEY_BLOCK * i
            a = _fma_lanes(a, q[j, i], keys, at)
            e = _fma_lanes(e, q[j, i + 1], keys, at + KEY_BLOCK)
        _store_sum(scores, j * width + KEY_BLOCK * b, a, e, scale)


# out[j.., c:c + 16 n] = the heads' softmaxed scores times the values' dimensions c..

@jit(ordered=True)
def _values4x2(scores, j, off, values, first, n_keys, c, out):
    group, hd = scores.shape[0], values.shape[1]
    j1, j2, j3 = min(j + 1, group - 1), min(j + 2, group - 1), min(j + 3, group - 1)
    a0, a1, a2, a3 = _zeros16(), _zeros16(), _zeros16(), _zeros16()
    b0, b1, b2, b3 = _zeros16(), _zeros16(), _zeros16(), _zeros16()
    for t in range(n_keys):
        at = (first + t) * hd + c
        p0, p1, p2, p3 = scores[j, off + t], scores[j1, off + t], scores[j2, off + t], scores[j3, off + t]
        a0, b0 = _fma_lanes(a0, p0, values, at), _fma_lanes(b0, p0, values, at + 16)
        a1, b1 = _fma_lanes(a1, p1, values, at), _fma_lanes(b1, p1, values, at + 16)
        a2, b2 = _fma_lanes(a2, p2, values, at), _fma_lanes(b2, p2, values, at + 16)
        a3, b3 = _fma_lanes(a3, p3, values, at), _fma_lanes(b3, p3, values, at + 16)
    _store_lanes(out, j * hd + c, a0)
    _store_lanes(out, j * hd + c + 16, b0)
    _store_lanes(out, j1 * hd + c, a1)
    _store_lanes(out, j1 * hd + c + 16, b1)
    _store_lanes(out, j2 * hd + c, a2)
    _store_lanes(out, j2 * hd + c + 16, b2)
    _store_lanes(out, j3 * hd + c, a3)
    _store_lanes(out, j3 * hd + c + 16, b3)


@jit(ordered=True)
def _values1x4(scores, j, off, values, first, n_keys, c, out):
    hd = values.shape[1]
    a0, a1, a2, a3 = _zeros16(), _zeros16(), _zeros16(), _zeros16()
    for t in range(n_keys):
        at, p = (first + t) * hd + c, scores[j, off + t]
        a0, a1 = _fma_lanes(a0, p, values, at), _fma_lanes(a1, p, values, at + 16)
        a2, a3 = _fma_lanes(a2, p, values, at + 32), _fma_lanes(a3, p, values, at + 48)
    _store_lanes(out, j * hd + c, a0)
    _store_lanes(out, j * hd + c + 16, a1)
    _store_lanes(out, j * hd + c + 32, a2)
    _store_lanes(out, j * hd + c + 48, a3)


@jit(ordered=True)
def _values1x1(scores, j, off, values, first, n_keys, c, out):
    hd = values.shape[1]
    a = _zeros16()
    for t in range(n_keys):
        a = _fma_lanes(a, scores[j, off + t], values, (first + t) * hd + c)
    _store_lanes(out, j * hd + c, a)


@jit(parallel=True, ordered=True)
def attend_prompt(q, k, v, cache_k, cache_v, start, firsts, cos, sin, neox, q_norm, k_norm, eps, scale, out):
    """attend() for a prompt's n tokens at positions start.. of one sequence: q (n, n_head, hd),
    k and v (n, n_kv, hd), the layer's cache of that sequence (as attend's); row i
    sees keys firsts[i]..start + i. Every row's key and value is stored first; then
    the (key/value head, row) pairs are split between the threads, all the query
    heads of a pair together (each key and value read once for four of them: 0.6x
    the time of a head at a time on Gemma 3), rows taken first and last
    alternately (a thread's contiguous share then holds early and late rows alike:
    later rows see more keys). Only the keys a row sees are scored: numpy's
    product scored them all and masked half away, on one thread."""
    n = q.shape[0]
    for i in prange(n):
        _store_qk(q[i], k[i], v[i], cache_k, cache_v, start + i, cos[start + i], sin[start + i], neox, q_norm,
                  k_norm, eps)
    n_kv = cache_k.shape[0]
    group = q.shape[1] // n_kv
    for task in prange(n * n_kv):
        g, j = task // n, task % n
        i = j // 2 if j % 2 == 0 else n - 1 - j // 2
        _attend_group(q[i, g * group:(g + 1) * group], cache_k[g], cache_v[g], firsts[i], start + i + 1, scale,
                      out[i, g * group:(g + 1) * group])


# Several decoded tokens at once (layer_steps.BatchSteps): one call per step for all
# rows, each row through the one-token kernel above (so each row equals its own pass).


@jit()
def rms_norm_rows(x, weight, eps, out):
    """rms_norm_into for each row of x (rows, dim)."""
    for i in range(x.shape[0]):
        rms_norm_into(x[i], weight, eps, out[i])


@jit()
def add_normed_rows(x, h, weight, eps):
    """add_normed for each row of x and h (rows, dim)."""
    for i in range(x.shape[0]):
        add_normed(x[i], h[i], weight, eps)


@jit(ordered=True)
def attend_rows(q, k, v, cache_k, cache_v, positions, slots, firsts, cos, sin, neox, q_norm, k_norm, eps, scale,
                out):
    """attend() for each row i of q (rows, n_head, hd), k and v (rows, n_kv, hd): its
    token at positions[i] of cache slot slots[i] (the caches' first axis: the slot),
    seeing keys firsts[i]..positions[i]. In row order: a slot's later row sees the
    keys its earlier rows stored."""
    for i in range(q.shape[0]):
        pos, slot = positions[i], slots[i]
        attend(q[i], k[i], v[i], cache_k[slot], cache_v[slot], pos, firsts[i], cos[pos], sin[pos], neox,
               q_norm, k_norm, eps, scale, out[i])


@jit(parallel=True, ordered=True)
def attend_rows_parallel(q, k, v, cache_k, cache_v, positions, slots, firsts, cos, sin, neox, q_norm, k_norm, eps,
                         scale, out):
    """attend_rows with the (row, key/value head) pairs split between the threads:
    every row's key and value is stored first, in row order (a row sees only keys
    up to its own position, so a slot's later rows may be stored before its
    earlier ones attend); each pair is then attend()'s own step."""
    n, n_kv = q.shape[0], k.shape[1]
    group = q.shape[1] // n_kv
    for i in range(n):
        pos, slot = positions[i], slots[i]
        _store_qk(q[i], k[i], v[i], cache_k[slot], cache_v[slot], pos, cos[pos], sin[pos], neox, q_norm, k_norm, eps)
    for task in prange(n * n_kv):
        i, g = task // n_kv, task % n_kv
        pos, slot = positions[i], slots[i]
        _attend_group(q[i, g * group:(g + 1) * group], cache_k[slot, g], cache_v[slot, g], firsts[i], pos + 1,
                      scale, out[i, g * group:(g + 1) * group])

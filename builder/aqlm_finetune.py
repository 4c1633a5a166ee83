"""Fine-tuning after AQLM quantization: the original model distilled into the
quantized one, as AQLM's authors do after their layer-wise step.

The loss is the KL divergence from the original model's next-token
distributions to the quantized model's, on every position of the calibration
sequences (builder/calibration_data.py: prose, code and the model's own text),
one 512-token sequence per step; the original's distributions are computed as
each step needs them, so the data can be as long as the steps. Adam updates the
continuous parameters (both codebooks and the per-row scales of every matrix,
and the RMSNorm weights) on a warm-up and cosine schedule. PV-tuning's discrete
step (code_step: a small share of the codes changed where the gradient says
another codebook entry lowers the loss, kept only if the measured loss falls)
can alternate with it, but is off by default (CODE_FRACTION). The file keeps
its tensors, sizes and kernels.

The forward pass is the runtime's (runtime/model.py) written again in torch for
its gradients; a test checks it against the runtime on a tiny model. Where the
CPU multiplies bfloat16 in hardware (AMX, AVX-512 BF16) the large products take
bfloat16 inputs with float32 sums (MATMUL_DTYPE); W is rebuilt and its
gradients summed by numba kernels (aqlm_gradients.py); attention is torch's
fused kernel. SmolLM2 step on 2 cores: 4.2 s -> 1.45 s (2.3 s in float32), and 100 steps give the
same perplexities to 3 digits as float32 products. torch is a
builder-only dependency (`pip install 'llamazip[finetune]'`): bundles never
carry it. Deterministic for a seed, a thread count and MATMUL_DTYPE.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..runtime.gguf import GGUFFile
from ..runtime.layer_steps import PromptSteps
from ..runtime.model import Model
from . import aqlm_gradients
from .progress import Progress

# Adam's step for codebooks, scales and norms. Codebook entries are O(1) (rows are
# divided by their RMS before quantizing), norms O(1); scales are the row RMS.
# Codebooks at 1e-3: SmolLM2, 100 steps, perplexity 5-8% lower on every text than at
# 3e-4 (bench/aqlm_quality.py).
_LR = 1e-3
_SCALE_LR = 3e-4
_BETAS = (0.9, 0.95)
_WARMUP = 10  # steps at most (a tenth of a short run)
# The code step: at most this share of (row, group) slots change one code each,
# judged on this many sequences, every _CODE_EVERY steps. Off by default: on
# SmolLM2 after fine-tuning and on the tiny test models every attempt raised the
# KL and was undone (0.2%, 0.05%, 0.0125%; 232 s per step on SmolLM2), so it only
# cost time.
CODE_FRACTION = 0.0
CODE_FRACTION_TRIED = 0.002
_CODE_EVERY = 50
_CODE_BATCH = 2

Parts = tuple[np.ndarray, np.ndarray, np.ndarray]
_MATRICES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
             "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
_NORMS = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "post_attn_norm": "post_attention_norm",
          "post_ffn_norm": "post_ffw_norm"}


class FinetuneError(UserError, ValueError):
    """A model fine-tuning cannot handle (one line for the user)."""


def _fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or
    AVX-512 BF16): there a product of bfloat16 inputs summed in float32 runs
    5-9x float32's (SmolLM2's shapes, AMX)."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


# The dtype the large products' inputs are rounded to; sums and everything else stay float32.
MATMUL_DTYPE = torch.bfloat16 if _fast_bfloat16() else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with inputs in MATMUL_DTYPE, the result in float32."""
    if MATMUL_DTYPE == torch.float32:
        return a @ b
    return (a.to(MATMUL_DTYPE) @ b.to(MATMUL_DTYPE)).float()


class _AqlmProduct(torch.autograd.Function):
    """x @ W^T for an AQLM matrix, W rebuilt from its codes in the forward pass and
    again in the backward one instead of kept (Qwen2.5-0.5B: autograd through
    torch's gathers kept 20 GiB). Both, and the gradients of the codebooks and
    scales from dL/dW, are aqlm_gradients' kernels."""

    @staticmethod
    def forward(ctx, x, codebooks, scales, codes):
        ctx.save_for_backward(x, codebooks, scales, codes)
        return _mm(x, _weight(codes, codebooks, scales).T)

    @staticmethod
    def backward(ctx, grad):
        x, codebooks, scales, codes = ctx.saved_tensors
        grad_x = _mm(grad, _weight(codes, codebooks, scales))
        grad_w = _mm(grad.reshape(-1, grad.shape[-1]).T, x.reshape(-1, x.shape[-1]))  # (out, in)
        grad_codebooks, grad_scales = aqlm_gradients.gradients(
            codes.numpy(), codebooks.detach().numpy(), scales.detach().numpy(), grad_w.numpy())
        return grad_x, torch.from_numpy(grad_codebooks), torch.from_numpy(grad_scales), None


def _weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(aqlm_gradients.weight(codes.numpy(), codebooks.detach().numpy(),
                                                  scales.detach().numpy()))


class AqlmLinear(torch.nn.Module):
    """W[r, 8 g + j] = scales[r] (cb[0, codes[g, 0, r], j] + cb[1, codes[g, 1, r], j]);
    the codes (groups, 2, rows) in the file's layout and bytes, changed only by the code step."""

    def __init__(self, parts: Parts):
        super().__init__()
        codes, codebooks, scales = parts
        self.register_buffer("codes", torch.from_numpy(np.array(codes.view(np.uint8))))
        self.codebooks = torch.nn.Parameter(torch.from_numpy(np.array(codebooks, np.float32)))
        self.scales = torch.nn.Parameter(torch.from_numpy(np.array(scales, np.float32)))

        self.frozen: torch.Tensor | None = None  # the code step's leaf for dLoss/dW

    def weight(self) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        return _weight(self.codes, self.codebooks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            return x @ self.frozen.T
        return _AqlmProduct.apply(x, self.codebooks, self.scales, self.codes)

    def code_proposals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the gradient G of the loss at the frozen weight: for each (row, group),
        the change of one code (which codebook, which entry) that lowers most the
        loss's model G . d + rho ||d||^2 (d: the change of the group's vector), and
        that predicted change (<= 0). The quadratic term keeps the model near where
        the gradient holds: rho is set so that a group with the matrix's typical
        gradient is told to move half the codebook's typical spacing."""
        rows = self.codes.shape[2]
        grad = self.frozen.grad.reshape(rows, self.codes.shape[0], -1)  # (out, groups, 8)
        grad = grad * self.scales.detach()[:, None, None]
        typical_grad = grad.norm(dim=-1).mean() + 1e-30
        best_gain = best_book = best_entry = None
        for book in range(2):
            cb = self.codebooks.detach()[book]
            spacing = torch.cdist(cb, cb).fill_diagonal_(float("inf")).min(-1).values.median() + 1e-30
            rho = typical_grad / spacing
            now = cb[self.codes[:, book].T.long()]  # (out, groups, 8)
            # G . (cb[k] - now) + rho ||cb[k] - now||^2 for every entry k
            gain = (grad - 2 * rho * now) @ cb.T + rho * (cb * cb).sum(-1)
            gain += (rho * (now * now).sum(-1) - (grad * now).sum(-1))[..., None]
            gain, entry = gain.min(-1)
            if best_gain is None:
                best_gain, best_book, best_entry = gain, torch.zeros_like(entry), entry
            else:
                better = gain < best_gain
                best_gain = torch.where(better, gain, best_gain)
                best_book = torch.where(better, torch.ones_like(entry), best_book)
                best_entry = torch.where(better, entry, best_entry)
        return best_gain, best_book, best_entry

    def parts(self) -> Parts:
        return (self.codes.numpy().copy(), self.codebooks.detach().numpy().astype(np.float32),
                self.scales.detach().numpy().astype(np.float32))


class FloatLinear(torch.nn.Module):
    def __init__(self, w: np.ndarray):
        super().__init__()
        self.register_buffer("w", torch.from_numpy(np.asarray(w, np.float32)).to(MATMUL_DTYPE))  # fixed: rounded once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mm(x, self.w.T)


class TorchModel(torch.nn.Module):
    """The runtime model's forward pass in torch, over whole sequences from position 0.
    `parts` None: every matrix in float (the original); else AQLM matrices with
    trainable codebooks and scales. Norm weights are trainable in both."""

    def __init__(self, model: Model, parts: dict[str, Parts] | None):
        super().__init__()
        cfg = self.cfg = model.config
        self.model = model
        self.output_norm = _param(model.output_norm)
        self.head = torch.from_numpy(model.output.dequantize_rows(slice(None)).astype(np.float32)).to(MATMUL_DTYPE)
        self.layers = torch.nn.ModuleList()
        for i, layer in enumerate(model.layers):
            m = torch.nn.Module()
            for attr, short in _MATRICES.items():
                name = f"blk.{i}.{short}.weight"
                linear = (AqlmLinear(parts[name]) if parts is not None
                          else FloatLinear(getattr(layer, attr).dequantize_rows(slice(None))))
                setattr(m, attr, linear)
            for attr in (*_NORMS, "q_norm", "k_norm"):
                source = getattr(layer.attention if attr in ("q_norm", "k_norm") else layer, attr)
                setattr(m, attr, _param(source) if source is not None else None)
            for attr in ("q_bias", "k_bias", "v_bias"):
                bias = getattr(layer, attr)
                m.register_buffer(attr, torch.from_numpy(np.array(bias, np.float32)) if bias is not None else None)
            m.cos = torch.from_numpy(np.array(layer.attention.cos, np.float32))
            m.sin = torch.from_numpy(np.array(layer.attention.sin, np.float32))
            m.window = layer.attention.window
            self.layers.append(m)

    def embed(self, tokens: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.model.embed(PromptSteps(self.cfg, 0, len(tokens)), tokens),
                                           np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (n, dim) at positions 0.. -> logits (n, vocab)."""
        for layer in self.layers:
            x = self._layer(layer, x)
        logits = _mm(self._norm(x, self.output_norm), self.head.T)
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.cfg.norm_eps) * weight

    def _layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, hd = len(x), cfg.head_dim
        h = self._norm(x, layer.attn_norm)
        q = _linear(layer.wq, h, layer.q_bias).reshape(n, cfg.n_head, hd)
        k = _linear(layer.wk, h, layer.k_bias).reshape(n, cfg.n_head_kv, hd)
        v = _linear(layer.wv, h, layer.v_bias).reshape(n, cfg.n_head_kv, hd)
        if layer.q_norm is not None:
            q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
        q, k = self._rotate(q, layer), self._rotate(k, layer)
        group = cfg.n_head // cfg.n_head_kv  # consecutive query heads share a key/value head
        # (1, heads, n, hd): SDPA's fused kernel (its GQA form and 3-d inputs fall back to a slower one)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
        if layer.window:
            pos = torch.arange(n)
            seen = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < layer.window)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=cfg.attention_scale)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.attention_scale)
        attn = attn[0].transpose(0, 1)
        out = _linear(layer.wo, attn.reshape(n, -1))
        x = x + (out if layer.post_attn_norm is None else self._norm(out, layer.post_attn_norm))
        h = self._norm(x, layer.ffn_norm)
        gate = _linear(layer.w_gate, h)
        act = F.silu(gate) if cfg.traits.ffn_activation == "silu" else F.gelu(gate, approximate="tanh")
        out = _linear(layer.w_down, act * _linear(layer.w_up, h))
        return x + (out if layer.post_ffn_norm is None else self._norm(out, layer.post_ffn_norm))

    def _rotate(self, x: torch.Tensor, layer) -> torch.Tensor:
        """RoPE as the runtime's (layer_steps.PromptSteps._rotate), not in place."""
        half = self.cfg.n_rot // 2
        cos, sin = layer.cos[:len(x), None, :], layer.sin[:len(x), None, :]
        if self.cfg.traits.rope_neox:
            a, b = x[..., :half], x[..., half:2 * half]
        else:
            a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        if self.cfg.traits.rope_neox:
            turned = torch.cat([ra, rb], -1)
        else:
            turned = torch.stack([ra, rb], -1).reshape(*x.shape[:-1], 2 * half)
        return torch.cat([turned, x[..., 2 * half:]], -1)

    def tuned_vectors(self) -> dict[str, np.ndarray]:
        """GGUF name -> the trained norm weights."""
        out = {"output_norm.weight": _array(self.output_norm)}
        for i, layer in enumerate(self.layers):
            for attr, short in {**_NORMS, "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}.items():
                if getattr(layer, attr) is not None:
                    out[f"blk.{i}.{short}.weight"] = _array(getattr(layer, attr))
        return out

    def tuned_parts(self) -> dict[str, Parts]:
        return {f"blk.{i}.{short}.weight": getattr(layer, attr).parts()
                for i, layer in enumerate(self.layers) for attr, short in _MATRICES.items()}


def _param(a: np.ndarray) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.array(a, np.float32)))


def _array(p: torch.Tensor) -> np.ndarray:
    return p.detach().numpy().astype(np.float32)


def _linear(m, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = m(x)
    return out if bias is None else out + bias


def kl_divergence(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    return F.kl_div(F.log_softmax(student_logits, -1), teacher_logprobs.float(), log_target=True,
                    reduction="batchmean")


class Teacher:
    """The original model in torch, in float: embedded tokens and the next-token
    log-probabilities at every position, computed when a step needs them (kept
    for all sequences they would take tokens x vocabulary floats)."""

    def __init__(self, model: Model):
        self.net = TorchModel(model, None)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def __call__(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.net.embed(tokens)
        with torch.no_grad():
            return x, F.log_softmax(self.net(x), -1)


def _mean_kl(student: TorchModel, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return float(np.mean([float(kl_divergence(student(x), t)) for x, t in batch]))


def code_step(student: TorchModel, batch: list[tuple[torch.Tensor, torch.Tensor]],
              fraction: float) -> tuple[float, float]:
    """PV-tuning's discrete step: the gradient of the KL at the current weights
    ranks every single-code change by its linearized effect; the best `fraction`
    of (row, group) slots change one code each. The KL on `batch` (embedded
    tokens, the teacher's log-probabilities) is measured before and after, and
    the change is undone unless it lowered it (then a quarter as many are tried,
    twice). Returns (KL before, KL after): after <= before always."""
    linears = [m for m in student.modules() if isinstance(m, AqlmLinear)]
    before = _mean_kl(student, batch)
    for m in linears:
        m.frozen = m.weight().detach().requires_grad_()
    for x, t in batch:
        (kl_divergence(student(x), t) / len(batch)).backward()
    proposals = [m.code_proposals() for m in linears]
    for m in linears:
        m.frozen = None
    # The quadratic model is only a guess of the curvature, and a poorer one in
    # some matrices than in others: each matrix changes its own best share, and
    # when the changes raise the measured loss, fewer are tried (a quarter, twice).
    for attempt in range(3):
        share = fraction / 4 ** attempt
        undo = []
        for m, (gain, book, entry) in zip(linears, proposals):
            n_change = int(share * gain.numel())
            if n_change == 0:
                continue
            threshold = torch.kthvalue(gain.reshape(-1), n_change).values
            rows, groups = torch.nonzero((gain <= threshold) & (gain < 0), as_tuple=True)
            books = book[rows, groups]
            undo.append((m, rows, groups, books, m.codes[groups, books, rows].clone()))
            m.codes[groups, books, rows] = entry[rows, groups].to(m.codes.dtype)
        after = _mean_kl(student, batch)
        if after < before:
            return before, after
        for m, rows, groups, books, old in undo:
            m.codes[groups, books, rows] = old
    return before, before


def _learning_rate_factor(step: int, steps: int) -> float:
    """A short warm-up (Adam's first moments are poor), then a cosine decay to 0:
    the last steps settle instead of jumping around the minimum."""
    warmup = max(1, min(_WARMUP, steps // 10))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps))


def finetune(src: GGUFFile, parts: dict[str, Parts], sequences: list[np.ndarray], steps: int,
             seed: int, code_fraction: float = CODE_FRACTION) -> tuple[dict[str, Parts], dict[str, np.ndarray]]:
    """Distil src into its AQLM form `parts` in `steps` Adam steps, one calibration
    sequence each, in turn (again from the first when there are fewer), the
    original's outputs computed as each step needs them. Every _CODE_EVERY steps
    a code step (code_step, `code_fraction` of the codes at most; 0: codes fixed)
    on the next sequences. Returns the tuned parts and the tuned norm weights by
    GGUF name."""
    torch.manual_seed(seed)
    model = Model(src, n_ctx=max(map(len, sequences)))
    missing = [name for name in (f"blk.{i}.{short}.weight" for i in range(model.config.n_layer)
                                 for short in _MATRICES.values()) if name not in parts]
    if missing:
        raise FinetuneError(f"fine-tuning needs every linear layer in AQLM form; {missing[0]} is not")
    teacher = Teacher(model)
    student = TorchModel(model, parts)
    student.head = teacher.net.head  # fixed in both: one copy (Qwen2.5's is 545 MB in float)
    scales = [p for name, p in student.named_parameters() if name.endswith(".scales")]
    others = [p for name, p in student.named_parameters() if not name.endswith(".scales")]
    optimizer = torch.optim.Adam([{"params": others, "lr": _LR}, {"params": scales, "lr": _SCALE_LR}],
                                 betas=_BETAS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, steps))
    progress = Progress("fine-tuning: KL to the original", steps, "steps")
    losses: list[float] = []
    for step in range(steps):
        x, target = teacher(sequences[step % len(sequences)])
        loss = kl_divergence(student(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress.step(f"KL {np.mean(losses[-_CODE_EVERY:]):.4f}")
        if code_fraction > 0 and (step + 1) % _CODE_EVERY == 0:
            batch = [teacher(sequences[(step + 1 + i) % len(sequences)]) for i in range(_CODE_BATCH)]
            before, after = code_step(student, batch, code_fraction)
            line_open = progress.done < progress.total  # the bar's line, redrawn in place
            print(("\n" if line_open else "") + f"  code step after {step + 1}: KL {before:.4f} -> {after:.4f}"
                  + ("" if after < before else " (undone)"), file=sys.stderr)
    return student.tuned_parts(), student.tuned_vectors()

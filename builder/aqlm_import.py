"""Published AQLM Hugging Face checkpoints -> our GGUF AQLM tensors, without
re-quantizing: the codes, codebooks and scales are re-laid, never re-fitted.

The AQLM project's layout (config.json quantization_config.quant_method "aqlm"),
per quantized linear layer PREFIX (e.g. model.layers.0.self_attn.q_proj):
    PREFIX.codes      int8 (int16 above 8 bits per code), (out / out_group_size,
                      in / in_group_size, num_codebooks); signed storage of
                      unsigned codes, read as code mod 2^nbits
    PREFIX.codebooks  float16, (num_codebooks, 2^nbits, out_group_size, in_group_size)
    PREFIX.scales     float16, (out / out_group_size, 1, 1, 1)
    W[o, g * in_group_size + j] = scales[o] * sum over c of codebooks[c, codes[o, g, c], 0, j]
Only the 2x8 scheme with groups of 8 inputs and 1 output (what the runtime
runs) is accepted. Like the weights, llama's q_proj and k_proj rows are
permuted from HF's rotate-half RoPE layout to GGUF's interleaved pairs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runtime import aqlm
from .gguf_rewrite import Tensor, rewrite_gguf

# HF module names -> GGUF matrix names (the .weight names the model loads).
_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_PREFIX = re.compile(r"model\.layers\.(\d+)\.(.+)")


class AqlmImportError(UserError, ValueError):
    """A checkpoint this importer cannot take (one line for the user)."""


def check_config(config: Mapping) -> None:
    """Refuse anything but AQLM 2x8 with groups of 8 inputs and 1 output."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "aqlm":
        raise AqlmImportError(f"not an AQLM checkpoint (quantization_config.quant_method is {q.get('quant_method')!r})")
    want = {"in_group_size": aqlm.IN_GROUP_SIZE, "num_codebooks": aqlm.NUM_CODEBOOKS,
            "nbits_per_codebook": 8, "out_group_size": 1}
    for key, value in want.items():
        if q.get(key) != value:
            raise AqlmImportError(f"AQLM {key} = {q.get(key)!r} is not supported (only the 2x8 scheme: "
                                  f"in_group_size 8, num_codebooks 2, nbits_per_codebook 8, out_group_size 1)")


def _row_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order taking HF's rotate-half q/k rows to GGUF llama's interleaved pairs:
    new row (head, i, s) is old row (head, s, i)."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).ravel()


def convert_linear(name: str, codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray,
                   rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's HF arrays -> (codes (in/8, 2, out) uint8, codebooks (2, 256, 8) float32,
    scales (out,) float32) as runtime/aqlm.py stores them; `rows`: a new order of the rows."""
    if codes.ndim != 3 or codes.shape[2] != aqlm.NUM_CODEBOOKS or codes.dtype.kind not in "iu":
        raise AqlmImportError(f"{name}.codes: expected integer codes (out, in/8, 2), got {codes.dtype} {codes.shape}")
    out_dim = codes.shape[0]
    if codebooks.shape != (aqlm.NUM_CODEBOOKS, aqlm.CODEBOOK_SIZE, 1, aqlm.IN_GROUP_SIZE):
        raise AqlmImportError(f"{name}.codebooks: expected shape (2, 256, 1, 8), got {codebooks.shape}")
    if scales.size != out_dim or scales.shape[0] != out_dim:
        raise AqlmImportError(f"{name}.scales: expected shape ({out_dim}, 1, 1, 1), got {scales.shape}")
    unsigned = (codes.astype(np.int64) % aqlm.CODEBOOK_SIZE).astype(np.uint8)
    flat_scales = scales.reshape(out_dim).astype(np.float32)
    if rows is not None:
        unsigned, flat_scales = unsigned[rows], flat_scales[rows]
    return (np.ascontiguousarray(unsigned.transpose(1, 2, 0)),
            np.ascontiguousarray(codebooks[:, :, 0, :], dtype=np.float32), np.ascontiguousarray(flat_scales))


def convert_checkpoint_tensors(tensors: Mapping[str, np.ndarray], config: Mapping
                               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split a checkpoint's tensors (HF name -> array) into (the AQLM layers as GGUF
    tensors: 'blk.N.attn_q.codes' etc., the other tensors untouched under their HF
    names, for the regular converter)."""
    check_config(config)
    text = config.get("text_config", config)
    arch = "llama" if any(a in ("LlamaForCausalLM", "MistralForCausalLM") for a in config.get("architectures", [])) \
        else None
    n_head = int(text.get("num_attention_heads", 0))
    n_head_kv = int(text.get("num_key_value_heads") or n_head)
    converted: dict[str, np.ndarray] = {}
    rest = dict(tensors)
    prefixes = sorted({name[:-len(".codes")] for name in tensors if name.endswith(".codes")})
    for prefix in prefixes:
        m = _PREFIX.fullmatch(prefix)
        if m is None or m.group(2) not in _MODULES:
            raise AqlmImportError(f"unexpected AQLM layer {prefix!r}")
        parts = {}
        for part in ("codes", "codebooks", "scales"):
            if f"{prefix}.{part}" not in rest:
                raise AqlmImportError(f"{prefix}: missing {prefix}.{part}")
            parts[part] = np.asarray(rest.pop(f"{prefix}.{part}"))
        module = m.group(2)
        rows = None
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = n_head if module == "self_attn.q_proj" else n_head_kv
            rows = _row_permutation(parts["codes"].shape[0], heads)
        codes, codebooks, scales = convert_linear(prefix, parts["codes"], parts["codebooks"], parts["scales"], rows)
        names = aqlm.tensor_names(f"blk.{m.group(1)}.{_MODULES[module]}.weight")
        converted[names["codes"]] = codes.view(np.int8)  # GGUF has no uint8 type: I8 holding the same bytes
        converted[names["codebooks"]] = codebooks
        converted[names["scales"]] = scales
    if not converted:
        raise AqlmImportError("the checkpoint has no AQLM layers (*.codes tensors)")
    return converted, rest


def read_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """All tensors of an HF folder's *.safetensors files (views of the files; BF16 as
    float32), and its config.json."""
    import json

    from .safetensors_reader import SafetensorsFile, to_float32

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AqlmImportError(f"{folder}: cannot read config.json ({e})") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        f = SafetensorsFile(shard)
        for entry in f.entries:
            raw = f.raw(entry)
            tensors[entry.name] = to_float32(raw, "BF16") if entry.dtype == "BF16" else raw
    if not tensors:
        raise AqlmImportError(f"{folder}: no *.safetensors files")
    return tensors, config


def write_gguf(base: Path, converted: Mapping[str, np.ndarray], dst: Path) -> None:
    """dst = the GGUF `base` (e.g. the same model converted from its other tensors)
    with the converted AQLM layers in place of its matrices of the same names."""
    replaced = {name.rsplit(".", 1)[0] + ".weight" for name in converted if name.endswith(".codes")}
    first = True

    def replace(tensor: Tensor) -> list[Tensor]:
        nonlocal first
        out = []
        if first:  # the AQLM layers go first; their names are new to the file
            out = [Tensor.of(name, array) for name, array in converted.items()]
            first = False
        return out if tensor.name in replaced else out + [tensor]  # leave the float matrices out

    rewrite_gguf(Path(base), Path(dst), replace, aqlm.METADATA)


# --- a whole checkpoint, through the regular converter -------------------------------------

_AQLM_PARTS = (".codes", ".codebooks", ".scales")


def is_aqlm_checkpoint(config: Mapping) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "aqlm"


class _ShardWithoutAqlm:
    """A shard whose AQLM tensors are held back from the regular converter (which
    refuses them) and copied into `aside` as they stream past."""

    def __init__(self, shard, aside: dict[str, np.ndarray]):
        self._shard, self._aside = shard, aside
        self.entries = [e for e in shard.entries if not e.name.endswith(_AQLM_PARTS)]

    def iter_tensors(self):
        for entry, raw in self._shard.iter_tensors():
            if entry.name.endswith(_AQLM_PARTS):
                self._aside[entry.name] = np.array(raw)  # a copy: the shard drops or reuses its pages
            else:
                yield entry, raw


class _SourceWithoutAqlm:
    """A checkpoint source (hf_convert.CheckpointSource) seen without its AQLM tensors."""

    def __init__(self, source):
        self._source, self.name, self.stem = source, source.name, source.stem
        self.aside: dict[str, np.ndarray] = {}

    def read_text(self, name: str):
        return self._source.read_text(name)

    def read_json(self, name: str):
        return self._source.read_json(name)

    def shard_names(self):
        return self._source.shard_names()

    def open_shard(self, name: str):
        return _ShardWithoutAqlm(self._source.open_shard(name), self.aside)


def import_checkpoint(source, dst: Path, convert) -> None:
    """dst = a GGUF of the AQLM checkpoint `source`: its other tensors (embeddings,
    norms, head) through `convert(source, path)`, the regular converter, and its
    AQLM layers re-laid as ours."""
    config = source.read_json("config.json") or {}
    check_config(config)
    without = _SourceWithoutAqlm(source)
    base = dst.with_name(f"{dst.stem}.base.gguf")
    try:
        convert(without, base)
        converted, _ = convert_checkpoint_tensors(without.aside, config)
        write_gguf(base, converted, dst)
    finally:
        base.unlink(missing_ok=True)

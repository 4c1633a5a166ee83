"""Llama-shaped GGUFs with random weights at real sizes, for `make bench-big`.

Shapes are Llama 3.2 1B and 3B and Llama 3.1 8B's; the vocabulary (and its
tokenizer metadata) is SmolLM2's, copied from its GGUF, so tokenizing works and
the head is 49152 rows. Weight types, as their llama.cpp namesakes lay them out:
- q4_0: every matrix Q4_0, the output head (or a tied embedding) Q6_K.
- q4_k_m: Q4_K, with attn_v, ffn_down and the head Q6_K.
- aqlm: every layer matrix AQLM 2x8 in our GGUF form, the embedding Q4_0 and the head Q6_K.
Weights are random bytes with small finite float16 scales (every bit pattern
of the quants is a valid block): the text is noise, the bytes read per token
are a real model's. Files are written once into models/big/ (temp + rename)
and reused. Not part of the product.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import REAL_MODELS  # noqa: E402

from llamazip.runtime import aqlm  # noqa: E402
from llamazip.runtime.ggml_types import BLOCK_GEOMETRY, GGMLType, row_bytes  # noqa: E402
from llamazip.runtime.gguf import GGUFFile  # noqa: E402

BIG_DIR = REAL_MODELS["smollm2"].path.parent / "big"


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    tied: bool
    rope_base: float = 500000.0


SHAPES = {
    "1b": Shape("1b", 2048, 8192, 16, 32, 8, tied=True),
    "3b": Shape("3b", 3072, 8192, 28, 24, 8, tied=True),
    "8b": Shape("8b", 4096, 14336, 32, 32, 8, tied=False),
}
KINDS = ("q4_0", "q4_k_m", "aqlm")

# Byte offsets of the float16 scale fields in each block, and the largest |weight| / scale
# the quants and sub-block scales reach (Q4_K: 63 * 15; Q6_K: 127 * 32).
_F16_FIELDS = {GGMLType.Q4_0: (0,), GGMLType.Q4_K: (0, 2), GGMLType.Q6_K: (208,)}
_MAGNITUDE = {GGMLType.Q4_0: 8, GGMLType.Q4_K: 945, GGMLType.Q6_K: 4064}


def path_for(shape: str, kind: str) -> Path:
    return BIG_DIR / f"llama-{shape}-{kind}.gguf"


def _random_rows(ggml_type: GGMLType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose weights come out around +-1/sqrt(cols): a matvec of a
    normed input stays of order one, layer after layer."""
    raw = rng.integers(0, 256, (rows, row_bytes(ggml_type, cols)), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, BLOCK_GEOMETRY[ggml_type][1])
    scale = 2.0 / np.sqrt(cols) / _MAGNITUDE[ggml_type]
    for offset in _F16_FIELDS[ggml_type]:
        values = rng.uniform(0.5, 1.0, blocks.shape[:2]) * scale
        blocks[:, :, offset:offset + 2] = values.astype(np.float16)[:, :, None].view(np.uint8)
    return raw


def _matrix_type(kind: str, name: str) -> GGMLType | None:
    """The GGML type of a layer matrix under `kind`; None for AQLM."""
    if kind == "q4_0":
        return GGMLType.Q4_0
    if kind == "q4_k_m":
        return GGMLType.Q6_K if name in ("attn_v", "ffn_down") else GGMLType.Q4_K
    return None


def _tensors(shape: Shape, kind: str):
    """(name, numpy shape of the stored array, GGML type, rows, cols) of every tensor, in file order."""
    hd = shape.dim // shape.n_head
    vocab = 49152
    embd_type = {"q4_0": GGMLType.Q4_0, "q4_k_m": GGMLType.Q4_K, "aqlm": GGMLType.Q4_0}[kind]
    if shape.tied:
        embd_type = GGMLType.Q6_K  # a tied embedding is the head: llama.cpp gives it the head's type
    yield "token_embd.weight", embd_type, vocab, shape.dim
    yield "output_norm.weight", GGMLType.F32, 1, shape.dim
    if not shape.tied:
        yield "output.weight", GGMLType.Q6_K, vocab, shape.dim
    matrices = {"attn_q": (shape.n_head * hd, shape.dim), "attn_k": (shape.n_head_kv * hd, shape.dim),
                "attn_v": (shape.n_head_kv * hd, shape.dim), "attn_output": (shape.dim, shape.n_head * hd),
                "ffn_gate": (shape.n_ff, shape.dim), "ffn_up": (shape.n_ff, shape.dim),
                "ffn_down": (shape.dim, shape.n_ff)}
    for i in range(shape.n_layer):
        yield f"blk.{i}.attn_norm.weight", GGMLType.F32, 1, shape.dim
        yield f"blk.{i}.ffn_norm.weight", GGMLType.F32, 1, shape.dim
        for name, (rows, cols) in matrices.items():
            yield f"blk.{i}.{name}.weight", _matrix_type(kind, name), rows, cols


def _data(name: str, ggml_type: GGMLType | None, rows: int, cols: int, rng: np.random.Generator):
    """[(tensor name, array, GGML type or None for plain F32/I8 arrays)] for one tensor."""
    if ggml_type == GGMLType.F32:
        return [(name, np.ones(cols, np.float32), None)]
    if ggml_type is not None:
        return [(name, _random_rows(ggml_type, rows, cols, rng), ggml_type)]
    parts = aqlm.tensor_names(name)
    codes = rng.integers(0, 256, (cols // aqlm.IN_GROUP_SIZE, aqlm.NUM_CODEBOOKS, rows), dtype=np.uint8)
    codebooks = rng.standard_normal((aqlm.NUM_CODEBOOKS, aqlm.CODEBOOK_SIZE, aqlm.IN_GROUP_SIZE), np.float32)
    scales = np.full(rows, 0.25 / np.sqrt(cols), np.float32)
    return [(parts["codes"], codes.view(np.int8), None), (parts["codebooks"], codebooks, None),
            (parts["scales"], scales, None)]


def _copy_vocabulary(writer: gguf.GGUFWriter, source: GGUFFile) -> None:
    """SmolLM2's tokenizer metadata, values and types as they are stored."""
    reader = gguf.GGUFReader(source.path)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                values = [bytes(field.parts[i]) for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(field.name, values, kind, sub_type=sub)
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_key_value(field.name, bytes(field.parts[field.data[0]]), kind)
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], kind)


def write(shape_name: str, kind: str, log=print) -> Path:
    """The model file, written if it is not there yet."""
    path = path_for(shape_name, kind)
    if path.exists():
        return path
    shape = SHAPES[shape_name]
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    log(f"writing {path} ...")
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(temp, "llama")
    writer.add_name(f"random Llama {shape_name} {kind}")
    writer.add_context_length(8192)
    writer.add_embedding_length(shape.dim)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_block_count(shape.n_layer)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.dim // shape.n_head)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(49152)
    if kind == "aqlm":
        for key, value in aqlm.METADATA.items():
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str)
                                 else gguf.GGUFValueType.UINT32)
    _copy_vocabulary(writer, GGUFFile(REAL_MODELS["smollm2"].path))
    specs = list(_tensors(shape, kind))
    # Tensor infos first (shapes and types only), then the data, one tensor at a time.
    for name, ggml_type, rows, cols in specs:
        for part, array, raw_type in _data(name, ggml_type, min(rows, 1), cols, np.random.default_rng(0)):
            full = _full_shape(part, array, ggml_type, rows, cols)
            nbytes = int(np.prod(full)) * array.dtype.itemsize
            if raw_type is not None:
                writer.add_tensor_info(part, (rows, row_bytes(raw_type, cols)), np.dtype(np.uint8), nbytes, raw_type)
            else:
                writer.add_tensor_info(part, full, array.dtype, nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, ggml_type, rows, cols in specs:
        for _, array, _ in _data(name, ggml_type, rows, cols, rng):
            writer.write_tensor_data(array)
    writer.close()
    os.replace(temp, path)
    return path


def _full_shape(part: str, array: np.ndarray, ggml_type: GGMLType | None, rows: int, cols: int) -> tuple:
    if ggml_type is not None and ggml_type != GGMLType.F32:
        return (rows, row_bytes(ggml_type, cols))
    if part.endswith(".codes"):
        return (cols // aqlm.IN_GROUP_SIZE, aqlm.NUM_CODEBOOKS, rows)
    if part.endswith(".scales"):
        return (rows,)
    return array.shape


if __name__ == "__main__":
    for shape in sys.argv[1:] or SHAPES:
        for kind in KINDS:
            write(shape, kind)

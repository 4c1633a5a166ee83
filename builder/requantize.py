"""Re-quantize a GGUF: each tensor is dequantized (runtime/dequant.py) and
quantized again under a --quantize scheme; metadata is copied with its types.

A tensor whose type the scheme keeps is copied byte for byte, so that no
tensor loses precision twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from ..errors import UserError
from ..runtime.dequant import DEQUANTIZERS, dequantize
from ..runtime.ggml_types import BLOCK_GEOMETRY
from ..runtime.gguf import GGUFFile
from .quantize import quantize_rows, target_type

# Keys the writer sets itself, or that describe the old file's layout.
_SKIPPED_KEYS = ("general.architecture", "general.alignment", "general.file_type")


class RequantizeError(UserError, ValueError):
    """A GGUF that cannot be re-quantized; the message is one line."""


def _value(field: gguf.ReaderField):
    """A field's value; strings as their bytes, since some vocabularies hold
    pieces that are not valid UTF-8 and must be copied as they are."""
    if field.types[-1] == gguf.GGUFValueType.STRING and len(field.types) <= 2:
        values = [bytes(field.parts[i]) for i in field.data]
        return values[0] if field.types[0] == gguf.GGUFValueType.STRING else values
    return field.contents()


def _copy_metadata(src: Path, w: gguf.GGUFWriter) -> None:
    reader = gguf.GGUFReader(str(src))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in _SKIPPED_KEYS:
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        w.add_key_value(field.name, _value(field), vtype, sub_type)


def requantize_gguf(src: Path, dst: Path, scheme: str,
                    progress: Callable[[int, int], None] | None = None) -> None:
    model = GGUFFile(src)
    plan = []
    for name, info in model.tensors.items():
        out_type = target_type(name, info.shape, info.ggml_type, scheme)
        if out_type != info.ggml_type and info.ggml_type not in DEQUANTIZERS:
            raise RequantizeError(f"{src}: tensor {name!r} is {info.ggml_type.name}, which cannot be re-quantized")
        plan.append((name, info, out_type))

    w = gguf.GGUFWriter(str(dst), model.architecture)
    _copy_metadata(src, w)
    for name, info, out_type in plan:
        block, size = BLOCK_GEOMETRY[out_type]
        w.add_tensor_info(name, info.shape, np.dtype(np.float32), math.prod(info.shape) // block * size,
                          raw_dtype=gguf.GGMLQuantizationType(int(out_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(info.nbytes for _, info, _ in plan) or 1
    done = 0
    for name, info, out_type in plan:
        raw = model.tensor_data(name)
        if out_type == info.ggml_type:
            w.write_tensor_data(np.ascontiguousarray(raw))
        else:
            w.write_tensor_data(quantize_rows(raw, lambda rows: dequantize(rows, info.ggml_type, info.ncols),
                                              out_type))
        done += info.nbytes
        if progress:
            progress(done, total)
    w.close()

"""Re-quantize a GGUF: each tensor is dequantized (runtime/weight_types.py) and
quantized again under a --quantize scheme; metadata is copied with its types.

A tensor whose type the scheme keeps is copied byte for byte, so that no
tensor loses precision twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..runtime.gguf import GGUFFile
from ..runtime.weight_types import WEIGHT_TYPES, dequantize
from .gguf_rewrite import Tensor, rewrite_gguf
from .quantize import quantize_rows, target_type


class RequantizeError(UserError, ValueError):
    """A GGUF that cannot be re-quantized; the message is one line."""


def requantize_gguf(src: Path, dst: Path, scheme: str,
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Write dst: src with every tensor in the type `scheme` gives it;
    `progress(done, total)` in bytes of src."""
    model = GGUFFile(src)

    def replace(tensor: Tensor) -> list[Tensor] | None:
        info = model.tensors[tensor.name]
        out_type = target_type(tensor.name, info.shape, info.ggml_type, scheme)
        if out_type == info.ggml_type:
            return None
        if info.ggml_type not in WEIGHT_TYPES:
            raise RequantizeError(f"{src}: tensor {tensor.name!r} is {info.ggml_type.name}, "
                                  "which cannot be re-quantized")

        def data():  # when it is written: one re-quantized tensor in memory at a time
            return quantize_rows(model.tensor_data(info.name),
                                 lambda rows: dequantize(rows, info.ggml_type, info.ncols), out_type)
        return [Tensor(tensor.name, info.shape, out_type, data)]

    # general.file_type describes the old tensor types.
    rewrite_gguf(src, dst, replace, drop_metadata=("general.file_type",), progress=progress)

"""Write a copy of a GGUF file with some tensors replaced, added or dropped.

All metadata is copied with its types. Strings are copied as bytes, because
some vocabularies hold pieces that are not valid UTF-8. A callback sees each
source tensor and says what goes in its place. Every replacement is planned
before the file is opened, so a callback that raises leaves no output. A
replacement may hold a function instead of an array: it is called when the
tensor is written, so that only one such tensor is in memory at a time. The
output is written to a temp file beside dst and renamed over dst at the end.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..runtime.ggml_types import BLOCK_GEOMETRY, GGMLType

# Keys the writer sets itself: the architecture from its constructor, and
# general.alignment, because the writer aligns tensors by its own setting and
# a copied value could disagree with it.
_WRITER_KEYS = ("general.architecture", "general.alignment")
_ARRAY_TYPES = {np.dtype(np.float32): GGMLType.F32, np.dtype(np.float16): GGMLType.F16,
                np.dtype(np.float64): GGMLType.F64, np.dtype(np.int8): GGMLType.I8,
                np.dtype(np.int16): GGMLType.I16, np.dtype(np.int32): GGMLType.I32,
                np.dtype(np.int64): GGMLType.I64}


@dataclass(frozen=True)
class Tensor:
    """One tensor: its shape in elements (numpy order, rows first) and type; `data`
    is its stored form (anything with those bytes), or a function returning it."""
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    data: np.ndarray | Callable[[], np.ndarray]

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> "Tensor":
        """A tensor holding a float or integer numpy array as it is."""
        if array.dtype not in _ARRAY_TYPES:
            raise ValueError(f"{name}: no GGUF type for numpy {array.dtype}")
        return cls(name, tuple(array.shape), _ARRAY_TYPES[array.dtype], array)

    @property
    def nbytes(self) -> int:
        block, size = BLOCK_GEOMETRY[self.ggml_type]
        return math.prod(self.shape) // block * size


# A source tensor -> None to keep it as it is, or the tensors to write in its
# place, in order (empty: drop it; the source tensor itself may be among them).
Replace = Callable[[Tensor], "Iterable[Tensor] | None"]


def field_value(field: gguf.ReaderField):
    """A metadata field's value as GGUFWriter.add_key_value takes it; strings and
    arrays of strings as bytes, so that they are copied as they are."""
    if field.types[-1] == gguf.GGUFValueType.STRING and len(field.types) <= 2:
        values = [bytes(field.parts[i]) for i in field.data]
        return values[0] if field.types[0] == gguf.GGUFValueType.STRING else values
    return field.contents()


def _metadata_type(key: str, value) -> gguf.GGUFValueType:
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, int) and not isinstance(value, bool):
        return gguf.GGUFValueType.UINT32
    raise TypeError(f"metadata {key}: only str and int values can be added, not {type(value).__name__}")


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, extra: Mapping[str, str | int] | None = None,
                  drop: Iterable[str] = ()) -> None:
    """Give `writer` every field of `reader` except those named in `drop`, with the
    values of `extra` (str or int, the latter as UINT32) in place of the same keys or after them."""
    extra, skipped = dict(extra or {}), set(drop) | set(_WRITER_KEYS)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skipped:
            continue
        if field.name in extra:
            value = extra.pop(field.name)
            writer.add_key_value(field.name, value, _metadata_type(field.name, value))
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(field.name, field_value(field), vtype, sub_type)
    for key, value in extra.items():
        writer.add_key_value(key, value, _metadata_type(key, value))


def source_tensors(reader: gguf.GGUFReader) -> list[Tensor]:
    """The tensors of `reader`, their data views into its memory map."""
    return [Tensor(t.name, tuple(int(d) for d in reversed(t.shape)), GGMLType(int(t.tensor_type)), t.data)
            for t in reader.tensors]


def _plan(sources: list[Tensor], replace: Replace) -> list[tuple[int, list[Tensor]]]:
    """(source bytes, the tensors written for it) for each source tensor."""
    plan, seen = [], set()
    for source in sources:
        out = replace(source)
        out = [source] if out is None else list(out)
        for tensor in out:
            if tensor.name in seen:
                raise ValueError(f"tensor {tensor.name!r} written twice")
            seen.add(tensor.name)
        plan.append((source.nbytes, out))
    return plan


def _write_data(writer: gguf.GGUFWriter, plan: list[tuple[int, list[Tensor]]],
                progress: Callable[[int, int], None] | None) -> None:
    total, done = sum(n for n, _ in plan) or 1, 0
    for source_bytes, tensors in plan:
        for t in tensors:
            data = np.ascontiguousarray(t.data() if callable(t.data) else t.data)
            if data.nbytes != t.nbytes:
                raise ValueError(f"tensor {t.name!r}: {data.nbytes} bytes of data, its shape and type need {t.nbytes}")
            writer.write_tensor_data(data)
        done += source_bytes
        if progress:
            progress(done, total)


def rewrite_gguf(src: Path, dst: Path, replace: Replace | None = None, extra_metadata: Mapping | None = None, *,
                 drop_metadata: Iterable[str] = (), progress: Callable[[int, int], None] | None = None) -> None:
    """Write dst: src's metadata (less `drop_metadata`, plus `extra_metadata`) and
    its tensors as `replace` has them. `progress(done, total)` counts the source
    tensors' bytes whose replacements are written."""
    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(str(src))
    plan = _plan(source_tensors(reader), replace or (lambda tensor: None))
    writer = gguf.GGUFWriter(None, reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer, extra_metadata, drop_metadata)
    for _, tensors in plan:
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(int(t.ggml_type)))
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_data(writer, plan, progress)
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the output private
        os.replace(tmp, dst)
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)

"""The one safetensors header reader: every stage that opens a .safetensors file (a base checkpoint, a
LoRA, an embedding) reads its header here, with numpy alone and without reading the weights.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor names, dtypes,
shapes, byte offsets and a `__metadata__` dict of strings) and the tensor bytes. The reader checks the
layout (contiguous offsets, sizes that fit the dtypes, a complete data region), so a truncated, padded
or renamed file is named as such rather than failing later inside torch or kohya.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermkohya.errors import DermkohyaError

MAX_HEADER_BYTES = 100 * 1024 * 1024

# dtype → (itemsize, numpy dtype for the finite check or None when numpy cannot read it directly)
DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, None),
    "F8_E4M3": (1, None), "F8_E5M2": (1, None),
    "I64": (8, "<i8"), "I32": (4, "<i4"), "I16": (2, "<i2"), "I8": (1, "i1"),
    "U64": (8, "<u8"), "U32": (4, "<u4"), "U16": (2, "<u2"), "U8": (1, "u1"), "BOOL": (1, "?"),
}  # fmt: skip

@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; `start`/`end` are relative to the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsFile:
    """A parsed, structurally validated header: offsets are contiguous and the data region is complete."""

    path: Path
    header_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    file_size: int

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size

    def in_file_order(self) -> list[TensorEntry]:
        return sorted(self.tensors.values(), key=lambda t: t.start)


def read_header(path: Path, *, fix: str = "re-copy or re-train it") -> SafetensorsFile:
    """Parse and validate the header; a truncated, padded or tampered layout raises with the reason and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise DermkohyaError(f"{path}: not found (give the path of a .safetensors file)")
    size = path.stat().st_size

    def bad(reason: str) -> DermkohyaError:
        return DermkohyaError(f"{path}: not a valid safetensors file: {reason} ({fix})")

    if size < 8:
        raise bad(f"only {size} bytes, the file is truncated")
    with path.open("rb") as f:
        head = f.read(8)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise bad("it is a pickle (a .ckpt or torch.save file) with a .safetensors name; give it its .ckpt name, "
                      "or convert it to safetensors")
        header_size = int.from_bytes(head, "little")
        if header_size > MAX_HEADER_BYTES or header_size > size - 8:
            raise bad(f"header length {header_size} exceeds the file ({size} bytes): truncated or not safetensors")
        raw = f.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("`__metadata__` must map names to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (0 <= start <= end):
            raise bad(f"tensor {name!r} has an invalid shape {list(shape)} or offsets {[start, end]}")
        if end - start != int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][0]:
            raise bad(f"tensor {name!r}: {end - start} bytes do not fit {dtype} {list(shape)}")
        tensors[name] = TensorEntry(name, dtype, shape, start, end)

    position = 0
    for entry in sorted(tensors.values(), key=lambda t: t.start):
        if entry.start != position:
            raise bad(f"tensor {entry.name!r} starts at byte {entry.start}, expected {position} (overlap or gap)")
        position = entry.end
    data_size = size - 8 - header_size
    if data_size < position:
        raise bad(f"tensor data is {data_size} bytes but the header declares {position}: the file is truncated")
    if data_size > position:
        raise bad(f"{data_size - position} unexpected bytes after the last tensor")
    return SafetensorsFile(path, header_size, dict(metadata), tensors, size)



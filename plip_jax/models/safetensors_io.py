"""A small, strict safetensors reader: memory-mapped, bf16/f16/f32 via ml_dtypes, and clear errors for
truncated or corrupt files (the `safetensors` package's numpy backend cannot read bf16)."""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from plip_jax.core.errors import CorruptWeightsError, MissingTensorError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Read-only view of one safetensors file. `names()`, `shape(name)`, `dtype(name)`, `get(name)`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fix = f"re-download or re-save {self.path.name} (it is truncated or not a safetensors file)"
        size = self.path.stat().st_size
        if size < 8:
            raise CorruptWeightsError(f"{self.path}: {size} bytes is too short for a safetensors file; {fix}")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8 or header_len > 100_000_000:
                raise CorruptWeightsError(
                    f"{self.path}: header length {header_len} exceeds the file size {size}; {fix}"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorruptWeightsError(f"{self.path}: corrupt safetensors header (not valid JSON: {e}); {fix}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        for name, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                begin, end = e["data_offsets"]
                shape = tuple(e["shape"])
            except (KeyError, TypeError, ValueError):
                raise CorruptWeightsError(f"{self.path}: malformed header entry for tensor {name!r}; {fix}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end > data_len or end - begin != nbytes or begin < 0:
                raise CorruptWeightsError(
                    f"{self.path}: tensor {name!r} needs bytes [{begin}, {end}) of a {data_len}-byte data "
                    f"section (expected {nbytes} bytes for shape {list(shape)} {e['dtype']}); {fix}"
                )
        self._mm = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        return tuple(self._entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a (read-only, memory-mapped) numpy array in its stored dtype."""
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        e = self._entries[name]
        begin, end = e["data_offsets"]
        arr = np.frombuffer(self._mm, dtype=_DTYPES[e["dtype"]], count=(end - begin) // np.dtype(_DTYPES[e["dtype"]]).itemsize,
                            offset=self._data_start + begin)
        return arr.reshape(e["shape"])


class WeightStore:
    """All tensors of a (possibly sharded) checkpoint, by name."""

    def __init__(self, files: list[Path]):
        self.files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for n in f.names():
                self._where[n] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> tuple:
        return self._file(name).shape(name)

    def dtype_name(self, name: str) -> str:
        return self._file(name).dtype_name(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            where = ", ".join(str(f.path.name) for f in self.files)
            raise MissingTensorError(
                f"tensor {name!r} is missing from the checkpoint ({where}); the files are incomplete or "
                f"belong to another architecture: re-download the model or check config.json's model_type"
            )
        return self._where[name]

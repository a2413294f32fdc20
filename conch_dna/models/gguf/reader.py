"""Reading a GGUF file's header, every count, length and offset checked against the file's size, and
its tensors' bytes, row by row, without loading the file.

A GGUF file is a header (metadata key-values, then one entry per tensor: name, shape, storage type,
offset) and the tensors' data, aligned. Files come from the internet (Ollama, LM Studio, the Hugging
Face hub), so nothing the header says is trusted: a string longer than the rest of the file, a
count of tensors that could not fit, dimensions whose product overflows, data past the end are
each refused with the reason, in time and memory bounded by the header's real size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME_BYTES = 1 << 16
DEFAULT_ALIGNMENT = 32
# metadata value types: id -> (struct code, bytes); 8 is a string, 9 an array
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # a key's length, one byte of key, its type, the smallest value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, one byte of name, n_dims, one dim, type, offset


class GGUFError(ValueError):
    """A file that is not a GGUF file this reader can trust; the message says what is wrong, where."""


def type_sizes() -> dict[int, tuple[str, int, int]]:
    """Every ggml storage type: id -> (name, values per block, bytes per block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: its name, shape (GGUF order: the fastest-varying dimension first),
    storage type and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int  # from the start of the file
    nbytes: int
    row_bytes: int  # bytes of one row (shape[0] values)

    @property
    def rows(self) -> int:
        return self.nbytes // self.row_bytes

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The shape in numpy's (and safetensors') order: slowest-varying first."""
        return tuple(reversed(self.shape))

    @property
    def values(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Reads little-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left():
            raise GGUFError(f"{self.path.name}: {what} needs {n} bytes at offset {self.pos}, "
                            f"but the file has {self.left()} left")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, code: str, what: str):
        size = struct.calcsize("<" + code)
        return struct.unpack("<" + code, self.take(size, what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise GGUFError(f"{self.path.name}: {what} is {n} bytes long, over the limit of {limit}")
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path.name}: {what} is not UTF-8") from None


@dataclass
class GGUFFile:
    """A GGUF file's header, checked, and its tensors' bytes on demand (the file is memory-mapped,
    so reading a tensor costs its pages, not the file)."""

    path: Path
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    _map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFError(f"{path.name} is {size} bytes: too short for a GGUF header")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return cls._parse(path, mapped)
        except BaseException:
            mapped.close()
            raise

    @classmethod
    def _parse(cls, path: Path, mapped: mmap.mmap) -> GGUFFile:
        c = _Cursor(mapped, path)
        if bytes(c.take(4, "the magic")) != MAGIC:
            raise GGUFError(f"{path.name} is not a GGUF file (no GGUF magic)")
        version = c.unpack("I", "the version")
        if version not in (2, 3):
            raise GGUFError(f"{path.name}: GGUF version {version} (this reader knows 2 and 3)")
        n_tensors, n_kv = c.unpack("Q", "the tensor count"), c.unpack("Q", "the metadata count")
        if n_kv > c.left() // _MIN_KV_BYTES:
            raise GGUFError(f"{path.name}: {n_kv} metadata entries cannot fit in its {len(mapped)} bytes")
        metadata = {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}", MAX_NAME_BYTES)
            if key in metadata:  # which one would count? ggml refuses the file too
                raise GGUFError(f"{path.name}: the metadata has the key {key!r} twice")
            metadata[key] = _value(c, c.unpack("I", f"the type of {key!r}"), key)
        if n_tensors > c.left() // _MIN_TENSOR_BYTES:
            raise GGUFError(f"{path.name}: {n_tensors} tensors cannot fit in its {len(mapped)} bytes")
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise GGUFError(f"{path.name}: general.alignment {alignment!r} is not a power of two")
        entries = [_tensor_entry(c, i) for i in range(n_tensors)]
        data_start = -(-c.pos // alignment) * alignment
        sizes, tensors, names, expected = type_sizes(), [], set(), 0
        for name, shape, type_id, offset in entries:
            if name in names:
                raise GGUFError(f"{path.name}: two tensors are named {name!r}")
            names.add(name)
            tensor = _checked_tensor(path, name, shape, type_id, offset, data_start, alignment, len(mapped), sizes)
            # as ggml reads a file: each tensor's data right after the one before, padded to the alignment, so
            # no two tensors share bytes and a file cannot claim more data than it holds
            if offset != expected:
                raise GGUFError(f"{path.name}: tensor {name!r} has offset {offset}, expected {expected} (tensors "
                                "must lie in order, each after the one before, as ggml requires)")
            expected += -(-tensor.nbytes // alignment) * alignment
            tensors.append(tensor)
        return cls(path, version, metadata, tensors, mapped)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def raw_rows(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The stored bytes of rows [start, stop) of a tensor, uint8 [rows, row_bytes], not copied."""
        stop = info.rows if stop is None else stop
        begin = info.offset + start * info.row_bytes
        return np.frombuffer(self._map, np.uint8, (stop - start) * info.row_bytes, begin).reshape(
            stop - start, info.row_bytes)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of it is still alive; it goes with the last one
                pass
            self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _value(c: _Cursor, value_type: int, key: str, depth: int = 0):
    if value_type in _SCALARS:
        code, _ = _SCALARS[value_type]
        return c.unpack(code, f"the value of {key!r}")
    if value_type == _STRING:
        return c.string(f"the value of {key!r}")
    if value_type == _ARRAY:
        if depth > 0:
            raise GGUFError(f"{c.path.name}: {key!r} is an array of arrays")
        item_type, count = c.unpack("I", f"the item type of {key!r}"), c.unpack("Q", f"the length of {key!r}")
        if item_type in _SCALARS:
            size = _SCALARS[item_type][1]
            if count > c.left() // size:
                raise GGUFError(f"{c.path.name}: {key!r} claims {count} items; they cannot fit in the file")
            values = np.frombuffer(c.take(count * size, f"the items of {key!r}"), _NUMPY[item_type]).copy()
            return values.astype(bool) if item_type == 7 else values
        if item_type == _STRING:
            if count > c.left() // 8:
                raise GGUFError(f"{c.path.name}: {key!r} claims {count} strings; they cannot fit in the file")
            return [c.string(f"item {j} of {key!r}") for j in range(count)]
        raise GGUFError(f"{c.path.name}: {key!r} is an array of type {item_type}, which GGUF does not have")
    raise GGUFError(f"{c.path.name}: {key!r} has value type {value_type}, which GGUF does not have")


def _tensor_entry(c: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
    name = c.string(f"the name of tensor {i}", MAX_NAME_BYTES)
    n_dims = c.unpack("I", f"the dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{c.path.name}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
    shape = tuple(c.unpack("Q", f"a dimension of {name!r}") for _ in range(n_dims))
    return name, shape, c.unpack("I", f"the type of {name!r}"), c.unpack("Q", f"the offset of {name!r}")


def _checked_tensor(path: Path, name: str, shape: tuple[int, ...], type_id: int, offset: int, data_start: int,
                    alignment: int, file_size: int, sizes: dict) -> TensorInfo:
    if type_id not in sizes:
        raise GGUFError(f"{path.name}: tensor {name!r} has storage type {type_id}, which ggml does not have")
    type_name, block, block_bytes = sizes[type_id]
    if any(d < 1 for d in shape):
        raise GGUFError(f"{path.name}: tensor {name!r} has shape {shape}: every dimension must be at least 1")
    if shape[0] % block:
        raise GGUFError(f"{path.name}: tensor {name!r} has rows of {shape[0]} values, not a multiple of "
                        f"{type_name}'s blocks of {block}")
    values = 1
    for d in shape:  # Python integers: a product that would overflow 64 bits is caught, not wrapped
        values *= d
    row_bytes = shape[0] // block * block_bytes
    nbytes = values // block * block_bytes
    if offset % alignment:
        raise GGUFError(f"{path.name}: tensor {name!r} starts at offset {offset}, not aligned to {alignment}")
    if data_start + offset + nbytes > file_size:
        raise GGUFError(f"{path.name}: tensor {name!r} ({type_name} {shape}, {nbytes} bytes at data offset "
                        f"{offset}) ends past the end of the file ({file_size} bytes)")
    return TensorInfo(name, shape, type_id, type_name, data_start + offset, nbytes, row_bytes)

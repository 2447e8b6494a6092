"""A GGUF file's metadata and tensors, read in one pass over a memory map.

The ``gguf`` package's ``GGUFReader`` builds a numpy memmap for every part of
every metadata value: seconds for a 49k-token vocabulary, most of a cold start.
This reads the same format (GGUF v2 and v3: header, key/value metadata, tensor
infos, aligned data) with ``struct`` and gives each tensor's bytes as a plain
numpy view of the mapped file. ``gguf`` still names the tensor types and
dequantizes the types read here as bytes (tests/test_runtime_gguf_file.py
compares both readers on the default model and on written files).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# tensor types kept as numbers (GGUFReader's choice too); the rest are raw bytes
_NUMERIC = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
            "I16": np.int16, "I32": np.int32, "I64": np.int64}


@dataclass
class GGUFTensor:
    """One tensor: ``shape`` in row-major (numpy / Hugging Face) order; ``data``
    a read-only view of the file: typed for float/int types, else uint8 bytes
    shaped [*shape[:-1], bytes per row] (as ``gguf.GGUFReader`` gives them)."""
    name: str
    tensor_type: object          # gguf.GGMLQuantizationType
    shape: tuple
    data: np.ndarray


class _Cursor:
    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        s = bytes(self.buf[self.pos:end]).decode("utf-8", errors="replace")
        self.pos = end
        return s

    def _strings(self, n: int) -> list:
        buf, pos, size, out = self.buf, self.pos, len(self.buf), []
        length = _U64.unpack_from
        for _ in range(n):
            (m,) = length(buf, pos)
            pos += 8
            if pos + m > size:
                raise ValueError(f"a string of {m} bytes runs past the end of the file")
            out.append(buf[pos:pos + m].decode("utf-8", errors="replace"))
            pos += m
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("I"), self.take("Q")
            if etype in _SCALARS and etype != 7:        # numbers: one frombuffer
                dt = np.dtype("<" + _SCALARS[etype])
                if self.pos + n * dt.itemsize > len(self.buf):
                    raise ValueError(f"an array of {n} values runs past the end of the file")
                a = np.frombuffer(self.buf, dt, n, self.pos)
                self.pos += n * dt.itemsize
                return a.tolist()
            if etype == _STRING:            # vocabularies: ~100k strings, one tight loop
                return self._strings(n)
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"unknown GGUF metadata value type {vtype}")


def read(path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata {key: value}, tensors) of the GGUF file at ``path``.

    Values are Python objects (str, int, float, bool, lists of them), as
    ``gguf``'s ``ReaderField.contents()`` gives them. The tensors' data stays
    mapped: it is read when used. Raises ValueError for a file that is not
    GGUF, of an unknown version, or cut short.
    """
    import gguf

    with open(Path(path), "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:                 # mmap of an empty file
            raise ValueError("the file is empty") from None
    try:
        return _parse(buf, gguf)
    except struct.error as e:
        raise ValueError(f"the file is cut short or corrupt ({e})") from None


def _parse(buf, gguf) -> tuple[dict, list[GGUFTensor]]:
    c = _Cursor(buf)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("bad magic: not a GGUF file")
    c.pos = 4
    version = c.take("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.take("Q"), c.take("Q")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.take("Q") for _ in range(c.take("I"))]
        infos.append((name, dims, c.take("I"), c.take("Q")))
    align = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))
    start = -(-c.pos // align) * align
    arr = np.frombuffer(buf, np.uint8)
    tensors = []
    for name, dims, ttype, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown type {ttype}") from None
        shape = tuple(int(d) for d in reversed(dims)) or (1,)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise ValueError(f"tensor {name!r}: a row of {shape[-1]} is not whole "
                             f"{qtype.name} blocks of {block}")
        row_bytes = shape[-1] // block * type_size
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        lo = start + offset
        if lo + nbytes > len(arr):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        raw = arr[lo:lo + nbytes]
        if qtype.name in _NUMERIC:
            data = raw.view(_NUMERIC[qtype.name]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, qtype, shape, data))
    return meta, tensors

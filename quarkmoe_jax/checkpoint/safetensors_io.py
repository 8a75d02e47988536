"""Strict, lazy reading and writing of safetensors files, with every dtype Quark checkpoints use.

The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data
(offsets relative to the end of the header, row-major, little-endian).

We read it ourselves (memory-mapped, one tensor at a time) because the ``safetensors`` package's numpy and
flax back ends handle neither float8 nor bfloat16 as numpy arrays, and Quark's FP8 checkpoints store
``F8_E4M3``. Files written here load in the ``safetensors`` package (tests check it) and vice versa. Every
malformed file raises :class:`CheckpointError` naming the file and, where relevant, the tensor.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pathlib
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

__all__ = ["CheckpointError", "SafetensorsFile", "CheckpointReader", "save_file", "new_checkpoint_folder", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file, tensor or key is missing or malformed."""


class SafetensorsFile:
    """One safetensors file, opened lazily: the header is parsed and checked, tensors are read on demand.

    Use as a context manager or call :meth:`close`. ``get(name)`` returns a numpy array (a copy, so the file
    can be closed afterwards).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint file {self.path}: {e.strerror}") from e
        try:
            self._parse_header()
        except Exception:
            self._file.close()
            raise

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._fail(f"not a safetensors file: {size} bytes, too short for the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise self._fail(
                f"not a safetensors file or truncated: header length {header_len} with a file of {size} bytes"
            )
        try:
            header = json.loads(self._file.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"not a safetensors file: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise self._fail("not a safetensors file: header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise self._fail(f"tensor {name!r}: malformed header entry {entry!r}") from e
            if dtype_name not in DTYPES:
                raise self._fail(f"tensor {name!r}: unsupported dtype {dtype_name!r}; expected one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype_name]
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise self._fail(
                    f"tensor {name!r}: {dtype_name}{list(shape)} needs {expected} bytes, header gives {end - begin}"
                )
            if end > data_size:
                raise self._fail(
                    f"truncated: tensor {name!r} ends at byte {end} of the data section, which has {data_size}"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > self._data_start else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of a tensor without reading it."""
        if name not in self._entries:
            raise self._fail(f"no tensor named {name!r}")
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def get(self, name: str) -> np.ndarray:
        dtype, shape = self.info(name)
        _, _, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        buffer = self._mmap[self._data_start + begin : self._data_start + end]
        return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()

    def view(self, name: str) -> np.ndarray:
        """A read-only array over the memory-mapped bytes (no copy: slicing it reads only the pages the slice
        touches). Valid until the file is closed."""
        dtype, shape = self.info(name)
        _, _, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.frombuffer(
            self._mmap, dtype=dtype, count=int(np.prod(shape)), offset=self._data_start + begin
        ).reshape(shape)

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view from view() is still alive: the map closes when it is collected
                pass
            self._mmap = None
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointReader(Mapping):
    """All tensors of a Hugging Face checkpoint folder (one file, or shards with an index), read lazily.

    ``reader[name]`` reads one tensor; ``reader.info(name)`` gives dtype and shape without reading.
    Accepts a folder holding ``model.safetensors.index.json`` (its ``weight_map``) or ``*.safetensors``
    files, or a single ``.safetensors`` file.
    """

    def __init__(self, path: str | os.PathLike):
        path = pathlib.Path(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from e
                files = sorted({path / f for f in weight_map.values()})
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no .safetensors files found")
        else:
            raise CheckpointError(f"checkpoint path {path} does not exist")
        self.path = path
        self._files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            for f in files:
                st = SafetensorsFile(f)
                self._files.append(st)
                for name in st.keys():
                    if name in self._where:
                        raise CheckpointError(f"tensor {name!r} appears in both {self._where[name].path} and {f}")
                    self._where[name] = st
        except Exception:
            self.close()
            raise

    def _file_of(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}") from None

    def __getitem__(self, name: str) -> np.ndarray:
        return self._file_of(name).get(name)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        return self._file_of(name).info(name)

    def view(self, name: str) -> np.ndarray:
        """:meth:`SafetensorsFile.view`: a zero-copy array over the file (valid while the reader is open)."""
        return self._file_of(name).view(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write ``tensors`` (numpy or JAX arrays of any dtype in :data:`DTYPES`) as one safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (keeps 0-d arrays 0-d)
        if array.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r}: dtype {array.dtype} has no safetensors name")
        nbytes = array.nbytes
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        arrays.append(array)
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


@contextlib.contextmanager
def new_checkpoint_folder(
    out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: tuple[str | os.PathLike, ...] = ()
) -> Iterator[pathlib.Path]:
    """A temporary folder beside ``out_dir`` to write a checkpoint into; it becomes ``out_dir`` only when the
    ``with`` block succeeds (a failure removes it, so nothing is ever half-written).

    Refused (:class:`CheckpointError`) unless ``overwrite``: an ``out_dir`` that is one of ``inputs`` (the
    folders the writer reads), lies inside one, or is a non-empty folder or a file. Always refused: an
    ``out_dir`` that contains an input (replacing it would delete what is read). With ``overwrite`` the old
    ``out_dir`` is replaced as a whole after the new one is complete.
    """
    out_dir = pathlib.Path(out_dir)
    target = out_dir.resolve()
    for source in inputs:
        source = pathlib.Path(source).resolve()
        if target != source and target in source.parents:
            raise CheckpointError(f"output {out_dir} contains the input {source}: choose another folder")
        if not overwrite and (target == source or source in target.parents):
            where = "is" if target == source else "is inside"
            raise CheckpointError(
                f"output {out_dir} {where} the input checkpoint {source}: choose another folder (or pass overwrite)"
            )
    if not overwrite and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "a non-empty folder" if out_dir.is_dir() else "a file"
        raise CheckpointError(f"output {out_dir} is {what}: choose a new or empty folder (or pass overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.is_dir() and not out_dir.is_symlink():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
    elif out_dir.exists() or out_dir.is_symlink():
        out_dir.unlink()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

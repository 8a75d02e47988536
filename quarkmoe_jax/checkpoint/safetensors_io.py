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
import math
import mmap
import os
import pathlib
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from quarkmoe_jax.errors import CheckpointError
from quarkmoe_jax.files import MAX_JSON_BYTES, open_regular_file, read_json_file

__all__ = [
    "folder_file",
    "CheckpointError",
    "SafetensorsFile",
    "CheckpointReader",
    "save_file",
    "new_checkpoint_folder",
    "read_json_file",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
]

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
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""The largest safetensors header read (the ``safetensors`` library allows 100 MB). A header entry takes
about 100 bytes, so this is ~160k tensors in one file; parsing it costs ~10x its size in memory."""


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise _DuplicateKey(key)
        keys.add(key)
    return dict(pairs)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SafetensorsFile:
    """One safetensors file, opened lazily: the header is parsed and checked, tensors are read on demand.

    The header is held to the ``safetensors`` library's own checks and a few more, before anything is
    allocated: a regular file (no FIFO or device), a header of at most :data:`MAX_HEADER_BYTES` holding one
    JSON object of unique tensor names, each entry a known dtype, a shape of non-negative integers and two
    integer ``data_offsets`` whose span is exactly the shape's bytes; the tensors tile the data section
    exactly (no gap, no overlap, nothing after the last); ``__metadata__`` maps strings to strings.

    Use as a context manager or call :meth:`close`. ``get(name)`` returns a numpy array (a copy, so the file
    can be closed afterwards).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._mmap = None
        self._file = open_regular_file(self.path)
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
        if 8 + header_len > size:
            raise self._fail(
                f"not a safetensors file or truncated: header length {header_len} with a file of {size} bytes"
            )
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(
                f"header of {header_len} bytes, expected at most {MAX_HEADER_BYTES} (MAX_HEADER_BYTES; real "
                "checkpoints' headers take a few hundred bytes per tensor)"
            )
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"not a safetensors file: header is not valid JSON ({e})") from None
        except RecursionError:
            raise self._fail("not a safetensors file: the header's JSON is nested too deeply") from None
        except _DuplicateKey as e:
            raise self._fail(f"header names {e.args[0]!r} twice; expected unique tensor names") from None
        if not isinstance(header, dict):
            raise self._fail("not a safetensors file: header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail(f"__metadata__: expected a JSON object of strings, found {_short(metadata)}")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry)
        end = 0
        previous = None
        for name, (_, _, begin, stop) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if begin != end:
                where = f"after {previous!r} ends at {end}" if previous else "at the start of the data section"
                what = "overlaps the tensor before it" if begin < end else f"leaves bytes {end}..{begin} unused"
                raise self._fail(f"tensor {name!r} begins at byte {begin} {where}: it {what}")
            end, previous = stop, name
        if end != data_size:
            if end > data_size:
                raise self._fail(
                    f"truncated: tensor {previous!r} ends at byte {end} of the data section, which has {data_size}"
                )
            raise self._fail(f"the tensors cover {end} bytes of a data section of {data_size}; expected all of it")
        if size > self._data_start:
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def _check_entry(self, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise self._fail(
                f"tensor {name!r}: malformed header entry: expected {{dtype, shape, data_offsets}}, "
                f"found {_short(entry)}"
            )
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise self._fail(
                f"tensor {name!r}: unsupported dtype {_short(dtype_name)}; expected one of {sorted(DTYPES)}"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise self._fail(f"tensor {name!r}: shape {_short(shape)}, expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise self._fail(f"tensor {name!r}: data_offsets {_short(offsets)}, expected [begin, end] integers")
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize  # Python integers: no wrap-around
        if end < begin or end - begin != expected:
            raise self._fail(
                f"tensor {name!r}: {dtype_name}{shape} needs {expected} bytes, "
                f"data_offsets {offsets} give {end - begin}"
            )
        return dtype, tuple(shape), begin, end

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


def checkpoint_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint: ``path`` itself, the shards its folder's
    ``model.safetensors.index.json`` names, or the folder's ``*.safetensors``. Every one must resolve inside
    the folder (no absolute or ``..`` names, no symlink leading out of it) and be a regular file. One
    exception, the Hugging Face cache's layout: in ``<repo>/snapshots/<revision>/`` the files are symlinks
    to ``<repo>/blobs/``, which is allowed too.

    Raises:
      CheckpointError: naming the path, the index entry and what was expected.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        return [path]  # SafetensorsFile checks that it is a regular file
    roots = _roots(path)
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        content = read_json_file(_inside(roots, index, index.name), "safetensors index")
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{index}: expected a safetensors index (a JSON object whose 'weight_map' maps tensor names to "
                f"file names), found {_short(content)}"
            )
        names = sorted(set(weight_map.values()))
        files = [_inside(roots, path / name, f"{index.name}: weight_map entry {name!r}") for name in names]
    else:
        files = [_inside(roots, f, f.name) for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files found")
    return files


def _roots(folder: pathlib.Path) -> list[pathlib.Path]:
    """Where a checkpoint folder's files may resolve: the folder, and the Hugging Face cache's ``blobs`` when
    the folder is a ``<repo>/snapshots/<revision>/``."""
    folder = folder.resolve()
    roots = [folder]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def folder_file(folder: str | os.PathLike, name: str) -> pathlib.Path | None:
    """The checkpoint folder's file ``name`` (``config.json``, ``tokenizer.json``, ...) resolved under the
    shards' rules (inside the folder or the cache's blobs, no symlink leading out); None when there is none.
    The caller opens it with :func:`quarkmoe_jax.files.open_regular_file` (a regular file, size-capped)."""
    folder = pathlib.Path(folder)
    path = folder / name
    if not (path.exists() or path.is_symlink()):
        return None
    return _inside(_roots(folder), path, name)


def _inside(roots: list[pathlib.Path], path: pathlib.Path, what: str) -> pathlib.Path:
    """``path`` resolved (symlinks followed), if it lies inside one of ``roots`` (the checkpoint folder,
    and the cache's blobs); else a CheckpointError."""
    resolved = path.resolve()
    folder = roots[0]
    if not any(root in resolved.parents for root in roots):
        raise CheckpointError(
            f"{folder}: {what} resolves to {resolved}, outside the checkpoint folder; expected a file inside it"
        )
    if not resolved.exists():
        raise CheckpointError(f"{folder}: {what} names {path.name}, which does not exist")
    return resolved


class CheckpointReader(Mapping):
    """All tensors of a Hugging Face checkpoint folder (one file, or shards with an index), read lazily.

    ``reader[name]`` reads one tensor; ``reader.info(name)`` gives dtype and shape without reading.
    Accepts a folder holding ``model.safetensors.index.json`` (its ``weight_map``) or ``*.safetensors``
    files, or a single ``.safetensors`` file.
    """

    def __init__(self, path: str | os.PathLike):
        path = pathlib.Path(path)
        files = checkpoint_files(path)
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


def _umask() -> int:
    """The process's umask (read by setting and restoring it: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private (0700); the output follows the umask
    old = None
    if out_dir.is_dir() and not out_dir.is_symlink():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
    elif out_dir.exists() or out_dir.is_symlink():
        out_dir.unlink()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

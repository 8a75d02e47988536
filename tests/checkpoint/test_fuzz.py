"""Fuzzing (hypothesis): random mutations of a valid safetensors file and of a valid checkpoint's config.json end
in a clean error (a :class:`~quarkmoe_jax.QuarkMoEError`) or a correct load, within a time bound; a file this
reader accepts the ``safetensors`` library accepts too."""

import copy
import json
import pathlib
import shutil
import struct
import tempfile

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quarkmoe_jax import QuarkMoEError
from quarkmoe_jax.checkpoint.loader import inspect_checkpoint
from quarkmoe_jax.checkpoint.safetensors_io import SafetensorsFile, save_file

FUZZ = settings(
    max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=False
)
TENSORS = {
    "a": np.arange(4, dtype=np.float32),
    "b": np.arange(8, dtype=np.uint8),
    "c": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3),
}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["F32", "U8", "BF16", "F8_E4M3", "F4", "", "shape"]),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    return path.read_bytes()


def _split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _check(raw: bytes) -> None:
    """Our reader raises a QuarkMoEError or reads every tensor; what it accepts, the library accepts."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "f.safetensors"
        path.write_bytes(raw)
        try:
            with SafetensorsFile(path) as f:
                arrays = {name: f.get(name) for name in f.keys()}
        except QuarkMoEError:
            return
        with safetensors.safe_open(str(path), framework="numpy") as f:
            assert sorted(f.keys()) == sorted(arrays)
            for name in f.keys():
                assert list(f.get_slice(name).get_shape()) == list(arrays[name].shape)


@FUZZ
@given(
    tensor=st.sampled_from(sorted(TENSORS) + ["__metadata__"]),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]),
    value=json_values,
)
def test_mutated_header_fields(valid_file, tensor, field, value):
    header, data = _split(valid_file)
    header = copy.deepcopy(header)
    if field is None or tensor == "__metadata__":
        header[tensor] = value
    else:
        header[tensor][field] = value
    encoded = json.dumps(header).encode()
    _check(struct.pack("<Q", len(encoded)) + encoded + data)


@FUZZ
@given(
    offset=st.integers(min_value=0, max_value=400),
    byte=st.integers(min_value=0, max_value=255),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=400)),
)
def test_flipped_and_truncated_bytes(valid_file, offset, byte, cut):
    raw = bytearray(valid_file)
    if offset < len(raw):
        raw[offset] = byte
    if cut is not None:
        raw = raw[:cut]
    _check(bytes(raw))


@pytest.fixture(scope="module")
def exported_folder(tmp_path_factory):
    from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
    from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint

    root = tmp_path_factory.mktemp("fuzzcfg")
    src = write_float_checkpoint(root / "f", "mixtral", hidden_size=64, intermediate_size=32)
    return export_quark_checkpoint(src, root / "q", "w_mxfp4_a_fp8", input_amax=2.0)


def _paths(value, prefix=()):
    """Every key path of a nested dict / list."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


@FUZZ
@given(choice=st.integers(min_value=0, max_value=10**6), value=json_values, delete=st.booleans())
def test_mutated_config_json(exported_folder, tmp_path_factory, choice, value, delete):
    """One key of config.json (quantization_config included) replaced or deleted: ``inspect`` (every header
    check the loader makes, no data read) returns a report or raises a QuarkMoEError."""
    config = json.loads((exported_folder / "config.json").read_text())
    paths = [p for p in _paths(config) if p]
    where = paths[choice % len(paths)]
    parent = config
    for key in where[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    folder = pathlib.Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        shutil.copy(exported_folder / "model.safetensors", folder)
        (folder / "config.json").write_text(json.dumps(config))
        try:
            report = inspect_checkpoint(folder)
        except QuarkMoEError:
            return
        assert isinstance(report["layers"], dict)
    finally:
        shutil.rmtree(folder)

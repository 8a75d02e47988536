"""Our safetensors reader/writer: every dtype, compatibility with the safetensors package, bad files."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile, save_file


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "a.u8": rng.integers(0, 256, (3, 5), dtype=np.uint8),
        "b.f32": rng.standard_normal((2, 3)).astype(np.float32),
        "c.bf16": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
        "d.e4m3": rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e4m3fn),
        "e.i8": rng.integers(-128, 128, (7,), dtype=np.int8),
        "f.scalar": np.array(0.25, np.float32),
        "g.empty": np.zeros((0, 3), np.float16),
    }


def test_round_trip_every_dtype(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"format": "pt"}
        for name, value in tensors.items():
            got = f.get(name)
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(np.atleast_1d(got).view(np.uint8), np.atleast_1d(value).view(np.uint8))


def test_interoperates_with_the_safetensors_package(tmp_path):
    ours = {"u8": np.arange(12, dtype=np.uint8).reshape(3, 4), "f32": np.ones((2, 2), np.float32)}
    save_file(ours, tmp_path / "ours.safetensors")
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k])
    safetensors.numpy.save_file(
        {"i8": np.arange(-3, 3, dtype=np.int8), "f16": np.ones(3, np.float16)}, tmp_path / "theirs.safetensors"
    )
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        np.testing.assert_array_equal(f.get("i8"), np.arange(-3, 3, dtype=np.int8))
        assert f.get("f16").dtype == np.float16


def test_sharded_folder_with_index(tmp_path):
    save_file({"x": np.ones(2, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": np.zeros(3, np.uint8)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with CheckpointReader(tmp_path) as r:
        assert sorted(r) == ["x", "y"] and r["y"].shape == (3,)
        assert r.info("x") == (np.dtype(np.float32), (2,))
        with pytest.raises(CheckpointError, match="missing tensor 'z'"):
            r["z"]


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"x": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    save_file({"x": np.ones(2, np.float32)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="'x' appears in both"):
        CheckpointReader(tmp_path)


def test_truncated_file(tmp_path):
    save_file({"w": np.ones((64, 64), np.float32)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated: tensor 'w'"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(tmp_path / "tiny.safetensors")


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "x.safetensors")


def write_raw(path, header):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 64)


def test_malformed_headers(tmp_path):
    write_raw(tmp_path / "a.safetensors", {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}})
    with pytest.raises(CheckpointError, match="tensor 'w': unsupported dtype 'F4'"):
        SafetensorsFile(tmp_path / "a.safetensors")
    write_raw(tmp_path / "b.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}})
    with pytest.raises(CheckpointError, match=r"F32\[4\] needs 16 bytes, data_offsets \[\d+, \d+\] give 8"):
        SafetensorsFile(tmp_path / "b.safetensors")
    write_raw(tmp_path / "c.safetensors", {"w": {"dtype": "U8"}})
    with pytest.raises(CheckpointError, match="malformed header entry"):
        SafetensorsFile(tmp_path / "c.safetensors")


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        CheckpointReader(tmp_path)

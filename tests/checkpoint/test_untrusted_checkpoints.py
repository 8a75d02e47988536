"""Crafted or corrupted checkpoints: memory bounded by what the files hold, no hangs, nothing read outside the
folder, one clear error (a :class:`~quarkmoe_jax.QuarkMoEError`) for every bad file.

Crafted safetensors headers are also given to the ``safetensors`` library: everything refused here that it
can parse, it refuses too (our reader is held to its checks, plus a smaller header cap).
"""

import json
import os
import pathlib
import signal
import struct
import time

import numpy as np
import pytest

from quarkmoe_jax import QuarkMoEError
from quarkmoe_jax.checkpoint.loader import inspect_checkpoint
from quarkmoe_jax.checkpoint.safetensors_io import (
    MAX_HEADER_BYTES,
    CheckpointError,
    CheckpointReader,
    SafetensorsFile,
    save_file,
)
from quarkmoe_jax.quark_config import QuarkConfigError
from quarkmoe_jax.schemes import SchemeError
from quarkmoe_jax.schemes.base import ParamSpec
from tests.checkpoint.test_bad_checkpoints import edited_copy, refuse


@pytest.fixture
def exported(make_checkpoint):
    return make_checkpoint("mixtral", "w_mxfp4")[1]


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) if the test body blocks for more than 30 s."""

    def hang(*_):
        raise TimeoutError("blocked for 30 s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_every_input_error_is_a_quarkmoe_error():
    for error in (CheckpointError, QuarkConfigError, SchemeError):
        assert issubclass(error, QuarkMoEError) and issubclass(error, ValueError)


# ------------------------------------------------------------------------ sizes claimed by config.json


def test_config_sizes_beyond_the_tensors_are_refused_before_allocating(exported, tmp_path, monkeypatch):
    """A 4-expert checkpoint whose config claims hidden = intermediate = 32768 (6.6 GB of buffers) is refused
    from the headers, before any parameter buffer is allocated; ``inspect`` reports it refused."""

    def huge(config):
        config.update(hidden_size=32768, intermediate_size=32768)

    path = edited_copy(exported, tmp_path / "huge", config=huge)
    allocated = []
    monkeypatch.setattr(ParamSpec, "allocate", lambda self: allocated.append(self.shape) or 1 / 0)
    refuse(path, CheckpointError, r"w1 weight shape \(64, 32\), expected \(32768, 16384\)")
    assert allocated == []
    report = inspect_checkpoint(path)
    assert all("refused" in layer for layer in report["layers"].values())


def test_absurd_expert_count_is_refused_quickly(exported, tmp_path):
    def many(config):
        config["num_local_experts"] = 3_000_000

    path = edited_copy(exported, tmp_path / "many", config=many)
    start = time.monotonic()
    refuse(path, CheckpointError, r"17999976 expert tensors missing .*2999996 of the config's 3000000 experts")
    assert time.monotonic() - start < 10


def test_all_expert_tensor_shorter_than_the_expert_count(make_checkpoint, tmp_path):
    """A fused all-expert weight (``experts.gate_up_proj.weight [E, ...]``) whose leading axis is shorter than
    the config's expert count is refused by its shape before any per-expert planning."""
    _, quark = make_checkpoint("qwen3_moe", "w_mxfp4", float_kwargs={"fused_experts": True})
    path = edited_copy(quark, tmp_path / "more", config=lambda c: c.update(num_experts=4_000_000))
    message = r"experts\.\w+\.weight: expected a leading expert axis of 4000000 .* found shape \(4, "
    refuse(path, CheckpointError, message)


def test_catastrophic_exclude_pattern_ends_in_bounded_time(exported, tmp_path, alarm):
    """``re:(.|.)*w1.`` backtracks exponentially on expert names ending in ``w1``: Python's ``re`` never
    finishes; matched with a time bound, the load ends with an error naming the pattern."""

    def exclude(config):
        config["quantization_config"]["exclude"] = ["re:(.|.)*w1."]

    path = edited_copy(exported, tmp_path / "re", config=exclude)
    start = time.monotonic()
    refuse(path, QuarkConfigError, r"exclude: pattern 're:\(\.\|\.\)\*w1\.' did not finish matching")
    assert time.monotonic() - start < 20


# --------------------------------------------------------------------------------------------- paths


def test_fifo_among_the_shards_is_refused_without_blocking(exported, tmp_path, alarm):
    path = edited_copy(exported, tmp_path / "fifo")
    os.mkfifo(path / "zz.safetensors")
    refuse(path, CheckpointError, r"zz\.safetensors: expected a regular checkpoint file, found a FIFO")
    os.unlink(path / "config.json")
    os.mkfifo(path / "config.json")
    refuse(path, CheckpointError, r"config\.json: expected a regular config\.json, found a FIFO")


def _index(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_entries_must_stay_inside_the_folder(exported, tmp_path):
    """An index naming ``../elsewhere/model.safetensors`` (a real checkpoint placed outside), an absolute path
    or a symlink out of the folder is refused; a symlink to a file inside is followed."""
    path = edited_copy(exported, tmp_path / "inner" / "ckpt")
    elsewhere = edited_copy(exported, tmp_path / "inner" / "elsewhere")
    names = list(CheckpointReader(path).keys())
    (path / "model.safetensors").rename(path / "real.safetensors")
    for target in ("../elsewhere/model.safetensors", "/etc/passwd", str(elsewhere / "model.safetensors")):
        _index(path, {name: target for name in names})
        refuse(path, CheckpointError, r"weight_map entry .* outside the checkpoint folder")
    (path / "out.safetensors").symlink_to(elsewhere / "model.safetensors")
    _index(path, {name: "out.safetensors" for name in names})
    refuse(path, CheckpointError, r"out\.safetensors.* resolves to .*elsewhere.*outside the checkpoint folder")
    (path / "in.safetensors").symlink_to(path / "real.safetensors")
    _index(path, {name: "in.safetensors" for name in names})
    with CheckpointReader(path) as reader:
        assert sorted(reader) == sorted(names)
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"out\.safetensors resolves to .* outside the checkpoint folder"):
        CheckpointReader(path)  # the folder's *.safetensors: the symlink out of it is refused too


def test_index_that_is_not_a_weight_map(exported, tmp_path):
    path = edited_copy(exported, tmp_path / "idx")
    for content in ([1, 2], {"weight_map": ["a"]}, {"weight_map": {"a": 3}}):
        (path / "model.safetensors.index.json").write_text(json.dumps(content))
        refuse(path, CheckpointError, r"expected a safetensors index")


def test_config_json_that_is_not_an_object(exported, tmp_path):
    path = edited_copy(exported, tmp_path / "list")
    (path / "config.json").write_text("[1, 2, 3]")
    refuse(path, CheckpointError, r"config\.json: expected a JSON object of settings, found list")


# ------------------------------------------------------------------------------ crafted safetensors headers


def _valid(tmp_path) -> pathlib.Path:
    path = tmp_path / "valid.safetensors"
    save_file({"a": np.arange(4, dtype=np.float32), "b": np.arange(8, dtype=np.uint8)}, path)
    return path


def _write(path: pathlib.Path, header: bytes | dict, data: bytes) -> pathlib.Path:
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _parts(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


A, B = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, {"dtype": "U8", "shape": [8], "data_offsets": [16, 24]}
DEEP = ('{"a":' * 100_000 + "1" + "}" * 100_000).encode()
CRAFTED = {
    "wrapping-shape": ({"a": {**A, "shape": [2**40, 2**40], "data_offsets": [0, 0]}, "b": B}, r"needs \d+ bytes"),
    "shape-2**64": ({"a": {**A, "shape": [2**64]}, "b": B}, r"needs \d+ bytes"),
    "float-shape": ({"a": {**A, "shape": [4.0]}, "b": B}, r"shape \[4\.0\], expected a list of non-negative"),
    "negative-shape": ({"a": {**A, "shape": [-4]}, "b": B}, r"expected a list of non-negative integers"),
    "string-offsets": ({"a": {**A, "data_offsets": ["0", "16"]}, "b": B}, r"expected \[begin, end\] integers"),
    "overlap": ({"a": A, "b": {**B, "data_offsets": [12, 20]}}, r"tensor 'b' begins at byte 12 after 'a'.*overlaps"),
    "all-at-zero": ({"a": A, "b": {**B, "data_offsets": [0, 8]}}, r"overlaps"),
    "gap": ({"a": {**A, "data_offsets": [8, 24]}, "b": {**B, "data_offsets": [24, 32]}}, r"leaves bytes 0\.\.8 unused"),
    "short-cover": ({"a": A}, r"the tensors cover 16 bytes of a data section of 24"),
    "past-the-end": ({"a": A, "b": {**B, "shape": [16], "data_offsets": [16, 32]}}, r"truncated: tensor 'b' ends"),
    "metadata-not-strings": ({"__metadata__": {"x": 1}, "a": A, "b": B}, r"__metadata__: expected a JSON object"),
    "entry-not-object": ({"a": [1], "b": B}, r"malformed header entry"),
    "unknown-dtype": ({"a": {**A, "dtype": "F4"}, "b": B}, r"unsupported dtype 'F4'"),
    "duplicate-names": (b'{"a":' + json.dumps(A).encode() + b',"a":' + json.dumps(B).encode() + b"}", r"twice"),
    "deeply-nested": (DEEP, r"nested too deeply"),
    "not-an-object": (b"[1, 2]", r"header is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers_are_refused_here_and_by_the_safetensors_library(tmp_path, case):
    header, match = CRAFTED[case]
    _, data = _parts(_valid(tmp_path))
    path = _write(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        SafetensorsFile(path)
    import safetensors

    with pytest.raises(Exception) as refused:  # the library's own error type differs by version
        with safetensors.safe_open(str(path), framework="numpy") as f:
            [f.get_slice(name) for name in f.keys()]
    assert not isinstance(refused.value, (AssertionError, TimeoutError))


def test_header_cap_is_checked_before_reading_it(tmp_path):
    """A header length above MAX_HEADER_BYTES is refused from the 8-byte prefix (the library allows 100 MB;
    parsing one costs ~15x its size in memory here)."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 8))
        f.truncate(8 + MAX_HEADER_BYTES + 8)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"header of {MAX_HEADER_BYTES + 8} bytes, expected at most"):
        SafetensorsFile(path)
    assert time.monotonic() - start < 1


def test_a_valid_file_still_loads_in_both(tmp_path):
    import safetensors

    path = _valid(tmp_path)
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.get("a"), np.arange(4, dtype=np.float32))
    with safetensors.safe_open(str(path), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("b"), np.arange(8, dtype=np.uint8))


# --------------------------------------------------------------------- outliers and per-tensor dynamic scales


@pytest.mark.parametrize(
    "scheme, semantics, zeroed",
    [
        ("w8a8_int8_channel_dynamic_tensor", "quark", True),
        ("w8a8_fp8_channel_dynamic_tensor", "vllm", True),
        ("w_mxfp4_a_fp8_dynamic_tensor", "vllm", True),
        ("w8a8_int8_channel_dynamic_token", "vllm", False),
    ],
)
def test_one_outlier_token_and_per_tensor_dynamic_scales(make_checkpoint, scheme, semantics, zeroed):
    """What docs/moe.md states: with one dynamic scale per tensor a token holding 3e38 turns every other
    token's output to exactly 0; per-token scales keep the other tokens exact. The load warns (once per
    scheme and process) where the scheme has per-tensor dynamic scales."""
    import warnings

    from quarkmoe_jax.checkpoint import loader
    from quarkmoe_jax.nn import QuarkMoEBlock

    path = make_checkpoint("mixtral", scheme)[1]
    loader._WARNED_PER_TENSOR.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        block = QuarkMoEBlock.from_checkpoint(path, 1, semantics=semantics)
        QuarkMoEBlock.from_checkpoint(path, 1, semantics=semantics)
    warned = [w for w in seen if issubclass(w.category, loader.PerTensorDynamicScaleWarning)]
    assert len(warned) == (1 if zeroed else 0)
    x = np.asarray(np.random.default_rng(0).standard_normal((8, 64)), np.float32)
    bad = x.copy()
    bad[0, 0] = 3e38
    clean, out = np.asarray(block(x)), np.asarray(block(bad))
    if zeroed:
        assert (out[1:] == 0).all() and (clean[1:] != 0).any()
    else:
        np.testing.assert_array_equal(out[1:], clean[1:])


def test_the_cli_reports_each_crafted_checkpoint_in_one_line(exported, tmp_path, capsys, alarm):
    """``quarkmoe inspect`` and ``run-layer`` on crafted folders: one line naming the file and the problem,
    exit status 2 (or, for ``inspect`` of a folder that opens, each layer reported refused with the
    reason, status 1), no traceback."""
    from quarkmoe_jax import cli

    fifo = edited_copy(exported, tmp_path / "fifo")
    os.mkfifo(fifo / "zz.safetensors")
    outside = edited_copy(exported, tmp_path / "outside")
    names = list(CheckpointReader(outside).keys())
    _index(outside, {name: "/etc/passwd" for name in names})
    pattern = edited_copy(
        exported, tmp_path / "re", config=lambda c: c["quantization_config"].update(exclude=["re:(.|.)*w1."])
    )
    np.save(tmp_path / "x.npy", np.ones((2, 64), np.float32))
    cases = [(fifo, "found a FIFO"), (outside, "outside the checkpoint folder"), (pattern, "did not finish matching")]
    for folder, message in cases:
        for argv in (
            ["inspect", str(folder)],
            ["run-layer", str(folder), "--layer", "1", "--input", str(tmp_path / "x.npy"), "--output", "y.npy"],
        ):
            code = cli.main(argv)
            out, err = capsys.readouterr()
            assert "Traceback" not in out + err, argv
            if code == 1 and argv[0] == "inspect":  # the checkpoint opened: each layer is reported refused
                assert all(message in line for line in out.splitlines() if "REFUSED" in line), out
                assert "REFUSED" in out
                continue
            err = err.strip().splitlines()
            assert code == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_a_hugging_face_cache_snapshot_loads(exported, tmp_path):
    """The hub cache keeps ``<repo>/snapshots/<rev>/model.safetensors`` as a symlink to ``<repo>/blobs/<hash>``:
    allowed (the blobs of the same repository), while a symlink anywhere else out of the folder is not."""
    from quarkmoe_jax.nn import QuarkMoEBlock

    repo = tmp_path / "models--org--mixtral"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in ("model.safetensors", "config.json"):
        (blobs / f"sha-{name}").write_bytes((exported / name).read_bytes())
        (snapshot / name).symlink_to(f"../../blobs/sha-{name}")
    block = QuarkMoEBlock.from_checkpoint(snapshot, 1)
    assert block.experts.shape.num_experts == 4
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes((exported / "model.safetensors").read_bytes())
    (snapshot / "zz.safetensors").symlink_to(elsewhere)
    refuse(snapshot, CheckpointError, r"zz\.safetensors resolves to .* outside the checkpoint folder")

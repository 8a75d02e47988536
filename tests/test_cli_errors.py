"""Every CLI user error is one line naming the problem and a non-zero exit; the output folder rules of
``quantize`` / ``synthetic``; ``inspect`` checks tensors as the loader does; ``--help`` explains itself."""

import json
import pathlib

import numpy as np
import pytest

from quarkmoe_jax import cli
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointReader, save_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("cli")
    assert cli.main(["synthetic", str(root / "f"), "--hidden", "64", "--intermediate", "32"]) == 0
    assert cli.main(["quantize", str(root / "f"), str(root / "q"), "--scheme", "w_mxfp4"]) == 0
    np.save(root / "x.npy", np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32))
    return root


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quarkmoe {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _run_layer(root, *extra, input=None, output="y.npy"):
    x = root / "x.npy" if input is None else input
    return ["run-layer", str(root / "q"), "--layer", "1", "--input", str(x), "--output", str(output), *extra]


def test_run_layer_user_errors_are_one_line(checkpoint, capsys, tmp_path):
    root = checkpoint
    (tmp_path / "text.npy").write_text("1 2 3\n")
    with open(tmp_path / "arrays.npy", "wb") as f:
        np.savez(f, x=np.ones((5, 64), np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "ints.npy", np.ones((5, 64), np.int32))
    np.save(tmp_path / "wide.npy", np.ones((5, 65), np.float32))
    huge = np.lib.format.header_data_from_array_1_0(np.ones((5, 64), np.float32))
    with open(tmp_path / "huge.npy", "wb") as f:  # a header claiming 4 TB, 16 bytes of data
        np.lib.format.write_array_header_1_0(f, {**huge, "shape": (10**12,)})
        f.write(bytes(16))
    import os

    os.mkfifo(tmp_path / "fifo.npy")
    y = tmp_path / "y.npy"
    cases = [
        (_run_layer(root, "--backend", "triton", output=y), "triton backend"),
        (_run_layer(root, input=tmp_path / "text.npy", output=y), "is not a NumPy .npy file"),
        (_run_layer(root, input=tmp_path / "arrays.npy", output=y), ".npz archive"),
        (_run_layer(root, input=tmp_path / "objects.npy", output=y), "holds Python objects"),
        (_run_layer(root, input=tmp_path / "ints.npy", output=y), "expected a float array [T, hidden], found int32"),
        (_run_layer(root, input=tmp_path / "missing.npy", output=y), "cannot read --input"),
        (_run_layer(root, input=tmp_path / "wide.npy", output=y), "x must be [T, 64]"),
        (_run_layer(root, input=tmp_path / "huge.npy", output=y), "header claims [1000000000000] float32"),
        (_run_layer(root, input=tmp_path / "fifo.npy", output=y), "expected a regular .npy file"),
        (_run_layer(root, output=tmp_path / "no" / "such" / "y.npy"), "No such file or directory"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in one_error_line(capsys, "run-layer"), argv
    argv = _run_layer(root, output=y)
    argv[argv.index("--layer") + 1] = "7"
    assert cli.main(argv) == 2 and "not a MoE layer" in one_error_line(capsys, "run-layer")
    assert not y.exists()


def _tree(path: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_quantize_refuses_to_overwrite_its_input_or_a_non_empty_folder(checkpoint, capsys, tmp_path):
    src = tmp_path / "f"
    assert cli.main(["synthetic", str(src)]) == 0
    (src / "tokenizer.json").write_text("{}")
    before = _tree(src)
    for out, message in [
        (src, "is the input checkpoint"),
        (src / "q", "is inside the input checkpoint"),
        (checkpoint / "q", "is a non-empty folder"),
    ]:
        capsys.readouterr()
        assert cli.main(["quantize", str(src), str(out), "--scheme", "w_mxfp4"]) == 2
        assert message in one_error_line(capsys, "quantize")
    assert _tree(src) == before
    # a folder that contains the input is refused even with --overwrite: replacing it deletes the input
    assert cli.main(["quantize", str(src), str(tmp_path), "--scheme", "w_mxfp4", "--overwrite"]) == 2
    assert "contains the input" in one_error_line(capsys, "quantize")
    assert _tree(src) == before
    # an empty folder is fine; the source's other files come along
    (tmp_path / "empty").mkdir()
    assert cli.main(["quantize", str(src), str(tmp_path / "empty"), "--scheme", "w_mxfp4"]) == 0
    assert (tmp_path / "empty" / "tokenizer.json").read_text() == "{}"
    # --overwrite replaces the input itself with its quantized version, whole
    assert cli.main(["quantize", str(src), str(src), "--scheme", "w_mxfp6_e2m3", "--overwrite"]) == 0
    config = json.loads((src / "config.json").read_text())
    assert config["quantization_config"]["global_quant_config"]["weight"]["dtype"] == "fp6_e2m3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f"]  # no temporary folders left


def test_a_failed_quantize_leaves_nothing(capsys, tmp_path):
    src = tmp_path / "f"
    assert cli.main(["synthetic", str(src)]) == 0
    assert cli.main(["quantize", str(src), str(tmp_path / "q"), "--scheme", "w_mxfp4_a_fp8"]) == 2  # no amax
    message = one_error_line(capsys, "quantize")
    assert "pass --calibrate N" in message and "--input-amax AMAX" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_synthetic_refuses_a_non_empty_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["synthetic", str(tmp_path)]) == 2
    assert "non-empty folder" in one_error_line(capsys, "synthetic")
    assert cli.main(["synthetic", str(tmp_path), "--overwrite"]) == 0
    assert not (tmp_path / "notes.txt").exists() and (tmp_path / "config.json").exists()


def _rewrite(path: pathlib.Path, change) -> None:
    with CheckpointReader(path) as reader:
        tensors = {name: np.array(reader[name]) for name in reader}
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "tensor, change, message",
    [
        ("experts.2.w3.weight", lambda t: t[:, :-1], r"shape \(32, 31\), expected \(32, 32\)"),
        ("experts.0.w2.weight_scale", lambda t: t.astype(np.int8), "E8M0 weight scales must be uint8"),
        ("experts.1.w1.weight", lambda t: t[:-2], r"shape \(30, 32\), expected \(32, 32\)"),
        ("gate.weight", lambda t: t[:, :8], r"shape \(4, 8\), expected \(4, 64\)"),
    ],
)
def test_inspect_checks_shapes_and_dtypes_as_the_loader_does(checkpoint, capsys, tmp_path, tensor, change, message):
    import shutil

    q = tmp_path / "q"
    shutil.copytree(checkpoint / "q", q)
    name = f"model.layers.1.block_sparse_moe.{tensor}"

    def edit(tensors):
        assert name in tensors
        tensors[name] = change(tensors[name])

    _rewrite(q, edit)
    capsys.readouterr()
    assert cli.main(["inspect", str(q)]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and name in out
    import re

    assert re.search(message, out), out
    with pytest.raises(ValueError, match=message):  # the loader refuses it the same way
        from quarkmoe_jax.nn import QuarkMoEBlock

        QuarkMoEBlock.from_checkpoint(q, 1)


def test_help_describes_every_option_with_its_default(capsys):
    for command in ("synthetic", "quantize", "run-layer", "inspect", "demo", "generate", "serve", "plan"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        options = [line for line in out.splitlines() if line.strip().startswith("--") and "--help" not in line]
        assert options, command
        described = " ".join(out.split("options:")[1].split())
        for option in options:
            flag = option.split()[0].rstrip(",")
            assert flag in described
    with pytest.raises(SystemExit):
        cli.main(["synthetic", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("hidden size H (default: 64)", "routed experts (default: 4)", "architecture (default: mixtral)"):
        assert text in out


def test_demo_layer_reference_is_sqrt3_times_the_weight_error():
    errors = {"mxfp4": 0.115, "mxfp6_e2m3": 0.028, "int8": 0.0087, "fp8_e4m3": 0.0265}
    assert abs(cli.layer_weight_error("w_mxfp4_a_mxfp4", errors) - 0.199) < 1e-3
    assert abs(cli.layer_weight_error("w_mxfp6_e2m3", errors) - 0.0485) < 1e-3
    assert cli.layer_weight_error("w8a8_int8_channel_static", errors) == pytest.approx(3**0.5 * 0.0087)
    assert cli.layer_weight_error("w8a8_fp8_tensor_static", errors) is None


def test_each_command_bounds_its_exclude_patterns_by_one_budget(checkpoint, capsys, tmp_path, monkeypatch):
    """A command's exclude matching, every layer it resolves, draws on one budget (quark_config.LOAD_BUDGET_S):
    with none left, the first 're:' match refuses the layer. The library's whole loads hold one budget too."""
    import shutil

    from quarkmoe_jax import quark_config
    from quarkmoe_jax.checkpoint.loader import inspect_checkpoint

    q = tmp_path / "q"
    shutil.copytree(checkpoint / "q", q)
    config = json.loads((q / "config.json").read_text())
    config["quantization_config"]["exclude"].append("re:.*lm_head.*")
    (q / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(quark_config, "LOAD_BUDGET_S", 0.0)
    capsys.readouterr()
    assert cli.main(["inspect", str(q)]) == 1
    out = capsys.readouterr().out
    assert (
        "REFUSED" in out and "within the 0 s that all 're:' patterns may take for one 'quarkmoe inspect' command" in out
    )
    assert all("may take for one load" in layer["refused"] for layer in inspect_checkpoint(q)["layers"].values())
    monkeypatch.setattr(quark_config, "LOAD_BUDGET_S", 10.0)
    assert all("refused" not in layer for layer in inspect_checkpoint(q)["layers"].values())


def _quantize(root, out, *extra, scheme="w8a8_int8_channel_static"):
    return ["quantize", str(root / "f"), str(out), "--scheme", scheme, *map(str, extra)]


def test_quantize_calibrates_static_scales_per_expert(checkpoint, capsys, tmp_path):
    """``--calibrate N`` runs N seeded standard-normal hidden states through the float layers (the exporter's
    calibrate_input_amax) and ``--calibrate PATH.npy`` the states of a file: the same states give the same
    checkpoint, whose static scales are each expert's calibrated amax / 127.5."""
    from quarkmoe_jax.checkpoint.exporter import calibrate_input_amax

    root = checkpoint
    states = np.random.default_rng(0).standard_normal((48, 64), np.float32)
    np.save(tmp_path / "states.npy", states)
    assert cli.main(_quantize(root, tmp_path / "n", "--calibrate", 48)) == 0
    assert cli.main(_quantize(root, tmp_path / "npy", "--calibrate", tmp_path / "states.npy")) == 0
    assert _tree(tmp_path / "n") == _tree(tmp_path / "npy")
    amax = calibrate_input_amax(root / "f", states)
    with CheckpointReader(tmp_path / "n") as reader:
        for expert in range(4):
            prefix = f"model.layers.1.block_sparse_moe.experts.{expert}"
            for shard, which in (("w1", "w13"), ("w3", "w13"), ("w2", "w2")):
                scale = np.asarray(reader[f"{prefix}.{shard}.input_scale"])
                np.testing.assert_allclose(scale, amax[1][which][expert] / np.float32(127.5), rtol=1e-6)
    assert len({float(amax[1]["w13"].max()), float(amax[1]["w2"].max())}) == 2  # two inputs, two ranges


def test_quantize_calibration_errors_name_the_flags(checkpoint, capsys, tmp_path):
    root = checkpoint
    hidden_states = np.random.default_rng(0).standard_normal((8, 64))
    np.save(tmp_path / "narrow.npy", hidden_states[:, :32])
    np.save(tmp_path / "ints.npy", hidden_states.astype(np.int32))
    np.save(tmp_path / "nan.npy", np.where(np.arange(64) == 3, np.nan, hidden_states))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    header = np.lib.format.header_data_from_array_1_0(hidden_states.astype(np.float32))
    with open(tmp_path / "huge.npy", "wb") as f:  # claims 10^9 tokens; holds 64 bytes
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (10**9, 64)})
        f.write(bytes(64))
    out = tmp_path / "q"
    cases = [
        (_quantize(root, out), "static input scales, which need calibration: pass --calibrate N"),
        (_quantize(root, out, "--calibrate", 8, "--input-amax", 4), "--input-amax and --calibrate: pass one"),
        (_quantize(root, out, "--calibrate", 8, scheme="w_mxfp4"), "--calibrate: scheme w_mxfp4 has no static"),
        (_quantize(root, out, "--input-amax", 4, scheme="w_mxfp4"), "--input-amax: scheme w_mxfp4 has no static"),
        (_quantize(root, out, "--input-amax", "nan"), "--input-amax nan: expected a finite positive number"),
        (_quantize(root, out, "--input-amax", 0), "--input-amax 0.0: expected a finite positive number"),
        (_quantize(root, out, "--calibrate", 0), "--calibrate 0: expected 1 to 65536 tokens"),
        (_quantize(root, out, "--calibrate", 70000), "--calibrate 70000: expected 1 to 65536 tokens"),
        (_quantize(root, out, "--calibrate", tmp_path / "missing.npy"), "cannot read --calibrate"),
        (_quantize(root, out, "--calibrate", tmp_path / "narrow.npy"), "expected float hidden states [tokens, 64]"),
        (_quantize(root, out, "--calibrate", tmp_path / "ints.npy"), "found int32[8, 64]"),
        (_quantize(root, out, "--calibrate", tmp_path / "nan.npy"), "found 8 NaN or infinite values"),
        (_quantize(root, out, "--calibrate", tmp_path / "objects.npy"), "holds Python objects"),
        (_quantize(root, out, "--calibrate", tmp_path / "huge.npy"), "more than the 33554432 bytes read at most"),
        (_quantize(root, root / "q", "--input-amax", 4), "choose a new or empty folder (or pass --overwrite)"),
    ]  # fmt: skip
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        assert message in one_error_line(capsys, "quantize"), argv
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_help_prints_no_default_where_there_is_none(capsys):
    """argparse's defaults formatter printed "(default: None)" for required options and options without a
    default; the others still show theirs."""
    for command in ("synthetic", "quantize", "run-layer", "inspect", "demo", "generate", "serve", "plan"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in out, command
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    scheme_help = out.split("--scheme SCHEME")[1].split("--scale-mode")[0]
    assert "default" not in scheme_help and "MX scale rule (default: even)" in out


def test_a_reader_that_stops_early_ends_the_command_quietly(checkpoint):
    """``quarkmoe inspect --json | head``: the reader goes before the output is written. The command ends with
    128 + SIGPIPE (a shell's status for a program SIGPIPE ended), no traceback and no "Broken pipe" error line
    (it printed one and exited 2). A real pipe whose read end is closed before the command starts. (``--help``
    into such a pipe exits 0 quietly: argparse drops the write error itself.)"""
    import os
    import signal
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(pathlib.Path(cli.__file__).parents[1])}
    command = [sys.executable, "-m", "quarkmoe_jax.cli", "inspect", str(checkpoint / "q"), "--json"]
    try:
        result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr, result.stderr
    assert "BrokenPipeError" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "mesh, message",
    [("1x4", "expected DATAxEXPERTxTENSOR"), ("0x1x1", "expected DATAxEXPERTxTENSOR"), ("64x1x1", "needs 64 devices")],
)
def test_a_mesh_that_cannot_be_made_is_one_error_line(checkpoint, capsys, mesh, message):
    for command in ("generate", "serve"):
        extra = ["--prompt-ids", "1,2", "--max-new-tokens", "2"] if command == "generate" else []
        assert cli.main([command, str(checkpoint / "f"), *extra, "--mesh", mesh]) != 0
        assert message in one_error_line(capsys, command)

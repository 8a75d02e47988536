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
    assert "input_amax" in one_error_line(capsys, "quantize")
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
    for command in ("synthetic", "quantize", "run-layer", "inspect", "demo", "generate"):
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
    with none left, the first 're:' match refuses the layer; the library outside a command has no such budget."""
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
    assert all("refused" not in layer for layer in inspect_checkpoint(q)["layers"].values())

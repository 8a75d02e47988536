"""quarkmoe synthetic / quantize / inspect on real files."""

import json

import pytest

from quarkmoe_jax import cli


def test_synthetic_quantize_inspect(tmp_path, capsys):
    f, q = tmp_path / "float", tmp_path / "quark"
    assert cli.main(["synthetic", str(f), "--model-type", "qwen2_moe", "--hidden", "48", "--intermediate", "40"]) == 0
    assert cli.main(["quantize", str(f), str(q), "--scheme", "w_mxfp4_a_mxfp6_e3m2", "--exclude-layer", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(q), "--semantics", "quark"]) == 0
    out = capsys.readouterr().out
    assert "qwen2_moe" in out and "w_mxfp4_a_mxfp6_e3m2" in out and "unquantized" in out
    assert "48->64" in out and "40->64" in out and "QuarkOCP_MX_MoEMethod" in out
    assert cli.main(["inspect", str(q), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"]["1"]["scheme"] == "w_mxfp4_a_mxfp6_e3m2"
    assert report["layers"]["1"]["activation"]["mx_format"] == "mxfp6_e3m2"


def test_inspect_reports_refused_layers_and_exits_nonzero(tmp_path, capsys):
    f, q = tmp_path / "float", tmp_path / "quark"
    cli.main(["synthetic", str(f)])
    cli.main(["quantize", str(f), str(q), "--scheme", "w_mxfp4"])
    config = json.loads((q / "config.json").read_text())
    config["quantization_config"]["global_quant_config"]["weight"]["group_size"] = 64
    (q / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["inspect", str(q)]) == 1
    assert "REFUSED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "/nonexistent/ckpt"], "does not exist"),
        (["quantize", "/nonexistent/ckpt", "/tmp/x", "--scheme", "w_mxfp4"], "config.json"),
    ],
)
def test_bad_paths_print_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_static_scheme_without_calibration(tmp_path, capsys):
    cli.main(["synthetic", str(tmp_path / "f")])
    assert cli.main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--scheme", "w_mxfp4_a_fp8"]) == 2
    assert "input_amax" in capsys.readouterr().err


def test_quantize_refuses_a_float_expert_weight_of_the_wrong_shape_before_writing(tmp_path, capsys):
    """An expert weight of half its width: ``quantize`` names it, with expected and found shapes, and writes
    nothing (it used to quantize it, and only the loader refused the result)."""
    from quarkmoe_jax.checkpoint.safetensors_io import CheckpointReader, save_file

    f, q = tmp_path / "float", tmp_path / "quark"
    assert cli.main(["synthetic", str(f), "--hidden", "64", "--intermediate", "64"]) == 0
    bad = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    with CheckpointReader(f) as reader:
        tensors = {name: reader[name] for name in reader}
    tensors[bad] = tensors[bad][:, :32].copy()
    save_file(tensors, f / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert cli.main(["quantize", str(f), str(q), "--scheme", "w_mxfp4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert bad in err and "(64, 32)" in err and "(64, 64)" in err
    assert not q.exists()

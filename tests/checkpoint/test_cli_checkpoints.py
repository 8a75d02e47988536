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
        (["quantize", "/nonexistent/ckpt", "/tmp/x", "--scheme", "w_mxfp4"], "/nonexistent/ckpt does not exist"),
    ],
)
def test_bad_paths_print_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_static_scheme_without_calibration(tmp_path, capsys):
    cli.main(["synthetic", str(tmp_path / "f")])
    assert cli.main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--scheme", "w_mxfp4_a_fp8"]) == 2
    err = capsys.readouterr().err
    assert "--calibrate" in err and "--input-amax" in err


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


@pytest.mark.parametrize("amax", ["nan", "inf", "0", "-1.5"])
def test_quantize_refuses_a_calibration_amax_that_cannot_make_a_scale(tmp_path, capsys, amax):
    """A static scale from a NaN, infinite, zero or negative amax cannot be right: one line naming the value,
    nothing written (it used to write the checkpoint)."""
    f, q = tmp_path / "float", tmp_path / "quark"
    assert cli.main(["synthetic", str(f)]) == 0
    capsys.readouterr()
    argv = ["quantize", str(f), str(q), "--scheme", "w_mxfp4_a_fp8", "--input-amax", amax]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--input-amax {float(amax)}: expected a finite positive number" in err
    assert not q.exists() and not list(tmp_path.glob(".quark*"))


def test_per_layer_calibration_with_a_nan_entry_is_refused_naming_it(tmp_path):
    import numpy as np

    from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
    from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
    from quarkmoe_jax.errors import QuarkMoEError

    src = write_float_checkpoint(tmp_path / "float", "mixtral")
    amax = {layer: {"w13": np.array([3.0, 3.5, np.nan, 3.2]), "w2": np.ones(4)} for layer in (0, 1)}
    with pytest.raises(QuarkMoEError, match=r"input_amax\[\d\]\['w13'\].*found nan"):
        export_quark_checkpoint(src, tmp_path / "q", "w_mxfp4_a_fp8", input_amax=amax)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))


def test_the_output_folder_follows_the_umask(tmp_path):
    """The checkpoint is written in a private temporary folder (mkdtemp: 0700) and renamed: it then takes the
    umask's mode, as a folder the user made would."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        assert cli.main(["synthetic", str(tmp_path / "f")]) == 0
        assert cli.main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--scheme", "w_mxfp4"]) == 0
    finally:
        os.umask(old)
    for folder in ("f", "q"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o750, folder


def test_sigterm_during_a_write_removes_the_temporary_folder(tmp_path):
    """SIGTERM while a command writes ends it as SIGINT does: the writer's temporary folder goes (Python's
    default SIGTERM action left ``.<name>.*.partial`` behind); the previous handler comes back afterwards."""
    import os
    import signal

    from quarkmoe_jax.checkpoint.safetensors_io import new_checkpoint_folder

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, cli._exit_on_sigterm():
        with new_checkpoint_folder(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not list(tmp_path.iterdir())  # neither the output nor the partial folder
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hidden", "1000000", "--intermediate", "1000000"], "GiB of expert weights"),
        (["--layers", "0"], "num_layers must be a positive integer"),
        (["--experts", "2", "--top-k", "3"], "top_k 3 exceeds num_experts 2"),
    ],
)
def test_synthetic_refuses_absurd_sizes_before_allocating(tmp_path, capsys, flags, message):
    """It used to allocate until a MemoryError traceback; now one line, before any allocation, nothing written."""
    assert cli.main(["synthetic", str(tmp_path / "f"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_calibration_in_chunks_equals_one_pass_and_bad_states_are_refused(tmp_path, monkeypatch):
    """calibrate_input_amax takes the tokens in chunks (memory bounded whatever their number): any chunk size
    gives the same amax. Hidden states of the wrong width, dtype or with NaN are refused naming them;
    export_quark_checkpoint takes them instead of input_amax, not with it, and only for static schemes."""
    import numpy as np

    from quarkmoe_jax.checkpoint import exporter
    from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
    from quarkmoe_jax.errors import QuarkMoEError

    src = write_float_checkpoint(tmp_path / "float", "qwen2_moe", hidden_size=48)  # shared experts, biasless
    states = np.random.default_rng(3).standard_normal((37, 48), np.float32)
    whole = exporter.calibrate_input_amax(src, states)
    monkeypatch.setattr(exporter, "CALIBRATION_CHUNK_ELEMENTS", 1)  # one token per chunk
    for layer, amax in exporter.calibrate_input_amax(src, states).items():
        for which in ("w13", "w2"):
            np.testing.assert_array_equal(amax[which], whole[layer][which])
    for bad, message in [
        (states[:, :40], r"expected a float array \[tokens, 48\].*found float32\[37, 40\]"),
        (states.astype(np.int32), r"found int32\[37, 48\]"),
        (np.where(states > 2.5, np.inf, states), r"expected finite values, found \d+ NaN or infinite"),
    ]:
        with pytest.raises(QuarkMoEError, match=message):
            exporter.calibrate_input_amax(src, bad)
    out = tmp_path / "q"
    with pytest.raises(ValueError, match="pass input_amax or calibration_states"):
        exporter.export_quark_checkpoint(src, out, "w_mxfp4_a_fp8", input_amax=2.0, calibration_states=states)
    with pytest.raises(ValueError, match="w_mxfp4 has no static input scales"):
        exporter.export_quark_checkpoint(src, out, "w_mxfp4", calibration_states=states)
    assert not out.exists()

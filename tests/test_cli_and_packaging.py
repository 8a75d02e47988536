"""The newcomer's path: the demo CLI and the package layout."""

import importlib.util
import pathlib
import tomllib

import quarkmoe_jax as qm
from quarkmoe_jax import cli

ROOT = pathlib.Path(__file__).parents[1]


def test_demo_prints_every_format_and_passes_its_round_trips(capsys):
    assert cli.main(["demo", "--rows", "64", "--cols", "256", "--seed", "3", "--no-layer", "--no-model"]) == 0
    out = capsys.readouterr().out
    for name in ["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "fp8_e4m3", "int8", "0.5312", "0.7812"]:
        assert name in out
    assert "FAILED" not in out


def test_demo_rows_report_gaussian_error_near_reference():
    rows = cli.demo_rows((256, 1024), seed=1)
    for r in rows:
        assert all(r["checks"].values()), r
        if r["reference"] is not None:
            assert abs(r["rel_rms"] - r["reference"]) < 0.05 * r["reference"], r


def test_public_names_at_top_level():
    for name in ["quantize", "quant_dequant", "dequantize", "MXTensor", "MXFormat"]:
        assert hasattr(qm, name)


def test_kernels_folder_is_the_package_kernels_and_never_top_level():
    """kernels/ is installed as quarkmoe_jax.kernels through pyproject's package mapping (no link in the tree);
    a wheel ships it under quarkmoe_jax only."""
    assert not (ROOT / "quarkmoe_jax" / "kernels").exists()
    spec = importlib.util.find_spec("quarkmoe_jax.kernels")
    assert spec is not None and pathlib.Path(spec.origin).resolve().parent == ROOT / "kernels"
    pallas = importlib.util.find_spec("quarkmoe_jax.kernels.pallas.backend")
    assert pallas is not None and pathlib.Path(pallas.origin).resolve() == ROOT / "kernels" / "pallas" / "backend.py"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"quarkmoe_jax.kernels": "kernels"}
    assert "quarkmoe_jax.kernels" in config["packages"] and "kernels" not in config["packages"]


def _package_folder(package: str) -> pathlib.Path:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for prefix, folder in config.get("package-dir", {}).items():
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / folder / pathlib.Path(*package[len(prefix) :].split(".")[1:])
    return ROOT / pathlib.Path(*package.split("."))


def test_every_subpackage_is_listed_for_a_wheel():
    """An editable install finds any subpackage; a wheel (``pip install .``) ships only the listed ones."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(i.parent.relative_to(ROOT).parts) for i in (ROOT / "quarkmoe_jax").rglob("__init__.py")}
    on_disk |= {
        ".".join(("quarkmoe_jax",) + i.parent.relative_to(ROOT).parts) for i in (ROOT / "kernels").rglob("__init__.py")
    }
    assert listed == on_disk, f"pyproject packages {sorted(listed)} != subpackages on disk {sorted(on_disk)}"
    assert all((_package_folder(p) / "__init__.py").is_file() for p in listed)


def test_demo_generation_runs_a_whole_quantized_model_next_to_its_float_original(tmp_path):
    result = cli.demo_model_generation(tmp_path, seed=0, new_tokens=6)
    assert len(result["float"]["tokens"]) == len(result["w_mxfp4"]["tokens"]) == 6
    assert all(0 <= t < 128 for t in result["float"]["tokens"] + result["w_mxfp4"]["tokens"])
    # MXFP4 experts: a few percent of logit error, the same next token at most positions (seeded, so exact
    # figures are stable: 0.022 and 100% for seed 0)
    assert 0 < result["logits_rel_rms"] < 0.1
    assert result["top1_agreement"] >= 0.75


def test_demo_layer_runs_each_scheme_against_the_float_layer(tmp_path):
    rows = cli.demo_layer_rows(
        tmp_path, tokens=16, schemes=["w_mxfp4_a_mxfp4", "w_mxfp6_e2m3", "w8a8_int8_channel_dynamic_token"]
    )
    errors = {r["scheme"]: r["rel_rms"] for r in rows}
    # more bits, less error; every run is finite and measured
    assert errors["w8a8_int8_channel_dynamic_token"] < errors["w_mxfp6_e2m3"] < errors["w_mxfp4_a_mxfp4"] < 0.5
    assert all(r["ms"] > 0 and 0.5 < r["bytes_per_weight"] < 1.1 for r in rows)


def test_run_layer(tmp_path, capsys):
    import numpy as np

    f, q = tmp_path / "f", tmp_path / "q"
    cli.main(["synthetic", str(f), "--model-type", "qwen3_moe"])
    cli.main(["quantize", str(f), str(q), "--scheme", "w_mxfp4_a_mxfp4"])
    x = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = [
        "run-layer",
        str(q),
        "--layer",
        "1",
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "y.npy"),
    ]
    assert cli.main(argv + ["--dtype", "float32", "--semantics", "quark"]) == 0
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (7, 64) and y.dtype == np.float32 and np.isfinite(y).all()
    from quarkmoe_jax.nn import QuarkMoEBlock

    block = QuarkMoEBlock.from_checkpoint(q, 1, semantics="quark")
    np.testing.assert_array_equal(y, np.asarray(block(x)))
    # the fused Pallas kernels (interpreter on CPU) through the CLI: the oracle's result to bf16 level
    assert cli.main(argv + ["--dtype", "float32", "--semantics", "quark", "--backend", "pallas"]) == 0
    y_pallas = np.load(tmp_path / "y.npy")
    assert np.linalg.norm(y_pallas - y) <= 5e-3 * np.linalg.norm(y)
    np.save(tmp_path / "bad.npy", np.ones((3, 65), np.float32))
    capsys.readouterr()
    assert (
        cli.main(
            [
                "run-layer",
                str(q),
                "--layer",
                "1",
                "--input",
                str(tmp_path / "bad.npy"),
                "--output",
                str(tmp_path / "z.npy"),
            ]
        )
        == 2
    )
    assert "x must be [T, 64]" in capsys.readouterr().err


def test_license_file_matches_the_declared_license():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]

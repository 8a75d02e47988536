"""The newcomer's path: the demo CLI and the package layout."""

import importlib.util
import pathlib
import tomllib

import quarkmoe_jax as qm
from quarkmoe_jax import cli

ROOT = pathlib.Path(__file__).parents[1]


def test_demo_prints_every_format_and_passes_its_round_trips(capsys):
    assert cli.main(["demo", "--rows", "64", "--cols", "256", "--seed", "3"]) == 0
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


def test_kernels_folder_maps_into_the_package_not_top_level():
    spec = importlib.util.find_spec("quarkmoe_jax.kernels")
    assert spec is not None and pathlib.Path(spec.origin).parent == ROOT / "kernels"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"quarkmoe_jax.kernels": "kernels"}
    assert "kernels" not in config["packages"]

"""The one tile decision (kernels/configs.py + kernels/tiles.json): device entry, then architecture, then
defaults, with a warning once for a GPU the table does not know."""

import json
import warnings

import pytest

from quarkmoe_jax.kernels import configs
from quarkmoe_jax.kernels.grouped_gemm import TileConfig


def test_the_table_has_every_kernel_and_regime_by_default():
    for kernel in configs.KERNELS:
        for regime in configs.REGIMES:
            first, second = configs.tile_configs(
                "cpu", {"decode": 1, "mid": 64, "prefill": 512}[regime], 8, kernel, "cpu"
            )
            assert isinstance(first, TileConfig) and first.block_m == second.block_m


def test_lookup_order_device_then_architecture_then_default_with_one_warning(monkeypatch):
    configs._warned.clear()
    h100 = configs.tile_configs("NVIDIA H100 80GB HBM3", 1, 2, "pallas", "sm90")
    assert configs.tile_source("NVIDIA H100 80GB HBM3", "pallas", 1, "sm90") == "NVIDIA H100 80GB HBM3"
    assert h100[0].swap_ab
    with pytest.warns(UserWarning, match="no tuned kernel tiles for 'NVIDIA X100'"):
        other = configs.tile_configs("NVIDIA X100", 1, 2, "pallas", "sm90")
    assert configs.tile_source("NVIDIA X100", "pallas", 1, "sm90") == "sm90"
    assert other == h100  # the architecture entry (the H100's tiles until the device is tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device kind
        configs.tile_configs("NVIDIA X100", 512, 8, "pallas", "sm90")
    assert configs.tile_source("NVIDIA Y9", "pallas", 1, "sm12") == "default"
    assert configs.dequant_min_rows("NVIDIA H100 80GB HBM3", "sm90") == 32
    assert configs.dequant_min_rows("NVIDIA Y9", "sm12") == 128


def test_pallas_split_k_only_for_few_experts():
    few = configs.tile_configs("NVIDIA H100 80GB HBM3", 1, 2, "pallas", "sm90")
    many = configs.tile_configs("NVIDIA H100 80GB HBM3", 1, 8, "pallas", "sm90")
    assert few[1].split_k > 1 and many[1].split_k == 1


def test_tiles_json_is_well_formed():
    raw = json.loads(configs.TILES_PATH.read_text())
    assert set(raw) >= {"default", "architectures"}
    for kernel, by_regime in raw["default"]["tiles"].items():
        assert kernel in configs.KERNELS and set(by_regime) == set(configs.REGIMES)
        for pair in by_regime.values():
            assert len(pair) == 2 and all(TileConfig(**t) for t in pair)


def test_fp8_tensor_cores_from_the_architecture():
    assert configs.fp8_tensor_cores("cpu")  # the interpreter runs the fp8 path

"""The tile tables (kernels/tiles.py + kernels/tiles.json): device entry, then architecture, then defaults,
with a warning once for a GPU the table does not know; and each backend's own rules on top of them
(kernels/pallas/backend.py, kernels/triton/backend.py)."""

import json
import warnings

import pytest

from quarkmoe_jax.kernels import tiles
from quarkmoe_jax.kernels.base import REGIMES, Load, TileConfig, regime
from quarkmoe_jax.kernels.pallas import PALLAS

H100 = "NVIDIA H100 80GB HBM3"


def test_the_table_has_every_family_and_regime_by_default():
    for family in tiles.FAMILIES:
        for reg in REGIMES:
            first, second = tiles.tile_options("cpu", family, reg, (0, 0), "cpu")
            assert isinstance(first, TileConfig) and first.block_m == second.block_m


def test_lookup_order_device_then_architecture_then_default_with_one_warning(monkeypatch):
    tiles._warned.clear()
    h100 = tiles.tile_options(H100, tiles.PALLAS_TILES, "decode", (0, 0), "sm90")
    assert tiles.tile_source(H100, tiles.PALLAS_TILES, "decode", "sm90") == H100
    assert h100[0].swap_ab
    with pytest.warns(UserWarning, match="no tuned kernel tiles for 'NVIDIA X100'"):
        other = tiles.tile_options("NVIDIA X100", tiles.PALLAS_TILES, "decode", (0, 0), "sm90")
    assert tiles.tile_source("NVIDIA X100", tiles.PALLAS_TILES, "decode", "sm90") == "sm90"
    assert other == h100  # the architecture entry (the H100's tiles until the device is tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device kind
        tiles.tile_options("NVIDIA X100", tiles.PALLAS_TILES, "prefill", (0, 0), "sm90")
    assert tiles.tile_source("NVIDIA Y9", tiles.PALLAS_TILES, "decode", "sm12") == "default"
    assert tiles.dequant_min_rows(H100, "sm90") == 32
    assert tiles.dequant_min_rows("NVIDIA Y9", "sm12") == 128


def test_pallas_split_k_only_for_few_experts():
    few = PALLAS.tiles(H100, Load(2, 1.0), (0, 0), mx=True, arch="sm90")
    many = PALLAS.tiles(H100, Load(8, 1.0), (0, 0), mx=True, arch="sm90")
    assert few[1].split_k > 1 and many[1].split_k == 1


def test_regimes_by_rows_per_expert():
    assert [regime(r) for r in (1, 16, 17, 128, 129)] == ["decode", "decode", "mid", "mid", "prefill"]


def test_tiles_json_is_well_formed():
    raw = json.loads(tiles.TILES_PATH.read_text())
    assert set(raw) >= {"default", "architectures"}
    for family, by_regime in raw["default"]["tiles"].items():
        assert family in tiles.FAMILIES and set(by_regime) == set(REGIMES)
        for pair in by_regime.values():
            assert len(pair) == 2 and all(TileConfig(**t) for t in pair)


def test_fp8_tensor_cores_from_the_architecture():
    from quarkmoe_jax.kernels.base import fp8_tensor_cores

    assert fp8_tensor_cores("cpu")  # the interpreter runs the fp8 path

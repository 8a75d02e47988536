"""One decision of which kernel backend runs (kernels/registry.py): ``auto``'s measured order, stale rows of
older kernel generations ignored, and the load laying MX weights out for the backend ``auto`` then runs (the
H100 once laid them out for triton while ``auto`` ran Pallas, which re-laid them on every call)."""

import json
import types
import warnings

import jax
import pytest

from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES, scheme_layer_config
from quarkmoe_jax.kernels import registry
from quarkmoe_jax.kernels.base import KernelBackend
from quarkmoe_jax.kernels.pallas import PALLAS
from quarkmoe_jax.kernels.triton import TRITON, TritonBackend
from quarkmoe_jax.moe import op
from quarkmoe_jax.schemes import get_moe_scheme
from tests.moe.backend_suite import inputs, random_experts

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
TOKENS = (1, 2, 16, 64, 256, 1024, 4096, 8192)


def _config(scheme: str):
    return get_moe_scheme(scheme_layer_config(scheme)).quant_config()


def _gpu(kind: str):
    return types.SimpleNamespace(device_kind=kind, platform="gpu")


def _row(backends, **generations):
    return {"backends": list(backends), "generations": {b: generations.get(b, 1) for b in backends}}


@pytest.fixture
def triton_runs(monkeypatch):
    """Pretend jax-triton runs here (the choice, not the kernels, is under test)."""
    monkeypatch.setattr(TritonBackend, "unavailable", lambda self: None)


@pytest.fixture
def table(monkeypatch):
    """Replace the shipped table; returns the dict to fill."""
    rows: dict = {}
    monkeypatch.setattr(registry, "_backend_table", lambda: rows)
    registry._warned.clear()
    return rows


def test_auto_follows_the_measured_table(key, table):
    """``backend_order`` reads the table (nearest measured token count) and appends the defaults;
    ``auto_order`` puts the emulation last and only the emulation on CPU."""
    table["GPU X"] = {"mxfp4/mx": {"1": _row(["triton", "pallas"], triton=2), "4096": _row(["pallas"])}}
    config = random_experts(key, scheme="w_mxfp4_a_mxfp4").quant_config
    assert config.family == "mxfp4/mx"
    assert registry.backend_order("GPU X", config, 1) == ("triton", "pallas")
    assert registry.backend_order("GPU X", config, 2) == ("triton", "pallas")
    assert registry.backend_order("GPU X", config, 8192) == ("pallas", "triton")
    assert registry.backend_order("GPU Y", config, 1) == registry.MX_DEFAULT_ORDER  # MX: the v2 kernels first
    w6 = random_experts(key, scheme="w_mxfp6_e2m3").quant_config
    assert w6.family == "mxfp6/none"
    assert registry.backend_order("GPU X", w6, 1) == registry.MX_DEFAULT_ORDER
    assert _config("w_mxfp8_e4m3_a_mxfp8_e4m3").family == "mxfp8/mx"  # not MXFP6's family
    int8 = _config("w8a8_int8_channel_dynamic_token")
    assert registry.backend_order("GPU X", int8, 1) == registry.DEFAULT_ORDER
    if jax.default_backend() == "cpu":
        assert op.auto_order(config, 1) == ("emulation",)
    else:
        assert op.auto_order(config, 1)[-1] == "emulation"


def test_a_row_timed_on_an_older_kernel_generation_is_ignored_with_one_warning(table):
    config = _config("w_mxfp4")
    table[H100] = {"mxfp4/none": {"1": _row(["pallas", "triton"], triton=1), "16": _row(["pallas", "triton"])}}
    assert TRITON.generation("mx") == 2 and TRITON.generation("dense") == 1 and PALLAS.generation("mx") == 1
    with pytest.warns(UserWarning, match=r"'mxfp4/none' on 'NVIDIA H100.*T=1: triton generation 1 \(now 2\)"):
        assert registry.backend_order(H100, config, 1) == ("triton", "pallas")  # T = 16 is also stale
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device and family
        assert registry.backend_order(H100, config, 4096) == ("triton", "pallas")
    # dense rows count triton's dense kernels, still generation 1: kept
    table[H100]["int8/int8"] = {"1": _row(["triton", "pallas"])}
    assert registry.backend_order(H100, _config("w8a8_int8_channel_dynamic_token"), 1) == ("triton", "pallas")


def test_shipped_table_rows_name_known_backends_families_and_generations():
    table = json.loads(registry.BACKEND_TABLE_PATH.read_text())
    assert {"meta", "order"} <= set(table)
    families = {"mxfp4", "mxfp6", "mxfp8", "int8", "fp8", "bf16"}
    for device, per_family in table["order"].items():
        for family, by_tokens in per_family.items():
            assert family.split("/")[0] in families and family.split("/")[1] in ("none", "mx", "fp8", "int8"), family
            for tokens, row in by_tokens.items():
                assert int(tokens) > 0 and row["backends"], (device, family, tokens)
                assert set(row["backends"]) <= set(registry.KERNEL_BACKENDS), (device, row)
                assert set(row["generations"]) == set(row["backends"]), (device, row)


def test_the_shipped_h100_mx_rows_are_stale_and_auto_runs_the_v2_kernels(triton_runs):
    """The live H100 slowdown: its MX rows ranked Pallas first against the removed first-generation Triton
    kernel. They are ignored now, so auto runs triton on the fragment layout the load makes."""
    registry._warned.clear()
    config = _config("w_mxfp4")
    with pytest.warns(UserWarning, match="timed older kernels"):
        assert registry.backend_order(H100, config, 1)[0] == "triton"
    assert registry.load_backend(config, _gpu(H100)) is TRITON
    assert registry.preferred_backend(config, 1, _gpu(H200)) is TRITON


@pytest.mark.parametrize("device_kind", [H100, H200, "NVIDIA GH200 480GB"])
@pytest.mark.parametrize("available", ["both", "pallas only"])
def test_the_load_lays_weights_out_for_the_backend_auto_runs(device_kind, available, monkeypatch):
    """For every export scheme with MX weights (every MX family; other weights have no layout) on each GPU's
    shipped rows (and a GPU without rows), at every token count: the first backend ``auto`` can run reads MX
    weights in the layout the load made."""
    registry._warned.clear()
    if available == "both":
        monkeypatch.setattr(TritonBackend, "unavailable", lambda self: None)
    else:
        monkeypatch.setattr(TritonBackend, "unavailable", lambda self: "no jax-triton")
    mx_schemes = [s for s in EXPORT_SCHEMES if _config(s).weight.kind == "mx"]
    assert len({_config(s).family for s in mx_schemes}) >= 5
    for scheme in mx_schemes:
        config = _config(scheme)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stale H100 rows say so once
            loaded = registry.load_backend(config, _gpu(device_kind))
            for tokens in TOKENS:
                runs = registry.preferred_backend(config, tokens, _gpu(device_kind))
                assert isinstance(runs, KernelBackend)
                assert runs.layout == loaded.layout, (scheme, tokens, runs, loaded)
        if available == "pallas only":
            assert loaded is PALLAS


def test_auto_reads_the_layout_the_module_was_prepared_in(key, monkeypatch):
    """After ``prepare_for_kernels("pallas")`` (the load's step, for the backend that will run; on a GPU with
    jax-triton the default would be Triton's layout), a call re-lays nothing (the layout conversion is made to
    fail) and equals the call on Quark's layout. On CPU the Pallas interpreter stands in."""
    experts = random_experts(key, scheme="w_mxfp4", h=64, i=64)
    x, weights, ids = inputs(key, t=4, h=64)
    want = experts.apply(x, weights, ids, backend="pallas")
    experts.prepare_for_kernels("pallas")
    assert experts.w13.get_value().layout == PALLAS.layout

    def no_relayout(self, weight):
        raise AssertionError("re-laid inside the call")

    monkeypatch.setattr(type(PALLAS), "to_layout", no_relayout)
    jax.clear_caches()
    got = experts.apply(x, weights, ids, backend="pallas")
    assert (got == want).all()


def test_prepare_for_kernels_refuses_an_unknown_backend(key):
    experts = random_experts(key, scheme="w_mxfp4")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        experts.prepare_for_kernels("cuda")
    assert experts.prepare_for_kernels("emulation").w13.get_value().layout == "checkpoint"  # nothing to lay out


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3"])
def test_the_v2_launch_tile_fits_the_padded_rows_and_fills_the_gpu(key, fmt):
    """``TritonBackend.fit_tile`` (CPU-checkable: the layout is jnp): block_n halves (not below 64) until it
    tiles the fragment layout's padded rows; split_k is the smallest power of two, at most the table's and
    dividing the K loop, that gives two programs per SM (132 where the device does not say)."""
    from quarkmoe_jax.formats.fragment_layout import UNIT_K, padded_shape, to_fragment_layout
    from quarkmoe_jax.kernels.base import TileConfig
    from quarkmoe_jax.kernels.triton.backend import MIN_MX_BLOCK_N, _sm_count

    experts = random_experts(key, scheme=f"w_{fmt}", e=2, h=640, i=96)  # padded N: 2I = 192 -> 256, H 640
    w13 = to_fragment_layout(experts.w13.get_value())
    _, n_pad, k_pad = padded_shape(w13)
    k_units = k_pad // UNIT_K
    for block_n, split_limit, num_tiles in [(256, 1, 2), (256, 8, 2), (128, 8, 64), (512, 4, 1)]:
        tile = TRITON.fit_tile(TileConfig(16, block_n, split_k=split_limit), 96, w13, num_tiles)
        assert n_pad % tile.block_n == 0 and (tile.block_n >= MIN_MX_BLOCK_N)
        assert tile.block_n == block_n or n_pad % (2 * tile.block_n)  # halved only as far as needed
        split = tile.split_k
        assert split <= max(split_limit, 1) and k_units % split == 0 and split & (split - 1) == 0
        programs = num_tiles * (n_pad // tile.block_n)
        if split < split_limit and k_units % (2 * split) == 0:
            assert programs * split >= 2 * _sm_count()  # stopped because the grid is full
    dense = TRITON.fit_tile(TileConfig(16, 64, split_k=4), 96, experts.w13.get_value().values, 4)
    assert dense == TileConfig(16, 64, split_k=4)  # dense kernels autotune the rest

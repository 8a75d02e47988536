"""Tests for quarkmoe_jax.quark_config: parsing Quark's quantization_config as amd-quark writes it, vLLM's rules."""

import copy
import json
import re

import pytest

from quarkmoe_jax.quark_config import KNOWN_DTYPES, LayerQuantConfig, QuarkConfig, QuarkConfigError, TensorSpec

# --- Specs exactly as amd-quark 0.13's QTensorConfig.to_dict() writes them -------------------------------------


def _spec(**kw):
    base = {
        "dtype": None, "is_dynamic": False, "qscheme": None, "ch_axis": None, "group_size": None,
        "block_size": None, "symmetric": None, "round_method": "half_even", "scale_type": None,
        "zero_point_type": "int32", "scale_format": None, "scale_calculation_mode": None,
        "mx_element_dtype": None, "observer_cls": None, "is_scale_quant": False,
        "enable_buffer_reuse": False, "max_input_numel": 4194304,
    }  # fmt: skip
    base.update(kw)
    return base


MXFP4_W = _spec(
    dtype="fp4", qscheme="per_group", ch_axis=-1, group_size=32, scale_type="float", scale_format="e8m0",
    scale_calculation_mode="even", observer_cls="PerBlockMXObserver",
)  # fmt: skip
MXFP4_A = {**MXFP4_W, "is_dynamic": True}
FP8_TENSOR = _spec(dtype="fp8_e4m3", qscheme="per_tensor", symmetric=True, observer_cls="PerTensorMinMaxObserver")
INT8_W = _spec(
    dtype="int8", qscheme="per_channel", ch_axis=0, symmetric=True, scale_type="float",
    observer_cls="PerChannelMinMaxObserver",
)  # fmt: skip
INT8_A = {**INT8_W, "ch_axis": -1, "is_dynamic": True}
EXPORT = {
    "kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
    "weight_format": "real_quantized", "weight_merge_groups": None,
}  # fmt: skip


def _layer(weight, inp=None):
    return {"input_tensors": inp, "output_tensors": None, "weight": weight, "bias": None, "target_device": None}


def _qc(global_cfg, **kw):
    qc = {
        "global_quant_config": global_cfg,
        "exclude": ["lm_head"],
        "algo_config": None,
        "softmax_quant_spec": None,
        "quant_method": "quark",
        "layer_type_quant_config": {},
        "layer_quant_config": {},
        "kv_cache_quant_config": {},
        "kv_cache_post_rope": False,
        "quant_mode": "eager_mode",
        "version": "0.13",
        "export": copy.deepcopy(EXPORT),
    }
    qc.update(kw)
    return qc


REALISTIC = {
    "mxfp4": _qc(_layer(MXFP4_W, MXFP4_A)),
    "w_mxfp4_a_fp8": _qc(_layer(MXFP4_W, FP8_TENSOR)),
    "int8_w8a8": _qc(_layer(INT8_W, INT8_A)),
    "fp8_w8a8": _qc(_layer(FP8_TENSOR, FP8_TENSOR)),
}


def _hf(qc):
    return {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "quantization_config": qc}


def _parse(qc):
    return QuarkConfig.from_quantization_config(qc)


# --- Realistic configs ------------------------------------------------------------------------------------------


def test_mxfp4():
    cfg = QuarkConfig.from_hf_config(_hf(REALISTIC["mxfp4"]))
    w, a = cfg.global_quant_config.weight, cfg.global_quant_config.input_tensors
    assert w == TensorSpec(
        dtype="fp4", qscheme="per_group", is_dynamic=False, group_size=32, ch_axis=-1, round_method="half_even",
        scale_type="float", scale_format="e8m0", scale_calculation_mode="even",
    )  # fmt: skip
    assert a == TensorSpec(**{**w.__dict__, "is_dynamic": True})
    assert w.symmetric is None and w.block_size is None
    assert cfg.global_quant_config.output_tensors is None and cfg.global_quant_config.bias is None
    assert cfg.exclude == ("lm_head",)
    assert cfg.export["pack_method"] == "reorder"
    assert cfg.raw["version"] == "0.13" and cfg.raw["algo_config"] is None
    assert cfg.resolve("model.layers.0.block_sparse_moe.experts") is cfg.global_quant_config
    assert cfg.resolve("lm_head", "Linear") is None


def test_w_mxfp4_a_fp8_static_per_tensor():
    lc = QuarkConfig.from_hf_config(_hf(REALISTIC["w_mxfp4_a_fp8"])).global_quant_config
    assert (lc.weight.dtype, lc.weight.qscheme, lc.weight.group_size, lc.weight.scale_format) == (
        "fp4", "per_group", 32, "e8m0",
    )  # fmt: skip
    a = lc.input_tensors
    assert (a.dtype, a.qscheme, a.is_dynamic, a.symmetric, a.ch_axis, a.scale_type) == (
        "fp8_e4m3", "per_tensor", False, True, None, None,
    )  # fmt: skip


def test_int8_per_channel_weights_dynamic_per_token_inputs():
    lc = QuarkConfig.from_hf_config(_hf(REALISTIC["int8_w8a8"])).global_quant_config
    w, a = lc.weight, lc.input_tensors
    assert (w.dtype, w.qscheme, w.ch_axis, w.symmetric, w.is_dynamic) == ("int8", "per_channel", 0, True, False)
    assert (a.dtype, a.qscheme, a.ch_axis, a.symmetric, a.is_dynamic) == ("int8", "per_channel", -1, True, True)


def test_fp8_w8a8_per_tensor_static():
    lc = QuarkConfig.from_hf_config(_hf(REALISTIC["fp8_w8a8"])).global_quant_config
    assert lc.weight == lc.input_tensors
    assert (lc.weight.dtype, lc.weight.qscheme, lc.weight.is_dynamic, lc.weight.symmetric) == (
        "fp8_e4m3", "per_tensor", False, True,
    )  # fmt: skip


def test_known_dtypes():
    assert {"fp4", "fp6_e3m2", "fp6_e2m3", "fp8_e4m3", "fp8_e5m2", "int8", "uint8", "int4", "uint4", "mx"} < set(
        KNOWN_DTYPES
    )
    for dtype in KNOWN_DTYPES:
        assert TensorSpec.from_dict({"dtype": dtype}, "x").dtype == dtype


def test_legacy_nulls_and_legacy_keys():
    qc = _qc(None, layer_quant_config=None, layer_type_quant_config=None, exclude=None)
    cfg = _parse(qc)
    assert (cfg.global_quant_config, cfg.layer_quant_config, cfg.layer_type_quant_config, cfg.exclude) == (
        None, {}, {}, (),
    )  # fmt: skip
    assert cfg.resolve("model.layers.0.mlp.experts") is None
    legacy = TensorSpec.from_dict({"dtype": "int8", "dynamic": True, "axis": 1, "symmetric": True}, "x")
    assert (legacy.is_dynamic, legacy.ch_axis) == (True, 1)


# --- Layer lookup priority (vLLM's _find_matched_config) ------------------------------------------------------------


def _priority_config(**kw):
    qc = _qc(
        _layer(FP8_TENSOR, FP8_TENSOR),
        layer_quant_config={
            "*experts*": _layer(MXFP4_W, MXFP4_A),
            "model.layers.1.mlp.experts": _layer(INT8_W, INT8_A),  # shadowed by "*experts*" (first match wins)
            "model.layers.2.mlp.shared_expert.down_proj": _layer(INT8_W, INT8_A),
        },
        layer_type_quant_config={"Linear": _layer(INT8_W, None)},
        exclude=[],
    )
    qc.update(kw)
    return _parse(qc)


def test_priority_pattern_and_first_match():
    cfg = _priority_config()
    mx = cfg.layer_quant_config["*experts*"]
    assert cfg.resolve("model.layers.0.mlp.experts") is mx
    assert cfg.resolve("model.layers.1.mlp.experts") is mx  # "*experts*" comes first in insertion order
    reordered = _priority_config(
        layer_quant_config={
            "model.layers.1.mlp.experts": _layer(INT8_W, INT8_A),
            "*experts*": _layer(MXFP4_W, MXFP4_A),
        }
    )
    assert reordered.resolve("model.layers.1.mlp.experts").weight.dtype == "int8"
    assert reordered.resolve("model.layers.3.mlp.experts").weight.dtype == "fp4"


def test_priority_substring_rule_direction():
    cfg = _priority_config()
    int8 = cfg.layer_quant_config["model.layers.2.mlp.shared_expert.down_proj"]
    # vLLM: `layer_name in key`, so a layer name that is a substring of a key matches it ...
    assert cfg.resolve("layers.2.mlp.shared_expert", "Linear") is int8
    assert cfg.resolve("model.layers.2.mlp.shared_expert.down_proj", "Linear") is int8
    # ... but a key that is a substring of the layer name does not.
    sub = _priority_config(layer_quant_config={"layers.2": _layer(INT8_W, INT8_A)})
    assert sub.resolve("model.layers.2.mlp.experts") is sub.global_quant_config


def test_priority_layer_type_then_global():
    cfg = _priority_config()
    assert cfg.resolve("model.layers.0.self_attn.q_proj", "Linear") is cfg.layer_type_quant_config["Linear"]
    assert cfg.resolve("model.layers.0.self_attn.q_proj") is cfg.global_quant_config  # default type FusedMoE
    assert cfg.resolve("model.layers.0.self_attn.q_proj", "Conv2d") is cfg.global_quant_config
    assert cfg.resolve("model.layers.0.mlp.experts", "Linear").weight.dtype == "fp4"  # layer config beats type


# --- exclude ------------------------------------------------------------------------------------------------------


def test_exclude_exact_and_regex():
    cfg = _priority_config(exclude=["lm_head", "re:model\\.layers\\.[0-3]\\.mlp\\.experts", "re:.*self_attn.*"])
    assert cfg.is_excluded("lm_head")
    assert not cfg.is_excluded("model.lm_head")  # exact, not substring
    assert cfg.is_excluded("model.layers.3.mlp.experts")
    assert not cfg.is_excluded("model.layers.4.mlp.experts")
    assert not cfg.is_excluded("model.layers.30.mlp.experts")
    assert not cfg.is_excluded("model.layers.3.mlp.experts_extra")  # re.fullmatch: a prefix match is not enough
    assert cfg.is_excluded("model.layers.9.self_attn.o_proj")
    assert cfg.resolve("model.layers.0.mlp.experts") is None  # exclusion beats a matching "*experts*" entry
    assert cfg.resolve("model.layers.4.mlp.experts").weight.dtype == "fp4"


def test_exclude_child_excludes_parent():
    prefix = "model.layers.5.mlp.experts"
    children = [f"{prefix}.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    cfg = _priority_config(exclude=["re:model\\.layers\\.5\\.mlp\\.experts\\.2\\.down_proj"])
    assert not cfg.is_excluded(prefix)
    assert cfg.is_excluded(prefix, children)
    assert cfg.resolve(prefix, child_names=children) is None
    assert cfg.resolve(prefix).weight.dtype == "fp4"
    other = "model.layers.6.mlp.experts"
    assert not cfg.is_excluded(other, [c.replace(prefix, other) for c in children])
    exact = _priority_config(exclude=[f"{prefix}.3.up_proj"])
    assert exact.is_excluded(prefix, children)
    assert exact.is_excluded(prefix)  # a literal entry naming a descendant of the layer (vLLM's check_children)
    assert not exact.is_excluded(f"{prefix}.3.up")  # descendant means a dotted child, not a string prefix


def test_exclude_glob_entries():
    # Quark matches exclude with fnmatch and writes the patterns verbatim (e.g. amd/GLM-5.2-MXFP4).
    cfg = _priority_config(exclude=["model.layers.7.mlp.experts.*.down_proj", "*lm_head*"])
    prefix = "model.layers.7.mlp.experts"
    assert cfg.is_excluded(prefix, [f"{prefix}.0.down_proj"])
    assert cfg.is_excluded(prefix)  # the entry starts with "<prefix>."
    assert not cfg.is_excluded("model.layers.17.mlp.experts", ["model.layers.17.mlp.experts.0.down_proj"])
    assert cfg.is_excluded("model.lm_head")


def test_exclude_validation():
    with pytest.raises(QuarkConfigError, match=r"quantization_config\.exclude: expected a list.*found 'lm_head'"):
        _priority_config(exclude="lm_head")
    with pytest.raises(QuarkConfigError, match=r"quantization_config\.exclude\[1\]: expected a string, found 3"):
        _priority_config(exclude=["lm_head", 3])
    with pytest.raises(QuarkConfigError, match=r"quantization_config\.exclude\[0\]: expected a valid regular exp"):
        _priority_config(exclude=["re:model.(layers"])


# --- the time bound of exclude patterns ------------------------------------------------------------------------------

SLOW = "re:(.|.)*w1."
"""Backtracks exponentially in the length of a name ending in ``w1`` (and never matches it)."""


@pytest.fixture(scope="module")
def slow_name() -> str:
    """A layer name on which one match of :data:`SLOW` takes 10-60 ms here (measured, as machines differ)."""
    import time

    import regex

    for length in range(8, 26):
        name = "a" * length + "w1"
        start = time.perf_counter()
        assert regex.fullmatch(SLOW[3:], name) is None
        if time.perf_counter() - start >= 0.01:
            return name
    raise AssertionError("no name made the pattern take 10 ms")


def _variants(count: int) -> list[str]:
    """``count`` distinct spellings of :data:`SLOW` (a ``(?#...)`` comment each): as slow, never cached as one."""
    return [f"{SLOW}(?#{i})" for i in range(count)]


def test_many_slow_exclude_patterns_share_one_bound_per_resolution(monkeypatch, slow_name):
    """80 patterns of 10-60 ms each: every one alone is well within the 0.2 s bound, together they would take
    0.8-5 s; the resolution ends when their total reaches the bound (the bound used to apply to each pattern
    alone, so a config with many of them ran for minutes)."""
    import time

    from quarkmoe_jax import quark_config

    monkeypatch.setattr(quark_config, "RESOLVE_BUDGET_S", 0.2)
    assert not _priority_config(exclude=_variants(1)).is_excluded(slow_name)  # one alone: within the bound
    cfg = _priority_config(exclude=_variants(80))
    start = time.perf_counter()
    with pytest.raises(
        QuarkConfigError,
        match=r"exclude: pattern 're:\(\.\|\.\)\*w1\.\(\?#\d+\)' did not finish "
        r"matching the layer name 'a+w1' within the 0\.2 s that all 're:' patterns may take for one "
        r"layer resolution",
    ):
        cfg.is_excluded("model.layers.0.mlp.experts", [slow_name])
    assert time.perf_counter() - start < 0.2 + 0.25  # the bound, and slack for a busy machine


def test_one_load_budget_spans_every_parse_of_the_config(slow_name):
    """Inside ``exclude_match_budget`` the resolutions of separate QuarkConfig objects (a loader parses config.json
    again for each MoE block) draw on one budget; a (pattern, name) already matched costs nothing again."""
    from quarkmoe_jax.quark_config import exclude_match_budget

    config = _qc(None, exclude=_variants(3))
    names = [f"{slow_name[:-2]}{suffix}w1" for suffix in ("b", "c")]
    with exclude_match_budget(seconds=60) as budget:
        assert not _parse(config).is_excluded(names[0])
        first = budget.spent
        assert first >= 3 * 0.005  # three slow matches were charged
        assert not _parse(config).is_excluded(names[0])  # parsed anew, same names: cached, free
        assert budget.spent == first
        with exclude_match_budget(seconds=1e-9) as inner:  # a nested budget joins the outer one
            assert inner is budget
        assert not _parse(config).is_excluded(names[1])
        assert budget.spent - first >= 3 * 0.005  # charged to the same budget
        budget.seconds = budget.spent  # used up: the next uncached match is refused, naming the load's budget
        with pytest.raises(QuarkConfigError, match=r"within the \d.* s that all 're:' patterns may take for one load"):
            _parse(config).is_excluded(names[1] + "x")
    assert not _parse(config).is_excluded(names[1])  # outside: no load budget (and cached)


def test_a_pattern_that_never_ends_is_stopped_by_the_resolution_bound(monkeypatch):
    from quarkmoe_jax import quark_config

    monkeypatch.setattr(quark_config, "RESOLVE_BUDGET_S", 0.1)
    with pytest.raises(QuarkConfigError, match=r"pattern 're:\(\.\|\.\)\*w1\.' did not finish .* within the 0\.1 s"):
        _priority_config(exclude=[SLOW]).is_excluded("model.layers.0.block_sparse_moe.experts.0.w1")


# --- Lists (sequential specs) --------------------------------------------------------------------------------------


def test_one_element_list_unwrapped():
    qc = _qc(_layer([MXFP4_W], [MXFP4_A]))
    assert _parse(qc).global_quant_config == _parse(REALISTIC["mxfp4"]).global_quant_config
    bad = _qc(_layer([{**MXFP4_W, "dtype": "fp3"}]))
    with pytest.raises(QuarkConfigError, match=r"global_quant_config\.weight\[0\]\.dtype: .*found 'fp3'"):
        _parse(bad)


def test_multi_element_list_refused():
    w4a8 = _qc(_layer([FP8_TENSOR, {**INT8_W, "dtype": "int4"}], FP8_TENSOR))
    with pytest.raises(
        QuarkConfigError,
        match=r"quantization_config\.global_quant_config\.weight: multi-spec \(sequential\).*not supported.*length 2",
    ):
        _parse(w4a8)
    nvfp4 = _qc(None, layer_quant_config={"*experts*": _layer(MXFP4_W, [MXFP4_A, FP8_TENSOR])})
    with pytest.raises(QuarkConfigError, match=r"layer_quant_config\.\*experts\*\.input_tensors: multi-spec"):
        _parse(nvfp4)
    with pytest.raises(QuarkConfigError, match=r"global_quant_config\.weight: expected .*one-element list, found \[\]"):
        _parse(_qc(_layer([])))


# --- Top-level errors -----------------------------------------------------------------------------------------------


def test_missing_export():
    qc = REALISTIC["mxfp4"]
    without = {k: v for k, v in qc.items() if k != "export"}
    with pytest.raises(QuarkConfigError, match=r"quantization_config\.export: expected the export block.*no such key"):
        QuarkConfig.from_hf_config(_hf(without))
    with pytest.raises(QuarkConfigError, match=r"quantization_config\.export: .*found null"):
        _parse({**qc, "export": None})
    with pytest.raises(QuarkConfigError, match=r"quantization_config\.export: expected a dict, found 'reorder'"):
        _parse({**qc, "export": "reorder"})


def test_quant_method():
    with pytest.raises(QuarkConfigError, match=r"quantization_config\.quant_method: expected 'quark', found 'fp8'"):
        QuarkConfig.from_hf_config(_hf({**REALISTIC["fp8_w8a8"], "quant_method": "fp8"}))
    no_method = {k: v for k, v in REALISTIC["fp8_w8a8"].items() if k != "quant_method"}
    with pytest.raises(QuarkConfigError, match=r"quant_method: expected 'quark', found None"):
        QuarkConfig.from_hf_config(_hf(no_method))
    assert _parse(no_method).global_quant_config.weight.dtype == "fp8_e4m3"  # optional in a bare block
    with pytest.raises(QuarkConfigError, match=r"quant_method: expected 'quark', found 'awq'"):
        _parse({**no_method, "quant_method": "awq"})
    with pytest.raises(QuarkConfigError, match=r"quantization_config: .*found no such key"):
        QuarkConfig.from_hf_config({"hidden_size": 64})


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("dtype", "fp3_e2m0", r"global_quant_config\.weight\.dtype: expected one of \[.*'fp4'.*\], found 'fp3_e2m0'"),
        ("dtype", None, r"global_quant_config\.weight\.dtype: expected one of .*found None"),
        ("qscheme", "per_token", r"global_quant_config\.weight\.qscheme: expected one of .*found 'per_token'"),
        ("mx_element_dtype", "fp2", r"global_quant_config\.weight\.mx_element_dtype: .*found 'fp2'"),
        ("group_size", "32", r"global_quant_config\.weight\.group_size: expected an int or null, found '32'"),
        ("group_size", True, r"global_quant_config\.weight\.group_size: expected an int or null, found True"),
        ("group_size", 32.0, r"global_quant_config\.weight\.group_size: expected an int or null, found 32\.0"),
        ("ch_axis", "-1", r"global_quant_config\.weight\.ch_axis: expected an int or null, found '-1'"),
        ("is_dynamic", "false", r"global_quant_config\.weight\.is_dynamic: expected true, false or null, found 'f"),
        ("symmetric", 1, r"global_quant_config\.weight\.symmetric: expected true, false or null, found 1"),
        ("block_size", [128, "128"], r"global_quant_config\.weight\.block_size: expected a list of ints"),
        ("scale_format", 8, r"global_quant_config\.weight\.scale_format: expected a string or null, found 8"),
    ],
)
def test_bad_tensor_spec(key, value, pattern):
    with pytest.raises(QuarkConfigError, match=pattern):
        _parse(_qc(_layer({**MXFP4_W, key: value}, MXFP4_A)))


def test_bad_spec_in_layer_maps_names_the_key():
    qc = _qc(None, layer_quant_config={"*.mlp.experts": _layer({**MXFP4_W, "qscheme": "per_row"})})
    with pytest.raises(QuarkConfigError, match=re.escape("layer_quant_config.*.mlp.experts.weight.qscheme")):
        _parse(qc)
    qc = _qc(None, layer_type_quant_config={"Linear": _layer(MXFP4_W, {**MXFP4_A, "dtype": "nf4"})})
    with pytest.raises(QuarkConfigError, match=r"layer_type_quant_config\.Linear\.input_tensors\.dtype.*'nf4'"):
        _parse(qc)
    with pytest.raises(QuarkConfigError, match=r"layer_quant_config: expected a dict.*found \['a'\]"):
        _parse(_qc(None, layer_quant_config=["a"]))
    with pytest.raises(QuarkConfigError, match=r"global_quant_config\.weight: expected a dict, found 'fp4'"):
        _parse(_qc(_layer("fp4")))


def test_tensor_spec_direct_construction():
    assert TensorSpec("fp4", block_size=[1, 32]).block_size == (1, 32)
    with pytest.raises(QuarkConfigError, match=r"TensorSpec\.dtype: .*found 'fp16'"):
        TensorSpec("fp16")
    with pytest.raises(QuarkConfigError, match=r"TensorSpec\.qscheme: .*found 'per_token'"):
        TensorSpec("int8", qscheme="per_token")


# --- to_dict round trip -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REALISTIC))
def test_round_trip(name):
    cfg = _parse(REALISTIC[name])
    out = cfg.to_dict()
    assert json.loads(json.dumps(out)) == out
    back = QuarkConfig.from_quantization_config(out)
    assert back == cfg
    assert back.raw == out and back.raw != cfg.raw  # raw is the dict as read, not compared
    assert back.to_dict() == out
    assert out["quant_method"] == "quark" and out["export"] == EXPORT and out["exclude"] == ["lm_head"]


def test_round_trip_full():
    cfg = _priority_config(
        exclude=["lm_head", "re:.*gate$"],
        global_quant_config=_layer({**FP8_TENSOR, "qscheme": "per_block", "block_size": [128, 128]}, None),
    )
    out = cfg.to_dict()
    assert out["global_quant_config"]["weight"]["block_size"] == [128, 128]
    assert list(out["layer_quant_config"]) == list(cfg.layer_quant_config)  # insertion order kept
    assert QuarkConfig.from_quantization_config(out) == cfg
    assert _parse(_qc(None)).to_dict()["global_quant_config"] is None


def test_tensor_spec_to_dict_keys():
    d = TensorSpec.from_dict(MXFP4_W, "w").to_dict()
    dropped = {"zero_point_type", "is_scale_quant", "enable_buffer_reuse", "max_input_numel"}
    assert list(d) == [k for k in MXFP4_W if k not in dropped]
    assert d == {k: v for k, v in MXFP4_W.items() if k not in dropped}
    lc = LayerQuantConfig.from_dict(_layer(MXFP4_W), "g").to_dict()
    assert set(lc) == {"weight", "input_tensors", "output_tensors", "bias"} and lc["input_tensors"] is None


def test_export_is_copied():
    qc = copy.deepcopy(REALISTIC["mxfp4"])
    cfg = _parse(qc)
    qc["export"]["pack_method"] = "order"
    assert cfg.export["pack_method"] == "reorder" and cfg.raw["export"]["pack_method"] == "reorder"


# --- from_json --------------------------------------------------------------------------------------------------------


def test_from_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf(REALISTIC["int8_w8a8"])))
    cfg = QuarkConfig.from_json(path)
    assert cfg == _parse(REALISTIC["int8_w8a8"])
    assert QuarkConfig.from_json(str(tmp_path)) == cfg  # a checkpoint directory


def test_from_json_missing_file(tmp_path):
    missing = tmp_path / "nope" / "config.json"
    with pytest.raises(QuarkConfigError, match=re.escape(str(missing)) + r": expected a readable config\.json"):
        QuarkConfig.from_json(missing)


def test_from_json_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"quantization_config": {"quant_method": "quark",')
    with pytest.raises(QuarkConfigError, match=re.escape(str(path)) + r": expected valid JSON"):
        QuarkConfig.from_json(path)


def test_from_json_bad_content_names_file_and_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf({**REALISTIC["mxfp4"], "quant_method": "gptq"})))
    with pytest.raises(QuarkConfigError, match=re.escape(str(path)) + r": quantization_config\.quant_method.*'gptq'"):
        QuarkConfig.from_json(path)


def test_observer_cls_kept_or_defaulted():
    # amd-quark refuses to reload a quantized spec without a fitting observer, so to_dict always writes one.
    custom = TensorSpec.from_dict({**INT8_W, "observer_cls": "PerChannelPowOf2MinMaxObserver"}, "w")
    assert custom.to_dict()["observer_cls"] == "PerChannelPowOf2MinMaxObserver"
    defaults = {
        TensorSpec("fp4", "per_group", group_size=32, ch_axis=-1, scale_format="e8m0"): "PerBlockMXObserver",
        TensorSpec("int4", "per_group", group_size=128, ch_axis=-1): "PerGroupMinMaxObserver",
        TensorSpec("fp8_e4m3", "per_tensor"): "PerTensorMinMaxObserver",
        TensorSpec("int8", "per_channel", ch_axis=0): "PerChannelMinMaxObserver",
        TensorSpec("fp8_e4m3", "per_block", block_size=(128, 128)): "PerBlock2DMinMaxObserver",
        TensorSpec("bfloat16"): "PlaceholderObserver",
        TensorSpec("int8"): None,
    }
    for spec, observer in defaults.items():
        assert spec.to_dict()["observer_cls"] == observer
    # calibration metadata only: not part of equality
    assert TensorSpec("int8", observer_cls="A") == TensorSpec("int8", observer_cls="B")
    with pytest.raises(QuarkConfigError, match=r"w\.observer_cls: expected a string or null, found 3"):
        TensorSpec.from_dict({"dtype": "int8", "observer_cls": 3}, "w")


def test_whole_loads_hold_one_budget_for_every_parse(monkeypatch):
    """from_pretrained, inspect_checkpoint and load_moe_block each open one exclude-pattern budget, and a model's
    MoE blocks (each parsing config.json again) join the load's."""
    import pathlib

    from quarkmoe_jax import quark_config
    from quarkmoe_jax.checkpoint import loader
    from quarkmoe_jax.models import loading

    seen = []
    read = loader.read_hf_config

    def spy(path):
        seen.append(quark_config._load_budget.get())
        return read(path)

    monkeypatch.setattr(loader, "read_hf_config", spy)
    monkeypatch.setattr(loading, "read_hf_config", spy)
    golden = pathlib.Path(__file__).parent / "golden" / "data" / "hf_models" / "mixtral"
    for load in (loader.inspect_checkpoint, lambda path: loader.load_moe_block(path, 0)):
        seen.clear()
        load(golden)
        assert len(seen) == 1 and isinstance(seen[0], quark_config.MatchBudget)
    seen.clear()
    loading.from_pretrained(golden, backend="emulation")
    assert len(seen) == 3 and seen[0] is not None and all(budget is seen[0] for budget in seen)  # 2 MoE layers
    assert quark_config._load_budget.get() is None

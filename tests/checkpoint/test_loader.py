"""Export -> load round trips for every scheme and architecture, and vLLM's post-load processing."""

import re
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import quarkmoe_jax as qm
from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES
from quarkmoe_jax.checkpoint.loader import linear_expert_map, load_moe_block, round_robin_expert_map
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader
from quarkmoe_jax.formats import quantizers
from quarkmoe_jax.nn import QuarkMoEBlock

PREFIX = "model.layers.1.block_sparse_moe.experts"  # synthetic Mixtral's layer 1
AMAX = {0: {"w13": np.array([1.0, 2.0, 3.0, 4.0]), "w2": np.array([0.5, 0.5, 0.7, 0.6])}}
AMAX[1] = AMAX[0]


def load(path, layer=1, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_moe_block(path, layer, **kwargs)


def as_bytes(a):
    return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize("scheme", EXPORT_SCHEMES)
def test_loaded_params_equal_exported_bytes(make_checkpoint, scheme):
    _, path = make_checkpoint("mixtral", scheme, input_amax=AMAX)
    block = load(path, semantics="quark")
    params = block.experts.params
    with CheckpointReader(path) as r:
        for e in range(4):
            for shard, rows in (("w1", slice(0, 64)), ("w3", slice(64, 128))):
                name = f"{PREFIX}.{e}.{shard}"
                w13 = params["w13"]
                if w13.kind == "mx":
                    np.testing.assert_array_equal(np.asarray(w13.packed)[e, rows], as_bytes(r[f"{name}.weight"]))
                    np.testing.assert_array_equal(np.asarray(w13.scales)[e, rows], r[f"{name}.weight_scale"])
                else:
                    np.testing.assert_array_equal(as_bytes(w13.values[e, rows]), as_bytes(r[f"{name}.weight"]))
                    scale = np.asarray(w13.scales)[e]
                    stored = r[f"{name}.weight_scale"]
                    expected = scale[rows] if scale.shape == (128,) else scale[0 if shard == "w1" else 1]
                    np.testing.assert_array_equal(expected, stored)
                if f"{name}.input_scale" in r:
                    assert np.asarray(params["w13_input_scale"])[e] == r[f"{name}.input_scale"]
            w2 = params["w2"]
            stored = r[f"{PREFIX}.{e}.w2.weight"]
            got = np.asarray(w2.packed)[e] if w2.kind == "mx" else as_bytes(w2.values[e])
            np.testing.assert_array_equal(
                got, as_bytes(stored) if got.dtype == np.uint8 and stored.dtype != np.uint8 else stored
            )


@pytest.mark.parametrize(
    "scheme", ["w_mxfp4_a_mxfp4", "w_mxfp6_e2m3_a_fp8", "w8a8_int8_channel_dynamic_token", "w8a8_fp8_tensor_static"]
)
def test_dequantized_weights_match_the_codecs(make_checkpoint, scheme):
    src, path = make_checkpoint("mixtral", scheme, input_amax=AMAX)
    w13, w2 = load_block_quiet(path, semantics="quark").experts.dequantized_weights()
    with CheckpointReader(src) as r:
        gate = r[f"{PREFIX}.2.w1.weight"].astype(np.float32)
        down = r[f"{PREFIX}.2.w2.weight"].astype(np.float32)
    for got, ref in ((np.asarray(w13)[2, :64], gate), (np.asarray(w2)[2], down)):
        rel = np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))
        assert rel < {"w_mxfp4_a_mxfp4": 0.13, "w_mxfp6_e2m3_a_fp8": 0.035}.get(scheme, 0.03), rel
    if scheme.startswith("w_mx"):
        fmt = re.match(r"w_(mxfp4|mxfp6_e3m2|mxfp6_e2m3)", scheme)[1]
        np.testing.assert_array_equal(np.asarray(w13)[2, :64], np.asarray(qm.quant_dequant(gate, fmt)))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("scheme", ["w_mxfp4_a_mxfp6_e2m3", "w8a8_int8_tensor_static"])
def test_every_architecture_loads_router_shared_and_biases(make_checkpoint, model_type, scheme):
    src, path = make_checkpoint(model_type, scheme, input_amax=2.0)
    block = QuarkMoEBlock.from_checkpoint(path, 1) if scheme.startswith("w_mx") else load_block_quiet(path)
    arch = block.architecture
    assert block.experts.quant_config.scheme == scheme
    assert block.routing.top_k == 2 and block.experts.shape.num_experts == 4
    moe = "model.layers.1.block_sparse_moe" if model_type == "mixtral" else "model.layers.1.mlp"
    router = "router" if model_type == "gpt_oss" else "gate"
    with CheckpointReader(src) as r:
        np.testing.assert_array_equal(
            np.asarray(block.router_weight.get_value()), r[f"{moe}.{router}.weight"].astype(np.float32)
        )
        if model_type == "gpt_oss":
            assert block.experts.shape.interleaved and block.experts.activation == "swigluoai"
            np.testing.assert_array_equal(np.asarray(block.router_bias.get_value()), r[f"{moe}.router.bias"])
            np.testing.assert_array_equal(
                np.asarray(block.experts.w13_bias.get_value())[3], r[f"{moe}.experts.3.gate_up_proj.bias"]
            )
            np.testing.assert_array_equal(
                np.asarray(block.experts.w2_bias.get_value())[0], r[f"{moe}.experts.0.down_proj.bias"]
            )
        if model_type == "deepseek_v3":
            assert block.correction_bias is not None and arch.scoring == "sigmoid"
            assert block.routing.num_expert_group == 2 and block.routing.routed_scaling_factor == 2.5
    has_shared = model_type in ("qwen2_moe", "deepseek_v2", "deepseek_v3")
    assert (block.shared is not None) == has_shared
    if has_shared:
        assert block.shared.shape.num_experts == 1 and block.shared.quant_config.scheme == scheme
        assert block.shared.shape.intermediate_size == (128 if model_type == "qwen2_moe" else 64)
    assert (block.shared_gate_weight is not None) == (model_type == "qwen2_moe")


def load_block_quiet(path, layer=1, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuarkMoEBlock.from_checkpoint(path, layer, **kwargs)


def test_non_moe_layer_is_refused(make_checkpoint):
    _, path = make_checkpoint("deepseek_v3", "w_mxfp4")
    with pytest.raises(CheckpointError, match=r"layer 0 is not a MoE layer.*MoE layers: 1"):
        QuarkMoEBlock.from_checkpoint(path, 0)


def test_fused_all_expert_tensors(make_checkpoint):
    src, path = make_checkpoint("qwen3_moe", "w_mxfp4_a_mxfp4", float_kwargs={"fused_experts": True})
    block = QuarkMoEBlock.from_checkpoint(path, 1)
    with CheckpointReader(src) as r:
        gate_up = r["model.layers.1.mlp.experts.gate_up_proj.weight"].astype(np.float32)
    w13, _ = block.experts.dequantized_weights()
    np.testing.assert_array_equal(np.asarray(w13), np.asarray(qm.quant_dequant(gate_up, "mxfp4")))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2"])
def test_sizes_not_multiple_of_32_are_padded(make_checkpoint, fmt):
    src, path = make_checkpoint("mixtral", f"w_{fmt}", float_kwargs={"hidden_size": 48, "intermediate_size": 40})
    experts = QuarkMoEBlock.from_checkpoint(path, 1).experts
    w13, w2 = experts.params()["w13"], experts.params()["w2"]
    assert w13.shape == (4, 128, 64) and w2.shape == (4, 64, 64)  # 2*I_pad rows, H_pad; H_pad, I_pad
    scales = np.asarray(w13.scales)
    assert (scales[:, 40:64] == 127).all() and (scales[:, 104:] == 127).all()  # padded rows: neutral scale
    deq13, deq2 = experts.dequantized_weights()
    assert not np.asarray(deq13)[:, 40:64].any() and not np.asarray(deq13)[:, :, 48:].any()
    assert not np.asarray(deq2)[:, 48:].any() and not np.asarray(deq2)[:, :, 40:].any()
    with CheckpointReader(src) as r:
        up = r[f"{PREFIX}.1.w3.weight"].astype(np.float32)
    padded = np.pad(up, [(0, 0), (0, 16)])
    np.testing.assert_array_equal(np.asarray(deq13)[1, 64:104], np.asarray(qm.quant_dequant(padded, fmt)))


@pytest.mark.parametrize("placement", [linear_expert_map, round_robin_expert_map])
def test_expert_map_loads_only_local_experts(make_checkpoint, placement):
    _, path = make_checkpoint("mixtral", "w_mxfp4")
    full = QuarkMoEBlock.from_checkpoint(path, 1).experts.params()["w13"]
    expert_map = placement(4, 3, 1)  # rank 1 of 3
    local = QuarkMoEBlock.from_checkpoint(path, 1, expert_map=expert_map).experts
    mine = np.flatnonzero(expert_map >= 0)
    assert local.shape.num_experts == mine.size
    np.testing.assert_array_equal(np.asarray(local.w13.get_value().packed), np.asarray(full.packed)[mine])
    np.testing.assert_array_equal(np.asarray(local.expert_map.get_value()), expert_map)


def test_placement_helpers_match_vllm():
    assert linear_expert_map(10, 4, 0).tolist() == [0, 1, 2] + [-1] * 7
    assert linear_expert_map(10, 4, 3).tolist() == [-1] * 8 + [0, 1]
    assert round_robin_expert_map(10, 4, 1).tolist() == [-1, 0, -1, -1, -1, 1, -1, -1, -1, 2]


@pytest.mark.parametrize("expert_map", [[0, 0, -1, -1], [0, 2, -1, -1], [-1, -1, -1, -1], [0, 1, 2]])
def test_bad_expert_maps(make_checkpoint, expert_map):
    _, path = make_checkpoint("mixtral", "w_mxfp4")
    with pytest.raises(CheckpointError, match="expert_map"):
        QuarkMoEBlock.from_checkpoint(path, 1, expert_map=np.array(expert_map, np.int32))


def test_static_input_scales_collapse_under_vllm_and_stay_per_expert_under_quark(make_checkpoint):
    _, path = make_checkpoint("mixtral", "w_mxfp4_a_fp8", input_amax=AMAX)
    with pytest.warns(UserWarning, match="differ across experts"):
        vllm = QuarkMoEBlock.from_checkpoint(path, 1).experts
    quark = QuarkMoEBlock.from_checkpoint(path, 1, semantics="quark").experts
    expected = AMAX[1]["w13"].astype(np.float32) / np.float32(448)
    np.testing.assert_array_equal(np.asarray(quark.w13_input_scale.get_value()), expected)
    assert (
        np.asarray(vllm.w13_input_scale.get_value()).shape == ()
        and float(vllm.w13_input_scale.get_value()) == expected.max()
    )


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_per_tensor_shards_requantized_to_max_under_vllm(make_checkpoint, kind):
    _, path = make_checkpoint("mixtral", f"w8a8_{kind}_tensor_dynamic_token")
    quark = load(path, semantics="quark").experts.params["w13"]
    vllm = load(path, semantics="vllm").experts.params["w13"]
    s = np.asarray(quark.scales)  # [E, 2] per shard
    assert (quark.qtype.granularity, vllm.qtype.granularity) == ("shard", "tensor")
    assert s.shape == (4, 2) and np.asarray(vllm.scales).shape == (4,)
    np.testing.assert_array_equal(np.asarray(vllm.scales), s.max(1))
    for e in range(4):
        j = int(np.argmin(s[e]))
        rows = slice(64 * j, 64 * (j + 1))
        q = np.asarray(quark.values[e, rows]).astype(np.float32)
        dq = (q * s[e, j]).astype(np.float16).astype(np.float32)  # vLLM dequantizes through float16
        if kind == "int8":
            want = np.clip(np.rint(dq / s[e].max()), -128, 127).astype(np.int8)
        else:
            want = np.clip(dq * (np.float32(1) / s[e].max()), -448, 448).astype(ml_dtypes.float8_e4m3fn)
        np.testing.assert_array_equal(as_bytes(vllm.values[e, rows]), as_bytes(want))
        other = slice(64 * (1 - j), 64 * (2 - j))  # the max-scale shard is untouched
        np.testing.assert_array_equal(as_bytes(vllm.values[e, other]), as_bytes(quark.values[e, other]))


def test_int8_per_tensor_with_dynamic_per_tensor_activation_is_w8a16_under_vllm(make_checkpoint):
    _, path = make_checkpoint("mixtral", "w8a8_int8_tensor_dynamic_tensor")
    assert load(path).experts.scheme.quant_config().activation.kind == "none"
    quark = load(path, semantics="quark").experts.scheme.quant_config().activation
    assert quark.kind == "int8" and quark.granularity == "tensor"


def test_excluded_layer_loads_unquantized(make_checkpoint):
    src, path = make_checkpoint("mixtral", "w_mxfp4", exclude_layers=(1,))
    block = QuarkMoEBlock.from_checkpoint(path, 1)
    assert block.experts.quant_config.scheme == "unquantized"
    with CheckpointReader(src) as r:
        w2 = block.experts.w2.get_value().values
        np.testing.assert_array_equal(as_bytes(w2[3]), as_bytes(r[f"{PREFIX}.3.w2.weight"]))
    assert QuarkMoEBlock.from_checkpoint(path, 0).experts.quant_config.scheme == "w_mxfp4"


def test_dequantized_weights_under_jit_and_nnx_round_trip(make_checkpoint):
    from flax import nnx

    _, path = make_checkpoint("gpt_oss", "w_mxfp4_a_mxfp4")
    block = QuarkMoEBlock.from_checkpoint(path, 1)
    graphdef, state = nnx.split(block)
    restored = nnx.merge(graphdef, state)
    before, after = jax.tree_util.tree_leaves(nnx.state(block)), jax.tree_util.tree_leaves(nnx.state(restored))
    assert len(before) == len(after) > 5
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(as_bytes(a), as_bytes(b))
    w13 = nnx.jit(lambda m: m.experts.dequantized_weights(jnp.bfloat16)[0])(restored)
    assert w13.dtype == jnp.bfloat16 and w13.shape == (4, 128, 64)
    x = jnp.ones((2, 64), jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(nnx.jit(lambda m, x: m(x))(restored, x), np.float32), np.asarray(block(x), np.float32)
    )


def test_w8a8_quantizers_follow_quark_numerics(make_checkpoint):
    src, path = make_checkpoint("mixtral", "w8a8_int8_channel_static", input_amax=AMAX)
    with CheckpointReader(src) as r, CheckpointReader(path) as q:
        w = r[f"{PREFIX}.0.w2.weight"].astype(np.float32)
        codes, scale = quantizers.int8_quantize(w, granularity="token", semantics="quark")
        np.testing.assert_array_equal(q[f"{PREFIX}.0.w2.weight"], np.asarray(codes))
        np.testing.assert_array_equal(q[f"{PREFIX}.0.w2.weight_scale"], np.asarray(scale)[:, 0])
        assert q[f"{PREFIX}.0.w2.input_scale"] == np.float32(0.5) / np.float32(127.5)
        assert not q[f"{PREFIX}.0.w2.weight_zero_point"].any()


def test_progress_bar_on_request(make_checkpoint, capsys):
    _, path = make_checkpoint("mixtral", "w_mxfp4")
    QuarkMoEBlock.from_checkpoint(path, 1, progress=True)
    assert "loading experts" in capsys.readouterr().err

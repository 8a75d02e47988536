"""config.json as each architecture's Hugging Face config class reads it: the files transformers 4.x and 5.x
save (tests/golden/generate_hf_configs.py) give the same architecture; aliases and conflicts. Checkpoint tensor
names: each architecture's formatter and parser agree, and only architectures.py spells them."""

import ast
import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest

from quarkmoe_jax.checkpoint import architectures
from quarkmoe_jax.checkpoint.architectures import (
    CORRECTION_BIAS,
    FAMILIES,
    HF_PROJECTIONS,
    PROJECTIONS,
    SUFFIXES,
    SUPPORTED_MODEL_TYPES,
    MoEArchitecture,
    decoder_layer,
    dense_mlp,
    dense_tensor,
    layer_of,
    linear_name,
    parse_projection_tensor,
    split_tensor_name,
    tensor_name,
)
from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.loader import inspect_checkpoint
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError
from quarkmoe_jax.checkpoint.synthetic import synthetic_moe, write_float_checkpoint
from quarkmoe_jax.moe.routing import RoutingConfig
from quarkmoe_jax.nn import QuarkMoEBlock

CONFIGS = pathlib.Path(__file__).parents[1] / "golden" / "data" / "hf_configs"
EXPECTED = {  # what the generator asked for, read back from either version's file
    "mixtral": dict(num_experts=8, top_k=2, intermediate_size=96, moe_layers=(0, 1, 2, 3)),
    "qwen2_moe": dict(num_experts=8, top_k=2, intermediate_size=48, moe_layers=(1,), shared_intermediate_size=96),
    "qwen3_moe": dict(num_experts=8, top_k=2, intermediate_size=48, moe_layers=(1, 2, 3), renormalize=True),
    "deepseek_v2": dict(num_experts=8, top_k=2, intermediate_size=48, moe_layers=(1, 2, 3), num_expert_group=2),
    "deepseek_v3": dict(num_experts=8, top_k=2, intermediate_size=48, moe_layers=(1, 2, 3), scoring="sigmoid"),
    "gpt_oss": dict(num_experts=8, top_k=2, intermediate_size=96, moe_layers=(0, 1, 2, 3), swiglu_limit=7.0),
}


def _saved(major: int, model_type: str) -> dict:
    return json.loads((CONFIGS / f"transformers{major}" / f"{model_type}.json").read_text())


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_transformers_4_and_5_files_give_the_same_architecture(model_type):
    v4, v5 = (MoEArchitecture.from_hf_config(_saved(major, model_type)) for major in (4, 5))
    assert v4 == v5
    for field, value in EXPECTED[model_type].items():
        assert getattr(v5, field) == value, field


def test_qwen3_moe_spellings_differ_between_versions():
    """The case a user hit: transformers 5.x writes num_local_experts, 4.x num_experts."""
    assert "num_experts" in _saved(4, "qwen3_moe") and "num_local_experts" not in _saved(4, "qwen3_moe")
    assert "num_local_experts" in _saved(5, "qwen3_moe") and "num_experts" not in _saved(5, "qwen3_moe")


@pytest.mark.parametrize(
    "model_type, canonical, alias",
    [
        (m, c, a)
        for m, family in FAMILIES.items()
        for fields in [family.aliases]
        for c, aliases in fields.items()
        for a in aliases
    ],
)
def test_every_alias_reads_like_its_canonical_name_and_conflicts_are_refused(model_type, canonical, alias):
    config = _saved(5, model_type)
    value = MoEArchitecture.from_hf_config(config)
    renamed = {alias if k == canonical else k: v for k, v in config.items()}
    assert alias in renamed and canonical not in renamed
    assert MoEArchitecture.from_hf_config(renamed) == value
    same = {**config, alias: config[canonical]}
    assert MoEArchitecture.from_hf_config(same) == value
    with pytest.raises(CheckpointError, match=rf"{canonical} = .* and {alias} = .* disagree"):
        MoEArchitecture.from_hf_config({**config, alias: config[canonical] + 1})


def test_missing_key_names_every_spelling():
    config = {k: v for k, v in _saved(5, "qwen3_moe").items() if k != "num_local_experts"}
    with pytest.raises(CheckpointError, match="missing key 'num_local_experts' or 'num_experts'"):
        MoEArchitecture.from_hf_config(config)


@pytest.mark.parametrize("value", ["8", 8.5, True])
def test_non_integer_sizes_are_refused(value):
    with pytest.raises(CheckpointError, match=r"must be an integer in \[1, "):
        MoEArchitecture.from_hf_config({**_saved(5, "mixtral"), "num_local_experts": value})


def test_gpt_oss_other_swiglu_alpha_is_refused():
    with pytest.raises(CheckpointError, match="swiglu_alpha = 1.5"):
        MoEArchitecture.from_hf_config({**_saved(5, "gpt_oss"), "swiglu_alpha": 1.5})


def test_a_transformers_5_qwen3_checkpoint_inspects_and_runs(tmp_path):
    """inspect and the module on a Qwen3-MoE checkpoint whose config has only num_local_experts."""
    path = write_float_checkpoint(tmp_path / "f", "qwen3_moe", num_layers=2, hidden_size=64, intermediate_size=32)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["num_local_experts"] = config.pop("num_experts")
    config_path.write_text(json.dumps(config))
    q = export_quark_checkpoint(path, tmp_path / "q", "w_mxfp4")
    report = inspect_checkpoint(q)
    assert report["architecture"]["num_experts"] == 4 and all("refused" not in e for e in report["layers"].values())
    block = QuarkMoEBlock.from_checkpoint(q, 1)
    out = block(np.ones((3, 64), np.float32))
    assert out.shape == (3, 64) and np.isfinite(np.asarray(out)).all()


# ------------------------------------------------------------------------- checkpoint tensor names, one place


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_tensor_names_format_and_parse_back(model_type):
    """Every name an architecture makes parses back to what made it: routed experts (per expert and all in one
    tensor, under every block the loader looks in), shared experts; routers are told apart."""
    names = FAMILIES[model_type].names
    for layer in (0, 7, 61):
        for block in names.blocks(layer):
            for expert in (None, 0, 5, 255):
                for shard in ("w1", "w3", "w2", "w13"):
                    for suffix in SUFFIXES:
                        name = names.expert_tensor(block, expert, shard, suffix)
                        parsed = names.parse(name)
                        assert parsed is not None, name
                        got = (parsed.layer, parsed.expert, parsed.shard, parsed.suffix, parsed.shared, parsed.native)
                        assert got == (layer, expert, shard, suffix, False, False), name
                        assert parsed.name == parsed.quark_name == name and layer_of(name) == layer
                        assert parsed.prefix == names.experts(block)
                        assert parse_projection_tensor(name, parsed.prefix) == dataclasses.replace(parsed, layer=None)
                        assert not names.is_router(name)
            if names.shared:
                for shard in ("w1", "w3", "w2"):
                    name = dense_tensor(names.shared_experts(block), shard, "weight_scale")
                    parsed = names.parse(name)
                    assert (parsed.layer, parsed.expert, parsed.shard, parsed.shared) == (layer, None, shard, True)
            routers = [names.router_tensor(block)] + ([names.shared_gate_tensor(block)] if names.shared_gate else [])
            for name in routers:
                assert names.is_router(name) and names.parse(name) is None and layer_of(name) == layer
            for suffix in ("bias", CORRECTION_BIAS):
                assert not names.is_router(names.router_tensor(block, suffix))


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_every_accepted_spelling_and_transformers_own_layout_parse(model_type):
    names = FAMILIES[model_type].names
    experts = names.experts(names.block(3))
    for spelling, shard in PROJECTIONS.items():
        parsed = names.parse(tensor_name(linear_name(experts, spelling, 2)))
        assert (parsed.expert, parsed.projection, parsed.shard, parsed.suffix) == (2, spelling, shard, "weight")
    for spelling, shard in (("gate_up_proj", "w13"), ("down_proj", "w2")):  # [E, in, out] and [E, out] biases
        weight, bias = names.parse(f"{experts}.{spelling}"), names.parse(f"{experts}.{spelling}_bias")
        assert weight.native and weight.transposed and weight.shard == shard and weight.expert is None
        assert weight.quark_name == names.expert_tensor(names.block(3), None, shard)
        assert bias.native and not bias.transposed and bias.suffix == "bias"
        assert bias.quark_name == names.expert_tensor(names.block(3), None, shard, "bias")
    for other in (
        "model.embed_tokens.weight",
        f"{decoder_layer(3)}.self_attn.q_proj.weight",
        f"{experts}.0.o_proj.weight",  # not a projection
        f"{experts}.0.gate_proj.scale",  # not a suffix
        f"{decoder_layer(3)}.attn.experts.0.w1.weight",  # not a block of this architecture
    ):
        assert names.parse(other) is None, other


def test_dense_mlp_and_tensor_names_round_trip():
    prefix = dense_mlp(4)
    for shard in ("w1", "w3", "w2"):
        name = dense_tensor(prefix, shard, "input_scale")
        parsed = parse_projection_tensor(name, prefix, indexed=False)
        assert (parsed.shard, parsed.suffix, parsed.expert) == (shard, "input_scale", None) and layer_of(name) == 4
        assert split_tensor_name(name) == (linear_name(prefix, HF_PROJECTIONS[shard]), "input_scale")
    assert parse_projection_tensor(f"{prefix}.0.gate_proj.weight", prefix, indexed=False) is None
    assert split_tensor_name("lm_head") == ("lm_head", "") and layer_of("lm_head.weight") is None


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize("fused_experts", [False, True])
def test_synthetic_moe_tensors_are_the_names_the_architecture_parses(model_type, fused_experts):
    config, tensors = synthetic_moe(model_type, num_layers=3, fused_experts=fused_experts)
    arch = MoEArchitecture.from_hf_config(config)
    names = arch.names
    for layer in range(3):
        block = names.block(layer)
        under = [n for n in tensors if n.startswith(block + ".")]
        if layer not in arch.moe_layers:
            assert not any(names.parse(n) for n in tensors if layer_of(n) == layer)
            continue
        parsed = {n: names.parse(n) for n in under}
        routers = {n for n in under if names.is_router(n)}
        shared_gates = {names.shared_gate_tensor(block)} if names.shared_gate else set()
        assert routers == {names.router_tensor(block)} | shared_gates
        others = set(under) - routers - {n for n, p in parsed.items() if p}
        assert others <= {names.router_tensor(block, "bias"), names.router_tensor(block, CORRECTION_BIAS)}
        assert any(p and p.shared for p in parsed.values()) == arch.has_shared_experts


def test_routing_is_held_by_the_architecture():
    arch = MoEArchitecture.from_hf_config(_saved(5, "deepseek_v3"))
    assert RoutingConfig.from_architecture(arch) is arch.routing
    for field in dataclasses.fields(RoutingConfig):
        assert getattr(arch, field.name) == getattr(arch.routing, field.name)
    with pytest.raises(CheckpointError, match=r"config.json: scoring_func = 'relu' must be one of"):
        MoEArchitecture.from_hf_config({**_saved(5, "deepseek_v3"), "scoring_func": "relu"})


#: fragments of MoE tensor names: projections, blocks, routers, shared experts, scale suffixes, layers
MOE_NAME_FRAGMENT = re.compile(
    r"experts\.|\.experts|\.shared_expert|shared_experts?\.|shared_expert_gate|block_sparse_moe"
    r"|(gate|up|down)_proj|\bw(1|2|3|13)\.|\.(gate|router|mlp)\b|\b(gate|router|mlp)\.|e_score_correction"
    r"|_proj_bias|\.(weight_scale|input_scale|weight_zero_point|input_zero_point)\b|model\.layers"
)
#: ``.weight`` / ``.bias`` (the synthetic checkpoints spell the attention / norm / embedding tensors that
#: quarkmoe_jax.models reads, which are no MoE tensors)
SUFFIX_FRAGMENT = re.compile(r"\.(weight|bias)\b")
CHECKPOINT = pathlib.Path(architectures.__file__).parent


def _string_literals(path: pathlib.Path) -> list[str]:
    """Every string constant of a module (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


@pytest.mark.parametrize(
    "module, patterns",
    [
        ("exporter.py", [MOE_NAME_FRAGMENT, SUFFIX_FRAGMENT]),
        ("loader.py", [MOE_NAME_FRAGMENT, SUFFIX_FRAGMENT]),
        ("synthetic.py", [MOE_NAME_FRAGMENT]),
    ],
)
def test_tensor_names_are_spelled_only_in_architectures(module, patterns):
    """The exporter, the loader and the synthetic checkpoints make and read tensor names only through
    ``checkpoint/architectures.py``: none of their string literals spells part of one."""
    spelled = [s for s in _string_literals(CHECKPOINT / module) if any(p.search(s) for p in patterns)]
    assert not spelled, f"{module} spells tensor names itself; use checkpoint/architectures.py: {spelled}"


def test_the_tensor_name_scan_sees_the_names_where_they_are():
    """The scan above cannot pass by reading nothing: architectures.py's own spellings are found."""
    found = [s for s in _string_literals(CHECKPOINT / "architectures.py") if MOE_NAME_FRAGMENT.search(s)]
    for spelled in ("block_sparse_moe", "shared_expert_gate", "gate_up_proj", "e_score_correction_bias"):
        assert spelled in found

"""config.json as each architecture's Hugging Face config class reads it: the files transformers 4.x and 5.x
save (tests/golden/generate_hf_configs.py) give the same architecture; aliases and conflicts."""

import json
import pathlib

import numpy as np
import pytest

from quarkmoe_jax.checkpoint.architectures import CONFIG_ALIASES, SUPPORTED_MODEL_TYPES, MoEArchitecture
from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.loader import inspect_checkpoint
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError
from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
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
    [(m, c, a) for m, fields in CONFIG_ALIASES.items() for c, aliases in fields.items() for a in aliases],
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
    with pytest.raises(CheckpointError, match="is not an integer"):
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

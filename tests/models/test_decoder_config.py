"""Every whole-model config.json field the model reads is checked when DecoderConfig is built (type, finite,
in range, consistent), with one CheckpointError naming the key; a config claiming more layers than the
checkpoint holds is refused before any tensor data is read; fuzzing (hypothesis) of every field either refuses
cleanly or yields a config (and, for fields that keep the tensors' shapes, a model) with finite logits."""

from __future__ import annotations

import copy
import json
import math
import pathlib
import resource
import shutil
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quarkmoe_jax import QuarkMoEError
from quarkmoe_jax.checkpoint.architectures import MAX_INT32, MAX_LAYERS, SUPPORTED_MODEL_TYPES
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError
from quarkmoe_jax.models import DecoderConfig, from_pretrained
from quarkmoe_jax.models.inputs import InputError, context_of

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "data"
HF_MODELS = GOLDEN / "hf_models"


def saved(model_type: str, major: int = 5) -> dict:
    """The config.json of a golden tiny model (transformers 5.x spelling), or as transformers 4.x spelled it
    (``rope_theta`` / ``rope_scaling`` at the top)."""
    config = json.loads((HF_MODELS / model_type / "config.json").read_text())
    if major == 4:
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type") != "default":
            config["rope_scaling"] = rope
    return config


def edited(model_type: str, major: int = 5, **changes) -> dict:
    """The saved config with ``changes``; a key ``"rope_parameters.x"`` edits the nested rope object."""
    config = saved(model_type, major)
    for key, value in changes.items():
        target, name = config, key
        if "." in key:
            outer, name = key.split(".")
            target = config.setdefault(outer, {})
        target[name] = value
    return config


NAN, INF = float("nan"), float("inf")

#: (model_type, transformers major, {key: value}, what the message must say): one case per class the issue met
REFUSED = [
    ("mixtral", 5, {"rms_norm_eps": NAN}, r"rms_norm_eps = nan must be a finite float32 number > 0"),
    ("mixtral", 5, {"rms_norm_eps": INF}, r"rms_norm_eps = inf"),
    ("mixtral", 5, {"rms_norm_eps": 0}, r"rms_norm_eps = 0"),
    ("mixtral", 5, {"rms_norm_eps": "1e-5"}, r"rms_norm_eps = '1e-5'"),
    ("mixtral", 5, {"rope_parameters.rope_theta": NAN}, r"rope_parameters\.rope_theta = nan must be .* > 1"),
    ("mixtral", 4, {"rope_theta": INF}, r"rope_theta = inf"),
    ("gpt_oss", 5, {"rope_parameters.factor": NAN}, r"rope_parameters\.factor = nan"),
    ("gpt_oss", 5, {"rope_parameters.factor": 0.5}, r"rope_parameters\.factor = 0\.5 must be .* >= 1"),
    ("gpt_oss", 5, {"rope_parameters.attention_factor": INF}, r"rope_parameters\.attention_factor = inf"),
    ("gpt_oss", 5, {"rope_parameters.attention_factor": 1e6}, r"attention_factor = 1000000\.0 .* <= 1000"),
    ("gpt_oss", 5, {"rope_parameters.truncate": "no"}, r"rope_parameters\.truncate = 'no' must be true or false"),
    ("gpt_oss", 5, {"swiglu_limit": NAN}, r"swiglu_limit = nan"),
    ("gpt_oss", 5, {"sliding_window": 1e18}, r"sliding_window = 1e\+18 must be an integer in \[1, 2147483647\]"),
    ("gpt_oss", 5, {"layer_types": ["sliding_attention"] * 3}, r"layer_types must list 2 layer types"),
    ("deepseek_v3", 5, {"routed_scaling_factor": INF}, r"routed_scaling_factor = inf"),
    ("deepseek_v3", 5, {"moe_layer_freq": 0}, r"moe_layer_freq = 0 must be an integer in \[1, 2\]"),
    ("deepseek_v3", 5, {"n_group": 0}, r"n_group = 0 must be an integer in \[1, 4\]"),
    ("deepseek_v3", 5, {"n_group": 3}, r"n_routed_experts = 4 must be a multiple of n_group = 3"),
    ("deepseek_v3", 5, {"topk_group": 3}, r"topk_group = 3 must be an integer in \[1, 2\]"),
    ("deepseek_v3", 5, {"rope_interleave": 1}, r"rope_interleave = 1 must be true or false"),
    ("deepseek_v3", 5, {"topk_method": "random"}, r"topk_method = 'random' must be one of"),
    ("deepseek_v3", 5, {"qk_rope_head_dim": 15}, r"rotary dimension 15 .* must be even"),
    ("qwen3_moe", 5, {"decoder_sparse_step": 0}, r"decoder_sparse_step = 0 must be an integer in \[1, "),
    ("qwen3_moe", 5, {"mlp_only_layers": [99]}, r"mlp_only_layers = \[99\] must be a list of integers in \[0, 1\]"),
    ("qwen3_moe", 5, {"norm_topk_prob": "yes"}, r"norm_topk_prob = 'yes' must be true or false"),
    ("qwen2_moe", 5, {"use_sliding_window": "true"}, r"use_sliding_window = 'true' must be true or false"),
    ("mixtral", 5, {"tie_word_embeddings": "false"}, r"tie_word_embeddings = 'false' must be true or false"),
    ("mixtral", 5, {"eos_token_id": 1e30}, r"eos_token_id = 1e\+30 must be a token id in \[0, 96\)"),
    ("mixtral", 5, {"eos_token_id": [1, 96]}, r"eos_token_id = \[1, 96\] must be a token id"),
    ("mixtral", 5, {"eos_token_id": True}, r"eos_token_id = True"),
    (
        "mixtral",
        5,
        {"num_hidden_layers": 10**7},
        rf"num_hidden_layers = 10000000 must be an integer in \[1, {MAX_LAYERS}\]",
    ),
    ("mixtral", 5, {"num_hidden_layers": 1e18}, r"num_hidden_layers = 1e\+18 must be an integer"),
    ("mixtral", 5, {"num_key_value_heads": 3}, r"num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
    ("mixtral", 5, {"num_key_value_heads": 8}, r"num_key_value_heads = 8 must be an integer in \[1, 4\]"),
    ("mixtral", 5, {"num_experts_per_tok": 9}, r"num_experts_per_tok = 9 must be an integer in \[1, 4\]"),
    ("mixtral", 5, {"max_position_embeddings": -1}, r"max_position_embeddings = -1 must be an integer"),
    ("mixtral", 5, {"vocab_size": 2**31}, rf"vocab_size = {2**31} must be an integer in \[1, {MAX_INT32}\]"),
]


@pytest.mark.parametrize(
    "model_type, major, changes, message", REFUSED, ids=[f"{c[0]}-{'-'.join(c[2])}" for c in REFUSED]
)
def test_a_bad_field_is_refused_naming_the_key_and_the_value(model_type, major, changes, message):
    config = edited(model_type, major, **changes)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        DecoderConfig.from_hf_config(config)
    assert time.perf_counter() - started < 1.0  # refused before any work proportional to a claimed size


def test_every_saved_config_is_accepted_and_its_values_are_kept():
    for model_type in SUPPORTED_MODEL_TYPES:
        config = DecoderConfig.from_hf_config(saved(model_type))
        assert config.model_type == model_type
        assert DecoderConfig.from_hf_config(saved(model_type, 4)) == config  # both spellings, one decoder
    gpt_oss = DecoderConfig.from_hf_config(saved("gpt_oss"))
    assert gpt_oss.rope.kind == "yarn" and gpt_oss.rope.factor == 32.0 and gpt_oss.rope.truncate is False
    assert gpt_oss.moe.swiglu_limit == 7.0 and gpt_oss.sliding_windows[0] is not None
    assert DecoderConfig.from_hf_config(edited("mixtral", tie_word_embeddings=True)).tie_word_embeddings is True
    # JSON writers may store integral sizes as floats (4096.0): accepted, as transformers accepts them
    assert DecoderConfig.from_hf_config(edited("mixtral", max_position_embeddings=64.0)).max_position_embeddings == 64


def test_a_config_claiming_more_layers_than_the_checkpoint_holds_is_refused_before_loading(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(HF_MODELS / "mixtral", folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = MAX_LAYERS
    (folder / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(
        CheckpointError,
        match=rf"num_hidden_layers = {MAX_LAYERS}, but the checkpoint holds no "
        rf"tensors of layer\(s\) 2\.\.{MAX_LAYERS - 1}",
    ):
        from_pretrained(folder, backend="emulation")
    assert time.perf_counter() - started < 5.0


# ------------------------------------------------------------------------------------------------- fuzzing

#: values that broke the model before these checks, and generic ones of every JSON type
odd_values = st.one_of(
    st.sampled_from([NAN, INF, -INF, 0, -1, 1, 2, 3, 0.5, 1e-45, 1e18, 10**18, 2**31, 2**40, 1e30, 3.5e38]),
    st.sampled_from([True, False, "false", "8", "", None, [], {}, [1, 2], {"rope_type": "yarn"}]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)


def _fields(config: dict) -> list[str]:
    """Every field of a saved config, and of its rope object (``rope_parameters.<name>``)."""
    keys = [k for k in config if k not in ("model_type", "quantization_config")]
    keys += [f"rope_parameters.{k}" for k in config.get("rope_parameters") or {}]
    return keys + ["rope_theta", "n_group", "topk_group", "head_dim", "mscale_all_dim"]


def _mutated(model_type: str, data) -> dict:
    config = saved(model_type, data.draw(st.sampled_from([4, 5]), label="transformers"))
    fields = _fields(config)
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        key = data.draw(st.sampled_from(fields), label="key")
        value = data.draw(odd_values, label=key)
        target = config
        if key.startswith("rope_parameters."):
            target = config.get("rope_parameters")
            if not isinstance(target, dict):
                continue
            key = key.split(".", 1)[1]
        target[key] = value
    return config


def _assert_sane(config: DecoderConfig) -> None:
    """What an accepted config promises the model."""
    assert 1 <= config.num_layers <= MAX_LAYERS and 1 <= config.vocab_size <= MAX_INT32
    assert config.num_heads % config.num_kv_heads == 0 and config.head_dim >= 1
    assert all(0 <= e < config.vocab_size for e in config.eos_token_ids)
    assert all(w is None or 1 <= w <= MAX_INT32 for w in config.sliding_windows)
    assert set(config.moe.moe_layers) <= set(range(config.num_layers))
    assert 1 <= config.moe.top_k <= max(config.moe.num_experts, 1)
    for value in (config.rms_norm_eps, config.attention_scale, config.rope.theta, config.rope.attention_factor):
        assert math.isfinite(value) and value > 0
    if config.rope.dim <= 4096:
        frequencies = config.rope.inverse_frequencies()
        assert np.isfinite(frequencies).all() and (frequencies >= 0).all() and (frequencies <= 1).all()


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@settings(max_examples=60, deadline=2000, derandomize=False)
@given(data=st.data())
def test_fuzzed_configs_are_refused_with_one_error_or_sane(model_type, data):
    config = _mutated(model_type, data)
    try:
        parsed = DecoderConfig.from_hf_config(config)
    except QuarkMoEError:
        return
    _assert_sane(parsed)


#: the fields a model can take without changing its tensors' shapes: values that reach the forward's maths
SHAPE_KEEPING = {
    "gpt_oss": [
        "rms_norm_eps",
        "rope_parameters.rope_theta",
        "rope_parameters.factor",
        "rope_parameters.beta_fast",
        "rope_parameters.beta_slow",
        "rope_parameters.attention_factor",
        "rope_parameters.truncate",
        "swiglu_limit",
        "sliding_window",
        "layer_types",
        "max_position_embeddings",
    ],
    "deepseek_v3": [
        "rms_norm_eps",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "scoring_func",
        "rope_interleave",
        "rope_parameters.rope_type",
        "rope_parameters.factor",
        "rope_parameters.mscale",
        "rope_parameters.mscale_all_dim",
        "rope_parameters.original_max_position_embeddings",
    ],
}
shape_keeping_values = st.one_of(
    st.sampled_from([NAN, INF, 0, -1, 1, 2, 0.5, 1e-30, 1e-45, 1e30, 3.4e38, 1000, 1e4, True, "yarn", "sigmoid"]),
    st.floats(min_value=-10, max_value=1e6),
    st.sampled_from([["full_attention", "full_attention"], ["sliding_attention", "full_attention"]]),
)


@pytest.mark.parametrize("model_type", sorted(SHAPE_KEEPING))
@settings(max_examples=5, deadline=None, derandomize=False, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_values_either_refuse_or_give_finite_logits(model_type, data, tmp_path_factory):
    config = json.loads((HF_MODELS / model_type / "config.json").read_text())
    original = copy.deepcopy(config)
    for _ in range(data.draw(st.integers(1, 2), label="fields")):
        key = data.draw(st.sampled_from(SHAPE_KEEPING[model_type]), label="key")
        value = data.draw(shape_keeping_values, label=key)
        if key.startswith("rope_parameters."):
            config.setdefault("rope_parameters", dict(original.get("rope_parameters") or {}))
            config["rope_parameters"][key.split(".", 1)[1]] = value
        else:
            config[key] = value
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as folder:
        shutil.copy(HF_MODELS / model_type / "model.safetensors", folder)
        pathlib.Path(folder, "config.json").write_text(json.dumps(config))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            model = from_pretrained(folder, backend="emulation")
        except QuarkMoEError:
            return
        ids = np.arange(12, dtype=np.int32).reshape(2, 6) % model.config.vocab_size
        if context_of(model.config).length < ids.shape[1]:
            with pytest.raises(InputError, match="more than the model's context"):
                model(ids)
            return
        logits = np.asarray(model(ids))
        assert logits.shape == (2, 6, model.config.vocab_size)
        assert np.isfinite(logits).all(), {k: config.get(k) for k in config if config.get(k) != original.get(k)}
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1 << 20  # KiB: under 1 GiB

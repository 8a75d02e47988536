"""Whole models against Hugging Face transformers' own PyTorch implementations, and generation with a KV cache.

The checkpoints and logits under ``tests/golden/data/hf_models/`` were made by transformers
(``tests/golden/generate_hf_model_golden.py``, run by hand): tiny random float32 models of every supported
architecture. Quantized variants are exported here with our exporter; transformers' ``fake_quant_logits``
ran the same model with those exports' dequantized weights.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, save_file
from quarkmoe_jax.models import DecoderConfig, from_pretrained
from quarkmoe_jax.models.layers import Linear

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "data" / "hf_models"
HF_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "golden" / "data" / "hf_configs"
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")
#: logits relative to their largest magnitude: float32 against float32, differently ordered sums
FLOAT_RTOL = 1e-5

#: the oracle: on a GPU "auto" would pick the kernels, whose bfloat16 MMAs are checked in test_models_gpu.py
BACKEND = "emulation"
_models: dict = {}


def golden(arch: str):
    return np.load(GOLDEN / arch / "golden.npz")


def float_model(arch: str):
    if arch not in _models:
        _models[arch] = from_pretrained(GOLDEN / arch, backend=BACKEND)
    return _models[arch]


def relative_error(found, expected) -> float:
    found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(found - expected).max() / np.abs(expected).max())


def rms_relative_error(found, expected) -> float:
    found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    return float(np.sqrt(np.mean((found - expected) ** 2) / np.mean(expected**2)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(arch, scheme, linears)``: our Quark export of a golden model (made once per module)."""
    made = {}

    def get(arch, scheme, linears=False):
        key = (arch, scheme, linears)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}_{scheme}")
            made[key] = export_quark_checkpoint(GOLDEN / arch, out / "q", scheme, quantize_linears=linears)
        return made[key]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_float_logits_match_transformers(arch):
    g = golden(arch)
    logits = float_model(arch)(g["input_ids"])
    assert logits.dtype == jnp.float32 and logits.shape == g["logits"].shape
    assert relative_error(logits, g["logits"]) <= FLOAT_RTOL


@pytest.mark.parametrize(
    "arch, scheme, linears",
    [(arch, "w_mxfp4", False) for arch in ARCHS]
    + [("deepseek_v3", "w_mxfp6_e3m2", False)]
    + [(arch, "w_mxfp4", True) for arch in ("deepseek_v3", "gpt_oss")],
)
def test_quantized_logits_match_transformers_on_dequantized_weights(arch, scheme, linears, exported):
    """Weight-only MX: our loaded Quark export computes what transformers computes with the export's
    dequantized weights (experts only, or every Linear of the decoder layers)."""
    g = golden(arch)
    model = from_pretrained(exported(arch, scheme, linears), backend=BACKEND)
    quantized = [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.quant is not None]
    assert bool(quantized) == linears
    variant = scheme + ("_linears" if linears else "")
    assert relative_error(model(g["input_ids"]), g[f"fake_quant_logits/{variant}"]) <= FLOAT_RTOL


def test_a_partly_quantized_checkpoint_loads_each_layer_as_exported(tmp_path):
    """MoE layer 0 left in float (Quark's ``exclude``), layer 1 in MXFP4: each loads with its own scheme."""
    path = export_quark_checkpoint(GOLDEN / "mixtral", tmp_path / "q", "w_mxfp4", exclude_layers=(0,))
    model = from_pretrained(path, backend=BACKEND)
    kinds = [layer.mlp.experts.quant_config.weight.kind for layer in model.layers]
    assert kinds == ["none", "mx"]
    assert model.layers[0].mlp.experts.params()["w13"].values.dtype == jnp.float32  # the model's dtype, not bf16
    g = golden("mixtral")
    assert rms_relative_error(model(g["input_ids"]), g["logits"]) < 0.1  # one MXFP4 layer's error


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_prefill_and_decode_equal_the_full_forward(arch):
    model = float_model(arch)
    ids = golden(arch)["input_ids"]
    full = np.asarray(model(ids))
    cache = model.init_cache(ids.shape[0], 16)
    logits, cache = model(ids[:, :5], cache=cache, start=0)
    parts = [np.asarray(logits)]
    for i in range(5, ids.shape[1]):
        logits, cache = model(ids[:, i : i + 1], cache=cache, start=i)
        parts.append(np.asarray(logits))
    assert relative_error(np.concatenate(parts, axis=1), full) <= FLOAT_RTOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_argmax_of_full_forwards(arch):
    """Compiled prefill (a 5-token prompt padded to its bucket of 8) and decode steps pick the tokens that
    uncached full forwards pick."""
    model = float_model(arch)
    prompt = golden(arch)["input_ids"][:, :5]
    out = model.generate(prompt, 4, eos_token_id=[])
    assert out.dtype == np.int32 and out.shape == (2, 9)
    np.testing.assert_array_equal(out[:, :5], prompt)
    seq = prompt
    for _ in range(4):
        seq = np.concatenate([seq, np.asarray(model(seq))[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_sampling_is_reproducible_per_key_and_top_p_narrows_to_greedy():
    model = float_model("mixtral")
    prompt = golden("mixtral")["input_ids"][:, :4]
    key = jax.random.key(3)
    first = model.generate(prompt, 6, temperature=1.0, top_p=0.95, key=key, eos_token_id=[])
    again = model.generate(prompt, 6, temperature=1.0, top_p=0.95, key=key, eos_token_id=[])
    other = model.generate(prompt, 6, temperature=1.0, top_p=0.95, key=jax.random.key(4), eos_token_id=[])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    narrow = model.generate(prompt, 6, temperature=1.0, top_p=1e-6, key=key, eos_token_id=[])
    np.testing.assert_array_equal(narrow, model.generate(prompt, 6, eos_token_id=[]))
    with pytest.raises(ValueError, match="PRNG key"):
        model.generate(prompt, 2, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, temperature=0.7, top_p=0.0, key=key)


def test_generation_stops_at_eos_and_pads_with_it():
    model = float_model("mixtral")
    prompt = golden("mixtral")["input_ids"][:, :4]
    free = model.generate(prompt, 6, eos_token_id=[])
    eos = int(free[0, 5])  # row 0's second new token
    out = model.generate(prompt, 6, eos_token_id=eos)
    stop = list(free[0, 4:]).index(eos) + 4
    np.testing.assert_array_equal(out[0, : stop + 1], free[0, : stop + 1])
    assert (out[0, stop:] == eos).all()
    if eos not in free[1, 4:]:
        np.testing.assert_array_equal(out[1], free[1])  # the other row runs to max_new_tokens


def test_per_tensor_dynamic_scales_ignore_the_padding_of_a_prompt_bucket(exported, tmp_path):
    """A 5-token prompt runs padded to 8: with every Linear and the experts quantized with one dynamic
    scale per tensor, the padded rows must not enter the scale (eager call == exact-length jitted call)."""
    path = export_quark_checkpoint(
        GOLDEN / "qwen2_moe", tmp_path / "q", "w8a8_fp8_tensor_dynamic_tensor", quantize_linears=True
    )
    model = from_pretrained(path, backend=BACKEND)
    ids = golden("qwen2_moe")["input_ids"][:, :5]
    eager = np.asarray(model(ids))
    exact = np.asarray(jax.jit(lambda ids: model(ids))(ids))
    assert relative_error(eager, exact) <= FLOAT_RTOL
    assert relative_error(eager, golden("qwen2_moe")["logits"][:, :5]) < 0.1  # FP8 noise, not garbage


def test_bfloat16_model_is_close_to_float32():
    model = from_pretrained(GOLDEN / "gpt_oss", dtype=jnp.bfloat16, backend=BACKEND)
    assert model.dtype == jnp.bfloat16 and model.embed_tokens.get_value().dtype == jnp.bfloat16
    g = golden("gpt_oss")
    logits = model(g["input_ids"])
    assert logits.dtype == jnp.float32
    # bfloat16 weights and activations: ~3 significant digits per operation, over two decoder layers
    assert rms_relative_error(logits, g["logits"]) < 2e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_4_and_5_config_spellings_give_the_same_decoder(arch):
    def parse(version):
        config = json.loads((HF_CONFIGS / f"transformers{version}" / f"{arch}.json").read_text())
        config["num_key_value_heads"] = 2  # the stored configs keep the class default, more than their 4 heads
        return DecoderConfig.from_hf_config(config)

    v4, v5 = parse(4), parse(5)
    assert v4 == v5
    assert v4.num_layers == 4 and v4.hidden_size == 64
    saved = DecoderConfig.from_hf_config(json.loads((GOLDEN / arch / "config.json").read_text()))
    assert saved.rope.kind == ("yarn" if arch in ("deepseek_v3", "gpt_oss") else "default")
    assert saved.rope.pairs == arch.startswith("deepseek")


def test_gpt_oss_and_deepseek_config_details():
    gpt = DecoderConfig.from_hf_config(json.loads((GOLDEN / "gpt_oss" / "config.json").read_text()))
    assert gpt.sliding_windows == (4, None) and gpt.sinks
    assert gpt.rope.truncate is False and gpt.rope.factor == 32.0
    v3 = DecoderConfig.from_hf_config(json.loads((GOLDEN / "deepseek_v3" / "config.json").read_text()))
    mscale = 0.1 * np.log(4.0) + 1.0
    assert v3.attention_scale == pytest.approx(24**-0.5 * mscale**2)
    assert v3.mla.q_lora_rank == 32 and v3.dense_layers == (0,)
    qwen3 = DecoderConfig.from_hf_config(json.loads((GOLDEN / "qwen3_moe" / "config.json").read_text()))
    assert qwen3.qk_norm and qwen3.tie_word_embeddings and qwen3.head_dim == 32


def _copy_with(tmp_path, arch, *, drop=(), replace=None, config_changes=None):
    out = tmp_path / arch
    shutil.copytree(GOLDEN / arch, out)
    with CheckpointReader(out) as reader:
        tensors = {name: np.asarray(reader[name]) for name in reader if name not in drop}
    tensors.update(replace or {})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if config_changes:
        config = json.loads((out / "config.json").read_text())
        config.update(config_changes)
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "arch, change, message",
    [
        ("mixtral", {"drop": ["model.layers.1.post_attention_layernorm.weight"]}, "post_attention_layernorm"),
        ("gpt_oss", {"drop": ["model.layers.0.self_attn.sinks"]}, r"self_attn\.sinks"),
        ("deepseek_v3", {"drop": ["model.layers.1.self_attn.kv_b_proj.weight"]}, "kv_b_proj"),
        ("mixtral", {"drop": ["lm_head.weight"]}, "lm_head"),
        (
            "qwen3_moe",
            {"replace": {"model.layers.0.self_attn.q_proj.weight": np.ones((64, 64), np.float32)}},
            r"q_proj\.weight: shape \(64, 64\), expected \(128, 64\)",
        ),
        ("mixtral", {"config_changes": {"rope_parameters": {"rope_type": "dynamic"}}}, "rope type 'dynamic'"),
        ("mixtral", {"config_changes": {"num_key_value_heads": 3}}, "not a multiple of num_key_value_heads"),
        ("qwen2_moe", {"config_changes": {"intermediate_size": None}}, "intermediate_size"),
        ("gpt_oss", {"config_changes": {"layer_types": ["sliding_attention"]}}, "layer_types must list 2"),
    ],
)
def test_a_checkpoint_we_cannot_run_gets_one_clear_error(tmp_path, arch, change, message):
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(_copy_with(tmp_path, arch, **change))


@pytest.mark.parametrize(
    "scheme, suffix, corrupt, message",
    [
        ("w_mxfp4", "weight_scale", lambda s: s.reshape(-1).__setitem__(3, 255), r"E8M0 code 255 \(NaN\)"),
        ("w8a8_int8_channel_dynamic_token", "weight_scale", lambda s: s.reshape(-1).__setitem__(1, -1.0), "positive"),
    ],
)
def test_a_quantized_attention_projection_gets_the_experts_value_checks(tmp_path, scheme, suffix, corrupt, message):
    """Quantized Linear layers load through their scheme's lifecycle: a NaN E8M0 scale (or a negative INT8
    scale) in an attention projection is refused naming the tensor, as in an expert."""
    path = export_quark_checkpoint(GOLDEN / "mixtral", tmp_path / "q", scheme, quantize_linears=True)
    name = f"model.layers.1.self_attn.k_proj.{suffix}"
    with CheckpointReader(path) as reader:
        tensors = {n: np.array(reader[n]) for n in reader}
    corrupt(tensors[name])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*" + message):
        from_pretrained(path, backend=BACKEND)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="semantics"):
        from_pretrained(GOLDEN / "mixtral", semantics="torch")
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained(GOLDEN / "mixtral", dtype=jnp.int8)
    model = float_model("mixtral")
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 96\)"):
        model(np.array([[1, 96]]))
    with pytest.raises(ValueError, match="integer array"):
        model(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(np.array([[1, 2]]), -1)

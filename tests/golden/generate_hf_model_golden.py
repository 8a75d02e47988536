"""Tiny random models of every supported architecture, built and run by Hugging Face transformers (run by hand;
CI only reads the files).

Environment (transformers' PyTorch models, CPU):
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors
    /tmp/hf/bin/python tests/golden/generate_hf_model_golden.py

For each architecture: a float32 config with every feature the decoder implements switched on (dense layers,
shared experts, Qwen3's q/k norms, tied embeddings, gpt-oss's sinks / biases / sliding layers / YaRN, DeepSeek's
latent attention with and without a q LoRA rank, interleaved rope, YaRN softmax scale, grouped routing with a
correction bias), random parameters (norm weights near 1, nonzero biases), saved with ``save_pretrained``.
Then, with the eager attention and expert code of transformers:
  - ``logits``: the float model's logits on ``input_ids``;
  - ``fake_quant_logits/<scheme>``: the same model with each routed and shared expert weight replaced by the
    values our exporter's checkpoint dequantizes to (``.venv`` runs the exporter; the weight-only schemes
    below), so that comparing our loaded quantized model with it tests everything but float rounding;
    ``fake_quant_logits/<scheme>_linears``: the same with every Linear of the decoder layers quantized
    (``export_quark_checkpoint(..., quantize_linears=True)``: attention, dense MLPs; routers stay float).
Output: ``data/hf_models/<model_type>/`` (the float checkpoint) + ``golden.npz``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "data" / "hf_models"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
#: (scheme, every Linear of the decoder layers quantized too, not only the experts)
VARIANTS = (("w_mxfp4", False), ("w_mxfp6_e3m2", False), ("w_mxfp4", True))
INPUT_SHAPE = (2, 9)
COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=64,
    dtype="float32",
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
#: what the two DeepSeek configs share (latent attention sizes, one dense layer, grouped routing)
_DEEPSEEK = dict(
    num_hidden_layers=2,
    num_key_value_heads=4,
    intermediate_size=64,
    moe_intermediate_size=32,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_group=2,
    topk_group=1,
)

CONFIGS = {
    "mixtral": (
        "MixtralConfig",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            norm_topk_prob=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            **_DEEPSEEK,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            **_DEEPSEEK,
            q_lora_rank=32,
            head_dim=8,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_interleave=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            swiglu_limit=7.0,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
        ),
    ),
}

#: our exporter (in the project's venv): export ``float`` to ``<scheme>`` and write the float checkpoint in which
#: every quantized weight is replaced by its dequantized float32 values, under the float checkpoint's names.
_EXPORT = r"""
import sys, pathlib, numpy as np, jax.numpy as jnp
from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointReader, save_file
from quarkmoe_jax.formats import MXTensor, mx_format
src, scheme, quant_dir, out, linears = sys.argv[1:6]
export_quark_checkpoint(src, quant_dir, scheme, quantize_linears=linears == "1")
fmt = mx_format(scheme.removeprefix("w_"))
with CheckpointReader(src) as original, CheckpointReader(quant_dir) as quant:
    tensors = {}
    for name in original:
        tensors[name] = np.asarray(original[name], np.float32)
    for name in quant:
        if name.endswith(".weight_scale"):
            stem = name[: -len(".weight_scale")]
            w = np.asarray(MXTensor.from_arrays(quant[stem + ".weight"], quant[name], fmt).dequantize(jnp.float32))
            if stem + ".weight" in tensors:
                tensors[stem + ".weight"] = w
            else:  # gpt-oss: experts.gate_up_proj [E, H, 2I] was exported as experts.gate_up_proj.weight [E, 2I, H]
                tensors[stem] = np.swapaxes(w, -1, -2).copy()
save_file(tensors, pathlib.Path(out) / "model.safetensors", metadata={"format": "pt"})
"""


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(("bias", "sinks", "e_score_correction_bias")):
                p.copy_(0.1 * noise)
            elif name.endswith(("gate.weight", "router.weight")):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for index, (model_type, (class_name, sizes)) in enumerate(CONFIGS.items()):
        config = getattr(transformers, class_name)(**COMMON, **sizes)
        config._attn_implementation = "eager"
        torch.manual_seed(index)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        _randomize(model, seed=index)
        folder = OUT / model_type
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)
        for extra in ("generation_config.json",):
            (folder / extra).unlink(missing_ok=True)
        ids = np.random.default_rng(index).integers(0, COMMON["vocab_size"], INPUT_SHAPE).astype(np.int32)
        golden = {"input_ids": ids, "logits": _logits(model, ids)}
        for scheme, linears in VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = pathlib.Path(tmp)
                fake = tmp / "fake"
                fake.mkdir()
                subprocess.run(
                    [
                        str(VENV_PYTHON),
                        "-c",
                        _EXPORT,
                        str(folder),
                        scheme,
                        str(tmp / "quant"),
                        str(fake),
                        str(int(linears)),
                    ],
                    check=True,
                )
                shutil.copyfile(folder / "config.json", fake / "config.json")
                fake_model = transformers.AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
                fake_model.config._attn_implementation = "eager"
                replaced = load_file(fake / "model.safetensors")
                original = load_file(folder / "model.safetensors")
                changed = sorted(n for n in original if not np.array_equal(original[n], replaced[n]))
                variant = scheme + ("_linears" if linears else "")
                golden[f"fake_quant_logits/{variant}"] = _logits(fake_model, ids)
                print(f"{model_type} {variant}: {len(changed)} tensors dequantized")
        np.savez(folder / "golden.npz", **golden)
        meta = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "variants": [s + ("_linears" if q else "") for s, q in VARIANTS],
        }
        (folder / "golden_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(model_type, "logits", golden["logits"].shape, "max |logit|", float(np.abs(golden["logits"]).max()))


if __name__ == "__main__":
    main()

"""Write the ``config.json`` that transformers 4.x and 5.x save for a small model of every supported MoE
architecture (run by hand; CI only reads the files).

Environments (no torch needed, config classes only), one per major version:
    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install 'transformers<5'
    python -m venv /tmp/tf5 && /tmp/tf5/bin/pip install 'transformers>=5'
    /tmp/tf4/bin/python tests/golden/generate_hf_configs.py
    /tmp/tf5/bin/python tests/golden/generate_hf_configs.py

Each config is built from the class's defaults with the sizes below (passed under their 4.x names; 5.x maps
them through its ``attribute_map``) and saved with ``save_pretrained``, so the file holds the spellings that
transformers version writes (Qwen3-MoE: ``num_experts`` in 4.x, ``num_local_experts`` in 5.x).
Output: ``data/hf_configs/transformers<major>/<model_type>.json``.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import transformers

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, vocab_size=128)
MODELS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[0]),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=32,
            q_lora_rank=48,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
        ),
    ),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16)),
}


def main() -> None:
    major = transformers.__version__.split(".")[0]
    out = pathlib.Path(__file__).parent / "data" / "hf_configs" / f"transformers{major}"
    out.mkdir(parents=True, exist_ok=True)
    for model_type, (class_name, extra) in MODELS.items():
        config = getattr(transformers, class_name)(**SIZES, **extra)
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            saved = json.loads((pathlib.Path(tmp) / "config.json").read_text())
        (out / f"{model_type}.json").write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        print(out / f"{model_type}.json", "transformers", transformers.__version__)


if __name__ == "__main__":
    main()

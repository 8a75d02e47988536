"""Whole Quark MoE language models in Flax NNX (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 / V3, gpt-oss).

``model = from_pretrained(path)``; ``model(input_ids)`` -> float32 logits ``[B, T, vocab]``;
``model.generate(input_ids, max_new_tokens)`` with a KV cache. See docs/models.md.
"""

from quarkmoe_jax.models.decoder_config import DecoderConfig, MLAConfig, RopeConfig
from quarkmoe_jax.models.loading import from_pretrained
from quarkmoe_jax.models.model import QuarkMoEForCausalLM, sample_tokens

__all__ = ["from_pretrained", "QuarkMoEForCausalLM", "DecoderConfig", "RopeConfig", "MLAConfig", "sample_tokens"]

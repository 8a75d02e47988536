"""Generate Quark-exported tiny Mixtral MoE checkpoints + Quark fake-quant reference outputs (run offline).

Environment (separate from the project's; Python 3.11, CPU torch, amd-quark 0.13, transformers >= 5):
    /work/envs/quark311/bin/python tests/golden/generate_quark_moe_golden.py

For each scheme this builds a seeded one-layer ``transformers`` Mixtral (hidden 64, intermediate 64, 4 experts,
top-2, float32), runs Quark's own MoE preprocessing (``preprocess_for_quantization``: transformers 5 stores the
experts as fused 3-D ``gate_up_proj`` / ``down_proj`` parameters; Quark replaces them with per-expert
``nn.Linear`` modules ``experts.{e}.{gate_proj,up_proj,down_proj}``), quantizes the expert linears with
``ModelQuantizer`` (attention, router ``gate`` and ``lm_head`` excluded), and records

* ``reference.npz``: ``x [12, 64]`` (float32), ``y`` = layer-0 MoE block output in Quark's fake-quant mode,
  ``router_logits [12, 4]``, ``y_float`` (the unquantized block, for scale), all float32;
* ``config.json`` + ``model.safetensors``: what ``export_safetensors`` (Quark's exporter, real_quantized) writes;
* ``versions.json``: torch / transformers / amd-quark versions and the exported tensor names.

Run with scheme names as arguments to generate only those (default: all); the MXFP8 folders were made with
``... generate_quark_moe_golden.py w_mxfp8 w_mxfp8_a_mxfp8`` (the other folders were left as they were).

Output: ``data/quark_moe_<scheme>/``. CI (no torch) only reads these files. Schemes (all dynamic activation
specs are Quark ``DynamicScaledFakeQuantize``): ``w_mxfp4_a_mxfp4``, ``w_mxfp4``, ``w8a8_fp8_tensor_static``
(calibrated on 4 x 16 random token ids), and INT8 per-channel weights with dynamic ``per_channel`` INT8
activations twice: ``ch_axis=1`` (``w8a8_int8_channel_dynamic_token``, Quark's own per-token convention, as in
its ``ptpc_fp8`` template) and ``ch_axis=0`` (``..._chaxis0``). On the 2-D ``[tokens, H]`` input that Quark's
per-expert linears see, Quark's observer keeps one scale per ``ch_axis`` slice, so ``ch_axis=1`` is per *hidden
channel* over the tokens routed to the expert and only ``ch_axis=0`` is per token.

MXFP8 (``OCP_MXFP8E4M3Spec``: fp8 e4m3 elements, E8M0 scale per 32, "even" scales): ``w_mxfp8`` (weights only)
and ``w_mxfp8_a_mxfp8`` (plus dynamic MXFP8 inputs). amd-quark 0.13 quantizes and fake-quantizes these, but its
real-quantized export stops in ``scaled_real_quantize`` (``ValueError: Unsupported QuantSchema: per_group for
quant_dtype: fp8_e4m3``: ``real_quantize_fp8_e4m3`` has no per_group branch). Only when that exact error comes
up, the export is retried with ``generate_quark_golden.mxfp8_real_quantize_shim`` (Quark's own per-group fp8
fake-quant steps stopped at the ``float8_e4m3fn`` cast); everything else (tensor names, dtypes from Quark's
``to_torch_packed_dtype``, e8m0 scale bytes from ``to_e8m0_uint8``, config.json) is Quark's exporter.
``versions.json`` then says so (``export_shim``), and ``check_mxfp8_export`` has checked that every exported
expert weight, dequantized as ``codes * 2**(scale - 127)``, is bit for bit Quark's fake-quantized weight.
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import quark
import torch
import transformers
from quark.torch import ModelQuantizer, export_safetensors
from quark.torch.quantization.config.config import (
    FP8E4M3PerTensorSpec,
    Int8PerChannelSpec,
    OCP_MXFP4Spec,
    OCP_MXFP8E4M3Spec,
    QConfig,
    QLayerConfig,
)
from quark.torch.utils.llm.model_preparation import preprocess_for_quantization
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import MixtralConfig, MixtralForCausalLM

OUT = pathlib.Path(__file__).parent / "data"
T, H, INTER, E, K, V = 12, 64, 64, 4, 2, 32
SEED = 1234
EXCLUDE = ["lm_head", "*self_attn*", "*.gate", "*.gate.*"]


def schemes() -> dict[str, QLayerConfig]:
    mx_w = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=False).to_quantization_spec()
    mx_a = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=True).to_quantization_spec()
    int8_w = Int8PerChannelSpec(ch_axis=0, symmetric=True, is_dynamic=False).to_quantization_spec()
    # Quark's own per-token convention (as its "ptpc_fp8" template): per_channel, dynamic, ch_axis=1.
    # NB: on the 2-D [tokens, H] input of an expert linear, ch_axis=1 makes Quark's fake-quant scale per *hidden
    # channel* (over the tokens routed to the expert); ch_axis=0 is per token there. Both are recorded.
    int8_a = Int8PerChannelSpec(ch_axis=1, symmetric=True, is_dynamic=True).to_quantization_spec()
    int8_a0 = Int8PerChannelSpec(ch_axis=0, symmetric=True, is_dynamic=True).to_quantization_spec()
    fp8_w = FP8E4M3PerTensorSpec(is_dynamic=False).to_quantization_spec()
    fp8_a = FP8E4M3PerTensorSpec(is_dynamic=False).to_quantization_spec()
    mx8_w = OCP_MXFP8E4M3Spec(ch_axis=-1, is_dynamic=False).to_quantization_spec()
    mx8_a = OCP_MXFP8E4M3Spec(ch_axis=-1, is_dynamic=True).to_quantization_spec()
    return {
        "w_mxfp8": QLayerConfig(weight=mx8_w),
        "w_mxfp8_a_mxfp8": QLayerConfig(weight=mx8_w, input_tensors=mx8_a),
        "w_mxfp4_a_mxfp4": QLayerConfig(weight=mx_w, input_tensors=mx_a),
        "w_mxfp4": QLayerConfig(weight=mx_w),
        "w8a8_int8_channel_dynamic_token": QLayerConfig(weight=int8_w, input_tensors=int8_a),
        "w8a8_int8_channel_dynamic_token_chaxis0": QLayerConfig(weight=int8_w, input_tensors=int8_a0),
        "w8a8_fp8_tensor_static": QLayerConfig(weight=fp8_w, input_tensors=fp8_a),
    }


def build_model() -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=E,
        num_experts_per_tok=K,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = MixtralForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():  # O(1) weights so that the quantization error is visible but the block is well scaled
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def block_of(model):
    layer = model.model.layers[0]
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


@torch.no_grad()
def run_block(block, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    logits = block.gate(x)[0]
    y = block(x[None])[0]
    return y.float().numpy(), logits.float().numpy()


def calib_loader() -> DataLoader:
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, V, (4, 16), generator=g)
    return DataLoader(ids, batch_size=1)


MXFP8_EXPORT_ERROR = "Unsupported QuantSchema: per_group for quant_dtype: fp8_e4m3"


def export_with_fallback(frozen, out_dir: str) -> str | None:
    """Quark's ``export_safetensors``; returns the name of the shim used, if Quark 0.13 needed one (see above)."""
    from quark.torch.kernel.hw_emulation import hw_emulation_interface as hw

    f = hw.DTYPE_TO_REAL_QUANTIZE_FUNCS["fp8_e4m3"]
    hw.DTYPE_TO_REAL_QUANTIZE_FUNCS["fp8_e4m3"] = getattr(f, "_quark_orig", f)  # always try Quark's own first
    try:
        export_safetensors(frozen, out_dir)
        return None
    except ValueError as e:
        if MXFP8_EXPORT_ERROR not in str(e):
            raise
    from generate_quark_golden import mxfp8_real_quantize_shim

    for p in pathlib.Path(out_dir).iterdir():  # whatever the failed attempt left
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    mxfp8_real_quantize_shim()
    export_safetensors(frozen, out_dir)
    return "generate_quark_golden.mxfp8_real_quantize_shim"


@torch.no_grad()
def fake_quant_weights(frozen) -> dict[str, torch.Tensor]:
    """Quark's fake-quantized weight of every quantized linear (taken before the export, which rebuilds modules)."""
    return {
        name: mod._weight_quantizer(mod.weight).to(torch.float32).clone()
        for name, mod in frozen.named_modules()
        if getattr(mod, "_weight_quantizer", None) is not None
    }


def check_mxfp8_export(want: dict[str, torch.Tensor], st_path: pathlib.Path) -> int:
    """Every exported float8_e4m3fn weight, times 2**(e8m0 - 127) per 32, equals Quark's fake-quant weight."""
    checked = 0
    with safe_open(st_path, "pt") as f:
        keys = set(f.keys())
        for name, w in want.items():
            if f"{name}.weight" not in keys:
                continue
            codes = f.get_tensor(f"{name}.weight")
            if codes.dtype != torch.float8_e4m3fn:
                continue
            e8m0 = f.get_tensor(f"{name}.weight_scale")
            assert e8m0.dtype == torch.uint8 and e8m0.shape == (codes.shape[0], codes.shape[1] // 32), e8m0.shape
            scale = torch.exp2(e8m0.to(torch.float32) - 127).repeat_interleave(32, dim=-1)
            deq = codes.to(torch.float32) * scale
            assert torch.equal(deq.view(torch.int32), w.view(torch.int32)), f"{name}: export != Quark fake-quant"
            checked += 1
    assert checked, "no float8_e4m3fn weights found in the export"
    return checked


def generate(name: str, layer_cfg: QLayerConfig, x: torch.Tensor) -> dict:
    model = build_model()
    y_float, _ = run_block(block_of(model), x)
    preprocess_for_quantization(model)
    qcfg = QConfig(global_quant_config=layer_cfg, exclude=list(EXCLUDE))
    quantizer = ModelQuantizer(qcfg)
    model = quantizer.quantize_model(model, calib_loader())
    block = block_of(model)
    y, logits = run_block(block, x)  # fake-quant forward (the mode quantize_model leaves the model in)
    frozen = quantizer.freeze(model)
    y_frozen, _ = run_block(block_of(frozen), x)

    dest = OUT / f"quark_moe_{name}"
    want = fake_quant_weights(frozen) if "mxfp8" in name else {}
    with tempfile.TemporaryDirectory() as tmp:
        shim = export_with_fallback(frozen, tmp)
        files = sorted(p.name for p in pathlib.Path(tmp).iterdir())
        st = [f for f in files if f.endswith(".safetensors")]
        assert st == ["model.safetensors"], f"unexpected export files {files}"
        n_checked = check_mxfp8_export(want, pathlib.Path(tmp) / "model.safetensors") if want else 0
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.copy(pathlib.Path(tmp) / "config.json", dest / "config.json")
        shutil.copy(pathlib.Path(tmp) / "model.safetensors", dest / "model.safetensors")
    tensors = {}
    with safe_open(dest / "model.safetensors", "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            tensors[k] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
    np.savez(
        dest / "reference.npz",
        x=x.numpy().astype(np.float32),
        y=y.astype(np.float32),
        router_logits=logits.astype(np.float32),
        y_float=y_float.astype(np.float32),
        y_frozen=y_frozen.astype(np.float32),
    )
    rel = float(np.sqrt(np.mean((y - y_float) ** 2) / np.mean(y_float**2)))
    rel_frozen = float(np.sqrt(np.mean((y - y_frozen) ** 2) / np.mean(y**2)))
    meta = {
        "scheme": name,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "amd-quark": getattr(quark, "__version__", "unknown"),
        },
        "dtype": "float32",
        "seed": SEED,
        "exported_files": files,
        "tensors": tensors,
        "rel_rms_quant_vs_float": rel,
        "rel_rms_fakequant_vs_frozen": rel_frozen,
    }
    if shim:
        meta["export_shim"] = (
            f"amd-quark's export raised ValueError('{MXFP8_EXPORT_ERROR}'); exported with {shim} (Quark's "
            "fake_quantize_fp8_per_group_with_scale stopped at the float8_e4m3fn cast); "
            f"{n_checked} exported weights checked to dequantize bit for bit to Quark's fake-quant weights"
        )
    (dest / "versions.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"{name}: rel rms vs float {rel:.4g}, fake-quant vs frozen {rel_frozen:.3g}, files {files}")
    return meta


def main(argv: list[str]) -> None:
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(T, H, generator=g, dtype=torch.float32)
    todo = schemes()
    names = argv or list(todo)
    unknown = sorted(set(names) - set(todo))
    if unknown:
        raise SystemExit(f"unknown scheme(s) {unknown}; choose from {list(todo)}")
    for name in names:
        generate(name, copy.deepcopy(todo[name]), x)


if __name__ == "__main__":
    main(sys.argv[1:])

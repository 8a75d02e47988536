"""Write Quark-format checkpoints from float weights: the inverse of the loader.

``export_quark_checkpoint(source, out_dir, scheme)`` quantizes every MoE layer's routed experts (and shared
experts) with the project's codecs, using Quark's weight numerics (MX: ``quantize`` bit-exact to Quark's
exporter; INT8: symmetric ``amax / 127.5`` per channel or per tensor, round half to even; FP8:
``amax / 448``), writes Quark's tensor names, dtypes and layouts (``.weight`` codes, ``.weight_scale``,
``.input_scale`` for static activations, INT8 zero points), copies every other tensor unchanged, and writes a
``config.json`` whose ``quantization_config`` is what Quark writes (``quant_method: quark``, ``export``
block, ``global_quant_config``, ``exclude`` listing the non-expert linear layers).

Scheme names are those the loader reports (:data:`EXPORT_SCHEMES`): ``w_mxfp4``, ``w_mxfp4_a_mxfp4``,
``w_mxfp6_e2m3_a_fp8``, ``w_mxfp4_a_fp8_dynamic_token``, ``w8a8_int8_channel_dynamic_token``,
``w8a8_fp8_tensor_static``, …
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import quarkmoe_jax as qm
from quarkmoe_jax.checkpoint.architectures import (
    MoEArchitecture,
    ProjectionTensor,
    TensorNames,
    layer_of,
    split_tensor_name,
    tensor_name,
)
from quarkmoe_jax.checkpoint.loader import check_checkpoint_headers, read_hf_config
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, new_checkpoint_folder, save_file
from quarkmoe_jax.errors import QuarkMoEError
from quarkmoe_jax.formats import MX_BLOCK_SIZE, quantizers, round_up
from quarkmoe_jax.quark_config import LayerQuantConfig
from quarkmoe_jax.schemes import get_moe_scheme
from quarkmoe_jax.schemes.names import (
    FP8_ACTIVATIONS,
    W8A8_ACTIVATIONS,
    W8A8_KINDS,
    W8A8_WEIGHT_GRANULARITIES,
    SchemeName,
)

__all__ = [
    "EXPORT_SCHEMES",
    "calibrate_input_amax",
    "export_quark_checkpoint",
    "scheme_has_static_input_scales",
    "scheme_layer_config",
]

_MX = {name: fmt.quark_dtype for name, fmt in qm.MX_FORMATS.items()}  # our MX format name -> Quark's dtype
_MX_BELOW_8 = tuple(name for name, fmt in qm.MX_FORMATS.items() if fmt.bits < 8)  # with every activation
_MX_ACTIVATIONS = [None, *_MX_BELOW_8, *FP8_ACTIVATIONS]
EXPORT_SCHEMES: tuple[str, ...] = tuple(
    str(name)  # the grammar: schemes/names.py
    for name in [SchemeName(w, a) for w in _MX_BELOW_8 for a in _MX_ACTIVATIONS]
    # MXFP8 as vLLM's QuarkW8A8Mxfp8MoEMethod runs it (dynamic MXFP8 activations), and weight-only
    + [SchemeName("mxfp8_e4m3"), SchemeName("mxfp8_e4m3", "mxfp8_e4m3")]
    + [
        SchemeName(kind, activation, granularity)
        for kind in W8A8_KINDS
        for granularity in W8A8_WEIGHT_GRANULARITIES
        for activation in W8A8_ACTIVATIONS
    ]
)


def _mx_spec(quark_dtype: str, dynamic: bool, scale_mode: str) -> dict[str, Any]:
    return {
        "dtype": quark_dtype,
        "is_dynamic": dynamic,
        "qscheme": "per_group",
        "ch_axis": -1,
        "group_size": MX_BLOCK_SIZE,
        "symmetric": None,
        "round_method": "half_even",
        "scale_type": "float",
        "scale_format": "e8m0",
        "scale_calculation_mode": scale_mode,
        "mx_element_dtype": None,
        "observer_cls": "PerBlockMXObserver",
    }


def _linear_spec(dtype: str, qscheme: str, dynamic: bool, ch_axis: int | None) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "is_dynamic": dynamic,
        "qscheme": qscheme,
        "ch_axis": ch_axis,
        "group_size": None,
        "symmetric": True,
        "round_method": "half_even",
        "scale_type": "float",
        "scale_format": None,
        "scale_calculation_mode": None,
        "mx_element_dtype": None,
        "observer_cls": "PerChannelMinMaxObserver" if qscheme == "per_channel" else "PerTensorMinMaxObserver",
    }


def scheme_layer_config(scheme: str, scale_mode: str = "even") -> LayerQuantConfig:
    """The Quark layer config (weight / input_tensors specs) of a named scheme."""
    if scheme not in EXPORT_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {list(EXPORT_SCHEMES)}")
    name = SchemeName.parse(scheme)
    if name.w8a8:
        kind, wg, ag = name.weight, name.weight_granularity, name.activation
        dtype = "int8" if kind == "int8" else "fp8_e4m3"
        weight = _linear_spec(
            dtype, "per_channel" if wg == "channel" else "per_tensor", False, 0 if wg == "channel" else None
        )
        if ag == "static":
            act = _linear_spec(dtype, "per_tensor", False, None)
        else:  # per token: ch_axis 0 of the 2-D expert input, which Quark's own fake-quant also reads per token
            token = ag == "dynamic_token"
            act = _linear_spec(dtype, "per_channel" if token else "per_tensor", True, 0 if token else None)
    else:
        weight = _mx_spec(_MX[name.weight], False, scale_mode)
        a = name.activation
        if a is None:
            act = None
        elif a in _MX:
            act = _mx_spec(_MX[a], True, scale_mode)
        elif a == "fp8":
            act = _linear_spec("fp8_e4m3", "per_tensor", False, None)
        else:
            token = a.endswith("token")
            act = _linear_spec("fp8_e4m3", "per_channel" if token else "per_tensor", True, 0 if token else None)
    return LayerQuantConfig.from_dict(
        {"weight": weight, "input_tensors": act, "output_tensors": None, "bias": None}, f"scheme {scheme}"
    )


def scheme_has_static_input_scales(scheme: str) -> bool:
    """Whether a named scheme quantizes its activations with static scales, which need calibration
    (``input_amax`` or ``calibration_states`` of :func:`export_quark_checkpoint`)."""
    return get_moe_scheme(scheme_layer_config(scheme), "quark").quant_config().activation.static_scaled


def _quantize_weight(w: np.ndarray, scheme, scale_mode: str) -> dict[str, np.ndarray]:
    """Quantize one float weight ``[..., N, K]`` (K = contraction) into Quark's stored tensors."""
    cfg = scheme.quant_config()
    w32 = jnp.asarray(np.asarray(w, np.float32))
    if cfg.weight.kind == "mx":
        fmt = qm.MX_FORMATS[cfg.weight.mx_format]
        k = w32.shape[-1]
        padded = round_up(k)
        if padded != k:  # Quark pads the last block with zeros and stores the unpadded length
            w32 = jnp.pad(w32, [(0, 0)] * (w32.ndim - 1) + [(0, padded - k)])
        t = qm.quantize(w32, fmt, scale_mode)
        packed = np.asarray(t.packed)[..., : fmt.packed_length(k)]
        return {
            "weight": packed.view(fmt.stored_dtype),  # MXFP8: float8_e4m3fn, as Quark stores it
            "weight_scale": np.asarray(t.scales)[..., : -(-k // MX_BLOCK_SIZE)],
        }
    granularity = "token" if cfg.weight.granularity == "channel" else "tensor"
    if w32.ndim == 3 and granularity == "tensor":  # one scale per expert of an all-expert tensor
        parts = [_quantize_weight(np.asarray(w32[e]), scheme, scale_mode) for e in range(w32.shape[0])]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    if cfg.weight.kind == "int8":
        q, s = quantizers.int8_quantize(w32, granularity=granularity, semantics="quark")
        out = {"weight": np.asarray(q), "weight_scale": np.asarray(s, np.float32)}
        out["weight_zero_point"] = np.zeros(out["weight_scale"].shape[:-1] if granularity == "token" else (), np.int8)
    else:
        q, s = quantizers.fp8_quantize(w32, granularity=granularity, semantics="quark")
        out = {"weight": np.asarray(q), "weight_scale": np.asarray(s, np.float32)}
    if granularity == "token":
        out["weight_scale"] = out["weight_scale"][..., 0]
    return out


def _input_scale(cfg, amax, what: str = "input_amax") -> np.ndarray:
    amax = np.asarray(amax, np.float32)
    if not (np.isfinite(amax).all() and (amax > 0).all()):
        bad = amax.reshape(-1)[~(np.isfinite(amax.reshape(-1)) & (amax.reshape(-1) > 0))][0]
        raise QuarkMoEError(
            f"{what}: calibration amax must be finite and positive (a static scale of it), found {float(bad)}"
        )
    if cfg.activation.kind == "fp8":
        return amax / np.float32(quantizers.FP8_E4M3_MAX)
    return amax / np.float32(127.5)


def export_quark_checkpoint(
    source: str | pathlib.Path | tuple[dict[str, Any], Mapping[str, np.ndarray]],
    out_dir: str | pathlib.Path,
    scheme: str,
    *,
    scale_mode: str = "even",
    input_amax: float | Mapping[int, Mapping[str, np.ndarray]] | None = None,
    calibration_states=None,
    exclude_layers: tuple[int, ...] = (),
    quantize_linears: bool = False,
    overwrite: bool = False,
) -> pathlib.Path:
    """Quantize a float MoE checkpoint into Quark's format.

    Args:
      source: a float Hugging Face checkpoint folder, or ``(config_dict, {name: array})``.
      out_dir: a new or empty folder (created if needed); receives ``config.json``, ``model.safetensors``
        and the source folder's other top-level files (tokenizer, generation config, ...). Written to a
        temporary folder first and renamed when complete, so a failure leaves nothing behind.
      scheme: one of :data:`EXPORT_SCHEMES`.
      scale_mode: MX scale rule ("even", "floor", "ceil"), written as ``scale_calculation_mode``.
      input_amax: calibration for static activation scales: one float for everything, or
        ``{layer: {"w13": [E] amax of the expert inputs, "w2": [E] amax of the intermediates}}``.
        Static schemes need it or ``calibration_states``.
      calibration_states: instead of ``input_amax``, hidden states ``[T, hidden]`` (float) to measure it on:
        :func:`calibrate_input_amax` routes them through each float MoE layer of ``source`` (a folder) and
        takes every expert's largest input and intermediate; after the output folder's checks, before writing.
        Only for static schemes (a dynamic one has nothing to calibrate).
      exclude_layers: MoE layers left unquantized (listed in ``exclude``, as Quark does).
      quantize_linears: also quantize every other Linear layer of the decoder layers with the same scheme
        (attention projections, dense MLPs; routers stay float), as Quark's whole-model recipes do; the
        embeddings and ``lm_head`` stay float. Static schemes then need ``input_amax`` as one float.
      overwrite: replace an existing non-empty ``out_dir`` (or the source folder itself) once the new
        checkpoint is complete; without it such an ``out_dir`` is refused
        (:func:`~quarkmoe_jax.checkpoint.safetensors_io.new_checkpoint_folder`).

    Returns:
      ``out_dir`` as a Path.
    """
    out_dir = pathlib.Path(out_dir)
    source_dir = pathlib.Path(source) if isinstance(source, (str, os.PathLike)) else None
    if calibration_states is not None:
        if input_amax is not None:
            raise ValueError("pass input_amax or calibration_states (to measure it on), not both")
        if source_dir is None:
            raise ValueError("calibration_states needs a checkpoint folder as the source (the float layers run on it)")
        if not scheme_has_static_input_scales(scheme):
            raise ValueError(f"scheme {scheme} has no static input scales: calibration_states has nothing to calibrate")
    if source_dir is not None and (source_dir / "config.json").is_file():
        # the float input's tensors against its config.json, from the headers, before anything is written
        # (what ``quarkmoe inspect`` checks; a wrong shape would otherwise only be refused by the loader)
        check_checkpoint_headers(source_dir)
    with new_checkpoint_folder(out_dir, overwrite=overwrite, inputs=(source_dir,) if source_dir else ()) as tmp:
        if calibration_states is not None:
            input_amax = calibrate_input_amax(source_dir, calibration_states)
        _export(source, tmp, scheme, scale_mode, input_amax, exclude_layers, quantize_linears)
        if source_dir is not None and source_dir.is_dir():
            _copy_other_files(source_dir, tmp)
    return out_dir


_CHECKPOINT_FILES = ("config.json", "model.safetensors.index.json")


def _copy_other_files(source_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """The source folder's other regular top-level files (tokenizer, generation config, README, ...)."""
    for path in sorted(source_dir.iterdir()):
        if path.name in _CHECKPOINT_FILES or path.suffix == ".safetensors" or path.name.startswith("."):
            continue
        if path.is_file() and not path.is_symlink() and not (out_dir / path.name).exists():
            shutil.copyfile(path, out_dir / path.name)


def _export(source, out_dir: pathlib.Path, scheme, scale_mode, input_amax, exclude_layers, quantize_linears) -> None:
    hf_config, tensors, reader = _open_source(source)
    try:
        arch = MoEArchitecture.from_hf_config(hf_config)
        layer_config = scheme_layer_config(scheme, scale_mode)
        moe_scheme = get_moe_scheme(layer_config, "quark")
        if moe_scheme.name != scheme:
            raise AssertionError(f"scheme preset {scheme} dispatches to {moe_scheme.name}")  # internal invariant
        cfg = moe_scheme.quant_config()
        static = cfg.activation.static_scaled
        if static and input_amax is None:
            raise ValueError(
                f"scheme {scheme} has static input scales: pass input_amax (calibration) or calibration_states"
            )
        if static and quantize_linears and not isinstance(input_amax, (int, float)):
            raise ValueError("quantize_linears with a static scheme needs input_amax as one float for every layer")
        if static and isinstance(input_amax, (int, float)):
            _input_scale(cfg, input_amax)  # refused before any work: NaN, infinite, zero or negative
        out: dict[str, np.ndarray] = {}
        exclude: list[str] = []
        for name, tensor in _checkpoint_layout(tensors, arch.names):
            linear, suffix = split_tensor_name(name)
            # a routed or shared expert's weight (None for any other tensor)
            expert_weight = arch.names.parse(name) if suffix == "weight" else None
            layer = layer_of(name)
            if expert_weight and layer in arch.moe_layers and layer not in exclude_layers:
                scale = _static_scale(cfg, input_amax, expert_weight) if static else None
                write_quantized(out, linear, tensor, moe_scheme, scale_mode, scale)
                continue
            is_linear = layer is not None and suffix == "weight" and np.ndim(tensor) == 2
            # the routers stay float (vLLM keeps them float)
            if quantize_linears and is_linear and not arch.names.is_router(name) and layer not in exclude_layers:
                scale = _input_scale(cfg, input_amax).astype(np.float32) if static else None
                write_quantized(out, linear, tensor, moe_scheme, scale_mode, scale)
                continue
            out[name] = np.asarray(tensor)
            if suffix == "weight" and np.ndim(tensor) == 2:
                exclude.append(linear)
            elif expert_weight:  # an excluded MoE layer's experts: exclude each expert projection, as Quark lists them
                exclude.append(linear)
        quant = quark_quantization_config(layer_config, exclude)
        save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps({**hf_config, "quantization_config": quant}, indent=2) + "\n")
    finally:
        if reader is not None:
            reader.close()


def quark_quantization_config(layer_config, exclude) -> dict:
    """``config.json``'s ``quantization_config`` as Quark 0.13 exports it: one global scheme (``layer_config``,
    a ``LayerQuantConfig``) and the float linears' names (``exclude``)."""
    return {
        "quant_method": "quark",
        "export": {
            "kv_cache_group": [],
            "min_kv_scale": 0.0,
            "pack_method": "reorder",
            "weight_format": "real_quantized",
            "weight_merge_groups": None,
        },
        "global_quant_config": layer_config.to_dict(),
        "layer_quant_config": {},
        "layer_type_quant_config": {},
        "exclude": sorted(exclude),
        "algo_config": None,
        "quant_mode": "eager_mode",
        "version": "0.13",
    }


def write_quantized(out: dict, linear: str, tensor, scheme, scale_mode: str, input_scale) -> None:
    """The Linear's ``weight`` codes, ``weight_scale`` (+ ``weight_zero_point``) and, for static schemes,
    ``input_scale`` (+ ``input_zero_point`` for INT8)."""
    for suffix, value in _quantize_weight(tensor, scheme, scale_mode).items():
        out[tensor_name(linear, suffix)] = value
    if input_scale is not None:
        out[tensor_name(linear, "input_scale")] = input_scale
        if scheme.quant_config().activation.kind == "int8":
            out[tensor_name(linear, "input_zero_point")] = np.zeros_like(input_scale, np.int8)


def _checkpoint_layout(tensors, names: TensorNames):
    """``(name, array)`` of every tensor, transformers' own gpt-oss expert tensors (``experts.gate_up_proj
    [E, H, 2I]``, ``experts.down_proj [E, I, H]``, input-major, and their ``_bias``) renamed and transposed to
    the ``<projection>.weight [E, out, in]`` / ``<projection>.bias`` layout that Quark exports and the loader
    reads."""
    for name in tensors:
        parsed = names.parse(name)
        if parsed is None or not parsed.native:
            yield name, tensors[name]
        elif parsed.suffix == "bias":
            yield parsed.quark_name, np.asarray(tensors[name])
        else:
            tensor = np.asarray(tensors[name])
            if tensor.ndim != 3:
                raise CheckpointError(f"{name}: expected [experts, in, out], found shape {tensor.shape}")
            yield parsed.quark_name, np.ascontiguousarray(np.swapaxes(tensor, 1, 2))


def _static_scale(cfg, input_amax, expert_weight: ProjectionTensor) -> np.ndarray:
    """The static ``input_scale`` of one expert weight: ``[E]`` for an all-expert tensor, else 0-d."""
    layer, which = expert_weight.layer, "w2" if expert_weight.shard == "w2" else "w13"
    if isinstance(input_amax, (int, float)):
        amax = np.float32(input_amax)
    else:
        try:
            per_expert = np.asarray(input_amax[layer][which], np.float32)
        except (KeyError, TypeError) as e:
            raise ValueError(f"input_amax has no entry [{layer}][{which!r}] for {expert_weight.name}") from e
        if expert_weight.expert is not None:
            amax = per_expert[expert_weight.expert]
        elif not expert_weight.shared:  # all-expert tensor: one scale per expert
            amax = per_expert
        else:
            amax = per_expert.max()
    return _input_scale(cfg, amax, f"input_amax[{layer}][{which!r}] ({expert_weight.name})").astype(np.float32)


def _open_source(source):
    if isinstance(source, tuple):
        hf_config, tensors = source
        return dict(hf_config), tensors, None
    path = pathlib.Path(source)
    config_path = path / "config.json"
    hf_config = read_hf_config(path)  # the shards' path rules, size-capped
    if "quantization_config" in hf_config:
        raise CheckpointError(f"{config_path}: already has a quantization_config; export needs float weights")
    reader = CheckpointReader(path)
    return hf_config, reader, reader


CALIBRATION_CHUNK_ELEMENTS = 1 << 25
"""Tokens are calibrated in chunks whose every-expert intermediate ``[T, E, 2I]`` holds at most this many
float32 values (128 MiB), so memory does not grow with the number of calibration tokens."""


def calibrate_input_amax(float_checkpoint, x, layers=None) -> dict[int, dict[str, np.ndarray]]:
    """Per-expert ``amax`` of each MoE layer's GEMM inputs on calibration hidden states ``x [T, H]`` (float,
    finite; the same states for every layer).

    Routes ``x`` with the float layer's router; for expert e, ``"w13"`` is the max |x| over the tokens routed
    to it and ``"w2"`` the max |activation| of its intermediate. Experts that receive no token get the
    layer's maximum. The result is the ``input_amax`` argument of :func:`export_quark_checkpoint`: float32
    ``{layer: {"w13": [E], "w2": [E]}}``.
    """
    from quarkmoe_jax.activations import apply_activation
    from quarkmoe_jax.checkpoint.loader import load_moe_block
    from quarkmoe_jax.moe import routing
    from quarkmoe_jax.moe.emulation import dense_gemm

    arch = MoEArchitecture.from_hf_config(read_hf_config(float_checkpoint))
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != arch.hidden_size:
        raise QuarkMoEError(
            f"calibration hidden states: expected a float array [tokens, {arch.hidden_size}] (the model's hidden "
            f"size), found {x.dtype}{list(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise QuarkMoEError(
            f"calibration hidden states: expected finite values, found {int((~np.isfinite(x)).sum())} NaN or infinite"
        )
    x = jnp.asarray(x, jnp.float32)
    result = {}
    for layer in arch.moe_layers if layers is None else layers:
        block = load_moe_block(float_checkpoint, layer)
        experts = block.experts
        if experts.scheme.quant_config().weight.kind != "none":
            raise ValueError(f"calibrate_input_amax needs a float checkpoint; layer {layer} is {experts.scheme.name}")
        routing_config = routing.RoutingConfig.from_architecture(arch)
        w13, bias = experts.params["w13"], experts.params.get("w13_bias")
        chunk = max(1, CALIBRATION_CHUNK_ELEMENTS // (arch.num_experts * w13.shape[1]))
        x_amax = a2_amax = jnp.zeros(arch.num_experts, jnp.float32)
        x_all = a2_all = jnp.float32(0)
        for begin in range(0, x.shape[0], chunk):
            xc = x[begin : begin + chunk]
            logits = routing.router_logits(xc, block.router_weight, block.router_bias)
            _, ids = routing.route(logits, routing_config, block.correction_bias)
            # every expert's GEMM1 on every token, as the oracle computes one (moe.emulation.dense_gemm)
            h = jnp.swapaxes(jax.vmap(dense_gemm, in_axes=(None, 0))(xc, w13), 0, 1)  # [t, E, 2I]
            h = h + (0 if bias is None else bias[None])
            a2 = apply_activation(h, arch.activation, limit=arch.swiglu_limit)  # [t, E, I]
            routed = (ids[:, :, None] == jnp.arange(arch.num_experts)).any(1)  # [t, E]
            x_amax = jnp.maximum(x_amax, jnp.where(routed, jnp.abs(xc).max(-1, keepdims=True), 0).max(0))
            a2_amax = jnp.maximum(a2_amax, jnp.where(routed, jnp.abs(a2).max(-1), 0).max(0))
            x_all, a2_all = jnp.maximum(x_all, jnp.abs(xc).max()), jnp.maximum(a2_all, jnp.abs(a2).max())
        x_amax = jnp.where(x_amax > 0, x_amax, x_all)
        a2_amax = jnp.where(a2_amax > 0, a2_amax, a2_all)
        result[layer] = {"w13": np.asarray(x_amax), "w2": np.asarray(a2_amax)}
    return result

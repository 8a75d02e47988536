"""Malformed checkpoints: every one gets a clear error naming the tensor or key, the expected and the found.

Each test copies a checkpoint exported by the project's own exporter (synthetic Mixtral: MoE layers 0 and 1,
hidden 64, intermediate 64, 4 experts) while breaking one thing, then loads it with
``QuarkMoEBlock.from_checkpoint``. A failed load returns nothing: the exception propagates and no module
exists, and the checkpoint files are closed again.
"""

import json
import os
import pathlib
import re
import struct

import ml_dtypes
import numpy as np
import pytest

from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, save_file
from quarkmoe_jax.nn import QuarkMoEBlock
from quarkmoe_jax.quark_config import QuarkConfigError
from quarkmoe_jax.schemes import SchemeError

BLOCK = "model.layers.1.block_sparse_moe"
PREFIX = f"{BLOCK}.experts"
ROUTER = f"{BLOCK}.gate.weight"
STATIC_SCHEMES = ("w_mxfp4_a_fp8", "w8a8_int8_tensor_static", "w8a8_fp8_tensor_static")


def expert(e, shard, suffix):
    return f"{PREFIX}.{e}.{shard}.{suffix}"


def q(name):
    """``name`` as a regex matching itself literally."""
    return re.escape(name)


# ------------------------------------------------------------------------------------------------ helpers


def edited_copy(src, dst, *, drop=(), tensors=None, config=None):
    """Copy the checkpoint folder ``src`` to ``dst`` with edits; returns ``dst``.

    Args:
      drop: tensor names to leave out (each must exist, so that a typo in a test fails loudly).
      tensors: ``{name: array}`` to replace or add; a callable value gets the original tensor and returns the
        new one.
      config: a callable that edits the parsed config.json dict in place (its return value is ignored).
    """
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True)
    with CheckpointReader(src) as reader:
        absent = [name for name in drop if name not in reader]
        assert not absent, f"test bug: cannot drop {absent}, not in {src}"
        out = {name: reader[name] for name in reader if name not in set(drop)}
        for name, value in (tensors or {}).items():
            out[name] = value(reader[name]) if callable(value) else np.asarray(value)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((src / "config.json").read_text())
    if config is not None:
        config(hf_config)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return dst


def read_header(path):
    """``(header length, header dict)`` of a safetensors file."""
    data = pathlib.Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def rewrite_header(path, edit):
    """Apply ``edit`` to the JSON header of the safetensors file ``path`` in place, keeping the data bytes."""
    data = pathlib.Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def quant(hf_config):
    return hf_config["quantization_config"]


def global_config(hf_config):
    return hf_config["quantization_config"]["global_quant_config"]


def open_files_under(folder):
    """Paths under ``folder`` that this process holds open (Linux); empty elsewhere."""
    fd_dir = pathlib.Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return []
    held = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


@pytest.fixture
def exported(make_checkpoint):
    """``exported(scheme)`` -> the exported synthetic Mixtral Quark folder (shared across the module)."""

    def get(scheme="w_mxfp4"):
        kwargs = {"input_amax": 2.0} if scheme in STATIC_SCHEMES else {}
        return make_checkpoint("mixtral", scheme, **kwargs)[1]

    return get


@pytest.fixture
def bad(exported, tmp_path):
    """``bad(scheme, drop=..., tensors=..., config=...)`` -> a broken copy of ``exported(scheme)``."""
    made = []

    def make(scheme="w_mxfp4", **edits):
        made.append(None)
        return edited_copy(exported(scheme), tmp_path / f"bad{len(made)}", **edits)

    return make


def refuse(path, error, match, layer=1, **kwargs):
    """Loading ``path`` raises ``error`` matching ``match``; nothing is returned and no file stays open."""
    block = None
    with pytest.raises(error, match=match) as info:
        block = QuarkMoEBlock.from_checkpoint(path, layer, **kwargs)
    assert block is None
    assert not open_files_under(path), "a failed load left checkpoint files open"
    return info.value


def test_the_unedited_copy_loads(bad):
    """The helper itself: a copy without edits loads like the original."""
    block = QuarkMoEBlock.from_checkpoint(bad("w_mxfp4"), 1)
    assert block.experts.quant_config.scheme == "w_mxfp4" and block.experts.shape.num_experts == 4


# ------------------------------------------------------------------------------- missing / extra tensors


def test_missing_expert_tensor(bad):
    name = expert(2, "w3", "weight_scale")
    refuse(bad(drop=[name]), CheckpointError, rf"1 expert tensors missing.*{q(name)}")


def test_missing_whole_expert(bad):
    names = [expert(3, shard, suffix) for shard in ("w1", "w3", "w2") for suffix in ("weight", "weight_scale")]
    refuse(bad(drop=names), CheckpointError, rf"6 expert tensors missing.*{q(names[0])}")


def test_missing_static_input_scale(bad):
    name = expert(0, "w2", "input_scale")
    refuse(bad("w_mxfp4_a_fp8", drop=[name]), CheckpointError, rf"missing.*scheme w_mxfp4_a_fp8.*{q(name)}")


def test_extra_expert_out_of_range(bad):
    name = expert(7, "w1", "weight")
    path = bad(tensors={name: np.zeros((64, 32), np.uint8)})
    refuse(path, CheckpointError, rf"{q(name)}: expert index 7 out of range for 4 experts")


@pytest.mark.parametrize(
    "name",
    [
        f"{PREFIX}.0.w4.weight",  # unknown projection
        f"{PREFIX}.0.w1.qweight",  # unknown suffix
        f"{PREFIX}.0.w1.weight.extra",
        f"{PREFIX}.w1_scale",
    ],
)
def test_extra_tensor_with_unknown_name(bad, name):
    path = bad(tensors={name: np.zeros((64, 32), np.uint8)})
    refuse(path, CheckpointError, rf"unexpected tensor {q(repr(name))} under {q(repr(PREFIX))}; expected")


def test_extra_tensor_the_scheme_does_not_use(bad):
    name = expert(1, "w2", "input_scale")  # a dynamic scheme has no static input scales
    path = bad(tensors={name: np.float32(0.01)})
    refuse(path, CheckpointError, rf"unexpected tensors under {q(repr(PREFIX))} for scheme w_mxfp4: .*{q(name)}")


def test_extra_zero_point_in_an_mx_checkpoint(bad):
    name = expert(0, "w1", "weight_zero_point")
    path = bad(tensors={name: np.zeros(64, np.int8)})
    refuse(path, CheckpointError, rf"{q(name)}: a w_mxfp4 checkpoint has no 'weight_zero_point' tensors")


def test_extra_bias_in_a_checkpoint_without_biases(bad):
    """One stray bias must be reported as that tensor, not as dozens of "missing" biases of other experts."""
    name = expert(0, "w1", "bias")
    path = bad(tensors={name: np.zeros(64, np.float32)})
    refuse(path, CheckpointError, q(name))


def test_duplicate_projection_names(bad):
    name = f"{PREFIX}.0.gate_proj.weight"  # the same tensor as experts.0.w1.weight under another name
    path = bad(tensors={name: np.zeros((64, 32), np.uint8)})
    first, second = q(repr(expert(0, "w1", "weight"))), q(repr(name))
    refuse(path, CheckpointError, rf"duplicate tensors ({first} and {second}|{second} and {first})")


# ----------------------------------------------------------------------------------------- wrong dtypes


@pytest.mark.parametrize(
    "scheme, name, value, match",
    [
        (
            "w_mxfp4",
            expert(0, "w1", "weight"),
            np.zeros((64, 32), np.float32),
            r"packed mxfp4 weights must be uint8 codes, found dtype float32",
        ),
        (
            "w_mxfp4",
            expert(3, "w2", "weight"),
            np.zeros((64, 32), ml_dtypes.bfloat16),
            r"packed mxfp4 weights must be uint8 codes, found dtype bfloat16",
        ),
        (
            "w_mxfp4",
            expert(1, "w3", "weight_scale"),
            np.ones((64, 2), np.float32),
            r"E8M0 weight scales must be uint8, found dtype float32",
        ),
        (
            "w8a8_int8_channel_dynamic_token",
            expert(2, "w1", "weight"),
            np.zeros((64, 64), np.uint8),
            r"int8 weights must be int8, found dtype uint8",
        ),
        (
            "w8a8_fp8_tensor_static",
            expert(0, "w2", "weight"),
            np.zeros((64, 64), np.float32),
            r"fp8 weights must be float8_e4m3fn, found dtype float32",
        ),
        (
            "w8a8_int8_tensor_static",
            expert(1, "w1", "input_scale"),
            np.int32(1),
            r"expected a float tensor, found dtype int32",
        ),
        (
            # integer weight scales are malformed (Quark writes float32); they must not be silently cast
            "w8a8_int8_channel_dynamic_token",
            expert(0, "w3", "weight_scale"),
            np.ones(64, np.int32),
            r"expected a float tensor, found dtype int32",
        ),
        ("w_mxfp4", ROUTER, np.zeros((4, 64), np.int8), r"expected a float tensor, found dtype int8"),
    ],
    ids=[
        "mx-codes-f32",
        "mx-codes-bf16",
        "e8m0-f32",
        "int8-as-uint8",
        "fp8-as-f32",
        "input-scale-int",
        "int8-scale-int",
        "router-int8",
    ],
)
def test_wrong_dtype(bad, scheme, name, value, match):
    refuse(bad(scheme, tensors={name: value}), CheckpointError, rf"{q(name)}: {match}")


# ------------------------------------------------------------------------------------------ wrong shapes


@pytest.mark.parametrize(
    "scheme, name, shape, match",
    [
        (
            "w_mxfp4",
            expert(0, "w1", "weight"),
            (64, 33),
            r"packed mxfp4 w1 weight shape \(64, 33\), expected \(64, 32\)",
        ),
        (
            "w_mxfp4",
            expert(2, "w2", "weight"),
            (63, 32),
            r"packed mxfp4 w2 weight shape \(63, 32\), expected \(64, 32\)",
        ),
        ("w_mxfp4", expert(1, "w3", "weight"), (2048,), r"packed mxfp4 w3 weight shape \(2048,\), expected \(64, 32\)"),
        (
            "w_mxfp6_e2m3",
            expert(0, "w1", "weight"),
            (64, 32),
            r"packed mxfp6_e2m3 w1 weight shape \(64, 32\), expected \(64, 48\)",
        ),
        (
            "w8a8_int8_channel_dynamic_token",
            expert(3, "w1", "weight"),
            (64, 63),
            r"w1 weight shape \(64, 63\), expected \(64, 64\)",
        ),
    ],
    ids=["mxfp4-33-bytes", "mxfp4-63-rows", "mxfp4-flat", "mxfp6-fp4-length", "int8-63-columns"],
)
def test_wrong_weight_shape(bad, scheme, name, shape, match):
    dtype = np.int8 if "int8" in scheme else np.uint8
    refuse(bad(scheme, tensors={name: np.zeros(shape, dtype)}), CheckpointError, rf"{q(name)}: {match}")


@pytest.mark.parametrize(
    "scheme, name, value, match",
    [
        (
            "w_mxfp4",
            expert(0, "w1", "weight_scale"),
            np.full((64, 3), 127, np.uint8),
            r"E8M0 w1 weight scale .*shape \(64, 3\), expected \(64, 2\)",
        ),
        (
            "w_mxfp4",
            expert(3, "w2", "weight_scale"),
            np.full((64, 1), 127, np.uint8),
            r"E8M0 w2 weight scale .*shape \(64, 1\), expected \(64, 2\)",
        ),
        (
            "w8a8_int8_channel_dynamic_token",
            expert(1, "w3", "weight_scale"),
            np.ones(63, np.float32),
            r"per-channel w3 weight scale shape \(63,\), expected \(64,\)",
        ),
        (
            "w8a8_int8_tensor_static",
            expert(2, "w1", "weight_scale"),
            np.ones(2, np.float32),
            r"per-tensor weight scale must be a scalar \(per-tensor\), found shape \(2,\)",
        ),
    ],
    ids=["e8m0-3-blocks", "e8m0-1-block", "int8-channel-63", "int8-tensor-2"],
)
def test_scale_shape_mismatch(bad, scheme, name, value, match):
    refuse(bad(scheme, tensors={name: value}), CheckpointError, rf"{q(name)}: {match}")


# ------------------------------------------------------------------------------------------- bad values


def test_e8m0_nan_code_in_a_weight_scale(bad):
    name = expert(1, "w2", "weight_scale")

    def poison(scale):
        scale = scale.copy()
        scale[5, 1] = 255
        return scale

    path = bad(tensors={name: poison})
    refuse(path, CheckpointError, rf"{q(name)}: E8M0 code 255 \(NaN\) in a weight scale, first at index \(5, 1\)")


@pytest.mark.parametrize("scheme", ["w_mxfp4_a_fp8", "w8a8_int8_tensor_static"])
@pytest.mark.parametrize(
    "value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"), (0.0, "0.0"), (-0.5, "-0.5")]
)
def test_non_finite_or_non_positive_input_scale(bad, scheme, value, shown):
    name = expert(2, "w3", "input_scale")
    path = bad(scheme, tensors={name: np.float32(value)})
    refuse(path, CheckpointError, rf"{q(name)}: input scale must be finite and positive, found {q(shown)}$")


def test_non_scalar_input_scale(bad):
    name = expert(0, "w1", "input_scale")
    path = bad("w_mxfp4_a_fp8", tensors={name: np.full(2, 0.01, np.float32)})
    refuse(path, CheckpointError, rf"{q(name)}: input scale must be a scalar \(per-tensor\), found shape \(2,\)")


ZERO_POINTS = pytest.mark.parametrize(
    "scheme, name",
    [
        ("w8a8_int8_channel_dynamic_token", expert(1, "w1", "weight_zero_point")),
        ("w8a8_int8_tensor_static", expert(2, "w2", "input_zero_point")),
    ],
    ids=["weight-zero-point", "input-zero-point"],
)


def _nonzero_zero_point(bad, scheme, name):
    def shift(zero_point):
        zero_point = zero_point.copy()
        zero_point.reshape(-1)[-1] = 3
        return zero_point

    return bad(scheme, tensors={name: shift})


@ZERO_POINTS
def test_nonzero_int8_zero_point_warns_under_vllm(bad, scheme, name):
    path = _nonzero_zero_point(bad, scheme, name)
    with pytest.warns(UserWarning, match=rf"1 nonzero zero points \(e\.g\. {q(name)}\) discarded"):
        block = QuarkMoEBlock.from_checkpoint(path, 1, semantics="vllm")
    assert block.experts.quant_config.scheme == scheme


@ZERO_POINTS
def test_nonzero_int8_zero_point_fails_under_quark(bad, scheme, name):
    path = _nonzero_zero_point(bad, scheme, name)
    # the error must show the value found, not only that some value was nonzero
    refuse(path, CheckpointError, rf"{q(name)}: expected zero points of 0, found 3 at index", semantics="quark")


# --------------------------------------------------------------------------------------- router tensors


def test_missing_router(bad):
    refuse(bad(drop=[ROUTER]), CheckpointError, rf"missing tensor {q(repr(ROUTER))}")


@pytest.mark.parametrize("shape", [(4, 32), (3, 64), (64, 4)])
def test_router_of_the_wrong_shape(bad, shape):
    path = bad(tensors={ROUTER: np.zeros(shape, ml_dtypes.bfloat16)})
    refuse(path, CheckpointError, rf"{q(ROUTER)}: shape {q(str(shape))}, expected \(4, 64\)")


# ------------------------------------------------------------------------------- quantization_config


def _set(getter, **values):
    return lambda c: getter(c).update(values)


def _weight(c):
    return global_config(c)["weight"]


def _input(c):
    return global_config(c)["input_tensors"]


GQC = "quantization_config.global_quant_config"


@pytest.mark.parametrize(
    "scheme, edit, error, match",
    [
        ("w_mxfp4", _set(_weight, group_size=64), SchemeError, r"w_mxfp4 weight.*group_size must be 32, found 64"),
        ("w_mxfp4", _set(_weight, group_size=16), SchemeError, r"w_mxfp4 weight.*group_size must be 32, found 16"),
        ("w_mxfp4", _set(_weight, scale_format="float"), SchemeError, r"scale_format must be 'e8m0', found 'float'"),
        ("w_mxfp4", _set(_weight, scale_format=None), SchemeError, r"scale_format must be 'e8m0', found None"),
        (
            "w_mxfp4",
            _set(_weight, dtype="fp5"),
            QuarkConfigError,
            rf"{GQC}\.weight\.dtype: expected one of \[.*'fp4'.*\], found 'fp5'",
        ),
        (
            "w_mxfp4_a_fp8",
            _set(_input, dtype="fp7_e4m2"),
            QuarkConfigError,
            rf"{GQC}\.input_tensors\.dtype: expected one of \[.*\], found 'fp7_e4m2'",
        ),
        (
            "w_mxfp4",
            _set(_weight, mx_element_dtype="fp5"),
            QuarkConfigError,
            rf"{GQC}\.weight\.mx_element_dtype: expected one of \[.*\], found 'fp5'",
        ),
        (
            "w_mxfp4",
            _set(_weight, qscheme="per_row"),
            QuarkConfigError,
            rf"{GQC}\.weight\.qscheme: expected one of \[.*'per_group'.*\] or null, found 'per_row'",
        ),
        (
            "w_mxfp4",
            _set(_weight, group_size="32"),
            QuarkConfigError,
            rf"{GQC}\.weight\.group_size: expected an int or null, found '32'",
        ),
        (
            "w_mxfp4",
            lambda c: quant(c).pop("export"),
            QuarkConfigError,
            r"quantization_config\.export: expected the export block.*found no such key",
        ),
        (
            "w_mxfp4",
            lambda c: quant(c).update(export=None),
            QuarkConfigError,
            r"quantization_config\.export: expected the export block.*found null",
        ),
        (
            "w_mxfp4",
            lambda c: quant(c).update(quant_method="awq"),
            QuarkConfigError,
            r"quantization_config\.quant_method: expected 'quark', found 'awq'",
        ),
        (
            "w_mxfp4",
            lambda c: global_config(c).update(weight=[_weight(c), _weight(c)]),
            QuarkConfigError,
            rf"{GQC}\.weight: multi-spec .*found a list of length 2",
        ),
        (
            "w_mxfp4",
            lambda c: global_config(c).update(
                output_tensors={"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False}
            ),
            SchemeError,
            rf"output_tensors quantization is not supported for MoE layers \(layer {q(PREFIX)}\)",
        ),
        (
            "w8a8_int8_channel_dynamic_token",
            _set(_weight, symmetric=False),
            SchemeError,
            r"w8a8_int8 weight.*symmetric must be true.*found False",
        ),
    ],
    ids=[
        "group-size-64",
        "group-size-16",
        "scale-format-float",
        "scale-format-null",
        "weight-dtype-fp5",
        "input-dtype-unknown",
        "mx-element-dtype-fp5",
        "qscheme-per-row",
        "group-size-string",
        "export-missing",
        "export-null",
        "quant-method-awq",
        "weight-spec-list-of-2",
        "output-tensors-quantized",
        "int8-asymmetric-weight",
    ],
)
def test_bad_quantization_config(bad, scheme, edit, error, match):
    refuse(bad(scheme, config=edit), error, match)


def test_quantized_tensors_without_a_quantization_config(bad):
    """Dropping quantization_config makes the layer unquantized; the quantized tensors must then be refused."""
    path = bad(config=lambda c: c.pop("quantization_config"))
    refuse(path, CheckpointError, rf"scheme unquantized.*{q(expert(0, 'w1', 'weight_scale'))}")


# --------------------------------------------------------------------------------------------- config.json


def test_missing_config_json(bad):
    path = bad()
    (path / "config.json").unlink()
    refuse(path, CheckpointError, rf"{q(str(path / 'config.json'))}: missing")


def test_invalid_json_in_config(bad):
    path = bad()
    (path / "config.json").write_text('{"model_type": "mixtral",')
    refuse(path, CheckpointError, rf"{q(str(path / 'config.json'))}: expected valid JSON")


def test_unsupported_model_type(bad):
    path = bad(config=lambda c: c.update(model_type="llama"))
    refuse(
        path, CheckpointError, r"model_type 'llama' is not a supported MoE architecture; expected one of .*'mixtral'"
    )


def test_missing_required_config_key(bad):
    path = bad(config=lambda c: c.pop("num_local_experts"))
    message = r"config\.json: missing key 'num_local_experts' or 'num_experts' for model_type 'mixtral'"
    refuse(path, CheckpointError, message)


def test_config_key_of_the_wrong_type(bad):
    path = bad(config=lambda c: c.update(num_local_experts="four"))
    refuse(path, CheckpointError, r"config\.json: num_local_experts = 'four' must be an integer in \[1, ")


def test_config_with_more_experts_than_the_checkpoint(bad):
    path = bad(config=lambda c: c.update(num_local_experts=8))
    refuse(path, CheckpointError, rf"24 expert tensors missing.*{q(expert(4, 'w1', 'weight'))}")


def test_config_with_fewer_experts_than_the_checkpoint(bad):
    path = bad(config=lambda c: c.update(num_local_experts=3))
    refuse(
        path, CheckpointError, rf"{q(PREFIX)}\.3\.w[123]\.weight(_scale)?: expert index 3 out of range for 3 experts"
    )


def test_config_hidden_size_disagrees_with_the_tensors(bad):
    path = bad(config=lambda c: c.update(hidden_size=128))
    refuse(path, CheckpointError, rf"{q(expert(0, 'w1', 'weight'))}: .*shape \(64, 32\), expected \(64, 64\)")


@pytest.mark.parametrize("layer", [2, -1])
def test_non_moe_layer_index(bad, layer):
    refuse(
        bad(), CheckpointError, rf"layer {layer} is not a MoE layer of this mixtral model; MoE layers: 0\.\.1", layer
    )


# ------------------------------------------------------------------------------------------ the file itself


def test_truncated_safetensors_file(bad):
    path = bad()
    file = path / "model.safetensors"
    length, header = read_header(file)
    header.pop("__metadata__", None)
    last = max(header, key=lambda n: header[n]["data_offsets"][1])
    end = header[last]["data_offsets"][1]
    data = file.read_bytes()
    assert len(data) == 8 + length + end
    file.write_bytes(data[:-10])
    refuse(
        path,
        CheckpointError,
        rf"{q(str(file))}: truncated: tensor {q(repr(last))} ends at byte {end} of the data section, "
        rf"which has {end - 10}",
    )


def test_safetensors_file_cut_inside_its_header(bad):
    path = bad()
    file = path / "model.safetensors"
    length, _ = read_header(file)
    file.write_bytes(file.read_bytes()[:100])
    refuse(
        path,
        CheckpointError,
        rf"{q(str(file))}: not a safetensors file or truncated: header length {length} with a file of 100 bytes",
    )


def test_safetensors_file_shorter_than_8_bytes(bad):
    path = bad()
    (path / "model.safetensors").write_bytes(b"\x10\x00")
    refuse(path, CheckpointError, r"model\.safetensors: not a safetensors file: 2 bytes, too short")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"this is a PyTorch pickle, not safetensors" * 4, r"not a safetensors file or truncated: header length \d+"),
        (struct.pack("<Q", 16) + b"not json at all!" + b"\0" * 32, r"not a safetensors file: header is not valid JSON"),
        (struct.pack("<Q", 8) + b"[1, 2]  " + b"\0" * 8, r"not a safetensors file: header is not a JSON object"),
    ],
    ids=["text", "garbage-header", "list-header"],
)
def test_non_safetensors_file_named_model_safetensors(bad, content, match):
    path = bad()
    (path / "model.safetensors").write_bytes(content)
    refuse(path, CheckpointError, rf"{q(str(path / 'model.safetensors'))}: {match}")


def test_unknown_dtype_string_in_the_safetensors_header(bad):
    path = bad()
    name = expert(1, "w1", "weight")
    rewrite_header(path / "model.safetensors", lambda h: h[name].update(dtype="F4"))
    refuse(path, CheckpointError, rf"tensor {q(repr(name))}: unsupported dtype 'F4'; expected one of \[.*'U8'.*\]")


def test_header_shape_disagrees_with_the_byte_count(bad):
    path = bad()
    name = expert(1, "w2", "weight_scale")
    rewrite_header(path / "model.safetensors", lambda h: h[name].update(shape=[64, 3]))
    needs = r"U8\[64, 3\] needs 192 bytes, data_offsets \[\d+, \d+\] give 128"
    refuse(path, CheckpointError, rf"tensor {q(repr(name))}: {needs}")


def test_folder_without_safetensors_files(bad):
    path = bad()
    (path / "model.safetensors").unlink()
    refuse(path, CheckpointError, rf"{q(str(path))}: no \.safetensors files found")


def test_nothing_half_loaded_the_original_still_loads(bad, exported):
    """A failure on the last thing read (the router, after all experts) returns nothing and leaves no state."""
    refuse(bad(drop=[ROUTER]), CheckpointError, q(ROUTER))
    block = QuarkMoEBlock.from_checkpoint(exported("w_mxfp4"), 1)
    assert block.router_weight.get_value().shape == (4, 64)

"""Generate golden MX vectors with amd-quark's own quantizer (run once, offline; CI only reads the .npz).

Environment (separate from the project's, Python 3.11, CPU torch):
    python3 -m venv /tmp/quark-env
    /tmp/quark-env/bin/pip install torch==2.13.0 amd-quark==0.13 transformers numpy
    /tmp/quark-env/bin/python tests/golden/generate_quark_golden.py [FORMAT ...]

FORMAT is any of fp4, fp6_e3m2, fp6_e2m3, fp8_e4m3 (default: all). The MXFP8 files were made with
``... generate_quark_golden.py fp8_e4m3`` (the other formats' files were left as they were).

For each element format (fp4, fp6_e3m2, fp6_e2m3), scale mode (even, floor, ceil) and input dtype
(float32, bfloat16, float16) this runs exactly the path Quark's exporter takes for a weight:
``PerBlockMXObserver`` -> ``get_scale`` -> ``scaled_real_quantize`` -> ``Pack_fp4``/``Pack_fp6`` ->
``to_e8m0_uint8``, plus the fake-quant (QDQ) output of the same ``FakeQuantize`` module. Output files:
``data/quark_mx_<fmt>_<mode>_<dtype>.npz`` with ``x_bits`` (input bit patterns), ``packed`` (uint8 codes in
Quark's layout), ``scales`` (uint8 E8M0), ``qdq_bits`` (fake-quant output bit patterns) and ``case`` (one label
per row). Rows of NaN/Inf inputs are in separate ``nonfinite`` files: Quark's behaviour there is recorded,
not promised.

MXFP8 (``fp8_e4m3``: ``OCP_MXFP8E4M3Spec``, fp8 e4m3 elements, one E8M0 scale per 32) goes through the same
observer, ``get_scale``, fake-quant module, ``create_pack_method`` (an identity ``PackMethod`` for fp8) and
``to_e8m0_uint8``. One step is missing from amd-quark 0.13 itself: its ``real_quantize_fp8_e4m3`` (the
``scaled_real_quantize`` kernel behind the exporter) has no ``per_group`` branch and raises
``ValueError: Unsupported QuantSchema: per_group for quant_dtype: fp8_e4m3``. ``mxfp8_real_quantize_shim``
fills that branch with the steps of Quark's own fake-quant kernel ``fake_quantize_fp8_per_group_with_scale``
stopped at the ``float8_e4m3fn`` cast (x / scale in float32, clamp to +-448, ``.to(torch.float8_e4m3fn)``), and
``quark_mx`` checks for every row that ``codes.float32 * scale`` is bit for bit Quark's fake-quant output.
``packed`` holds the fp8 codes' bit patterns as uint8 (one byte per element, 128 per row); the metadata is in
``data/quark_mx_fp8_e4m3_meta.json`` (``quark_mx_meta.json`` lists the fp4/fp6 files).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import quark.torch.kernel  # noqa: F401  (registers torch.ops.quark)
import torch
from quark.torch.quantization.config.config import (
    OCP_MXFP4Spec,
    OCP_MXFP6E2M3Spec,
    OCP_MXFP6E3M2Spec,
    OCP_MXFP8E4M3Spec,
)
from quark.torch.quantization.tensor_quantize import FakeQuantizeBase
from quark.torch.utils.numerics import to_e8m0_uint8
from quark.torch.utils.pack import create_pack_method

OUT = pathlib.Path(__file__).parent / "data"
K = 128  # elements per row = 4 blocks of 32
SEEDS = {"fp4": 4, "fp6_e3m2": 63, "fp6_e2m3": 62, "fp8_e4m3": 84}
SPECS = {
    "fp4": OCP_MXFP4Spec,
    "fp6_e3m2": OCP_MXFP6E3M2Spec,
    "fp6_e2m3": OCP_MXFP6E2M3Spec,
    "fp8_e4m3": OCP_MXFP8E4M3Spec,
}
META = {"fp8_e4m3": "quark_mx_fp8_e4m3_meta.json"}  # the others share quark_mx_meta.json
GRID = {  # representable magnitudes of each element format
    "fp4": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "fp6_e3m2": sorted({m / 4 * 2.0**e for e in range(-2, 5) for m in range(4, 8)} | {k / 16 for k in range(4)}),
    "fp6_e2m3": sorted({m / 8 * 2.0**e for e in range(0, 3) for m in range(8, 16)} | {k / 8 for k in range(8)}),
    # e4m3fn: subnormals k/8 * 2^-6, normals up to 1.75 * 2^8 = 448 (S.1111.111 is NaN, no Inf)
    "fp8_e4m3": sorted(
        {m / 8 * 2.0**e for e in range(-6, 9) for m in range(8, 16) if (e, m) != (8, 15)}
        | {k / 8 * 2.0**-6 for k in range(8)}
    ),
}


def rows_for(fmt: str, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    rows: list[np.ndarray] = []
    labels: list[str] = []

    def add(label: str, row) -> None:
        row = np.asarray(row, dtype=np.float64)
        assert row.shape == (K,), (label, row.shape)
        rows.append(row)
        labels.append(label)

    for mag in [1.0, 1e-3, 1e3, 2.0**-60, 2.0**60]:
        for _ in range(4):
            add(f"gauss_{mag:g}", rng.standard_normal(K) * mag)
    for _ in range(4):
        add("student_t3", rng.standard_t(3, K))
    add("uniform", rng.uniform(-1, 1, K))

    grid = np.array(GRID[fmt])
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties between neighbours
    top = grid[-1]

    def pinned_rows(values: np.ndarray) -> list[np.ndarray]:
        """Rows with the block amax pinned to ``top``; ``values`` wrap around if they fit one row (fp4, fp6),
        else (fp8) they are laid out 31 per block after the pin, over as many rows as needed."""
        if len(values) <= K:
            body = np.resize(values, K)
            for b in range(0, K, 32):
                body[b] = top
            return [body]
        per_row = K // 32 * 31
        out = []
        for start in range(0, len(values), per_row):
            chunk = np.resize(values[start : start + per_row], per_row).reshape(K // 32, 31)
            out.append(np.concatenate([np.full((K // 32, 1), top), chunk], axis=1).reshape(K))
        return out

    for scale_exp in [0, -3, 5]:
        s = 2.0**scale_exp
        # pin the block amax to the top grid value so the scale is exactly s in every mode
        for body in pinned_rows(np.concatenate([mids, -mids, grid, -grid])):
            add(f"ties_scale2^{scale_exp}", body * s)
    # just above / below each tie
    for body in pinned_rows(np.concatenate([np.nextafter(mids, 0), np.nextafter(mids, 10)])):
        add("near_ties", body)

    # amax around the even-rounding thresholds and saturation
    amaxes = [top * 1.1, top * 1.15, top * 1.16, 6.9, 7.0, 7.5, 7.49, 28, 29, 30, 31, 1.75, 1.875, 1.9375, 1.99]
    if fmt == "fp8_e4m3":
        # e4m3: saturation at 448 = 1.75 * 2^8; "even" keeps the exponent below a significand of 1.9375 (mbits 3)
        for e in [0, 8, -4]:
            for m in [1.5, 1.74, 1.75, 1.76, 1.875, 1.9, 1.93, 1.9374, 1.9375, 1.9376, 1.96, 1.99]:
                amaxes.append(m * 2.0**e)
        amaxes += [448, 449, 464, 479, 480, 495, 496, 500, 511, 512]
    for amax in amaxes:
        row = rng.uniform(-1, 1, K) * amax * 0.9
        for b in range(0, K, 32):
            row[b + 5] = amax
            row[b + 7] = -amax
        add(f"amax_{amax:g}", row)

    # exact powers of two and the float32 neighbours just below / above them
    for k in [-130, -127, -126, -100, -20, -3, -1, 0, 1, 2, 3, 7, 20, 60, 100, 125, 126, 127]:
        p = np.float32(2.0**k)
        for tag, v in [
            ("pow2", p),
            ("below", np.nextafter(p, np.float32(0))),
            ("above", np.nextafter(p, np.float32(np.inf))),
        ]:
            if not np.isfinite(v) or v == 0:
                continue
            row = rng.uniform(-1, 1, K) * float(v)
            for b in range(0, K, 32):
                row[b + 3] = float(v)
            add(f"amax_{tag}_2^{k}", row)
    # significands just under 2.0 at many exponents (log2 rounding in floor / ceil modes)
    for k in [-140, -120, -60, -10, 2, 3, 10, 40, 100, 126]:
        for ulps in [1, 2, 3, 8, 64]:
            v = np.float32(2.0 ** (k + 1))
            for _ in range(ulps):
                v = np.nextafter(v, np.float32(0))
            row = rng.uniform(-1, 1, K) * float(v)
            for b in range(0, K, 32):
                row[b + 1] = float(v)
            add(f"sig_below2_{ulps}ulp_2^{k}", row)

    # zero and single-element blocks, subnormal inputs, huge values
    add("all_zero", np.zeros(K))
    row = np.zeros(K)
    row[::32] = 1.0
    add("one_nonzero_per_block", row)
    row = np.zeros(K)
    row[5::32] = -3.25
    add("one_negative_per_block", row)
    add("subnormal_f32", rng.uniform(-1, 1, K) * 2.0**-135)
    add(
        "mixed_tiny",
        np.concatenate(
            [
                np.zeros(32),
                rng.standard_normal(32) * 2.0**-149 * 64,
                rng.standard_normal(32) * 2.0**-126,
                rng.standard_normal(32),
            ]
        ),
    )
    add("huge", rng.uniform(-1, 1, K) * 3.0e38)
    add("float32_max", np.full(K, float(np.finfo(np.float32).max)) * np.resize([1, -1, 0.5, -0.25], K))
    add("negative_zero", np.resize([-0.0, 0.0, -1e-30, 1.0], K))
    return np.stack(rows), labels


def nonfinite_rows(rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    rows, labels = [], []
    base = rng.standard_normal(K)
    for label, pos, val in [("inf", 3, np.inf), ("neg_inf", 40, -np.inf), ("nan", 70, np.nan)]:
        row = base.copy()
        row[pos] = val
        rows.append(row)
        labels.append(label)
    return np.stack(rows), labels


def mxfp8_real_quantize_shim() -> None:
    """Give amd-quark 0.13's ``scaled_real_quantize`` the ``per_group`` fp8 branch it lacks (see the docstring).

    The steps are those of Quark's ``fake_quantize_fp8_per_group_with_scale`` up to and including the cast to
    ``float8_e4m3fn``; other qschemes and dtypes still go to Quark's own functions. Idempotent.
    """
    from quark.torch.kernel.hw_emulation import hw_emulation_interface as hw
    from quark.torch.quantization.utils import reshape_to_blocks

    orig = hw.DTYPE_TO_REAL_QUANTIZE_FUNCS["fp8_e4m3"]
    if getattr(orig, "_mxfp8_shim", False):
        return

    def real_quantize_fp8_e4m3(inputs, scale=None, axis=None, qscheme=None, group_size=None, **kwargs):
        if qscheme != "per_group":
            return orig(inputs, scale=scale, axis=axis, qscheme=qscheme, group_size=group_size, **kwargs)
        shape = list(inputs.shape)
        shape[-1], shape[axis] = shape[axis], shape[-1]
        scale = scale.masked_fill(scale == 0.0, torch.finfo(torch.float32).eps).to(torch.float32)
        blocks = reshape_to_blocks(inputs.to(torch.float32), group_size, axis)
        if scale.dim() < blocks.dim():
            scale = scale.unsqueeze(-1)
        codes = torch.clamp(blocks / scale, -448.0, 448.0).to(torch.float8_e4m3fn)
        codes = codes.reshape(codes.size(0), -1)[:, : shape[-1]].reshape(shape)
        return codes.transpose(axis, -1)

    real_quantize_fp8_e4m3._mxfp8_shim = True
    real_quantize_fp8_e4m3._quark_orig = orig
    hw.DTYPE_TO_REAL_QUANTIZE_FUNCS["fp8_e4m3"] = real_quantize_fp8_e4m3


def quark_mx(x: torch.Tensor, fmt: str, mode: str) -> dict[str, np.ndarray]:
    spec = SPECS[fmt](ch_axis=-1, is_dynamic=False, scale_calculation_mode=mode).to_quantization_spec()
    fq = FakeQuantizeBase.get_fake_quantize(spec)
    qdq = fq(x)
    codes = quark.torch.kernel.scaled_real_quantize(
        fmt, x, fq.scale, fq.zero_point, -1, 32, fq.quant_min, fq.quant_max, 8, "per_group"
    )
    packed = create_pack_method("per_group", fmt).pack(codes, False)
    if fmt == "fp8_e4m3":
        assert packed.dtype == torch.float8_e4m3fn and packed.shape == x.shape, (packed.dtype, packed.shape)
        # the codes must be exactly what Quark's fake-quant module dequantizes (NaN compares equal to NaN)
        scale = fq.scale.to(torch.float32).repeat_interleave(32, dim=-1)
        deq = (packed.to(torch.float32) * scale).to(x.dtype)
        same = (bits(deq) == bits(qdq.to(x.dtype))) | (torch.isnan(deq) & torch.isnan(qdq)).numpy()
        assert same.all(), f"fp8 codes * scale != Quark fake-quant at {np.argwhere(~same)[:5]}"
        packed = packed.view(torch.uint8)
    return {
        "packed": packed.numpy().astype(np.uint8),
        "scales": to_e8m0_uint8(fq.scale).numpy().astype(np.uint8),
        "qdq": qdq,
    }


def bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.view(torch.int16).numpy().view(np.uint16)


def main(argv: list[str]) -> None:
    import quark

    fmts = argv or list(SPECS)
    unknown = sorted(set(fmts) - set(SPECS))
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; choose from {list(SPECS)}")
    if "fp8_e4m3" in fmts:
        mxfp8_real_quantize_shim()
    OUT.mkdir(parents=True, exist_ok=True)
    metas: dict[str, dict] = {}
    for fmt in fmts:
        meta = metas.setdefault(
            META.get(fmt, "quark_mx_meta.json"),
            {"amd_quark": quark.__version__, "torch": torch.__version__, "files": []},
        )
        if fmt == "fp8_e4m3":
            meta["note"] = (
                "amd-quark 0.13 scaled_real_quantize has no per_group branch for fp8_e4m3; the codes come from "
                "mxfp8_real_quantize_shim (Quark's fake_quantize_fp8_per_group_with_scale stopped at the "
                "float8_e4m3fn cast) and were checked to dequantize bit for bit to Quark's fake-quant output"
            )
        rng = np.random.default_rng(SEEDS[fmt])
        x64, labels = rows_for(fmt, rng)
        xn, nlabels = nonfinite_rows(rng)
        for dtype_name, tdtype in [
            ("float32", torch.float32),
            ("bfloat16", torch.bfloat16),
            ("float16", torch.float16),
        ]:
            for mode in ["even", "floor", "ceil"]:
                for tag, data, lab in [("", x64, labels), ("_nonfinite", xn, nlabels)]:
                    x = torch.tensor(data, dtype=torch.float32).to(tdtype)
                    r = quark_mx(x, fmt, mode)
                    name = f"quark_mx_{fmt}_{mode}_{dtype_name}{tag}.npz"
                    np.savez_compressed(
                        OUT / name,
                        x_bits=bits(x),
                        packed=r["packed"],
                        scales=r["scales"],
                        qdq_bits=bits(r["qdq"].to(tdtype)),
                        case=np.array(lab),
                    )
                    meta["files"].append(name)
    legacy = [f for f in SPECS if f not in META]
    for meta_name, meta in metas.items():
        if meta_name == "quark_mx_meta.json" and not set(legacy) <= set(fmts):
            # the shared file lists all three fp4/fp6 formats; do not overwrite it with part of them
            print(f"not rewriting {meta_name} (only {fmts} generated)", file=sys.stderr)
            continue
        (OUT / meta_name).write_text(json.dumps(meta, indent=1) + "\n")
        print("wrote", len(meta["files"]), "files to", OUT, "listed in", meta_name, file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The one place that decides kernel tiles: measured tables per GPU architecture and device, the regime
of a call, the K split, and where FP8 tensor cores exist; plus ``backend="auto"``'s measured order.

Tiles live in ``kernels/tiles.json`` (written by the tuning commands, ``benchmarks/tune_tiles.py --write``
for the Pallas kernels and ``benchmarks/tune_triton_mx.py --write`` for the v2 MXFP4 kernels):
``{"architectures": {"sm90": {<entry>, "devices": {device kind: <entry>}}}, "default": <entry>}`` where an
entry holds ``{"tiles": {kernel: {regime: [GEMM1 tile, GEMM2 tile]}}, "dequant_min_rows": ...}`` (any part
may be missing). A call looks up its device kind's entry, then its architecture's (``sm`` + compute
capability), then the defaults, key by key; a GPU whose device kind has no entry gets a warning once (it
runs, but on tiles tuned for another device of its architecture). Kernels: ``"pallas"`` (the Pallas
grouped GEMM, also the old jax-triton kernels' row tile) and ``"triton_mx"`` (the v2 MXFP4 kernels,
:mod:`quarkmoe_jax.kernels.triton_mx_gemm`). Regimes by rows per touched expert: ``"decode"`` (<= 16),
``"mid"`` (<= 128), ``"prefill"``. ``block_n`` is an upper bound (the launch uses the largest power of two
<= it that divides N); ``split_k`` too (applied only where the grid alone does not fill the GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import warnings

import jax

from quarkmoe_jax.kernels.grouped_gemm import TileConfig

__all__ = [
    "TILES_PATH",
    "DEFAULT",
    "DEQUANT_MIN_ROWS",
    "SPLIT_K_MAX_EXPERTS",
    "regime",
    "architecture",
    "tile_configs",
    "tile_source",
    "expected_load",
    "dequant_min_rows",
    "FP8_TENSOR_CORES",
    "fp8_tensor_cores",
    "BACKEND_TABLE_PATH",
    "DEFAULT_BACKEND_ORDER",
    "MX_BACKEND_ORDER",
    "scheme_family",
    "backend_order",
]

TILES_PATH = pathlib.Path(__file__).with_name("tiles.json")
KERNELS = ("pallas", "triton_mx")
REGIMES = ("decode", "mid", "prefill")


def _tile(spec: dict) -> TileConfig:
    return TileConfig(**spec)


@functools.cache
def _tables() -> dict:
    """tiles.json with every tile as a :class:`TileConfig` (pairs as tuples)."""
    raw = json.loads(TILES_PATH.read_text())

    def by_k(spec) -> tuple[tuple[int, TileConfig], ...]:
        """One tile, or a list of tiles each for contractions of at least its ``min_k``."""
        specs = spec if isinstance(spec, list) else [spec]
        return tuple(sorted((t.get("min_k", 0), _tile({k: v for k, v in t.items() if k != "min_k"})) for t in specs))

    def entry(e: dict) -> dict:
        out = {k: v for k, v in e.items() if k not in ("tiles", "devices")}
        out["tiles"] = {
            kernel: {reg: tuple(by_k(t) for t in pair) for reg, pair in by_regime.items()}
            for kernel, by_regime in e.get("tiles", {}).items()
        }
        if "devices" in e:
            out["devices"] = {kind: entry(d) for kind, d in e["devices"].items()}
        return out

    return {
        "default": entry(raw["default"]),
        "architectures": {arch: entry(e) for arch, e in raw.get("architectures", {}).items()},
        "meta": raw.get("meta", {}),
    }


DEFAULT = _tables()["default"]["tiles"]["pallas"]
"""The default Pallas tiles ``{regime: (GEMM1, GEMM2)}``, each ``((min_k, TileConfig), ...)`` (the live
table: tests may patch it)."""

SPLIT_K_MAX_EXPERTS = 4
"""Pallas: a table's split_k applies only when at most this many experts can be touched (few row tiles:
the grid alone does not fill the GPU); otherwise the launch runs unsplit. (The v2 kernels size their K
split from the grid itself: :func:`quarkmoe_jax.kernels.triton_mx_gemm.split_k_for`.)"""

DEQUANT_MIN_ROWS: dict[str, float] = {"cpu": float("inf")}
"""Overrides of the tables' ``dequant_min_rows`` per device kind: rows per expert from which the Pallas
prefill path dequantizes to bfloat16 (the CPU interpreter: never, unless a test sets it)."""

_warned: set[str] = set()


def architecture(device=None) -> str:
    """``"sm90"`` for a compute capability 9.0 GPU, ``"cpu"`` for the CPU (``device``: default the first)."""
    device = device or jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability:
        return device.platform
    return "sm" + str(capability).replace(".", "")


def _lookup(device_kind: str, arch: str | None, key) -> tuple[object, str]:
    """The first of device entry, architecture entry, defaults that has ``key(entry)``; and where it came from."""
    tables = _tables()
    arch_entry = tables["architectures"].get(arch or "", {})
    device_entry = arch_entry.get("devices", {}).get(device_kind)
    for name, e in ((device_kind, device_entry), (arch, arch_entry), ("default", tables["default"])):
        value = key(e) if e else None
        if value is None:
            continue
        if device_entry is None and arch != "cpu" and device_kind not in _warned:
            _warned.add(device_kind)
            warnings.warn(
                f"no tuned kernel tiles for {device_kind!r} ({arch}): using the {name} tiles; "
                "benchmarks/tune_triton_mx.py --write and benchmarks/tune_tiles.py --write tune this device",
                stacklevel=4,
            )
        return value, name
    raise KeyError(f"kernels/tiles.json: no default entry for {key}")


def regime(rows_per_expert: float) -> str:
    if rows_per_expert <= 16:
        return "decode"
    if rows_per_expert <= 128:
        return "mid"
    return "prefill"


def _kernel_tiles(kernel: str, reg: str):
    return lambda e: e.get("tiles", {}).get(kernel, {}).get(reg)


def _for_k(options: tuple[tuple[int, TileConfig], ...], k: int) -> TileConfig:
    """The tile of the largest ``min_k`` not above ``k``."""
    return [tile for min_k, tile in options if min_k <= k][-1] if any(m <= k for m, _ in options) else options[0][1]


def tile_configs(
    device_kind: str,
    rows_per_expert: float,
    touched_experts: int,
    kernel: str = "pallas",
    arch: str | None = None,
    contractions: tuple[int, int] = (0, 0),
) -> tuple[TileConfig, TileConfig]:
    """GEMM1 and GEMM2 tiles of ``kernel`` for a device (``jax.Device.device_kind``; ``arch`` defaults to the
    first device's, :func:`architecture`), the expected load (``rows_per_expert`` over ``touched_experts``;
    :func:`expected_load`) and the two GEMMs' contraction lengths ``(H, I)`` (entries may differ by K)."""
    arch = architecture() if arch is None else arch
    options, _ = _lookup(device_kind, arch, _kernel_tiles(kernel, regime(rows_per_expert)))
    configs = tuple(_for_k(o, k) for o, k in zip(options, contractions, strict=True))
    if kernel == "pallas" and touched_experts > SPLIT_K_MAX_EXPERTS:
        configs = tuple(dataclasses.replace(c, split_k=1) for c in configs)
    return configs


def tile_source(device_kind: str, kernel: str, rows_per_expert: float, arch: str | None = None) -> str:
    """Which entry :func:`tile_configs` takes its tiles from: the device kind, the architecture or "default"."""
    arch = architecture() if arch is None else arch
    return _lookup(device_kind, arch, _kernel_tiles(kernel, regime(rows_per_expert)))[1]


def expected_load(num_pairs: int, num_local: int, num_global: int) -> tuple[int, float]:
    """``(touched experts, rows per touched expert)`` that the tile and prefill choices assume.

    ``num_pairs`` token-expert pairs over ``num_global`` experts, ``num_local`` of them here. An
    expert-parallel shard sees every pair of its token group but, under even routing, only its share
    ``num_local / num_global`` of them reaches its experts: counting them all made a one-expert Mixtral EP 8
    shard at 16 tokens take the 32-row ("mid") tiles instead of decode tiles (2.4x slower on an H100, MXFP4).
    Under the all-to-all exchange the shard's rows are already those with a local expert, so this share
    underestimates their local pairs (about 3x for Mixtral EP 8): an estimate, not a bound.
    """
    local_pairs = num_pairs * num_local / num_global
    touched = max(1, min(num_local, math.ceil(local_pairs)))
    return touched, local_pairs / touched


def dequant_min_rows(device_kind: str, arch: str | None = None) -> float:
    """Rows per expert from which Pallas prefill dequantizes (the CPU interpreter: never, unless forced)."""
    if device_kind in DEQUANT_MIN_ROWS:
        return DEQUANT_MIN_ROWS[device_kind]
    arch = architecture() if arch is None else arch
    return _lookup(device_kind, arch, lambda e: e.get("dequant_min_rows"))[0]


FP8_TENSOR_CORES: dict[str, bool] = {"cpu": True}
"""Overrides per device kind of whether FP8 W8A8 runs e4m3 x e4m3 on the fp8 tensor cores (else the e4m3
codes go in as bfloat16, exact, at half the tensor-core rate). Otherwise: GPUs of compute capability 8.9 and
later have them. The CPU interpreter runs the fp8 kernel path so that CI tests it."""


def fp8_tensor_cores(device_kind: str) -> bool:
    if device_kind in FP8_TENSOR_CORES:
        return FP8_TENSOR_CORES[device_kind]
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability:
        return False
    major, minor = (int(v) for v in str(capability).split(".")[:2])
    return (major, minor) >= (8, 9)


BACKEND_TABLE_PATH = pathlib.Path(__file__).with_name("backend_table.json")
"""``backend="auto"``'s measured order: ``{device kind: {scheme family: {tokens: [backends, fastest first]}}}``,
written by ``benchmarks/backend_table.py`` from ``benchmarks/moe_bench.py`` results."""

DEFAULT_BACKEND_ORDER = ("pallas", "triton")
"""Kernel backends ``auto`` tries (before the emulation) where the table has no entry, except MX weights:
:data:`MX_BACKEND_ORDER`."""
MX_BACKEND_ORDER = ("triton", "pallas")
"""MX weights (MXFP4, MXFP6) without a table entry: the v2 kernels first (jax-triton; ``auto`` falls back
to Pallas where it is not installed)."""


def scheme_family(quant_config) -> str:
    """The table key of a scheme: weight format (by element width: both MXFP6 formats share ``"mxfp6"``) and
    activation kind, e.g. ``"mxfp4/mx"``, ``"mxfp6/none"``, ``"mxfp8/mx"``, ``"int8/int8"``, ``"int8/none"``
    (W8A16), ``"fp8/fp8"``, ``"bf16/none"``."""
    weight = quant_config.weight
    if weight.kind == "mx":
        name = weight.mx_format.split("_")[0]
    else:
        name = {"none": "bf16"}.get(weight.kind, weight.kind)
    return f"{name}/{quant_config.activation.kind}"


@functools.cache
def _backend_table() -> dict:
    if not BACKEND_TABLE_PATH.exists():
        return {}
    return json.loads(BACKEND_TABLE_PATH.read_text()).get("order", {})


def backend_order(device_kind: str, quant_config, num_tokens: int) -> tuple[str, ...]:
    """Kernel backends for ``auto``, fastest first as measured on ``device_kind`` for the scheme's family at
    the nearest measured token count (log scale), then the remaining default ones."""
    family = scheme_family(quant_config)
    default = MX_BACKEND_ORDER if family.startswith(("mxfp4/", "mxfp6/")) else DEFAULT_BACKEND_ORDER
    by_tokens = _backend_table().get(device_kind, {}).get(family)
    if not by_tokens:
        return default
    nearest = min(by_tokens, key=lambda t: (abs(math.log2(int(t)) - math.log2(max(num_tokens, 1))), int(t)))
    measured = tuple(by_tokens[nearest])
    return measured + tuple(b for b in default if b not in measured)

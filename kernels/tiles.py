"""The kernel tile tables: ``kernels/tiles.json`` read per GPU architecture and device (the data; each
backend's rules for using them are in its own ``backend.py``).

Tiles are written by the tuning commands (``benchmarks/tune_tiles.py --write`` for the Pallas kernels,
``benchmarks/tune_triton_mx.py --write`` for the v2 MX kernels):
``{"architectures": {"sm90": {<entry>, "devices": {device kind: <entry>}}}, "default": <entry>}`` where an
entry holds ``{"tiles": {tile family: {regime: [GEMM1 tile, GEMM2 tile]}}, "dequant_min_rows": ...}`` (any part
may be missing). A call looks up its device kind's entry, then its architecture's (``sm`` + compute
capability), then the defaults, key by key; a GPU whose device kind has no entry gets a warning once (it
runs, but on tiles tuned for another device of its architecture). Tile families (:data:`FAMILIES`): the
Pallas grouped GEMM's (also the row tile of the jax-triton dense kernel) and the v2 MX kernels'. Regimes:
:func:`quarkmoe_jax.kernels.base.regime`. ``block_n`` is an upper bound (the launch fits it to N);
``split_k`` too (each backend's rules say when it applies).
"""

from __future__ import annotations

import functools
import json
import pathlib
import warnings

from quarkmoe_jax.kernels.base import REGIMES, TileConfig, architecture

__all__ = [
    "TILES_PATH",
    "FAMILIES",
    "PALLAS_TILES",
    "TRITON_MX_TILES",
    "DEFAULT",
    "tile_options",
    "tile_source",
    "dequant_min_rows",
    "DEQUANT_MIN_ROWS",
    "REGIMES",
]

TILES_PATH = pathlib.Path(__file__).with_name("tiles.json")
PALLAS_TILES = "pallas"
"""The tile family of the Pallas grouped GEMM (and the jax-triton dense kernel's row tile)."""
TRITON_MX_TILES = "triton_mx"
"""The tile family of the v2 MX kernels (:mod:`quarkmoe_jax.kernels.triton.mx_gemm`)."""
FAMILIES = (PALLAS_TILES, TRITON_MX_TILES)


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


DEFAULT = _tables()["default"]["tiles"][PALLAS_TILES]
"""The default Pallas tiles ``{regime: (GEMM1, GEMM2)}``, each ``((min_k, TileConfig), ...)`` (the live
table: tests may patch it)."""

DEQUANT_MIN_ROWS: dict[str, float] = {"cpu": float("inf")}
"""Overrides of the tables' ``dequant_min_rows`` per device kind: rows per expert from which the Pallas
prefill path dequantizes to bfloat16 (the CPU interpreter: never, unless a test sets it)."""

_warned: set[str] = set()


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


def _kernel_tiles(kernel: str, reg: str):
    return lambda e: e.get("tiles", {}).get(kernel, {}).get(reg)


def _for_k(options: tuple[tuple[int, TileConfig], ...], k: int) -> TileConfig:
    """The tile of the largest ``min_k`` not above ``k``."""
    return [tile for min_k, tile in options if min_k <= k][-1] if any(m <= k for m, _ in options) else options[0][1]


def tile_options(
    device_kind: str, family: str, regime: str, contractions: tuple[int, int], arch: str | None = None
) -> tuple[TileConfig, TileConfig]:
    """The table's GEMM1 and GEMM2 tiles of tile ``family`` for ``regime`` on a device
    (``jax.Device.device_kind``; ``arch`` defaults to the first device's, :func:`architecture`), for the two
    GEMMs' contraction lengths ``(H, I)`` (entries may differ by K)."""
    arch = architecture() if arch is None else arch
    options, _ = _lookup(device_kind, arch, _kernel_tiles(family, regime))
    return tuple(_for_k(o, k) for o, k in zip(options, contractions, strict=True))


def tile_source(device_kind: str, family: str, regime: str, arch: str | None = None) -> str:
    """Which entry :func:`tile_options` takes its tiles from: the device kind, the architecture or "default"."""
    arch = architecture() if arch is None else arch
    return _lookup(device_kind, arch, _kernel_tiles(family, regime))[1]


def dequant_min_rows(device_kind: str, arch: str | None = None) -> float:
    """Rows per expert from which Pallas prefill dequantizes (the CPU interpreter: never, unless forced)."""
    if device_kind in DEQUANT_MIN_ROWS:
        return DEQUANT_MIN_ROWS[device_kind]
    arch = architecture() if arch is None else arch
    return _lookup(device_kind, arch, lambda e: e.get("dequant_min_rows"))[0]

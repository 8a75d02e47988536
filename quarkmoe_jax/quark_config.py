"""AMD Quark's ``quantization_config`` (the block of a checkpoint's ``config.json``), parsed and validated.

Pure Python, no JAX. The classes mirror what Quark writes (``QTensorConfig`` / ``QLayerConfig`` / ``QConfig``
``to_dict``) and what vLLM 0.33's ``QuarkConfig`` reads from it:

* :class:`TensorSpec`: one tensor's quantization (``weight``, ``input_tensors``, ...).
* :class:`LayerQuantConfig`: the four specs of one layer.
* :class:`QuarkConfig`: the whole block, with vLLM's layer lookup (:meth:`QuarkConfig.resolve`) and
  exclusion rule (:meth:`QuarkConfig.is_excluded`).

Every problem raises :class:`QuarkConfigError`, whose message names the key path (for example
``quantization_config.global_quant_config.weight.dtype``), what was expected and what was found.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import fnmatch
import functools
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quarkmoe_jax.errors import QuarkMoEError
from quarkmoe_jax.files import read_json_file

__all__ = [
    "KNOWN_DTYPES",
    "KNOWN_QSCHEMES",
    "LayerQuantConfig",
    "QuarkConfig",
    "QuarkConfigError",
    "TensorSpec",
    "exclude_match_budget",
]

KNOWN_DTYPES: frozenset[str] = frozenset(
    {
        "fp4", "fp6_e3m2", "fp6_e2m3", "fp8_e4m3", "fp8_e5m2",
        "int8", "uint8", "int4", "uint4", "mx", "bfloat16", "float16",
    }
)  # fmt: skip
"""The ``dtype`` strings (Quark's ``Dtype`` names) this library recognises; any other raises."""

KNOWN_QSCHEMES: frozenset[str] = frozenset({"per_tensor", "per_channel", "per_group", "per_block"})
"""Quark's ``QSchemeType`` names."""

_ROOT = "quantization_config"
_LAYER_KEYS = ("weight", "input_tensors", "output_tensors", "bias")


class QuarkConfigError(QuarkMoEError):
    """A Quark ``quantization_config`` that is missing, malformed or unsupported; names the offending key."""


def _fail(path: str, expected: str, found: Any) -> QuarkConfigError:
    return QuarkConfigError(f"{path}: expected {expected}, found {found!r}")


def _opt(d: Mapping[str, Any], key: str, path: str, kind: type | tuple[type, ...], expected: str) -> Any:
    """``d[key]`` or None when missing / null; a value of another type (bool never counts as int) raises."""
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(f"{path}.{key}", expected, value)
    if not isinstance(value, kind):
        raise _fail(f"{path}.{key}", expected, value)
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's quantization, as Quark's ``QTensorConfig.to_dict`` writes it.

    ``dtype`` is one of :data:`KNOWN_DTYPES`; ``qscheme`` one of :data:`KNOWN_QSCHEMES` or None. The other
    fields are kept as written (None when absent): ``round_method`` ("half_even", ...), ``scale_type``
    ("float", ...), ``scale_format`` ("e8m0" for OCP MX), ``scale_calculation_mode`` ("even", ...).
    ``observer_cls`` (calibration metadata, not compared) is kept only so that :meth:`to_dict` can write a
    spec amd-quark reloads: Quark refuses a quantized spec without a fitting observer.
    """

    dtype: str
    qscheme: str | None = None
    is_dynamic: bool | None = None
    symmetric: bool | None = None
    group_size: int | None = None
    ch_axis: int | None = None
    block_size: tuple[int, ...] | None = None
    round_method: str | None = None
    scale_type: str | None = None
    scale_format: str | None = None
    scale_calculation_mode: str | None = None
    mx_element_dtype: str | None = None
    observer_cls: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_dtype(self.dtype, "TensorSpec.dtype", required=True)
        _check_dtype(self.mx_element_dtype, "TensorSpec.mx_element_dtype", required=False)
        if self.qscheme is not None and self.qscheme not in KNOWN_QSCHEMES:
            raise _fail("TensorSpec.qscheme", f"one of {sorted(KNOWN_QSCHEMES)} or null", self.qscheme)
        if self.block_size is not None and not isinstance(self.block_size, tuple):
            object.__setattr__(self, "block_size", tuple(self.block_size))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str) -> TensorSpec:
        """Parse one spec dict; ``path`` is its key path, used in error messages.

        Other keys (``zero_point_type``, ``qat_spec``, ``is_scale_quant``, ...) are ignored. Quark < 1.0's
        legacy ``dynamic`` / ``axis`` keys are read when ``is_dynamic`` / ``ch_axis`` are absent.
        """
        if not isinstance(d, Mapping):
            raise _fail(path, "a dict", d)
        dtype = d.get("dtype")
        _check_dtype(dtype, f"{path}.dtype", required=True)
        qscheme = _opt(d, "qscheme", path, str, f"one of {sorted(KNOWN_QSCHEMES)} or null")
        if qscheme is not None and qscheme not in KNOWN_QSCHEMES:
            raise _fail(f"{path}.qscheme", f"one of {sorted(KNOWN_QSCHEMES)} or null", qscheme)
        mx_element_dtype = _opt(d, "mx_element_dtype", path, str, "a dtype string or null")
        _check_dtype(mx_element_dtype, f"{path}.mx_element_dtype", required=False)
        dyn_key = "is_dynamic" if "is_dynamic" in d or "dynamic" not in d else "dynamic"
        axis_key = "ch_axis" if "ch_axis" in d or "axis" not in d else "axis"
        block_size = d.get("block_size")
        if block_size is not None:
            if not isinstance(block_size, (list, tuple)) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in block_size
            ):
                raise _fail(f"{path}.block_size", "a list of ints or null", block_size)
            block_size = tuple(block_size)
        return cls(
            dtype=dtype,
            qscheme=qscheme,
            is_dynamic=_opt(d, dyn_key, path, bool, "true, false or null"),
            symmetric=_opt(d, "symmetric", path, bool, "true, false or null"),
            group_size=_opt(d, "group_size", path, int, "an int or null"),
            ch_axis=_opt(d, axis_key, path, int, "an int or null"),
            block_size=block_size,
            round_method=_opt(d, "round_method", path, str, "a string or null"),
            scale_type=_opt(d, "scale_type", path, str, "a string or null"),
            scale_format=_opt(d, "scale_format", path, str, "a string or null"),
            scale_calculation_mode=_opt(d, "scale_calculation_mode", path, str, "a string or null"),
            mx_element_dtype=mx_element_dtype,
            observer_cls=_opt(d, "observer_cls", path, str, "a string or null"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec as Quark writes it: every field, None as null, ``block_size`` as a list, Quark's key order.

        ``observer_cls``, when unknown, is Quark's default for the scheme (``PerBlockMXObserver`` for e8m0
        groups, ``PerTensorMinMaxObserver``, ...). Quark's other bookkeeping keys (``zero_point_type``, ...) are
        left out; Quark reads them with their defaults.
        """
        return {
            "dtype": self.dtype,
            "is_dynamic": self.is_dynamic,
            "qscheme": self.qscheme,
            "ch_axis": self.ch_axis,
            "group_size": self.group_size,
            "block_size": list(self.block_size) if self.block_size is not None else None,
            "symmetric": self.symmetric,
            "round_method": self.round_method,
            "scale_type": self.scale_type,
            "scale_format": self.scale_format,
            "scale_calculation_mode": self.scale_calculation_mode,
            "mx_element_dtype": self.mx_element_dtype,
            "observer_cls": self.observer_cls or _default_observer(self),
        }


def _default_observer(spec: TensorSpec) -> str | None:
    if spec.dtype in ("bfloat16", "float16"):
        return "PlaceholderObserver"
    if spec.qscheme == "per_group":
        return "PerBlockMXObserver" if spec.scale_format == "e8m0" or spec.dtype == "mx" else "PerGroupMinMaxObserver"
    return {
        "per_tensor": "PerTensorMinMaxObserver",
        "per_channel": "PerChannelMinMaxObserver",
        "per_block": "PerBlock2DMinMaxObserver",
    }.get(spec.qscheme)


def _check_dtype(value: Any, path: str, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or value not in KNOWN_DTYPES:
        raise _fail(path, f"one of {sorted(KNOWN_DTYPES)}", value)


@dataclass(frozen=True)
class LayerQuantConfig:
    """The quantization of one layer (Quark's ``QLayerConfig``); None means "not quantized"."""

    weight: TensorSpec | None = None
    input_tensors: TensorSpec | None = None
    output_tensors: TensorSpec | None = None
    bias: TensorSpec | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str) -> LayerQuantConfig:
        """Parse ``{weight, input_tensors, output_tensors, bias}``; each may be null, a dict or a list.

        A one-element list is unwrapped. Longer lists are Quark's sequential (multi-stage) specs, used by
        W4A8 and NVFP4; they are refused, as is an empty list. Other keys (``target_device``) are ignored.
        """
        if not isinstance(d, Mapping):
            raise _fail(path, "a dict with keys weight / input_tensors / output_tensors / bias", d)
        specs: dict[str, TensorSpec | None] = {}
        for key in _LAYER_KEYS:
            value, key_path = d.get(key), f"{path}.{key}"
            if isinstance(value, list):
                if len(value) > 1:
                    raise QuarkConfigError(
                        f"{key_path}: multi-spec (sequential) quantization is not supported: expected a dict, null "
                        f"or a one-element list, found a list of length {len(value)} (Quark's W4A8 / NVFP4 format)"
                    )
                if not value:
                    raise _fail(key_path, "a dict, null or a one-element list", value)
                value, key_path = value[0], f"{key_path}[0]"
            specs[key] = None if value is None else TensorSpec.from_dict(value, key_path)
        return cls(**specs)

    def to_dict(self) -> dict[str, Any]:
        """The four specs as Quark writes them (null where unquantized)."""
        return {key: (spec.to_dict() if (spec := getattr(self, key)) is not None else None) for key in _LAYER_KEYS}


def _layer_map(qc: Mapping[str, Any], key: str) -> dict[str, LayerQuantConfig]:
    value = qc.get(key)
    if value is None:  # quark < 1.0 wrote null for "none"
        return {}
    if not isinstance(value, Mapping):
        raise _fail(f"{_ROOT}.{key}", "a dict of name -> layer config", value)
    out = {}
    for name, cfg in value.items():
        if not isinstance(name, str):
            raise _fail(f"{_ROOT}.{key}", "string keys", name)
        out[name] = LayerQuantConfig.from_dict(cfg, f"{_ROOT}.{key}.{name}")
    return out


RESOLVE_BUDGET_S = 1.0
"""How long the ``re:`` entries of ``exclude`` may take, all patterns against all names together, to resolve
one layer (one :meth:`QuarkConfig.is_excluded` / :meth:`QuarkConfig.resolve` call). A crafted pattern can
backtrack for ever, and many patterns that each stay just under a bound of their own add up; real patterns
take microseconds per name."""

LOAD_BUDGET_S = 10.0
"""The default bound of :func:`exclude_match_budget`: the ``re:`` matching of every resolution made inside it
(one load of a whole checkpoint, one ``quarkmoe`` command), together. Each resolution stays within
:data:`RESOLVE_BUDGET_S` as well. Measured here: a real pattern costs ~7 µs per name with the time bound on, so
a 256-expert, 58-MoE-layer model (45k expert projections) with 5 ``re:`` entries spends ~1.6 s."""

MATCH_CACHE_SIZE = 1 << 16
"""The ``(pattern, name)`` results kept (a dict of that many entries at most): resolving a name again (the same
checkpoint loaded again, or its config parsed anew for every MoE block) costs nothing and no budget."""


@dataclass
class MatchBudget:
    """Seconds of ``re:`` exclude matching allowed (``seconds``) and spent so far (``spent``); ``scope`` names
    what it bounds in the error message ("one layer resolution", "one load")."""

    seconds: float
    scope: str
    spent: float = 0.0

    @property
    def remaining(self) -> float:
        return self.seconds - self.spent


_load_budget: contextvars.ContextVar[MatchBudget | None] = contextvars.ContextVar("exclude_load_budget", default=None)
_match_cache: dict[tuple[str, str], bool] = {}


@contextlib.contextmanager
def exclude_match_budget(seconds: float | None = None, scope: str = "one load") -> Iterator[MatchBudget]:
    """Bound the ``re:`` exclude matching of every resolution inside the ``with`` block by one budget of
    ``seconds`` (default :data:`LOAD_BUDGET_S`), whichever :class:`QuarkConfig` objects resolve (a loader parses
    ``config.json`` again for each MoE block). Entered inside another, it joins the outer budget. Thread- and
    task-local (a context variable). Yields the :class:`MatchBudget` (``spent`` says what matching took)."""
    outer = _load_budget.get()
    if outer is not None:
        yield outer
        return
    budget = MatchBudget(LOAD_BUDGET_S if seconds is None else seconds, scope)
    token = _load_budget.set(budget)
    try:
        yield budget
    finally:
        _load_budget.reset(token)


@functools.lru_cache(maxsize=1024)
def _compiled_pattern(pattern: str):
    import regex  # a dependency; imported where used (GPU runs from a source tree may lack it)

    return regex.compile(pattern)


def _exclude_matches(name: str, entry: str, budgets: tuple[MatchBudget, ...]) -> bool:
    """Whether one ``exclude`` entry matches ``name``; a ``re:`` entry's matching time is charged to every one of
    ``budgets`` and bounded by the smallest remainder."""
    if not entry.startswith("re:"):
        return name == entry or ("*" in entry and fnmatch.fnmatchcase(name, entry))
    cached = _match_cache.get((entry, name))
    if cached is not None:
        return cached
    limit = min(budgets, key=lambda b: b.remaining)
    start = time.perf_counter()
    try:
        if limit.remaining <= 0:
            raise TimeoutError
        matched = _compiled_pattern(entry[3:]).fullmatch(name, timeout=limit.remaining) is not None
    except TimeoutError:
        raise QuarkConfigError(
            f"{_ROOT}.exclude: pattern {entry!r} did not finish matching the layer name {name!r} within the "
            f"{limit.seconds:g} s that all 're:' patterns may take for {limit.scope} (catastrophic backtracking, or "
            "many slow patterns); expected patterns that match in bounded time"
        ) from None
    finally:
        elapsed = time.perf_counter() - start
        for budget in budgets:
            budget.spent += elapsed
    if len(_match_cache) >= MATCH_CACHE_SIZE:
        _match_cache.clear()
    _match_cache[entry, name] = matched
    return matched


@dataclass(frozen=True)
class QuarkConfig:
    """A checkpoint's Quark ``quantization_config``.

    ``raw`` is the dict as read (deep-copied); it takes no part in ``==`` or ``repr``. The dict fields are
    meant to be read-only.
    """

    global_quant_config: LayerQuantConfig | None
    layer_quant_config: dict[str, LayerQuantConfig] = field(default_factory=dict)
    layer_type_quant_config: dict[str, LayerQuantConfig] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    export: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> QuarkConfig:
        """Parse the whole HF ``config.json`` dict: its ``quantization_config`` must have ``quant_method: quark``."""
        if not isinstance(config, Mapping):
            raise _fail("config", "a dict (the parsed config.json)", config)
        if "quantization_config" not in config:
            raise QuarkConfigError(f"{_ROOT}: expected a Quark quantization_config, found no such key in config")
        qc = config["quantization_config"]
        if not isinstance(qc, Mapping):
            raise _fail(_ROOT, "a dict", qc)
        if qc.get("quant_method") != "quark":
            raise _fail(f"{_ROOT}.quant_method", "'quark'", qc.get("quant_method"))
        return cls.from_quantization_config(qc)

    @classmethod
    def from_quantization_config(cls, qc: Mapping[str, Any]) -> QuarkConfig:
        """Parse a ``quantization_config`` dict. ``export`` is required (as in vLLM); ``quant_method`` may be
        absent here, but when present it must be ``"quark"``. Unused keys (``kv_cache_quant_config``,
        ``algo_config``, ``version``, ...) stay only in ``raw``."""
        if not isinstance(qc, Mapping):
            raise _fail(_ROOT, "a dict", qc)
        if "quant_method" in qc and qc["quant_method"] != "quark":
            raise _fail(f"{_ROOT}.quant_method", "'quark'", qc["quant_method"])
        export = qc.get("export")
        if export is None:
            raise QuarkConfigError(
                f"{_ROOT}.export: expected the export block Quark writes ({{kv_cache_group, pack_method, "
                f"weight_format}}; vLLM requires it), found {'null' if 'export' in qc else 'no such key'}"
            )
        if not isinstance(export, Mapping):
            raise _fail(f"{_ROOT}.export", "a dict", export)
        glob = qc.get("global_quant_config")
        glob_path = f"{_ROOT}.global_quant_config"
        exclude = qc.get("exclude")
        if exclude is None:
            exclude = []
        if not isinstance(exclude, (list, tuple)):
            raise _fail(f"{_ROOT}.exclude", "a list of layer names / 're:' patterns", exclude)
        for i, entry in enumerate(exclude):
            if not isinstance(entry, str):
                raise _fail(f"{_ROOT}.exclude[{i}]", "a string", entry)
            if entry.startswith("re:"):
                import regex

                try:
                    re.compile(entry[3:])  # what vLLM compiles
                    regex.compile(entry[3:])  # what matches here, under a time bound
                except (re.error, regex.error) as e:
                    raise _fail(f"{_ROOT}.exclude[{i}]", f"a valid regular expression ({e})", entry) from None
        return cls(
            global_quant_config=None if glob is None else LayerQuantConfig.from_dict(glob, glob_path),
            layer_quant_config=_layer_map(qc, "layer_quant_config"),
            layer_type_quant_config=_layer_map(qc, "layer_type_quant_config"),
            exclude=tuple(exclude),
            export=copy.deepcopy(dict(export)),
            raw=copy.deepcopy(dict(qc)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> QuarkConfig:
        """Read a ``config.json`` (or a checkpoint directory holding one) and parse it with :meth:`from_hf_config`."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            config = read_json_file(path, "config.json")
        except QuarkMoEError as e:
            raise QuarkConfigError(str(e)) from None
        try:
            return cls.from_hf_config(config)
        except QuarkConfigError as e:
            raise QuarkConfigError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """A ``quantization_config`` dict as Quark writes it; ``from_quantization_config`` reads it back equal."""
        return {
            "quant_method": "quark",
            "export": copy.deepcopy(self.export),
            "global_quant_config": self.global_quant_config.to_dict() if self.global_quant_config is not None else None,
            "layer_quant_config": {k: v.to_dict() for k, v in self.layer_quant_config.items()},
            "layer_type_quant_config": {k: v.to_dict() for k, v in self.layer_type_quant_config.items()},
            "exclude": list(self.exclude),
        }

    def is_excluded(self, layer_name: str, child_names: Iterable[str] = ()) -> bool:
        """Whether ``layer_name`` is left unquantized by ``exclude``.

        An entry matches a name when it is equal to it, when it is ``re:<pattern>`` and ``re.fullmatch``
        matches the whole name (vLLM uses ``re.match``, which only anchors at the start), or when it contains
        ``*`` and ``fnmatch.fnmatchcase`` matches (Quark's own exclude semantics; vLLM compares it verbatim).
        MoE layers are all-or-nothing, as in vLLM: the layer is excluded when its own name matches, when any of
        ``child_names`` (e.g. ``model.layers.0.mlp.experts.3.gate_proj``) matches, or when a non-``re:``
        entry starts with ``layer_name + "."``.

        The ``re:`` entries' matching, all patterns against all names, is bounded by :data:`RESOLVE_BUDGET_S`
        and by the budget of an enclosing :func:`exclude_match_budget`; past either, a
        :class:`QuarkConfigError` names the pattern and the budget.
        """
        budgets = (MatchBudget(RESOLVE_BUDGET_S, "one layer resolution"),)
        if (load := _load_budget.get()) is not None:
            budgets += (load,)
        for entry in self.exclude:
            if _exclude_matches(layer_name, entry, budgets):
                return True
            if not entry.startswith("re:") and entry.startswith(layer_name + "."):
                return True
        return any(_exclude_matches(child, entry, budgets) for child in child_names for entry in self.exclude)

    def resolve(
        self, layer_name: str, layer_type: str = "FusedMoE", child_names: Iterable[str] = ()
    ) -> LayerQuantConfig | None:
        """The config of one layer, None when it is excluded (or when nothing applies: no global config).

        vLLM's priority: ``layer_quant_config`` in insertion order, first match wins (a key with ``*`` matches
        by ``fnmatch.fnmatch(layer_name, key)``, any other key when ``layer_name in key``: a substring test in
        that direction, as vLLM does); then ``layer_type_quant_config[layer_type]``; then ``global_quant_config``.
        """
        if self.is_excluded(layer_name, child_names):
            return None
        for key, cfg in self.layer_quant_config.items():
            if fnmatch.fnmatch(layer_name, key) if "*" in key else layer_name in key:
                return cfg
        if layer_type in self.layer_type_quant_config:
            return self.layer_type_quant_config[layer_type]
        return self.global_quant_config

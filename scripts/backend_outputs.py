"""Every backend's output on fixed inputs, for comparing two versions of the library bit for bit.

    PYTHONPATH=<tree> python scripts/backend_outputs.py OUT.npz

Exports a seeded float Mixtral-style layer in several schemes (the library's own exporter), loads each with
``QuarkMoEBlock.from_checkpoint`` (on a GPU that lays MX weights out for the kernels) and runs every backend
that accepts it at a few token counts; writes the outputs' bytes to ``OUT.npz`` (keys
``scheme/backend/T``). Run it under two versions and compare the files with ``--compare A.npz B.npz``.
"""

from __future__ import annotations

import sys
import tempfile
import warnings

import numpy as np

SCHEMES = (
    "w_mxfp4",
    "w_mxfp4_a_mxfp4",
    "w_mxfp6_e3m2",
    "w_mxfp6_e2m3_a_fp8",
    "w8a8_int8_channel_dynamic_token",
    "w8a8_int8_tensor_static",
    "w8a8_fp8_tensor_static",
    "w8a8_fp8_channel_dynamic_token",
)
BACKENDS = ("emulation", "pallas", "triton")
TOKENS = (1, 64, 512)
AMAX = {layer: {"w13": np.array([3.0, 3.5, 4.0, 3.2]), "w2": np.array([0.05, 0.04, 0.06, 0.05])} for layer in (0, 1)}


def outputs(path: str) -> None:
    import jax
    import jax.numpy as jnp

    from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
    from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
    from quarkmoe_jax.nn import QuarkMoEBlock

    work = tempfile.mkdtemp()
    source = write_float_checkpoint(f"{work}/float", "mixtral", hidden_size=256, intermediate_size=192, seed=3)
    x_all = jax.random.normal(jax.random.key(7), (max(TOKENS), 256), jnp.float32).astype(jnp.bfloat16)
    result = {}
    for scheme in SCHEMES:
        folder = export_quark_checkpoint(source, f"{work}/{scheme}", scheme, input_amax=AMAX)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block = QuarkMoEBlock.from_checkpoint(folder, 1)
        for backend in BACKENDS:
            for t in TOKENS:
                try:
                    y = block(x_all[:t], backend=backend)
                except NotImplementedError as e:
                    print(f"{scheme:34} {backend:9} T={t:4}: not taken ({str(e)[:60]})")
                    continue
                result[f"{scheme}/{backend}/{t}"] = np.asarray(y.astype(jnp.float32)).view(np.uint32)
        np.savez(path, **result)  # after every scheme, so a run cut short still leaves what it finished
        print(f"{scheme}: {len(result)} outputs so far", flush=True)
    print(f"{len(result)} outputs -> {path}")


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    keys = sorted(set(a) | set(b))
    if "--common" in sys.argv:  # compare what both runs finished
        keys = sorted(set(a) & set(b))
    bad = 0
    for key in keys:
        if key not in a or key not in b:
            print(f"{key}: only in {'B' if key not in a else 'A'}")
            bad += 1
        elif not np.array_equal(a[key], b[key]):
            differ = int((a[key] != b[key]).sum())
            print(f"{key}: {differ} of {a[key].size} values differ")
            bad += 1
    print(f"{len(keys) - bad} of {len(keys)} outputs bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    outputs(sys.argv[1])

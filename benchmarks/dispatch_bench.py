"""Host dispatch cost of a jitted call that takes a whole model's parameters (what every engine step pays).

Compares a no-op ``jax.jit`` given the model's ``nnx.State`` (flattened by nnx's Python callbacks at every call)
with one given the parameters flattened once (a flat list, their structure one static argument hashed once:
what :class:`quarkmoe_jax.serving.Engine` passes). The model is a synthetic Mixtral-shaped one with
``--layers`` decoder layers at tiny sizes (dispatch depends on the number of leaves, not their sizes).

    python benchmarks/dispatch_bench.py --layers 32
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
from quarkmoe_jax.models import from_pretrained


class _Static:
    """Hashed once, compared by identity (as the engine's step structure)."""

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other


@jax.jit
def _with_state(graphdef, state, x):
    return x + 1


@functools.partial(jax.jit, static_argnames=("structure",))
def _with_leaves(leaves, x, structure):
    return x + 1


def _per_call_us(call, calls: int, repeats: int = 5) -> float:
    for _ in range(5):
        jax.block_until_ready(call())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_float_checkpoint(
            pathlib.Path(tmp) / "m", "mixtral", num_layers=args.layers, hidden_size=64, intermediate_size=32
        )
        model = from_pretrained(path, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    structure = _Static((graphdef, treedef))
    x = jnp.ones(4)
    with_state = _per_call_us(lambda: _with_state(graphdef, state, x), args.calls)
    with_leaves = _per_call_us(lambda: _with_leaves(leaves, x, structure=structure), args.calls)
    print(f"{jax.devices()[0].device_kind}, {args.layers} layers, {len(leaves)} parameter leaves:")
    print(f"  nnx.State per call: {with_state:8.1f} us;  flat leaves + static structure: {with_leaves:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

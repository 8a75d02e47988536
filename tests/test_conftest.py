"""The suite's own safeguards (tests/conftest.py) do what they claim."""

import gc

import jax
import jax.numpy as jnp
import pytest

import quarkmoe_jax as qm
from tests.conftest import memory_map_count, memory_map_limit


@pytest.mark.skipif(memory_map_count() is None, reason="needs Linux's /proc/self/maps")
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's JIT code is what takes the mappings")
def test_clearing_jax_caches_releases_the_memory_maps_of_compiled_code():
    """The map-limit fixture relies on jax.clear_caches() unmapping compiled code."""
    assert memory_map_limit() > 1000
    fake_quant = jax.jit(qm.quant_dequant, static_argnums=(1, 2))
    jax.clear_caches()  # so that nothing below is already compiled
    gc.collect()
    before = memory_map_count()
    for rows in (32, 64, 96, 128):  # 12 programs like the suite's, a few dozen kernels each
        for fmt in qm.MX_FORMATS:
            fake_quant(jnp.linspace(-3, 3, rows * 64).reshape(rows, 64), fmt, "even").block_until_ready()
    compiled = memory_map_count()
    jax.clear_caches()
    gc.collect()
    cleared = memory_map_count()
    assert compiled > before + 100, (before, compiled)
    assert cleared < compiled - (compiled - before) // 2, (before, compiled, cleared)

"""Shared test set-up: CPU-only, deterministic, small shapes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key(request):
    """A PRNG key seeded from the test's name, so every test draws its own fresh, reproducible inputs."""
    return jax.random.key(abs(hash(request.node.nodeid)) % (2**31))

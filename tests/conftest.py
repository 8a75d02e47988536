"""Shared test set-up: CPU-only by default, small shapes, fresh but reproducible random inputs."""

import os
import random
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Host devices for the sharded-MoE tests: tests/test_sharding.py reruns itself in a process with
# QUARKMOE_HOST_DEVICES=8, so that the rest of the suite keeps the single CPU device it was written for.
if os.environ.get("QUARKMOE_HOST_DEVICES"):
    jax.config.update("jax_num_cpu_devices", int(os.environ["QUARKMOE_HOST_DEVICES"]))

# Every run draws fresh inputs; the run's seed is printed in pytest's header so that a failure can be
# replayed exactly with QUARKMOE_TEST_SEED=<seed>.
RUN_SEED = int(os.environ.get("QUARKMOE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"quarkmoe test seed: QUARKMOE_TEST_SEED={RUN_SEED}"


@pytest.fixture
def key(request):
    """A PRNG key from the run's seed and the test's id: fresh each run, reproducible from the header."""
    return jax.random.key((RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # also under -q, where the header is not shown
    terminalreporter.write_line(f"quarkmoe test seed: QUARKMOE_TEST_SEED={RUN_SEED}")


def pytest_generate_tests(metafunc):
    """A test class with a ``schemes`` attribute (the backend suites) gets one test per scheme for every test
    that takes a ``scheme`` argument, so the schemes run (and fail, and spread over xdist workers) apart."""
    schemes = getattr(metafunc.cls, "schemes", None)
    if schemes and "scheme" in metafunc.fixturenames:
        metafunc.parametrize("scheme", schemes)

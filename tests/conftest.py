"""Shared test set-up: CPU-only by default, small shapes, fresh but reproducible random inputs."""

import gc
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import warnings
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the `quarkmoe` executables the tests start keep their compiled programs here, shared by the suite's workers
# and runs, not in the user's ~/.cache (cli.use_compilation_cache); the pytest processes themselves keep none
os.environ.setdefault(
    "QUARKMOE_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), f"quarkmoe-tests-{os.getuid()}", "jax-cache")
)

import jax  # noqa: E402
import pytest  # noqa: E402

# Host devices for the sharded-MoE tests: tests/test_sharding.py reruns itself in a process with
# QUARKMOE_HOST_DEVICES=8, so that the rest of the suite keeps the single CPU device it was written for.
if os.environ.get("QUARKMOE_HOST_DEVICES"):
    jax.config.update("jax_num_cpu_devices", int(os.environ["QUARKMOE_HOST_DEVICES"]))

# Every run draws fresh inputs; the run's seed is printed in pytest's header so that a failure can be
# replayed exactly with QUARKMOE_TEST_SEED=<seed>.
RUN_SEED = int(os.environ.get("QUARKMOE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def memory_map_count() -> int | None:
    """Memory mappings of this process (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def memory_map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


@pytest.fixture(autouse=True)
def _compiled_code_stays_under_the_map_limit():
    """XLA:CPU keeps every executable a process compiled, and their JIT code takes three memory mappings per
    kernel. The whole suite in one process passes Linux's ``vm.max_map_count`` (65530 by default), where
    the next compile's mmap fails and XLA segfaults (seen in CI inside test_pallas). Past half the limit,
    drop the compiled executables; later tests recompile what they need."""
    yield
    count, threshold = memory_map_count(), memory_map_limit() // 2
    if count is not None and count > threshold:
        jax.clear_caches()
        gc.collect()
        after = memory_map_count()
        if after > threshold:  # something else holds the mappings: clearing after every test would not help
            message = f"{after} memory mappings after clearing jax's caches (limit {2 * threshold})"
            warnings.warn(message, stacklevel=2)


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


def run_on_8_host_devices(test_file: str) -> None:
    """Run ``test_file``'s tests in a fresh process with 8 host devices (the device count is fixed when JAX
    starts; the rest of the suite keeps one), with this run's seed; fail with its output if any fails or skips."""
    env = {**os.environ, "QUARKMOE_HOST_DEVICES": "8", "QUARKMOE_TEST_SEED": str(RUN_SEED), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not test_on_8_host", test_file]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, result.stdout[-2000:]

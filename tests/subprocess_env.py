"""The environment for a test's `nested-jax` subprocess: the CPU backend with ``devices``
simulated devices and the suite's compile flags (tests/conftest.py: LLVM at -O0), so a
subprocess compiles as fast as the test that launched it."""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_env(devices: int = 1) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env

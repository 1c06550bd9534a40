"""Test-wide JAX settings (equinox/nanodo style).

8 simulated CPU devices for sharding tests; rank promotion raises; float64 is
enabled only inside tests that ask for it via the ``x64`` fixture; XLA's CPU backend
compiles without LLVM optimisation, and compiled programs are cached on disk for the run.
"""

import os
import shutil
import tempfile

from tests.subprocess_env import FAST_COMPILE

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Compiling dominates the suite (small programs, most run once): LLVM at -O0 takes 40-45% off a
# compile-heavy test (tests/models/test_hope.py::test_causality 57 -> 31 s, one core).  It
# changes code generation only: XLA's CPU fast-math stays off, so every tolerance still holds
# and a bitwise comparison compares programs built with the same flags.
# Subprocesses get the same flag (tests/subprocess_env.py).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs: the resume and CLI tests start several `nested-jax`
# subprocesses on one config, and the xdist workers build the same tiny models.  A disk cache
# shared by all of them (environment variables, so subprocesses inherit it) compiles each once:
# tests/train/test_resume.py 252-293 -> 191 s on an empty cache.  The key covers the program,
# the flags and the jax/XLA versions.  The controller makes one directory per run (the workers
# inherit it) and removes it at the end, so nothing accumulates; no size cap (jax's cap needs
# the filelock package, and without it every read fails with a warning).
_OWN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="nested_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test (exactness claims)."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


def pytest_collection_modifyitems(config, items):
    """The 900 s per-test limit (pyproject.toml) guards the default run against hangs; tests
    marked slow train for minutes on purpose and get an hour."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(3600))


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

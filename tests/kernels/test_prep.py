"""The kernels' split of gated_delta_dual.chunk (prep + chunk_math loop) is the XLA dual form, float64.

Pure XLA (no Pallas): prep.prep + scan_xla.scan through memory/pallas.py's own plumbing
(vjp.make_core(kernel="xla-scan")) against memory.apply(path="dual"), every rule and
objective; and the blocked triangular solve against a direct solve.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm
from nested_jax.kernels import plan
from nested_jax.kernels.triangular import solve_unit_lower
from nested_jax.memory import pallas
from tests.kernels.helpers import inputs, named_errs, rel_err

TOL = 1e-11
RULES = {"gd": nm.GD, "titans": nm.TITANS, "dgd": nm.DGD, "dgd_all": nm.Rule(True, True, True),
         "dgd_nomom": nm.Rule(False, True)}


@pytest.mark.parametrize("C", [8, 16, 48, 64])
def test_blocked_solve(x64, seed, C):
    keys = jax.random.split(jax.random.key(seed), 2)
    lower = jnp.tril(0.3 * jax.random.normal(keys[0], (C, C), jnp.float64), -1)
    rhs = jax.random.normal(keys[1], (C, 5), jnp.float64)
    mm = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    want = np.linalg.solve(np.eye(C) + np.asarray(lower), np.asarray(rhs))
    assert rel_err(solve_unit_lower(lower, rhs, mm), want) < 1e-12


def _xla_scan(level, state, q, k, v, gates, C):
    """memory/pallas._local with the Pallas core replaced by scan_xla (same plumbing)."""
    p = plan.Plan("xla-scan", dk=level.memory.dk, dv=level.memory.dv, bv=level.memory.dv)
    dual = lambda st, q, k, v, g, c: nm.apply(level, st, q, k, v, g, chunk_size=c, path="dual")
    return pallas._local(level, p, C, dual, state, q, k, v, gates)


FAST = {("dgd", "l2", False), ("titans", "dot", False), ("dgd_all", "l2", False),
        ("dgd_nomom", "l2", True), ("gd", "dot", True)}
CASES = [(r, o, s) if (r, o, s) in FAST else pytest.param(r, o, s, marks=pytest.mark.slow)
         for r in RULES for o, s in (("l2", False), ("dot", False), ("l2", True), ("dot", True))]


@pytest.mark.parametrize("rule,obj,self_target", CASES)
def test_prep_and_loop_equal_dual_form(x64, seed, rule, obj, self_target):
    level = nm.Level(nm.LinearMemory(6, 6), obj, RULES[rule], self_target=self_target)
    args = inputs(level, seed, T=37, dtype=jnp.float64)
    got = jax.jit(lambda *a: _xla_scan(level, *a, 16))(*args)
    want = jax.jit(lambda *a: nm.apply(level, *a, chunk_size=16, path="dual"))(*args)
    assert rel_err(got, want) < TOL, named_errs(got, want)

"""optax's own test battery for contributed optimizers, run on every alias of nested_jax.optim.

optax ships the common tests of ``optax.contrib`` in ``optax/contrib/_common_test.py``
(convergence on a parabola, Rosenbrock, a matrix and a mixed vector/matrix target,
``inject_hyperparams``, dtype preservation, ``MultiSteps``, state stability under
``lax.cond``, extra update arguments without recompiling, schedules). Nothing is
copied: every case optax generates for ``optax.contrib.muon`` (the contributed
optimizer closest to ours) is re-run with one of our aliases in its place, through
the battery's own test functions, so a new optax case reaches us on upgrade.

Learning rates, as optax picks one per optimizer: 1e-2 (optax's for muon) unless
listed. ``LR``: M3 gets 3e-4 in every case: its slow direction ``NS_T(M2 / D)`` has
unit spectral norm however small ``M2`` is, and stays fixed for a chunk of 100
steps, so near a minimum it overshoots by ~``100 * lr`` before the next chunk turns
it (at 1e-2 it ends 0.09 off the matrix parabola; at 3e-4, 0.011, the tolerance
is 0.03). ``ROSENBROCK_LR``: the momentum memories take steps of ``lr / (1 - 0.9)``
and DGD (plain gradient descent without layer inputs) steps of ``lr``; Rosenbrock's
curvature at the minimum is ~1000, so they diverge at 1e-2 and converge at 1e-3
(errors 1e-6, and 8e-5 for DGD).
"""

import inspect
from typing import Any, NamedTuple

import pytest
from optax.contrib import _common_test as battery

import nested_jax.optim as no

LR = {"m3": 3e-4}

# The aliases under test, by their name in the battery (with their defaults; both
# delta-momentum forms run in tests/optim/test_optim_interop.py).
ALIASES = {
    name: getattr(no, name)
    for name in (
        "momentum_memory",
        "preconditioned_momentum",
        "delta_momentum",
        "deep_momentum",
        "newton_schulz_momentum",
        "adam_memory",
        "m3",
        "dgd",
    )
}

ROSENBROCK_LR = {
    "momentum_memory": 1e-3,
    "delta_momentum": 1e-3,
    "deep_momentum": 1e-3,
    "dgd": 1e-3,
}


class Case(NamedTuple):
    test: str  # the battery's test function
    params: dict  # its parameters, less opt_name / opt_kwargs
    fn: Any

    def __str__(self):
        extra = [
            getattr(v, "__name__", str(v)).removeprefix("_setup_")
            for k, v in self.params.items()
            if k not in ("wrapper_name", "wrapper_kwargs")
        ]
        return "-".join([self.test.removeprefix("test_"), *extra])


def _muon_cases() -> list[Case]:
    """The battery's cases for muon: (test function, its parameters), read off the
    methods absl's parameterized generated (each closes over its parameters)."""
    cases = []
    for _, method in sorted(vars(battery.ContribTest).items()):
        fn = getattr(method, "__wrapped__", None)
        if fn is None:
            continue
        params = inspect.getclosurevars(method).nonlocals.get("testcase_params")
        if isinstance(params, dict) and params.get("opt_name") == "muon":
            rest = {k: v for k, v in params.items() if k not in ("opt_name", "opt_kwargs")}
            cases.append(Case(fn.__name__, rest, fn))
    assert len(cases) >= 16, "optax's battery no longer exposes its muon cases this way"
    return cases


CASES = _muon_cases()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("alias", list(ALIASES))
def test_optax_battery(alias, case, monkeypatch):
    lookup = battery._get_opt_factory
    monkeypatch.setattr(
        battery, "_get_opt_factory", lambda n: ALIASES[n] if n in ALIASES else lookup(n)
    )
    lr = LR.get(alias, 1e-2)
    if case.params.get("target") is battery._setup_rosenbrock:
        lr = ROSENBROCK_LR.get(alias, lr)
    # A unittest.TestCase instance for self.subTest / skipTest / assertEmpty.
    self = battery.ContribTest(methodName="run")
    case.fn(self, opt_name=alias, opt_kwargs={"learning_rate": lr}, **case.params)


def test_every_alias_is_in_the_battery():
    aliases = {
        name
        for name in no.__all__
        if not name.startswith("scale_by")
        and callable(getattr(no, name))
        and next(iter(inspect.signature(getattr(no, name)).parameters), None) == "learning_rate"
    }
    assert aliases == set(ALIASES)

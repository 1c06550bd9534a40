"""One interoperability battery run for every optimizer of nested_jax.optim.

Modelled on optax's ``contrib/_common_test.py``: extra arguments (without
recompiling), dtype preservation (bf16 stays bf16), ``inject_hyperparams``
with a hyperparameter changed mid-training, schedules, ``MultiSteps``, state
structure/dtype/sharding stable under jit for 10 steps on 8 FSDP devices;
plus ``optax.chain``, ``optax.partition`` and ``flax.nnx.Optimizer``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optim_cases import CASES

import nested_jax.optim as no

STEPS = 10


def make_params(dtype=jnp.float32):
    """A matrix, a stacked [L, D, F] weight and a vector: every kind of leaf."""
    rng = np.random.default_rng(0)  # numpy: no per-shape compilations in the tests
    shapes = {"w": (32, 8), "stack": (2, 32, 8), "b": (32,)}
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def loss_fn(params):
    return sum(jnp.sum((p.astype(jnp.float32) - 0.5) ** 2) for p in jax.tree.leaves(params))


def grads_at(params, k):
    """Deterministic, step-dependent gradients (so that memories differ per step)."""
    g = jax.grad(loss_fn)(params)
    return jax.tree.map(lambda x: (x * (1 + 0.1 * k)).astype(x.dtype), g)


def run(opt, params, steps, pre=lambda g: g):
    """``steps`` jitted steps (one compilation); returns params, state, all updates."""

    @jax.jit
    def step(params, state, k):
        u, state = opt.update(pre(grads_at(params, k)), state, params)
        return optax.apply_updates(params, u), state, u

    state = opt.init(params)
    out = []
    for k in range(steps):
        params, state, u = step(params, state, jnp.asarray(float(k)))
        out.append(u)
    return params, state, out


def assert_trees_close(a, b, rtol, atol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_inject_hyperparams_and_schedules(case, x64):
    # Injected, with the learning rate cut after 3 steps by assignment, equals the
    # plain optimizer given the piecewise-constant schedule that does the same.
    params = make_params(jnp.float64)
    lr0 = case.kwargs["learning_rate"]
    sched = optax.piecewise_constant_schedule(lr0, {3: 0.25})
    _, _, ref = run(case.build(learning_rate=sched), params, 5)
    opt_inj = optax.inject_hyperparams(case.factory)(**case.kwargs)
    update = jax.jit(opt_inj.update)
    state, p, got = opt_inj.init(params), params, []
    for k in range(5):
        if k == 3:
            state.hyperparams["learning_rate"] = jnp.asarray(0.25 * lr0, jnp.float64)
        u, state = update(grads_at(p, jnp.asarray(float(k))), state, p)
        p = optax.apply_updates(p, u)
        got.append(u)
    assert_trees_close(got, ref, rtol=1e-12, atol=1e-15)


MIXED = {"vector": (8,), "matrix": (8, 16), "stacked": (3, 8, 8), "scalar": ()}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_inject_hyperparams_needs_no_static_args_on_params_of_any_rank(case, x64):
    # As for optax.contrib.muon: the alias as it is, a tree of mixed ranks, jitted
    # init and update; the injected optimizer equals the plain one.
    rng = np.random.default_rng(3)
    params = {k: jnp.asarray(rng.standard_normal(s)) for k, s in MIXED.items()}
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params) for _ in range(4)
    ]
    plain = case.build()
    injected = optax.inject_hyperparams(case.factory)(**case.kwargs)
    got, ref = [], []
    for opt, out in ((injected, got), (plain, ref)):
        state, update = jax.jit(opt.init)(params), jax.jit(opt.update)
        for g in grads:
            u, state = update(g, state, params)
            out.append(u)
    assert_trees_close(got, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_extra_args_dtype_and_no_recompilation(case, dtype):
    opt = case.build()
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, unexpected_extra_arg_nobody_expects=1)
        return optax.apply_updates(params, updates), state, updates

    params = make_params(dtype)
    state = opt.init(params)
    state_dtypes = [x.dtype for x in jax.tree.leaves(state)]
    for _ in range(3):
        params, state, updates = step(params, state)
    assert len(traces) == 1  # extra args accepted, state types stable: no retrace
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.dtype == p.dtype == dtype
    assert [x.dtype for x in jax.tree.leaves(state)] == state_dtypes
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_multisteps_accumulates_then_steps(case, x64):
    params = make_params(jnp.float64)
    opt = optax.MultiSteps(case.build(), every_k_schedule=3, accumulator_dtype=jnp.float64)
    state = opt.init(params)
    grads = [grads_at(params, k) for k in range(3)]
    update = jax.jit(opt.update)
    for g in grads[:2]:
        u, state = update(g, state, params)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
    u, state = update(grads[2], state, params)
    # The inner optimizer sees the mean of the 3 mini-batch gradients, once.
    inner = case.build()
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    ref, _ = inner.update(mean, inner.init(params), params)
    assert_trees_close(u, ref, rtol=1e-12, atol=1e-15)


def _fsdp_mesh(axis_type=jax.sharding.AxisType.Auto):
    return jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))


def _fsdp_params(mesh):
    specs = {"w": P("fsdp", None), "stack": P(None, "fsdp", None), "b": P("fsdp")}
    params = make_params()
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_state_structure_dtype_sharding_stable_under_jit(case, axis_type):
    # Explicit is jax.make_mesh's default axis type; Auto leaves it to GSPMD.
    mesh = _fsdp_mesh(getattr(jax.sharding.AxisType, axis_type))
    params = _fsdp_params(mesh)
    opt = case.build()
    # Eager init keeps the params' shardings (so does a jitted init under explicit
    # axes; under auto axes a jitted init needs out_shardings, as for any optax
    # optimizer, since zeros do not depend on the params' values).
    state = opt.init(params)

    def layout(tree):
        return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]

    def same_layout(tree, ref_tree):
        assert layout(tree) == layout(ref_tree)
        for x, r in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree), strict=True):
            assert x.sharding.is_equivalent_to(r.sharding, x.ndim), (case, x.shape)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state, updates

    def sharded_like(x, p):
        if x.shape == p.shape:  # DMGD's small MLP weights are replicated on purpose
            assert x.sharding.is_equivalent_to(p.sharding, p.ndim), case
        return x

    # Param-shaped state (the memories) is sharded like the params from init on;
    # so are the updates.
    optax.tree.map_params(opt, sharded_like, state, params)
    params, state, updates = step(params, state)
    ref_state, ref_params = state, params
    optax.tree.map_params(opt, sharded_like, state, params)
    jax.tree.map(sharded_like, updates, params)
    for _ in range(STEPS - 1):
        params, state, updates = step(params, state)
        same_layout(state, ref_state)
        same_layout(params, ref_params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    if axis_type == "Explicit":
        return
    # Same numbers as on one device (float32: collectives reorder sums).
    single = make_params()
    single_state = opt.init(single)
    for _ in range(STEPS):
        single, single_state, _ = step(single, single_state)
    assert_trees_close(params, single, rtol=1e-4, atol=1e-5)


def _clip(g, max_norm=1.0):
    """Global-norm clipping written out (same operation order as optax's)."""
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    return jax.tree.map(lambda x: jnp.where(norm < max_norm, x, (x / norm) * max_norm), g)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_in_chain(case, x64):
    params = make_params(jnp.float64)
    chained = optax.chain(optax.clip_by_global_norm(1.0), case.build())
    _, _, got = run(chained, params, 3)
    _, _, ref = run(case.build(), params, 3, pre=_clip)
    assert_trees_close(got, ref, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_in_partition(case, x64):
    params = make_params(jnp.float64)
    labels = {"w": "deep", "stack": "deep", "b": "adam"}
    opt = optax.partition({"deep": case.build(), "adam": optax.adam(1e-2)}, labels)
    _, _, got = run(opt, params, 3)
    # The "deep" part equals the optimizer run on that sub-tree alone.
    sub = {"w": params["w"], "stack": params["stack"]}
    _, _, ref = run(case.build(), sub, 3)
    for k in range(3):
        assert_trees_close({"w": got[k]["w"], "stack": got[k]["stack"]}, ref[k], rtol=1e-13)


class _Tiny(nnx.Module):
    def __init__(self):
        rng = np.random.default_rng(1)
        self.linear = nnx.Linear(8, 16, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        self.stack = nnx.Param(jnp.asarray(rng.standard_normal((2, 16, 16)) / 4))

    def __call__(self, x):
        h = self.linear(x)
        for i in range(2):
            h = jnp.tanh(h @ self.stack[i])
        return h


@pytest.mark.parametrize("case", CASES, ids=str)
def test_in_flax_nnx_optimizer(case, x64):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8)))
    model = _Tiny()
    loss = lambda m: jnp.mean(m(x) ** 2)
    opt = case.build()
    pure_p = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # copies, before any update
    pure_g = nnx.to_pure_dict(nnx.grad(loss)(model))
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    train_step(model, optimizer)
    # Same update as the bare transform on the pure param tree.
    u, _ = opt.update(pure_g, opt.init(pure_p), pure_p)
    expected = optax.apply_updates(pure_p, u)
    assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), expected, rtol=1e-12)
    l1 = loss(model)
    for _ in range(3):
        train_step(model, optimizer)
    assert loss(model) < l1


def test_every_public_alias_is_in_the_battery():
    names = {c.factory.__name__ for c in CASES}
    required = {
        "momentum_memory",
        "preconditioned_momentum",
        "delta_momentum",
        "deep_momentum",
        "m3",
        "dgd",
        "newton_schulz_momentum",
        "adam_memory",
    }
    assert required <= names
    assert all(hasattr(no, n) for n in names)

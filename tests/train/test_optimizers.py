"""Optimizers by name (the registry of nested_jax/train/optimizers.py), the schedule, and the
clipping in front of every optimizer."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nested_jax.optim as deep
from nested_jax.train import config as config_lib
from nested_jax.train import optimizers
from nested_jax.train.config import OptimConfig, TrainConfig

PARAMS = {"embed": {"embedding": jnp.ones((16, 8))}, "mlp": {"kernel": jnp.ones((8, 8))},
          "norm": {"scale": jnp.ones((8,))}}
REGISTERED = sorted(optimizers.OPTIMIZERS)


def _one_update(cfg):
    tx = optimizers.build(cfg, total_steps=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    updates, _ = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
    return updates


# The registered names run in test_every_field_changes_the_update.
@pytest.mark.parametrize("name", ["nadamw", "optax:adamw", "nested_jax.optim:adam_memory"])
def test_other_optimizers_build_and_update(name):
    updates = _one_update(OptimConfig(name=name, warmup_steps=0))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_m3_orthogonalizes_hidden_matrices_only():
    """As for Muon, the embedding (tied LM head) and vectors skip Newton-Schulz under M3: the
    trainer's M3 equals nested_jax.optim.m3 with dimension numbers on the hidden matrix only."""
    dims = optimizers._ns_dimensions(PARAMS)
    assert dims["embed"]["embedding"] is None and dims["norm"]["scale"] is None
    assert dims["mlp"]["kernel"] == deep.DimensionNumbers(0, 1)
    cfg = OptimConfig(name="m3", warmup_steps=0, schedule="constant", grad_clip=0.0,
                      weight_decay=0.0)
    got = _one_update(cfg)
    tx = deep.m3(optimizers.schedule(cfg, 10), weight_decay=0.0,
                 weight_dimension_numbers={"embed": {"embedding": None},
                                           "mlp": {"kernel": deep.DimensionNumbers(0, 1)},
                                           "norm": {"scale": None}})
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    want, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


@pytest.mark.parametrize("model", ["hope", "titans", "hope_attention", "transformer"])
def test_newton_schulz_acts_on_every_models_matrices_and_nothing_else(model):
    """Each model's parameters as the trainer hands them to optax (``nnx.split``): Muon and
    M3 orthogonalize the same tensors, matrix by matrix over the last two axes (stacks of
    per-head memories included), and never the embedding, a vector, or a stack of vectors
    (``VECTOR_STACKS``: a [3, H] bias orthogonalized gets a spectral-norm-1 update and blew
    HopeLM up).  A tensor of 2+ axes that is neither a ``kernel``, a CMS level's weight, a
    memory's initial state nor a named vector stack fails here: it needs a decision."""
    from flax import nnx

    from nested_jax import models

    abstract = models.abstract_model(model, models.make_config(model, "tiny"))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    muon, ns = optimizers._muon_dimensions(params), optimizers._ns_dimensions(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    is_leaf = lambda x: x is None or isinstance(x, (deep.DimensionNumbers,
                                                    optax.contrib.MuonDimensionNumbers))
    muon_leaves = jax.tree.leaves(muon, is_leaf=is_leaf)
    ns_leaves = jax.tree.leaves(ns, is_leaf=is_leaf)
    assert len(muon_leaves) == len(ns_leaves) == len(flat)
    matrices = ("kernel", "up", "gate", "down", "coupled_w1", "coupled_w2", "memory_w",
                "memory_w1", "memory_w2", "W1", "W2")
    for (path, p), m, n in zip(flat, muon_leaves, ns_leaves, strict=True):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        name = jax.tree_util.keystr(path)
        if m is None:
            assert n is None, name
            assert (p.ndim < 2 or "embedding" in names
                    or set(names) & optimizers.VECTOR_STACKS), name
        else:
            assert set(names) & set(matrices), f"{name} {p.shape}: a matrix or a vector stack?"
            assert (m.reduction_axis, m.output_axis) == (p.ndim - 2, p.ndim - 1), name
            assert n == deep.DimensionNumbers(p.ndim - 2, p.ndim - 1), name
    if model == "hope":  # each exception names a real tensor of the self-modifying layer
        excluded = set()
        for path, p in flat:
            names = {str(getattr(k, "key", getattr(k, "name", ""))) for k in path}
            if p.ndim >= 2 and "embedding" not in names:
                assert optimizers.hidden_matrix(path, p) != bool(names & optimizers.VECTOR_STACKS)
                excluded |= names & optimizers.VECTOR_STACKS
        assert excluded == optimizers.VECTOR_STACKS


@pytest.mark.parametrize("name", ["muon", "m3"])
def test_ns_skip_takes_the_named_matrices_off_newton_schulz(name):
    """``optim.kwargs.ns_skip=['levels']`` on HopeLM, through the trainer's own build: a CMS
    level's matrix gets the Adam-like step (the first is -c sign(g)), every other hidden matrix
    the same orthogonalized update as without it."""
    from flax import nnx

    from nested_jax import models

    abstract = models.abstract_model("hope", models.make_config("hope", "tiny"))
    _, shapes, _ = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                          shapes)
    # |g| >= 1: the epsilons of Adam's and M3's denominators are negligible everywhere.
    grads = jax.tree.map(lambda p: jnp.asarray(
        (1 + np.abs(z := rng.standard_normal(p.shape))) * np.sign(z), jnp.float32), shapes)
    level = lambda t: t["blocks"][0]["cms"]["levels"][0]["up"]
    proj = lambda t: t["blocks"][0]["mixer"]["q_proj"]["kernel"]

    def first_update(**kwargs):
        cfg = OptimConfig(name=name, learning_rate=1e-2, warmup_steps=0, schedule="constant",
                          grad_clip=0.0, weight_decay=0.0, kwargs=kwargs)
        tx = optimizers.build(cfg, 10)
        return tx.update(grads, tx.init(params), params)[0]

    def sign_like(u, g):  # Adam's first step: -c sign(g), one magnitude c for every entry
        u, g = np.asarray(u), np.asarray(g)
        return np.ptp(np.abs(u)) < 1e-3 * np.abs(u).mean() and np.all(np.sign(u) == -np.sign(g))

    plain, skipped = first_update(), first_update(ns_skip=["levels"])
    assert sign_like(level(skipped), level(grads))
    assert not sign_like(level(plain), level(grads))  # orthogonalized: the sign step mixed
    assert not sign_like(proj(plain), proj(grads))
    np.testing.assert_array_equal(proj(skipped), proj(plain))


@pytest.mark.parametrize(("skip", "match"), [
    (["level"], r"optim\.kwargs\.ns_skip=\('level',\): \['level'\] names no parameter"),
    ("levels", r"optim\.kwargs\.ns_skip='levels': expects tuple"),
])
def test_ns_skip_naming_no_parameter_is_refused_before_training(skip, match):
    """A typo would silently orthogonalize everything as before: refused at the optimizer's
    init, which the trainer runs (abstractly) before the first step."""
    params = {"levels": {"up": jnp.ones((4, 4))}, "mlp": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match=match):
        tx = optimizers.build(OptimConfig(name="muon", kwargs={"ns_skip": skip}), 10)
        jax.eval_shape(tx.init, params)


def test_unknown_names_are_reported():
    with pytest.raises(ValueError, match="optim.name='nadamax_x'"):
        optimizers.build(OptimConfig(name="nadamax_x"), 10)
    with pytest.raises(ValueError, match="cannot import"):
        optimizers.build(OptimConfig(name="no_such_module:f"), 10)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, schedule=kind, min_lr_ratio=0.1)
    lr = optimizers.schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    end = 1.0 if kind == "constant" else 0.1
    assert float(lr(100)) == pytest.approx(end, abs=1e-6)


def test_gradients_are_clipped_first():
    cfg = OptimConfig(name="sgd", learning_rate=1.0, warmup_steps=0, schedule="constant",
                      grad_clip=1.0, b1=0.0)
    tx = optimizers.build(cfg, 10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-5)
    unclipped = optimizers.build(dataclasses.replace(cfg, grad_clip=0.0), 10)
    updates, _ = unclipped.update(grads, unclipped.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) > 100


# ---- every field a user sets is used or refused ------------------------------------------------

# A value unlike the default for every field of every registered optimizer, by field name;
# (optimizer, field) where the name means something else there.
CHANGED = {
    "b1": 0.5, "b2": 0.5, "b3": 0.5, "eps": 0.1, "weight_decay": 0.5, "eps_root": 0.1,
    "nesterov": True, "mu_dtype": "bfloat16", "accumulator_dtype": "bfloat16",
    "decay_rate": 0.5, "clipping_threshold": 0.1, "momentum": 0.9, "factored": False,
    "min_dim_size_to_factor": 128, "multiply_by_parameter_scale": False,
    "weight_decay_rate": 0.5, "trust_coefficient": 0.1, "ns_steps": 3, "ns_coeffs": "dion",
    "adaptive": True, "preconditioning": "spectral", "consistent_rms": 0.2,
    "adam_eps_root": 0.1, "beta1": 0.5, "beta2": 0.5, "beta3": 0.5, "alpha": 0.5,
    "every": 3, "moments": "cumulative", "precondition": "after_ns", "beta": 0.1,
    "form": "arxiv", "axis": 0, "eta_mlp": 0.5, "eta": 0.5, "hidden": 4, "objective": "l2",
    "seed": 1, "ns_skip": ["mlp"],
    ("lars", "momentum"): 0.5, ("muon", "nesterov"): False,
    ("m3", "ns_coeffs"): [2.0, -1.5, 0.5],
}
# Settings under which every field shows in four steps: an M3 chunk ends at step 3, and
# Adafactor factors these small matrices (its min_dim_size_to_factor then goes back to 128).
BASE = {"m3": {"every": 2}, "adafactor": {"min_dim_size_to_factor": 4}}


# Not all ones: Adafactor's multiply_by_parameter_scale multiplies by the params' RMS.
FIELD_PARAMS = jax.tree.map(lambda p: jnp.asarray(
    np.random.default_rng(1000 + p.size).standard_normal(p.shape), p.dtype), PARAMS)
FIELD_GRADS = jax.tree.map(lambda p: jnp.asarray(  # four steps' gradients, stacked
    np.random.default_rng(p.size).standard_normal((4, *p.shape)), p.dtype), PARAMS)


@functools.partial(jax.jit, static_argnums=0)
def _run(structure, floats):
    """Four updates at fixed params; the float fields are traced, so that one compilation
    serves every float value of an optimizer (the other fields are in `structure`)."""
    tx = dataclasses.replace(structure, **floats).build(optax.constant_schedule(1e-2))

    def step(state, grads):
        u, state = tx.update(grads, state, FIELD_PARAMS)
        return state, u

    return jax.lax.scan(step, tx.init(FIELD_PARAMS), FIELD_GRADS)[1]


def _updates(cfg):
    """The updates of the optimizer an OptimConfig names (through optimizer_config)."""
    built = optimizers.optimizer_config(cfg)
    floats = {f.name: getattr(built, f.name) for f in dataclasses.fields(built)
              if isinstance(getattr(built, f.name), float)}
    return jax.tree.leaves(_run(dataclasses.replace(built, **dict.fromkeys(floats, 0.0)), floats))


@functools.cache
def _default_updates(name):
    updates = _updates(_cfg(name, **BASE.get(name, {})))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in updates), name
    return updates


def _cfg(name, **values):
    shared = {k: v for k, v in values.items() if k in optimizers.SHARED_FIELDS}
    own = {k: v for k, v in values.items() if k not in shared}
    return OptimConfig(name=name, warmup_steps=0, schedule="constant", grad_clip=0.0,
                       kwargs=own, **shared)


FIELDS = [(name, f.name) for name in REGISTERED
          for f in dataclasses.fields(optimizers.OPTIMIZERS[name])]


@pytest.mark.parametrize(("name", "field"), FIELDS, ids=[f"{n}.{f}" for n, f in FIELDS])
def test_every_field_changes_the_update(name, field):
    base = BASE.get(name, {})
    value = CHANGED.get((name, field), CHANGED.get(field))
    assert value is not None, f"give CHANGED a value for {name}.{field}"
    got = _updates(_cfg(name, **{**base, field: value}))
    ref = _default_updates(name)
    assert any(not np.array_equal(a, b) for a, b in zip(got, ref, strict=True)), (name, field)


SHARED_NOT_TAKEN = [(name, field) for name in REGISTERED for field in optimizers.SHARED_FIELDS
                    if field not in {f.name for f in dataclasses.fields(optimizers.OPTIMIZERS[name])}]


@pytest.mark.parametrize(("name", "field"), SHARED_NOT_TAKEN,
                         ids=[f"{n}.{f}" for n, f in SHARED_NOT_TAKEN])
def test_a_shared_field_the_optimizer_does_not_take_is_refused(name, field):
    """optim.b1 / b2 / eps / weight_decay used to be dropped silently by optimizers that do
    not take them; the error names the field, its default and what the optimizer takes."""
    value = getattr(OptimConfig(), field) / 2
    with pytest.raises(ValueError, match=rf"optim\.{field}={value!r}: optim.name='{name}' does "
                                         rf"not take it; leave it at .* \(it takes .*optim\.kwargs"):
        optimizers.build(OptimConfig(name=name, **{field: value}), total_steps=10)
    optimizers.build(OptimConfig(name=name), total_steps=10)  # defaults are never refused


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("m3", {"beta4": 0.5}, r"optim\.kwargs\.beta4=0\.5: optim.name='m3' has no such argument "
                           r"\(it takes optim\.eps; optim\.weight_decay; optim\.kwargs: beta1"),
    ("adamw", {"amsgrad": True}, r"optim\.kwargs\.amsgrad.*'optax:adamw' passes any argument"),
    ("m3", {"eps": 1e-6}, r"optim\.kwargs\.eps=1e-06: set optim\.eps instead"),
    ("m3", {"every": "10"}, r"optim\.kwargs\.every='10': expects int"),
    ("m3", {"beta1": True}, r"optim\.kwargs\.beta1=True: expects float"),
    ("deep_momentum", {"hidden": 2.5}, r"optim\.kwargs\.hidden=2\.5: expects int or None"),
    ("adam", {"mu_dtype": "bf16x"}, r"optim\.kwargs\.mu_dtype='bf16x': is not a dtype"),
    ("nadamw", {"b7": 1}, r"optim\.kwargs\.b7=1: optim.name='nadamw' has no such argument"),
    ("optax:adamw", {"b7": 1}, r"optim\.kwargs\.b7=1: optim.name='optax:adamw' has no such"),
])
def test_bad_optimizer_arguments_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimizers.build(OptimConfig(name=name, kwargs=kwargs), total_steps=10)


def test_kwargs_values_are_coerced_to_the_field_types():
    cfg = optimizers.optimizer_config(OptimConfig(
        name="m3", kwargs={"every": 10.0, "beta3": 1, "ns_coeffs": [[3.0, -3.0, 1.0]] * 2}))
    assert cfg.every == 10 and isinstance(cfg.every, int)
    assert cfg.beta3 == 1.0 and isinstance(cfg.beta3, float)
    assert cfg.ns_coeffs == ((3.0, -3.0, 1.0), (3.0, -3.0, 1.0))
    assert optimizers.optimizer_config(OptimConfig(name="sgd", kwargs={"nesterov": "true"})
                                       ).nesterov is True


def test_shared_fields_still_reach_the_optimizers_that_take_them():
    a = _one_update(OptimConfig(name="adam", warmup_steps=0, b1=0.5, eps=1e-3))
    b = _one_update(OptimConfig(name="adam", warmup_steps=0))
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True))


def test_defaults_are_optim_configs_and_the_factories():
    """Shared fields default to OptimConfig's (which always fills them); the others to the
    factory's own, so an unset optim.kwargs changes nothing."""
    factories = {"adamw": optax.adamw, "adam": optax.adam, "lion": optax.lion, "sgd": optax.sgd,
                 "adafactor": optax.adafactor, "lamb": optax.lamb, "lars": optax.lars,
                 "adan": optax.adan, "muon": optax.contrib.muon, "m3": deep.m3,
                 "delta_momentum": deep.delta_momentum, "deep_momentum": deep.deep_momentum}
    assert set(factories) == set(optimizers.OPTIMIZERS)
    for name, cls in optimizers.OPTIMIZERS.items():
        signature = inspect.signature(factories[name]).parameters
        for f in dataclasses.fields(cls):
            if f.name in optimizers.SHARED_FIELDS:
                assert f.default == getattr(OptimConfig(), f.name), (name, f.name)
            elif f.name == "ns_skip":  # the trainer's choice of matrices: none skipped
                assert f.default == (), name
            else:
                assert f.default == signature[f.name].default, (name, f.name)


def test_other_optax_aliases_take_the_shared_fields_they_have_and_any_own_argument():
    cls = type(optimizers.optimizer_config(OptimConfig(name="nadamw")))
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {"b1", "b2", "eps", "weight_decay", "eps_root"} <= fields
    assert "mask" not in fields and "learning_rate" not in fields  # the trainer's: fixed
    cfg = optimizers.optimizer_config(OptimConfig(name="nadamw", b1=0.5, kwargs={"eps_root": 1e-3}))
    assert (cfg.b1, cfg.b2, cfg.eps_root) == (0.5, 0.95, 1e-3)
    with pytest.raises(ValueError, match=r"optim\.b2=0\.5: optim.name='rmsprop' does not take"):
        optimizers.build(OptimConfig(name="rmsprop", b2=0.5), 10)
    # package.module:factory takes its arguments from optim.kwargs only.
    cfg = optimizers.optimizer_config(OptimConfig(name="optax:adamw", kwargs={"b1": 0.5}))
    assert cfg.b1 == 0.5 and cfg.b2 == 0.999
    with pytest.raises(ValueError, match=r"optim\.b1=0\.5: optim.name='optax:adamw' does not"):
        optimizers.build(OptimConfig(name="optax:adamw", b1=0.5), 10)


def test_set_on_the_command_line_reaches_the_optimizer():
    cfg = config_lib.apply_overrides(TrainConfig(), [
        "optim.name=m3", "optim.eps=1e-6", "optim.kwargs.beta3=0.8", "optim.kwargs.every=10"])
    built = optimizers.optimizer_config(cfg.optim)
    assert (built.eps, built.beta3, built.every) == (1e-6, 0.8, 10)
    cfg = config_lib.apply_overrides(TrainConfig(), ["optim.name=m3", "optim.b1=0.5"])
    with pytest.raises(ValueError, match=r"optim\.b1=0\.5: optim.name='m3' does not take it"):
        optimizers.build(cfg.optim, cfg.steps)


@pytest.mark.parametrize("variant", ["cpu_demo", "tiny", "125M"])
def test_packaged_train_configs_build(variant):
    cfg = config_lib.from_file(f"lm:{variant}")
    optimizers.build(cfg.optim, cfg.steps)

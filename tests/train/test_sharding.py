"""Sharding: the rules table, mesh checks, and a sharded step equal to the 1-device step."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nested_jax.train import sharding, trainer
from nested_jax.train import step as step_lib
from nested_jax.train.config import MeshConfig

from .conftest import tiny_config


def _mesh(data, fsdp, tensor):
    return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def test_rules_map_logical_axes_to_mesh_axes():
    mesh = _mesh(2, 2, 2)
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 192), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
    # a dimension the mesh axes do not divide is replicated
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 191), mesh) == P("fsdp", None)
    # a mesh axis is used once per array
    assert sharding.logical_to_spec(("mlp", "heads"), (64, 64), mesh) == P("tensor", None)
    assert sharding.logical_to_spec((None, "unknown"), (4, 4), mesh) == P(None, None)


def test_mesh_shape_is_checked_against_the_devices():
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="mesh.*8 devices"):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ValueError, match="mesh.*divide"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=3), 8)


def test_optimizer_state_follows_the_parameters(corpus, tmp_path):
    cfg = dataclasses.replace(tiny_config(corpus), mesh=MeshConfig(data=1, fsdp=4, tensor=2))
    run = trainer.prepare(cfg, tmp_path)
    params = run.state_shardings["params"]
    kernel = params["blocks"][0]["mlp"]["gate"]["kernel"]
    assert sharding.var_value(kernel).spec == P("fsdp", "tensor")
    mu = run.state_shardings["opt_state"][1][0].mu["blocks"][0]["mlp"]["gate"]["kernel"]
    assert sharding.var_value(mu).spec == P("fsdp", "tensor")


@pytest.mark.parametrize("mesh", [
    (2, 2, 2),
    pytest.param((8, 1, 1), marks=pytest.mark.slow),
    pytest.param((1, 4, 2), marks=pytest.mark.slow),
])
def test_sharded_step_equals_single_device_step(corpus, tmp_path, mesh):
    """Two train steps on 8 CPU devices match the 1-device steps within float tolerance.

    SGD keeps the update linear in the gradient, so only reduction order differs
    (Adam's g / sqrt(v) would amplify it for near-zero gradients).
    """
    base = tiny_config(corpus)
    base = dataclasses.replace(base, optim=dataclasses.replace(base.optim, name="sgd",
                                                               learning_rate=0.5))
    one = trainer.prepare(base, tmp_path, devices=jax.devices()[:1])
    data, fsdp, tensor = mesh
    many = trainer.prepare(
        dataclasses.replace(base, mesh=MeshConfig(data=data, fsdp=fsdp, tensor=tensor)), tmp_path)
    state1 = one.init_state()
    state8 = jax.device_put(jax.device_get(state1), many.state_shardings)
    rng = np.random.default_rng(0)
    steps = []
    for run in (one, many):
        steps.append(jax.jit(step_lib.make_train_step(run.graphdef, run.tx),
                             in_shardings=(run.state_shardings, run.batch_sharding),
                             out_shardings=(run.state_shardings, None)))
    for _ in range(2):
        batch = rng.integers(0, 256, size=(8, 33), dtype=np.int32)
        state1, m1 = steps[0](state1, trainer.global_batch(batch, one))
        state8, m8 = steps[1](state8, trainer.global_batch(batch, many))
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state1["params"]), jax.tree.leaves(state8["params"]),
                    strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    path = ("blocks", 0, "mlp", "gate", "kernel")
    kernel, want = state8["params"], many.state_shardings["params"]
    for key in path:
        kernel, want = kernel[key], want[key]
    assert sharding.var_value(kernel).sharding.spec == sharding.var_value(want).spec

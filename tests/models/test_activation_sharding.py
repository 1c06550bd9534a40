"""Activations split by batch under a mesh (`layers.shard_batch`), and nothing changed without one.

Every model constrains each block's input and output, its attention / memory and MLP / CMS-level
outputs, and the logits to split the batch over the mesh's (data, fsdp) axes.  On 4 CPU devices
(data=2, fsdp=2; conftest.py provides 8) the loss and every parameter gradient equal the
one-device run's to float32 round-off, and the constraints are in the traced program; without a
mesh the program is the one traced with `shard_batch` replaced by the identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nested_jax import models
from nested_jax.kernels import splash
from nested_jax.memory import pallas
from nested_jax.models import layers
from nested_jax.train import sharding
from nested_jax.train.config import MeshConfig
from nested_jax.train.step import next_token_loss

MODELS = ("transformer", "titans", "hope", "hope_attention")
# constraints per block: input, output, then its sublayers' outputs (tiny presets: 3 CMS levels)
PER_BLOCK = {"transformer": 2 + 2, "titans": 2 + 2, "hope": 2 + 1 + 3, "hope_attention": 2 + 1 + 3}
BATCH = ("data", "fsdp")


def _mesh(data=2, fsdp=2, tensor=1):
    n = data * fsdp * tensor
    return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:n])


def _tokens(B=4, T=33):
    return jax.random.randint(jax.random.key(1), (B, T), 0, 256)


def _constraints(jaxpr) -> list:
    """The sharding of every sharding_constraint, sub-jaxprs (remat, scan, jit) included."""
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "sharding_constraint":
            found.append(e.params["sharding"])
        for v in e.params.values():
            for x in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(x, "jaxpr", x)
                if hasattr(inner, "eqns"):
                    found += _constraints(inner)
    return found


def test_batch_axes_agree_with_the_rules_table_and_the_kernels():
    assert layers.BATCH_AXES == dict(sharding.RULES)["batch"] == splash.BATCH_AXES
    assert layers.BATCH_AXES == pallas.BATCH_AXES


def _specs(x, mesh=None) -> list:
    """The PartitionSpecs that `shard_batch(x)` traces to, under ``mesh`` or none."""
    trace = lambda: [s.spec for s in _constraints(jax.make_jaxpr(layers.shard_batch)(x).jaxpr)]
    if mesh is None:
        return trace()
    with sharding.mesh_context(mesh):
        return trace()


def test_shard_batch_constrains_only_the_batch_and_only_where_it_can():
    x = jnp.ones((4, 6, 8))
    # the other dims unconstrained: "tensor" may keep splitting heads / MLP / vocabulary
    assert _specs(x, _mesh()) == [P(BATCH, P.UNCONSTRAINED, P.UNCONSTRAINED)]
    assert _specs(x, _mesh(1, 4, 2)) == [P(("fsdp",), P.UNCONSTRAINED, P.UNCONSTRAINED)]
    assert _specs(x) == []  # no mesh
    assert _specs(x, _mesh(1, 1, 1)) == []  # one device
    assert _specs(x, _mesh(1, 1, 4)) == []  # no batch axis in the mesh
    assert _specs(jnp.ones((3, 6)), _mesh()) == []  # 4 does not divide B = 3


def test_replicate_asks_for_the_whole_array_only_under_a_mesh():
    x = jnp.ones((8, 4))
    trace = lambda: [s.spec for s in _constraints(jax.make_jaxpr(layers.replicate)(x).jaxpr)]
    assert trace() == []  # no mesh: the identity
    with sharding.mesh_context(_mesh(1, 4, 2)):
        assert trace() == [P()]


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_decode_gathers_the_teach_table_once_and_decodes_as_one_device(name):
    """The decode step's teach head asks for the tied table whole, once (``teach_head(whole=
    True)``), not once per level and block; under a (data=1, fsdp=4) mesh its logits equal the
    one-device decode's to float32 round-off."""
    model = models.create(name, "tiny", rngs=nnx.Rngs(0))
    tokens_B = _tokens(B=4, T=1)[:, 0]
    step = lambda m, s, t: m.decode_step(s, t)[0]
    logits1 = nnx.jit(step)(model, model.init_state(4), tokens_B)
    mesh = _mesh(1, 4, 1)
    tokens4 = _sharded(model, tokens_B[:, None], mesh)[:, 0]
    with sharding.mesh_context(mesh):
        state = model.init_state(4)
        jaxpr = jax.make_jaxpr(lambda t: step(model, state, t))(tokens4).jaxpr
        logits4 = nnx.jit(step)(model, state, tokens4)
    whole = [s for s in _constraints(jaxpr) if s.spec == P()]
    assert len(whole) == 1
    np.testing.assert_allclose(logits4, logits1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_without_a_mesh_the_program_is_unchanged(name, monkeypatch):
    """No mesh, or a one-device mesh: the very program traced with `shard_batch` the identity."""
    model = models.create(name, "tiny", rngs=nnx.Rngs(0))
    tokens = _tokens()

    def jaxprs():
        trace = lambda: str(jax.make_jaxpr(lambda t: next_token_loss(model, t))(tokens))
        bare = trace()
        with sharding.mesh_context(_mesh(1, 1, 1)):
            return bare, trace()

    with_helper = jaxprs()
    monkeypatch.setattr(layers, "shard_batch", lambda x: x)
    assert with_helper == jaxprs()


def _sharded(model, tokens, mesh):
    """The model's parameters placed by the rules table, the tokens split by batch."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, sharding.state_shardings(params, mesh)))
    return jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P(BATCH, None)))


@pytest.mark.parametrize("name", MODELS)
def test_every_model_splits_its_activations_by_batch_under_a_mesh(name):
    """Each block's input and output, its sublayers' outputs and the logits: each constraint
    splits the batch over (data, fsdp); removing the helper (or a call) fails the count."""
    model = models.create(name, "tiny", rngs=nnx.Rngs(0))
    mesh = _mesh()
    tokens = _sharded(model, _tokens(), mesh)
    with sharding.mesh_context(mesh):
        found = _constraints(jax.make_jaxpr(lambda t: next_token_loss(model, t))(tokens).jaxpr)
    assert len(found) == model.config.n_layers * PER_BLOCK[name] + 1  # + the logits
    assert all(s.spec[0] == BATCH for s in found)


def _loss_and_grads(model, tokens):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return next_token_loss(nnx.merge(graphdef, p, rest), tokens)[0]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("name", [
    "transformer", "titans", "hope_attention",
    # two compiles of HopeLM take about a minute on 2 CPU cores; the constraints it adds over
    # the others (the self-modifying layer's output) are counted in the test above
    pytest.param("hope", marks=pytest.mark.slow),
])
def test_sharded_activations_equal_the_one_device_run(name):
    """Loss and every parameter gradient on a (data=2, fsdp=2) mesh, activations constrained,
    equal the one-device run's to float32 round-off."""
    model = models.create(name, "tiny", rngs=nnx.Rngs(0))
    tokens = _tokens()
    loss1, grads1 = _loss_and_grads(model, tokens)
    mesh = _mesh()
    tokens4 = _sharded(model, tokens, mesh)
    with sharding.mesh_context(mesh):
        loss4, grads4 = _loss_and_grads(model, tokens4)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    for (path, g1), g4 in zip(jax.tree_util.tree_leaves_with_path(grads1),
                              jax.tree.leaves(grads4), strict=True):
        scale = float(jnp.max(jnp.abs(g1))) or 1.0
        np.testing.assert_allclose(g4, g1, rtol=1e-5, atol=1e-5 * scale, err_msg=str(path))

"""The shared language-model shell (models/lm.py): every model is one, with its old param tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested_jax import models
from nested_jax.models.lm import LanguageModel

SHELL = ("__init__", "__call__", "forward_embedded", "init_state", "decode_step",
         "flops_per_token")

# Parameter paths at the tiny preset, block 0 cut after its sublayer names, and the number of
# parameter arrays, as they were before the shell existed: checkpoints and
# hope_attention.stack_from_transformer address parameters by these paths.
PATHS = {
    "transformer": (20, ["blocks/0/attn", "blocks/0/attn_norm", "blocks/0/mlp",
                         "blocks/0/mlp_norm"]),
    "titans": (30, ["blocks/0/mem_norm", "blocks/0/memory", "blocks/0/mlp", "blocks/0/mlp_norm"]),
    # hope: 52 arrays before decisions #25 (M_memory's W1, W2 are now one matrix W per layer)
    "hope": (50, ["blocks/0/cms", "blocks/0/mixer", "blocks/0/mixer_norm"]),
    "hope_attention": (38, ["blocks/0/attn", "blocks/0/attn_norm", "blocks/0/cms"]),
}


def _paths(model: nnx.Module) -> list[str]:
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))]


@pytest.mark.parametrize("name", sorted(PATHS))
def test_every_model_is_the_shared_shell(name):
    _, cls = models.lookup(name)
    assert issubclass(cls, LanguageModel)
    for method in SHELL:  # a model supplies its block and hooks, never its own loop
        assert getattr(cls, method) is getattr(LanguageModel, method), (name, method)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_parameter_paths_are_unchanged(name):
    paths = _paths(models.abstract_model(name, "tiny"))
    n, block0 = PATHS[name]
    cut = sorted({"/".join(p.split("/")[:3]) if p.startswith("blocks/") else p
                  for p in paths if not p.startswith("blocks/") or p.startswith("blocks/0/")})
    assert cut == sorted(["embed/embed/embedding", "final_norm/scale", *block0])
    assert len(paths) == n


def test_hope_without_cms_keeps_its_mlp_paths():
    paths = _paths(models.abstract_model("hope", "tiny", use_cms=False))
    assert len(paths) == 32  # 34 with the MLP M_memory (decisions #25)
    assert {p for p in paths if p.startswith("blocks/1/mlp")} == {
        "blocks/1/mlp/down/kernel", "blocks/1/mlp/gate/kernel", "blocks/1/mlp/up/kernel",
        "blocks/1/mlp_norm/scale"}


def _loss_and_grads(model, tokens_BxT):
    def loss(m):
        logits = m(tokens_BxT[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)), logits

    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return value, logits, nnx.state(grads, nnx.Param)


# Op by op, every primitive compiles on its own: 1-2.5 min for each memory model (CMS included)
# on 2 cores, so only Transformer++ runs eagerly in the default suite.
EAGER = [pytest.param(n, marks=pytest.mark.slow) if n in ("hope", "titans", "hope_attention")
         else n for n in sorted(PATHS)]


@pytest.mark.parametrize("name", EAGER)
def test_eager_equals_jit(name):
    """The models run without jit too (no Python branch on a traced value, no shape taken from
    one), and op by op they compute what the compiled forward and backward compute.  One block
    of the tiny preset keeps the op-by-op run short; T = 9 leaves a ragged last chunk at every
    level (chunks of 4, 8 and 16 tokens, CMS periods 4, 16 and 64)."""
    cfg = models.make_config(name, "tiny", n_layers=1)
    model = models.create(name, cfg, rngs=nnx.Rngs(0))
    tokens_BxT = jax.random.randint(jax.random.key(1), (2, 10), 0, 256)
    with jax.disable_jit():
        eager = _loss_and_grads(model, tokens_BxT)
    jitted = nnx.jit(_loss_and_grads)(model, tokens_BxT)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-30
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5 * scale)

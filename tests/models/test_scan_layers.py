"""``scan_layers`` (models/lm.py): the blocks as one lax.scan over stacked parameters compute,
in float64, the loop's logits and every parameter gradient, keep the parameter tree, and trace
one block whatever the depth (what makes a deep model compile in minutes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested_jax import models
from nested_jax.models.packing import pack_aligned

V = 256
F64 = dict(dtype="float64", param_dtype="float64")
# The scan and the loop run the same float64 arithmetic; only XLA's fusion order differs.
TOL = 1e-12

# Packed rows for every case: the closed-over document layout must reach every scanned block.
CASES = {
    # blockwise attention keeps the softmax in float64 (test_documents.py says why).
    "transformer": ("transformer", dict(attention_impl="blockwise")),
    # memory_dtype: the self-modifying memories run in float32 by default, even here.
    "hope-remat": ("hope", dict(chunk_memory=4, chunk_other=2, cms_periods=(2, 4, 8),
                                memory_dtype="float64", remat=True)),
    # The shell's scan is one code path for every model: these two only add compile time.
    "titans": pytest.param(("titans", dict(chunk_size=8)), marks=pytest.mark.slow),
    "hope_attention": pytest.param(("hope_attention", dict(attention_impl="blockwise",
                                                           cms_periods=(2, 4, 8))),
                                   marks=pytest.mark.slow),
}


def _model(name, scan, **overrides):
    return models.create(name, "tiny", rngs=nnx.Rngs(0), scan_layers=scan, **F64, **overrides)


def _loss_and_grads(model, tokens_BxT, segment_ids=None):
    def loss(m):
        logits = m(tokens_BxT[:, :-1], segment_ids)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)
        return jnp.mean(nll), logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return np.asarray(logits), nnx.to_flat_state(nnx.state(grads, nnx.Param))


def _max_abs_diff(flat_a, flat_b):
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    return max(float(jnp.max(jnp.abs(a[...] - b[...]))) for (_, a), (_, b)
               in zip(flat_a, flat_b, strict=True))


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_scan_equals_loop(x64, case):
    name, overrides = case
    rng = np.random.default_rng(0)
    tokens, seg = pack_aligned([rng.integers(1, V, n) for n in (9, 7, 8)], 33, 8)
    tokens, seg = jnp.asarray(tokens), jnp.asarray(seg[:, :-1])
    logits_loop, grads_loop = _loss_and_grads(_model(name, False, **overrides), tokens, seg)
    logits_scan, grads_scan = _loss_and_grads(_model(name, True, **overrides), tokens, seg)
    assert logits_scan.dtype == np.float64
    np.testing.assert_allclose(logits_scan, logits_loop, rtol=0, atol=TOL)
    err = _max_abs_diff(grads_scan, grads_loop)
    assert err < TOL, err
    # Both blocks got their own, different gradient back from the stack (no block's lost).
    by_path = dict(grads_scan)
    for (path, g) in grads_scan:
        if path[:2] == ("blocks", 0):
            assert float(jnp.max(jnp.abs(g[...] - by_path[("blocks", 1, *path[2:])][...]))) > 0


@pytest.mark.parametrize("name", ["transformer", "hope"])
def test_scan_traces_one_block_whatever_the_depth(name):
    """The scanned model's traced program holds one block's matmuls whatever n_layers (only
    the parameter stacking grows with depth); the loop's holds one set per block (so the test
    can fail).  Tracing only: nothing compiles."""

    def matmuls(scan, n_layers):
        model = models.create(name, "tiny", rngs=nnx.Rngs(0), scan_layers=scan,
                              n_layers=n_layers)
        graphdef, state = nnx.split(model)
        tokens = jnp.zeros((1, 16), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
        return str(jaxpr).count("dot_general")

    assert matmuls(True, 2) == matmuls(True, 4)
    assert matmuls(False, 4) > 1.5 * matmuls(False, 2)


def test_scan_keeps_the_parameter_tree():
    def paths(scan):
        model = models.abstract_model("hope", "tiny", scan_layers=scan)
        return [p for p, _ in nnx.to_flat_state(nnx.state(model))]

    assert paths(True) == paths(False)


def test_scan_layers_must_be_a_bool():
    with pytest.raises(ValueError, match="scan_layers"):
        models.make_config("transformer", "tiny", scan_layers="yes")

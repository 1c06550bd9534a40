"""Hope-Attention (softmax attention + CMS): causality, streaming, static limit, ad-hoc stacking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested_jax import models
from nested_jax.models import layers
from nested_jax.models.hope_attention import HopeAttentionConfig, stack_from_transformer
from nested_jax.models.layers import rms_normalize
from tests.models.helpers import check_bf16_step

V, T = 256, 16
# Short periods so that every level updates (and is read after updating) within T tokens.
FAST = dict(cms_periods=(2, 4), cms_lr=0.2)


def _model(**overrides):
    kw = {**FAST, **overrides}
    return models.create("hope_attention", "tiny", rngs=nnx.Rngs(0), **kw)


def _tokens(B=2, T=T, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


# One jitted forward for every test: models of the same config share its compilation.
_forward = nnx.jit(lambda m, t: m(t))


def test_causality():
    """d logits[:, t] / d x[:, s] is exactly zero for every s > t (nanodo's test_causality; t is a
    traced argument, so one compilation serves every position)."""
    model = _model(n_layers=1)
    x_BxTxD = model.embed(_tokens())

    def logits_at(x, t):
        return jnp.take(model.forward_embedded(x).sum(axis=(0, 2)), t)

    grad = nnx.jit(jax.grad(logits_at))
    for t in range(T):
        g_BxTxD = np.asarray(grad(x_BxTxD, t))
        assert np.all(g_BxTxD[:, t + 1:] == 0.0), f"position {t} sees the future"
        assert np.any(g_BxTxD[:, : t + 1] != 0.0)


def test_future_tokens_do_not_change_past_logits():
    """Forward perturbation: also covers the teach targets E[x_{t+1}], which are stop-gradient
    constants (a leak through them would be invisible to the gradient test)."""
    model = _model()
    tokens = _tokens()
    base = _forward(model, tokens)
    for s in (3, 8, T - 1):
        changed = _forward(model, tokens.at[:, s].set((tokens[:, s] + 1) % V))
        np.testing.assert_array_equal(np.asarray(changed[:, :s]), np.asarray(base[:, :s]))
        assert float(jnp.max(jnp.abs(changed[:, s:] - base[:, s:]))) > 0


def test_batch_independence():
    """Row 1's logits do not depend on row 0 (the fast state is per sequence)."""
    model = _model()
    tokens = _tokens()
    other = tokens.at[0].set(_tokens(seed=5)[0])
    np.testing.assert_array_equal(np.asarray(_forward(model, tokens)[1]),
                                  np.asarray(_forward(model, other)[1]))


@pytest.mark.parametrize("overrides", [
    {},
    {"cms_variant": "nested", "cms_periods": (4, 2), "cms_lr": (0.5, 0.2), "remat": True},
    pytest.param({"cms_variant": "independent", "cms_signal": "reconstruction", "cms_lr": 0.05,
                  "n_kv_heads": 2}, marks=pytest.mark.slow),
], ids=["sequential-teach", "nested-teach-remat", "independent-reconstruction-gqa"])
def test_decode_matches_forward(overrides):
    """Token-by-token decoding (KV cache + every level's fast state) == the parallel forward."""
    model = _model(**overrides)
    tokens = _tokens()
    want = _forward(model, tokens)
    step = nnx.jit(lambda m, s, tok: m.decode_step(s, tok))
    state = model.init_state(2)
    for t in range(T):
        logits_BxV, state = step(model, state, tokens[:, t])
        np.testing.assert_allclose(logits_BxV, want[:, t], rtol=1e-5, atol=1e-5)
    assert int(state.pos) == T


def _static_reference(model, tokens):
    """Transformer++ with a chain of residual SwiGLU MLPs per block, written out by hand."""
    x = model.embed(tokens)
    B, T_ = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T_)[None], (B, T_))
    for block in model.blocks:
        x = x + block.attn(layers.apply_norm(block.attn_norm, x), positions)
        for lv in block.cms.levels:
            n = rms_normalize(x, lv.norm.scale[...], model.config.norm_eps)
            x = x + (jax.nn.silu(n @ lv.gate[...]) * (n @ lv.up[...])) @ lv.down[...]
    return model.embed.logits(layers.apply_norm(model.final_norm, x))


def test_zero_learning_rates_give_the_static_network():
    model = _model(cms_lr=0.0)
    tokens = _tokens()
    np.testing.assert_allclose(_forward(model, tokens), _static_reference(model, tokens),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_ad_hoc_stacking_reproduces_the_transformer(variant):
    """Decision #15: CMS levels initialised from a Transformer++'s MLPs; with every inner learning
    rate 0 the logits are the Transformer++'s."""
    transformer = models.create("transformer", "tiny", rngs=nnx.Rngs(1))
    tokens = _tokens()
    want = _forward(transformer, tokens)
    periods = (4, 2) if variant == "nested" else (2, 4)
    kw = dict(cms_periods=periods, cms_variant=variant)
    stacked = stack_from_transformer(transformer, rngs=nnx.Rngs(2), cms_lr=0.0, **kw)
    np.testing.assert_allclose(_forward(stacked, tokens), want, rtol=1e-6, atol=1e-6)
    stacked.blocks[0].cms.lr_gate[...] = jnp.full((2,), 3.0)  # eta = 0 * 2 sigmoid(3) still 0
    np.testing.assert_allclose(_forward(stacked, tokens), want, rtol=1e-6, atol=1e-6)


def test_outer_gradients_reach_every_initial_state():
    model = _model()
    tokens = _tokens()
    grads = nnx.jit(nnx.grad(lambda m: m(tokens).mean()))(model)
    cms = [(p, g) for p, g in jax.tree_util.tree_leaves_with_path(grads) if "cms" in str(p)]
    assert len(cms) == 2 * (2 * 4 + 1)  # 2 blocks x (2 levels x {norm, gate, up, down} + lr_gate)
    for path, g in cms:
        assert np.all(np.isfinite(g)), path
        assert float(jnp.max(jnp.abs(g))) > 0, path


def _bf16_forward_backward(T_):
    model = _model(dtype="bfloat16", max_seq_len=T_, n_layers=1, cms_periods=(64, 256),
                   cms_lr=0.01)
    check_bf16_step(model, _tokens(B=1, T=T_ + 1), V)

def test_bf16_forward_backward_is_finite():
    _bf16_forward_backward(1024)


@pytest.mark.slow
def test_bf16_forward_backward_is_finite_at_4096():
    _bf16_forward_backward(4096)


@pytest.mark.parametrize("preset", list(HopeAttentionConfig.PRESETS))
def test_preset_parameter_counts(preset):
    n = models.count_params(models.abstract_model("hope_attention", preset))
    nominal = HopeAttentionConfig.PRESETS[preset].nominal_params
    print(f"hope_attention/{preset}: {n / 1e6:.2f}M parameters (nominal {nominal / 1e6:.1f}M)")
    assert abs(n - nominal) <= 0.1 * nominal


def test_small_preset_is_in_the_cpu_range():
    assert 20e6 <= models.count_params(models.abstract_model("hope_attention", "small")) <= 50e6


def test_flops_per_token_is_at_least_6n():
    model = _model()
    assert model.flops_per_token(128) >= 6 * models.count_params(model)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"cms_periods": (4, 0)}, "cms_periods"),
        ({"cms_periods": (4, 512)}, "cms_periods"),  # above max_seq_len=256: never updates
        ({"cms_periods": (2, 4), "cms_lr": (0.1, 0.1, 0.1)}, "cms_lr"),
        ({"cms_periods": (2, 4), "cms_d_ff": (64, 64, 64)}, "cms_d_ff"),
        ({"cms_variant": "parallel"}, "cms_variant"),
        ({"cms_variant": "nested", "cms_periods": (2, 4)}, "cms_periods"),
        ({"cms_signal": "mse"}, "cms_signal"),
        ({"cms_momentum": 1.5}, "cms_momentum"),
        ({"d_model": 66}, "d_model"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        models.make_config("hope_attention", "tiny", **overrides)

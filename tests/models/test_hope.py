"""HopeLM (paper §6, decisions #11, #16, #17): causality, batch independence, decode == forward,
outer gradients to every meta-learned state, zero inner learning rates = a static network, bf16
stability, presets, ablation flags, config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested_jax import memory as nm
from nested_jax import models
from nested_jax.models.hope import HopeConfig, HopeLM
from tests.models.helpers import check_bf16_step

V = 256
# Chunks small enough that T = 14 crosses every boundary: C_other = 3, C_memory = 5, CMS 2/4/8.
SHORT = dict(chunk_memory=5, chunk_other=3, cms_periods=(2, 4, 8))


def _model(**overrides) -> HopeLM:
    return models.create("hope", "tiny", rngs=nnx.Rngs(0), **{**SHORT, **overrides})


def _tokens(B=2, T=14, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


_forward = nnx.jit(lambda m, tok: m(tok))


@nnx.jit
def _grads(model, x_BxTxD, w_BxTxV):
    """(outer parameter grads, input grads) of sum(w * logits): one compiled program serves the
    causality, batch-independence and meta-learning tests."""

    def f(m, x):
        return jnp.sum(w_BxTxV * m.forward_embedded(x))

    return nnx.grad(f, argnums=(0, 1))(model, x_BxTxD)


def _w(t=None, row=None, B=2, T=14):
    """Random cotangent weights on logits, restricted to position t and/or row."""
    w = np.random.default_rng(0).normal(size=(B, T, V)).astype(np.float32)
    mask = np.zeros((B, T, 1), np.float32)
    mask[slice(None) if row is None else row, slice(None) if t is None else t] = 1.0
    return jnp.asarray(w * mask)


def test_registered():
    assert "hope" in models.names()
    assert isinstance(_model(), HopeLM)


def test_causality():
    """d logits[:, t] / d x[:, s] is exactly zero for every s > t (every level is causal: the
    chunk-boundary reads, the in-chunk dual form, the CMS teach targets E[x_{t+1}])."""
    model = _model()
    x = model.embed(_tokens())
    for t in (0, 2, 3, 7, 12):
        _, g = _grads(model, x, _w(t))
        g = np.asarray(g)
        assert np.all(g[:, t + 1:] == 0.0), f"position {t} sees the future"
        assert np.all(np.any(g[:, : t + 1] != 0.0, axis=-1)), t


def test_batch_independence():
    """decision #1: the fast state is per sequence; nothing is shared across the batch."""
    model = _model()
    tokens = _tokens()
    other = tokens.at[1].set(_tokens(B=1, seed=5)[0])
    a, b = np.asarray(_forward(model, tokens)), np.asarray(_forward(model, other))
    np.testing.assert_array_equal(a[0], b[0])
    assert np.any(a[1] != b[1])
    _, g = _grads(model, model.embed(tokens), _w(row=0))
    assert np.all(np.asarray(g)[1] == 0.0) and np.any(np.asarray(g)[0] != 0.0)


def test_outer_gradients_reach_every_meta_learned_state():
    """decision #4: the initial state of every memory (five per block) and of every CMS level gets
    a finite, non-zero outer gradient through the unrolled inner updates."""
    model = _model()
    grads, _ = _grads(model, model.embed(_tokens()), _w())
    names = []
    for i in range(model.config.n_layers):
        block = grads.blocks[i]
        mixer = block.mixer
        for n in ("coupled_w1", "coupled_w2"):
            g = np.asarray(getattr(mixer, n)[...])
            # every stacked memory (k, v, eta, alpha) and every head, separately
            assert np.all(np.any(g.reshape(*g.shape[:2], -1) != 0, axis=-1)), (i, n)
        for n in ("memory_w", "gate_w", "gate_b", "conv"):  # linear M_memory (decisions #25)
            names.append((i, n, np.asarray(getattr(mixer, n)[...])))
        for j in range(len(model.blocks[i].cms.levels)):
            level = block.cms.levels[j]
            for n in ("gate", "up", "down"):
                names.append((i, f"cms{j}.{n}", np.asarray(getattr(level, n)[...])))
    for i, n, g in names:
        assert np.all(np.isfinite(g)) and np.any(g != 0.0), (i, n)
    for leaf in jax.tree.leaves(nnx.state(grads)):
        assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.slow  # ~50 s here: its own compile of the backward pass (the decode side is fast)
def test_zero_learning_rates_give_the_static_network():
    """eta_max = 0 (the five memories of every self-modifying layer), cms_lr = 0 (every CMS level)
    and no weight decay: no fast weight moves, so HopeLM is a static network.  Its logits at t
    then see only the short convs' window, the last n_layers * (conv_width - 1) + 1 tokens, and
    decoding leaves every memory at its meta-learned initial value.  With the default rates the
    far gradients are non-zero (test_causality: every position <= t is seen)."""
    model = _model(eta_max=0.0, weight_decay=False, cms_lr=0.0)
    c = model.config
    tokens = _tokens()
    reach = c.n_layers * (c.conv_width - 1)  # 6 at tiny: position t sees t-6 .. t
    for t in (9, 13):
        _, g = _grads(model, model.embed(tokens), _w(t))
        g = np.asarray(g)
        assert np.all(g[:, : t - reach] == 0.0), f"position {t} sees beyond the conv window"
        assert np.all(np.abs(g[:, t - reach: t + 1]).max(axis=(0, 2)) > 0.0), t


def test_zero_learning_rates_leave_every_memory_at_its_initial_state():
    """The decode side of the test above: 14 tokens move no fast weight of any level."""
    model = _model(eta_max=0.0, weight_decay=False, cms_lr=0.0)
    c = model.config
    tokens = _tokens()
    step = nnx.jit(lambda m, s, tok: m.decode_step(s, tok))
    state0 = state = model.init_state(2)
    for t in range(tokens.shape[1]):
        _, state = step(model, state, tokens[:, t])
    weights = lambda st: ([m.coupled.params for m in st.mixers]
                          + [m.memory.params for m in st.mixers]
                          + [s.params for c in st.cms for s in c.streams]
                          + [c.slow for c in st.cms])
    leaves = jax.tree.leaves(weights(state))
    assert len(leaves) >= 4 * c.n_layers
    for a, b in zip(leaves, jax.tree.leaves(weights(state0)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ablate", [False, True], ids=["default", "every-ablation"])
def test_decode_matches_forward(ablate):
    """decision #17: token-by-token decoding carries every level's fast state (five memories,
    conv buffer, CMS levels) and gives the parallel forward's logits; the state never grows.
    "every-ablation" switches on all the flags of ABLATIONS at once (no CMS, static k/v, ...)."""
    model = _model(**({f: v for f, (v, _) in ABLATIONS.items()} if ablate else {}))
    tokens = _tokens(T=14)
    want = _forward(model, tokens)
    step = nnx.jit(lambda m, s, tok: m.decode_step(s, tok))
    state = model.init_state(2)
    shapes = jax.tree.map(jnp.shape, state)
    for t in range(tokens.shape[1]):
        logits_BxV, state = step(model, state, tokens[:, t])
        assert logits_BxV.dtype == jnp.float32
        np.testing.assert_allclose(logits_BxV, want[:, t], rtol=1e-5, atol=1e-5)
    assert jax.tree.map(jnp.shape, state) == shapes
    assert int(state.pos) == tokens.shape[1]


def _bf16_step(T):
    """Random init, bf16 compute (the inner loop runs in float32, memory_dtype)."""
    check_bf16_step(models.create("hope", "tiny", rngs=nnx.Rngs(0), dtype="bfloat16"),
                    _tokens(B=1, T=T + 1), V)

def test_bf16_forward_backward_is_finite():
    """Random init, bf16 compute, T = 1024 (the inner loop runs in float32, memory_dtype)."""
    _bf16_step(1024)


@pytest.mark.slow
def test_bf16_forward_backward_is_finite_at_4k():
    _bf16_step(4096)


# ---- configs, presets, ablations --------------------------------------------------------------


@pytest.mark.parametrize("preset", list(HopeConfig.PRESETS))
def test_preset_parameter_counts(preset):
    """Every preset is within 10% of the size it is named for (abstract init: no memory)."""
    n = models.count_params(models.abstract_model("hope", preset))
    nominal = HopeConfig.PRESETS[preset].nominal_params
    print(f"hope/{preset}: {n / 1e6:.2f}M parameters (nominal {nominal / 1e6:.1f}M)")
    assert abs(n - nominal) <= 0.1 * nominal


def test_small_preset_is_in_the_cpu_range():
    assert 20e6 <= models.count_params(models.abstract_model("hope", "small")) <= 50e6


def test_flops_per_token():
    model = models.abstract_model("hope", "small")
    n_dense = models.count_params(model) - model.memory_init_params()
    flops = model.flops_per_token(1024)
    assert flops > 6 * n_dense and np.isfinite(flops)
    assert flops == model.flops_per_token(4096)  # recurrent: no term grows with the context


ABLATIONS = {
    "dgd": (False, lambda m: m.blocks[0].mixer.cfg.rule == nm.Rule(momentum=True, dgd=False)),
    "momentum": (False, lambda m: m.blocks[0].mixer.cfg.rule == nm.Rule(
        momentum=False, dgd=True, dgd_all_layers=True, delta=True)),
    "weight_decay": (False, lambda m: not m.blocks[0].mixer.cfg.weight_decay),
    "use_cms": (False, lambda m: not hasattr(m.blocks[0], "cms") and hasattr(m.blocks[0], "mlp")),
    "static_k": (True, lambda m: m.blocks[0].mixer.k_proj is not None
                 and m.blocks[0].mixer.cfg.coupled == ("v", "eta", "alpha")),
    "static_v": (True, lambda m: m.blocks[0].mixer.v_proj is not None
                 and m.blocks[0].mixer.cfg.coupled == ("k", "eta", "alpha")),
    "adaptive_q": (True, lambda m: m.blocks[0].mixer.cfg.coupled[0] == "q"),
    "stop_grad": (True, lambda m: m.blocks[0].mixer.level("online").stop_grad
                  and m.blocks[0].cms.spec.stop_grad),
    "memory_read": ("prior", lambda m: m.blocks[0].mixer.cfg.memory_read == "prior"),
}


@pytest.mark.parametrize("flag", list(ABLATIONS))
def test_each_ablation_is_one_flag(flag):
    """The paper's ablation table (arXiv Table 5) is one config flag per row; the layer-level
    numerics of each are held against the reference in test_self_modifying.py."""
    value, check = ABLATIONS[flag]
    assert getattr(HopeConfig(), flag) != value  # off by default
    model = nnx.eval_shape(lambda: _model(**{flag: value}))
    assert check(model)


def test_any_sequence_length_is_accepted():
    """Ragged last chunks are handled, so the trainer's seq_len check asks for no multiple."""
    cfg = HopeConfig()
    assert cfg.seq_len_multiples() == {}
    cfg.check_seq_len(100)


@pytest.mark.parametrize("overrides, field", [
    ({"d_model": 66}, "d_model"),
    ({"chunk_memory": 0}, "chunk_memory"),
    ({"chunk_other": -8}, "chunk_other"),
    ({"conv_width": 0}, "conv_width"),
    ({"eta_max": 200.0}, "eta_max"),
    ({"memory_hidden": -4}, "memory_hidden"),
    ({"memory_path": "oracle"}, "memory_path"),
    ({"remat_group": -3}, "remat_group"),
    ({"use_cms": "yes"}, "use_cms"),
    ({"static_k": 1}, "static_k"),
    ({"d_ff": -1}, "d_ff"),
    ({"dtype": "float64"}, "dtype"),
    ({"memory_dtype": "int8"}, "memory_dtype"),
    ({"cms_periods": ()}, "cms_periods"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        models.make_config("hope", "tiny", **overrides)


def test_layer_fields_share_the_self_modifying_defaults():
    """HopeConfig inherits the layer's fields (SelfModifyingFields, one definition): every layer
    field is a model field of the same default, and a CLI override reaches the layer by name."""
    from nested_jax.models.self_modifying import SelfModifyingConfig, SelfModifyingFields
    from nested_jax.train import config as config_lib

    assert issubclass(HopeConfig, SelfModifyingFields)
    hope = {f.name: f.default for f in dataclasses.fields(HopeConfig)}
    for f in dataclasses.fields(SelfModifyingConfig):
        if f.default is not dataclasses.MISSING:
            assert hope[f.name] == f.default, f.name
    train = config_lib.apply_overrides(config_lib.TrainConfig(), [
        "model.eta_max=0.05", "model.chunk_memory=8", "model.inner_rule=dgd_all"])
    layer = models.make_config("hope", "tiny", **train.model_overrides).layer_config()
    assert (layer.eta_max, layer.chunk_memory, layer.inner_rule) == (0.05, 8, "dgd_all")


def test_config_is_frozen_and_layer_config_matches():
    cfg = models.make_config("hope", "small")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chunk_memory = 8
    layer = cfg.layer_config()
    assert (layer.chunk_memory, layer.chunk_other, layer.head_dim) == (64, 8, 32)

"""TitansLM (LMM): causality, streaming, static limit, meta-learned memory init, sizes, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested_jax import memory as nm
from nested_jax import models
from nested_jax.models import layers
from nested_jax.models.titans import TitansConfig
from tests.models.helpers import check_bf16_step

V, T = 256, 20  # tiny chunk_size = 8: T = 20 ends with a ragged chunk


def _model(**overrides):
    return models.create("titans", "tiny", rngs=nnx.Rngs(0), **overrides)


def _tokens(B=2, T=T, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


_forward = nnx.jit(lambda m, t: m(t))  # shared: models of one config share the compilation


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
    model = _model()
    tokens = _tokens()
    base = _forward(model, tokens)
    for s in (3, 8, T - 1):
        changed = _forward(model, tokens.at[:, s].set((tokens[:, s] + 1) % V))
        np.testing.assert_array_equal(np.asarray(changed[:, :s]), np.asarray(base[:, :s]))


def test_batch_independence():
    model = _model()
    tokens = _tokens()
    other = tokens.at[0].set(_tokens(seed=5)[0])
    np.testing.assert_array_equal(np.asarray(_forward(model, tokens)[1]),
                                  np.asarray(_forward(model, other)[1]))


@pytest.mark.parametrize("overrides", [
    {},
    {"memory": "linear"},  # nested_jax.kernels.linear_memory (its XLA plan on CPU)
    {"memory_read": "prior"},  # o_t = M_{t-1}(q_t): decode reads its state before the write
    {"induction_init": True, "memory": "linear", "rule": "delta"},  # k's tap on t - 1
    pytest.param({"rule": "dgd", "memory_path": "chunked", "memory_depth": 3},
                 marks=pytest.mark.slow),
], ids=["mlp-titans-dual", "linear-kernel", "prior-read", "induction-linear-delta",
         "mlp3-dgd-chunked"])
def test_decode_matches_forward(overrides):
    """Token-by-token decoding with the engine's stream state == the chunked parallel forward."""
    model = _model(**overrides)
    tokens = _tokens()
    want = _forward(model, tokens)
    step = nnx.jit(lambda m, s, tok: m.decode_step(s, tok))
    state = model.init_state(2)
    for t in range(T):
        logits_BxV, state = step(model, state, tokens[:, t])
        np.testing.assert_allclose(logits_BxV, want[:, t], rtol=1e-5, atol=1e-5)
    assert int(state.pos) == T


def test_linear_memory_kernel_path_equals_the_xla_path():
    tokens = _tokens()
    kernel = _forward(_model(memory="linear"), tokens)
    xla = _forward(_model(memory="linear", memory_impl="xla"), tokens)
    np.testing.assert_allclose(kernel, xla, rtol=1e-5, atol=1e-5)


def _static_reference(model, tokens):
    """The memory frozen at its initial state: o_t = M_0(q_t), written with the engine's read."""
    x = model.embed(tokens)
    mem = model.config.memory_module()
    for block in model.blocks:
        h = layers.apply_norm(block.mem_norm, x)
        q, _, _, _, _ = block.memory._project(h)
        init_H = {k: v[...] for k, v in block.memory.memory_init.items()}
        read = jax.vmap(mem.apply, in_axes=(0, 0))  # over heads
        o = jax.vmap(jax.vmap(lambda q_HxK: read(init_H, q_HxK)))(q)
        x = x + block.memory._output(h, o)
        x = x + block.mlp(layers.apply_norm(block.mlp_norm, x))
    return model.embed.logits(layers.apply_norm(model.final_norm, x))


def test_zero_learning_rate_gives_the_static_network():
    """eta_max = 0 and alpha = 1 (bias 100: sigmoid is exactly 1 in float32): no inner update."""
    model = _model(eta_max=0.0)
    H = model.config.n_heads
    for block in model.blocks:
        bias = block.memory.gates.bias
        bias[...] = bias[...].at[H:2 * H].set(100.0)
    tokens = _tokens()
    np.testing.assert_allclose(_forward(model, tokens), _static_reference(model, tokens),
                               rtol=1e-5, atol=1e-5)


def test_outer_gradients_reach_the_memory_initial_state():
    """The per-head initial state of every memory is meta-learned (decision #4)."""
    model = _model()
    tokens = _tokens()
    grads = nnx.jit(nnx.grad(lambda m: m(tokens).mean()))(model)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in leaves:
        assert np.all(np.isfinite(g)), path
    inits = [(p, g) for p, g in leaves if "memory_init" in str(p)]
    assert len(inits) == 2 * 2  # 2 blocks x {W1, W2}
    for path, g in inits:
        assert float(jnp.max(jnp.abs(g))) > 0, path


def test_momentum_and_retention_are_data_dependent_gates():
    """Gates are per head and token, in their ranges; alpha starts near 1 (decision #7)."""
    model = _model()
    h = layers.apply_norm(model.blocks[0].mem_norm, model.embed(_tokens()))
    _, _, _, gates, _ = model.blocks[0].memory._project(h)
    assert gates.eta.shape == (2, T, model.config.n_heads)
    assert isinstance(gates, nm.Gates)
    assert float(gates.eta.max()) <= model.config.eta_max and float(gates.eta.min()) > 0
    np.testing.assert_allclose(float(gates.alpha.mean()), 0.99, atol=0.01)
    assert float(jnp.std(gates.alpha)) > 0  # depends on the token


def _bf16_forward_backward(T_):
    model = _model(dtype="bfloat16", max_seq_len=T_, n_layers=1, chunk_size=64)
    check_bf16_step(model, _tokens(B=1, T=T_ + 1), V)

def test_bf16_forward_backward_is_finite():
    _bf16_forward_backward(1024)


@pytest.mark.slow
def test_bf16_forward_backward_is_finite_at_4096():
    _bf16_forward_backward(4096)


@pytest.mark.parametrize("preset", list(TitansConfig.PRESETS))
def test_preset_parameter_counts(preset):
    n = models.count_params(models.abstract_model("titans", preset))
    nominal = TitansConfig.PRESETS[preset].nominal_params
    print(f"titans/{preset}: {n / 1e6:.2f}M parameters (nominal {nominal / 1e6:.1f}M)")
    assert abs(n - nominal) <= 0.1 * nominal


def test_small_preset_is_in_the_cpu_range():
    assert 20e6 <= models.count_params(models.abstract_model("titans", "small")) <= 50e6


def test_flops_per_token_is_at_least_6n_without_the_memory_init():
    model = _model()
    assert model.flops_per_token(128) > model.memory_flops_per_token() > 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"chunk_size": 512}, "chunk_size"),  # above max_seq_len=256
        ({"chunk_size": 0}, "chunk_size"),
        ({"memory": "kan"}, "memory"),
        ({"rule": "adam"}, "rule"),
        ({"memory_depth": 3}, "memory_path"),  # the dual path is for 2-layer memories
        ({"memory_impl": "cuda"}, "memory_impl"),
        ({"alpha_init": 1.0}, "alpha_init"),
        ({"eta_max": -1.0}, "eta_max"),
        ({"conv_width": 0}, "conv_width"),
        ({"d_model": 66}, "d_model"),
        ({"induction_init": 1}, "induction_init"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        models.make_config("titans", "tiny", **overrides)


def test_training_length_must_fit_the_chunks():
    cfg = models.make_config("titans", "tiny")
    cfg.check_seq_len(64)
    with pytest.raises(ValueError, match=r"seq_len=60.*chunk_size=8"):
        cfg.check_seq_len(60)


def test_induction_init_matches_each_query_to_the_key_written_after_its_token():
    """induction_init: k_t is built from x_{t-1} with q's own projection, so on a sequence seen
    twice the query at a token of the second pass equals (cosine ~1) the key written where that
    token was the previous one in the first pass, and not the default init's (independent
    W_q, W_k: cosine ~0)."""
    a = _tokens(B=1, T=10, seed=3)
    tokens = jnp.concatenate([a, a], axis=1)

    def cos_q_to_written_key(**overrides):
        mix = _model(**overrides).blocks[0].memory
        h = jax.random.normal(jax.random.key(0), (V, 64))[tokens]  # distinct inputs per token
        q, k, *_ = mix._project(h)
        q_s, k_s = np.asarray(q[0, 10:19, 0]), np.asarray(k[0, 1:10, 0])  # q at x_i, k at x_i's
        return float(np.mean(np.sum(q_s * k_s, -1)))  # successor: both l2-normalised

    assert cos_q_to_written_key(induction_init=True) > 0.99
    assert abs(cos_q_to_written_key()) < 0.3

"""Splash (flash) attention on TPU (``kernels/splash.py``, ``attention_impl``).

Numerics run the kernel in the Pallas interpreter on one CPU device ("splash_interpret"), in
float32, against the XLA path (``jax.nn.dot_product_attention``) in float64 on the same inputs.
Tolerances are in units of float32's eps times the reference's largest entry: the kernel adds
the terms in tiles of 128-512 keys with an online-softmax rescale (q is scaled by 1/sqrt(K)
before the dot, exact here with K = 16), so its outputs are a few roundings from the exact
ones and its gradients, sums over up to T queries, a few more.  Measured against float64
(seeds 0-2, the three cases below, 2026-12-07): outputs <= 2.0 eps, gradients <= 6.3 eps;
hence 4 and 8.  The float64 oracle, not XLA's float32 path: that path is itself up to 9.6 eps
from float64 in dk with grouped heads on an AVX2 machine (the kernel 3.9 there), so a
float32-to-float32 comparison fails on the reference's rounding, not the kernel's.

Sharded runs are only traced here (the kernel inside shard_map, nowhere bare): the TPU
interpreter is never executed across several CPU devices (its barrier callbacks can deadlock).
The sharded TPU compile is tests/train/test_aot.py's (slow, needs libtpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested_jax import models
from nested_jax.kernels import splash, target_platform
from nested_jax.models import documents
from nested_jax.models.transformer import TransformerConfig

EPS = float(np.finfo(np.float32).eps)
FWD_ULPS, GRAD_ULPS = 4, 8


def _qkv(seed, B=2, T=384, H=4, G=2, K=16):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, H, K)), jax.random.normal(ks[1], (B, T, G, K)),
            jax.random.normal(ks[2], (B, T, G, K)), jax.random.normal(ks[3], (B, T, H, K)))


def _err(got, want):
    """max |got - want| in units of eps * max |want|."""
    diff = np.asarray(got, np.float64) - np.asarray(want, np.float64)
    return float(np.max(np.abs(diff))) / (EPS * float(np.max(np.abs(np.asarray(want)))))


def _value_and_vjp(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(ct))


def _xla_float64(q, k, v, ct, mask):
    """The XLA path's output and (dq, dk, dv) in float64 from the same (float32) inputs: the
    oracle.  x64 is on only here, so the kernel under test runs as it does everywhere else."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        args = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, ct)]
        m = None if mask is None else jnp.asarray(mask)
        xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, mask=m)
        return [np.asarray(x) for x in jax.jit(lambda *a: _value_and_vjp(xla, *a))(*args)]
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("T, G, docs", [(384, 2, False), (256, 4, False), (384, 4, True)])
def test_kernel_matches_xla_forward_and_gradient(T, G, docs):
    """T = 384: 3 x 3 tiles of 128 (the causal diagonal crosses tiles, tiles above it are
    skipped); T = 256: one tile; grouped-query heads (G = 2) and packed documents."""
    q, k, v, ct = _qkv(0, T=T, G=G)
    ids = None
    if docs:  # three documents and a padded tail
        seg = np.zeros((2, T), np.int32)
        seg[:, :100], seg[:, 100:250], seg[:, 250:T - 20] = 1, 2, 3
        seg[1, :37] = 4
        ids = documents.from_segment_ids(jnp.asarray(seg)).ids
        mask = documents.attention_mask(documents.from_segment_ids(jnp.asarray(seg)))
    kernel = lambda q, k, v: splash.attention(q, k, v, doc_ids_BxT=ids, interpret=True)
    got = [np.asarray(x) for x in jax.jit(lambda *a: _value_and_vjp(kernel, *a))(q, k, v, ct)]
    want = _xla_float64(q, k, v, ct, np.asarray(mask) if docs else None)
    errs = [_err(g, w) for g, w in zip(got, want, strict=True)]
    assert errs[0] <= FWD_ULPS, errs
    assert max(errs[1:]) <= GRAD_ULPS, errs  # dq, dk, dv


def _model(impl, **over):
    return models.create("transformer", "tiny", rngs=nnx.Rngs(0), attention_impl=impl, **over)


def _tokens(B=2, T=256, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, 256)


def _loss_and_grads(model, tokens):
    def loss(m):
        logits = m(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

    (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return value, logits, nnx.state(grads, nnx.Param)


def test_model_matches_xla_logits_and_parameter_gradients():
    """Transformer++ tiny (2 layers, 4 heads of 16) at T = 256: logits and every parameter
    gradient of the next-token loss, splash interpreted vs the XLA path."""
    tokens = _tokens(T=257)
    value, logits, grads = _loss_and_grads(_model("splash_interpret"), tokens)
    value0, logits0, grads0 = _loss_and_grads(_model(None), tokens)
    assert _err(logits, logits0) <= FWD_ULPS
    assert abs(float(value) - float(value0)) <= FWD_ULPS * EPS * float(value0)
    flat, flat0 = jax.tree.leaves(grads), jax.tree.leaves(grads0)
    assert len(flat) == len(flat0) > 0
    errs = [_err(g, g0) for g, g0 in zip(flat, flat0, strict=True)]
    assert max(errs) <= GRAD_ULPS, errs


def test_causality_a_future_token_changes_no_earlier_output():
    model = _model("splash_interpret")
    tokens = _tokens()
    forward = nnx.jit(lambda m, t: m(t))
    base = np.asarray(forward(model, tokens))
    for t in (5, 130, 255):  # inside the first tile, a later tile, the last position
        changed = np.asarray(forward(model, tokens.at[:, t].set((tokens[:, t] + 7) % 256)))
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert np.any(changed[:, t:] != base[:, t:])


def test_auto_is_the_xla_path_off_tpu_and_splash_on_tpu():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert jax.default_backend() == "cpu"
    assert splash.choose("auto", 256, 256, f32) == ""
    with target_platform("tpu"):
        assert splash.choose("auto", 256, 256, f32) == "splash"
        assert splash.choose("auto", 4096, 4096, bf16) == "splash"
        assert splash.choose("auto", 100, 100, f32) == ""  # not a multiple of 128: XLA
        assert splash.choose("auto", 256, 256, jnp.float16) == ""
    with target_platform("gpu"):
        assert splash.choose("auto", 256, 256, f32) == ""
    assert [splash.block_size(t) for t in (128, 256, 384, 1024, 4096, 100)] == [
        128, 256, 128, 512, 512, 0]
    # Off TPU, "auto" is the default path itself: the same program, the same numbers.
    tokens = _tokens(T=128)
    jaxpr = lambda m: str(jax.make_jaxpr(lambda t: m(t))(tokens))
    assert jaxpr(_model("auto")) == jaxpr(_model(None))
    np.testing.assert_array_equal(_model("auto")(tokens), _model(None)(tokens))


def _kernel_calls(jaxpr):
    """(pallas_calls inside a shard_map, pallas_calls reachable without one)."""
    inside = bare = 0
    for e in jaxpr.eqns:
        subs = [getattr(x, "jaxpr", x) for v in e.params.values()
                for x in (v if isinstance(v, tuple | list) else (v,))]
        subs = [j for j in subs if hasattr(j, "eqns")]
        if e.primitive.name == "pallas_call":
            bare += 1
        for j in subs:
            i, b = _kernel_calls(j)
            if e.primitive.name == "shard_map":
                inside += i + b
            else:
                inside, bare = inside + i, bare + b
    return inside, bare


def test_auto_on_tpu_runs_the_kernel_per_shard_under_a_mesh():
    """Traced for TPU under an 8-device mesh (batch over data, heads over tensor): every
    splash kernel sits inside a shard_map (Mosaic calls cannot be auto-partitioned)."""
    if jax.device_count() < 8 or not hasattr(jax, "set_mesh"):
        pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py and jax.set_mesh")
    auto = jax.sharding.AxisType.Auto  # the trainer's mesh (train/sharding.make_mesh)
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(auto,) * 3)
    model = _model("auto")
    tokens = _tokens(T=128)
    with target_platform("tpu"), jax.set_mesh(mesh):
        fwd = jax.make_jaxpr(lambda t: model(t))(tokens).jaxpr
        seg = jnp.ones((2, 128), jnp.int32).at[:, 64:].set(2)
        packed = jax.make_jaxpr(lambda t, s: model(t, segment_ids=s))(tokens, seg).jaxpr
        q, k, v, ct = _qkv(0, T=128, H=4, G=4)
        grad = jax.make_jaxpr(lambda *a: _value_and_vjp(splash.attention, *a))(q, k, v, ct)
    assert _kernel_calls(fwd) == (2, 0)  # one per layer, all per shard
    assert _kernel_calls(packed) == (2, 0)
    inside, bare = _kernel_calls(grad.jaxpr)
    assert inside >= 3 and bare == 0  # forward, dq and dkv kernels
    # Off TPU the same model traces no kernel.
    with jax.set_mesh(mesh):
        assert _kernel_calls(jax.make_jaxpr(lambda t: model(t))(tokens).jaxpr) == (0, 0)


def test_impossible_choices_name_the_field_and_the_fix():
    tokens = _tokens(T=128)
    with pytest.raises(ValueError, match=r"model\.attention_impl='splash'.*TPU.*'auto'"):
        _model("splash")(tokens)
    with pytest.raises(ValueError, match=r"model\.attention_impl='splash_interpret'.*"
                                         r"multiple of 128.*seq_len=128"):
        _model("splash_interpret")(_tokens(T=200))
    with target_platform("tpu"), pytest.raises(ValueError, match=r"multiple of 128"):
        _model("splash")(_tokens(T=100))
    with pytest.raises(ValueError, match=r"model\.attention_impl='splash_interpret'.*float16"):
        splash_layer = _model("splash_interpret", dtype="float16")
        splash_layer(tokens)
    with pytest.raises(ValueError, match="attention_impl"):
        _model("flash")
    cfg = TransformerConfig.from_preset("tiny", attention_impl="splash")
    with pytest.raises(ValueError, match=r"data\.seq_len=200.*multiple of 128.*'auto'"):
        cfg.check_seq_len(200, field="data.seq_len")
    cfg.check_seq_len(256, field="data.seq_len")
    TransformerConfig.from_preset("tiny", attention_impl="auto").check_seq_len(200)

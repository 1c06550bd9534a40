"""CMS (paper §5, eq. 71; decisions #12-#15) against per-token references, in float64.

The references below are written from the equations, independently of the engine: a Python loop
over tokens that reads the chunk-boundary weights and, once a chunk has ended, applies its
accumulated inner gradient (the teach signal from jax.grad of the next-token cross-entropy).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from nested_jax import memory as nm
from nested_jax.models import cms as C

D, V, F, B, T = 8, 11, 12, 2, 13
TOL = 1e-12
LR = (0.05, 0.03, 0.08)


def _setup(variant="sequential", signal="teach", periods=(3, 5, 2), lr=None, momentum=0.0,
           retention=1.0, dtype=jnp.float64, seed=0, teach_at="output", decay_to="zero",
           teach_stop_grad=False, first_order=False, remat_chunks=1):
    lr = LR[:len(periods)] if lr is None else lr
    spec = C.CMSSpec(d_model=D, periods=periods, d_ff=F, lr=lr, variant=variant, signal=signal,
                     momentum=momentum, retention=retention, teach_at=teach_at,
                     decay_to=decay_to, teach_stop_grad=teach_stop_grad,
                     first_order=first_order, remat_chunks=remat_chunks)
    model = C.CMS(spec, n_layers=2, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
    ks = jax.random.split(jax.random.key(seed + 1), 8)
    normal = lambda k, shape, std: std * jax.random.normal(k, shape, dtype)
    for i, p in enumerate(model.levels):  # non-trivial outer parameters everywhere
        p.gate[...] = normal(jax.random.fold_in(ks[0], i), (D, F), 0.3)
        p.up[...] = normal(jax.random.fold_in(ks[1], i), (D, F), 0.3)
        p.down[...] = normal(jax.random.fold_in(ks[2], i), (F, D), 0.2)
        p.norm.scale[...] = 1.0 + normal(jax.random.fold_in(ks[3], i), (D,), 0.2)
    model.lr_gate[...] = normal(ks[4], (spec.n_levels,), 0.3)
    if variant == "independent":
        model.mix[...] = 1.0 + normal(ks[5], (spec.n_levels,), 0.3)
    head = C.TeachHead(normal(ks[6], (V, D), 0.5), 1.0 + normal(ks[7], (D,), 0.2), 1e-6)
    tokens = jax.random.randint(jax.random.key(seed + 2), (B, T), 0, V)
    x = jax.random.normal(jax.random.key(seed + 3), (B, T, D), dtype)
    return model, head, tokens, x


# ---- independent references ------------------------------------------------------------------


def _rms(x, scale, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x * x) + eps) * scale


def _branch(w, scale, mix, r):
    n = _rms(r, scale)
    return mix * ((jax.nn.silu(n @ w["gate"]) * (n @ w["up"])) @ w["down"])


@functools.partial(jax.jit, static_argnames="signal")
def _token_grad(w, scale, mix, r, table, f_scale, next_tok, signal, block_in):
    """grad_W of one token's inner loss at weights w (the chunk boundary), from the definitions."""
    if signal == "teach":
        ce = lambda h: -jax.nn.log_softmax(table @ _rms(h, f_scale))[next_tok]
        delta = jax.grad(ce)(r + _branch(w, scale, mix, r))  # d CE / d (stream after the level)
        return jax.grad(lambda w: jnp.dot(_branch(w, scale, mix, r), delta))(w)
    if signal == "teach_input":  # the same error, taken once at the CMS input
        ce = lambda h: -jax.nn.log_softmax(table @ _rms(h, f_scale))[next_tok]
        delta = jax.grad(ce)(block_in)
        return jax.grad(lambda w: jnp.dot(_branch(w, scale, mix, r), delta))(w)
    n = _rms(r, scale)
    return jax.grad(lambda w: 0.5 * jnp.sum((_branch(w, scale, mix, r) - n) ** 2))(w)


_branch_jit = jax.jit(_branch)


def _level_args(model, i):
    s = model.spec
    p = model.levels[0 if s.variant == "nested" else i]
    mix = model.mix[...][i] if s.variant == "independent" else jnp.ones((), p.gate[...].dtype)
    return p.weights(), p.norm.scale[...], mix


def _signal(model):
    s = model.spec
    return "teach_input" if (s.signal, s.teach_at) == ("teach", "input") else s.signal


def _reference_level(model, i, r_TxD, tokens_T, head, block_in_TxD):
    """Eq. 71 for one level and one sequence, token by token. Returns the branch outputs."""
    s = model.spec
    w, scale, mix = _level_args(model, i)
    anchor = w if s.decay_to == "init" else jax.tree.map(jnp.zeros_like, w)
    eta = float(model.etas()[i])
    mom = jax.tree.map(jnp.zeros_like, w)
    boundary = w
    out = []
    for t in range(T):
        if t % s.periods[i] == 0:
            boundary = w  # the accumulated update of the last chunk becomes visible
        out.append(_branch_jit(boundary, scale, mix, r_TxD[t]))
        eta_t = 0.0 if (s.signal == "teach" and t == T - 1) else eta  # no next token: masked
        g = _token_grad(boundary, scale, mix, r_TxD[t], head.embedding_VxD, head.norm_scale_D,
                        tokens_T[min(t + 1, T - 1)], _signal(model), block_in_TxD[t])
        mom = jax.tree.map(lambda m, g: s.momentum * m - eta_t * g, mom, g)
        w = jax.tree.map(lambda a, a0, m: a0 + s.retention * (a - a0) + m, w, anchor, mom)
    return jnp.stack(out)


def _reference(model, head, tokens, x):
    s = model.spec
    outs = []
    for b in range(B):
        r, total = x[b], x[b]
        for i in range(s.n_levels):
            y = _reference_level(model, i, r, tokens[b], head, x[b])
            if s.variant == "sequential":
                r = r + y
            else:
                total = total + y
        outs.append(r if s.variant == "sequential" else total)
    return jnp.stack(outs)


def _reference_nested(model, head, tokens, x):
    """Nested variant token by token: Reptile absorption fast -> slow, then re-init slow -> fast."""
    s = model.spec
    K, P = s.n_levels, s.periods
    lam = [min(1.0, float(e)) for e in model.etas()]
    eta = float(model.etas()[K - 1])
    w0, scale, mix = _level_args(model, 0)
    outs = []
    for b in range(B):
        thetas = [w0] * K  # thetas[K-1] is the fast level, the one read
        boundary = w0
        ys = []
        for t in range(T):
            if t > 0:
                for si in reversed(range(K - 1)):
                    if t % P[si] == 0:
                        thetas[si] = jax.tree.map(lambda a, c, lm=lam[si]: a + lm * (c - a),
                                                  thetas[si], thetas[si + 1])
                for si in range(K - 1):
                    if t % P[si] == 0:
                        thetas[si + 1] = thetas[si]
            if t % P[-1] == 0:
                boundary = thetas[-1]
            ys.append(x[b, t] + _branch_jit(boundary, scale, mix, x[b, t]))
            eta_t = 0.0 if (s.signal == "teach" and t == T - 1) else eta
            g = _token_grad(boundary, scale, mix, x[b, t], head.embedding_VxD, head.norm_scale_D,
                            tokens[b, min(t + 1, T - 1)], _signal(model), x[b, t])
            thetas[-1] = jax.tree.map(lambda a, g: a - eta_t * g, thetas[-1], g)
        outs.append(jnp.stack(ys))
    return jnp.stack(outs)


def _forward(model, head, tokens, x):
    nxt = C.next_embeddings(head.embedding_VxD[tokens])
    return nnx.jit(lambda m, x, nxt: m(x, head, nxt))(model, x, nxt)


def _decode(model, head, tokens, x):
    emb = head.embedding_VxD[tokens]
    step = nnx.jit(lambda m, x, st, e: m.decode(x, st, head, e))
    state = model.init_state(x.shape[0])
    outs = []
    for t in range(T):
        y, state = step(model, x[:, t:t + 1], state, emb[:, t:t + 1])
        outs.append(y)
    return jnp.concatenate(outs, axis=1)


def _static(model, x):
    """Every lr 0: a stack of residual SwiGLU MLPs with the initial weights."""
    s = model.spec
    r, total = x, x
    for i in range(s.n_levels):
        w, scale, mix = _level_args(model, i)
        y = jax.vmap(jax.vmap(lambda z, w=w, scale=scale, mix=mix: _branch(w, scale, mix, z)))(r)
        if s.variant == "nested":
            return x + y
        if s.variant == "sequential":
            r = r + y
        else:
            total = total + y
    return r if s.variant == "sequential" else total


# ---- tests ----------------------------------------------------------------------------------


def test_teach_delta_is_the_logit_lens_gradient(x64):
    """delta = d/dh CE(E RMSNorm_f(h), x_{t+1}): the next-token error through norm + tied head."""
    _, head, tokens, x = _setup()
    for t in range(3):
        h, nxt = x[0, t], tokens[0, t + 1]
        want = jax.grad(lambda h: -jax.nn.log_softmax(
            head.embedding_VxD @ _rms(h, head.norm_scale_D))[nxt])(h)
        got = C.teach_delta(head, h, head.embedding_VxD[nxt])
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("signal", ["teach", "reconstruction"])
def test_level_chunked_equals_engine_oracle(x64, signal):
    """A CMS level on the engine: the chunked path at C = 1 == the per-token oracle."""
    model, head, tokens, x = _setup(signal=signal)
    level = model._level(0, head)
    st = model._init_state(0, B)
    q = x[:, :, None]
    v = C.next_embeddings(head.embedding_VxD[tokens])[:, :, None]
    g = model._gates(0, jnp.ones((B, T), jnp.float64))
    run = jax.jit(lambda path: nm.apply(level, st, q, q, v, g, chunk_size=1, path=path),
                  static_argnums=0)
    for a, b in zip(jax.tree.leaves(run("oracle")), jax.tree.leaves(run("chunked")), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


CASES = [
    dict(variant="sequential", signal="teach"),
    dict(variant="sequential", signal="reconstruction", periods=(3, 5)),
    dict(variant="independent", signal="teach", periods=(3, 5)),
    dict(variant="sequential", signal="teach", periods=(3,), momentum=0.6, retention=0.9),
    dict(variant="sequential", signal="teach", periods=(3, 5), teach_at="input"),
    dict(variant="sequential", signal="teach", periods=(3,), momentum=0.6, retention=0.9,
         decay_to="init"),
    dict(variant="independent", signal="teach", periods=(3, 5), retention=0.8, decay_to="init"),
    dict(variant="nested", signal="teach", periods=(6, 3, 1), lr=(0.5, 0.7, 0.05)),
    dict(variant="nested", signal="reconstruction", periods=(4, 2), lr=(0.5, 0.05)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_forward_equals_reference_and_decode(x64, case):
    """Eq. 71: boundary reads, the chunk's accumulated inner gradient visible from the next chunk,
    ragged last chunks (T = 13), the last token masked for the teach signal (nested: the Reptile
    reading of the module docstring).  Streaming, where the write of token t lands at step t + 1,
    gives the same outputs."""
    model, head, tokens, x = _setup(**case)
    got = _forward(model, head, tokens, x)
    ref = _reference_nested if case["variant"] == "nested" else _reference
    np.testing.assert_allclose(got, ref(model, head, tokens, x), rtol=0, atol=1e-10)
    np.testing.assert_allclose(_decode(model, head, tokens, x), got, rtol=0, atol=TOL)
    assert float(jnp.max(jnp.abs(got - _static(model, x)))) > 1e-2  # the levels did learn


@pytest.mark.parametrize("variant", ["sequential", "independent", "nested"])
def test_zero_learning_rates_give_the_static_network(x64, variant):
    periods = (4, 2) if variant == "nested" else (3, 5)
    model, head, tokens, x = _setup(variant, periods=periods, lr=0.0)
    np.testing.assert_allclose(_forward(model, head, tokens, x), _static(model, x), rtol=0,
                               atol=TOL)


STATIC_CASES = [
    dict(variant="sequential", periods=(3, 5), lr=0.0),
    dict(variant="sequential", periods=(3, 5), lr=(0.05, 0.0)),  # one level learns, one is static
    dict(variant="independent", periods=(3, 5), lr=(0.0, 0.03)),
    dict(variant="nested", periods=(4, 2), lr=0.0),
    dict(variant="sequential", periods=(3,), lr=0.0, retention=0.5, decay_to="init"),
    dict(variant="sequential", periods=(3, 5), lr=0.0, teach_at="input"),
    dict(variant="sequential", signal="reconstruction", periods=(3, 5), lr=0.0),
]


@pytest.mark.parametrize("case", STATIC_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_static_levels_skip_the_engine_exactly(x64, monkeypatch, case):
    """A level that never changes (lr 0, no decay of its weights) is read at its initial weights
    for the whole sequence instead of through the engine's chunked scan.  Oracle: the same model
    forced through the scan; the forward and the outer gradient of every parameter agree."""
    model, head, tokens, x = _setup(**case)
    nxt = C.next_embeddings(head.embedding_VxD[tokens])
    loss = lambda m, x: jnp.sum(jnp.sin(m(x, head, nxt)))

    def run():
        out = nnx.jit(lambda m, x: m(x, head, nxt))(model, x)
        g_model, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(model, x)
        return out, nnx.state(g_model, nnx.Param), g_x

    assert any(model._static(i) for i in range(model.spec.n_levels))
    fast = run()
    monkeypatch.setattr(C.CMS, "_static", lambda self, i: False)
    slow = run()
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


def test_decay_to_init_forgets_the_context_not_the_weights(x64):
    """decisions #28: with ``decay_to="init"`` retention decays only the in-context change.
    Without writes (lr 0) the level is the static network at any retention, where
    ``decay_to="zero"`` shrinks the meta-learned weights themselves; at retention 1 the two are
    the same function (the fast state is W - W_0 instead of W)."""
    model, head, tokens, x = _setup(periods=(3, 5), lr=0.0, retention=0.5, decay_to="init")
    np.testing.assert_allclose(_forward(model, head, tokens, x), _static(model, x), rtol=0,
                               atol=TOL)
    model, head, tokens, x = _setup(periods=(3, 5), lr=0.0, retention=0.5)
    assert float(jnp.max(jnp.abs(_forward(model, head, tokens, x) - _static(model, x)))) > 1e-2
    outs = [_forward(*_setup(periods=(3, 5), decay_to=d)) for d in ("zero", "init")]
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=TOL)


@pytest.mark.parametrize("decay_to", ["zero", "init"])
def test_outer_gradients_reach_the_initial_weights_with_retention(decay_to):
    """The meta-learned weights get finite, non-zero outer gradients whichever way retention
    decays (with ``init`` they reach the read through the closed-over base, not the state)."""
    model, head, tokens, x = _setup(periods=(3, 5), retention=0.9, decay_to=decay_to,
                                    dtype=jnp.float32)
    nxt = C.next_embeddings(head.embedding_VxD[tokens])
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, head, nxt) ** 2)))(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(g)), path
        assert float(jnp.max(jnp.abs(g))) > 0, path


@pytest.mark.parametrize("variant", ["independent", "nested"])  # sequential: Hope-Attention test
def test_outer_gradients_reach_every_initial_state(variant):
    """Levels' initial weights are meta-learned: outer gradients reach all of them, finite."""
    periods = (4, 2) if variant == "nested" else (3, 5)
    model, head, tokens, x = _setup(variant, periods=periods, dtype=jnp.float32)
    nxt = C.next_embeddings(head.embedding_VxD[tokens])
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, head, nxt) ** 2)))(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(g)), path
        assert float(jnp.max(jnp.abs(g))) > 0, path


@pytest.mark.parametrize("teach_stop_grad", [False, True])
def test_outer_gradient_is_the_derivative_of_the_forward(x64, teach_stop_grad):
    """decisions #28: the outer gradient is the derivative of the forward (``check_grads``:
    central differences in float64 along random directions in every outer parameter).  The
    teach signal delta depends on the level's weights; with ``teach_stop_grad`` (the earlier
    form) the gradient skips that dependence and is not the forward's derivative."""
    model, head, tokens, x = _setup(periods=(3, 5), teach_stop_grad=teach_stop_grad)
    nxt = C.next_embeddings(head.embedding_VxD[tokens])
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    f = jax.jit(lambda p: jnp.sum(jnp.sin(nnx.merge(graph, p, rest)(x, head, nxt))))
    check = lambda: check_grads(f, (params,), order=1, modes=["rev"], atol=1e-7, rtol=1e-7,
                                eps=1e-5)
    if teach_stop_grad:
        with pytest.raises(AssertionError):
            check()
    else:
        check()


def test_the_write_does_not_differentiate_its_teach_target(x64):
    """A write is J_y^T delta: delta is the inner problem's target, so the inner gradient must
    not back-propagate into it (``inner_dot``'s zero cotangent is symbolic).  An instantiated
    zero ran the transpose of delta's logit-lens JVP on zeros, a [tokens, vocab] computation per
    level that the outer gradient then differentiated again: HopeLM's CPU-scale train step took
    18.2 s instead of 9.3.  Property: the forward (which contains every write) compiles to the
    same FLOPs with the exact outer gradient as with the stop-gradient target."""
    flops = {}
    for stop in (False, True):
        model, head, tokens, x = _setup(periods=(3, 5), teach_stop_grad=stop)
        nxt = C.next_embeddings(head.embedding_VxD[tokens])
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        f = lambda p, graph=graph, rest=rest, x=x, head=head, nxt=nxt: jnp.sum(
            nnx.merge(graph, p, rest)(x, head, nxt))
        flops[stop] = jax.jit(f).lower(params).compile().cost_analysis()["flops"]
    assert flops[False] == flops[True]


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_first_order_keeps_the_forward_and_changes_only_the_gradient(x64, variant):
    """decisions #29: ``first_order`` runs the same forward (bitwise) and a different outer
    gradient, one that is not the forward's derivative (which the exact one is, above); the
    initial weights still get a gradient through every later chunk's read."""
    periods = (6, 3) if variant == "nested" else (3, 5)
    runs = {}
    for fo in (False, True):
        model, head, tokens, x = _setup(variant, periods=periods, first_order=fo)
        nxt = C.next_embeddings(head.embedding_VxD[tokens])
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        f = jax.jit(lambda p, graph=graph, rest=rest, x=x, head=head, nxt=nxt: jnp.sum(
            jnp.sin(nnx.merge(graph, p, rest)(x, head, nxt))))
        runs[fo] = f(params), jax.grad(f)(params), f, params
    assert runs[True][0] == runs[False][0]
    g_exact, g_first = (jax.tree.leaves(runs[fo][1]) for fo in (False, True))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g_exact, g_first, strict=True)) > 1e-4
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in g_first)
    _, _, f, params = runs[True]
    with pytest.raises(AssertionError):
        check_grads(f, (params,), order=1, modes=["rev"], atol=1e-7, rtol=1e-7, eps=1e-5)


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_fewer_stored_states_keep_the_forward_and_the_gradient(x64, variant):
    """``remat_chunks`` (one stored state per g chunks, ``memory/chunked.py::_scan_stored``)
    is memory only: the same outputs and outer gradients as one state per chunk.  T = 13 at
    periods (3, 5, 2): groups of 2 over 4 and 6 full chunks, and a level too short to group."""
    periods = (6, 3) if variant == "nested" else (3, 5, 2)
    runs = {}
    for g in (1, 2):
        model, head, tokens, x = _setup(variant, periods=periods, remat_chunks=g)
        nxt = C.next_embeddings(head.embedding_VxD[tokens])
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        f = jax.jit(lambda p, graph=graph, rest=rest, x=x, head=head, nxt=nxt: jnp.sum(
            jnp.sin(nnx.merge(graph, p, rest)(x, head, nxt))))
        runs[g] = f(params), jax.grad(f)(params)
    assert abs(float(runs[1][0] - runs[2][0])) < TOL
    for a, b in zip(jax.tree.leaves(runs[1][1]), jax.tree.leaves(runs[2][1]), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=TOL)


def test_initial_weights_reach_later_chunks_through_the_updates(x64):
    """d out[t >= C] / d W_init differs from the static network's: gradients flow through the
    inner updates (decision #4), not only through the read."""
    model, head, tokens, x = _setup(periods=(4,), lr=0.1)
    nxt = C.next_embeddings(head.embedding_VxD[tokens])
    loss = lambda m: jnp.sum(m(x, head, nxt)[:, 4:])
    grad = nnx.jit(nnx.grad(loss))
    learned = grad(model).levels[0].gate[...]
    model.lr_gate[...] = jnp.full((1,), -jnp.inf)  # eta = 0 exactly
    static = grad(model).levels[0].gate[...]
    assert float(jnp.max(jnp.abs(learned - static))) > 1e-6


def test_batch_rows_have_their_own_fast_state(x64):
    model, head, tokens, x = _setup(periods=(3,))
    full = _forward(model, head, tokens, x)
    one = _forward(model, head, tokens[1:], x[1:])
    np.testing.assert_allclose(one[0], full[1], rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(periods=()), "periods"),
        (dict(periods=(4, 0)), "periods"),
        (dict(periods=(4, 2.5)), "periods"),
        (dict(periods=(4, 8), d_ff=(8, 8, 8)), "d_ff"),
        (dict(periods=(4,), d_ff=0), "d_ff"),
        (dict(periods=(4,), lr=-1.0), "lr"),
        (dict(periods=(4,), variant="stacked"), "variant"),
        (dict(periods=(4,), signal="l1"), "signal"),
        (dict(periods=(4,), teach_at="middle"), "teach_at"),
        (dict(periods=(4,), momentum=1.0), "momentum"),
        (dict(periods=(4,), retention=0.0), "retention"),
        (dict(periods=(4,), decay_to="one"), "decay_to"),
        (dict(periods=(4,), teach_stop_grad=1), "teach_stop_grad"),
        (dict(periods=(4,), first_order="yes"), "first_order"),
        (dict(periods=(4,), remat_chunks=0), "remat_chunks"),
        (dict(periods=(4,), remat_chunks=True), "remat_chunks"),
        (dict(periods=(8, 4), variant="nested", decay_to="init"), "decay_to"),
        (dict(periods=(4, 8), variant="nested"), "periods"),
        (dict(periods=(8, 3), variant="nested"), "periods"),
        (dict(periods=(8, 4), variant="nested", d_ff=(8, 16)), "d_ff"),
        (dict(periods=(8, 4), variant="nested", lr=(1.5, 0.1)), "lr"),
    ],
)
def test_spec_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        C.CMSSpec(d_model=D, **kw)


def test_teach_signal_needs_the_head():
    model, _, _, x = _setup(dtype=jnp.float32)
    with pytest.raises(ValueError, match="TeachHead"):
        model(x, None, x)

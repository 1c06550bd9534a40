"""The strictly causal "prior" read, o_t = M_{t-1}(q_t) (decisions.md #20), in float64.

The oracle reads the pre-write state token by token (the definition); the chunked and dual
paths get it from their online read through ``memory.prior_read`` (queries one position
earlier).  Streaming, which reads its carried state directly, is compared in test_streaming.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from nested_jax import memory as nm
from tests.memory.helpers import inputs, max_diff

D = 6
MEMORIES = {"linear": nm.LinearMemory(D, D), "mlp": nm.MLPMemory(D, D, hidden=8)}
RULES = {"titans": nm.TITANS, "dgd": nm.DGD, "delta": nm.DELTA}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("mem", sorted(MEMORIES))
def test_prior_read_paths_agree(x64, mem, rule):
    level = nm.Level(MEMORIES[mem], "l2", RULES[rule], "prior", self_target=(mem == "mlp"))
    st, q, k, v, g = inputs(level, jax.random.key(1), B=2, T=13, H=2, eta_scale=0.5)
    ref = nm.apply(level, st, q, k, v, g, path="oracle")
    assert max_diff(ref, nm.apply(level, st, q, k, v, g, chunk_size=1, path="chunked")) < 1e-12
    for C in (1, 4, 13):
        chunked = nm.apply(level, st, q, k, v, g, chunk_size=C, path="chunked")
        assert max_diff(chunked, nm.apply(level, st, q, k, v, g, chunk_size=C,
                                          path="dual")) < 1e-12, C


@pytest.mark.parametrize("mem", sorted(MEMORIES))
def test_prior_read_is_the_online_read_one_token_late(x64, mem):
    """o_t(prior) = M_{t-1}(q_t): at t = 0 the initial state's read, and the final state is the
    online path's (the writes do not change)."""
    online = nm.Level(MEMORIES[mem], "l2", nm.DELTA, "online")
    prior = dataclasses.replace(online, read="prior")
    st, q, k, v, g = inputs(online, jax.random.key(2), B=1, T=9, H=1, eta_scale=0.8)
    o_p, fin_p = nm.apply(prior, st, q, k, v, g, path="oracle")
    _, fin_o = nm.apply(online, st, q, k, v, g, path="oracle")
    assert max_diff(fin_p, fin_o) == 0.0
    first = MEMORIES[mem].apply(jax.tree.map(lambda x: x[0, 0], st.params), q[0, 0, 0])
    assert max_diff(o_p[0, 0, 0], first) < 1e-14
    for t in range(1, 9):  # the online read of the first t tokens, with q_t as query
        o_t, _ = nm.apply(online, st, q[:, :t].at[:, t - 1].set(q[:, t]), k[:, :t], v[:, :t],
                          nm.Gates(*(x[:, :t] for x in g)), path="oracle")
        assert max_diff(o_p[:, t], o_t[:, t - 1]) < 1e-14, t


@pytest.mark.parametrize("path,C", [("oracle", 1), ("chunked", 4), ("dual", 4)])
def test_prior_read_is_strictly_causal(x64, path, C):
    """o_t does not depend on token t's own key, target or gates (online reads do)."""
    level = nm.Level(MEMORIES["mlp"], "l2", nm.DELTA, "prior")
    st, q, k, v, g = inputs(level, jax.random.key(3), B=1, T=8, H=1)
    t = 5

    def o_t(k, v, eta, read):
        lv = dataclasses.replace(level, read=read)
        return nm.apply(lv, st, q, k, v, nm.Gates(eta, g.alpha, g.beta), chunk_size=C,
                        path=path)[0][0, t, 0].sum()

    for read, own in (("prior", 0.0), ("online", None)):
        dk, dv, deta = jax.grad(o_t, argnums=(0, 1, 2))(k, v, g.eta, read)
        mags = [float(jnp.abs(x[0, t]).max()) for x in (dk, dv, deta)]
        if own is None:
            assert min(mags) > 1e-6, mags  # the online read sees its own write
        else:
            assert max(mags) == own, mags
        assert float(jnp.abs(dv[0, t - 1]).max()) > 1e-6  # the previous write is read

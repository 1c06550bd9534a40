"""Streaming: token-by-token ``stream_step`` equals the parallel paths on every prefix."""

import jax
import jax.numpy as jnp
import pytest

from nested_jax import memory as nm
from tests.memory.helpers import inputs, max_diff

D = 6


def _assert_stream_equals(level, st, q, k, v, g, C, o_par, final_par):
    """Token-by-token stream_step reproduces the parallel outputs and final state (float64)."""
    step = jax.jit(lambda s, *x: nm.stream_step(level, s, *x, chunk_size=C))
    s = nm.stream_init(st)
    outs = []
    for t in range(q.shape[1]):
        o, s = step(s, q[:, t], k[:, t], v[:, t], nm.Gates(*(x[:, t] for x in g)))
        outs.append(o)
    assert max_diff(jnp.stack(outs, axis=1), o_par) < 1e-12
    assert max_diff(nm.MemoryState(s.params, s.mom), final_par) < 1e-12


@pytest.mark.parametrize("read", ["online", "prior", "boundary"])
@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("C", [1, 4])
def test_stream_equals_dual(x64, read, mem, C):
    memory = nm.LinearMemory(D, D) if mem == "linear" else nm.MLPMemory(D, D, hidden=8)
    level = nm.Level(memory, "l2", nm.DGD, read, self_target=(mem == "mlp"))
    st, q, k, v, g = inputs(level, jax.random.key(0), B=2, T=11, H=2, eta_scale=0.2)
    o_par, final_par = nm.apply(level, st, q, k, v, g, chunk_size=C, path="dual")
    _assert_stream_equals(level, st, q, k, v, g, C, o_par, final_par)


@pytest.mark.parametrize("mem", ["linear", "mlp"])
def test_stream_equals_dual_with_chunk_normalised_steps(x64, mem):
    """Rule.normalized at C = 4: the stream carries the gain its chunk has spent so far
    (``StreamState.seen``) and must reproduce the dual form's chunk-wide step normalisation."""
    memory = nm.LinearMemory(D, D) if mem == "linear" else nm.MLPMemory(D, D, hidden=8)
    level = nm.Level(memory, "l2", nm.Rule(momentum=True, normalized=True))
    st, q, k, v, g = inputs(level, jax.random.key(1), B=2, T=11, H=2, eta_scale=2.0)
    o_par, final_par = nm.apply(level, st, q, k, v, g, chunk_size=4, path="dual")
    _assert_stream_equals(level, st, q, k, v, g, 4, o_par, final_par)

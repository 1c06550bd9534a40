"""A nesting level: fast parameters + read-out + inner objective + inner update rule.

decisions.md #1: a level is a pure function of its initial state and its context flow.
The context flow of a memory level is the token stream (q_t, k_t, v_t, eta_t, alpha_t, beta_t):
k/v are the keys and targets of the inner objective, q the read-out query, and the gates
are per-token scalars.  Everything here is for ONE sequence and ONE head; batching and heads
are ``vmap`` (see ``api.py``), so the fast state is always per sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nested_jax.memory import objectives
from nested_jax.memory.rules import Rule

READS = ("online", "prior", "boundary")


class MemoryState(NamedTuple):
    params: Any  # memory params pytree, e.g. {"W": f[dv, dk]}
    mom: Any  # momentum S, same structure as params


class Gates(NamedTuple):
    eta: jax.Array  # f[T] inner learning rate, >= 0
    alpha: jax.Array  # f[T] retention / weight decay, in [0, 1]
    beta: jax.Array  # f[T] momentum decay, in [0, 1]


@dataclasses.dataclass(frozen=True)
class Level:
    """Configuration of one level.

    read: "online" -- token t reads the state after the updates of tokens <= t (the dual form,
          decisions.md #2); "prior" -- token t reads the state before its own write,
          o_t = M_{t-1}(q_t), the paper's strictly causal read (decisions.md #20); "boundary" --
          every token of a chunk reads the chunk-boundary state and the chunk's accumulated
          update is visible from the next chunk (CMS, eq. 71).
    stop_grad: ablation (decisions.md #4): the update inputs k, v and gates are wrapped in
          stop_gradient, so outer gradients reach queries and the initial state only.
    first_order: the outer gradient does not differentiate a write through the state it is
          taken at (decisions.md #29): each inner gradient (and step size, and self-generated
          target) is evaluated at stop_gradient(boundary), so the carry W_{t+1} = f(W_t) + D_t
          passes cotangents back through the rule's own linear factors only (retention, DGD,
          momentum), never through d D_t / d W_t, as first-order MAML drops the inner Hessian.
          The forward is unchanged.  Chunked and oracle paths only (the dual form and the
          kernels differentiate through the state by construction).
    self_target: self-generated targets vhat_t = M_b(v_t) (Hope eq. 84, decisions.md #8), read
          from the chunk-boundary state.  vhat is a constant of the inner problem (the inner
          gradient is w.r.t. the memory only) but the outer gradient flows through it.
    normalize_target: with self_target, the target is l2(M_b(v_t)).  A self-generated target
          moves with the memory it trains: writing M(k) <- M_b(v) with k close to v changes M
          along k by about M_b(v) - M_b(k) + (v - k) per token, a drift nothing bounds when
          retention alpha is 1.  On the unit sphere (where k, q and v already live) the target
          is bounded, so a contractive write (``Rule.delta``) keeps the memory bounded too.

    ``memory`` is any object with ``dk``, ``dv``, ``init(key, dtype)``, ``apply(params, x)`` and
    ``layer_inputs(params, x, all_layers)`` (``LinearMemory``, ``MLPMemory`` or a model's own).
    """

    memory: Any  # LinearMemory, MLPMemory or a compatible object
    objective: str = "l2"
    rule: Rule = Rule()
    read: str = "online"
    stop_grad: bool = False
    first_order: bool = False
    self_target: bool = False
    normalize_target: bool = False

    def __post_init__(self):
        missing = [a for a in ("dk", "dv", "init", "apply", "layer_inputs")
                   if not hasattr(self.memory, a)]
        if missing:
            raise ValueError(f"memory={self.memory!r} lacks {missing}; use LinearMemory, "
                             "MLPMemory or an object with the same methods.")
        if self.normalize_target and not self.self_target:
            raise ValueError("normalize_target=True normalises self-generated targets; set "
                             "self_target=True as well (external targets are the caller's).")
        if self.self_target and self.memory.dk != self.memory.dv:
            raise ValueError(f"self_target=True applies the memory to v, so it needs dk == dv; "
                             f"got dk={self.memory.dk}, dv={self.memory.dv}.")
        objectives.check(self.objective)
        if not isinstance(self.rule, Rule):
            raise ValueError(f"rule={self.rule!r} must be a nested_jax.memory.Rule.")
        if self.rule.normalized and not hasattr(self.memory, "write_gain"):
            raise ValueError(f"Rule.normalized=True needs memory.write_gain(params, x); "
                             f"{self.memory} has none: add it, or use Rule(normalized=False).")
        if self.read not in READS:
            raise ValueError(f"read={self.read!r} is unknown; use one of {READS}.")
        if self.rule.delta:
            if self.objective != "l2":
                raise ValueError(f"Rule.delta=True removes the l2 error's own term; "
                                 f"objective={self.objective!r} has none: use objective='l2'.")
            single = len(jax.eval_shape(lambda: self.memory.init(jax.random.key(0)))) == 1
            if not hasattr(self.memory, "output_layer") or not (
                    single or self.rule.dgd_all_layers):
                raise ValueError("Rule.delta=True needs DGD's factor on the output-side matrix: "
                                 "use Rule(dgd=True, dgd_all_layers=True, delta=True) for a "
                                 f"multi-layer memory ({self.memory}).")

    def grad_point(self, boundary):
        """Where the writes are differentiated from: the boundary state, or a stop-gradient
        copy of it under ``first_order`` (same values)."""
        return jax.lax.stop_gradient(boundary) if self.first_order else boundary

    def init_state(self, key, dtype=jnp.float32) -> MemoryState:
        params = self.memory.init(key, dtype)
        return MemoryState(params, jax.tree.map(jnp.zeros_like, params))

    def inner_loss(self, params, k, v):
        return objectives.loss(self.objective, self.memory.apply(params, k), v)

    def inner_grad(self, params, k, v):
        """grad_M L(M(k); v): the write of one token (v is a constant of the inner problem)."""
        return jax.grad(self.inner_loss)(params, k, v)

    def target(self, boundary, v):
        """The inner objective's target: v, or vhat = M_b(v) with self_target (l2-normalised
        under normalize_target).  v may carry leading axes (the dual form's [C, dv] rows)."""
        if not self.self_target:
            return v
        vhat = jnp.vectorize(lambda x: self.memory.apply(boundary, x), signature="(d)->(e)")(v)
        if self.normalize_target:
            vhat = vhat * jax.lax.rsqrt(jnp.sum(vhat * vhat, axis=-1, keepdims=True) + 1e-6)
        return vhat

    def layer_inputs(self, params, k):
        return self.memory.layer_inputs(params, k, self.rule.dgd_all_layers)

    def chunk_steps(self, boundary, k, eta, seen=0.0):
        """The steps of C tokens whose writes all read the same boundary state.

        k f[C, d], eta f[C]; ``seen`` is the gain already spent in this chunk by earlier tokens
        (the streaming path's carry).  Returns (steps f[C], seen after the C tokens).  Without
        ``Rule.normalized`` the steps are eta.  Under it, with a_t = eta_t G_t
        (G = ``memory.write_gain(boundary, k_t)``) and P_t = seen + a_1 + ... + a_t::

            step_t = eta_t / ((1 + P_{t-1}) (1 + P_t))

        One token alone (C = 1, the oracle) gets eta / (1 + eta G), normalised LMS.  Why the
        chunk's earlier gains enter: the writes of a chunk all take their error at the boundary,
        so their effects on M add up without seeing each other; normalising each one alone
        lets C of them along shared directions move M(k) by up to C times its error (TitansLM's
        MLP memory, C = 64, diverged so past its training length; decisions #30).  The product
        telescopes: sum_t step_t G_t = 1/(1 + seen) - 1/(1 + P_C) < 1, so the chunk's summed
        write never overshoots, whatever its keys, and every step stays causal.
        """
        if not self.rule.normalized:
            return eta, seen
        a = eta * jax.vmap(self.memory.write_gain, in_axes=(None, 0))(boundary, k)
        upto = seen + jnp.cumsum(a)
        before = jnp.concatenate([jnp.full_like(a[:1], seen), upto[:-1]])
        return eta / ((1.0 + before) * (1.0 + upto)), upto[-1]

    def writes(self, boundary, k, v):
        """(inner gradients, DGD layer inputs) of one token, both at the boundary state.

        Under ``Rule.delta`` the error back-propagated to every matrix drops the output-side
        matrix's own term W_o,b x (rules.py): DGD's factors are then the only decay.
        """
        target = self.target(boundary, v)
        inputs = self.layer_inputs(boundary, k)
        if not self.rule.delta:
            return self.inner_grad(boundary, k, target), inputs
        y, vjp = jax.vjp(lambda p: self.memory.apply(p, k), boundary)
        name = self.memory.output_layer
        u = objectives.error(self.objective, y, target) - boundary[name] @ inputs[name]
        return vjp(u)[0], inputs


def maybe_stop(level: Level, k, v, gates: Gates):
    if not level.stop_grad:
        return k, v, gates
    sg = jax.lax.stop_gradient
    return sg(k), sg(v), Gates(*map(sg, gates))

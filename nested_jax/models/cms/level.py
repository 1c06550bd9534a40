"""A CMS level as an engine level: the SwiGLU fast memory and the level whose inner loss is the
CMS signal (teach, given or reconstruction; ``nested_jax/models/cms/__init__.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from nested_jax import memory as nm
from nested_jax.memory import objectives
from nested_jax.models.cms.teach import TeachHead, teach_delta
from nested_jax.models.layers import rms_normalize


@jax.custom_vjp
def inner_dot(y, delta):
    """<y, delta> whose gradient w.r.t. delta is zero: delta is the inner problem's target.

    The inner gradient is then J_y^T delta, as with a stop-gradient delta, but the outer
    gradient, which differentiates that inner gradient, still flows through delta's dependence
    on the level's weights: the exact derivative of the forward (decisions.md #28)."""
    return jnp.sum(y * delta)


def _inner_dot_fwd(y, delta):
    return inner_dot(y, delta), delta


def _inner_dot_bwd(delta, ct):
    # None, a symbolic zero: an instantiated zeros_like made the inner gradient run the transpose
    # of delta's logit-lens JVP on zeros ([tokens, vocab] work per level, then differentiated
    # again by the outer gradient): HopeLM's CPU-scale train step 18.2 s instead of 9.3.
    return ct * delta, None


inner_dot.defvjp(_inner_dot_fwd, _inner_dot_bwd)


@dataclasses.dataclass(frozen=True, eq=False)
class SwiGLUMemory:
    """A CMS level's memory for the engine: y = w * W_down(silu(W_gate n) * W_up n), n = RMSNorm(x).

    Fast params {"gate": [D, F], "up": [D, F], "down": [F, D]} in nnx.Linear's kernel layout
    (x @ W), so ad-hoc stacking copies Transformer++ kernels as they are.  ``norm_scale`` and
    ``out_scale`` are outer parameters closed over (not fast state).  The read-out is the residual
    branch only; the stream after the level is x + apply(params, x).  No DGD (layer_inputs None).
    """

    dk: int
    dv: int
    hidden: int
    norm_scale: Any
    eps: float
    out_scale: Any = None
    base: Any = None

    def init(self, key, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        std = 0.02
        return {"gate": std * jax.random.normal(k1, (self.dk, self.hidden), dtype),
                "up": std * jax.random.normal(k2, (self.dk, self.hidden), dtype),
                "down": jnp.zeros((self.hidden, self.dv), dtype)}

    def parts(self, params, x_D):
        """(normalised input n, branch output y) for one token."""
        n = rms_normalize(x_D, self.norm_scale, self.eps)
        if self.base is not None:
            params = {k: self.base[k] + v for k, v in params.items()}
        w = {k: v.astype(x_D.dtype) for k, v in params.items()}
        a = jax.nn.silu(n @ w["gate"]) * (n @ w["up"])
        y = a @ w["down"]
        if self.out_scale is not None:
            y = y * self.out_scale.astype(y.dtype)
        return n, y

    def apply(self, params, x_D):
        return self.parts(params, x_D)[1]

    def layer_inputs(self, params, x, all_layers: bool = False):
        del x, all_layers
        return {k: None for k in params}


@dataclasses.dataclass(frozen=True, eq=False)
class CMSLevel(nm.Level):
    """An engine level whose inner loss is the CMS signal (the engine's objectives are its base).

    "teach": loss = <y, delta(x + y)> with delta a target of the inner problem (``inner_dot``),
    taken at the parameters the engine differentiates at (always the chunk boundary); the outer
    gradient flows through delta unless ``teach_stop_grad`` (a stop-gradient delta, the earlier
    form) or ``first_order`` (the engine's first-order gradient, which then also holds delta
    constant: the update enters the outer gradient through its inputs and J_y only).
    "given": loss = dot(y, v), v = -delta precomputed by the caller (``teach_at="input"``).
    "reconstruction": loss = l2(y, sg(RMSNorm(x))).
    """

    signal: str = "teach"
    head: TeachHead | None = None
    teach_stop_grad: bool = False

    def inner_loss(self, params, k, v):
        if self.signal == "teach":
            y = self.memory.apply(params, k)
            delta = teach_delta(self.head, k + y, v)
            # first_order: the target is a constant of the outer problem too (decisions.md #29)
            if self.teach_stop_grad or self.first_order:
                delta = jax.lax.stop_gradient(delta)
            return inner_dot(y, delta)
        if self.signal == "given":
            return objectives.loss("dot", self.memory.apply(params, k), v)
        n, y = self.memory.parts(params, k)
        return objectives.loss("l2", y, jax.lax.stop_gradient(n))

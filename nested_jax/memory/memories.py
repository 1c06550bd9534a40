"""Memory architectures: the fast parameters of a level and their read-out.

Every memory is a frozen dataclass with three pure functions over a params pytree:
  ``init(key, dtype)``            -> params
  ``apply(params, x_D)``          -> y_Dv            (the read-out, M(x))
  ``layer_inputs(params, x_D)``   -> pytree like params: the input vector of each
                                     weight matrix at x, or None for matrices that
                                     take scalar retention only (decisions.md #5).
Weights are stored (d_out, d_in), so a layer computes ``W @ x``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Params = Any

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda z: z,
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; use one of {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def _check_dim(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int.")


@dataclasses.dataclass(frozen=True)
class LinearMemory:
    """Matrix memory M(x) = W x, W of shape (dv, dk) (linear attention / delta rule state)."""

    dk: int
    dv: int
    init_scale: float = 0.0

    def __post_init__(self):
        _check_dim("dk", self.dk)
        _check_dim("dv", self.dv)

    def init(self, key, dtype=jnp.float32) -> Params:
        w = self.init_scale * jax.random.normal(key, (self.dv, self.dk), dtype) / jnp.sqrt(self.dk)
        return {"W": w.astype(dtype)}

    def apply(self, params, x):
        return params["W"] @ x

    def layer_inputs(self, params, x, all_layers: bool = False):
        del params, all_layers
        return {"W": x}

    def write_gain(self, params, x):
        """||d M(x) / d W||^2 = ||x||^2: a gradient step of size eta moves M(x) by
        eta ||x||^2 times the error (``Rule.normalized`` divides by 1 + eta * this)."""
        del params
        return jnp.sum(x * x)

    @property
    def output_layer(self) -> str:
        """The matrix whose product W x adds linearly to the read-out (``Rule.delta``)."""
        return "W"


@dataclasses.dataclass(frozen=True)
class MLPMemory:
    """MLP memory of ``depth`` layers, optionally residual (Titans L_M >= 2; Hope eq. 89).

    depth=2, residual=True is the paper's M(z) = z + W1 s(W2 z): params ``W2`` (hidden, dk)
    is the input-side matrix and ``W1`` (dv, hidden) the output side.  Deeper memories
    name layers ``L0`` (input side) ... ``L{depth-1}`` (output side).
    """

    dk: int
    dv: int
    hidden: int
    depth: int = 2
    residual: bool = True
    activation: str = "silu"
    init_scale: float = 1.0

    def __post_init__(self):
        _check_dim("dk", self.dk)
        _check_dim("dv", self.dv)
        _check_dim("hidden", self.hidden)
        if not isinstance(self.depth, int) or self.depth < 2:
            raise ValueError(f"depth={self.depth!r} must be an int >= 2 (use LinearMemory for 1).")
        if self.residual and self.dk != self.dv:
            raise ValueError(
                f"residual=True needs dk == dv, got dk={self.dk}, dv={self.dv}; "
                "set residual=False or make the dimensions equal."
            )
        activation(self.activation)

    # Layer names ordered input side -> output side.
    @property
    def names(self) -> tuple[str, ...]:
        if self.depth == 2:
            return ("W2", "W1")
        return tuple(f"L{i}" for i in range(self.depth))

    @property
    def output_layer(self) -> str:
        """The matrix whose product adds linearly to the read-out (``Rule.delta``)."""
        return self.names[-1]

    def shapes(self) -> dict[str, tuple[int, int]]:
        dims = [self.dk] + [self.hidden] * (self.depth - 1) + [self.dv]
        return {n: (dims[i + 1], dims[i]) for i, n in enumerate(self.names)}

    def init(self, key, dtype=jnp.float32) -> Params:
        keys = jax.random.split(key, self.depth)
        out = {}
        for k, (name, (o, i)) in zip(keys, self.shapes().items(), strict=True):
            w = self.init_scale * jax.random.normal(k, (o, i), dtype) / jnp.sqrt(i)
            out[name] = w.astype(dtype)
        if self.residual:
            # Zero output layer: the memory starts as the identity map, as in TTT/Titans.
            out[self.names[-1]] = jnp.zeros_like(out[self.names[-1]])
        return out

    def _forward(self, params, x):
        act = activation(self.activation)
        inputs, h = [], x
        for i, name in enumerate(self.names):
            inputs.append(h)
            h = params[name] @ h
            if i < self.depth - 1:
                h = act(h)
        return h, inputs

    def apply(self, params, x):
        y, _ = self._forward(params, x)
        return x + y if self.residual else y

    def write_gain(self, params, x):
        """An upper bound on ||J J^T||, J = d M(x) / d(all matrices): a gradient step of size
        eta on every matrix moves M(x) by at most eta * this times the error.

        J J^T = sum_l ||x_l||^2 B_l B_l^T, with x_l layer l's input and B_l = d y / d z_l the
        back-propagation matrix from its output (the identity for the output layer,
        W_{l+1} diag(s'(z_l)) ... further in); each ||B_l||^2 is bounded by its Frobenius norm.
        Per-matrix normalisation (||x_l||^2 alone) misses the B_l factor: with a large output
        layer the input-side step overshoots by ||W1 diag(s')||^2 (TitansLM diverged so).
        """
        act = activation(self.activation)
        inputs, derivs, h = [], [], x
        for i, name in enumerate(self.names):
            inputs.append(h)
            z = params[name] @ h
            if i < self.depth - 1:
                h, d = jax.jvp(act, (z,), (jnp.ones_like(z),))
                derivs.append(d)
        gain, back = jnp.sum(inputs[-1] ** 2), None  # output layer: B = I, ||B||_2 = 1
        for i in range(self.depth - 1, 0, -1):  # B_{i-1} = B_i W_i diag(s'(z_{i-1}))
            w = params[self.names[i]]
            back = (w if back is None else back @ w) * derivs[i - 1][None, :]
            gain = gain + jnp.sum(inputs[i - 1] ** 2) * jnp.sum(back * back)
        return gain

    def layer_inputs(self, params, x, all_layers: bool = False):
        _, inputs = self._forward(params, x)
        return {
            n: (inp if (all_layers or i == 0) else None)
            for i, (n, inp) in enumerate(zip(self.names, inputs, strict=True))
        }

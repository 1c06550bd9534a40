"""Inner update rules: GD, Titans momentum + retention, DGD with weight decay.

One rule covers all three (decisions.md #5, #6).  For every weight matrix W of the memory,
with inner gradient g taken at the chunk-boundary state and data-dependent gates
(eta, alpha, beta) of the token:

    S_t = beta_t S_{t-1} - eta_t g_t                          (momentum / surprise, Titans eq. 10)
    W_t = W_{t-1} (alpha_t I - eta_t x_t x_t^T) + S_t         (DGD + weight decay, Hope eq. 88)
        = alpha_t W_{t-1} + S_t                               (matrices without DGD: retention)

x_t is the matrix's input (k_t for the input-side matrix).  ``momentum=False`` forces beta=0,
``dgd=False`` drops the rank-1 term.  With ``dgd_all_layers`` every matrix gets the DGD factor
with its own input and the exact step size eta' = eta / (1 + eta ||x||^2) (Sherman-Morrison),
used for both the factor and the gradient term (paper §2, DGD row).  ``normalized`` (rules
without DGD) is normalised LMS for the whole memory: every matrix steps with
eta' = eta / (1 + eta G), G = ``memory.write_gain(M_b, k)`` >= ||J J^T|| (J the Jacobian of M(k)
in all matrices), so one write moves M(k) by less than its error however large the layers grow
(``Level.chunk_steps``, which within a chunk also divides by the gain earlier tokens spent,
decisions #30; TitansLM's MLP memory diverged without it, decisions #19).

``delta`` (decisions #19, the "delta form" of DGD with the l2 objective).  The l2 error of a
memory, u = y_b - t, contains the output-side matrix's own product W_o,b x.  DGD's factor
already decays W_o along x, so that term applies a *second* decay, -eta W_o,b x x^T: at C = 1
the step is W (alpha I - 2 eta x x^T) + eta t x^T, a reflection rather than an erasure at
eta ||x||^2 = 1.  With ``delta`` the error back-propagated to every matrix is
u' = y_b - W_o,b x - t, so the factors are the only decay: the output-side write is the proximal
l2 step argmin ||W x - t'||^2 + ||W - W_prev||^2 / eta' (t' = t minus the skip and other
layers' output), stable for every eta >= 0 under the Sherman-Morrison step, and the hidden
layers' gradients no longer feed the memory's own output back through momentum (with it they
diverged at beta = 0.99: tests/memory/test_storage.py).  A linear memory becomes the gated delta
rule exactly, for every chunk size (its write reads no boundary state).

``reflect`` (decisions #22, with ``dgd_all_layers``) doubles the Sherman-Morrison step,
eta' = 2 eta / (1 + eta ||x||^2), so the factor's eigenvalue along x, alpha - eta' ||x||^2, spans
(alpha - 2, alpha] instead of (alpha - 1, alpha]: eta ||x||^2 = 1 erases along x, larger steps
reflect.  A recurrence whose transitions have eigenvalues in [0, 1] only cannot count modulo 2
(Grazzi et al., 2024, "Unlocking state-tracking in linear RNNs through negative eigenvalues");
with ``reflect`` the memory can flip its state on a token, which parity needs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Rule:
    momentum: bool = True
    dgd: bool = False
    dgd_all_layers: bool = False
    delta: bool = False
    normalized: bool = False
    reflect: bool = False

    def __post_init__(self):
        for f in ("momentum", "dgd", "dgd_all_layers", "delta", "normalized", "reflect"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"Rule.{f}={getattr(self, f)!r} must be a bool.")
        if self.dgd_all_layers and not self.dgd:
            raise ValueError("Rule.dgd_all_layers=True needs dgd=True.")
        if self.normalized and self.dgd:
            raise ValueError("Rule.normalized=True is for rules without DGD; with dgd=True use "
                             "dgd_all_layers=True (a Sherman-Morrison step on every layer).")
        if self.delta and not self.dgd:
            raise ValueError("Rule.delta=True needs dgd=True: it removes the decay that the l2 "
                             "gradient adds on top of DGD's factor.")
        if self.reflect and not self.dgd_all_layers:
            raise ValueError("Rule.reflect=True doubles the Sherman-Morrison step of "
                             "dgd_all_layers=True; set dgd=True, dgd_all_layers=True.")


GD = Rule(momentum=False, dgd=False)
TITANS = Rule(momentum=True, dgd=False)
DGD = Rule(momentum=True, dgd=True)
# Delta-form DGD on every layer: proximal l2 steps (Hope's default since decisions #19).
DELTA = Rule(momentum=True, dgd=True, dgd_all_layers=True, delta=True)


def effective_eta(rule: Rule, eta, x):
    """Per-matrix step: eta' = eta / (1 + eta ||x||^2) under ``dgd_all_layers`` (twice that
    under ``reflect``), else eta (``normalized`` scales eta for the whole memory before this:
    ``Level.chunk_steps``)."""
    if rule.dgd_all_layers and x is not None:
        step = eta / (1.0 + eta * jnp.sum(x * x))
        return 2.0 * step if rule.reflect else step  # no factor 1.0 in the graph: same rounding
    return eta


def step(rule: Rule, params, mom, grads, inputs, eta, alpha, beta):
    """One token of the rule. ``inputs`` is the memory's ``layer_inputs`` (None = no DGD)."""
    if not rule.momentum:
        beta = jnp.zeros_like(beta)

    def one(w, s, g, x):
        e = effective_eta(rule, eta, x)
        s_new = beta * s - e * g
        w_dec = alpha * w
        if rule.dgd and x is not None:
            w_dec = w_dec - e * jnp.outer(w @ x, x)
        return w_dec + s_new, s_new

    names = list(params)
    new = {n: one(params[n], mom[n], grads[n], inputs[n]) for n in names}
    return {n: new[n][0] for n in names}, {n: new[n][1] for n in names}

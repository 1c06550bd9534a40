"""``jax.custom_vjp`` around the sequential kernels: forward kernel, then backward kernel.

The forward saves the boundary state of every chunk (f32, [BH, N, dv, dk] for W and for S)
so the backward runs one reverse pass over chunks with no recomputation of the recurrence;
inside a chunk it recomputes the cheap local terms (``chunk_math.backward``).  Cotangents
come back for every ``Chunk`` field and for the initial (W, S); XLA then differentiates
``prep`` to reach q, k, v and the gates.  A ``custom_vjp`` has no JVP and its backward
kernel no VJP: for grad-of-grad or forward mode use impl='xla'.
"""

from __future__ import annotations

import functools

import jax

from nested_jax.kernels import mosaic, scan_xla, triton
from nested_jax.kernels.chunk_math import Chunk, Flags
from nested_jax.kernels.compat import tpu_interpret

_MODULES = {"mosaic": mosaic, "triton": triton}


SECOND_ORDER = ("the Pallas kernels are differentiable once (custom_vjp, backward kernel); "
                "for grad-of-grad or forward mode use memory.apply(..., path='dual').")


def _first_order_only(fn):
    """Wrap a kernel so differentiating it (grad-of-grad: the outer derivative goes through
    the saved residuals and the backward kernel) fails with a clear message instead of JAX's
    'Linearization failed' about pallas_call."""

    @jax.custom_jvp
    def wrapped(*args):
        return fn(*args)

    @wrapped.defjvp
    def _(primals, tangents):
        raise ValueError(SECOND_ORDER)

    return wrapped


def _interpret_arg(kernel: str, interpret: bool):
    if not interpret:
        return False
    return tpu_interpret() if kernel == "mosaic" else True


@functools.cache
def make_core(kernel: str, fl: Flags, op_dtype, out_dtype, bv: int, interpret: bool,
              num_warps: int | None = None, num_stages: int | None = None):
    """(Chunk [BH,N,C,...], w0, s0 f[BH,dv,dk]) -> (y [BH,N,C,dv], wN, sN), differentiable once.

    kernel="xla-scan" runs ``scan_xla.scan`` through the same custom_vjp plumbing with
    ``jax.vjp`` as the backward (a test of the plumbing itself); kernel="scan" runs
    ``scan_xla.scan`` forward and the hand-written ``scan_xla.backward`` (``impl="scan"``).
    """
    if kernel == "xla-scan":
        def run_fwd(ch, w0, s0):
            y, wn, sn, _, _ = scan_xla.scan(ch, w0, s0, fl, op_dtype)
            return y.astype(out_dtype), wn, sn
        return run_fwd
    if kernel == "scan":  # the kernels' algorithm in XLA: scan_xla.scan / scan_xla.backward
        def forward_saving(ch, w0, s0):
            y, wn, sn, wb, sb = scan_xla.scan(ch, w0, s0, fl, op_dtype)
            return y.astype(out_dtype), wn, sn, wb, sb

        forward = forward_saving
        backward = _first_order_only(
            lambda ch, wb, sb, dy, dwn, dsn: scan_xla.backward(ch, wb, sb, dy, dwn, dsn, fl,
                                                               op_dtype))
    else:
        mod = _MODULES[kernel]
        interp = _interpret_arg(kernel, interpret)
        extra = {"num_warps": num_warps, "num_stages": num_stages} if kernel == "triton" else {}

        def kernel_fwd(save):
            return _first_order_only(
                lambda ch, w0, s0: mod.forward(ch, w0, s0, fl, op_dtype, out_dtype, bv,
                                               interpret=interp, save=save, **extra))

        forward, forward_saving = kernel_fwd(False), kernel_fwd(True)

        backward = _first_order_only(
            lambda ch, wb, sb, dy, dwn, dsn: mod.backward(ch, wb, sb, dy, dwn, dsn, fl,
                                                          op_dtype, bv, interpret=interp,
                                                          **extra))

    @jax.custom_vjp
    def core(ch: Chunk, w0, s0):
        y, wn, sn, _, _ = forward(ch, w0, s0)
        return y, wn, sn

    def fwd(ch, w0, s0):
        y, wn, sn, wb, sb = forward_saving(ch, w0, s0)
        return (y, wn, sn), (ch, wb, sb, s0)

    def bwd(res, cts):
        ch, wb, sb, s0 = res
        dy, dwn, dsn = cts
        acc = wb.dtype
        grads, dw0, ds0 = backward(ch, wb, sb, dy, dwn.astype(acc), dsn.astype(acc))
        out = {}
        for name in Chunk._fields:
            primal = getattr(ch, name)
            if primal is None:
                out[name] = None
                continue
            g = grads["d" + name]
            if name != "ve":  # partial sums over dv tiles (already in primal dtype if one tile)
                g = g[:, 0] if g.shape[1] == 1 else g.sum(axis=1)
            out[name] = g.astype(primal.dtype)
        return Chunk(**out), dw0.astype(wb.dtype), ds0.astype(s0.dtype)

    core.defvjp(fwd, bwd)
    return core

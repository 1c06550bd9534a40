"""The kernels' pipeline after ``prep``: transition (XLA), state-passing loop, readout (XLA).

    core(ch, w0, s0) -> (y, wN, sN)
      1. ``affine.transition``: each chunk as an affine map of its boundary state, and the
         readout operands, all chunks in parallel;
      2. the loop: every boundary state, sequential over chunks (a Pallas kernel, or
         ``statepass.scan`` for impl="scan");
      3. ``affine.output``: y from the boundary states, all chunks in parallel.

Only the loop has a hand-written derivative: a ``custom_vjp`` whose backward is the reverse
kernel (cotangents of the state after every chunk) followed by batched matmuls for the
operands' cotangents (``statepass.operand_grads``).  Steps 1 and 3 are differentiated by JAX.
The forward's outputs, the boundary states, are the backward's residuals: nothing is
recomputed and nothing else is stored.  A ``custom_vjp`` has no JVP and its backward kernel no
VJP: for grad-of-grad or forward mode use impl='xla' (or impl='scan', plain autodiff).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nested_jax.kernels import affine, mosaic, scan_xla, statepass, triton
from nested_jax.kernels.affine import Transition
from nested_jax.kernels.chunk_math import Flags
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


def _kernel_loop(kernel: str, lf: affine.LoopFlags, op_dtype, bv: int, interpret: bool,
                 num_warps, num_stages):
    """(ops, w0, s0) -> (wb, sb, wN, sN) through the Pallas kernels, differentiable once."""
    mod = _MODULES[kernel]
    interp = _interpret_arg(kernel, interpret)
    extra = {"num_warps": num_warps, "num_stages": num_stages} if kernel == "triton" else {}
    forward = _first_order_only(
        lambda ops, w0, s0: mod.forward(ops, w0, s0, lf, op_dtype, bv, interpret=interp,
                                        **extra))
    backward = _first_order_only(
        lambda ops, dwb, dsb, dwn, dsn: mod.backward(ops, dwb, dsb, dwn, dsn, lf, op_dtype, bv,
                                                     interpret=interp, **extra))

    @jax.custom_vjp
    def loop(ops, w0, s0):
        return forward(ops, w0, s0)

    def fwd(ops, w0, s0):
        out = forward(ops, w0, s0)
        return out, (ops, out[0], out[1], s0)

    def bwd(res, cts):
        ops, wb, sb, s0 = res
        dwb, dsb, dwn, dsn = cts
        acc = wb.dtype
        mom = lf.momentum
        gn, hn, g0, h0 = backward(ops, dwb.astype(acc), dsb.astype(acc) if mom else None,
                                  dwn.astype(acc), dsn.astype(acc) if mom else None)
        tr = Transition(**{n: ops.get(n) for n in Transition._fields})
        d = statepass.operand_grads(tr, wb, sb, gn, hn, lf, op_dtype)
        dops = {n: getattr(d, n) for n in ops}
        ds0 = h0.astype(s0.dtype) if mom else jnp.zeros_like(s0)
        return dops, g0.astype(wb.dtype), ds0

    loop.defvjp(fwd, bwd)
    return loop


@functools.cache
def make_core(kernel: str, fl: Flags, op_dtype, out_dtype, bv: int, interpret: bool,
              num_warps: int | None = None, num_stages: int | None = None):
    """(Chunk [BH,N,C,...], w0, s0 f[BH,dv,dk]) -> (y [BH,N,C,dv], wN, sN).

    kernel: "triton" | "mosaic" (the Pallas loop, differentiable once); "scan" (the same loop
    as ``lax.scan``, plain autodiff: ``impl="scan"``); "xla-scan" (``scan_xla.scan``, the
    per-chunk maths in its direct form with autodiff: the pipeline's oracle in tests).
    """
    if kernel == "xla-scan":
        def direct(ch, w0, s0):
            y, wn, sn, _, _ = scan_xla.scan(ch, w0, s0, fl, op_dtype)
            return y.astype(out_dtype), wn, sn
        return direct
    lf = affine.loop_flags(fl)
    if kernel == "scan":
        loop = lambda ops, w0, s0: statepass.scan(Transition(**{
            n: ops.get(n) for n in Transition._fields}), w0, s0, lf, op_dtype)
    else:
        loop = _kernel_loop(kernel, lf, op_dtype, bv, interpret, num_warps, num_stages)

    def core(ch, w0, s0):
        acc = w0.dtype
        tr, ro = affine.transition(ch, fl, op_dtype, acc)
        wb, sb, wn, sn = loop(statepass.operands(tr, lf), w0.astype(acc), s0.astype(acc))
        if not lf.momentum:
            sn = affine.final_momentum(tr, wb[:, -1], op_dtype, acc)
        y = affine.output(ro, wb, sb, op_dtype, acc)
        return y.astype(out_dtype), wn, sn

    return core

"""GPU state-passing kernels through ``pallas_call`` lowered to Triton.

Triton programs have no sequential grid axis with persistent scratch, so the grid is
(BH, dv tiles) and each program runs the chunk loop itself (``lax.fori_loop``), keeping its bv
rows of W and S in registers in f32.  Each program sees its whole sequence: refs are
[N, ...] and chunk n is ``ref[n]`` (a pointer offset; only one chunk's tiles are loaded).  Per
chunk the loop does one to three [bv, dk] x [dk, dk] matmuls that do not depend on each other
(``statepass.step``); everything else runs in parallel over chunks in XLA (``affine.py``).
Triton needs every loaded tile power-of-two sized and ``tl.dot`` needs dims >= 16, so
``plan.py`` pads dk and dv to powers of two >= 16 (zero padding is exact here).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from nested_jax.kernels import statepass
from nested_jax.kernels.affine import NGATE, LoopFlags
from nested_jax.kernels.compat import pl, triton_params
from nested_jax.kernels.operands import Io, array_shape, backward_io, forward_io


def _blocks(dk, bv, N):
    return {
        "mat": ((None, N, dk, dk), lambda b, j: (b, 0, 0, 0)),
        "row": ((None, N, bv, dk), lambda b, j: (b, 0, j, 0)),
        "gate": ((None, N, 1, NGATE), lambda b, j: (b, 0, 0, 0)),
        "state": ((None, bv, dk), lambda b, j: (b, j, 0)),
    }


def _launch(bv, dk, num_warps=None, num_stages=None):
    """Triton launch parameters (overridable: experiments/gpu_check.py sweeps them).

    Warps: 4 warps hold a 64x64 f32 tile in 32 registers per thread, and a program carries two
    (W, S) plus the chunk's operands.  Stages: software pipelining double-buffers the chunk's
    loads in shared memory; at dk = 128 three bf16 [dk, dk] operands alone are 96 KB, so only
    dk <= 64 prefetches.
    """
    if num_warps is None:
        num_warps = 4 if bv * dk <= 64 * 64 else 8
    if num_stages is None:
        num_stages = 2 if dk <= 64 else 1
    return triton_params(num_warps=num_warps, num_stages=num_stages)


# jax 0.11 deprecates Pallas' Triton backend in favour of Mosaic GPU and warns at every
# lowering.  The warning is known (see docs/paper_map/kernels.md); it is silenced by its exact
# text, once, when these kernels are first used, so a project-wide "DeprecationWarning is an
# error" filter does not turn every Triton compile into a failure.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


@functools.cache
def _quiet_triton_deprecation():
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def _call(kernel, io: Io, BH, N, dk, dv, bv, launch, interpret, name):
    _quiet_triton_deprecation()
    blocks = _blocks(dk, bv, N)
    spec = lambda kind: pl.BlockSpec(*blocks[kind])
    return pl.pallas_call(
        kernel,
        grid=(BH, dv // bv),
        in_specs=[spec(kd) for kd in io.in_kinds],
        out_specs=[spec(kd) for kd in io.out_kinds],
        out_shape=[jax.ShapeDtypeStruct(array_shape(kd, BH, N, dk, dv), dt)
                   for kd, dt in zip(io.out_kinds, io.out_dtypes, strict=True)],
        compiler_params=_launch(bv, dk, *launch),
        interpret=interpret,
        name=name,
    )(*io.args)


def _split(io: Io, refs):
    n_in = len(io.args)
    return (dict(zip(io.in_names, refs[:n_in], strict=True)),
            dict(zip(io.out_names, refs[n_in:], strict=True)))


def forward(ops: dict, w0, s0, lf: LoopFlags, op_dtype, bv: int, interpret=False,
            num_warps: int | None = None, num_stages: int | None = None):
    """Same contract as ``statepass.scan``: (wb, sb, wN, sN), sb and sN None w/o momentum."""
    BH, dv, dk = w0.shape
    N = ops["gates"].shape[1]
    acc = w0.dtype
    io = forward_io(ops, w0, s0, lf)
    dot = statepass.make_dot(op_dtype, acc)
    names = list(ops)

    def kernel(*refs):
        r, o = _split(io, refs)

        def body(n, carry):
            w, s = carry
            o["wb"][n] = w
            if lf.momentum:
                o["sb"][n] = s
            return statepass.step(w, s, {m: r[m][n] for m in names}, lf, dot, acc)

        w = r["w0"][...].astype(acc)
        s = r["s0"][...].astype(acc) if lf.momentum else jnp.zeros_like(w)
        w, s = jax.lax.fori_loop(0, N, body, (w, s))
        o["wN"][...] = w
        if lf.momentum:
            o["sN"][...] = s

    outs = dict(zip(io.out_names, _call(kernel, io, BH, N, dk, dv, bv, (num_warps, num_stages),
                                        interpret, "nested_memory_fwd"), strict=True))
    return outs["wb"], outs.get("sb"), outs["wN"], outs.get("sN")


def backward(ops: dict, dwb, dsb, dwN, dsN, lf: LoopFlags, op_dtype, bv: int, interpret=False,
             num_warps: int | None = None, num_stages: int | None = None):
    """Reverse loop: (gn, hn, g0, h0), the cotangents after every chunk and of the initial
    state (hn, h0 None w/o momentum)."""
    BH, N, dv, dk = dwb.shape
    acc = dwN.dtype
    io = backward_io(ops, dwb, dsb, dwN, dsN, lf)
    dot = statepass.make_dot(op_dtype, acc)
    names = [n for n in io.in_names if n in ops]

    def kernel(*refs):
        r, o = _split(io, refs)

        def body(i, carry):
            g1, h1 = carry
            n = N - 1 - i
            o["gn"][n] = g1
            if lf.momentum:
                o["hn"][n] = h1
            g, h = statepass.step_back(g1, h1, {m: r[m][n] for m in names}, lf, dot, acc)
            g = g + r["dwb"][n].astype(acc)
            if lf.momentum:
                h = h + r["dsb"][n].astype(acc)
            return g, h

        g = r["dwN"][...].astype(acc)
        h = r["dsN"][...].astype(acc) if lf.momentum else jnp.zeros_like(g)
        g, h = jax.lax.fori_loop(0, N, body, (g, h))
        o["g0"][...] = g
        if lf.momentum:
            o["h0"][...] = h

    outs = dict(zip(io.out_names, _call(kernel, io, BH, N, dk, dv, bv, (num_warps, num_stages),
                                        interpret, "nested_memory_bwd"), strict=True))
    return outs["gn"], outs.get("hn"), outs["g0"], outs.get("h0")

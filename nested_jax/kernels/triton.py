"""GPU kernels through ``pallas_call`` lowered to Triton.

Triton programs have no sequential grid axis with persistent scratch, so the grid is only
(BH, nt) and each program runs the chunk loop itself (``lax.fori_loop``), keeping W and S in
registers in f32.  Each program sees its whole sequence: refs are [N, C, ...] and chunk n is
``ref[n]`` (a pointer offset; only the [C, ...] tiles are materialised).  Triton needs every
loaded tile power-of-two sized and ``tl.dot`` needs all three dims >= 16, so ``plan.py`` pads dk
and dv to powers of two >= 16 (zero padding is exact here) and requires C to be one too.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from nested_jax.kernels import chunk_math
from nested_jax.kernels.chunk_math import NCOL, Chunk, Flags
from nested_jax.kernels.compat import pl, triton_params
from nested_jax.kernels.operands import array_shape, backward_io, forward_io


def _blocks(C, dk, bv, N):
    return {
        "key": ((None, N, C, dk), lambda b, j: (b, 0, 0, 0)),
        "val": ((None, N, C, bv), lambda b, j: (b, 0, 0, j)),
        "mat": ((None, N, C, C), lambda b, j: (b, 0, 0, 0)),
        "cols": ((None, N, C, NCOL), lambda b, j: (b, 0, 0, 0)),
        "state": ((None, bv, dk), lambda b, j: (b, j, 0)),
        "bstate": ((None, N, bv, dk), lambda b, j: (b, 0, j, 0)),
        "pkey": ((None, None, N, C, dk), lambda b, j: (b, j, 0, 0, 0)),
        "pmat": ((None, None, N, C, C), lambda b, j: (b, j, 0, 0, 0)),
        "pcols": ((None, None, N, C, NCOL), lambda b, j: (b, j, 0, 0, 0)),
    }


def _spec(blocks, kind):
    shape, index = blocks[kind]
    return pl.BlockSpec(shape, index)


def _load_chunk(refs: dict, n, fl: Flags, acc) -> Chunk:
    get = lambda name: refs[name][n] if name in refs else None
    return Chunk(k=get("k"), q=get("q"), ke=get("ke"), ve=get("ve"), r=get("r"), r2=get("r2"),
                 f=get("f"), g=get("g"), te=get("te"),
                 cols=chunk_math.unpack_cols(refs["cols"][n], acc))


def _launch(bv, dk, backward, num_warps=None, num_stages=None):
    """Triton launch parameters (overridable: experiments/gpu_check.py sweeps them).

    Warps: 4 warps hold a 64x64 f32 tile in 32 registers per thread; the backward keeps ~3x
    as many tiles live as the forward, so it gets 8 warps once tiles reach 32x64.
    Stages: software pipelining double-buffers every per-chunk load in shared memory; the
    forward at dk <= 64 loads ~50 KB per chunk and can afford it, the backward and dk = 128
    could overflow the 228 KB of an H100/H200, so they load single-buffered.
    """
    if num_warps is None:
        if backward:
            num_warps = 8 if bv * dk >= 32 * 64 else 4
        else:
            num_warps = 4 if bv * dk <= 64 * 64 else 8
    if num_stages is None:
        num_stages = 2 if (not backward and dk <= 64) else 1
    return triton_params(num_warps=num_warps, num_stages=num_stages)


# jax 0.11 deprecates Pallas' Triton backend in favour of Mosaic GPU and warns at every
# lowering.  The warning is known (see docs/paper_map/kernels.md); it is silenced by its exact
# text, once, when these kernels are first used, so a project-wide "DeprecationWarning is an
# error" filter does not turn every Triton compile into a failure.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


@functools.cache
def _quiet_triton_deprecation():
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def _call(kernel, io, BH, nt, N, C, dk, dv, bv, launch, interpret, name):
    _quiet_triton_deprecation()
    blocks = _blocks(C, dk, bv, N)
    return pl.pallas_call(
        kernel,
        grid=(BH, nt),
        in_specs=[_spec(blocks, kd) for kd in io.in_kinds],
        out_specs=[_spec(blocks, kd) for kd in io.out_kinds],
        out_shape=[jax.ShapeDtypeStruct(array_shape(kd, BH, nt, N, C, dk, dv), dt)
                   for kd, dt in zip(io.out_kinds, io.out_dtypes, strict=True)],
        compiler_params=_launch(bv, dk, name.endswith("bwd"), *launch),
        interpret=interpret,
        name=name,
    )(*io.args)


def forward(ch: Chunk, w0, s0, fl: Flags, op_dtype, out_dtype, bv: int, interpret=False,
            save: bool = True,
            num_warps: int | None = None, num_stages: int | None = None):
    """Same contract as ``scan_xla.scan``: returns (y, wN, sN, wb, sb); sb is None w/o momentum,
    wb and sb are None with save=False."""
    BH, N, C, dk = ch.k.shape
    dv, acc = w0.shape[1], w0.dtype
    io = forward_io(ch, w0, s0, fl, out_dtype, save)
    dot = chunk_math.make_dot(op_dtype, acc)

    def kernel(*refs):
        r = dict(zip(io.in_names, refs[:len(io.args)], strict=True))
        o = dict(zip(io.out_names, refs[len(io.args):], strict=True))

        def body(n, carry):
            w, s = carry
            if save:
                o["wb"][n] = w
            if save and fl.momentum:
                o["sb"][n] = s
            y, w1, s1 = chunk_math.forward(_load_chunk(r, n, fl, acc), w, s, fl, dot, acc)
            o["y"][n] = y.astype(out_dtype)
            return w1, s1

        w = r["w0"][...].astype(acc)
        s = r["s0"][...].astype(acc) if fl.momentum else jnp.zeros_like(w)
        w, s = jax.lax.fori_loop(0, N, body, (w, s))
        o["wN"][...] = w
        o["sN"][...] = s

    launch = (num_warps, num_stages)
    outs = _call(kernel, io, BH, dv // bv, N, C, dk, dv, bv, launch, interpret,
                 "nested_memory_fwd")
    outs = dict(zip(io.out_names, outs, strict=True))
    return outs["y"], outs["wN"], outs["sN"], outs.get("wb"), outs.get("sb")


def backward(ch: Chunk, wb, sb, dy, dwN, dsN, fl: Flags, op_dtype, bv: int, interpret=False,
             num_warps: int | None = None, num_stages: int | None = None):
    """Reverse chunk loop; same contract as ``mosaic.backward``."""
    BH, N, C, dk = ch.k.shape
    dv, acc = dwN.shape[1], dwN.dtype
    io = backward_io(ch, wb, sb, dy, dwN, dsN, fl, dv // bv)
    gnames = io.out_names[:-2]
    dot = chunk_math.make_dot(op_dtype, acc)

    def kernel(*refs):
        r = dict(zip(io.in_names, refs[:len(io.args)], strict=True))
        o = dict(zip(io.out_names, refs[len(io.args):], strict=True))

        def body(i, carry):
            dw1, ds1 = carry
            n = N - 1 - i
            w = r["wb"][n]
            s = r["sb"][n] if fl.momentum else jnp.zeros_like(w)
            grads, dw, ds = chunk_math.backward(_load_chunk(r, n, fl, acc), w, s, r["dy"][n],
                                                dw1, ds1, fl, dot, acc)
            for name in gnames:
                if name == "dcols":
                    o["dcols"][n] = chunk_math.pack_cols(grads.dcols, acc).astype(o["dcols"].dtype)
                else:
                    o[name][n] = getattr(grads, name).astype(o[name].dtype)
            return dw, ds

        dw = r["dwN"][...].astype(acc)
        ds = r["dsN"][...].astype(acc)
        dw, ds = jax.lax.fori_loop(0, N, body, (dw, ds))
        o["dw0"][...] = dw
        o["ds0"][...] = ds

    launch = (num_warps, num_stages)
    outs = _call(kernel, io, BH, dv // bv, N, C, dk, dv, bv, launch, interpret,
                 "nested_memory_bwd")
    outs = dict(zip(io.out_names, outs, strict=True))
    return {g: outs[g] for g in gnames}, outs["dw0"], outs["ds0"]

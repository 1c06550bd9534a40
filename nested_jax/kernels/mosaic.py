"""TPU (Mosaic) state-passing kernels: the chunk loop is the innermost grid axis ("arbitrary"),
the state lives in VMEM scratch across it, and Pallas' BlockSpec pipeline double-buffers each
chunk's operands while the MXU runs the previous chunk's matmuls.

Grid (BH, dv tiles, N), semantics (parallel, parallel, arbitrary).  Every block's last two dims
are either the full array dims (dk, 1, 8) or multiples of (8, 128): a dv tile bv is dv itself or
a multiple of 8 on the sublanes, dk always whole on the lanes (``plan.py`` checks,
``blocks_legal`` lets the tests check every BlockSpec against Mosaic's rule).  The backward runs
the same grid with the chunk index reversed in the index maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.kernels import statepass
from nested_jax.kernels.affine import NGATE, LoopFlags
from nested_jax.kernels.compat import pl, tpu_params, vmem_scratch
from nested_jax.kernels.operands import Io, array_shape, backward_io, forward_io

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _blocks(dk, bv, N, reverse):
    nn = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    return {
        "mat": ((None, None, dk, dk), lambda b, j, n: (b, nn(n), 0, 0)),
        "row": ((None, None, bv, dk), lambda b, j, n: (b, nn(n), j, 0)),
        "gate": ((None, None, 1, NGATE), lambda b, j, n: (b, nn(n), 0, 0)),
        "state": ((None, bv, dk), lambda b, j, n: (b, j, 0)),
    }


def blocks_legal(dk, dv, bv) -> list[str]:
    """Mosaic's rule on every block used: last two dims divisible by (8, 128) or full."""
    bad = []
    for kind, (shape, _) in _blocks(dk, bv, 1, False).items():
        full = array_shape(kind, 1, 1, dk, dv)
        block = tuple(1 if s is None else s for s in shape)
        for ax, mult in ((-2, 8), (-1, 128)):
            if block[ax] != full[ax] and block[ax] % mult:
                bad.append(f"{kind} block {block} of array {full}: dim {ax} not /{mult} or full")
    return bad


def _call(kernel, io: Io, BH, N, dk, dv, bv, reverse, interpret, name):
    blocks = _blocks(dk, bv, N, reverse)
    spec = lambda kind: pl.BlockSpec(*blocks[kind])
    return pl.pallas_call(
        kernel,
        grid=(BH, dv // bv, N),
        in_specs=[spec(kd) for kd in io.in_kinds],
        out_specs=[spec(kd) for kd in io.out_kinds],
        out_shape=[jax.ShapeDtypeStruct(array_shape(kd, BH, N, dk, dv), dt)
                   for kd, dt in zip(io.out_kinds, io.out_dtypes, strict=True)],
        scratch_shapes=[vmem_scratch((bv, dk), io.out_dtypes[0])] * 2,
        compiler_params=tpu_params(_SEMANTICS),
        interpret=interpret,
        name=name,
    )(*io.args)


def _split(io: Io, refs):
    n_in, n_out = len(io.args), len(io.out_names)
    return (dict(zip(io.in_names, refs[:n_in], strict=True)),
            dict(zip(io.out_names, refs[n_in:n_in + n_out], strict=True)),
            refs[n_in + n_out:])


def forward(ops: dict, w0, s0, lf: LoopFlags, op_dtype, bv: int, interpret=False):
    """Same contract as ``statepass.scan``: (wb, sb, wN, sN), sb and sN None w/o momentum."""
    BH, dv, dk = w0.shape
    N = ops["gates"].shape[1]
    acc = w0.dtype
    io = forward_io(ops, w0, s0, lf)
    dot = statepass.make_dot(op_dtype, acc)
    names = list(ops)

    def kernel(*refs):
        r, o, (w_acc, s_acc) = _split(io, refs)
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            w_acc[...] = r["w0"][...].astype(acc)
            s_acc[...] = (r["s0"][...].astype(acc) if lf.momentum
                          else jnp.zeros(s_acc.shape, acc))

        w, s = w_acc[...], s_acc[...]
        o["wb"][...] = w
        if lf.momentum:
            o["sb"][...] = s
        w1, s1 = statepass.step(w, s, {m: r[m][...] for m in names}, lf, dot, acc)
        w_acc[...] = w1
        s_acc[...] = s1

        @pl.when(n == N - 1)
        def _():
            o["wN"][...] = w1
            if lf.momentum:
                o["sN"][...] = s1

    outs = dict(zip(io.out_names, _call(kernel, io, BH, N, dk, dv, bv, False, interpret,
                                        "nested_memory_fwd"), strict=True))
    return outs["wb"], outs.get("sb"), outs["wN"], outs.get("sN")


def backward(ops: dict, dwb, dsb, dwN, dsN, lf: LoopFlags, op_dtype, bv: int, interpret=False):
    """Reverse loop; same contract as ``triton.backward``."""
    BH, N, dv, dk = dwb.shape
    acc = dwN.dtype
    io = backward_io(ops, dwb, dsb, dwN, dsN, lf)
    dot = statepass.make_dot(op_dtype, acc)
    names = [n for n in io.in_names if n in ops]

    def kernel(*refs):
        r, o, (g_acc, h_acc) = _split(io, refs)
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            g_acc[...] = r["dwN"][...].astype(acc)
            h_acc[...] = (r["dsN"][...].astype(acc) if lf.momentum
                          else jnp.zeros(h_acc.shape, acc))

        g1, h1 = g_acc[...], h_acc[...]
        o["gn"][...] = g1
        if lf.momentum:
            o["hn"][...] = h1
        g, h = statepass.step_back(g1, h1, {m: r[m][...] for m in names}, lf, dot, acc)
        g = g + r["dwb"][...].astype(acc)
        if lf.momentum:
            h = h + r["dsb"][...].astype(acc)
        g_acc[...] = g
        h_acc[...] = h

        @pl.when(n == N - 1)
        def _():
            o["g0"][...] = g
            if lf.momentum:
                o["h0"][...] = h

    outs = dict(zip(io.out_names, _call(kernel, io, BH, N, dk, dv, bv, True, interpret,
                                        "nested_memory_bwd"), strict=True))
    return outs["gn"], outs.get("hn"), outs["g0"], outs.get("h0")

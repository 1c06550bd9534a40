"""TPU (Mosaic) kernels: the chunk loop is the innermost grid axis ("arbitrary"), the state lives
in VMEM scratch across it, and Pallas' BlockSpec pipeline double-buffers each chunk's inputs.

Grid (BH, nt, N), semantics (parallel, parallel, arbitrary).  Every block's last two dims are
either the full array dims (dk, C, 8, dv) or multiples of (8, 128): C must be a multiple of 8
and a dv tile bv is dv itself or a multiple of 128 (``plan.py`` checks, ``blocks_legal`` below
lets the tests check every BlockSpec against Mosaic's rule).  The backward runs the same grid
with the chunk index reversed in the index maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.kernels import chunk_math
from nested_jax.kernels.chunk_math import NCOL, Chunk, Flags
from nested_jax.kernels.compat import pl, tpu_params, vmem_scratch
from nested_jax.kernels.operands import array_shape, backward_io, forward_io

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _blocks(C, dk, bv, N, reverse):
    nn = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    return {
        "key": ((None, None, C, dk), lambda b, j, n: (b, nn(n), 0, 0)),
        "val": ((None, None, C, bv), lambda b, j, n: (b, nn(n), 0, j)),
        "mat": ((None, None, C, C), lambda b, j, n: (b, nn(n), 0, 0)),
        "cols": ((None, None, C, NCOL), lambda b, j, n: (b, nn(n), 0, 0)),
        "state": ((None, bv, dk), lambda b, j, n: (b, j, 0)),
        "bstate": ((None, None, bv, dk), lambda b, j, n: (b, nn(n), j, 0)),
        "pkey": ((None, None, None, C, dk), lambda b, j, n: (b, j, nn(n), 0, 0)),
        "pmat": ((None, None, None, C, C), lambda b, j, n: (b, j, nn(n), 0, 0)),
        "pcols": ((None, None, None, C, NCOL), lambda b, j, n: (b, j, nn(n), 0, 0)),
    }


def _spec(blocks, kind):
    shape, index = blocks[kind]
    return pl.BlockSpec(shape, index)


def blocks_legal(C, dk, dv, bv) -> list[str]:
    """Mosaic's rule on every block used: last two dims divisible by (8, 128) or full."""
    bad = []
    for kind, (shape, _) in _blocks(C, dk, bv, 1, False).items():
        full = array_shape(kind, 1, max(dv // bv, 1), 1, C, dk, dv)
        block = tuple(1 if s is None else s for s in shape)
        for ax, mult in ((-2, 8), (-1, 128)):
            if block[ax] != full[ax] and block[ax] % mult:
                bad.append(f"{kind} block {block} of array {full}: dim {ax} not /{mult} or full")
    return bad


def _load_chunk(refs: dict, fl: Flags, acc) -> Chunk:
    get = lambda n: refs[n][...] if n in refs else None
    return Chunk(k=get("k"), q=get("q"), ke=get("ke"), ve=get("ve"), r=get("r"), r2=get("r2"),
                 f=get("f"), g=get("g"), te=get("te"),
                 cols=chunk_math.unpack_cols(refs["cols"][...], acc))


def _call(kernel, io, grid_dims, C, dk, dv, bv, reverse, interpret, name):
    BH, nt, N = grid_dims
    blocks = _blocks(C, dk, bv, N, reverse)
    return pl.pallas_call(
        kernel,
        grid=(BH, nt, N),
        in_specs=[_spec(blocks, kd) for kd in io.in_kinds],
        out_specs=[_spec(blocks, kd) for kd in io.out_kinds],
        out_shape=[jax.ShapeDtypeStruct(array_shape(kd, BH, nt, N, C, dk, dv), dt)
                   for kd, dt in zip(io.out_kinds, io.out_dtypes, strict=True)],
        scratch_shapes=[vmem_scratch((bv, dk), io.out_dtypes[-1])] * 2,
        compiler_params=tpu_params(_SEMANTICS),
        interpret=interpret,
        name=name,
    )(*io.args)


def forward(ch: Chunk, w0, s0, fl: Flags, op_dtype, out_dtype, bv: int, interpret=False,
            save: bool = True):
    """Same contract as ``scan_xla.scan``: returns (y, wN, sN, wb, sb); sb is None w/o momentum,
    wb and sb are None with save=False."""
    BH, N, C, dk = ch.k.shape
    dv, acc = w0.shape[1], w0.dtype
    io = forward_io(ch, w0, s0, fl, out_dtype, save)
    dot = chunk_math.make_dot(op_dtype, acc)

    def kernel(*refs):
        n_in, n_out = len(io.args), len(io.out_names)
        r = dict(zip(io.in_names, refs[:n_in], strict=True))
        o = dict(zip(io.out_names, refs[n_in:n_in + n_out], strict=True))
        w_acc, s_acc = refs[n_in + n_out:]
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            w_acc[...] = r["w0"][...].astype(acc)
            s_acc[...] = r["s0"][...].astype(acc) if fl.momentum else jnp.zeros(s_acc.shape, acc)

        w, s = w_acc[...], s_acc[...]
        if save:
            o["wb"][...] = w
        if save and fl.momentum:
            o["sb"][...] = s
        y, w1, s1 = chunk_math.forward(_load_chunk(r, fl, acc), w, s, fl, dot, acc)
        o["y"][...] = y.astype(out_dtype)
        w_acc[...] = w1
        s_acc[...] = s1

        @pl.when(n == N - 1)
        def _():
            o["wN"][...] = w1
            o["sN"][...] = s1

    outs = _call(kernel, io, (BH, dv // bv, N), C, dk, dv, bv, False, interpret,
                 "nested_memory_fwd")
    outs = dict(zip(io.out_names, outs, strict=True))
    return outs["y"], outs["wN"], outs["sN"], outs.get("wb"), outs.get("sb")


def backward(ch: Chunk, wb, sb, dy, dwN, dsN, fl: Flags, op_dtype, bv: int, interpret=False):
    """Reverse chunk loop. Returns (dict of per-field cotangents, dw0, ds0).

    Cotangents of key/mat/cols fields carry a tile axis [BH, nt, ...] (partial sums over dv
    tiles); dve is per tile.  All in the carried precision.
    """
    BH, N, C, dk = ch.k.shape
    dv, acc = dwN.shape[1], dwN.dtype
    io = backward_io(ch, wb, sb, dy, dwN, dsN, fl, dv // bv)
    gnames = io.out_names[:-2]
    dot = chunk_math.make_dot(op_dtype, acc)

    def kernel(*refs):
        n_in, n_out = len(io.args), len(io.out_names)
        r = dict(zip(io.in_names, refs[:n_in], strict=True))
        o = dict(zip(io.out_names, refs[n_in:n_in + n_out], strict=True))
        dw_acc, ds_acc = refs[n_in + n_out:]
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            dw_acc[...] = r["dwN"][...].astype(acc)
            ds_acc[...] = r["dsN"][...].astype(acc)

        w = r["wb"][...]
        s = r["sb"][...] if fl.momentum else jnp.zeros_like(w)
        grads, dw, ds = chunk_math.backward(_load_chunk(r, fl, acc), w, s, r["dy"][...],
                                            dw_acc[...], ds_acc[...], fl, dot, acc)
        for name in gnames:
            if name == "dcols":
                o["dcols"][...] = chunk_math.pack_cols(grads.dcols, acc).astype(o["dcols"].dtype)
            else:
                o[name][...] = getattr(grads, name).astype(o[name].dtype)
        dw_acc[...] = dw
        ds_acc[...] = ds

        @pl.when(n == N - 1)
        def _():
            o["dw0"][...] = dw
            o["ds0"][...] = ds

    outs = _call(kernel, io, (BH, dv // bv, N), C, dk, dv, bv, True, interpret,
                 "nested_memory_bwd")
    outs = dict(zip(io.out_names, outs, strict=True))
    return {g: outs[g] for g in gnames}, outs["dw0"], outs["ds0"]

"""Which arrays a kernel reads and writes, by kind, so the TPU and GPU kernels share one list.

Kinds (all chunked over N = T / C chunks of C tokens, BH = batch * heads, nt dv-tiles of bv):

    key    [BH, N, C, dk]      k, q, ke, r, r2      (and their cotangents, [BH, nt, N, C, dk])
    val    [BH, N, C, dv]      ve, y, dy, dve       (tiled over dv)
    mat    [BH, N, C, C]       f, g, te             (cotangents [BH, nt, N, C, C])
    cols   [BH, N, C, 8]       the per-token columns (cotangents [BH, nt, N, C, 8])
    state  [BH, dv, dk]        w0, s0, wN, sN, and their cotangents (tiled over dv rows)
    bstate [BH, N, dv, dk]     boundary states wb, sb saved by the forward for the backward

Partial sums over dv tiles get a tile axis after BH; XLA adds them up (``vjp.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from nested_jax.kernels.chunk_math import NCOL, Chunk, Flags

CHUNK_KINDS = {"k": "key", "q": "key", "ke": "key", "ve": "val", "r": "key", "r2": "key",
               "f": "mat", "g": "mat", "te": "mat", "cols": "cols"}


def chunk_names(fl: Flags) -> list[str]:
    """Fields of ``Chunk`` that are present under these flags, in ``Chunk`` order."""
    present = {"k": True, "q": True, "ke": fl.has_ke and not fl.ke_is_k, "ve": fl.has_ve,
               "r": fl.dgd, "r2": fl.dgd and fl.momentum, "f": True, "g": fl.dgd, "te": fl.dgd,
               "cols": True}
    return [n for n in Chunk._fields if present[n]]


def grad_names(fl: Flags) -> list[str]:
    """Backward outputs per chunk field: 'd' + name, with dve per tile and the rest partial."""
    return ["d" + n for n in chunk_names(fl)]


def grad_kind(name: str) -> str:
    """Kind of a cotangent output; 'p' marks a partial sum with a tile axis."""
    kind = CHUNK_KINDS[name[1:]]
    return kind if kind == "val" else "p" + kind


def array_shape(kind: str, BH: int, nt: int, N: int, C: int, dk: int, dv: int):
    return {"key": (BH, N, C, dk), "val": (BH, N, C, dv), "mat": (BH, N, C, C),
            "cols": (BH, N, C, NCOL), "state": (BH, dv, dk), "bstate": (BH, N, dv, dk),
            "pkey": (BH, nt, N, C, dk), "pmat": (BH, nt, N, C, C),
            "pcols": (BH, nt, N, C, NCOL)}[kind]


class Io(NamedTuple):
    """A kernel's operand list: input names/arrays/kinds, output names/kinds/dtypes."""

    in_names: list
    args: list
    in_kinds: list
    out_names: list
    out_kinds: list
    out_dtypes: list


def forward_io(ch: Chunk, w0, s0, fl: Flags, out_dtype, save: bool = True) -> Io:
    """save=False (no backward will run): no boundary-state outputs, ~1/3 less HBM traffic."""
    names = chunk_names(fl)
    state = ["w0"] + (["s0"] if fl.momentum else [])
    args = [getattr(ch, n) for n in names] + [w0] + ([s0] if fl.momentum else [])
    outs = ["y", "wN", "sN"] + (["wb"] + (["sb"] if fl.momentum else []) if save else [])
    kinds = {"y": "val", "wN": "state", "sN": "state", "wb": "bstate", "sb": "bstate"}
    return Io(names + state, args, [CHUNK_KINDS[n] for n in names] + ["state"] * len(state),
              outs, [kinds[o] for o in outs], [out_dtype if o == "y" else w0.dtype for o in outs])


def backward_io(ch: Chunk, wb, sb, dy, dwN, dsN, fl: Flags, nt: int) -> Io:
    """Cotangents are written in their primal's dtype (what custom_vjp returns anyway) unless
    they are partial sums over nt > 1 dv tiles, which stay in the carried precision."""
    names = chunk_names(fl)
    extra = ["wb"] + (["sb"] if fl.momentum else []) + ["dy", "dwN", "dsN"]
    kind = {"wb": "bstate", "sb": "bstate", "dy": "val", "dwN": "state", "dsN": "state"}
    val = {"wb": wb, "sb": sb, "dy": dy, "dwN": dwN, "dsN": dsN}
    gnames = grad_names(fl)
    acc = dwN.dtype
    exact = lambda g: nt == 1 or grad_kind(g) == "val"
    dtypes = [getattr(ch, g[1:]).dtype if exact(g) else acc for g in gnames]
    return Io(names + extra, [getattr(ch, n) for n in names] + [val[e] for e in extra],
              [CHUNK_KINDS[n] for n in names] + [kind[e] for e in extra],
              gnames + ["dw0", "ds0"], [grad_kind(g) for g in gnames] + ["state", "state"],
              dtypes + [acc, acc])

"""Which arrays the state-passing kernels read and write, by kind, shared by Triton and Mosaic.

Kinds (N chunks, BH = batch * heads, the state's dv rows tiled by bv):

    mat    [BH, N, dk, dk]   k1, k2, kb                  (every dv tile reads all of it)
    row    [BH, N, dv, dk]   u, v; boundary states wb, sb; their cotangents dwb, dsb; the
                             cotangents after each chunk gn, hn          (tiled over dv rows)
    gate   [BH, N, 1, 8]     gC, dC, bC per chunk
    state  [BH, dv, dk]      w0, s0, wN, sN, dwN, dsN, g0, h0             (tiled over dv rows)
"""

from __future__ import annotations

from typing import NamedTuple

from nested_jax.kernels.affine import NGATE, LoopFlags

KIND = {"k1": "mat", "k2": "mat", "kb": "mat", "u": "row", "v": "row", "gates": "gate",
        "w0": "state", "s0": "state", "wN": "state", "sN": "state", "wb": "row", "sb": "row",
        "dwb": "row", "dsb": "row", "dwN": "state", "dsN": "state", "gn": "row", "hn": "row",
        "g0": "state", "h0": "state"}


def array_shape(kind: str, BH: int, N: int, dk: int, dv: int):
    return {"mat": (BH, N, dk, dk), "row": (BH, N, dv, dk), "gate": (BH, N, 1, NGATE),
            "state": (BH, dv, dk)}[kind]


class Io(NamedTuple):
    """A kernel's operand list: input names and arrays, output names and dtypes."""

    in_names: list
    args: list
    out_names: list
    out_dtypes: list

    @property
    def in_kinds(self):
        return [KIND[n] for n in self.in_names]

    @property
    def out_kinds(self):
        return [KIND[n] for n in self.out_names]


def forward_io(ops: dict, w0, s0, lf: LoopFlags) -> Io:
    """In: the loop operands and the initial state; out: boundary and final states."""
    mom = lf.momentum
    names = list(ops) + ["w0"] + (["s0"] if mom else [])
    args = list(ops.values()) + [w0] + ([s0] if mom else [])
    outs = ["wb", "wN"] + (["sb", "sN"] if mom else [])
    return Io(names, args, outs, [w0.dtype] * len(outs))


def backward_io(ops: dict, dwb, dsb, dwN, dsN, lf: LoopFlags) -> Io:
    """In: the operands the reverse step reads, the cotangents of the forward's outputs;
    out: the cotangents after every chunk (gn, hn) and of the initial state (g0, h0)."""
    mom = lf.momentum
    mats = {n: a for n, a in ops.items() if KIND[n] in ("mat", "gate")}
    extra = {"dwb": dwb, "dwN": dwN} | ({"dsb": dsb, "dsN": dsN} if mom else {})
    outs = ["gn", "g0"] + (["hn", "h0"] if mom else [])
    return Io(list(mats) + list(extra), list(mats.values()) + list(extra.values()), outs,
              [dwN.dtype] * len(outs))

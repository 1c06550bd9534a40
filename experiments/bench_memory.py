"""Memory-engine benchmark: oracle vs generic chunked vs dual form, fwd and fwd+bwd.

Paths: the per-token oracle, the generic chunked path, the matmul dual form, and (linear
memories) ``memory.apply(path="pallas", impl="scan")``, the Pallas kernels' algorithm in plain XLA.

Usage:
  python experiments/bench_memory.py                 # CPU: small + (8, 4096, 16, 64) shapes
  python experiments/bench_memory.py --shapes small  # quick
  python experiments/bench_memory.py --out $OUT/bench_memory_gpu.md   # on a GPU box

Throughput is tokens/s = B*T/seconds.  Where a path's fwd+bwd would not fit in memory at the
full batch (the oracle stores a state per token), that row runs with a smaller batch*heads and
says so: tokens/s per sequence-head is what scales, so the ratio stays comparable.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import markdown_table, timeit, write_result  # noqa: E402

from nested_jax import memory as nm  # noqa: E402

SHAPES = {"small": (2, 1024, 4, 64), "big": (8, 4096, 16, 64)}
LEVELS = {
    "linear DGD+mom": nm.Level(nm.LinearMemory(64, 64), "l2", nm.DGD),
    "mlp2 DGD+mom": nm.Level(nm.MLPMemory(64, 64, hidden=64), "l2", nm.DGD),
}
HEADER = ["shape (B,T,H,D)", "level", "path", "mode", "ms (full batch)", "tokens/s", "x oracle",
          "note"]


def make(level, B, T, H, dtype):
    ks = jax.random.split(jax.random.key(0), 6)
    d = level.memory.dk
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, d), dtype))
    k = unit(jax.random.normal(ks[1], (B, T, H, d), dtype))
    v = jax.random.normal(ks[2], (B, T, H, d), dtype)
    g = nm.Gates(0.1 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H), dtype)),
                 jax.nn.sigmoid(4.0 + jax.random.normal(ks[4], (B, T, H), dtype)),
                 jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H), dtype)))
    st = nm.broadcast_state(nm.init_state(level, ks[0], H, dtype), B)
    return st, q, k, v, g


def fns(level, path, C):
    def out(st, q, k, v, g):
        if path == "scan":  # the kernels' algorithm in XLA (linear memory only)
            return nm.apply(level, st, q, k, v, g, chunk_size=C, path="pallas", impl="scan")[0]
        return nm.apply(level, st, q, k, v, g, chunk_size=C, path=path)[0]

    loss = lambda *a: jnp.sum(out(*a) ** 2)
    return jax.jit(out), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def state_bytes(level, B, H, T, dtype):
    n = sum(x.size for x in jax.tree.leaves(level.init_state(jax.random.key(0), dtype).params))
    return 2 * n * B * H * T * jnp.dtype(dtype).itemsize  # params + momentum per token


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="small,big", help="comma list of: small, big")
    ap.add_argument("--chunk", default="64", help="comma list of chunk sizes, e.g. 16,32,64")
    ap.add_argument("--paths", default="chunked,dual,scan",
                    help="paths besides the oracle (scan: memory.apply(path='pallas', "
                         "impl='scan'), linear levels only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", default=",".join(LEVELS), help="comma list of level names")
    ap.add_argument("--mem-budget-gb", type=float, default=6.0,
                    help="shrink batch*heads for fwd+bwd rows whose per-token states exceed this")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "bench_memory.md"))
    args = ap.parse_args()
    dtype = jnp.float32
    rows = []
    for shape_name in args.shapes.split(","):
        B, T, H, _ = SHAPES[shape_name]
        for lname in args.levels.split(","):
            level = LEVELS[lname]
            base = {}
            runs = [("oracle", 1)] + [(path, int(C)) for C in args.chunk.split(",")
                                      for path in args.paths.split(",")
                                      if path != "scan" or isinstance(level.memory,
                                                                      nm.LinearMemory)]
            for path, C in runs:
                fwd, bwd = fns(level, path, C)
                for mode, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
                    b, h = B, H
                    # Paths without per-chunk remat inside a chunk store one state per token.
                    per_token = path == "oracle" or (path == "chunked" and mode == "fwd+bwd")
                    while (mode == "fwd+bwd" and per_token and b * h > 1
                           and state_bytes(level, b, h, T if path == "oracle" else C, dtype)
                           > args.mem_budget_gb * 2**30):
                        b, h = (b // 2, h) if b > 1 else (b, h // 2)
                    try:
                        sec = timeit(fn, *make(level, b, T, h, dtype), repeats=args.repeats)
                        tps = b * h * T / sec / H  # tokens/s normalised to the full H heads
                    except Exception as e:  # noqa: BLE001 - report, keep the table going
                        print(f"{shape_name} {lname} {path} {mode}: failed: {e!r}"[:300])
                        rows.append([f"({B},{T},{H},64)", lname, path, mode, "-", "-", "-",
                                     "failed"])
                        continue
                    base.setdefault(mode, tps)
                    note = "" if (b, h) == (B, H) else f"run at B={b}, H={h}"
                    rows.append([f"({B},{T},{H},64)", lname, f"{path} C={C}", mode,
                                 sec * 1e3 * (B * H) / (b * h), tps, tps / base[mode], note])
                    print(markdown_table(HEADER, rows[-1:]).split("\n")[-1], flush=True)
    table = markdown_table(HEADER, rows)
    print(table)
    write_result(args.out, "Memory engine: oracle vs chunked vs dual form",
                 f"fp32, median of {args.repeats} after warm-up; command: `python "
                 f"experiments/bench_memory.py {' '.join(sys.argv[1:])}`. 'ms (full batch)' "
                 "scales shrunk rows linearly in B*H.\n\n" + table)


if __name__ == "__main__":
    main()

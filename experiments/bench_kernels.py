"""Kernel benchmark: Pallas kernel vs XLA dual form vs per-token oracle, fwd and fwd+bwd.

Usage:
  python experiments/bench_kernels.py                        # CPU: --shapes cpu (small)
  python experiments/bench_kernels.py --shapes gpu --out $OUT/bench_kernels_gpu.md

Level: Hope's memory (LinearMemory, l2, momentum + DGD), chunk C = 64 (16 for the smallest
CPU shape), bf16 q/k/v on accelerators and f32 on CPU, f32 state and gates.  Throughput is
tokens/s = B*T/seconds (median after a compiling warm-up).

* kernel: ``nested_jax.memory.apply(path="pallas", impl="pallas")`` on GPU/TPU; on CPU there is no
  Pallas backend, so that row runs the Triton kernel's code in interpret mode (the Pallas
  interpreter lowers it to XLA loops: a correctness vehicle, its speed says nothing about a
  GPU).
* XLA dual: ``nested_jax.memory.apply(path="dual")``.
* oracle: ``path="oracle"``, the per-token scan (C = 1 semantics: the definition, timed for
  scale).  Its fwd+bwd stores a state per token; where that would exceed --oracle-gb it runs
  at a smaller batch and the row says so (tokens/s per sequence-head is what scales).

The GPU shapes are the issue's: (8, 4096, 16, 64), (2, 16384, 16, 128), (1, 8192, 96, 128).
``experiments/gpu_check.py`` is the one-shot GPU script (correctness + these timings).
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

SHAPES = {
    "cpu": [(1, 256, 2, 32), (2, 1024, 4, 64)],
    "gpu": [(8, 4096, 16, 64), (2, 16384, 16, 128), (1, 8192, 96, 128)],
}


def level_for(d):
    return nm.Level(nm.LinearMemory(d, d), "l2", nm.DGD)


def make(level, B, T, H, dtype):
    ks = jax.random.split(jax.random.key(0), 8)
    d = level.memory.dk
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, d))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (B, T, H, d))).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, d)).astype(dtype)
    g = nm.Gates(0.1 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))),
                 jax.nn.sigmoid(4.0 + jax.random.normal(ks[4], (B, T, H))),
                 jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))))
    w = jax.random.normal(ks[6], (B, H, d, d)) / jnp.sqrt(d)
    return nm.MemoryState({"W": w}, {"W": jnp.zeros_like(w)}), q, k, v, g


def runner(level, impl, C, kernel_impl):
    if impl == "kernel":
        kernel = "triton" if kernel_impl == "interpret" else "auto"
        return lambda *a: nm.apply(level, *a, chunk_size=C, path="pallas", impl=kernel_impl,
                                   kernel=kernel)
    path = "dual" if impl == "xla" else "oracle"
    return lambda *a: nm.apply(level, *a, chunk_size=C if path == "dual" else 1, path=path)


def fns(run):
    def loss(*a):
        return jnp.sum(run(*a)[0].astype(jnp.float32))

    return jax.jit(lambda *a: run(*a)[0]), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                    help="default: gpu on an accelerator, cpu otherwise")
    ap.add_argument("--impls", default="kernel,xla,oracle")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--oracle-gb", type=float, default=4.0,
                    help="max memory for the oracle's per-token states in fwd+bwd")
    ap.add_argument("--out", default=None, help="markdown path (default under results/)")
    args = ap.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    shapes = SHAPES[args.shapes or ("cpu" if on_cpu else "gpu")]
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    kernel_impl = "interpret" if on_cpu else "pallas"
    rows = []
    for B, T, H, d in shapes:
        C = 16 if T <= 256 else 64
        level = level_for(d)
        for impl in args.impls.split(","):
            b = B
            if impl == "oracle":  # per-token states: 2 * d * d * 4 bytes per token and head
                while b > 1 and 8.0 * d * d * b * T * H > args.oracle_gb * 2**30:
                    b //= 2
            inputs = make(level, b, T, H, dtype)
            fwd, fwdbwd = fns(runner(level, impl, C, kernel_impl))
            label = {"kernel": f"kernel ({kernel_impl})", "xla": "XLA dual",
                     "oracle": "oracle (per token)"}
            name = label[impl] + (f" at B={b}" if b != B else "")
            try:
                t_f = timeit(fwd, *inputs, repeats=args.repeats)
                t_b = timeit(fwdbwd, *inputs, repeats=args.repeats)
                rows.append(((B, T, H, d), C, name, t_f * 1e3, b * T / t_f, t_b * 1e3,
                             b * T / t_b))
            except Exception as e:  # noqa: BLE001 - one failing row must not end the run
                rows.append(((B, T, H, d), C, name, f"error: {type(e).__name__}", "", "", ""))
            print(rows[-1], flush=True)
    header = ["shape (B, T, H, d)", "C", "impl", "fwd ms", "fwd tok/s", "fwd+bwd ms",
              "fwd+bwd tok/s"]
    body = (f"Level: LinearMemory, l2, momentum + DGD (Hope's memory); {jnp.dtype(dtype).name} "
            "q/k/v, f32 state.\n"
            f"The kernel row is {kernel_impl} mode"
            + (" (the Pallas interpreter on CPU: a correctness run, not a speed measurement)"
               if on_cpu else "") + ".\n\n" + markdown_table(header, rows) + "\n")
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "bench_kernels.md" if on_cpu else "bench_kernels_gpu.md")
    write_result(out, "Kernel benchmark: Pallas kernel vs XLA dual form vs oracle", body)


if __name__ == "__main__":
    main()

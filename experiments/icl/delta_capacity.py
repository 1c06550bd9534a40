"""What the induction read can hold at best: an idealised delta-rule memory on MQAR.

    python -m experiments.icl.delta_capacity

Hope's self-modifying memory with decisions #24's initialisation starts out writing every
transition x_{t-1} -> x_t and reading at x_t (docs/decisions.md #24).  This script runs that
mechanism alone, with nothing learned: a linear memory M (d x d) per sequence, each token's
write the delta rule M <- M + eta (v - M k) k^T with k = e(x_{t-1}), v = e(x_t) for fixed
random unit embeddings e, and the prediction after each query key the seen token whose
embedding is nearest M e(k).  Every token writes (no learned gate skips filler or queries), so
later writes erase earlier ones along their keys: the figure is the recall a model starts from
before training tunes embeddings, keys and gates, at a head width d.

The point is diagnostic: at the tiny preset a head is d = 16 wide (4 heads of a 64-wide model).
Results: ``results/icl_delta_capacity.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from experiments import benchlib
from experiments.icl.tasks.mqar import MQAR

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
TASKS = ((8, 64, 64), (32, 256, 256))  # (pairs, T, vocab): the CPU MQAR sizes of the suite
WIDTHS = (16, 32, 64)
ETAS = (0.5, 1.0)


def recall(task: MQAR, d: int, eta: float, seed: int, batch: int = 16) -> float:
    """Fraction of query positions whose value the idealised delta-rule read recovers."""
    rng = np.random.default_rng(seed)
    b = task.sample(rng, batch)
    e_VxD = rng.standard_normal((task.vocab_size, d))
    e_VxD /= np.linalg.norm(e_VxD, axis=1, keepdims=True)
    right = total = 0
    for x, mask in zip(b.tokens, b.mask, strict=True):
        M = np.zeros((d, d))
        for t in range(1, len(x) - 1):
            k, v = e_VxD[x[t - 1]], e_VxD[x[t]]
            M += eta * np.outer(v - M @ k, k)  # write the transition into token t, then read
            if mask[t]:
                seen = np.unique(x[: t + 1])
                right += seen[np.argmax(e_VxD[seen] @ (M @ e_VxD[x[t]]))] == x[t + 1]
                total += 1
    return right / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = ap.parse_args(argv)
    rows = []
    for n, T, V in TASKS:
        task = MQAR(n_pairs=n, seq_len=T, vocab=V)
        for d in WIDTHS:
            for eta in ETAS:
                acc = [recall(task, d, eta, s) for s in args.seeds]
                rows.append([f"{n} x {T} (vocab {V})", d, eta,
                             f"{100 * np.mean(acc):.1f}% [{100 * min(acc):.1f}, "
                             f"{100 * max(acc):.1f}]", f"{100 / (V // 2):.1f}%"])
    table = benchlib.markdown_table(
        ["MQAR", "head width d", "eta", "recall, mean [min, max] over seeds", "chance"], rows)
    command = "python -m experiments.icl.delta_capacity " + " ".join(argv or sys.argv[1:])
    notes = os.path.join(os.path.dirname(__file__), "notes", "delta_capacity.md")
    reading = open(notes).read() if os.path.exists(notes) else "(no notes yet)\n"
    benchlib.write_result(
        os.path.join(RESULTS, "icl_delta_capacity.md"),
        "In-context learning: what an idealised delta-rule induction read holds on MQAR",
        f"Command: `{command.strip()}`\n\nSeeds {args.seeds}, 16 sequences each; every "
        "token writes its transition; nothing is trained.\n\n" + table + "\n\n" + reading)
    return 0


if __name__ == "__main__":
    sys.exit(main())

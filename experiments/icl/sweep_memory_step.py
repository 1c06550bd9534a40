"""Sweep M_memory's inner step and target in Hope (decisions.md #21), CMS frozen, on MQAR.

    python -m experiments.icl.sweep_memory_step            # runs every missing (setting, seed)
    python -m experiments.icl.sweep_memory_step --report-only

Hope's self-modifying memories alone (``sm_only``: CMS frozen in training and evaluation) on
MQAR with 8 pairs at T = 64, 400 steps, seeds 0 and 1, for:
  * M_memory's eta bound eta_max * memory_eta_scale in {0.1, 1, 10, 100} (eta_max = 0.1 for
    the coupled memories throughout), its target v_t or its self-generated l2(M_memory(v_t));
  * the strictly causal read (``memory_read="prior"``) at the default step.
Each run appends one JSON line to ``experiments/results/icl_mqar_memory_step_runs.jsonl``; the
report (``icl_mqar_memory_step.md`` + PNG) covers every logged run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from experiments import benchlib
from experiments.icl import tasks, train
from experiments.icl.run import RESULTS

STEPS = 400
SEEDS = (0, 1)
TASK = tasks.MQAR(n_pairs=8, seq_len=64, vocab=64)
# name -> Hope overrides; the default (decisions #21) is "v, 10"
SETTINGS = {
    "self-target, 0.1 (paper-literal)": dict(memory_eta_scale=1.0, memory_self_target=True),
    "self-target, 1": dict(memory_eta_scale=10.0, memory_self_target=True),
    "v, 1": dict(memory_eta_scale=10.0),
    "v, 10 (default)": dict(),
    "v, 100": dict(memory_eta_scale=1000.0),
    "v, 10, prior read": dict(memory_read="prior"),
}
LOG = os.path.join(RESULTS, "icl_mqar_memory_step_runs.jsonl")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the log")
    p.add_argument("--settings", nargs="+", type=int, default=None, metavar="I",
                   help="only these settings (0-based, in SETTINGS order): shards for parallel "
                   "processes")
    a = p.parse_args(argv)
    if not a.report_only:
        done = {(r["setting"], r["seed"]) for r in _runs()}
        for i, (name, over) in enumerate(SETTINGS.items()):
            for seed in SEEDS:
                if (name, seed) in done or (a.settings is not None and i not in a.settings):
                    continue
                r = train.run(TASK, "hope", "tiny", "sm_only", seed=seed, steps=STEPS,
                              overrides=over)
                with open(LOG, "a") as f:
                    f.write(json.dumps(dict(setting=name, overrides=over, seed=seed,
                                            steps=STEPS, accuracy=r.accuracy,
                                            accuracy_frozen_eval=r.accuracy_frozen_eval,
                                            final_loss=r.final_loss, skipped=r.skipped,
                                            seconds=r.seconds)) + "\n")
                print(f"{name} seed {seed}: {r.accuracy:.3f}", flush=True)
    write(sys.argv[1:] if argv is None else argv)


def _runs():
    return [json.loads(line) for line in open(LOG)] if os.path.exists(LOG) else []


def _spread(xs):
    return f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]" if xs else "-"


def write(argv) -> None:
    latest = {(r["setting"], r["seed"]): r for r in _runs()}
    rows, points = [], {}
    for name, over in SETTINGS.items():
        group = [r for (n, _), r in sorted(latest.items()) if n == name]
        if not group:
            continue
        acc = [r["accuracy"] for r in group]
        rows.append((name, over or "defaults", _spread(acc),
                     _spread([r["accuracy_frozen_eval"] for r in group]),
                     "/".join(str(r["skipped"]) for r in group),
                     ", ".join(str(r["seed"]) for r in group)))
        points[name] = acc
    png = os.path.join(RESULTS, "icl_mqar_memory_step.png")
    plot(points, png)
    notes = os.path.join(os.path.dirname(__file__), "notes", "mqar_memory_step.md")
    body = (
        f"Command: `python -m experiments.icl.sweep_memory_step {' '.join(argv)}`\n\n"
        f"- task: {TASK} (chance {TASK.chance:.3f}); Hope tiny, variant `sm_only` (CMS frozen "
        f"in training and evaluation), {STEPS} steps of batch 32, AdamW 3e-3; eta_max = 0.1 for "
        "the coupled memories in every row\n"
        "- setting: M_memory's target, then its eta bound (eta_max * memory_eta_scale)\n"
        "- accuracy: mean [min, max] over seeds on 8 fixed held-out batches; *frozen at eval*: "
        "the same weights with every self-modifying memory frozen (eta_max = 0)\n\n"
        + benchlib.markdown_table(["setting", "overrides", "accuracy", "frozen at eval",
                                   "non-finite steps", "seeds"], rows)
        + f"\n\n![accuracy]({os.path.basename(png)})\n\n"
        + (open(notes).read() if os.path.exists(notes) else ""))
    benchlib.write_result(os.path.join(RESULTS, "icl_mqar_memory_step.md"),
                          "In-context learning: M_memory's step and target (MQAR)", body)


def plot(points, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for target, marker in (("self-target", "s"), ("v", "o")):
        xs, ys, lo, hi = [], [], [], []
        for name, acc in points.items():
            head, _, rest = name.partition(", ")
            if head != target or "prior" in rest:
                continue
            xs.append(float(rest.split(" ")[0]))
            ys.append(np.mean(acc))
            lo.append(np.mean(acc) - min(acc))
            hi.append(max(acc) - np.mean(acc))
        order = np.argsort(xs)
        ax.errorbar(np.array(xs)[order], np.array(ys)[order],
                    yerr=[np.array(lo)[order], np.array(hi)[order]], marker=marker, capsize=3,
                    label=f"M_memory target: {target}")
    if "v, 10, prior read" in points:
        acc = points["v, 10, prior read"]
        ax.plot([10.0], [np.mean(acc)], "k^", label="v, prior read")
    ax.axhline(TASK.chance, color="gray", ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("M_memory eta bound (eta_max * memory_eta_scale)")
    ax.set_ylabel("MQAR accuracy, CMS frozen")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""One command per in-context-learning suite: train every model and memory variant, write results.

    python -m experiments.icl.run mqar                     # CPU scale (the committed results)
    python -m experiments.icl.run mqar --scale gpu         # larger: one GPU/TPU host
    python -m experiments.icl.run mqar --models hope --seeds 0 1 2 --steps 800

Writes ``experiments/results/icl_<suite>.md`` (machine, versions, date, command, tables, the
hand-written reading in ``experiments/icl/notes/<suite>.md``) and ``icl_<suite>.png``.

Variants freeze in-context memories for training *and* evaluation (``train.VARIANTS``):
Hope ``all`` / ``sm_only`` (CMS frozen) / ``cms_only`` (self-modifying memories frozen) /
``none``; TitansLM and Hope-Attention ``all`` / ``none``.  Each ``all`` run of a model with
self-modifying or Titans memories is also scored with those memories frozen at evaluation only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import numpy as np

from experiments import benchlib
from experiments.icl import tasks, train

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")

# suite -> scale -> (task kwargs, preset, steps, batch)
SUITES = {
    "mqar": {
        "cpu": (dict(n_pairs=8, seq_len=64, vocab=64), "tiny", 1000, 32),
        "gpu": (dict(n_pairs=32, seq_len=256, vocab=256), "small", 4000, 64),
    },
}
MODELS = ("hope", "titans", "hope_attention", "transformer")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", help=f"one of {sorted(SUITES)}")
    p.add_argument("--scale", default="cpu", help="cpu (default) or gpu")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--variants", nargs="+", default=None, help="default: every variant")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="model config overrides for every run, e.g. eta_max=1.0")
    p.add_argument("--out", default=None, help="results stem (default icl_<suite>)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the report from the runs already logged")
    a = p.parse_args(argv)
    if a.suite not in SUITES:
        p.error(f"suite={a.suite!r} is unknown; choose one of {sorted(SUITES)}")
    if a.scale not in SUITES[a.suite]:
        p.error(f"--scale={a.scale!r} is unknown; choose one of {sorted(SUITES[a.suite])}")
    for m in a.models:
        if m not in MODELS:
            p.error(f"--models: {m!r} is unknown; choose from {list(MODELS)}")
    return a


def literal(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    task_kw, preset, steps, batch = SUITES[a.suite][a.scale]
    steps, batch = a.steps or steps, a.batch or batch
    overrides = dict(kv.split("=", 1) for kv in a.set)
    overrides = {k: literal(v) for k, v in overrides.items()}
    task = tasks.make(a.suite, **task_kw)
    stem = a.out or f"icl_{a.suite}"
    log = os.path.join(RESULTS, f"{stem}_runs.jsonl")
    setup = dict(task=repr(task), preset=preset, steps=steps, batch=batch, lr=a.lr,
                 overrides=overrides)
    for model in a.models:
        for variant in a.variants or list(train.VARIANTS[model]):
            train.variant_overrides(model, variant)  # a clear error before any training
    t0 = time.time()
    for model in [] if a.report_only else a.models:
        for variant in a.variants or list(train.VARIANTS[model]):
            for seed in a.seeds:
                r = train.run(task, model, preset, variant, seed, lr=a.lr, steps=steps,
                              batch=batch, overrides=overrides)
                print(f"{model:15s} {variant:9s} seed {seed}: acc {r.accuracy:.3f} frozen-eval "
                      f"{r.accuracy_frozen_eval} skipped {r.skipped} {r.seconds:.0f}s", flush=True)
                # One line per run, appended: shards of a suite (e.g. --models in two
                # processes) add to the same log, and the report covers every matching run.
                with open(log, "a") as f:
                    f.write(json.dumps(dict(setup, model=model, variant=variant, seed=seed,
                                            **dataclasses.asdict(r))) + "\n")
    write(a, argv, task, setup, log, time.time() - t0)


def gather(log: str, setup: dict):
    """Rows and curves of every logged run with this setup, in model and variant order."""
    runs = [json.loads(line) for line in open(log)]
    runs = [r for r in runs if all(r[k] == v for k, v in setup.items())]
    latest = {(r["model"], r["variant"], r["seed"]): r for r in runs}  # a rerun replaces
    rows, curves = [], {}
    order = [(m, v) for m in MODELS for v in train.VARIANTS[m]]
    for model, variant in order:
        group = [r for (m, v, _), r in sorted(latest.items()) if (m, v) == (model, variant)]
        if not group:
            continue
        rng = lambda xs: f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]" if xs else "-"
        frozen = [r["accuracy_frozen_eval"] for r in group if r["accuracy_frozen_eval"] is not None]
        rows.append((model, variant, group[0]["params"], rng([r["accuracy"] for r in group]),
                     rng(frozen), "/".join(str(r["skipped"]) for r in group),
                     ", ".join(str(r["seed"]) for r in group),
                     f"{np.mean([r['seconds'] for r in group]):.0f}"))
        for r in group:
            curves[(model, variant, r["seed"])] = r["curve"]
    return rows, curves


def write(a, argv, task, setup, log, total) -> None:
    rows, curves = gather(log, setup)
    preset, steps, batch, overrides = (setup[k] for k in ("preset", "steps", "batch", "overrides"))
    stem = a.out or f"icl_{a.suite}"
    png = os.path.join(RESULTS, f"{stem}.png")
    plot(curves, png, task.chance)
    notes = os.path.join(HERE, "notes", f"{a.suite}.md")
    reading = open(notes).read() if os.path.exists(notes) else "(no notes yet)\n"
    body = (
        f"Command: `python -m experiments.icl.run {shlex.join(argv)}` "
        f"(this invocation {total / 60:.1f} min; the tables cover every run in "
        f"`{os.path.basename(log)}` with the same setup)\n\n"
        f"- task: {task} (chance {task.chance:.3f}); scored on the recall positions only\n"
        f"- preset {preset}, {steps} steps of batch {batch}, AdamW peak lr {a.lr} (warmup 10%, "
        f"cosine to 0.1x, clip 1.0, wd 0.1); overrides {overrides or 'none'}\n"
        "- accuracy: mean [min, max] over seeds, on 8 fresh held-out batches (the same for "
        "every run); *frozen at eval*: the trained model scored with its self-modifying (Hope) "
        "or Titans memory frozen (eta_max = 0) at evaluation only; *non-finite steps*: "
        "steps the trainer's guard skipped because the loss or a gradient was NaN/Inf (a run "
        "stops after 20)\n\n"
        + benchlib.markdown_table(
            ["model", "variant (frozen in training and eval)", "params", "accuracy",
             "frozen at eval", "non-finite steps (per seed)", "seeds", "s / run"], rows)
        + f"\n\n![training accuracy]({os.path.basename(png)})\n\n" + reading)
    benchlib.write_result(os.path.join(RESULTS, f"{stem}.md"),
                          f"In-context learning: {a.suite}", body)


def plot(curves, path, chance) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {}
    for (model, variant, seed), curve in sorted(curves.items()):
        if not curve:
            continue
        label = f"{model}/{variant}"
        c = colors.setdefault(label, f"C{len(colors) % 10}")
        steps, _, acc = zip(*curve, strict=True)
        ax.plot(steps, acc, color=c, alpha=0.8, label=label if seed == min(
            s for (m, v, s) in curves if (m, v) == (model, variant)) else None)
    ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("recall accuracy (training batch)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

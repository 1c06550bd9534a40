"""The README's HopeLM trained well past the demo, then scored with its memories frozen.

    python -m experiments.lm.hope_long                  # seeds 0 1, 2000 steps each
    python -m experiments.lm.hope_long --seeds 1        # one shard
    python -m experiments.lm.hope_long --report-only

The in-context learning issue asks that HopeLM be trained for thousands of steps at the small
preset on CPU and then scored with its self-modifying memories frozen, and that freezing them
cost measurable perplexity.  Each run is the README's main job (`lm:cpu_demo`: HopeLM small,
byte tokens, 16 x 128 a step, AdamW 3e-3 with 10 warmup steps and a cosine decay, the embedded
Wikipedia paragraphs) with `steps` raised to STEPS, trained by the real trainer, which
checkpoints every CHECKPOINT_EVERY steps, so a rerun of the same command resumes where an
interrupted one stopped (a run takes longer than one session on 2 cores).  The last
checkpoint is then scored on the held-out split four ways, the same as
``nested-jax eval --workdir W [--freeze self_modifying] [--freeze cms]``: as trained, with the
self-modifying memories frozen (inner rates 0 at evaluation only), with CMS frozen, and with
both.  Runs live in ``runs/lm/hope_long/``; one JSON line per finished run goes to
``experiments/results/lm_hope_long_runs.jsonl``, the table and curves to ``lm_hope_long.md``
and ``.png``.
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

from experiments.lm import report as lm_report

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 2000, 250, 50
FREEZES = {"learning": (), "self-modifying frozen": ("self_modifying",),
           "CMS frozen": ("cms",), "both frozen": ("self_modifying", "cms")}


def config(seed: int):
    from nested_jax.train.configs import lm

    return dataclasses.replace(lm.get_config("cpu_demo"), steps=STEPS, seed=seed,
                               log_every=10, eval_every=EVAL_EVERY,
                               checkpoint_every=CHECKPOINT_EVERY, keep_checkpoints=2)


def one_run(seed: int, runs_dir: str) -> dict:
    from experiments.lm.finished import train_to_end
    from nested_jax.train import evaluate, metrics, trainer

    workdir = os.path.join(runs_dir, "hope_long", f"s{seed}")
    cfg = config(seed)
    t0 = time.time()
    # restart=True only matters before the first checkpoint: a killed run that left its
    # config but no checkpoint starts again; with a checkpoint the trainer resumes from it.
    summary = train_to_end(cfg, workdir, restart=True)
    recs = metrics.read_records(trainer.workdir_path(workdir) / "metrics.jsonl")
    curve = [(r["step"], r["eval/perplexity"]) for r in recs if "eval/perplexity" in r]
    train = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    rates = [r["perf/tokens_per_s"] for r in recs if "perf/tokens_per_s" in r]
    ppl = {name: evaluate.evaluate_checkpoint(workdir, freeze=f)["perplexity"]
           for name, f in FREEZES.items()}
    return dict(seed=seed, steps=STEPS, params=summary["params"], ppl=ppl,
                eval_curve=curve, train_curve=train,
                seconds_per_step=(cfg.data.batch_size * cfg.data.seq_len
                                  / float(np.median(rates))),
                seconds_this_invocation=time.time() - t0)


def plot(runs: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for seed, r in sorted(runs.items()):
        s, p = zip(*r["eval_curve"], strict=True)
        a.plot(s, p, marker="o", label=f"seed {seed}")
        s, l = zip(*r["train_curve"], strict=True)
        b.plot(s, l, lw=0.8, label=f"seed {seed}")
    a.set(xlabel="step", ylabel="held-out perplexity (bytes)", yscale="log",
          title="HopeLM small, held-out")
    b.set(xlabel="step", ylabel="training loss (nats / byte)", title="training loss")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def report(log: str, command: str, png: str | None = None) -> str:
    """The results page for every run in ``log``; its curves go to ``png`` (default
    ``experiments/results/lm_hope_long.png``)."""
    from experiments.benchlib import machine_header

    runs = {}
    for line in open(log) if os.path.exists(log) else []:
        r = json.loads(line)
        runs[r["seed"]] = r  # a rerun replaces the earlier one
    span = lambda xs: f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"
    rs = [runs[s] for s in sorted(runs)]
    png = png or os.path.join(RESULTS, "lm_hope_long.png")
    rows = []
    if rs:
        plot(runs, png)
        for name in FREEZES:
            vals = [r["ppl"][name] for r in rs]
            gap = [r["ppl"][name] - r["ppl"]["learning"] for r in rs]
            rows.append(f"| {name} | {span(vals)} | "
                        f"{'-' if name == 'learning' else span(gap)} | "
                        f"{' / '.join(f'{v:.3f}' for v in vals)} |")
    cfg = config(0)
    return "\n".join([
        "# HopeLM trained well past the demo, scored with its memories frozen", "",
        machine_header(), "", f"Command: `{command}`", "",
        f"The README's main job (`lm:cpu_demo`: HopeLM, small preset, byte tokens, "
        f"{cfg.data.batch_size} x {cfg.data.seq_len} a step, AdamW peak lr "
        f"{cfg.optim.learning_rate:g}, {cfg.optim.warmup_steps} warmup steps, cosine) trained "
        f"for {STEPS} steps instead of {lm_steps()}; {len(rs)} seed(s) "
        f"({', '.join(str(r['seed']) for r in rs) or 'none yet'}), "
        f"{rs[0]['params'] if rs else '-'} parameters.  "
        "Held-out perplexity (per byte) of the last checkpoint, as trained and with memories "
        "frozen at evaluation only (inner learning rates 0; `nested-jax eval --freeze`).  "
        "Mean [min, max] over seeds; *gap*: frozen minus learning.  "
        + (f"~{np.mean([r['seconds_per_step'] for r in rs]):.1f} s a step (median "
           "throughput)." if rs else ""), "",
        "| scored | perplexity | gap | per seed |", "|---|---|---|---|", *rows, "",
        *([f"![curves]({os.path.basename(png)})", ""] if rs else []),
        "## Reading (hand-written; experiments/lm/notes/hope_long.md)", "",
        open(os.path.join(HERE, "notes", "hope_long.md")).read()])


def lm_steps() -> int:
    from nested_jax.train.configs import lm

    return lm.get_config("cpu_demo").steps


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--runs-dir", default=os.path.join("runs", "lm"))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    log = os.path.join(RESULTS, "lm_hope_long_runs.jsonl")
    for s in [] if a.report_only else a.seeds:
        lm_report.append_run(log, one_run(s, a.runs_dir))
    lm_report.write_text(os.path.join(RESULTS, "lm_hope_long.md"), report(
        log, f"python -m experiments.lm.hope_long {shlex.join(argv)}".strip()))


if __name__ == "__main__":
    main()

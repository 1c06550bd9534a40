"""Does HopeLM's self-modifying memory matter on language modelling, by initialisation?

    python -m experiments.lm.init_probe                   # every variant, seed 0
    python -m experiments.lm.init_probe --variants shifted --seeds 0 1
    python -m experiments.lm.init_probe --report-only

A short diagnostic beside the LM suites (``run.py``): HopeLM at the CPU scale's width (d 128, 4
heads, SentencePiece 4K, 8 x 256 tokens a step) but 2 layers and 1000 steps at lr 3e-3, trained
once per initialisation of the self-modifying layer (decisions.md #24):

- ``shifted``: the defaults, ``key_shift=True, q_identity=True`` (k_t from the previous token's
  conv tap, W_q starting at the identity: M_memory starts out storing x_{t-1} -> x_t);
- ``paper_init``: ``key_shift=False, q_identity=False`` (every conv at the current token, W_q
  random: k_t ~ v_t, so M_memory stores x -> ~x).

Each run is scored on the held-out split learning, with the self-modifying memories frozen
(eta_max = 0) and with CMS frozen (cms_lr = 0) at evaluation only, and by position on
Shakespeare's plays to 2048 tokens (``position.py``), learning and self-modifying-frozen.  Runs
live in ``runs/lm/init_probe/`` (resumable); one JSON line per run goes to
``experiments/results/lm_init_probe_runs.jsonl``, the table to ``lm_init_probe.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

from experiments.lm import position, recipes
from experiments.lm import report as lm_report
from experiments.lm import run as lm_run
from experiments.lm import tokenizer as tok_lib

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
VARIANTS = {"shifted": dict(key_shift=True, q_identity=True),
            "paper_init": dict(key_shift=False, q_identity=False)}
SPANS = ((64, 256), (256, 1024), (1024, 2048))  # position bins of the loss-by-position columns
STEPS, LAYERS, LR = 1000, 2, 3e-3


def one_run(variant: str, seed: int, runs_dir: str, tokenizer: str) -> dict:
    from experiments.lm.finished import train_to_end
    from nested_jax.train import evaluate

    scale = recipes.SCALES["cpu"]
    over = {**scale.overrides("hope"), "n_layers": LAYERS, **VARIANTS[variant]}
    cfg = lm_run.train_config(scale, recipes.PRESET["cpu"], "hope", over, "adamw", LR, seed,
                              STEPS, f"sentencepiece:{os.path.abspath(tokenizer)}")
    workdir = os.path.join(runs_dir, "init_probe", f"{variant}-s{seed}")
    t0 = time.time()
    train_to_end(cfg, workdir)
    ppl = lambda *f: evaluate.evaluate_checkpoint(workdir, freeze=f)["perplexity"]
    bins = lambda a: [float(np.mean(a[s:e])) for s, e in SPANS]
    L, n = scale.position_len, scale.position_batches
    return dict(variant=variant, seed=seed, overrides=over, ppl=ppl(), sm_frozen=ppl(
        "self_modifying"), cms_frozen=ppl("cms"), position=bins(position.losses_by_position(
            workdir, L, n)), position_sm_frozen=bins(position.losses_by_position(
                workdir, L, n, freeze=("self_modifying",))), seconds=time.time() - t0)


def report(log: str, command: str) -> str:
    from experiments.benchlib import machine_header

    runs = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    span = lambda xs: f"{np.mean(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"
    rows = []
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        col = lambda k: span([r[k] for r in rs])
        gap = span([r["sm_frozen"] - r["ppl"] for r in rs])
        pos = " / ".join(span([r["position"][i] for r in rs]) for i in range(len(SPANS)))
        posf = " / ".join(span([r["position_sm_frozen"][i] for r in rs])
                          for i in range(len(SPANS)))
        rows.append(f"| {v} | {VARIANTS[v]} | {col('ppl')} | {col('sm_frozen')} | {gap} | "
                    f"{col('cms_frozen')} | {pos} | {posf} | "
                    f"{', '.join(str(r['seed']) for r in rs)} |")
    bins = ", ".join(f"{s}-{e}" for s, e in SPANS)
    return "\n".join([
        "# Language modelling: does the self-modifying memory matter, by initialisation?", "",
        machine_header(), "", f"Command: `{command}`", "",
        f"HopeLM, d_model 128, {LAYERS} layers, 4 heads, d_ff 512, SentencePiece 4096, {STEPS} "
        f"steps of 8 x 256 tokens of the embedded Wikipedia paragraphs, AdamW lr {LR:g} "
        "(warmup 40, cosine), one run per row and seed.  Perplexity on the held-out split; "
        "*frozen*: the same checkpoint with those memories' inner rates set to 0 at evaluation "
        f"only; loss by position: mean nats over the bins {bins} of 4 windows of Shakespeare's "
        "plays (trained at 256).", "",
        "| init | overrides | ppl | self-modifying frozen | gap | CMS frozen | "
        "loss by position | same, self-modifying frozen | seeds |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "## Reading (hand-written; experiments/lm/notes/init_probe.md)", "",
        open(os.path.join(HERE, "notes", "init_probe.md")).read()])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--runs-dir", default=os.path.join("runs", "lm"))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    log = os.path.join(RESULTS, "lm_init_probe_runs.jsonl")
    if not a.report_only:
        scale = recipes.SCALES["cpu"]
        tok = tok_lib.build("builtin:wikipedia", scale.vocab, os.path.join(
            a.runs_dir, "cpu", f"tokenizer-{scale.vocab}.model"))
        done = {(r["variant"], r["seed"]) for r in map(json.loads, open(log))} if os.path.exists(
            log) else set()
        for v in a.variants:
            for s in a.seeds:
                if (v, s) not in done:
                    lm_report.append_run(log, one_run(v, s, a.runs_dir, tok))
    lm_report.write_text(os.path.join(RESULTS, "lm_init_probe.md"), report(
        log, f"python -m experiments.lm.init_probe {shlex.join(argv)}".strip()))


if __name__ == "__main__":
    main()

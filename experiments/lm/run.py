"""One command per language-model suite: train, score (also with memories frozen), report.

    python -m experiments.lm.run compare                 # Hope, TitansLM, Hope-Attention, T++
    python -m experiments.lm.run ablation                # the paper's ablation rows on HopeLM
    python -m experiments.lm.run optimizers              # AdamW, Muon, M3, delta momentum, DMGD
                                                         # (+ Muon, M3 with CMS levels off NS)
    python -m experiments.lm.run compare --models transformer --seeds 0   # one shard
    python -m experiments.lm.run compare --report-only   # rewrite the report from the log

Every suite trains on the embedded Wikipedia paragraphs with one SentencePiece tokenizer
(``experiments/lm/tokenizer.py``, trained once on the training split), at parameter counts
matched without the embedding and the same tokens per run (``recipes.py``).  The learning rate is
swept on the first seed over ``Scale.grid`` (AdamW's for compare and ablation, each
optimizer's own in the optimizer suite); the other seeds run at the best value, and the
report flags a best value at the edge of the grid.  Each run is also scored

- with each in-context memory frozen at evaluation only (inner learning rates 0,
  ``nested-jax eval --freeze``): the gap is what in-context learning contributes;
- by position on long documents (``position.py``), learning and frozen.

Runs live in ``runs/lm/<scale>/<suite>/`` (resumable: an interrupted run continues from its
checkpoint), one JSON line per finished run goes to ``experiments/results/lm_<suite>_runs.jsonl``
and the report to ``experiments/results/lm_<suite>.md`` + ``.png``, with the hand-written
reading in ``experiments/lm/notes/<suite>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

from experiments.lm import recipes, report
from experiments.lm import tokenizer as tok_lib

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
SUITES = ("compare", "ablation", "optimizers")
# Memories each model can freeze at evaluation (nested_jax/train/evaluate.py FREEZE names).
FREEZES = {"hope": (("self_modifying",), ("cms",), ("self_modifying", "cms")),
           "hope_attention": (("cms",),), "titans": (("self_modifying",),), "transformer": ()}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", help=f"one of {list(SUITES)}")
    p.add_argument("--scale", default="cpu", help=f"one of {list(recipes.SCALES)}")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"compare: a subset of {list(recipes.MODELS)}")
    p.add_argument("--rows", nargs="+", default=None,
                   help=f"ablation: a subset of {list(recipes.ABLATIONS)}")
    p.add_argument("--optimizers", nargs="+", default=None,
                   help=f"optimizers: a subset of {list(recipes.OPTIMIZER_ARMS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="the learning-rate grid (default: the scale's, per optimizer in the "
                        "optimizer suite)")
    p.add_argument("--steps", type=int, default=None, help="default: the scale's")
    p.add_argument("--runs-dir", default="runs/lm", help="where run workdirs go")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the report from the runs already logged")
    a = p.parse_args(argv)
    if a.suite not in SUITES:
        p.error(f"suite={a.suite!r} is unknown; choose one of {list(SUITES)}")
    if a.scale not in recipes.SCALES:
        p.error(f"--scale={a.scale!r} is unknown; choose one of {list(recipes.SCALES)}")
    for flag, known in (("models", recipes.MODELS), ("rows", recipes.ABLATIONS),
                        ("optimizers", recipes.OPTIMIZER_ARMS)):
        for name in getattr(a, flag) or ():
            if name not in known:
                p.error(f"--{flag}: {name!r} is unknown; choose from {list(known)}")
    if a.steps is not None and a.steps < 10:
        p.error(f"--steps={a.steps}: a run needs >= 10 steps (warmup, then 4 evaluations)")
    for lr in a.lrs or ():
        if not 0 < lr <= 10:  # SGD-like momentum wants ~1; 3 for 3e-3 is a typo
            p.error(f"--lrs: {lr} must be in (0, 10]")
    if not a.seeds or len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0:
        p.error(f"--seeds {a.seeds}: distinct integers >= 0")
    return a


def arms(a) -> list[tuple[str, str, dict, str, dict]]:
    """(arm name, model, model overrides, optimizer, optim.kwargs) for each arm of the suite."""
    scale = recipes.SCALES[a.scale]
    if a.suite == "compare":
        return [(m, m, scale.overrides(m), "adamw", {}) for m in a.models or recipes.MODELS]
    if a.suite == "ablation":
        return [(r, "hope", {**scale.overrides("hope"), **recipes.ABLATIONS[r]}, "adamw", {})
                for r in a.rows or recipes.ABLATIONS]
    return [(o, "hope", scale.overrides("hope"), *recipes.OPTIMIZER_ARMS[o])
            for o in a.optimizers or recipes.OPTIMIZER_ARMS]


def train_config(scale: recipes.Scale, preset: str, model: str, overrides: dict, optimizer: str,
                 lr: float, seed: int, steps: int, tokenizer: str,
                 optim_kwargs: dict | None = None):
    from nested_jax.train.config import DataConfig, OptimConfig, TrainConfig

    quarter = max(steps // 4, 1)
    return TrainConfig(
        model=model, preset=preset, model_overrides=overrides,
        steps=steps, seed=seed, log_every=max(steps // 50, 1), eval_every=quarter,
        eval_batches=scale.eval_batches, checkpoint_every=quarter, keep_checkpoints=1,
        data=DataConfig(tokenizer=tokenizer, seq_len=scale.seq_len, batch_size=scale.batch,
                        eval_fraction=0.01),
        optim=OptimConfig(name=optimizer, learning_rate=lr, warmup_steps=scale.warmup,
                          weight_decay=0.1, b2=0.95, grad_clip=1.0,
                          kwargs=dict(optim_kwargs or {})))


def compare_twin(suite: str, setup: dict, model: str, overrides: dict, optimizer: str,
                 optim_kwargs: dict, lr: float, seed: int) -> dict | None:
    """The compare suite's finished run of this very training, if one is logged.

    The ablation suite's reference row ("hope") and the optimizer suite's AdamW arm train the
    compare suite's HopeLM: same model overrides, optimizer, learning rate, seed, steps and
    tokens.  Training is deterministic, so their run would repeat compare's bit for bit (45 min
    on one CPU core); its record is reused instead, marked ``reused_from``.
    """
    if suite == "compare" or optim_kwargs:  # compare trains with the defaults only
        return None
    same = (model, overrides, optimizer, lr, seed)
    for r in report.finished_runs(os.path.join(RESULTS, "lm_compare_runs.jsonl"),
                                  dict(setup, suite="compare")):
        if (r["model"], r["overrides"], r["optimizer"], r["lr"], r["seed"]) == same:
            own = set(report.SETUP_KEYS) | {"arm", "model", "optimizer", "overrides", "lr",
                                            "seed"}
            return dict({k: v for k, v in r.items() if k not in own},
                        reused_from=f"compare {r['arm']} lr {lr:g} seed {seed}")
    return None


def one_run(cfg, workdir: str, freezes, scale: recipes.Scale) -> dict:
    """Train (or resume) in `workdir`, then score: held-out perplexity, learning and with each
    memory frozen, and the loss by position."""
    from experiments.lm import position
    from experiments.lm.finished import train_to_end
    from nested_jax.train import evaluate, metrics, trainer

    t0 = time.time()
    summary = train_to_end(cfg, workdir)
    seconds = time.time() - t0
    records = metrics.read_records(trainer.workdir_path(workdir) / "metrics.jsonl")
    curve = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    rates = [r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r]
    tokens = cfg.data.seq_len * cfg.data.batch_size
    out = dict(ppl=evaluate.evaluate_checkpoint(workdir)["perplexity"], curve=curve,
               seconds=seconds, params=summary["params"],
               sec_per_step=tokens / float(np.median(rates)) if rates else None)
    from nested_jax import models

    d_model = models.make_config(cfg.model, cfg.preset, **cfg.model_overrides).d_model
    out["params_body"] = out["params"] - scale.vocab * d_model  # the tied embedding is shared
    out["frozen"] = {"+".join(f): evaluate.evaluate_checkpoint(workdir, freeze=f)["perplexity"]
                     for f in freezes}
    L, n = scale.position_len, scale.position_batches
    out["position"] = position.losses_by_position(workdir, L, n).tolist()
    out["position_frozen"] = {"+".join(f): position.losses_by_position(workdir, L, n, freeze=f)
                              .tolist() for f in freezes}
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    scale = recipes.SCALES[a.scale]
    steps = a.steps or scale.steps
    log = os.path.join(RESULTS, f"lm_{a.suite}_runs.jsonl")
    setup = dict(suite=a.suite, scale=a.scale, steps=steps, seq_len=scale.seq_len,
                 batch=scale.batch, vocab=scale.vocab)
    runs_dir = os.path.join(a.runs_dir, a.scale)
    t0 = time.time()
    if not a.report_only:
        tok = tok_lib.build("builtin:wikipedia", scale.vocab,
                            os.path.join(runs_dir, f"tokenizer-{scale.vocab}.model"))
        for name, model, overrides, optimizer, optim_kwargs in arms(a):
            lrs = tuple(a.lrs or scale.grid(a.suite, optimizer))
            done = report.logged(log, setup, name)
            # Middle of the grid first: an interrupted sweep has its likeliest best value.
            order = sorted(lrs, key=lambda lr: abs(lrs.index(lr) - (len(lrs) - 1) / 2))
            sweep = [(lr, a.seeds[0]) for lr in order]
            for lr, seed in sweep + [(None, s) for s in a.seeds[1:]]:
                if lr is None:  # later seeds: the best value of the first seed's sweep
                    lr = report.best_lr(report.logged(log, setup, name), a.seeds[0], lrs)
                if (lr, seed) in done:
                    continue
                r = compare_twin(a.suite, setup, model, overrides, optimizer, optim_kwargs,
                                 lr, seed)
                if r is None:
                    cfg = train_config(scale, recipes.PRESET[a.scale], model, overrides,
                                       optimizer, lr, seed, steps,
                                       f"sentencepiece:{os.path.abspath(tok)}", optim_kwargs)
                    workdir = os.path.join(runs_dir, a.suite, f"{name}-lr{lr:g}-s{seed}")
                    r = one_run(cfg, workdir, FREEZES[model], scale)
                print(f"{a.suite} {name:16s} lr {lr:g} seed {seed}: ppl {r['ppl']:.3f} "
                      f"frozen {r['frozen']} {r['seconds']:.0f}s", flush=True)
                with open(log, "a") as f:  # one line per run: shards in parallel processes
                    kw = {"optim_kwargs": optim_kwargs} if optim_kwargs else {}
                    f.write(json.dumps(dict(setup, arm=name, model=model, optimizer=optimizer,
                                            **kw, overrides=overrides, lr=lr, seed=seed, **r))
                            + "\n")
                done[(lr, seed)] = r
    report.write(a, argv, setup, log, time.time() - t0,
                 command=f"python -m experiments.lm.run {shlex.join(argv)}")


if __name__ == "__main__":
    main()

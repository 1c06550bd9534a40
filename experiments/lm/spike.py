"""What drives Muon's and M3's warmup blow-up on HopeLM: which matrices, which second moment.

    python -m experiments.lm.spike [--steps 32] [--seeds 0 1] [--report-only]

The optimizer suite's HopeLM (its model, data, batch, warmup and schedule: the run
``python -m experiments.lm.run optimizers`` makes) trained for the first ``--steps`` steps at
3e-2, a value of both grids at which AdamW is stable (compare's HopeLM run, perplexity 157.6 at
400 steps; here the control arm) but Muon's and M3's gradient norms reach 1e3-1e5 in warmup.
Each other arm changes one thing (``optim.kwargs``, `nested_jax/train/optimizers.py`):

- ``ns_skip=('levels',)``: the CMS levels' initial weights leave Newton-Schulz (Muon: to its
  Adam, M3: its update without the orthogonalization);
- ``ns_skip=('coupled_w1', 'coupled_w2', 'memory_w')``: the self-modifying memories' initial
  states leave it instead;
- M3's ``beta2=0.95``: the second moment of Muon's Adam (and of the AdamW runs), not Adam's
  0.999.

Every step logs the loss, the global gradient norm and its share by parameter group; the
report gives each arm's largest gradient norm and its loss at the end (mean and range over
seeds) and plots the gradient norm against the step.  Writes
``experiments/results/lm_optimizers_spike.md``, ``.png`` and ``_runs.jsonl`` (one line per
run; finished runs are not rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np

from experiments import benchlib
from experiments.lm import recipes, report, run
from experiments.lm import tokenizer as tok_lib

OUT = os.path.join(run.RESULTS, "lm_optimizers_spike")
LR = 3e-2
MEMORIES = ("coupled_w1", "coupled_w2", "memory_w")
ARMS = {  # name: (optimizer, optim.kwargs); run in this order, the causal contrasts first
    "adamw (control)": ("adamw", {}),
    "muon": ("muon", {}),
    "muon, CMS levels off NS": ("muon", {"ns_skip": ("levels",)}),
    "m3": ("m3", {}),
    "m3, CMS levels off NS": ("m3", {"ns_skip": ("levels",)}),
    "m3, beta2 0.95": ("m3", {"beta2": 0.95}),
    "m3, CMS levels off NS, beta2 0.95": ("m3", {"ns_skip": ("levels",), "beta2": 0.95}),
    "muon, memories off NS": ("muon", {"ns_skip": MEMORIES}),
}
GROUPS = {"CMS levels": ("levels",), "memories": MEMORIES,
          "projections": ("q_proj", "o_proj", "gate_proj"), "embedding": ("embedding",)}


def group_of(names: set[str]) -> str:
    """The report's parameter group of a parameter path (its names); ``other``: vectors."""
    return next((g for g, keys in GROUPS.items() if names & set(keys)), "other")


def train_steps(cfg, steps: int, workdir: str) -> list[dict]:
    """The suite's first ``steps`` steps (its optimizer, schedule and batches), logging the loss
    and the gradient norm by group.  The step is the trainer's arithmetic without its guard:
    nothing is skipped, so the blow-up shows as it is."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from nested_jax import data as data_lib
    from nested_jax.train import optimizers, trainer
    from nested_jax.train.step import next_token_loss

    r = trainer.prepare(cfg, workdir, devices=jax.devices()[:1])
    state = r.init_state()
    paths = jax.tree_util.tree_leaves_with_path(state["params"])
    groups = [group_of(optimizers.path_names(path)) for path, _ in paths]

    def loss_fn(params, rest, tokens_BxT1):
        return next_token_loss(nnx.merge(r.graphdef, params, rest), tokens_BxT1)[0]

    @jax.jit
    def step(params, rest, opt_state, tokens_BxT1):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens_BxT1)
        sq = {}
        for g, x in zip(groups, jax.tree.leaves(grads), strict=True):
            sq[g] = sq.get(g, 0.0) + jnp.sum(jnp.square(x.astype(jnp.float32)))
        updates, opt_state = r.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, sq

    batches = data_lib.train_batches(
        r.documents, r.tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
        seed=cfg.seed, eval_fraction=cfg.data.eval_fraction)
    params, rest, opt_state = state["params"], state["rest"], state["opt_state"]
    log = []
    for t in range(1, steps + 1):
        params, opt_state, loss, sq = step(params, rest, opt_state, np.asarray(next(batches)))
        sq = {g: float(v) for g, v in sq.items()}
        log.append(dict(step=t, loss=float(loss), grad_norm=float(np.sqrt(sum(sq.values()))),
                        by_group={g: float(np.sqrt(v)) for g, v in sq.items()}))
    return log


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=32, help="steps from initialization (>= 2)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--arms", nargs="+", default=None, help=f"default: all of {list(ARMS)}")
    p.add_argument("--runs-dir", default="runs/lm", help="where the suite's tokenizer lives")
    p.add_argument("--report-only", action="store_true", help="rewrite the report only")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error(f"--steps={a.steps}: need >= 2")
    for name in a.arms or ():
        if name not in ARMS:
            p.error(f"--arms: {name!r} is unknown; choose from {list(ARMS)}")
    scale = recipes.SCALES["cpu"]
    log_path = OUT + "_runs.jsonl"
    t0 = time.time()
    if not a.report_only:
        tok = tok_lib.build("builtin:wikipedia", scale.vocab, os.path.join(
            a.runs_dir, "cpu", f"tokenizer-{scale.vocab}.model"))
        done = {(r["arm"], r["seed"], r["steps"]) for r in _records(log_path)}
        for seed in a.seeds:  # every arm on a seed, then the next: a cut run has each arm once
            for name in a.arms or ARMS:
                if (name, seed, a.steps) in done:
                    continue
                optimizer, kwargs = ARMS[name]
                cfg = run.train_config(scale, recipes.PRESET["cpu"], "hope",
                                       scale.overrides("hope"), optimizer, LR, seed, scale.steps,
                                       f"sentencepiece:{os.path.abspath(tok)}", kwargs)
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.time()
                    steps = train_steps(cfg, a.steps, tmp)
                peak = max(steps, key=lambda s: s["grad_norm"])
                print(f"{name:36s} seed {seed}: max grad norm {peak['grad_norm']:.3g} at step "
                      f"{peak['step']}, loss {steps[-1]['loss']:.3f} ({time.time() - t:.0f} s)",
                      flush=True)
                report.append_run(log_path, dict(arm=name, optimizer=optimizer, kwargs=kwargs,
                                                  lr=LR, seed=seed, steps=a.steps, log=steps))
    write(argv, a.steps, log_path, time.time() - t0)


def _records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write(argv, steps: int, log_path: str, seconds: float) -> None:
    runs = [r for r in _records(log_path) if r["steps"] == steps]
    rows = []
    by_arm = {name: [r for r in runs if r["arm"] == name] for name in ARMS}
    for name, rs in by_arm.items():
        if not rs:
            continue
        peaks = [max(s["grad_norm"] for s in r["log"]) for r in rs]
        ends = [r["log"][-1]["loss"] for r in rs]
        over = [sum(s["grad_norm"] > 10 for s in r["log"]) for r in rs]
        top = [max(r["log"], key=lambda s: s["grad_norm"])["by_group"] for r in rs]
        lead = {g: np.mean([t[g] ** 2 / sum(v ** 2 for v in t.values()) for t in top])
                for g in top[0]}
        share = max(lead, key=lead.get)
        rows.append((name, ", ".join(str(r["seed"]) for r in rs),
                     f"{np.exp(np.mean(np.log(peaks))):.3g} [{min(peaks):.3g}, {max(peaks):.3g}]",
                     ", ".join(str(n) for n in over),
                     f"{share} ({lead[share]:.0%})", report._spread(ends, ".3f")))
    body = (
        f"Command: `{' '.join(['python -m experiments.lm.spike', shlex.join(argv)]).strip()}` "
        f"(this invocation {seconds / 60:.1f} min; the table covers every run in "
        f"`lm_optimizers_spike_runs.jsonl` of {steps} steps, ~7 min each on one core)\n\n"
        f"- model, data, batch, warmup and schedule: the optimizer suite's HopeLM at the cpu "
        f"scale (`experiments/lm/recipes.py`), peak learning rate {LR:g}, the first {steps} "
        "steps of the 400-step schedule; the trainer's step without its guard (nothing "
        "skipped)\n"
        "- max grad norm: the largest global gradient norm (before clipping to 1) over the "
        "steps, geometric mean [range] over seeds; steps > 10: how many steps' norms exceed 10, "
        "by seed"
        "; at the peak: the parameter group with the largest share of the squared gradient "
        "norm there (mean over seeds); loss: the train loss at the last "
        "step, mean [range]\n\n"
        + benchlib.markdown_table(["arm", "seeds", "max grad norm", f"steps > 10 (of {steps})",
                                   "at the peak", f"loss at step {steps}"], rows)
        + "\n\nReading: experiments/lm/notes/optimizers.md (hand-written).\n")
    benchlib.write_result(OUT + ".md", "Optimizer suite: what drives Muon's and M3's warmup "
                          "blow-up on HopeLM", body)
    if runs:
        plot(by_arm, OUT + ".png")


def plot(by_arm: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, opt in zip(axes, ("muon", "m3"), strict=True):
        for name, rs in by_arm.items():
            if not rs or ARMS[name][0] not in (opt, "adamw"):
                continue
            steps = [s["step"] for s in rs[0]["log"]]
            norms = np.array([[s["grad_norm"] for s in r["log"]] for r in rs])
            line, = ax.plot(steps, np.exp(np.log(norms).mean(0)), label=name)
            ax.fill_between(steps, norms.min(0), norms.max(0), color=line.get_color(),
                            alpha=0.15)
        ax.set(yscale="log", xlabel="step", title=f"{opt}, lr {LR:g} (AdamW: the control)")
        if ax.get_lines():
            ax.legend(fontsize=7)
    axes[0].set_ylabel("gradient norm (geometric mean, range over seeds)")
    benchlib.save_figure(fig, path)


if __name__ == "__main__":
    main()

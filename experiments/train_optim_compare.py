"""Small-model training comparison: AdamW vs Muon vs M3 vs DMGD vs delta momentum.

    python experiments/train_optim_compare.py                 # ~13 min on 2 busy CPU cores
    python experiments/train_optim_compare.py --steps 20 --optimizers adamw,m3 --seeds 0 \\
        --grid adamw=3e-3 --grid m3=1e-2 --out /tmp/check.md      # a quick check

Everything comes from the training stack, so each run is built the way
`nested-jax train --model transformer --optimizer NAME --lr LR` builds one: the model
(`nested_jax.models`, transformer/tiny by default), the optimizer built by name by
`nested_jax.train.optimizers.build` (warmup + cosine schedule, global-norm clipping,
weight decay on matrices; Muon/M3 orthogonalize hidden matrices), the jitted train and
eval steps (`nested_jax.train.step`), and the embedded Wikipedia paragraphs through the
byte tokenizer (`nested_jax.data`), with the trainer's held-out split for perplexity.

For each seed (`--seeds`, default 0 1) the training batches are drawn once and replayed
for every run, and every run of that seed starts from the same initialization, so within
a seed runs differ only in the optimizer and its peak learning rate. Each optimizer gets a
small learning-rate grid (`--grid NAME=LR,LR,...` changes one); every grid point is run
with every seed and reported as the mean [min, max] of the held-out loss over the seeds.
The first table reports each optimizer at the grid point with the lowest mean, and says
when that point is at an edge of its grid (then widen the grid before reading the
ranking). `m3_after_ns` is M3 in Algorithm 1's printed order (`precondition="after_ns"`,
set through `optim.kwargs` as `--set optim.kwargs.precondition=after_ns` would).
Step time is the mean wall time of the jitted step after the first (compiling) one.
`--cache FILE.jsonl` keeps each (optimizer, lr, seed, setting) result and reuses it, so a
grid can be widened without rerunning the points already done (runs are deterministic).
Writes experiments/results/train_optim_compare.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchlib import markdown_table, write_result  # noqa: E402

from nested_jax import data as data_lib  # noqa: E402
from nested_jax.train import sharding, trainer  # noqa: E402
from nested_jax.train import step as step_lib  # noqa: E402
from nested_jax.train.config import DataConfig, OptimConfig, TrainConfig  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "train_optim_compare.md")

# Peak learning rates per optimizer (half a decade apart), placed so that the best mean
# held-out loss over seeds 0 and 1 is inside each grid (the script checks and reports it).
GRIDS = {
    # AdamW's held-out loss is not monotone in lr at 200 steps (seed 1: 1e-2 < 1e-1 < 3e-2),
    # so it keeps four points.
    "adamw": (3e-3, 1e-2, 3e-2, 1e-1),
    "muon": (3e-2, 1e-1, 3e-1),
    # M3 orthogonalizes M / sqrt(V + eps) (before_ns): every step has spectral norm
    # <~ 1.2 (1 + alpha), as Muon's, so it takes Muon-scale rates.
    "m3": (1e-2, 3e-2, 1e-1),
    "m3_after_ns": (3e-2, 1e-1, 3e-1),  # Algorithm 1's order, for comparison
    "deep_momentum": (1e-1, 3e-1, 1.0),  # SGD-scale rates on clipped gradients
    "delta_momentum": (1e-1, 3e-1, 1.0),
}
# Rows that are a registered optimizer with some optim.kwargs set.
# (m3_no_slow has no default grid: pass --grid m3_no_slow=LR,...)
VARIANTS = {"m3_after_ns": ("m3", {"precondition": "after_ns"}),
            "m3_no_slow": ("m3", {"alpha": 0.0})}
LABELS = {"deep_momentum": "deep_momentum (DMGD)",
          "m3_after_ns": "m3, after_ns (Algorithm 1's order)",
          "m3_no_slow": "m3, alpha = 0 (no slow memory)"}


def parse_grid(items: list[str]) -> dict[str, tuple[float, ...]]:
    grids = dict(GRIDS)
    for item in items:
        name, sep, lrs = item.partition("=")
        if not sep or not lrs:
            raise SystemExit(f"--grid {item!r}: expected NAME=LR[,LR...]")
        grids[name.strip()] = tuple(float(x) for x in lrs.split(","))
    return grids


def base_config(args, seed: int) -> TrainConfig:
    return TrainConfig(
        model=args.model, preset=args.preset, steps=args.steps, seed=seed,
        eval_every=0, eval_batches=args.eval_batches, checkpoint_every=0,
        data=DataConfig(path=args.data, tokenizer="byte", seq_len=args.seq_len,
                        batch_size=args.batch_size, eval_fraction=args.eval_fraction),
        optim=OptimConfig(warmup_steps=args.warmup if args.warmup >= 0 else args.steps // 10,
                          weight_decay=args.weight_decay))


def train_one(cfg: TrainConfig, batches: list[np.ndarray], heldout: list[np.ndarray],
              workdir: str) -> dict:
    """Train `cfg` on the given batches with the trainer's pieces; held-out loss at the end."""
    run = trainer.prepare(cfg, workdir, jax.devices()[:1])
    state = run.init_state()
    step_fn = jax.jit(step_lib.make_train_step(run.graphdef, run.tx),
                      in_shardings=(run.state_shardings, run.batch_sharding),
                      out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                      donate_argnums=0)
    losses, t_first = [], time.perf_counter()
    for i, b in enumerate(batches):
        state, m = step_fn(state, trainer.global_batch(b, run))
        losses.append(m["loss"])
        if i == 0:
            jax.block_until_ready(m)
            t_compiled = time.perf_counter()
    jax.block_until_ready(state)
    t_end = time.perf_counter()
    losses = np.asarray(jax.device_get(losses), np.float64)
    skipped = int(jax.device_get(m["bad_total"]))
    loss, ppl = trainer.perplexity(run, state, heldout, trainer.make_eval_fn(run))
    tail = losses[-max(1, len(losses) // 10):]
    return dict(loss=loss if math.isfinite(loss) else math.inf, ppl=ppl,
                train=float(np.mean(tail)) if np.isfinite(tail).all() else math.inf,
                skipped=skipped, params=run.n_params, first_s=t_compiled - t_first,
                step_s=(t_end - t_compiled) / max(len(batches) - 1, 1),
                wall_s=time.perf_counter() - t_first)


def run_key(args, name: str, lr: float, seed: int) -> str:
    """Everything that determines a run's result (the code version aside)."""
    return json.dumps(dict(name=name, lr=lr, seed=seed, steps=args.steps,
                           batch_size=args.batch_size, seq_len=args.seq_len,
                           warmup=args.warmup, weight_decay=args.weight_decay,
                           model=args.model, preset=args.preset, data=args.data,
                           eval_fraction=args.eval_fraction,
                           eval_batches=args.eval_batches), sort_keys=True)


def load_cache(path: str | None) -> dict[str, dict]:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["key"]: r["result"] for r in rows}


def spread(xs) -> str:
    """mean [min, max], or the value alone for one seed."""
    xs = np.asarray(xs, np.float64)
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{xs.mean():.3f} [{xs.min():.3f}, {xs.max():.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default=",".join(GRIDS),
                    help="comma-separated trainer optimizer names (default: %(default)s)")
    ap.add_argument("--grid", action="append", default=[], metavar="NAME=LR,LR,...",
                    help="the peak learning rates for one optimizer (repeatable)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=-1, help="warmup steps (default steps/10)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--model", default="transformer")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", default="builtin:wikipedia")
    ap.add_argument("--eval-fraction", type=float, default=0.01)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="seeds of the initialization and batch order (default: 0 1)")
    ap.add_argument("--cache", default=None, metavar="FILE.jsonl",
                    help="reuse and append per-run results here (same settings, same code)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    grids = parse_grid(args.grid)
    missing = [n for n in names if n not in grids]
    if missing:
        ap.error(f"no learning-rate grid for {missing}; pass --grid NAME=LR,LR,...")

    base = base_config(args, args.seeds[0])
    docs = data_lib.load_documents(base.data.path)
    tokenizer = data_lib.get_tokenizer(base.data.tokenizer)
    heldout = data_lib.eval_batches(docs, tokenizer, seq_len=args.seq_len,
                                    batch_size=args.batch_size, num_batches=args.eval_batches,
                                    eval_fraction=args.eval_fraction)
    print(f"{len(docs)} documents; {args.steps} steps of {args.batch_size}x{args.seq_len} "
          f"tokens; held-out {args.eval_batches} batches; seeds {args.seeds}", flush=True)

    cache = load_cache(args.cache)
    # results[name][lr] = one result per seed, in args.seeds order
    results: dict[str, dict[float, list[dict]]] = {n: {lr: [] for lr in grids[n]} for n in names}
    t0, reused = time.perf_counter(), 0
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            base = base_config(args, seed)
            batches = None
            for name in names:
                optim_name, kwargs = VARIANTS.get(name, (name, {}))
                for lr in grids[name]:
                    key = run_key(args, name, lr, seed)
                    if key in cache:
                        r, reused = cache[key], reused + 1
                    else:
                        if batches is None:
                            it = data_lib.train_batches(
                                docs, tokenizer, seq_len=args.seq_len,
                                batch_size=args.batch_size, seed=seed,
                                eval_fraction=args.eval_fraction)
                            batches = [next(it) for _ in range(args.steps)]
                        cfg = dataclasses.replace(base, optim=dataclasses.replace(
                            base.optim, name=optim_name, learning_rate=lr, kwargs=kwargs))
                        r = train_one(cfg, batches, heldout, workdir)
                        if args.cache:
                            with open(args.cache, "a") as f:
                                f.write(json.dumps(dict(key=key, result=r)) + "\n")
                    results[name][lr].append(r)
                    print(f"seed {seed} {name:15s} lr {lr:.0e}: held-out loss {r['loss']:.4f} "
                          f"(ppl {r['ppl']:.3f}), train {r['train']:.4f}, "
                          f"{r['step_s'] * 1e3:.0f} ms/step, first step {r['first_s']:.1f} s, "
                          f"{r['wall_s']:.0f} s", flush=True)
    total = time.perf_counter() - t0
    run_total = sum(r["wall_s"] for runs in results.values() for rs in runs.values()
                    for r in rs)

    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
    best_rows, grid_rows, edges = [], [], []
    for name, runs in results.items():
        lrs = sorted(runs)
        lr = min(lrs, key=lambda x: mean(runs[x], "loss"))
        rs = runs[lr]
        edge = len(lrs) > 1 and lr in (lrs[0], lrs[-1])
        if edge:
            edges.append(name)
        best_rows.append((LABELS.get(name, name), f"{lr:.0e}" + (" (grid edge)" if edge else ""),
                          spread([r["loss"] for r in rs]),
                          f"{math.exp(min(mean(rs, 'loss'), 700.0)):.4g}",
                          spread([r["train"] for r in rs]),
                          f"{np.mean([r['step_s'] for x in lrs for r in runs[x]]):.3f}"))
        for x in lrs:
            rs = runs[x]
            grid_rows.append((LABELS.get(name, name), f"{x:.0e}", spread([r["loss"] for r in rs]),
                              f"{math.exp(min(mean(rs, 'loss'), 700.0)):.4g}",
                              spread([r["train"] for r in rs]),
                              sum(r["skipped"] for r in rs), f"{mean(rs, 'step_s'):.3f}",
                              f"{mean(rs, 'first_s'):.1f}"))
    seeds = " ".join(map(str, args.seeds))
    best = markdown_table(("optimizer", "best lr", f"held-out loss (nats/byte), seeds {seeds}",
                           "ppl at the mean", "train loss", "s/step"), best_rows)
    grid = markdown_table(("optimizer", "peak lr", "held-out loss", "ppl at the mean",
                           "train loss", "skipped steps", "s/step", "first step (s)"),
                          grid_rows)
    print("\n" + best + "\n\n" + grid + "\n", flush=True)
    verdict = ("every optimizer's best lr is inside its grid" if not edges else
               f"best lr at a grid edge for {', '.join(edges)}: widen those grids")
    print(verdict, flush=True)

    n_params = next(iter(next(iter(results.values())).values()))[0]["params"]
    command = "python experiments/train_optim_compare.py " + shlex.join(sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (
        f"Command: `{command.strip()}` ({total / 60:.1f} min in all; the runs themselves "
        f"{run_total / 60:.1f} min"
        + (f", {reused} of them reused from the cache" if reused else "") + ")\n\n"
        f"- load average at the end: {load} (the machine is shared; step times move with it)\n"
        f"- model: {args.model}/{args.preset}, {n_params / 1e6:.3f}M parameters, float32\n"
        f"- data: {args.data}, byte tokenizer, {len(docs)} documents; {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens, the same batches for every run of a "
        f"seed; held-out "
        f"loss on {args.eval_batches} batches of the trainer's held-out split "
        f"(eval_fraction {args.eval_fraction})\n"
        f"- optimizer: `nested_jax.train.optimizers.build` by name, seeds {seeds} (each "
        "seed: its own initialization and batch order); held-out loss as mean [min, max] over "
        "the seeds, best lr by the mean; "
        f"warmup {base.optim.warmup_steps} steps then cosine to 0.1 x peak, global-norm "
        f"clip {base.optim.grad_clip}, weight decay {base.optim.weight_decay} on matrices\n"
        "- Newton-Schulz: Muon (optax.contrib) orthogonalizes the hidden matrices and sends "
        "the tied embedding and vectors to its Adam; M3 orthogonalizes the same hidden "
        "matrices (the registry's dimension numbers) and gives the embedding and vectors its "
        "update without Newton-Schulz (the Adam-like ratio M / sqrt(V + eps) plus the slow "
        "term); `m3` divides by sqrt(V + eps) before Newton-Schulz (the default, "
        "`precondition=\"before_ns\"`), `m3_after_ns` after it, as Algorithm 1 prints\n"
        "- ppl at the mean: exp of the mean held-out loss\n"
        "- M3's slow memory: with its default chunk of 100 steps, M2 is set once within 200 "
        "steps, at step 100, from the gradients of steps 0-99; the slow term acts on steps "
        "100-199 only\n"
        "- s/step: mean wall time of the jitted step after the compiling first step "
        "(averaged over the grid in the first table)\n\n"
        f"## Best learning rate per optimizer\n\n{best}\n\n"
        f"## Every grid point\n\n{grid}\n\n"
        f"Grid check: {verdict}.\n\n"
        f"Smoke scale: {len(args.seeds)} seed(s), a short run and 3- or 4-point grids; read "
        "differences against the [min, max] ranges. The paper's comparisons (ViT, "
        "140M-1.3B LMs) need accelerator runs.\n"
    )
    write_result(args.out, "Small-model training comparison: AdamW, Muon, M3, DMGD, delta "
                 "momentum", body)


if __name__ == "__main__":
    main()

"""Small-model training comparison: AdamW vs Muon vs M3 vs DMGD vs delta momentum.

    python experiments/train_optim_compare.py                 # ~5-8 min on 2 CPU cores
    python experiments/train_optim_compare.py --steps 20 --optimizers adamw,m3 \\
        --grid adamw=3e-3 --grid m3=1e-2 --out /tmp/check.md      # a quick check

Everything comes from the training stack, so each run is built the way
`nested-jax train --model transformer --optimizer NAME --lr LR` builds one: the model
(`nested_jax.models`, transformer/tiny by default), the optimizer built by name by
`nested_jax.train.optimizers.build` (warmup + cosine schedule, global-norm clipping,
weight decay on matrices; Muon/M3 orthogonalize hidden matrices), the jitted train and
eval steps (`nested_jax.train.step`), and the embedded Wikipedia paragraphs through the
byte tokenizer (`nested_jax.data`), with the trainer's held-out split for perplexity.

The training batches are drawn once and replayed for every run, and every run starts
from the same seed, so runs differ only in the optimizer and its peak learning rate.
Each optimizer gets a small learning-rate grid (`--grid NAME=LR,LR,...` changes one);
the table reports each optimizer at the grid point with the lowest held-out loss, then
every grid point. Step time is the mean wall time of the jitted step after the first
(compiling) one. Writes experiments/results/train_optim_compare.md.
"""

from __future__ import annotations

import argparse
import dataclasses
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

# Peak learning rates per optimizer: 3-point grids placed from a first run of the default
# command on the grids one step lower (every optimizer but M3 was best at the top edge).
GRIDS = {
    "adamw": (3e-3, 1e-2, 3e-2),
    "muon": (3e-2, 1e-1, 3e-1),
    "m3": (3e-4, 1e-3, 3e-3),  # O / sqrt(V) steps are large: M3 diverged at 1e-2
    "deep_momentum": (3e-1, 1.0, 3.0),  # SGD-scale rates on clipped gradients
    "delta_momentum": (3e-1, 1.0, 3.0),
}
LABELS = {"deep_momentum": "deep_momentum (DMGD)"}


def parse_grid(items: list[str]) -> dict[str, tuple[float, ...]]:
    grids = dict(GRIDS)
    for item in items:
        name, sep, lrs = item.partition("=")
        if not sep or not lrs:
            raise SystemExit(f"--grid {item!r}: expected NAME=LR[,LR...]")
        grids[name.strip()] = tuple(float(x) for x in lrs.split(","))
    return grids


def base_config(args) -> TrainConfig:
    return TrainConfig(
        model=args.model, preset=args.preset, steps=args.steps, seed=args.seed,
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
                train=float(np.mean(tail)), skipped=skipped, params=run.n_params,
                first_s=t_compiled - t_first,
                step_s=(t_end - t_compiled) / max(len(batches) - 1, 1))


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    grids = parse_grid(args.grid)
    missing = [n for n in names if n not in grids]
    if missing:
        ap.error(f"no learning-rate grid for {missing}; pass --grid NAME=LR,LR,...")

    base = base_config(args)
    docs = data_lib.load_documents(base.data.path)
    tokenizer = data_lib.get_tokenizer(base.data.tokenizer)
    it = data_lib.train_batches(docs, tokenizer, seq_len=args.seq_len,
                                batch_size=args.batch_size, seed=args.seed,
                                eval_fraction=args.eval_fraction)
    batches = [next(it) for _ in range(args.steps)]
    heldout = data_lib.eval_batches(docs, tokenizer, seq_len=args.seq_len,
                                    batch_size=args.batch_size, num_batches=args.eval_batches,
                                    eval_fraction=args.eval_fraction)
    print(f"{len(docs)} documents; {args.steps} steps of {args.batch_size}x{args.seq_len} "
          f"tokens; held-out {args.eval_batches} batches", flush=True)

    results: dict[str, list[tuple[float, dict]]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            for lr in grids[name]:
                cfg = dataclasses.replace(
                    base, optim=dataclasses.replace(base.optim, name=name, learning_rate=lr))
                r = train_one(cfg, batches, heldout, workdir)
                results.setdefault(name, []).append((lr, r))
                print(f"{name:15s} lr {lr:.0e}: held-out loss {r['loss']:.4f} "
                      f"(ppl {r['ppl']:.3f}), train {r['train']:.4f}, "
                      f"{r['step_s'] * 1e3:.0f} ms/step, first step {r['first_s']:.1f} s",
                      flush=True)
    total = time.perf_counter() - t0

    best_rows, grid_rows = [], []
    for name, runs in results.items():
        lr, r = min(runs, key=lambda x: x[1]["loss"])
        lrs = [x for x, _ in runs]
        edge = " (grid edge)" if len(runs) > 1 and lr in (min(lrs), max(lrs)) else ""
        best_rows.append((LABELS.get(name, name), f"{lr:.0e}{edge}", r["loss"], r["ppl"],
                          r["train"], f"{np.mean([x['step_s'] for _, x in runs]):.3f}"))
        for lr, r in runs:
            grid_rows.append((LABELS.get(name, name), f"{lr:.0e}", r["loss"], r["ppl"],
                              r["train"], r["skipped"], f"{r['step_s']:.3f}",
                              f"{r['first_s']:.1f}"))
    best = markdown_table(("optimizer", "best lr", "held-out loss (nats/byte)",
                           "held-out ppl", "train loss", "s/step"), best_rows)
    grid = markdown_table(("optimizer", "peak lr", "held-out loss", "held-out ppl",
                           "train loss", "skipped steps", "s/step", "first step (s)"),
                          grid_rows)
    print("\n" + best + "\n\n" + grid + "\n", flush=True)

    n_params = next(iter(results.values()))[0][1]["params"]
    command = "python experiments/train_optim_compare.py " + shlex.join(sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (
        f"Command: `{command.strip()}` ({total / 60:.1f} min in all)\n\n"
        f"- load average at the end: {load} (the machine is shared; step times move with it)\n"
        f"- model: {args.model}/{args.preset}, {n_params / 1e6:.3f}M parameters, float32\n"
        f"- data: {args.data}, byte tokenizer, {len(docs)} documents; {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens, the same batches for every run; held-out "
        f"loss on {args.eval_batches} batches of the trainer's held-out split "
        f"(eval_fraction {args.eval_fraction})\n"
        f"- optimizer: `nested_jax.train.optimizers.build` by name, seed {args.seed}; "
        f"warmup {base.optim.warmup_steps} steps then cosine to 0.1 x peak, global-norm "
        f"clip {base.optim.grad_clip}, weight decay {base.optim.weight_decay} on matrices\n"
        "- Newton-Schulz: Muon (optax.contrib) orthogonalizes the hidden matrices and sends "
        "the embedding and vectors to its Adam; M3 gets `matrix_dimension_numbers` from the "
        "trainer, so it orthogonalizes every matrix, the tied embedding included, and vectors "
        "skip Newton-Schulz\n"
        "- s/step: mean wall time of the jitted step after the compiling first step "
        "(averaged over the grid in the first table)\n\n"
        f"## Best learning rate per optimizer\n\n{best}\n\n"
        f"## Every grid point\n\n{grid}\n\n"
        "Smoke scale: one seed, a short run and a 3-point grid, so differences of a few "
        "hundredths of a nat are within noise. A best lr at the edge of its grid means the "
        "grid should be extended before reading anything into the ranking. The paper's "
        "comparisons (ViT, 140M-1.3B LMs) need accelerator runs.\n"
    )
    write_result(args.out, "Small-model training comparison: AdamW, Muon, M3, DMGD, delta "
                 "momentum", body)


if __name__ == "__main__":
    main()

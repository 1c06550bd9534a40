"""The language-model suites' results file: learning-rate sweep, best-value table with frozen
memories, the paper's numbers where it has them, curves of held-out loss and loss by position."""

from __future__ import annotations

import json
import os

import numpy as np

from experiments import benchlib
from experiments.lm import recipes

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
SETUP_KEYS = ("suite", "scale", "steps", "seq_len", "batch", "vocab")


def append_run(log: str, record: dict) -> None:
    """Print one finished run and append it to the suite's JSONL log (shards share a log)."""
    print(json.dumps(record), flush=True)
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def finished_runs(log: str, setup: dict) -> list[dict]:
    """The log's finished runs with this setup (scale, steps, tokens, vocabulary, suite)."""
    if not os.path.exists(log):
        return []
    runs = [json.loads(line) for line in open(log) if line.strip()]
    return [r for r in runs if all(r.get(k) == setup[k] for k in SETUP_KEYS)]


def logged(log: str, setup: dict, arm: str) -> dict:
    """{(lr, seed): record} of the arm's finished runs with this setup (a rerun replaces)."""
    return {(r["lr"], r["seed"]): r for r in finished_runs(log, setup) if r["arm"] == arm}


def best_lr(done: dict, seed: int, lrs) -> float:
    """The grid value with the lowest held-out perplexity on `seed` (its sweep must be done)."""
    swept = {lr: done[(lr, seed)]["ppl"] for lr in lrs if (lr, seed) in done}
    missing = [lr for lr in lrs if lr not in swept]
    if missing:
        raise RuntimeError(f"seed {seed}'s sweep lacks lr {missing}: run that seed first")
    return min(swept, key=lambda lr: (np.nan_to_num(swept[lr], nan=np.inf), lr))


def _spread(xs, fmt: str = ".2f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:{fmt}}"
    return f"{np.mean(xs):{fmt}} [{min(xs):{fmt}}, {max(xs):{fmt}}]"


def paired_gap(group: list[dict], ref: dict) -> str:
    """The row's perplexity minus the reference's on each seed both have: mean [min, max]."""
    return _spread([r["ppl"] - ref[r["seed"]] for r in group if r["seed"] in ref], "+.2f")


def write(a, argv, setup: dict, log: str, total: float, command: str) -> None:
    runs = finished_runs(log, setup)
    order = list({"compare": recipes.MODELS, "ablation": recipes.ABLATIONS,
                  "optimizers": recipes.OPTIMIZER_ARMS}[setup["suite"]])
    arms = sorted({r["arm"] for r in runs},  # the suite's order, not the log's
                  key=lambda arm: order.index(arm) if arm in order else len(order))
    first = min((r["seed"] for r in runs), default=0)
    sweep_rows, rows, best_groups = [], [], {}
    ablation = setup["suite"] == "ablation"
    hope_ppl = {}  # seed -> the reference row's perplexity ("hope" comes first in ABLATIONS)
    all_lrs = sorted({r["lr"] for r in runs if r["seed"] == first})
    for arm in arms:
        done = {(r["lr"], r["seed"]): r for r in runs if r["arm"] == arm}
        grid = sorted({lr for lr, s in done if s == first})
        try:
            best = best_lr(done, first, grid)
        except RuntimeError:
            continue
        where = ("not swept (one value)" if len(grid) == 1 else
                 "edge of the grid" if best in (grid[0], grid[-1]) else "inside")
        sweep_rows.append((arm, *((f"{done[(lr, first)]['ppl']:.2f}" + (" *" if lr == best else ""))
                                  if lr in grid else "-" for lr in all_lrs), where))
        group = [r for (lr, s), r in sorted(done.items(), key=lambda kv: kv[0][1]) if lr == best]
        best_groups[arm] = group
        frozen_names = list(group[0]["frozen"])
        frozen = "; ".join(f"{n}: {_spread([r['frozen'][n] for r in group])} "
                           f"(+{_spread([r['frozen'][n] - r['ppl'] for r in group])})"
                           for n in frozen_names) or "-"
        paper = recipes.PAPER_ABLATION_PPL.get(arm) if ablation else None
        vs_hope = ()
        if ablation:  # seeds move HopeLM by ~18 perplexity: compare rows on the same seeds
            if arm == "hope":
                hope_ppl = {r["seed"]: r["ppl"] for r in group}
            vs_hope = ("reference" if arm == "hope" else paired_gap(group, hope_ppl),)
        rows.append((arm, f"{group[0]['params_body'] / 1e6:.2f}M", f"{best:g}",
                     _spread([r["ppl"] for r in group]), *vs_hope, frozen,
                     _spread([r["sec_per_step"] for r in group]),
                     ", ".join(str(r["seed"]) for r in group))
                    + ((f"{paper:.2f}",) if ablation else ()))
    png = os.path.join(RESULTS, f"lm_{setup['suite']}.png")
    plot(best_groups, png)
    notes = os.path.join(HERE, "notes", f"{setup['suite']}.md")
    reading = open(notes).read() if os.path.exists(notes) else "(no notes yet)\n"
    scale = recipes.SCALES[setup["scale"]]
    grid_cols = [f"lr {lr:g}" for lr in all_lrs]
    body = (
        f"Command: `{command}` (this invocation {total / 60:.1f} min; the tables cover every "
        f"run in `{os.path.basename(log)}` with the same setup)\n\n"
        f"- data: the embedded Wikipedia paragraphs (1% held out), SentencePiece "
        f"{setup['vocab']} pieces trained on the training split "
        "(`python -m experiments.lm.tokenizer`)\n"
        f"- budget per run: {setup['steps']} steps of {setup['batch']} x {setup['seq_len']} "
        f"tokens ({setup['steps'] * setup['batch'] * setup['seq_len'] / 1e6:.2f}M tokens); AdamW "
        f"(or the named optimizer), warmup {scale.warmup}, cosine to 0.1x, weight decay 0.1, "
        "clip 1.0; models share the base shape "
        f"{scale.base} and differ in MLP width so that parameters without the tied embedding "
        "match (`experiments/lm/recipes.py`)\n"
        f"- learning rate: swept on seed {first}; * marks the best value, which the other "
        "seeds use\n"
        "- perplexity: held-out, mean [min, max] over seeds; *frozen*: the same checkpoint "
        "scored with that in-context memory's inner learning rates at 0 (evaluation only), and "
        "in brackets the perplexity it adds\n"
        + "".join(f"- {r['arm']} lr {r['lr']:g} seed {r['seed']}: the same training as "
                  f"{r['reused_from']} (`lm_compare_runs.jsonl`), reused, not retrained\n"
                  for r in runs if r.get("reused_from"))
        + "\n### Learning-rate sweep (held-out perplexity)\n\n"
        + benchlib.markdown_table(["arm", *grid_cols, "best"], sweep_rows)
        + "\n\n### At the best learning rate\n\n"
        + benchlib.markdown_table(
            ["arm", "params w/o embedding", "lr", "perplexity"]
            + (["vs hope, same seeds"] if ablation else [])
            + ["frozen at eval (+ppl)", "s / step", "seeds"]
            + (["paper ppl"] if ablation else []),
            rows)
        + f"\n\n![curves]({os.path.basename(png)})\n\n" + reading)
    benchlib.write_result(os.path.join(RESULTS, f"lm_{setup['suite']}.md"),
                          f"Language modelling: {setup['suite']} ({setup['scale']} scale)", body)


def plot(groups: dict, path: str) -> None:
    """Held-out loss against step, and loss against position (solid: learning; dashed:
    the memories frozen at evaluation), at each arm's best learning rate."""
    if not groups:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (arm, group) in enumerate(groups.items()):
        c = f"C{i % 10}"
        for j, r in enumerate(group):
            steps, loss = zip(*r["curve"], strict=True)
            ax1.plot(steps, loss, color=c, alpha=0.8, label=arm if j == 0 else None)
        pos = np.mean([r["position"] for r in group], 0)
        x = np.arange(1, len(pos) + 1)
        ax2.plot(x, _smooth(pos), color=c, label=arm)
        for name, ls in zip(group[0]["position_frozen"], ("--", ":", "-."), strict=False):
            frozen = np.mean([r["position_frozen"][name] for r in group], 0)
            ax2.plot(x, _smooth(frozen), color=c, ls=ls, alpha=0.7,
                     label=f"{arm}, {name} frozen")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("held-out loss (nats / token)")
    ax1.legend(fontsize=7)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("position in the document (tokens)")
    ax2.set_ylabel("loss (nats / token), Shakespeare plays")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(y: np.ndarray) -> np.ndarray:
    """Mean over windows that double with position (constant on a log axis)."""
    out = np.empty_like(y)
    for t in range(len(y)):
        lo = max(0, t - t // 4)
        out[t] = y[lo:t + 1].mean()
    return out

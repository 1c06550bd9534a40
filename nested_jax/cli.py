"""`nested-jax`: train, eval, generate, prepare-data, presets and compile.

  nested-jax train --config lm:cpu_demo --workdir runs/demo
  nested-jax train --workdir runs/demo --steps 600          # resumes, to step 600
  nested-jax eval --workdir runs/demo [--data PATH]         # prints "perplexity: <number>"
  nested-jax generate --workdir runs/demo --prompt "The river" --max-new-tokens 200
  nested-jax prepare-data --input 'corpus/*.jsonl' --output shards/ --tokenizer mistral
  nested-jax train --config lm:cpu_demo --data shards/ --tokenizer mistral --workdir runs/s
  nested-jax presets                                        # parameter count of every preset
  nested-jax compile --topology v5e:4x4 --model hope --preset 760M   # AOT for TPU (libtpu)

A train config is built in this order: `--config FILE[:VARIANT]` (or the saved
config of an existing --workdir, or the defaults), then the flags given, then each
`--set key=value` (dotted, e.g. --set optim.learning_rate=3e-4 --set model.d_model=256).

Exit status (docs/training.md):
  0    done (or stopped by SIGTERM with a checkpoint saved)
  1    internal error (a bug: the traceback is printed)
  2    config or usage error: a bad flag or config field, a workdir holding another run
  3    numeric: training diverged (the guard rejected max_bad_steps updates in a row)
  4    data error: unreadable or binary data, no documents, a bad downloaded file
  5    I/O error: a workdir or checkpoint directory that cannot be read or written
  6    the workdir is in use by another training run (its host and PID are named), or
       prepare-data's --output by another prepare-data
  130  stopped by SIGINT (Ctrl-C) with a checkpoint saved
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

log = logging.getLogger("nested_jax")

EXIT_OK, EXIT_INTERNAL, EXIT_CONFIG, EXIT_NUMERIC, EXIT_DATA, EXIT_IO, EXIT_BUSY = range(7)
EXIT_SIGINT = 130


# ---- argument types: every numeric option is checked where it is parsed ----------------------


def _number(text: str, kind, low, low_ok: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    if value < low or (value == low and not low_ok):
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be {'>=' if low_ok else '>'} {low}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, True, "an integer")


def count(text: str) -> int:
    """A non-negative integer."""
    return _number(text, int, 0, True, "an integer")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, False, "a number")


def nonneg_float(text: str) -> float:
    return _number(text, float, 0.0, True, "a number")

# flag -> config key; a flag left out keeps the config's value.
TRAIN_FLAGS = {
    "data": "data.path",
    "steps": "steps",
    "model": "model",
    "preset": "preset",
    "optimizer": "optim.name",
    "tokenizer": "data.tokenizer",
    "batch_size": "data.batch_size",
    "seq_len": "data.seq_len",
    "lr": "optim.learning_rate",
    "seed": "seed",
}


def _no_library_tracebacks(record: logging.LogRecord) -> bool:
    """Console filter: a library's report of an exception (orbax logs each failed background
    write with a traceback, four times over) is left to train.log; the exception itself reaches
    `main`, which prints one line for it."""
    return record.name.startswith("nested_jax") or not record.exc_info


def _setup_logging(verbose: bool) -> None:
    """The console shows INFO (WARNING with -q); train.log always gets INFO."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.INFO if verbose else logging.WARNING)
        handler.addFilter(_no_library_tracebacks)
    logging.getLogger("nested_jax").setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train_config(args: argparse.Namespace):
    from etils import epath

    from nested_jax.train import config as config_lib

    saved = epath.Path(args.workdir) / "config.json" if getattr(args, "workdir", None) else None
    if args.config:
        cfg = config_lib.from_file(args.config)
    elif saved is not None and saved.exists():
        cfg = config_lib.TrainConfig.load(saved)
        log.info("using the saved config of %s", args.workdir)
    else:
        cfg = config_lib.TrainConfig()
    pairs = [(key, getattr(args, flag)) for flag, key in TRAIN_FLAGS.items()
             if getattr(args, flag) is not None]
    if args.bf16:
        pairs.append(("bf16", True))
    cfg = config_lib.with_values(cfg, pairs)
    return config_lib.apply_overrides(cfg, args.set)


def cmd_train(args: argparse.Namespace) -> int:
    from nested_jax.train import distributed

    distributed.initialize(args.distributed, coordinator=args.coordinator,
                           num_processes=args.num_processes, process_id=args.process_id)
    from nested_jax.train import trainer

    cfg = _train_config(args)
    summary = trainer.train(cfg, args.workdir, progress=not (args.no_progress or args.quiet),
                            restart=args.restart, reschedule=args.reschedule)
    if summary["preempted"]:
        name = summary["stopped_by"] or "preemption"
        saved = summary["last_checkpoint"] == summary["final_step"]
        newest = summary["last_checkpoint"]
        print(f"stopped by {name} at step {summary['final_step']}; "
              + ("checkpoint saved" if saved else
                 f"not saved inside a bad streak (newest checkpoint: {newest})"))
        return EXIT_SIGINT if name == "SIGINT" else EXIT_OK
    before, after = summary["ppl_before"], summary["ppl_after"]
    if before is not None and after is not None:
        print(f"held-out perplexity: {before:.3f} (step {summary['start_step']}) -> "
              f"{after:.3f} (step {summary['final_step']})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from nested_jax.train import evaluate

    out = evaluate.evaluate_checkpoint(args.workdir, data_path=args.data, split=args.split,
                                       num_batches=args.batches, freeze=args.freeze)
    print(f"step: {out['step']}")
    print(f"loss: {out['loss']:.6f}")
    print(f"perplexity: {out['perplexity']:.6f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from nested_jax.train import generate

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write(args.prompt)
    generate.generate(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                      write=write)
    write("\n")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import json

    from nested_jax.train import aot

    cfg = _train_config(args)
    report = aot.compile_for(cfg, args.topology, args.num_slices, tuple(args.programs))
    print(report.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(aot.as_record(report), f, indent=1)
    return 0 if all(r.compiled for r in report.steps) else EXIT_CONFIG


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from nested_jax.data import prepare

    m = prepare.prepare(args.input, args.output, args.tokenizer, num_shards=args.num_shards,
                        text_field=args.text_field, decode_errors=args.decode_errors,
                        workers=args.workers)
    print(f"{args.output}: {m['documents']:,} documents, {m['tokens']:,} tokens in "
          f"{m['num_shards']} shards (tokenizer {m['tokenizer']['spec']}, id {m['id']})")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from nested_jax import models

    names = [args.model] if args.model else models.names()
    print(f"{'model':<16} {'preset':<8} {'parameters':>14} {'nominal':>10}")
    for name in names:
        for preset, nominal in models.presets(name).items():
            n = models.count_params(models.abstract_model(name, preset))
            print(f"{name:<16} {preset:<8} {n:>14,} {nominal / 1e6:>9.1f}M")
    return 0


def _config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that build a train config (``_train_config``), shared by train and compile."""
    p.add_argument("--config", help="PATH.py[:VARIANT] defining get_config(variant), or a "
                   "packaged config such as lm:cpu_demo")
    p.add_argument("--data", help="text file, directory, JSONL, ArrayRecord, glob, a token "
                   "shard directory (prepare-data), or builtin:wikipedia (the default)")
    p.add_argument("--steps", type=positive_int,
                   help="total optimizer steps (larger than before: resume)")
    p.add_argument("--model", help="hope, hope_attention, titans, transformer, ... (registered)")
    p.add_argument("--preset", help="tiny, small, 125M, 340M, 760M, 1.3B")
    p.add_argument("--optimizer", help="adamw (default), muon, m3, delta_momentum, deep_momentum, "
                   "any optax alias, or module:factory")
    p.add_argument("--tokenizer", help="byte, mistral, sentencepiece:PATH, sentencepiece-train:V")
    p.add_argument("--batch-size", type=positive_int, help="global batch size in sequences")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence")
    p.add_argument("--lr", type=positive_float, help="peak learning rate")
    p.add_argument("--seed", type=count)
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 parameters)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.grad_accum=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nested-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train, or resume the run in --workdir")
    t.add_argument("--workdir", required=True, help="checkpoints, logs and metrics go here")
    _config_flags(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--restart", action="store_true", help="a workdir with a config but no "
                   "checkpoint trains again from step 0 (refused without this flag)")
    t.add_argument("--reschedule", action="store_true", help="resume with another learning "
                   "rate or schedule (--lr, --set optim.schedule/warmup_steps/min_lr_ratio)")
    t.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="jax.distributed.initialize(): auto = on TPU pods or with --coordinator")
    t.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process without a "
                   "cluster manager)")
    t.add_argument("--num-processes", type=positive_int)
    t.add_argument("--process-id", type=count)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="perplexity of the latest checkpoint")
    e.add_argument("--workdir", required=True)
    e.add_argument("--data", help="data to score (default: the run's held-out documents)")
    e.add_argument("--split", choices=("auto", "heldout", "all"), default="auto",
                   help="auto: held-out documents of the training data, all documents of other "
                   "data")
    e.add_argument("--batches", type=positive_int, help="batches to score (default: the "
                   "run's eval_batches)")
    e.add_argument("--freeze", action="append", default=[], choices=("self_modifying", "cms"),
                   help="score with these in-context memories frozen (inner learning rates 0); "
                   "repeatable")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="stream a continuation of a prompt")
    g.add_argument("--workdir", required=True)
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=count, default=200)
    g.add_argument("--temperature", type=nonneg_float, default=0.8,
                   help="0 for greedy decoding")
    g.add_argument("--top-k", type=count, default=40, help="0 for the full distribution")
    g.add_argument("--seed", type=count, default=0)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compile", help="compile the train/eval/decode steps for a TPU topology "
                       "on this machine (needs libtpu: pip install 'jax[tpu]==<jax version>')")
    c.add_argument("--topology", required=True, help="GEN:AxB[xC] (v5e:4x4, v5p:2x2x4) or a "
                   "slice name (v5e-16, v6e-8, v5p-32)")
    c.add_argument("--num-slices", type=positive_int, default=1, help="multislice: slices")
    c.add_argument("--programs", nargs="+", default=["train", "eval", "decode"],
                   choices=("train", "eval", "decode"), help="which steps to compile")
    c.add_argument("--json", help="also write the report as JSON to this path")
    _config_flags(c)
    c.set_defaults(func=cmd_compile)

    d = sub.add_parser("prepare-data", help="tokenize text or JSONL once into ArrayRecord "
                       "token shards that train --data reads (each host only its own shards)")
    d.add_argument("--input", required=True, action="append", metavar="PATH",
                   help="text file, JSONL, ArrayRecord, a directory, a glob (quote it), "
                   "builtin:wikipedia; local or gs://; .gz too; repeatable")
    d.add_argument("--output", required=True, help="the shard directory (local or gs://), "
                   "new or empty")
    d.add_argument("--tokenizer", required=True,
                   help="byte, mistral or sentencepiece:PATH (train with the same one)")
    d.add_argument("--num-shards", type=positive_int, default=16,
                   help="shards to write; a multiple of the training hosts (default 16)")
    d.add_argument("--text-field", default="text", help="the JSON field holding the text")
    d.add_argument("--decode-errors", choices=("strict", "replace"), default="strict",
                   help="strict refuses non-UTF-8 input (naming file, line, offset); replace "
                   "reads it lossily")
    d.add_argument("--workers", type=positive_int, default=1,
                   help="tokenizer processes (the output is the same for any number)")
    d.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("presets", help="print the parameter count of every model preset")
    p.add_argument("--model")
    p.set_defaults(func=cmd_presets)
    return parser


def exit_code(e: BaseException) -> int:
    """The documented exit status of an error (see the module docstring)."""
    if isinstance(e, ImportError):  # before importing the trainer, which may be what is missing
        return EXIT_CONFIG
    from nested_jax.data import DataError
    from nested_jax.data.fetch import FetchError
    from nested_jax.data.prepare import OutputBusyError
    from nested_jax.train.trainer import NonFiniteError
    from nested_jax.train.workdir import WorkdirBusyError

    for kinds, code in (((WorkdirBusyError, OutputBusyError), EXIT_BUSY),
                        ((NonFiniteError,), EXIT_NUMERIC), ((DataError, FetchError), EXIT_DATA),
                        ((OSError,), EXIT_IO),
                        ((ValueError, ImportError), EXIT_CONFIG)):
        if isinstance(e, kinds):
            return code
    return EXIT_INTERNAL


def _append_to_train_log(args: argparse.Namespace, message: str) -> None:
    """The failure line also goes to WORKDIR/train.log (an existing local workdir only)."""
    workdir = getattr(args, "workdir", None)
    if args.command != "train" or not workdir or "://" in workdir or not os.path.isdir(workdir):
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(os.path.join(workdir, "train.log"), "a") as f:
            f.write(f"{stamp},000 ERROR nested_jax.cli: {message}\n")
    except OSError:
        pass  # a read-only workdir: the console line is all there is


# Imports that only the `train` extra brings (pyproject.toml): the core install lacks them.
TRAIN_EXTRA = ("flax", "orbax", "grain", "array_record", "tqdm", "tensorboardX", "matplotlib",
               "etils")


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        raise ImportError(f"nested-jax {args.command} needs {e.name}, which the core install "
                          "leaves out: pip install 'nested_jax[train]'") from e


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(not args.quiet)
    try:
        return _run(args)
    except KeyboardInterrupt:
        message = ("interrupted: no shard directory was completed (the same command redoes it)"
                   if args.command == "prepare-data" else
                   "interrupted before training started: nothing was saved")
        code = EXIT_SIGINT
    except Exception as e:
        code = exit_code(e)
        if code == EXIT_INTERNAL:
            log.error("internal error (a bug; please report it): %s: %s", type(e).__name__, e,
                      exc_info=True)
            _append_to_train_log(args, f"internal error: {type(e).__name__}: {e}")
            return code
        if code == EXIT_IO:
            # A checkpoint write that failed mid-way leaves orbax's async writers' coroutines
            # unawaited; at exit Python would warn about each ("coroutine ... was never
            # awaited", 2 lines, timing-dependent) under the one line that says what to do.
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                    category=RuntimeWarning)
        message = str(e)
        if isinstance(e, OSError) and not message.startswith(("--", "checkpoint")) and (
                e.filename is not None):
            message = f"I/O error on {e.filename}: {e.strerror or e}"
        log.debug("traceback", exc_info=True)
    log.error("%s", message)
    _append_to_train_log(args, message)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Do HopeLM and TitansLM train finite in bfloat16 on 16K-token sequences?

    python -m experiments.lm.long_bf16                  # every arm; bf16; seeds 0 1
    python -m experiments.lm.long_bf16 --models hope_first_order   # decisions #29
    python -m experiments.lm.long_bf16 --models titans --dtypes float32 --seeds 0
    python -m experiments.lm.long_bf16 --sensitivity        # float64 gradient table (~30 min)
    python -m experiments.lm.long_bf16 --report-only

The in-context learning issue asks that the self-modifying memories' setting (decisions #21,
#25: M_memory's eta bound of 10) train finite in bfloat16 at 16K tokens, and that TitansLM train
without NaN in float32 and bfloat16 at ordinary learning rates.  Each run trains one model
with the real trainer (``nested_jax.train.trainer``: its guard rejects a step whose loss or
gradient is not finite, and counts it) on Shakespeare's plays, one text file each, which the
data pipeline splits at blank lines into paragraphs (speeches) and shuffles (byte tokens;
paragraphs concatenated into rows of 16384 tokens, so every memory runs 16K tokens without a
reset, over shuffled speeches rather than running text; 5% of the paragraphs held out), tiny
preset, batch 1, AdamW at lr 3e-3.  Reported per run: the training
loss at the first and last steps, the largest gradient norm, the rejected steps, and the
held-out perplexity at 16K tokens learning and with the in-context memory frozen (inner rates
0 at evaluation only: the control every memory experiment carries).  ``--probe`` adds the
outer gradient's norm at initialisation on one 16K window of a play, bf16, for HopeLM's
defaults and with one part changed at a time (which memory the gradient comes from).
``--sensitivity`` adds the true (float64) outer gradient at init on one sentence repeated, the
slow test's worst case, by length and with one part changed at a time, with a central-difference
check: where it grows with the length, the forward itself is that sensitive.  Runs live in
``runs/lm/long_bf16/``; one JSON line per run goes to
``experiments/results/lm_long_bf16_runs.jsonl``, the table to ``lm_long_bf16.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import time

import numpy as np

from experiments.lm import report as lm_report

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
SEQ, STEPS, LR, WARMUP, EVAL_FRACTION = 16384, 20, 3e-3, 2, 0.05
# arm -> (registered model, config overrides); hope_first_order: decisions #29
ARMS = {"hope": ("hope", {}), "hope_first_order": ("hope", dict(cms_first_order=True)),
        "titans": ("titans", {})}
MODELS, DTYPES = tuple(ARMS), ("bf16", "float32")


def corpus(runs_dir: str) -> str:
    """A directory of the plays, one text file each (written once)."""
    from experiments.lm import position

    out = pathlib.Path(runs_dir) / "long_bf16" / "plays"
    if not out.is_dir():
        out.mkdir(parents=True)
        for name, text in position.plays():
            (out / f"{name}.txt").write_text(text)
    return str(out)


def one_run(model: str, dtype: str, seed: int, runs_dir: str) -> dict:
    from experiments.lm.finished import train_to_end
    from nested_jax.train import evaluate, metrics, trainer
    from nested_jax.train.config import DataConfig, OptimConfig, TrainConfig

    registered, overrides = ARMS[model]
    cfg = TrainConfig(
        model=registered, preset="tiny", model_overrides=dict(max_seq_len=SEQ, **overrides),
        steps=STEPS,
        seed=seed, log_every=1, eval_every=0, eval_batches=2, checkpoint_every=STEPS,
        keep_checkpoints=1, bf16=dtype == "bf16",
        data=DataConfig(path=corpus(runs_dir), tokenizer="byte", seq_len=SEQ, batch_size=1,
                        eval_fraction=EVAL_FRACTION),
        optim=OptimConfig(name="adamw", learning_rate=LR, warmup_steps=WARMUP,
                          weight_decay=0.1, b2=0.95, grad_clip=1.0))
    workdir = os.path.join(runs_dir, "long_bf16", f"{model}-{dtype}-s{seed}")
    t0 = time.time()
    summary = train_to_end(cfg, workdir)
    seconds = time.time() - t0
    recs = [r for r in metrics.read_records(trainer.workdir_path(workdir) / "metrics.jsonl")
            if "train/loss" in r]
    ppl = lambda *f: evaluate.evaluate_checkpoint(workdir, freeze=f)["perplexity"]
    return dict(model=model, dtype=dtype, seed=seed, params=summary["params"],
                losses=[r["train/loss"] for r in recs],
                grad_norm_max=max(r["train/grad_norm"] for r in recs),
                rejected=int(recs[-1]["train/skipped"]), ppl=ppl(),
                ppl_frozen=ppl("self_modifying"), seconds=seconds)


PROBES = {"defaults": {}, "self-modifying frozen": dict(eta_max=0.0),
          "CMS frozen": dict(cms_lr=0.0),
          "CMS teach signal stop-gradient (before decisions #28)": dict(cms_teach_stop_grad=True),
          "CMS retention 0.99": dict(cms_retention=0.99),
          "CMS retention 0.999": dict(cms_retention=0.999),
          "CMS retention 0.999 toward init": dict(cms_retention=0.999, cms_decay_to="init"),
          "retention_init 0.9999, CMS frozen": dict(retention_init=0.9999, cms_lr=0.0)}


def loss_at_init(ids, seed: int = 0, **overrides):
    """(next-token loss of params, params) of a fresh tiny HopeLM on the byte ids [T + 1];
    ``overrides`` go to its config.  The logits are read in float32 (float64 for a float64
    model)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from nested_jax.models.registry import create, make_config

    x, y = jnp.asarray(ids[None, :-1]), jnp.asarray(ids[None, 1:])
    cfg = make_config("hope", "tiny", vocab_size=256, max_seq_len=len(ids) - 1, **overrides)
    graph, params, rest = nnx.split(create("hope", cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    acc = jnp.promote_types(cfg.dtype, jnp.float32)

    def loss(p):
        logits = nnx.merge(graph, p, rest)(x).astype(acc)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss, params


def probe(name: str, seed: int = 0) -> dict:
    """HopeLM's (tiny, bf16) loss and outer-gradient norm at init on the first 16K bytes of the
    first play, with PROBES[name] overriding the defaults."""
    import jax
    import optax

    from experiments.lm import position

    ids = np.frombuffer(position.plays()[0][1].encode()[:SEQ + 1], np.uint8).astype(np.int32)
    loss, params = loss_at_init(ids, seed, dtype="bfloat16", **PROBES[name])
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return dict(kind="probe", probe=name, seed=seed, loss=float(value),
                grad_norm=float(optax.global_norm(grads)))


# ``--sensitivity``: the true outer gradient at init (float64 everywhere, the memory states
# included) on one sentence repeated, the slow test's worst case, by length and with one part
# changed at a time; (name, text, length, compute dtype, overrides).  The float32 rows show
# what rounding does to the gradient of the same forward.
REPEATED = b"the memory level writes the chunk; "
SENSITIVITY = [
    ("defaults", "repeated", 4096, "float64", {}),
    ("defaults", "repeated", 8192, "float64", {}),
    ("defaults", "repeated", 16384, "float64", {}),
    ("defaults", "repeated", 4096, "float32", {}),
    ("defaults", "repeated", 8192, "float32", {}),
    ("CMS frozen", "repeated", 8192, "float64", dict(cms_lr=0.0)),
    ("self-modifying frozen", "repeated", 8192, "float64", dict(eta_max=0.0)),
    ("one layer", "repeated", 8192, "float64", dict(n_layers=1)),
    ("CMS level 0 (period 4) alone", "repeated", 8192, "float64", dict(cms_lr=(1e-2, 0.0, 0.0))),
    ("CMS level 1 (period 16) alone", "repeated", 8192, "float64", dict(cms_lr=(0.0, 1e-2, 0.0))),
    ("CMS level 2 (period 64) alone", "repeated", 8192, "float64", dict(cms_lr=(0.0, 0.0, 1e-2))),
    ("CMS level 2 alone, lr 3e-3", "repeated", 8192, "float64", dict(cms_lr=(0.0, 0.0, 3e-3))),
    ("CMS level 2 alone, lr 1e-3", "repeated", 8192, "float64", dict(cms_lr=(0.0, 0.0, 1e-3))),
    ("M_memory eta bound 1", "repeated", 8192, "float64", dict(memory_eta_scale=10.0)),
    ("defaults", "play", 16384, "float64", {}),
    ("retention_init 0.9999, CMS frozen", "play", 16384, "float64",
     dict(retention_init=0.9999, cms_lr=0.0)),
    # decisions #29: CMS's first-order outer gradient, same forward (same loss as above)
    ("CMS first-order", "repeated", 4096, "float64", dict(cms_first_order=True)),
    ("CMS first-order", "repeated", 8192, "float64", dict(cms_first_order=True)),
    ("CMS first-order", "repeated", 16384, "float64", dict(cms_first_order=True)),
    ("CMS first-order", "repeated", 8192, "float32", dict(cms_first_order=True)),
    ("CMS first-order", "play", 16384, "float64", dict(cms_first_order=True)),
]
FD_EPS = (1e-9, 1e-7, 1e-5)  # central differences along the gradient, on the first row


def sensitivity(index: int) -> dict:
    """SENSITIVITY[index]: loss and outer-gradient norm at init (tiny HopeLM, seed 0, the slow
    test's chunk sizes); on the first row also the directional derivative along the gradient
    by central differences (equal to the norm where the forward is locally linear)."""
    import jax
    import optax

    from experiments.lm import position

    name, text, T, dtype, over = SENSITIVITY[index]
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    raw = (REPEATED * (T // len(REPEATED) + 2) if text == "repeated"
           else position.plays()[0][1].encode())
    ids = np.frombuffer(raw[:T + 1], np.uint8).astype(np.int32)
    loss, params = loss_at_init(ids, dtype=dtype, param_dtype=dtype, memory_dtype=dtype,
                                chunk_memory=64, chunk_other=8, **over)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    norm = float(optax.global_norm(grads))
    fd = {}
    if index == 0:
        f = jax.jit(loss)
        unit = jax.tree.map(lambda g: g / norm, grads)
        for eps in FD_EPS:
            at = lambda s: f(jax.tree.map(lambda p, u: p + s * eps * u, params, unit))
            fd[f"{eps:g}"] = float((at(1.0) - at(-1.0)) / (2 * eps))
    return dict(kind="sensitivity", row=index, name=name, text=text, T=T, dtype=dtype,
                loss=float(value), grad_norm=norm, fd=fd)


def report(log: str, command: str) -> str:
    from experiments.benchlib import machine_header

    runs, probes, sens = {}, {}, {}
    for line in open(log) if os.path.exists(log) else []:
        r = json.loads(line)
        if r.get("kind") == "probe":
            probes[r["probe"]] = r
        elif r.get("kind") == "sensitivity":
            sens[r["row"]] = r
        else:
            runs[(r["model"], r["dtype"], r["seed"])] = r  # a rerun replaces the earlier one
    span = lambda xs: f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"
    rows = []
    for m in MODELS:
        for d in DTYPES:
            rs = [r for k, r in sorted(runs.items()) if k[:2] == (m, d)]
            if not rs:
                continue
            col = lambda f: span([f(r) for r in rs])
            finite = all(np.isfinite(r["losses"]).all() for r in rs)
            rows.append(
                f"| {m} | {d} | {rs[0]['params']} | {col(lambda r: r['losses'][0])} | "
                f"{col(lambda r: r['losses'][-1])} | {col(lambda r: r['grad_norm_max'])} | "
                f"{'/'.join(str(r['rejected']) for r in rs)} | {'yes' if finite else 'NO'} | "
                f"{col(lambda r: r['ppl'])} | {col(lambda r: r['ppl_frozen'])} | "
                f"{col(lambda r: r['ppl_frozen'] - r['ppl'])} | "
                f"{', '.join(str(r['seed']) for r in rs)} | "
                f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    return "\n".join([
        "# Training finite in bfloat16 at 16K tokens a sequence", "",
        machine_header(), "", f"Command: `{command}`", "",
        f"Tiny preset, one sequence of {SEQ} byte tokens a step (shuffled paragraphs of "
        f"Shakespeare's plays concatenated, so every memory runs {SEQ} tokens without a "
        f"reset), {STEPS} steps, "
        f"AdamW lr {LR:g} (warmup {WARMUP}, cosine), clip 1.0; *bf16*: bfloat16 compute, "
        "float32 parameters.  *rejected*: steps the trainer's guard refused (non-finite loss "
        f"or gradient), per seed.  Perplexity (per byte) at 16K tokens on the held-out "
        f"{EVAL_FRACTION:.0%} of "
        "the paragraphs; "
        "*frozen*: the same checkpoint with the in-context memory's inner rate set to 0 at "
        "evaluation only (HopeLM: the self-modifying memories; TitansLM: its memory).  "
        "Mean [min, max] over seeds.", "",
        "| model | compute | params | loss, step 1 | loss, last step | max grad norm | "
        "rejected | all finite | ppl | ppl, frozen | gap | seeds | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Outer gradient at initialisation (`--probe`): HopeLM, tiny, bf16, the first "
        f"{SEQ} bytes of one play, seed 0, one part changed at a time.", "",
        "| HopeLM | overrides | loss | gradient norm |", "|---|---|---|---|",
        *[f"| {n} | {PROBES[n] or '-'} | {probes[n]['loss']:.3f} | {probes[n]['grad_norm']:.4g} |"
          for n in PROBES if n in probes], "",
        "Sensitivity of the forward (`--sensitivity`): HopeLM, tiny, seed 0, at init, the "
        "slow test's chunk sizes (chunk_memory 64, chunk_other 8); *repeated*: the sentence "
        f"`{REPEATED.decode()}` repeated; *play*: the first bytes of one play.  *float64*: "
        "compute, parameters and memory states in float64, so the gradient is the forward's "
        "true derivative; *float32*: the same forward's gradient as float32 computes it.", "",
        "| HopeLM | text | T | dtype | overrides | loss | gradient norm |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['name']} | {r['text']} | {r['T']} | {r['dtype']} | "
          f"{SENSITIVITY[i][4] or '-'} | {r['loss']:.4f} | {r['grad_norm']:.4g} |"
          for i, r in sorted(sens.items())], "",
        *(["First row, central differences along the gradient: "
           + ", ".join(f"eps {e}: {v:.4g}" for e, v in sens[0]["fd"].items())
           + f" (the gradient norm: {sens[0]['grad_norm']:.4g}).", ""] if 0 in sens else []),
        "## Reading (hand-written; experiments/lm/notes/long_bf16.md)", "",
        open(os.path.join(HERE, "notes", "long_bf16.md")).read()])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--runs-dir", default=os.path.join("runs", "lm"))
    p.add_argument("--probe", action="store_true", help="the gradient-at-init table only")
    p.add_argument("--sensitivity", nargs="*", type=int, metavar="ROW",
                   help="the float64 sensitivity table only (all rows, or these indices; "
                        "each row runs in its own process: x64 is process-wide)")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    log = os.path.join(RESULTS, "lm_long_bf16_runs.jsonl")
    if a.sensitivity is not None and not a.report_only:
        bad = [i for i in a.sensitivity if not 0 <= i < len(SENSITIVITY)]
        if bad:
            p.error(f"--sensitivity: rows {bad} out of range 0..{len(SENSITIVITY) - 1}")
        rows = a.sensitivity or list(range(len(SENSITIVITY)))
        if len(rows) == 1:
            lm_report.append_run(log, sensitivity(rows[0]))
        else:  # a process a row: float64 is process-wide
            import subprocess
            for i in rows:
                subprocess.run([sys.executable, "-m", "experiments.lm.long_bf16",
                                "--sensitivity", str(i)], check=True)
    for name in PROBES if a.probe and not a.report_only and a.sensitivity is None else []:
        lm_report.append_run(log, probe(name))
    for m in [] if a.report_only or a.probe or a.sensitivity is not None else a.models:
        for d in a.dtypes:
            for s in a.seeds:
                lm_report.append_run(log, one_run(m, d, s, a.runs_dir))
    lm_report.write_text(os.path.join(RESULTS, "lm_long_bf16.md"), report(
        log, f"python -m experiments.lm.long_bf16 {shlex.join(argv)}".strip()))


if __name__ == "__main__":
    main()

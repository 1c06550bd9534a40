"""Trainer throughput on this machine: jitted step, data pipeline, and the whole loop.

    python experiments/bench_trainer.py [--quick]

Prints a table and writes experiments/results/bench_trainer.md (machine, versions, date).
Numbers are wall-clock medians; on a shared machine they move with the load average,
which is recorded beside them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from nested_jax import data as data_lib
from nested_jax.train import step as step_lib
from nested_jax.train import trainer
from nested_jax.train.config import DataConfig, OptimConfig, TrainConfig

OUT = pathlib.Path(__file__).parent / "results" / "bench_trainer.md"

CASES = [
    # name, preset, batch, seq_len, extra config
    ("tiny", "tiny", 16, 128, {}),
    ("small", "small", 16, 128, {}),
    ("small, bf16", "small", 16, 128, {"bf16": True}),
    ("small, grad_accum=2", "small", 16, 128, {"accum": 2}),
    ("small, muon", "small", 16, 128, {"optimizer": "muon"}),
]


def _corpus(directory: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    words = ["memory", "level", "gradient", "chunk", "token", "update", "nested", "momentum"]
    paragraphs = [" ".join(rng.choice(words, size=rng.integers(20, 120))) for _ in range(2000)]
    (directory / "corpus.txt").write_text("\n\n".join(paragraphs))
    return directory


def _config(data: pathlib.Path, preset: str, batch: int, seq_len: int, extra: dict,
            steps: int) -> TrainConfig:
    return TrainConfig(
        preset=preset, steps=steps, bf16=extra.get("bf16", False), log_every=1, eval_every=0,
        eval_batches=1, checkpoint_every=0, async_checkpoints=True,
        data=DataConfig(path=str(data), seq_len=seq_len, batch_size=batch, eval_fraction=0.01),
        optim=OptimConfig(name=extra.get("optimizer", "adamw"), warmup_steps=2,
                          grad_accum=extra.get("accum", 1)))


class StepBench:
    """One case's compiled train step on a fixed batch (compile happens in __init__)."""

    def __init__(self, cfg: TrainConfig, workdir: pathlib.Path):
        self.run = trainer.prepare(cfg, workdir, devices=jax.devices()[:1])
        self.step = jax.jit(step_lib.make_train_step(self.run.graphdef, self.run.tx),
                            donate_argnums=0)
        self.state = self.run.init_state()
        batch = np.random.default_rng(0).integers(
            0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
        self.batch = trainer.global_batch(batch, self.run)
        self.times: list[float] = []
        self.time_one()
        self.times.clear()

    def time_one(self) -> None:
        t = time.perf_counter()
        self.state, m = self.step(self.state, self.batch)
        jax.block_until_ready(m)
        self.times.append(time.perf_counter() - t)


def bench_data(cfg: TrainConfig, run, n: int) -> float:
    """Batches per second out of the grain pipeline (byte tokenizer)."""
    it = data_lib.train_batches(run.documents, run.tokenizer, seq_len=cfg.data.seq_len,
                                batch_size=cfg.data.batch_size, seed=0, eval_fraction=0.01)
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t)


def bench_loop(cfg: TrainConfig, workdir: pathlib.Path) -> float:
    """Median tokens/s the full trainer reports (data, host loop, metrics included)."""
    trainer.train(cfg, workdir, devices=jax.devices()[:1], progress=False)
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/tokens_per_s"] for r in records if r.get("perf/tokens_per_s")]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases")
    args = parser.parse_args()
    repeats, loop_steps = (3, 6) if args.quick else (8, 16)
    cases = CASES[:2] if args.quick else CASES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "data").mkdir()
        data = _corpus(tmp / "data")
        cfgs = [_config(data, preset, batch, seq_len, extra, loop_steps)
                for _, preset, batch, seq_len, extra in cases]
        benches = [StepBench(cfg, tmp / f"step{i}") for i, cfg in enumerate(cfgs)]
        # Interleave the cases so a shared machine's changing load hits them alike.
        for _ in range(repeats):
            for b in benches:
                b.time_one()
        for (name, _, batch, seq_len, _), cfg, b in zip(cases, cfgs, benches, strict=True):
            step_s, run = statistics.median(b.times), b.run
            tokens = batch * seq_len
            flops = trainer.flops_per_token(run.abstract_model, run.n_params, seq_len) * tokens
            batches_s = bench_data(cfg, run, 50)
            loop = bench_loop(cfg, tmp / f"{name}-loop")
            rows.append((name, run.n_params, f"{batch}x{seq_len}", step_s, tokens / step_s,
                         flops / step_s / 1e9, batches_s * tokens, loop))
            print(f"{name:<22} {rows[-1][1] / 1e6:6.2f}M  step {step_s * 1e3:8.1f} ms  "
                  f"{rows[-1][4]:8.0f} tok/s  loop {loop:8.0f} tok/s", flush=True)
    write_report(rows)


def write_report(rows) -> None:
    versions = {p: importlib.metadata.version(p) for p in
                ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")
                if _installed(p)}
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    header = ("| case | params | batch x seq | step (ms) | step tok/s | GFLOP/s | "
              "data tok/s | trainer tok/s |\n|---|---|---|---|---|---|---|---|\n")
    table = "".join(
        f"| {n} | {p / 1e6:.2f}M | {bs} | {s * 1e3:.1f} | {tps:.0f} | {gf:.1f} | {d:.0f} | "
        f"{loop:.0f} |\n" for n, p, bs, s, tps, gf, d, loop in rows)
    text = f"""# Trainer throughput on CPU

Written by `python experiments/bench_trainer.py` on {datetime.date.today().isoformat()}.

- machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or "unknown"}),
  {platform.system()} {platform.release()}; JAX backend {jax.default_backend()},
  {jax.device_count()} device(s) (runs use one)
- load average at the end: {", ".join(f"{x:.1f}" for x in load)} (the machine is shared;
  higher load means proportionally lower numbers)
- versions: {", ".join(f"{k} {v}" for k, v in versions.items())}; Python {platform.python_version()}

Byte-level vocabulary (256), AdamW unless noted, float32 unless noted. *step*: one jitted
train step on a fixed batch (compile excluded; median of rounds that interleave the
cases, so load changes hit every case alike). *GFLOP/s*: the model's
`flops_per_token` x tokens / step time. *data*: tokens/s the grain pipeline alone
delivers. *trainer*: the median tokens/s the full loop logs (data, host loop,
metrics; no checkpoints in between).

{header}{table}"""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()

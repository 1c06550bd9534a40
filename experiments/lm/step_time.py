"""HopeLM's train step under each optimizer of the optimizer suite, timed side by side.

    python -m experiments.lm.step_time [--scale cpu] [--repeats 5]

The optimizer suite's runs log seconds a step from their own training, which moves with
whatever else the machine runs at the time (the runs are spread over sessions).  This times the
suite's exact jitted train step (HopeLM at the scale's shape, batch and sequence length; the
guard, clipping and schedule included) once per optimizer, compiled first and then stepped in
interleaved rounds, so a change of load hits every optimizer alike; the ratios to AdamW are the
numbers to quote.  Writes ``experiments/results/lm_optimizers_step_time.md``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

from experiments import benchlib
from experiments.lm import recipes, run
from experiments.lm import tokenizer as tok_lib

OUT = os.path.join(run.RESULTS, "lm_optimizers_step_time.md")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="cpu", choices=list(recipes.SCALES))
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (>= 2)")
    p.add_argument("--runs-dir", default="runs/lm", help="where the suite's tokenizer lives")
    a = p.parse_args(argv)
    if a.repeats < 2:
        p.error(f"--repeats={a.repeats}: need >= 2 rounds for a median")
    from experiments.bench_trainer import StepBench

    scale = recipes.SCALES[a.scale]
    tok = tok_lib.build("builtin:wikipedia", scale.vocab, os.path.join(
        a.runs_dir, a.scale, f"tokenizer-{scale.vocab}.model"))
    t0 = time.time()
    benches, compile_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for opt in recipes.OPTIMIZERS:
            grid = scale.grid("optimizers", opt)
            cfg = run.train_config(scale, recipes.PRESET[a.scale], "hope", scale.overrides("hope"),
                                   opt, grid[len(grid) // 2], 0, scale.steps,
                                   f"sentencepiece:{os.path.abspath(tok)}")
            t = time.perf_counter()
            benches[opt] = StepBench(cfg, pathlib.Path(tmp) / opt)  # compiles and steps once
            compile_s[opt] = time.perf_counter() - t
            print(f"{opt}: compiled and first step in {compile_s[opt]:.0f} s", flush=True)
        for _ in range(a.repeats):  # interleaved: a load change hits every optimizer alike
            for b in benches.values():
                b.time_one()
    step_s = {opt: statistics.median(b.times) for opt, b in benches.items()}
    rows = [(opt, f"{step_s[opt]:.2f}", f"{step_s[opt] / step_s['adamw']:.2f}",
             f"{min(b.times):.2f} - {max(b.times):.2f}", f"{compile_s[opt]:.0f}")
            for opt, b in benches.items()]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (
        f"Command: `{' '.join(['python -m experiments.lm.step_time', *argv])}` "
        f"({(time.time() - t0) / 60:.1f} min)\n\n"
        f"- model: HopeLM at the {a.scale} scale ({scale.base}, {scale.overrides('hope')}), "
        f"{scale.batch} x {scale.seq_len} tokens a step, float32, one device\n"
        "- step: the optimizer suite's jitted train step (`nested_jax/train/step.py`: loss, "
        "gradient, clip, the optimizer, the guard), on a fixed batch, with each optimizer's "
        "middle grid value (the rate does not change the work)\n"
        f"- timing: {a.repeats} rounds that step every optimizer once in turn, after one "
        "compiling step each; the median, its range, and the ratio of medians to AdamW\n"
        f"- load average at the end: {load} (a shared machine: read the ratios)\n\n"
        + benchlib.markdown_table(["optimizer", "s / step", "x adamw", "range (s)",
                                   "compile + first step (s)"], rows)
        + "\n")
    benchlib.write_result(OUT, f"Optimizer suite: HopeLM step time ({a.scale} scale)", body)


if __name__ == "__main__":
    main()

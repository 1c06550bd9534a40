"""Compile time and per-chip memory of the TPU train and eval steps, blocks looped or scanned.

    python -m experiments.bench_compile                                   # hope, 125M, v5e-16
    python -m experiments.bench_compile --models transformer hope --preset 125M --topology v5e-16

Each model's ``lm:<preset>`` recipe, as the compile grid builds it
(``experiments/tpu_compile_grid.py``: bf16, remat, FSDP, one 4K sequence per chip per
microbatch), is compiled by libtpu for the topology on this machine (no TPU needed;
``pip install -e '.[tpu]'``) twice, side by side in one process: with ``model.scan_layers``
off (a Python loop over the blocks: XLA compiles L copies of the block) and on (one
``lax.scan`` over the stacked block parameters: XLA compiles one).  Both compile the same
arithmetic (``tests/models/test_scan_layers.py`` checks it in float64), so what changes is the
compile time and how XLA schedules memory.  The decode step keeps its loop and is not compiled
here.  Each pair is appended to ``results/bench_compile_runs.jsonl`` and the table
``results/bench_compile.md`` is rewritten from the whole log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from experiments import benchlib, tpu_compile_grid

RESULTS = os.path.join(os.path.dirname(__file__), "results")
STEM = "bench_compile"


def compile_pair(model: str, preset: str, topology: str) -> dict:
    """The model's recipe compiled with the blocks looped, then scanned."""
    from nested_jax.train import aot, config

    slices = 1
    cfg, settings = tpu_compile_grid.cell_config(
        model, preset, tpu_compile_grid.chips_of(topology, slices))
    out = {"model": model, "preset": preset, "topology": topology,
           "settings": dict(settings[1:]), "libtpu": aot.check_libtpu(),
           "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"}
    for scan in (False, True):
        print(f"compiling {model}/{preset} on {topology}, scan_layers={scan} ...", flush=True)
        t0 = time.time()
        report = aot.compile_for(config.with_values(cfg, [("model.scan_layers", scan)]),
                                 topology, slices, steps=("train", "eval"))
        rec = aot.as_record(report)
        rec["seconds"] = time.time() - t0
        out["scan" if scan else "loop"] = rec
    return out


def report(runs: list[dict], command: str) -> str:
    rows = []
    for r in runs:
        loop, scan = r["loop"], r["scan"]
        for a, b in zip(loop["steps"], scan["steps"], strict=True):
            ok = a["compiled"] and b["compiled"]
            rows.append([
                r["model"], r["preset"], r["topology"], loop["n_params"] / 1e6, a["step"],
                f"{a['seconds']:.0f}" if a["compiled"] else "failed",
                f"{b['seconds']:.0f}" if b["compiled"] else "failed",
                f"{a['seconds'] / b['seconds']:.1f}x" if ok else "-",
                tpu_compile_grid.gib(a["total_bytes"]) if a["compiled"] else "-",
                tpu_compile_grid.gib(b["total_bytes"]) if b["compiled"] else "-",
                f"{b['flops'] / a['flops']:.3f}" if ok and a["flops"] else "-"])
    table = benchlib.markdown_table(
        ["model", "preset", "topology", "params (M)", "step", "compile s, loop",
         "compile s, scan", "loop / scan", "per chip, loop", "per chip, scan",
         "FLOPs scan / loop"], rows)
    return (tpu_compile_grid.provenance(runs, command, STEM, "pair") + "\n\n"
            "Recipe `lm:<preset>` as the compile grid builds it (bf16, every block "
            "rematerialised, FSDP over all chips, one 4K sequence per chip per microbatch), "
            "compiled by libtpu on this CPU-only machine, the loop then the scan in one "
            "process.  *per chip*: XLA's total (arguments + outputs + temporaries - donated); "
            "*FLOPs*: XLA's cost analysis of the compiled step (a scan's body may be counted "
            "once, not per iteration, so the ratio says more about the analysis than about the "
            "work, which the float64 test shows is the same).  No TPU ran: nothing here "
            "measures step time.\n\n" + table + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["hope"],
                    choices=tpu_compile_grid.MODELS)
    ap.add_argument("--preset", default="125M", choices=tpu_compile_grid.PRESETS)
    ap.add_argument("--topology", default="v5e-16",
                    choices=[t for t, (_, n) in tpu_compile_grid.TOPOLOGIES.items() if n == 1])
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    command = "python -m experiments.bench_compile " + " ".join(argv or sys.argv[1:])
    log, runs = tpu_compile_grid.open_log(STEM)
    if not args.report_only:
        for m in args.models:
            run = compile_pair(m, args.preset, args.topology)
            with open(log, "a") as f:
                f.write(json.dumps(run) + "\n")
            runs.append(run)
            benchlib.write_result(os.path.join(RESULTS, f"{STEM}.md"),
                                  "Compile time, blocks looped or scanned", report(runs, command))
    benchlib.write_result(os.path.join(RESULTS, f"{STEM}.md"),
                          "Compile time, blocks looped or scanned", report(runs, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

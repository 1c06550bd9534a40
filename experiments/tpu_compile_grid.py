"""The TPU compile grid: every model x paper preset x topology, compiled ahead of time.

    python -m experiments.tpu_compile_grid                        # the whole grid, resumable
    python -m experiments.tpu_compile_grid --models hope --presets 125M --topologies v5e-16
    python -m experiments.tpu_compile_grid --report-only
    python -m experiments.tpu_compile_grid --models hope_attention --presets 1.3B \
        --topologies v5e-16 --set mesh.tensor=2     # a cell that does not fit as shipped

Each cell is ``nested_jax.train.aot.compile_for`` on the ``lm:<preset>`` recipe
(``nested_jax/train/configs/lm.py``) for a topology, compiled by libtpu on this machine
(no TPU needed; ``pip install -e '.[tpu]'``).  A cell's train, eval and decode reports are
appended to ``results/tpu_compile_grid_runs.jsonl`` as soon as it finishes, so the grid
resumes where it stopped (a logged cell is skipped) and can be split across machines with
``--models/--presets/--topologies``; the table ``results/tpu_compile_grid.md`` is rewritten
from the whole log after every cell.

Per topology the batch keeps the recipe's one 4K sequence per chip per microbatch: 128
sequences (0.5M tokens) in ``128 / chips`` microbatches up to 128 chips, and one sequence per
chip in one microbatch beyond (v5e-256: 256 sequences, 1M tokens per step).  Everything else
is the recipe as shipped (bf16, remat, splash attention, FSDP over every chip).  A compile
that fails is a row too: the error says what did not fit.  HopeLM is compiled twice: ``hope``
(``memory_impl="auto"``: M_memory through the Mosaic kernel, compiled by libtpu for real) and
``hope_xla`` (the kernel off: XLA's dual form).

``--set KEY=VALUE`` adds config settings to every cell it compiles (the trainer's ``--set``
keys: ``mesh.tensor=2``, ``optim.grad_accum=16``, ...): a cell that does not fit as shipped is
compiled again with the setting it needs, logged as a further row beside the recipe's, its
settings in the batch column.  A cell is skipped when a row with exactly its settings is
logged.

``--recompile STEP ...`` compiles the named steps again for the selected cells that are
logged, and replaces those steps in their rows, dated (the table says "recompiled"): for a
code change that moves one step's memory, such as the decode step's teach table
(``layers.replicate``, 2026-12-06), without compiling the other steps again.  Run it alone:
it rewrites the log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from experiments import benchlib

RESULTS = os.path.join(os.path.dirname(__file__), "results")
NOTES = os.path.join(os.path.dirname(__file__), "notes", "tpu_compile_grid.md")
STEM = "tpu_compile_grid"
MODELS = ("transformer", "hope_attention", "hope", "hope_xla", "titans")
# Grid rows that are a registered model with settings: HopeLM with the Mosaic memory kernel off
# (M_memory through XLA's dual form), beside "hope", where ``memory_impl="auto"`` takes the kernel.
ROW_SETTINGS = {"hope_xla": ("hope", [("model.memory_impl", "xla")])}
PRESETS = ("125M", "340M", "760M", "1.3B")
# (topology, slices): the grid; "2xv5e-16" is multislice.
TOPOLOGIES = {"v5e-16": ("v5e-16", 1), "v5e-256": ("v5e-256", 1), "v5p-32": ("v5p-32", 1),
              "v6e-8": ("v6e-8", 1), "2xv5e-16": ("v5e-16", 2)}
SEQUENCES = 128  # the recipe's batch: 128 x 4096 tokens


def batch_settings(chips: int) -> list[tuple[str, object]]:
    """One sequence per chip per microbatch (the setting that fits at 125M on v5e-16)."""
    if chips <= SEQUENCES:
        return [("data.batch_size", SEQUENCES), ("optim.grad_accum", SEQUENCES // chips)]
    return [("data.batch_size", chips), ("optim.grad_accum", 1)]


def chips_of(topology: str, slices: int) -> int:
    from nested_jax.train import aot

    return len(aot.topology_devices(topology, slices))


def cell_config(model: str, preset: str, chips: int, slices: int = 1,
                extra: list[tuple[str, object]] | None = None):
    """The run config of one grid cell, and the settings it adds to the recipe; ``extra``
    (``--set``) comes last, so it can change the batch rule's settings too."""
    from nested_jax.train import config

    name, row = ROW_SETTINGS.get(model, (model, []))
    settings = [("model", name)] + row + batch_settings(chips)
    if slices > 1:  # data parallel across slices (data-center network), FSDP inside each
        settings.append(("mesh.data", slices))
    settings = list(dict(settings + list(extra or [])).items())  # a later value replaces
    return config.with_values(config.from_file(f"lm:{preset}"), settings), settings


def blocks(run: dict) -> str:
    """How a logged cell ran its blocks: "scan" or "loop" (cells logged before the recipe
    recorded it were compiled with the loop)."""
    return run.get("blocks", "loop")


def blocks_of(cfg) -> str:
    """How a run config runs the blocks: "scan" with ``model.scan_layers``, else "loop"."""
    return "scan" if cfg.model_overrides.get("scan_layers") else "loop"


def recipe_blocks() -> str:
    """How the recipe as shipped runs the blocks (``lm.py``)."""
    from nested_jax.train import config

    return blocks_of(config.from_file("lm:125M"))


def done_cells(runs: list[dict]) -> set[tuple[str, str, str]]:
    """Cells compiled with the recipe's blocks setting: a loop cell does not stand for the scan."""
    current = recipe_blocks()
    return {(r["model"], r["preset"], r["topology"]) for r in runs if blocks(r) == current}


def cell_settings(model: str, preset: str, grid_topology: str,
                  extra: list[tuple[str, object]] | None = None):
    """``cell_config`` for a grid topology name."""
    topology, slices = TOPOLOGIES[grid_topology]
    return cell_config(model, preset, chips_of(topology, slices), slices, extra)


def logged(runs: list[dict], model: str, preset: str, grid_topology: str,
           settings: list[tuple[str, object]]) -> bool:
    """Whether a row with exactly these settings (and the recipe's blocks) is logged."""
    current = recipe_blocks()
    return any((r["model"], r["preset"], r["topology"]) == (model, preset, grid_topology)
               and r["settings"] == dict(settings[1:]) and blocks(r) == current for r in runs)


def compile_cell(model: str, preset: str, grid_topology: str, cfg, settings) -> dict:
    """Compile one cell, its config and settings from ``cell_settings``."""
    from nested_jax.train import aot

    topology, slices = TOPOLOGIES[grid_topology]
    t0 = time.time()
    report = aot.compile_for(cfg, topology, slices)
    return {"model": model, "preset": preset, "topology": grid_topology,
            "settings": dict(settings[1:]), "seconds": time.time() - t0,
            "blocks": blocks_of(cfg),
            "date": now(),
            "libtpu": aot.check_libtpu(),
            "report": aot.as_record(report)}


def now() -> str:
    return f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"


def recompile_cell(run: dict, cfg, steps: tuple[str, ...]) -> dict:
    """``run`` (a logged row of ``cfg``'s cell) with ``steps`` compiled again and dated."""
    from nested_jax.train import aot

    topology, slices = TOPOLOGIES[run["topology"]]
    fresh = {st["step"]: st for st in aot.as_record(aot.compile_for(cfg, topology, slices,
                                                                      steps))["steps"]}
    report_ = dict(run["report"], steps=[fresh.get(st["step"], st)
                                         for st in run["report"]["steps"]])
    date = now()
    return dict(run, report=report_, libtpu=aot.check_libtpu(),
                recompiled={**run.get("recompiled", {}), **{s: date for s in steps}})


def rewrite_log(log: str, runs: list[dict]) -> None:
    """The whole log replaced at once (a temporary file renamed over it)."""
    tmp = log + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in runs)
    os.replace(tmp, log)


def open_log(stem: str) -> tuple[str, list[dict]]:
    """The results log of ``stem`` and its records so far; off a TPU VM libtpu is told not to
    look for a metadata server."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    log = os.path.join(RESULTS, f"{stem}_runs.jsonl")
    return log, [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def provenance(runs: list[dict], command: str, stem: str, unit: str) -> str:
    """The command, the log the table covers, the libtpu versions and the compile dates."""
    libtpu = sorted({r["libtpu"] for r in runs})
    return (f"Command: `{command}` (the table covers every {unit} in `{stem}_runs.jsonl`; "
            f"libtpu {', '.join(libtpu) or '-'}; {unit}s compiled "
            f"{min((r['date'] for r in runs), default='-')} to "
            f"{max((r['date'] for r in runs), default='-')})")


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def report(runs: list[dict], command: str) -> str:
    rows = []
    for r in runs:
        rep = r["report"]
        s = r["settings"]
        head = [r["model"], rep["n_params"] / 1e6, r["preset"], r["topology"], blocks(r),
                rep["chips"],
                f"{s['data.batch_size']} x 4096, accum {s['optim.grad_accum']}"
                + "".join(f", {k.split('.')[-1]}={v}" for k, v in s.items()
                          if k not in ("data.batch_size", "optim.grad_accum"))]
        for st in rep["steps"]:
            mem = gib(st["total_bytes"]) if st["compiled"] else "-"
            err = "" if st["compiled"] else st["error"].split("\n")[0][:160]
            fits = {True: "yes", False: "no", None: "?"}[st["fits"]]
            again = r.get("recompiled", {}).get(st["step"])
            step = st["step"] + (f" (recompiled {again})" if again else "")
            rows.append(head + [step, "yes" if st["compiled"] else "no",
                                f"{st['seconds']:.0f}", mem, fits, err])
            head = [""] * len(head)
    table = benchlib.markdown_table(
        ["model", "params (M)", "preset", "topology", "blocks", "chips", "batch", "step",
         "compiled",
         "compile s", "per chip", "fits", "error"], rows)
    done = done_cells(runs)
    todo = [f"{m}/{p}/{t}" for t in TOPOLOGIES for p in PRESETS for m in MODELS
            if (m, p, t) not in done]
    return (provenance(runs, command, STEM, "cell") + "\n\n"
            "Recipe `lm:<preset>` as shipped (bf16, every block rematerialised, splash attention "
            "on TPU, FSDP over all chips), one 4K sequence per chip per microbatch; *blocks*: "
            "a Python loop over the blocks, or one `lax.scan` (`model.scan_layers`, the recipe "
            f"since 2026-12-03: `{recipe_blocks()}` now, and a cell counts as done only when "
            "compiled so); memory is "
            "XLA's per-chip total (arguments + outputs + temporaries - donated) against the "
            "chip's HBM.  Compiled by libtpu on a CPU-only machine: no TPU ran, so nothing "
            "here measures speed.\n\n"
            f"{table}\n\n"
            f"Cells not yet compiled ({len(todo)} of "
            f"{len(MODELS) * len(PRESETS) * len(TOPOLOGIES)}): "
            + (", ".join(todo) if todo else "none") + "\n"
            + (f"\n## Reading (hand-written; experiments/notes/{os.path.basename(NOTES)})\n\n"
               + open(NOTES).read() if os.path.exists(NOTES) else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config settings added to every cell, logged as further rows "
                         "(e.g. mesh.tensor=2 where a cell does not fit as shipped)")
    ap.add_argument("--recompile", nargs="+", default=[], metavar="STEP",
                    choices=("train", "eval", "decode"),
                    help="compile these steps again for the selected cells already logged, "
                         "replacing them in their rows (dated); compiles no new cell")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    from nested_jax.train import config

    extra = config.parse_assignments(args.set)
    command = "python -m experiments.tpu_compile_grid " + " ".join(argv or sys.argv[1:])
    log, runs = open_log(STEM)
    if not args.report_only:
        from nested_jax.train import aot

        aot.check_libtpu()  # before any cell: says what to install
        for t in args.topologies:
            for p in args.presets:
                for m in args.models:
                    # Built before the first compile: a bad --set key or value stops here.
                    cfg, settings = cell_settings(m, p, t, extra)
                    # Shards of the grid run side by side (a process per core): the log is read
                    # again before each cell, so one that another process has logged since this
                    # one started is not compiled twice.
                    runs = open_log(STEM)[1]
                    if args.recompile:
                        rows = [i for i, r in enumerate(runs)
                                if logged([r], m, p, t, settings)]
                        for i in rows:
                            print(f"recompiling {', '.join(args.recompile)} of {m}/{p} on "
                                  f"{t} ...", flush=True)
                            runs[i] = recompile_cell(runs[i], cfg, tuple(args.recompile))
                            rewrite_log(log, runs)
                        if rows:
                            benchlib.write_result(os.path.join(RESULTS, f"{STEM}.md"),
                                                  "TPU compile grid", report(runs, command))
                        continue
                    if logged(runs, m, p, t, settings):
                        continue
                    print(f"compiling {m}/{p} on {t} ...", flush=True)
                    run = compile_cell(m, p, t, cfg, settings)
                    with open(log, "a") as f:
                        f.write(json.dumps(run) + "\n")
                    runs.append(run)
                    benchlib.write_result(os.path.join(RESULTS, f"{STEM}.md"),
                                          "TPU compile grid", report(runs, command))
    benchlib.write_result(os.path.join(RESULTS, f"{STEM}.md"), "TPU compile grid",
                          report(runs, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

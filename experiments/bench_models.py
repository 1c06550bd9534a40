"""Train-step throughput of the four model families at one preset, ratios to Transformer++.

    python experiments/bench_models.py                       # small preset, T = 512, 2048, 8192
    python experiments/bench_models.py --seq-lens 512 --steps 1          # a quick look
    python experiments/bench_models.py --models "transformer,hope_attention[cms_teach_at=input]"

One jitted AdamW train step (``nested_jax.train.step``) per model on a fixed random batch of
``--tokens-per-step`` tokens (batch = tokens // T, at least 1).  Compilation is excluded; the
timed steps of all models interleave (round r times every model once), so a shared machine's
changing load hits every model alike, and the ratios to Transformer++ come from the same run.
Peak memory is XLA's estimate for the compiled step (arguments + outputs + temporaries; CPU).
A model name that is not registered (e.g. "hope" before it exists) gets a row saying so.
Writes experiments/results/bench_models.md (machine, versions, date, load).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchlib beside this file
import benchlib  # noqa: E402

from nested_jax import models  # noqa: E402
from nested_jax.train import step as step_lib  # noqa: E402

OUT = pathlib.Path(__file__).parent / "results" / "bench_models.md"
DEFAULT_MODELS = "transformer,hope_attention,titans,hope"
TARGETS = {2048: 0.5, 8192: 1.0}  # Hope / Transformer++ tokens/s (issue 4)
# HopeLM keeps its default remat=False: every memory is already rematerialised inside the block
# (the coupled scan in segments, M_memory and the CMS levels chunk by chunk), so a block-level
# remat would only recompute them once more.
NO_BLOCK_REMAT = ("hope",)


def parse_model(spec: str) -> tuple[str, dict]:
    """'name[field=value,...]' -> (name, overrides); values are Python literals or strings."""
    if "[" not in spec:
        return spec, {}
    name, rest = spec.split("[", 1)
    overrides = {}
    for item in rest.rstrip("]").split(";" if ";" in rest else ","):
        if item:
            key, value = item.split("=", 1)
            try:
                overrides[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):  # a bare word (e.g. input) is a string
                overrides[key] = value
    return name, overrides


class Case:
    """One model's compiled train step and its state."""

    def __init__(self, label: str, name: str, overrides: dict, args, seq_len: int):
        self.label, self.name, self.seq_len = label, name, seq_len
        cfg_cls, _ = models.lookup(name)
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        kw = dict(vocab_size=args.vocab, max_seq_len=max(seq_len, 2), dtype=args.dtype)
        if "remat" in fields and name not in NO_BLOCK_REMAT:
            kw["remat"] = args.remat
        if "attention_impl" in fields and seq_len >= args.blockwise_from:
            kw["attention_impl"] = "blockwise"  # dense XLA attention: 32 GB at T = 8192
        kw.update(overrides)
        model = models.create(name, args.preset, rngs=nnx.Rngs(0), **kw)
        self.params = models.count_params(model)
        self.flops = model.flops_per_token(seq_len)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adamw(1e-3, weight_decay=0.1)
        self.state = dict(params=params, rest=rest, opt_state=tx.init(params),
                          **step_lib.init_guard_counters())
        self.batch = max(1, args.tokens_per_step // seq_len)
        self.tokens = self.batch * seq_len
        data = jax.random.randint(jax.random.key(1), (1, self.batch, seq_len + 1), 0, args.vocab)
        self.data = data
        # donate: the step updates the state in place, as the trainer's does (less memory)
        donate = (0,) if getattr(args, "donate", False) else ()
        if donate:  # one buffer may sit at several leaves (e.g. zero counters): donate copies
            self.state = jax.tree.map(lambda x: x.copy(), self.state)
        step = jax.jit(step_lib.make_train_step(graphdef, tx), donate_argnums=donate)
        t0 = time.perf_counter()
        compiled = step.lower(self.state, data).compile()
        self.compile_s = time.perf_counter() - t0
        self.peak_bytes = _peak_bytes(compiled)
        self.step = compiled
        self.times: list[float] = []
        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, data)  # warm-up
        jax.block_until_ready(metrics)
        self.warmup_s = time.perf_counter() - t0
        self.finite = bool(metrics["finite"])

    def time_once(self) -> None:
        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, self.data)
        jax.block_until_ready(metrics)
        self.times.append(time.perf_counter() - t0)
        self.finite &= bool(metrics["finite"])

    @property
    def tok_s(self) -> float:
        return self.tokens / statistics.median(self.times)


def _peak_bytes(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                     - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def device_peak_bytes() -> float | None:
    """The allocator's high-water mark on device 0 since the process started (GPU, TPU); None
    where the backend keeps no statistics (CPU)."""
    try:
        return float((jax.devices()[0].memory_stats() or {})["peak_bytes_in_use"])
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def run(args) -> list[list]:
    specs = [s.strip() for s in args.models.split(",") if s.strip()] if "[" not in args.models \
        else _split_specs(args.models)
    rows = []
    for T in args.seq_lens:
        cases: list[Case] = []
        for spec in specs:
            name, overrides = parse_model(spec)
            try:
                models.lookup(name)
            except ValueError:
                rows.append([spec, T, "-", "-", "-", "-", "-", "-", "not registered"])
                print(f"{spec}: not registered, skipped", flush=True)
                continue
            try:
                case = Case(spec, name, overrides, args, T)
            except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on
                why = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__
                rows.append([spec, T, "-", "-", "-", "-", "-", "-", f"failed: {why}"])
                print(f"{spec} T={T}: {e!r}", flush=True)
                continue
            print(f"{spec} T={T}: compiled in {case.compile_s:.1f}s", flush=True)
            cases.append(case)
        for _ in range(args.steps):
            for case in cases:
                case.time_once()
        # the first Transformer++ row, with or without overrides, is every ratio's baseline
        base = next((c.tok_s for c in cases if c.name == "transformer"), None)
        for c in cases:
            ratio = c.tok_s / base if base else float("nan")
            mem = f"{c.peak_bytes / 2**30:.2f}" if c.peak_bytes else "?"
            gflops = c.flops * c.tok_s / 1e9
            note = "" if c.finite else "non-finite loss"
            rows.append([c.label, T, f"{c.params / 1e6:.2f}M", f"{c.batch}x{T}",
                         round(statistics.median(c.times) * 1e3, 1), round(c.tok_s, 1),
                         round(ratio, 3), round(gflops, 2), mem + (f"; {note}" if note else "")])
            print(rows[-1], flush=True)
        del cases
    return rows


def _split_specs(text: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [s for s in out + [cur.strip()] if s]


def report(rows, args) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = ["model", "T", "params", "batch", "step (ms)", "tokens/s", "/ Transformer++",
              "GFLOP/s", "peak mem (GiB)"]
    lines = [
        f"Command: `python experiments/bench_models.py {' '.join(sys.argv[1:])}`",
        "",
        f"Preset `{args.preset}`, vocabulary {args.vocab}, dtype {args.dtype}, block remat "
        f"{args.remat} (HopeLM: none, its memories rematerialise inside the block), attention "
        f"`blockwise` from T = {args.blockwise_from}, AdamW; {args.tokens_per_step} tokens per "
        "step (batch = tokens // T); "
        f"median of {args.steps} timed steps per model, interleaved across models; compile and "
        "one warm-up step excluded.  *peak mem*: XLA's memory analysis of the compiled step "
        "(arguments + outputs + temporaries).  *GFLOP/s*: `flops_per_token(T)` x tokens/s.",
        f"Load average at the end: {load} (2-core machine shared with other jobs: absolute "
        "numbers move with the load, the interleaved ratios much less).",
        "",
        benchlib.markdown_table(header, rows),
        "",
        "Targets (issue 4): Hope / Transformer++ >= " +
        ", ".join(f"{v} at T = {k}" for k, v in TARGETS.items()) + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma list; 'name[field=value,...]' adds config overrides (separate "
                        "them with ';' when a value holds commas)")
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-lens", default="512,2048,8192",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model (median)")
    p.add_argument("--vocab", type=int, default=256,
                   help="vocabulary (256 = the byte-level tokenizer of CPU runs)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--blockwise-from", type=int, default=8192,
                   help="attention models use layers.blockwise_attention from this T on")
    p.add_argument("--no-remat", dest="remat", action="store_false",
                   help="do not rematerialize blocks (remat is on: T = 8192 attention on CPU)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    rows = run(args)
    body = report(rows, args)
    print(body)
    benchlib.write_result(args.out, "Model throughput: train step on CPU", body)


if __name__ == "__main__":
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jnp.zeros(())  # initialise the backend before timing anything
    main()

"""HopeLM vs Transformer++ train step on one GPU: tokens/s, MFU, peak memory (issue 15, part 3).

    python experiments/gpu_models.py                # GPU: presets 125M, 340M at T = 8K, 32K, 2K
    python experiments/gpu_models.py --groups 125M:8192,125M:32768 --budget 400
    python experiments/gpu_models.py --smoke        # CPU check of this script (tiny, T = 64, 128)

``experiments/gpu_check.py`` calls ``main_for_gpu_check(budget_s, smoke)`` (header + table in
$OUT/bench_models_gpu.md); ``model_table(say, budget_s, smoke, groups=None)`` appends the table
to any report.  Run alone, ``main`` writes experiments/results/bench_models_gpu.md
(``--smoke``: a temp file).  Smoke runs HopeLM's kernel interpreted on CPU (``memory_impl=
"interpret"``), so the model's kernel path is exercised before the GPU sees it.

What runs: ``bench_models.Case``, i.e. one jitted AdamW train step (``nested_jax.train.step``,
state donated) on a fixed random batch of ``TOKENS_PER_STEP`` tokens (batch = tokens // T),
compute in bfloat16, parameters and optimizer state in float32, ``scan_layers=True`` for both
models (XLA compiles one block instead of L: compile time is what this one-shot run can least
afford).  Transformer++ runs cuDNN flash attention (``attention_impl="cudnn"``; blockwise XLA
attention if cuDNN fails a probe), no block remat.  HopeLM runs its default config with
M_memory, its linear output memory, on the Pallas kernel (``memory_impl="pallas"``; if the
kernel fails, the XLA dual form for the rest of the run, said so).  Its four coupled memories
are MLPs: no kernel runs them, they are always the XLA dual form.

Per row: median wall time of the timed steps (after a compiling warm-up step, blocking on the
metrics), tokens/s, MFU = analytic model FLOPs (``model.flops_per_token(T)``: 6 N + 12 L D T
for Transformer++, 6 N + the inner loops for HopeLM) / step time / the device's dense bf16 peak
(989 TFLOP/s on H100/H200, ``nested_jax.train.metrics.PEAK_FLOPS``).  XLA's own count
(``cost_analysis()["flops"]``) is not used: it counts a while-loop body once (a scan of 10
matmuls reports the FLOPs of one; checked on jax 0.10) and no custom call (cuDNN attention, the
Pallas kernel), and both models are scans.  Peak memory: XLA's buffer assignment for the step
(arguments + outputs + temporaries), and the allocator's high-water mark
(``memory_stats()["peak_bytes_in_use"]``, cumulative over the run: a row sets it only when it
exceeds every earlier row).

Where HopeLM's time goes (at 125M, T = 8K then 32K, while the budget lasts):
  * a jax.profiler trace of one step, device kernel time summed by where the kernel comes from
    (the HLO op's named scope: ``coupled_memories``, ``output_memory``, ``cms``; Pallas kernels
    are the Triton/Mosaic custom calls), plus the top kernels by time; not taken where the
    kernel count would pass MAX_EVENTS (32K, most likely: the chunk scans are sequential);
  * the coupled MLP memories alone: one layer's coupled scan, forward + backward, x L layers;
  * variants of the whole step at 125M, 8K: M_memory on the XLA dual form instead of the
    kernel, and CMS replaced by a static SwiGLU (``use_cms=False``).

Every row is in try/except (error or OOM becomes the row's status), a global budget skips rows
that would not fit (estimated from the rows before), and device memory is freed between rows.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import glob
import math
import os
import pathlib
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

HERE = pathlib.Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # nested_jax; bench_models and benchlib beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

OUT = HERE / "results" / "bench_models_gpu.md"
TOKENS_PER_STEP = 32768
VOCAB = 32000  # the presets' vocabulary (nominal sizes count the tied embedding at 32K)
# (preset, T) groups in the order they run: the targets' T first, then 2K, then 340M.
GROUPS = (("125M", 8192), ("125M", 32768), ("125M", 2048),
          ("340M", 8192), ("340M", 32768), ("340M", 2048))
SMOKE_GROUPS = (("tiny", 64), ("tiny", 128))
PROFILE_AT = (("125M", 8192), ("125M", 32768))  # HopeLM's trace and coupled-scan timing
VARIANTS_AT = ("125M", 8192)
TARGETS = {8192: (">=", 1.0), 32768: (">", 1.5)}  # HopeLM / Transformer++ tokens/s (issue 15)
MAX_STEPS, TIMED_S = 5, 2.0  # timed steps: up to 5, stopping once 2 s are spent (>= 1 step)
# A warm-up step longer than this is the row's one timing: HopeLM's 32K steps may take tens of
# seconds (sequential chunk scans), and first-run overheads are then a few % of it.
SLOW_S = 10.0
MAX_EVENTS, PARSE_S = 3_000_000, 60.0  # trace parsing cap (events, seconds)
KERNELS_PER_S = 200_000  # a latency-bound step's kernel rate at most (~5 us a kernel)
REST = "rest: projections, conv, norms, embedding + LM head, loss, AdamW"
CATEGORIES = ("coupled MLP memories (XLA dual form)", "M_memory: Pallas kernel",
              "M_memory: XLA around / instead of the kernel", "CMS", "attention (cuDNN)", REST,
              "unmapped")


def trace_tail() -> None:
    """The end of the current traceback on stderr (where XLA/Triton say what failed)."""
    print(traceback.format_exc()[-1000:], file=sys.stderr, flush=True)


def _cell(e: BaseException) -> str:
    text = str(e)
    # device memory; a Triton kernel's "RESOURCE_EXHAUSTED: shared memory ..." is a kernel error
    oom = ("RESOURCE_EXHAUSTED" in text and "shared memory" not in text) or \
        "out of memory" in text.lower()
    short = re.sub(r"\s+", " ", text)[:160].replace("|", "/")
    return f"{'OOM' if oom else 'error'}: {type(e).__name__}: {short}"


@dataclasses.dataclass
class Result:
    label: str
    model: str
    preset: str
    T: int
    status: str = "ok"
    batch: int = 0
    params: float = 0.0
    step_s: float = math.nan
    tok_s: float = math.nan
    mfu: float | None = None
    xla_gib: float | None = None
    dev_gib: float | None = None
    compile_s: float = math.nan
    steps: int = 0
    warm_only: bool = False  # the one timing is the warm-up step (it took over SLOW_S)
    path: str = ""

    @property
    def ok(self) -> bool:  # timed ("ok, non-finite loss" too: the time stands, the loss is odd)
        return self.status.startswith("ok")

    def cells(self) -> list[str]:
        f = lambda x, fmt: "-" if x is None or (isinstance(x, float) and math.isnan(x)) \
            else format(x, fmt)
        steps = "1 (warm-up)" if self.warm_only else str(self.steps or "-")
        return [self.label, self.path, f"{self.batch}x{self.T}" if self.batch else "-",
                f"{self.params / 1e6:.1f}M" if self.params else "-", f(self.step_s * 1e3, ".1f"),
                f(self.tok_s, ",.0f"), "-" if self.mfu is None else f"{100 * self.mfu:.1f}%",
                f(self.xla_gib, ".2f"), f(self.dev_gib, ".2f"), f(self.compile_s, ".0f"),
                steps, self.status]


HEADER = ("| model | attention / memory | batch | params | step ms | tokens/s | MFU | "
          "peak GiB (XLA) | device high-water GiB | compile s | steps | status |")


class Runner:
    """One run of the table: its clock and budget, settings, and the rows measured so far."""

    def __init__(self, say: Callable[[str], None], budget_s: float, smoke: bool,
                 groups: Sequence[tuple[str, int]] | None = None):
        self.say, self.budget, self.smoke = say, float(budget_s), smoke
        self.groups = tuple(groups or (SMOKE_GROUPS if smoke else GROUPS))
        self.start = time.time()
        self.results: list[Result] = []
        # smoke: the kernel interpreted on CPU, so the model's kernel path runs here too
        self.memory_impl = "interpret" if smoke else "pallas"
        self.kernel_failed = False
        self.attention = None if smoke else "cudnn"
        self.peak = _peak_flops()
        self.kernels_per_T: float | None = None  # from the first trace: kernels / T

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    # ---- one row ----------------------------------------------------------------------------

    def overrides(self, model: str) -> dict:
        kw = dict(scan_layers=True, param_dtype="float32")
        if model == "transformer":
            kw["attention_impl"] = self.attention
        else:
            kw["memory_impl"] = self.memory_impl
        return kw

    def estimate(self, model: str, preset: str, T: int) -> float:
        """Seconds a row should take, from the rows of the same model before it (0: none yet,
        the row runs).  Step time is scaled by T (HopeLM's sequential chunks grow with it) and
        by 2.8 for a larger preset (340M's FLOPs over 125M's); compile by 1.3 (wider, deeper)."""
        same = [r for r in self.results if r.model == model and r.ok]
        if not same:
            return 0.0
        near = [r for r in same if r.preset == preset]
        grow, grow_c = (1.0, 1.0) if near else (2.8, 1.3)
        near = near or same
        compile_s = grow_c * max(r.compile_s for r in near)
        step_s = grow * max(r.step_s * T / r.T for r in near)
        timed_s = 0.0 if step_s > SLOW_S else max(step_s, min(MAX_STEPS * step_s, TIMED_S))
        return compile_s + step_s + timed_s + (2 if self.smoke else 10)  # + warm-up, init

    def row(self, model: str, preset: str, T: int, label: str, extra: dict | None = None,
            after: Callable | None = None) -> Result:
        """Build, compile, warm up and time one train step; never raises.  ``after(case)`` runs
        (budget permitting) while the compiled step is still alive (the profile)."""
        import bench_models  # flax, optax, nested_jax: imported here so gpu_check's import
        # of this module cannot fail on them

        res = Result(label, model, preset, T)
        need, left = self.estimate(model, preset, T), self.left()
        if left <= 0 or need > left:
            res.status = f"skipped: time budget (needs ~{need:.0f} s, {max(left, 0):.0f} s left)"
            self.results.append(res)
            return res
        kw = {**self.overrides(model), **(extra or {})}
        res.path = (f"attention {kw.get('attention_impl') or 'xla'}" if model == "transformer"
                    else f"M_memory {kw.get('memory_impl')}"
                    + ("" if kw.get("use_cms", True) else ", no CMS"))
        args = argparse.Namespace(preset=preset, vocab=256 if self.smoke else VOCAB,
                                  dtype="bfloat16",
                                  remat=False, blockwise_from=10**9, donate=True,
                                  tokens_per_step=(256 if self.smoke else TOKENS_PER_STEP))
        case = None
        try:
            t0 = time.time()
            case = bench_models.Case(label, model, kw, args, T)
            res.batch, res.params, res.compile_s = case.batch, case.params, case.compile_s
            res.xla_gib = case.peak_bytes / 2**30 if case.peak_bytes else None
            res.warm_only = case.warmup_s > SLOW_S
            if res.warm_only:
                case.times.append(case.warmup_s)
            t_end = time.perf_counter() + TIMED_S
            while not case.times or (len(case.times) < (1 if self.smoke else MAX_STEPS)
                                     and time.perf_counter() < t_end and not res.warm_only):
                case.time_once()
            res.steps = len(case.times)
            res.step_s = statistics.median(case.times)
            res.tok_s = case.tokens / res.step_s
            if self.peak:
                res.mfu = case.flops * case.tokens / res.step_s / self.peak
            dev = bench_models.device_peak_bytes()
            res.dev_gib = dev / 2**30 if dev else None
            if not case.finite:
                res.status = "ok, non-finite loss"
            print(f"{label} {preset} T={T}: {res.step_s * 1e3:.1f} ms/step, compile "
                  f"{res.compile_s:.0f} s, row {time.time() - t0:.0f} s", flush=True)
            if after is not None:
                after(case, res)
        except Exception as e:  # noqa: BLE001 - an error or OOM is the row's result
            res.status = _cell(e)
            print(f"{label} {preset} T={T}: {res.status}", file=sys.stderr, flush=True)
            trace_tail()
        finally:
            del case
            free()
        self.results.append(res)
        return res

    def hope_rows(self, preset: str, T: int, **kw) -> list[Result]:
        """HopeLM's row; if the Pallas kernel fails (not for memory), a second row on the XLA
        dual form, which the rest of the run then keeps."""
        rows = [self.row("hope", preset, T, "HopeLM", **kw)]
        failed = not rows[0].ok and not rows[0].status.startswith(("OOM", "skipped"))
        if failed and self.memory_impl in ("pallas", "interpret"):
            self.memory_impl, self.kernel_failed = "xla", True
            rows.append(self.row("hope", preset, T, "HopeLM (kernel failed: XLA dual form)",
                                 **kw))
        return rows

    # ---- the table --------------------------------------------------------------------------

    def group(self, preset: str, T: int) -> None:
        batch = max(1, (256 if self.smoke else TOKENS_PER_STEP) // T)
        self.say(f"### {preset}, T = {T} (batch {batch})")
        self.say()
        self.say(HEADER)
        self.say("|" + "---|" * HEADER.count(" | ") + "---|")
        tr = self.row("transformer", preset, T, "Transformer++")
        self.say("| " + " | ".join(tr.cells()) + " |")
        profile = (preset, T) in (self.groups[:1] if self.smoke else PROFILE_AT)
        notes: list[str] = []
        after = (lambda case, res: notes.extend(self.trace(case, res))) if profile else None
        hopes = self.hope_rows(preset, T, after=after)
        for r in hopes:
            self.say("| " + " | ".join(r.cells()) + " |")
        hope = hopes[-1]
        self.say()
        if len(hopes) > 1:
            self.say("The Pallas kernel failed in HopeLM (status above); M_memory runs the XLA "
                     "dual form in every later HopeLM row.")
            self.say()
        self.say(ratio_line(hope, tr))
        self.say()
        for line in notes:
            self.say(line)
        if profile and hope.ok:
            self.coupled_alone(preset, T, hope)

    def variants(self) -> None:
        preset, T = self.groups[0] if self.smoke else VARIANTS_AT
        base = next((r for r in self.results if r.model == "hope" and r.preset == preset
                     and r.T == T and r.ok), None)
        self.say(f"### HopeLM variants at {preset}, T = {T}: what M_memory's kernel and CMS cost")
        self.say()
        self.say(HEADER.replace(" status |", " status | vs HopeLM (ms) |"))
        self.say("|" + "---|" * (HEADER.count(" | ") + 2))
        runs = [("HopeLM, CMS -> static SwiGLU", dict(use_cms=False))]
        if not self.kernel_failed:
            runs.insert(0, ("HopeLM, M_memory on the XLA dual form", dict(memory_impl="xla")))
        for label, extra in runs:
            r = self.row("hope", preset, T, label, extra=extra)
            delta = (f"{(r.step_s - base.step_s) * 1e3:+.1f}" if base and r.ok else "-")
            self.say("| " + " | ".join(r.cells()) + f" | {delta} |")
        self.say()

    def summary(self) -> None:
        self.say("### Summary: HopeLM / Transformer++ tokens/s")
        self.say()
        self.say("| preset | T | HopeLM tokens/s | Transformer++ tokens/s | ratio | target | "
                 "verdict |")
        self.say("|---|---|---|---|---|---|---|")
        for preset, T in self.groups:
            # the last row of each model (after a failed kernel row: its XLA retry)
            pick = lambda m: ([r for r in self.results if r.model == m and r.preset == preset
                               and r.T == T and not r.label.startswith("HopeLM,")] or [None])[-1]
            hope, tr = pick("hope"), pick("transformer")
            if hope is None or tr is None:
                continue
            ratio = hope.tok_s / tr.tok_s if hope.ok and tr.ok else math.nan
            op, goal = TARGETS.get(T, ("", None))
            verdict = verdict_of(ratio, T)
            fmt = lambda r: f"{r.tok_s:,.0f}" if r.ok else r.status.split(":")[0]
            self.say(f"| {preset} | {T} | {fmt(hope)} | {fmt(tr)} | "
                     f"{'-' if math.isnan(ratio) else f'{ratio:.2f}'} | "
                     f"{f'{op} {goal}' if goal else '-'} | {verdict} |")
        self.say()

    # ---- where HopeLM's time goes -------------------------------------------------------------

    def trace(self, case, res: Result) -> list[str]:
        """Profile one more step of the compiled HopeLM step; markdown lines (never raises).
        The kernel count grows with T (HopeLM's chunk scans are sequential), so a trace whose
        count, extrapolated from the first trace (or, before one, from the step time), would
        pass MAX_EVENTS is not taken."""
        need = 3 * res.step_s + 20
        if self.left() < need:
            return [f"Profile skipped (time budget: needs ~{need:.0f} s, {self.left():.0f} s "
                    "left).", ""]
        expected = (self.kernels_per_T * res.T if self.kernels_per_T
                    else 0 if self.smoke else res.step_s * KERNELS_PER_S)
        if expected > MAX_EVENTS:
            return [f"Profile skipped: up to ~{expected:,.0f} kernels expected, over the "
                    f"{MAX_EVENTS:,} this script parses; the coupled-scan timing below (and "
                    "a shorter T's profile) stand for it.", ""]
        try:
            lines, n = profile_lines(case, res, deadline=time.time() + min(PARSE_S, self.left()))
            self.kernels_per_T = self.kernels_per_T or n / res.T
            return lines
        except Exception as e:  # noqa: BLE001
            trace_tail()
            return [f"Profile failed: {_cell(e)}", ""]

    def coupled_alone(self, preset: str, T: int, hope: Result) -> None:
        """The four coupled MLP memories alone (XLA dual form): one layer's coupled scan,
        forward + backward, at the row's shape, x L layers."""
        need = 30 if not self.smoke else 5
        if self.left() < need:
            self.say("Coupled memories alone: skipped (time budget).")
            self.say()
            return
        try:
            ms, layers = coupled_scan_ms(preset, T, hope.batch, self.overrides("hope"))
            share = ms * layers / (hope.step_s * 1e3)
            self.say(f"Coupled MLP memories alone (XLA dual form; one layer's coupled scan, "
                     f"forward + backward, timed by itself): {ms:.1f} ms x {layers} layers = "
                     f"{ms * layers:.0f} ms, {100 * share:.0f}% of the {hope.step_s * 1e3:.0f} "
                     "ms step.")
        except Exception as e:  # noqa: BLE001
            trace_tail()
            self.say(f"Coupled memories alone: {_cell(e)}")
        finally:
            free()
        self.say()


def verdict_of(ratio: float, T: int) -> str:
    if T not in TARGETS:
        return "no target"
    if math.isnan(ratio):
        return "n/a"
    op, goal = TARGETS[T]
    met = ratio >= goal if op == ">=" else ratio > goal
    return "MET" if met else "NOT MET"


def ratio_line(hope: Result, tr: Result) -> str:
    if not (hope.ok and tr.ok):
        return "HopeLM / Transformer++: n/a (a row did not run)."
    ratio = hope.tok_s / tr.tok_s
    target = TARGETS.get(hope.T)
    goal = f" (target {target[0]} {target[1]}: {verdict_of(ratio, hope.T)})" if target else ""
    return f"HopeLM / Transformer++ tokens/s = {ratio:.2f}{goal}."


def free() -> None:
    """Drop compiled steps and their buffers before the next row."""
    gc.collect()
    jax.clear_caches()


def _peak_flops() -> float | None:
    dev = jax.devices()[0]
    try:
        from nested_jax.train.metrics import peak_flops

        return peak_flops(dev)
    except Exception:  # noqa: BLE001 - metrics needs etils; these are the ones that matter here
        kind = getattr(dev, "device_kind", "")
        return next((v for k, v in (("H200", 989e12), ("H100", 989e12)) if k in kind), None)


def probe_cudnn() -> str | None:
    """'cudnn' if cuDNN flash attention runs forward and backward here, else None."""
    try:
        x = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
        f = lambda q: jnp.sum(jax.nn.dot_product_attention(
            q, q, q, is_causal=True, implementation="cudnn").astype(jnp.float32))
        jax.block_until_ready(jax.jit(jax.grad(f))(x))
        return "cudnn"
    except Exception:  # noqa: BLE001
        trace_tail()
        return None


# ---- the coupled memories alone ---------------------------------------------------------------

def coupled_scan_ms(preset: str, T: int, batch: int, overrides: dict) -> tuple[float, int]:
    """Median ms of one HopeLM layer's coupled scan (M_k, M_v, M_eta, M_alpha over the
    C_other-chunks, remat segments as in the model), forward + backward, and the layer count."""
    from flax import nnx

    from nested_jax import models
    from nested_jax.models.self_modifying import SelfModifyingTitans

    kw = {k: v for k, v in overrides.items() if k != "scan_layers"}
    cfg = models.make_config("hope", preset, dtype="bfloat16", max_seq_len=T, **kw)
    lcfg = cfg.layer_config()
    layer = SelfModifyingTitans(lcfg, out_std=0.02, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    shape = (batch, layer._padded_len(T), len(lcfg.coupled), lcfg.n_heads, lcfg.head_dim)
    x = jax.random.normal(jax.random.key(0), shape, lcfg.memory_dtype) / math.sqrt(shape[-1])

    def loss(params, x):
        lay = nnx.merge(graphdef, params, rest)
        coupled0, _ = lay.initial_states(batch)
        _, outs = lay._scan_coupled(coupled0, {"x": x})
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(outs))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(fn(params, x))
    times = []
    t_end = time.perf_counter() + TIMED_S
    while not times or (len(times) < MAX_STEPS and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), cfg.n_layers


# ---- profile: device time by where the kernel comes from ---------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
CONTAINERS = ("while", "conditional", "call")  # host events that enclose their bodies' events


def hlo_ops(text: str) -> dict[str, tuple[str, str, str]]:
    """Instruction name -> (opcode, op_name metadata, custom-call target) of an HLO module's
    text.  A fusion without metadata of its own takes its fused computation's root's."""
    ops, roots, calls = {}, {}, {}
    comp = ""
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and " = " not in line:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
            depth = 0
            for i, ch in enumerate(rest):
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    rest = rest[i + 1:]
                    break
        else:
            rest = rest.split(" ", 1)[1] if " " in rest else ""
        op = re.match(r"\s*([\w\-]+)\(", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        ops[name] = (op.group(1) if op else "", op_name.group(1) if op_name else "",
                     target.group(1) if target else "")
        if called:
            calls[name] = called.group(1)
        if line.lstrip().startswith("ROOT"):
            roots[comp] = name
    for name, comp in calls.items():
        if not ops[name][1] and roots.get(comp) in ops:
            ops[name] = (ops[name][0], ops[roots[comp]][1], ops[name][2])
    return ops


def _scoped(op_name: str, scope: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(scope)}(?![\w])", op_name) is not None


def category(op: tuple[str, str, str] | None) -> str:
    """Where an HLO op comes from: its named scope (the models set them), or what it calls."""
    from nested_jax.models.hope import SCOPE_CMS
    from nested_jax.models.self_modifying import SCOPE_COUPLED, SCOPE_MEMORY

    if op is None:
        return "unmapped"
    opcode, op_name, target = op
    # a Pallas kernel: jax's Triton / Mosaic GPU custom call (or any op of a pallas_call)
    pallas = (opcode == "custom-call" and ("triton" in target or "mosaic" in target)) or \
        "pallas_call" in op_name
    if _scoped(op_name, SCOPE_COUPLED):
        return CATEGORIES[0]
    if _scoped(op_name, SCOPE_MEMORY):
        return CATEGORIES[1] if pallas else CATEGORIES[2]
    if _scoped(op_name, SCOPE_CMS):
        return CATEGORIES[3]
    if opcode == "custom-call" and "cudnn" in target:
        return CATEGORIES[4]
    return REST


def device_events(path: str, ops: dict, deadline: float):
    """(kernel name, hlo op or None, ns) of every kernel in the trace; returns (events,
    truncated, on_device).  GPU: the device planes' stream lines.  CPU (smoke), or a GPU trace
    without device planes (no CUPTI): the host's XLA op events, without the
    while/conditional/call events that enclose the ops of their bodies."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(max(files, key=os.path.getmtime))
    planes = [p for p in data.planes if re.match(r"/device:GPU:\d+$", p.name)]
    on_device = bool(planes)
    planes = planes or [p for p in data.planes if p.name.startswith("/host:CPU")]
    derived = ("XLA Modules", "XLA Ops", "Steps", "Framework", "TensorFlow", "Source", "Launch")
    # a GPU fusion's kernel is named after the fusion, "." and "-" written "_"
    alias = {re.sub(r"[.\-]", "_", name): name for name in ops}
    out, n = [], 0
    for plane in planes:
        for line in plane.lines:
            if line.name.startswith(derived):
                continue
            for ev in line.events:
                n += 1
                if n > MAX_EVENTS or (n % 100_000 == 0 and time.time() > deadline):
                    return out, True, on_device
                hlo = next((v for k, v in ev.stats if k == "hlo_op"), None)
                if hlo is None and on_device:
                    hlo = ev.name if ev.name in ops else alias.get(ev.name)
                if hlo is None and not on_device:
                    continue  # host-side Python and runtime events
                hlo = None if hlo is None else str(hlo).lstrip("%")
                if not on_device and ops.get(hlo, ("",))[0] in CONTAINERS:
                    continue
                out.append((ev.name, hlo, float(ev.duration_ns)))
    return out, False, on_device


def profile_lines(case, res: Result, deadline: float) -> tuple[list[str], int]:
    """Trace one step of ``case``: (markdown lines of device time by category and the top
    kernels, the number of kernels)."""
    ops = hlo_ops(case.step.as_text())
    tmp = tempfile.mkdtemp(prefix="gpu_models_trace_")
    try:
        with jax.profiler.trace(tmp):
            t0 = time.perf_counter()
            case.time_once()
            wall = time.perf_counter() - t0
        case.times.pop()  # traced: not one of the row's timings
        events, truncated, on_device = device_events(tmp, ops, deadline)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not events:
        return ["Profile: the trace holds no kernel events (no CUPTI?).", ""], 0
    by_cat, by_kernel = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(
        lambda: [0.0, 0, ""])
    cats: dict = {}
    for name, hlo, ns in events:
        if hlo not in cats:
            cats[hlo] = category(ops.get(hlo)) if hlo else "unmapped"
        cat = cats[hlo]
        by_cat[cat][0] += ns
        by_cat[cat][1] += 1
        k = by_kernel[name]
        k[0] += ns
        k[1] += 1
        k[2] = cat
    busy = max(sum(v[0] for v in by_cat.values()) / 1e6, 1e-9)
    cut = " (trace cut short: counts are partial)" if truncated else ""
    host = "" if on_device or jax.default_backend() == "cpu" else (
        " (no device plane in the trace: these are host-side op events, not kernel times)")
    lines = [
        f"Profile of one HopeLM step ({preset_T(res)}; jax.profiler): {len(events):,} kernels"
        f"{cut}{host}, busy {busy:.0f} ms of the traced step's {wall * 1e3:.0f} ms wall "
        f"({res.step_s * 1e3:.0f} ms untraced); "
        "the difference is time between kernels (launches, while-loop trip counts read by the "
        "host) plus tracing overhead.",
        "",
        "| where (HLO named scope) | ms | % of busy | kernels |",
        "|---|---|---|---|",
    ]
    for cat in CATEGORIES:
        ms, count = by_cat.get(cat, (0.0, 0))
        if count or cat != "unmapped":
            lines.append(f"| {cat} | {ms / 1e6:.1f} | {100 * ms / 1e6 / busy:.0f}% | "
                         f"{count:,} |")
    lines += ["", "| top kernels by time | where | calls | ms |", "|---|---|---|---|"]
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:12]
    for name, (ns, count, cat) in top:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {cat} | {count:,} | {ns / 1e6:.1f} |")
    return lines + [""], len(events)


def preset_T(res: Result) -> str:
    return f"{res.preset}, batch {res.batch} x T {res.T}"


# ---- entry points ---------------------------------------------------------------------------

def model_table(say: Callable[[str], None], budget_s: float, smoke: bool, *,
                groups: Sequence[tuple[str, int]] | None = None) -> None:
    """Append the model table to a report: ``say(line)`` writes one markdown line.  Stops
    starting rows once ``budget_s`` seconds are spent (rows that would not fit are skipped,
    with a note); never raises.  ``groups``: (preset, T) pairs to run, in order (default
    GROUPS; smoke: SMOKE_GROUPS)."""
    say_ = lambda line="": say(line)
    try:
        run = Runner(say_, budget_s, smoke, groups)
        setup(run)
        for preset, T in run.groups:
            run.group(preset, T)
        run.variants()
        run.summary()
        say_(f"Model table: {time.time() - run.start:.0f} s of a {budget_s:.0f} s budget.")
        say_()
    except Exception as e:  # noqa: BLE001 - the caller's other sections must still run
        trace_tail()
        say_(f"Model table stopped: {_cell(e)}")
        say_()


def setup(run: Runner) -> None:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    gpu = jax.default_backend() == "gpu"
    if not run.smoke and gpu:
        run.attention = probe_cudnn() or "blockwise"
    elif not run.smoke:
        run.attention = "blockwise"
    tokens = 256 if run.smoke else TOKENS_PER_STEP
    peak = f"{run.peak / 1e12:.0f} TFLOP/s dense bf16 ({kind})" if run.peak else \
        f"unknown for {kind}: no MFU"
    run.say("## HopeLM vs Transformer++: train step, bf16 (experiments/gpu_models.py)")
    run.say()
    run.say(f"- {tokens} tokens per step (batch = tokens // T), vocabulary "
            f"{256 if run.smoke else VOCAB}, compute bfloat16, parameters and AdamW state "
            "float32, `scan_layers=True`, train step state donated; no block remat.")
    run.say(f"- Transformer++ attention: `{run.attention or 'xla'}`"
            f"{' (cuDNN failed its probe)' if run.attention == 'blockwise' and gpu else ''}.  "
            "HopeLM: "
            f"M_memory (linear) on `memory_impl={run.memory_impl}`; the coupled memories (MLPs) "
            "always on the XLA dual form.")
    run.say(f"- step ms: median of up to {MAX_STEPS} steps ({TIMED_S:g} s) after a compiling "
            f"warm-up step.  MFU: `flops_per_token(T)` x tokens / step time / peak {peak} (XLA's "
            "cost_analysis counts a scan's body once: not used).  peak GiB (XLA): the step's "
            "buffer assignment; device high-water: allocator peak since the run began.")
    run.say(f"- budget {run.budget:.0f} s; a row that would not fit says so in its status.")
    run.say()


def header_lines(command: str) -> list[str]:
    dev = jax.devices()[0]
    vers = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
    for name in ("jaxlib", "flax", "optax"):
        try:
            vers.append(f"{name} {__import__(name).__version__}")
        except Exception:  # noqa: BLE001
            pass
    return [
        "# HopeLM vs Transformer++: train step throughput, MFU, memory",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- device: {getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}, "
        f"backend {jax.default_backend()}; host {platform.machine()}, {os.cpu_count()} cores",
        f"- {', '.join(vers)}",
        f"- command: `{command}`",
        "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, T = 64, 128")
    p.add_argument("--out", default=None, help=f"report path (default {OUT}; --smoke: a temp "
                   "file)")
    p.add_argument("--budget", type=float, default=None, help="seconds (default 1500; smoke 600)")
    p.add_argument("--groups", default=None, help="preset:T pairs in run order, e.g. "
                   "125M:8192,125M:32768 (default: all six; smoke: tiny:64,tiny:128)")
    args = p.parse_args()
    if args.smoke:  # the test suite's CPU compile flags: LLVM at -O0 compiles ~40% faster
        jax.config.update("jax_platforms", "cpu")  # before the first use starts a backend
        if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + " --xla_backend_optimization_level=0")
    out = args.out or (os.path.join(tempfile.gettempdir(), "bench_models_gpu_smoke.md")
                       if args.smoke else str(OUT))
    say = writer(out)
    for line in header_lines(" ".join(["python experiments/gpu_models.py", *sys.argv[1:]])):
        say(line)
    budget = args.budget if args.budget is not None else (600.0 if args.smoke else 1500.0)
    pairs = None if not args.groups else [
        (g.split(":")[0], int(g.split(":")[1])) for g in args.groups.split(",")]
    model_table(say, budget, args.smoke, groups=pairs)
    print(f"wrote {out}")


def main_for_gpu_check(budget_s: float, smoke: bool) -> None:
    """gpu_check.py's part (c): the header and the table, printed, and in
    $OUT/bench_models_gpu.md when $OUT is set; never raises."""
    try:
        out = os.environ.get("OUT")
        say = writer(os.path.join(out, "bench_models_gpu.md") if out else None)
        for line in header_lines("python experiments/gpu_check.py" + (" --smoke" * smoke)):
            say(line)
        model_table(say, budget_s, smoke)
    except Exception:  # noqa: BLE001 - the report so far stays; the caller goes on
        trace_tail()


def writer(path: str | None) -> Callable[[str], None]:
    """say(line): print it and rewrite ``path`` with every line so far (a kill keeps them)."""
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")

    return say


if __name__ == "__main__":
    main()

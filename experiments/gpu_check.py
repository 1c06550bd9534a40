"""The one script to run first on a GPU (issue 15): kernel correctness, the kernel table, the
model table.  Finishes in under 8 minutes.

Run from the repository root on a GPU machine (jax >= 0.6 with CUDA; made for jax 0.11 on an
H200; needs jax, numpy, flax, optax and this repository; not grain):

    PYTHONPATH=. OUT=/tmp/out python experiments/gpu_check.py

In a 15-minute lease (a minute or two of it to start the machine), one call of
``GPU_CHECK_BUDGET_S=170 GPU_MODELS_BUDGET_S=250 timeout 480 python experiments/gpu_check.py``
leaves room for one short rerun; the model table then covers 125M at T = 8K and 32K (the
targets' lengths), and ``python experiments/gpu_models.py --groups ...`` the rest in a later
lease.

(a) Correctness, fp32 and bf16, Hope's level (l2 + momentum + DGD) at d = 64 and 128 and
    Titans' (dot + momentum): the kernel path (impl="pallas") against the XLA dual form
    (nested_jax.memory.apply path="dual"): outputs, final W and S, and the gradients w.r.t.
    every input.  fp32 kernels use IEEE fp32 dots, so they must agree to ~1e-5 (a TF32 slip
    would show as ~1e-3); bf16 is held to 2e-2 against the fp32 dual form on the same
    bf16-rounded inputs (tests/kernels/test_linear_memory.py::test_bfloat16 explains).
(b) Kernel timings (median after a compiling warm-up, block_until_ready, bf16 q/k/v, f32 state
    and gates): the kernel path vs the XLA dual form, fwd and fwd+bwd, at (8, 4096, 16, 64),
    (2, 16384, 16, 128) and (1, 8192, 96, 128), jax.nn.dot_product_attention (cuDNN if
    available) side by side, a breakdown (prep, transition, the Pallas loop), chunk sizes and
    a small tile sweep.
(c) The model table (``experiments/gpu_models.py``): HopeLM and Transformer++ train steps.

Every row is wrapped in try/except: a failure prints its error and the run goes on.  Budgets
(GPU_CHECK_BUDGET_S for (a)+(b), default 200 s; GPU_MODELS_BUDGET_S for (c), default 220 s)
skip the remaining rows.  With $OUT set, the reports are written to $OUT/bench_kernels_gpu.md
and $OUT/bench_models_gpu.md, rewritten after every line so that an outer timeout still
leaves what was measured.

``--smoke`` runs the same script on CPU with the kernels in interpret mode and tiny shapes
(checks the script itself, not the GPU).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nested_jax import memory as nm  # noqa: E402
from nested_jax.memory import pallas  # noqa: E402

START = time.time()
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "200"))
SMOKE = "--smoke" in sys.argv
KERNEL_IMPL = "interpret" if SMOKE else "pallas"
C = 16 if SMOKE else 64
LEVELS = {
    "hope (l2, momentum, DGD)": lambda d: nm.Level(nm.LinearMemory(d, d), "l2", nm.DGD),
    "titans (dot, momentum)": lambda d: nm.Level(nm.LinearMemory(d, d), "dot", nm.TITANS),
}
# (level, head dim) pairs checked in (a): d = 128 is where the f32 tiles are largest.
CHECKS = (("hope (l2, momentum, DGD)", 64), ("hope (l2, momentum, DGD)", 128),
          ("titans (dot, momentum)", 64))
LINES: list[str] = []


def trace() -> None:
    """The end of the current traceback (where Triton/XLA say what failed), kept short so a
    `| tail` of the output still shows the tables."""
    print(traceback.format_exc()[-1200:], file=sys.stderr, flush=True)


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    save_report()


def save_report() -> None:
    """Rewrite $OUT/bench_kernels_gpu.md after every line, so an outer timeout still leaves
    everything measured so far."""
    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_kernels_gpu.md"), "w") as f:
        f.write("\n".join(LINES) + "\n")


def left() -> float:
    return BUDGET - (time.time() - START)


def header() -> None:
    dev = jax.devices()[0]
    say("# Pallas kernels on GPU: correctness and timings (experiments/gpu_check.py)")
    say()
    say(f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    say(f"- device: {getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}, "
        f"backend {jax.default_backend()}")
    vers = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
    try:
        import jaxlib

        vers.append(f"jaxlib {jaxlib.__version__}")
    except Exception:  # noqa: BLE001
        pass
    say(f"- {', '.join(vers)}; host {platform.machine()}, {os.cpu_count()} cores")
    say()


def make_inputs(level, B, T, H, dtype, seed=0):
    d = level.memory.dk
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, d))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (B, T, H, d))).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, d)).astype(dtype)
    g = nm.Gates(0.5 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))),
                 jax.nn.sigmoid(3.0 + jax.random.normal(ks[4], (B, T, H))),
                 jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))))
    w = jax.random.normal(ks[6], (B, H, d, d)) / np.sqrt(d)
    s = 0.1 * jax.random.normal(ks[7], (B, H, d, d))
    return nm.MemoryState({"W": w}, {"W": s}), q, k, v, g


def run_fn(level, impl, chunk_size=None, **kw):
    kernel = "triton" if impl != "xla" else "auto"
    cs = chunk_size or C
    return lambda st, q, k, v, g: nm.apply(level, st, q, k, v, g, chunk_size=cs, path="pallas",
                                           impl=impl, kernel=kernel, **kw)


def grads_fn(run, weighted=True):
    def loss(st, q, k, v, g):
        o, fin = run(st, q, k, v, g)
        o = o.astype(jnp.float32)
        main = jnp.sum(jnp.sin(o)) if weighted else jnp.sum(o)
        return main + jnp.sum(fin.params["W"] ** 2) + jnp.sum(fin.mom["W"])

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def rel(a, b) -> float:
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def correctness() -> bool:
    B, T, H = (1, 40, 2) if SMOKE else (2, 200, 4)
    say(f"## (a) correctness: kernel vs XLA dual form, B={B} T={T} H={H} C={C} (ragged tail)")
    say()
    say("| level | d | dtype | outputs | final W, S | grads (q,k,v,gates,W0,S0) | tol | verdict |")
    say("|---|---|---|---|---|---|---|---|")
    ok_all = True
    for i, (name, d) in enumerate(CHECKS):
        d = 16 * (d // 64) if SMOKE else d
        level = LEVELS[name](d)
        for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
            dname = jnp.dtype(dtype).name
            # Hope's d = 64 level always; the others only while most of the budget is left,
            # so the timings below still get their share.
            if left() < (30 if i == 0 else 0.75 * BUDGET):
                say(f"| {name} | {d} | {dname} | skipped (time budget) | | | | |")
                continue
            try:
                args = make_inputs(level, B, T, H, dtype, seed=1)
                st, q, k, v, g = args
                ref_args = (st, *(x.astype(jnp.float32) for x in (q, k, v)), g)
                ker, ref = run_fn(level, KERNEL_IMPL), run_fn(level, "xla")
                # XLA's f32 dots may use TF32 on GPU by default; the reference must not.
                with jax.default_matmul_precision("highest"):
                    o_k, f_k = jax.jit(ker)(*args)
                    o_r, f_r = jax.jit(ref)(*ref_args)
                    g_k = jax.jit(grads_fn(ker))(*args)
                    g_r = jax.jit(grads_fn(ref))(*ref_args)
                errs = (rel(o_k, o_r), rel(f_k, f_r), rel(g_k, g_r))
                finite = all(bool(jnp.all(jnp.isfinite(x)))
                             for x in jax.tree.leaves((o_k, f_k, g_k)))
                ok = finite and max(errs) < tol
                verdict = "PASS" if ok else ("FAIL (non-finite)" if not finite else "FAIL")
                say(f"| {name} | {d} | {dname} | {errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e} | "
                    f"{tol:g} | {verdict} |")
            except Exception as e:  # noqa: BLE001
                ok = False
                say(f"| {name} | {d} | {dname} | error | | | | FAIL: {type(e).__name__}: "
                    f"{str(e)[:300]!r} |")
                trace()
            ok_all = ok_all and ok
    say()
    return ok_all


def timeit(fn, args, max_repeats=10, max_seconds=2.0):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    t_end = time.perf_counter() + max_seconds
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


ROWS: list[tuple] = []
RESULTS: dict = {}


def row(shape, what, mode, make, need_s=20.0):
    """Time one variant; never raise. ``make()`` -> (jitted fn, args)."""
    B, T = shape[0], shape[1]
    if left() < need_s:
        ROWS.append((shape, what, mode, "skipped (time budget)", "", ""))
        say(f"  {shape} {what} {mode}: skipped (time budget)")
        return None
    try:
        fn, args = make()
        sec = timeit(fn, args)
        RESULTS[(shape, what, mode)] = sec
        ROWS.append((shape, what, mode, "ok", f"{sec * 1e3:.3f}", f"{B * T / sec / 1e6:.2f}"))
        say(f"  {shape} {what} {mode}: {sec * 1e3:.3f} ms")
        return sec
    except Exception as e:  # noqa: BLE001
        msg = f"error: {type(e).__name__}: {str(e)[:200]!r}"
        ROWS.append((shape, what, mode, msg, "", ""))
        say(f"  {shape} {what} {mode}: {msg}")
        trace()
        return None


def memory_rows(shape, level, impl, label, **kw):
    B, T, H, d = shape

    def mk(mode):
        def make():
            args = make_inputs(level, B, T, H, jnp.bfloat16)
            run = run_fn(level, impl, **kw)
            if mode == "fwd":
                return jax.jit(run), args
            return jax.jit(grads_fn(run, weighted=False)), args
        return make

    row(shape, label, "fwd+bwd", mk("fwd+bwd"))
    row(shape, label, "fwd", mk("fwd"))


def attention_rows(shape):
    B, T, H, d = shape

    def make_args():
        ks = jax.random.split(jax.random.key(0), 3)
        return tuple(jax.random.normal(kk, (B, T, H, d), jnp.bfloat16) for kk in ks)

    def attn(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation=impl)

    impl = "cudnn"
    try:
        jax.block_until_ready(jax.jit(attn("cudnn"))(*make_args()))
    except Exception as e:  # noqa: BLE001
        say(f"  cudnn attention unavailable ({type(e).__name__}); using the XLA implementation")
        impl = None
    label = f"dot_product_attention ({impl or 'xla'}, causal)"
    grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                              argnums=(0, 1, 2))
    row(shape, label, "fwd+bwd", lambda: (jax.jit(grad(attn(impl))), make_args()))
    row(shape, label, "fwd", lambda: (jax.jit(attn(impl)), make_args()))


def _bf16_qkv(d):
    """Shape-only q, k, v for ``pallas.plan_for`` (it reads head dims and dtype)."""
    x = jax.ShapeDtypeStruct((1, 1, 1, d), jnp.bfloat16)
    return x, x, x


def breakdown_rows(shape, level):
    """Where the kernel path's time goes, fwd and fwd+bwd: XLA prep alone, prep + transition
    (both XLA; their backward is autodiff), and the Pallas loop alone (its backward is the
    reverse kernel + the operand cotangents).  The rest of the whole path is the readout."""
    from nested_jax.kernels import affine, prep, statepass, vjp

    B, T, H, d = shape
    plan = pallas.plan_for(level, *_bf16_qkv(d), C, KERNEL_IMPL, "triton")
    fl = pallas.flags_for(level)
    lf = affine.loop_flags(fl)
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    run_prep = lambda *a: prep.prep(*a, fl, bf16, C)
    run_trans = lambda *a: affine.transition(run_prep(*a), fl, bf16, f32)
    f32_sum = lambda tree: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree))

    def prep_args():
        st, q, k, v, g = make_inputs(level, B, T, H, jnp.bfloat16)
        seq = lambda x: None if x is None else (
            jnp.moveaxis(x, 2, 1).reshape(B * H, T, *x.shape[3:]).astype(jnp.float32))
        ke = None if fl.ke_is_k else k  # as pallas._kernel_part: the kernels then read k
        return tuple(map(seq, (q, k, ke, v, g.eta, g.alpha, g.beta))), st

    def xla_part(fn, grad: bool):
        args, _ = prep_args()
        if not grad:
            return jax.jit(fn), args
        live = tuple(i for i, a in enumerate(args) if a is not None)
        return jax.jit(jax.grad(lambda *a: f32_sum(fn(*a)), argnums=live)), args

    def loop_part(grad: bool):
        args, st = prep_args()
        tr, _ = jax.jit(run_trans)(*args)
        ops = statepass.operands(tr, lf)
        loop = vjp._kernel_loop("triton", lf, bf16, plan.bv, plan.interpret, plan.num_warps,
                                plan.num_stages)
        w = st.params["W"].reshape(B * H, d, d)
        s = st.mom["W"].reshape(B * H, d, d)
        if not grad:
            return jax.jit(loop), (ops, w, s)
        return jax.jit(jax.grad(lambda *a: f32_sum(loop(*a)), argnums=(0, 1, 2))), (ops, w, s)

    for mode, grad in (("fwd", False), ("fwd+bwd", True)):
        row(shape, "  breakdown: XLA prep", mode, lambda g=grad: xla_part(run_prep, g))
        row(shape, "  breakdown: XLA prep + transition", mode,
            lambda g=grad: xla_part(run_trans, g))
        row(shape, "  breakdown: Pallas loop only", mode, lambda g=grad: loop_part(g))


def report_targets(s1, s2):
    hope = "kernel (hope)"
    say("## targets (issue 15)")
    say()
    k1 = RESULTS.get((s1, hope, "fwd+bwd"))
    x1 = RESULTS.get((s1, "XLA dual (hope)", "fwd+bwd"))
    k2 = RESULTS.get((s2, hope, "fwd+bwd"))
    fmt = lambda x: "n/a" if x is None else f"{x * 1e3:.3f} ms"
    say(f"- fwd+bwd at {s1} <= 4 ms (1.7x the best Triton delta-rule kernel's 2.31 ms): "
        f"{fmt(k1)} -> {'n/a' if k1 is None else ('MET' if k1 <= 4e-3 else 'NOT MET')}")
    if k1 and x1:
        say(f"- vs the XLA dual form at {s1}: {x1 / k1:.2f}x faster")
    attn = [v for (sh, w, m), v in RESULTS.items() if sh == s2 and m == "fwd+bwd"
            and w.startswith("dot_product_attention")]
    ref = attn[0] if attn else 14.6e-3
    say(f"- fwd+bwd at {s2} < flash attention fwd+bwd ("
        f"{f'measured here {attn[0] * 1e3:.3f} ms' if attn else 'anchor 14.6 ms'}): "
        f"{fmt(k2)} -> {'n/a' if k2 is None else ('MET' if k2 < ref else 'NOT MET')}")
    say()


def main():
    header()
    if jax.default_backend() != "gpu" and not SMOKE:
        say(f"WARNING: backend is {jax.default_backend()!r}, not 'gpu': kernel rows will fail.")
    ok = correctness()
    say(f"## (b) timings: bf16 q/k/v, f32 state and gates, C = {C} (median, ms; M tokens/s)")
    say()
    s1, s2, s3 = (8, 4096, 16, 64), (2, 16384, 16, 128), (1, 8192, 96, 128)
    d1, d2 = 64, 128
    if SMOKE:
        (s1, s2, s3), d1, d2 = ((1, 64, 2, 16), (1, 64, 1, 32), (1, 32, 2, 32)), 16, 32
    hope = LEVELS["hope (l2, momentum, DGD)"]
    for shape, d in ((s1, d1), (s2, d2), (s3, d2)):
        p = pallas.plan_for(hope(d), *_bf16_qkv(d), C, KERNEL_IMPL, "triton")
        say(f"- plan at {shape}: padded dk={p.dk} dv={p.dv}, block_dv={p.bv}, programs "
            f"{shape[0] * shape[2] * (p.dv // p.bv)} x {shape[1] // C} chunks; warps/stages "
            "default (kernels/triton.py: 4 warps up to 64x64 rows x dk, 2 stages at dk <= 64)")
    say()
    memory_rows(s1, hope(d1), KERNEL_IMPL, "kernel (hope)")
    attention_rows(s1)
    memory_rows(s2, hope(d2), KERNEL_IMPL, "kernel (hope)")
    attention_rows(s2)
    memory_rows(s3, hope(d2), KERNEL_IMPL, "kernel (hope)")
    attention_rows(s3)
    memory_rows(s1, hope(d1), "xla", "XLA dual (hope)")
    breakdown_rows(s1, hope(d1))
    grad_row = lambda shape, level, label, **kw: row(shape, label, "fwd+bwd", lambda: (
        jax.jit(grads_fn(run_fn(level, KERNEL_IMPL, **kw), weighted=False)),
        make_inputs(level, *shape[:3], jnp.bfloat16)))
    grad_row(s1, LEVELS["titans (dot, momentum)"](d1), "kernel (titans)")
    # The loop no longer constrains C: fewer, larger chunks shorten the sequential loop and
    # move work into the parallel [C, C] maths.
    for cs in (32, 128):
        grad_row(s1, hope(d1), f"kernel (hope) C={cs}", chunk_size=cs // (4 if SMOKE else 1))
        grad_row(s2, hope(d2), f"kernel (hope) C={cs}", chunk_size=cs // (4 if SMOKE else 1))
    # Defaults: d = 64 block_dv=64 4 warps 2 stages; d = 128 block_dv=32 4 warps 1 stage.
    for shape, d, tiles in ((s1, d1, ((64, 8, 1), (32, 4, 2))),
                            (s2, d2, ((64, 8, 1), (16, 4, 1)))):
        for bv, warps, stages in tiles:
            if bv <= d:
                grad_row(shape, hope(d), f"kernel (hope) block_dv={bv} num_warps={warps} "
                         f"num_stages={stages}", block_dv=bv, num_warps=warps,
                         num_stages=stages)
    memory_rows(s2, hope(d2), "xla", "XLA dual (hope)")
    say()
    say("| shape (B, T, H, d) | variant | pass | status | ms | M tokens/s |")
    say("|---|---|---|---|---|---|")
    for shape, what, mode, status, ms, tps in ROWS:
        say(f"| {shape} | {what} | {mode} | {status} | {ms} | {tps} |")
    say()
    report_targets(s1, s2)
    say(f"correctness: {'ALL PASS' if ok else 'FAILURES (see table (a))'}; "
        f"kernels {time.time() - START:.0f} s")
    if os.environ.get("OUT"):
        print(f"wrote {os.path.join(os.environ['OUT'], 'bench_kernels_gpu.md')}")
    model_table()


def model_table():
    """(c): the model table, in its own report file; never lets an error end the script."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gpu_models
    except Exception:  # noqa: BLE001
        print("experiments/gpu_models.py could not be imported:", file=sys.stderr)
        trace()
        return
    budget = float(os.environ.get("GPU_MODELS_BUDGET_S", "220"))
    try:
        gpu_models.main_for_gpu_check(budget, SMOKE)
    except Exception:  # noqa: BLE001
        trace()


if __name__ == "__main__":
    main()

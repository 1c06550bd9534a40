"""Steps to a tolerance on the paper's toy landscape (Fig. 4), over a learning-rate grid.

    python experiments/bench_optim_landscape.py

    psi(r, theta) = r^2 + k (r - theta + a sin(w r))^2

a wiggly valley ``theta = r + a sin(w r)`` with steep walls (``k``) and its
minimum at the origin. The paper gives the form, not the constants; we take
``k = 20, a = 0.5, w = 4`` (so the valley's slope ``1 + a w cos(w r)`` swings
between -1 and 3: momentum built up along one stretch points into the wall at
the next). Each optimizer starts from 8 points around the valley and runs up
to ``--steps`` steps in float64; a run counts its first step with
``psi < tol`` for two tolerances, 1e-2 (the valley is traversed) and 1e-6
(converged); diverged or not reached: no count. All optimizers use
``alpha = 0.9``. Reported: the median over starts of the steps to tolerance,
per learning rate; the best learning rate of each optimizer; a PNG with the
curves and the trajectories at the best learning rates. Writes
``experiments/results/bench_optim_landscape.{md,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nested_jax.optim as no  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
K, A, W = 20.0, 0.5, 4.0

METHODS = {
    "gd": lambda lr: optax.sgd(lr),
    "momentum (alpha=0.9)": lambda lr: no.momentum_memory(lr, 0.9),
    "delta neurips (beta=0.01)": lambda lr: no.delta_momentum(lr, 0.9, 0.01),
    "delta neurips (beta=0.1)": lambda lr: no.delta_momentum(lr, 0.9, 0.1),
    "delta neurips (beta=1)": lambda lr: no.delta_momentum(lr, 0.9, 1.0),
    "delta arxiv (beta=0.1)": lambda lr: no.delta_momentum(lr, 0.9, 0.1, form="arxiv"),
    "DMGD (H=16, eta_mlp=0.01)": lambda lr: no.deep_momentum(lr, 0.9, 0.01, hidden=16),
    "DMGD (H=16, eta_mlp=0.1)": lambda lr: no.deep_momentum(lr, 0.9, 0.1, hidden=16),
}
TOLS = (1e-2, 1e-6)  # leaving the wiggly valley / converging


def psi(p):
    r, theta = p[0], p[1]
    return r**2 + K * (r - theta + A * jnp.sin(W * r)) ** 2


def starts():
    return jnp.array(
        [[r0, r0 + A * np.sin(W * r0) + dt] for r0 in (-3.0, -2.0, 2.0, 3.0) for dt in (-1.0, 1.0)]
    )


def trajectories(make, lrs, p0s, steps):
    """psi along the run for every (learning rate, start): [n_lr, n_start, steps + 1]."""

    def one(lr, p0):
        opt = make(lr)

        def body(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(psi)(p), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), (psi(p), p)

        _, (losses, path) = jax.lax.scan(body, (p0, opt.init(p0)), None, length=steps)
        return jnp.concatenate([psi(p0)[None], losses]), jnp.concatenate([p0[None], path])

    return jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))(lrs, p0s)


def steps_to_tol(losses, tol):
    """First step with psi < tol (the loss must stay finite up to there); inf if none."""
    ok = np.isfinite(losses) & (losses < tol)
    first = np.where(ok.any(-1), ok.argmax(-1), np.inf).astype(float)
    return first


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lrs", type=int, default=13, help="grid size, log-spaced in [1e-4, 1e-1]")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()

    lrs = jnp.logspace(-4, -1, args.lrs)
    p0s = starts()
    table, paths = {tol: {} for tol in TOLS}, {}
    for name, make in METHODS.items():
        losses, path = trajectories(make, lrs, p0s, args.steps)
        for tol in TOLS:
            table[tol][name] = steps_to_tol(np.asarray(losses), tol)  # [n_lr, n_start]
        paths[name] = np.asarray(path)
        best = [np.min(np.median(table[tol][name], axis=1)) for tol in TOLS]
        print(f"{name:32s} best median steps " + "  ".join(f"{b:6.0f}" for b in best), flush=True)

    med = {tol: {n: np.median(t, axis=1) for n, t in table[tol].items()} for tol in TOLS}
    best_i = {tol: {n: int(np.argmin(m)) for n, m in med[tol].items()} for tol in TOLS}
    fmt = lambda x: "-" if not np.isfinite(x) else f"{int(x)}"

    lines = [
        "# Toy landscape of the paper (Fig. 4): steps to tolerance",
        "",
        f"Command: `python experiments/bench_optim_landscape.py --steps {args.steps}"
        f" --lrs {args.lrs}`",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, backend"
        f" {jax.default_backend()}; float64",
        f"- versions: python {platform.python_version()}, jax {jax.__version__},"
        f" optax {optax.__version__}",
        f"- landscape: psi(r, theta) = r^2 + k (r - theta + a sin(w r))^2, k = {K:g}, a = {A:g},"
        f" w = {W:g}; minimum psi = 0 at the origin",
        f"- {len(p0s)} starts (r0 in -3, -2, 2, 3; theta0 one unit off the valley on either"
        f" side), {args.steps} steps, learning rates log-spaced in [1e-4, 1e-1]; all momenta"
        " alpha = 0.9; cells are the median over starts of the first step with psi < tol"
        " (`-`: fewer than half the starts got there)",
        "",
        "## Best learning rate of each optimizer",
        "",
        "Each optimizer at its own best learning rate; `x mom.`: its median steps over"
        " momentum's (< 1: faster than momentum).",
        "",
        "| optimizer | "
        + " | ".join(f"tol {t:g}: best lr, median steps, solved, x mom." for t in TOLS)
        + " |",
        "|---|" + "---:|" * len(TOLS),
    ]
    ref = "momentum (alpha=0.9)"
    for n in METHODS:
        cells = []
        for tol in TOLS:
            i = best_i[tol][n]
            solved = int(np.isfinite(table[tol][n][i]).sum())
            rel = med[tol][n][i] / med[tol][ref][best_i[tol][ref]]
            rel = f"{rel:.2f}" if np.isfinite(rel) else "-"
            steps = fmt(med[tol][n][i])
            cells.append(f"{float(lrs[i]):.1e}, {steps}, {solved}/{len(p0s)}, {rel}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for tol in TOLS:
        lines += [
            "",
            f"## Median steps to psi < {tol:g}, per learning rate",
            "",
            "| lr | " + " | ".join(METHODS) + " |",
            "|---:|" + "---:|" * len(METHODS),
        ]
        for i, lr in enumerate(np.asarray(lrs)):
            lines.append(f"| {lr:.1e} | " + " | ".join(fmt(med[tol][n][i]) for n in METHODS) + " |")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "bench_optim_landscape.png")
    try:
        plot(png, np.asarray(lrs), med, paths, best_i)
        lines += ["", "![steps and trajectories](bench_optim_landscape.png)"]
    except ImportError:
        lines += ["", "(matplotlib missing: no plot)"]
    md = os.path.join(args.out, "bench_optim_landscape.md")
    with open(md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", md)


def plot(png, lrs, med_by_tol, paths, best_by_tol):
    med, best_i = med_by_tol[TOLS[-1]], best_by_tol[TOLS[0]]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for n, m in med.items():
        ax1.plot(lrs, np.where(np.isfinite(m), m, np.nan), marker="o", label=n)
    ax1.set_xscale("log")
    if any(np.isfinite(m).any() for m in med.values()):
        ax1.set_yscale("log")
    ax1.set_xlabel("learning rate")
    ax1.set_ylabel(f"median steps to psi < {TOLS[-1]:g}")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)

    r = np.linspace(-3.5, 3.5, 300)
    t = np.linspace(-4.5, 4.5, 300)
    rr, tt = np.meshgrid(r, t)
    zz = rr**2 + K * (rr - tt + A * np.sin(W * rr)) ** 2
    ax2.contour(rr, tt, np.log10(zz + 1e-3), levels=25, cmap="Greys", linewidths=0.5)
    shown = ("momentum (alpha=0.9)", "delta neurips (beta=0.01)", "DMGD (H=16, eta_mlp=0.01)", "gd")
    for n in shown:
        p = paths[n][best_i[n], 1, :400]  # start (-3, one unit above the valley)
        ax2.plot(p[:, 0], p[:, 1], lw=1, label=n)
    ax2.set_xlim(-3.5, 3.5)
    ax2.set_ylim(-4.5, 4.5)
    ax2.plot([0], [0], "k*", ms=10)
    ax2.set_xlabel("r")
    ax2.set_ylabel("theta")
    ax2.set_title(f"first 400 steps, best lr for psi < {TOLS[0]:g}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()

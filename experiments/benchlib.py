"""Shared benchmark plumbing: timing, machine/version header, markdown tables.

Benchmarks are scripts, never tests: they print a table and write it under
experiments/results/ with the machine, library versions and date, so ratios measured side by
side in one run can be quoted.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax


def timeit(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn(*args)`` after warm-up (compilation), blocking on results."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_header() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    versions = {"jax": jax.__version__}
    for name in ("jaxlib", "flax", "optax"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    vs = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
        f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
        f"backend {jax.default_backend()}, device {kind} x{jax.device_count()}\n"
        f"- python {platform.python_version()}, {vs}\n"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_result(path: str, title: str, body: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{machine_header()}\n{body}\n")
    print(f"wrote {path}")


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure (a results PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")

"""What the user sees: metrics JSONL, TensorBoard events, the loss-curve PNG, MFU.

Records are `{"step": s, "name": value, ...}` lines in `WORKDIR/metrics.jsonl` and the
same scalars in `WORKDIR/tensorboard/` (tensorboardX). A resumed run first drops the
records past its checkpoint, so the files read as one uninterrupted run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import jax
from etils import epath

from nested_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of one device, by `device.device_kind` substring (first match wins).
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
    ("H200", 989e12), ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L4", 121e12),
)


def peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
    """One device's peak FLOP/s (None where unknown, e.g. CPUs)."""
    if override > 0:
        return override
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS if k in kind), None)


def flops_per_token(model: Any, n_params: int, seq_len: int) -> float:
    """The model's `flops_per_token(seq_len)` where it has one, else 6 N."""
    fn = getattr(model, "flops_per_token", None)
    return float(fn(seq_len)) if fn is not None else 6.0 * n_params


def read_records(path: epath.Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file.  A line that does not parse (the torn last append
    of a run killed mid-write) is skipped with a warning: it must not stop the resume."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not a whole record (a run killed while writing it?); "
                        "skipped", path, n)
    return out


class MetricsLog:
    """JSONL + TensorBoard writer (a no-op on non-primary processes).

    Local files are appended to; object stores (gs://), which cannot append, get the
    whole file rewritten at most once a minute and at close.
    """

    def __init__(self, workdir: epath.Path, *, resume_step: int | None, enabled: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._remote = "://" in str(workdir)
        self._lines: list[str] = []
        self._flushed = time.time()
        if not enabled:
            return
        if resume_step is not None:
            keep = [r for r in read_records(self.path) if r["step"] < resume_step
                    or (r["step"] == resume_step and not any(k.startswith("eval/") for k in r))]
            self._lines = [json.dumps(r) + "\n" for r in keep]
            workdir_lib.write_whole(self.path, "".join(self._lines))
        try:
            from tensorboardX import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)
        except ImportError:
            self._tb = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        line = json.dumps({"step": step, **clean}) + "\n"
        self._lines.append(line)
        if not self._remote:
            with open(self.path, "a") as f:
                f.write(line)
        elif time.time() - self._flushed > 60:
            self.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        if self.enabled and self._remote:
            workdir_lib.write_whole(self.path, "".join(self._lines))
            self._flushed = time.time()

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def plot_loss_curve(jsonl: epath.Path, png: epath.Path) -> epath.Path | None:
    """Train loss (and held-out loss) against step, saved as a PNG (matplotlib, Agg)."""
    records = read_records(jsonl)
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    held = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    if not train and not held:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    png.write_bytes(buf.getvalue())
    return png

"""experiments/gpu_models.py: the HopeLM / Transformer++ table of the one-shot GPU session.

The session gets one try, so its code runs here first: the profile's HLO parsing and
categories (fast), and the whole table on CPU in smoke mode with a small budget (slow: a HopeLM
train step compiles for ~30-60 s on one core).
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from experiments import gpu_models
from nested_jax.models.hope import SCOPE_CMS
from nested_jax.models.self_modifying import SCOPE_COUPLED, SCOPE_MEMORY


def test_hlo_ops_are_categorised_by_their_named_scope():
    def f(x):
        with jax.named_scope(SCOPE_COUPLED):
            a = jnp.sin(x @ x)
        with jax.named_scope(SCOPE_MEMORY):
            b = jnp.cos(a @ x)
        with jax.named_scope(SCOPE_CMS):
            c = jnp.tanh(b @ a)
        return jnp.sum(c * x)

    text = jax.jit(jax.grad(f)).lower(jnp.ones((32, 32))).compile().as_text()
    ops = gpu_models.hlo_ops(text)
    cats = {gpu_models.category(op) for op in ops.values() if op[0] not in ("parameter", "")}
    assert {gpu_models.CATEGORIES[0], gpu_models.CATEGORIES[2], "CMS"} <= cats, cats
    assert gpu_models.category(None) == "unmapped"
    # a Pallas kernel is a Triton / Mosaic custom call inside the output memory's scope
    kernel = ("custom-call", f"jit(step)/transpose(jvp({SCOPE_MEMORY}))/pallas_call",
              "__gpu$xla.gpu.triton")
    assert gpu_models.category(kernel) == "M_memory: Pallas kernel"
    # "cms" must be a whole name-stack component, not a substring
    assert gpu_models.category(("fusion", "jit(step)/xcmsy/add", "")) == gpu_models.REST


def test_verdicts_follow_the_targets():
    assert gpu_models.verdict_of(1.0, 8192) == "MET"
    assert gpu_models.verdict_of(0.99, 8192) == "NOT MET"
    assert gpu_models.verdict_of(1.5, 32768) == "NOT MET"  # strictly above 1.5
    assert gpu_models.verdict_of(1.6, 32768) == "MET"
    assert gpu_models.verdict_of(0.1, 2048) == "no target"
    assert gpu_models.verdict_of(math.nan, 8192) == "n/a"


@pytest.mark.slow
def test_smoke_table_times_both_models():
    lines: list[str] = []
    # 60 s: the first group's two rows always start (nothing to estimate from), later rows
    # are skipped by the budget, which is what is checked besides the rows.
    gpu_models.model_table(lines.append, budget_s=60.0, smoke=True)
    text = "\n".join(lines)
    assert "Model table stopped" not in text, text
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| Transformer++ |") or line.startswith("| HopeLM |"):
            rows.setdefault(cells[0], []).append(cells)
    for model in ("Transformer++", "HopeLM"):
        first = rows[model][0]  # T = 64
        assert first[-1] == "ok", first
        tok_s = float(first[5].replace(",", ""))
        assert math.isfinite(tok_s) and tok_s > 0, first
    assert re.search(r"HopeLM / Transformer\+\+ tokens/s = \d", text), text
    assert "skipped: time budget" in text, text
    assert "### Summary" in text, text

"""The kernels lower for real GPUs (Triton) and TPUs (Mosaic) from this CPU-only machine.

``jit(...).trace(...).lower(lowering_platforms=...)`` runs the Pallas Triton and Mosaic
lowerings (every primitive in the kernels must have a rule there, every BlockSpec must pass
Pallas' checks) without a device.  Compilation by Triton / libtpu is not covered: that is
``experiments/gpu_check.py`` on the GPU box.  Forward and backward, fp32 and bf16, at a
benchmark head size.
"""

import jax
import jax.numpy as jnp
import pytest

from nested_jax import memory as nm
from tests.kernels.helpers import linear_memory, outer_loss

PLATFORM = {"triton": "cuda", "mosaic": "tpu"}


def _lower(kernel, level, dtype, B=1, T=128, H=2, C=64):
    dk, dv = level.memory.dk, level.memory.dv
    S = jax.ShapeDtypeStruct
    st = nm.MemoryState({"W": S((B, H, dv, dk), jnp.float32)},
                        {"W": S((B, H, dv, dk), jnp.float32)})
    x = lambda d: S((B, T, H, d), dtype)
    g = nm.Gates(*(S((B, T, H), jnp.float32),) * 3)
    run = lambda *a: linear_memory(level, *a, chunk_size=C, impl="pallas", kernel=kernel)
    grad = jax.grad(outer_loss(run), argnums=(0, 1, 2, 3, 4))
    return jax.jit(grad).trace(st, x(dk), x(dk), x(dv), g).lower(
        lowering_platforms=(PLATFORM[kernel],)).as_text()


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_lowers(kernel, dtype):
    level = nm.Level(nm.LinearMemory(64, 64), "l2", nm.DGD)
    text = _lower(kernel, level, dtype)
    marker = "triton" if kernel == "triton" else "tpu_custom_call"
    assert text.count(marker) >= 2  # forward and backward kernels


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
def test_lowers_titans_dot_untiled_dims(kernel):
    level = nm.Level(nm.LinearMemory(40, 24), "dot", nm.TITANS)
    assert _lower(kernel, level, jnp.bfloat16, T=100)

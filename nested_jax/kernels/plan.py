"""Decide, before any tracing, which implementation runs a call and with which tiles.

``impl``:
  "auto"       the kernel of the current backend (Triton on GPU, Mosaic on TPU) when the level
               and shapes are supported, else the XLA dual form; never an error for support.
  "pallas"     the kernel, or a ValueError that says why not and what to change.
  "interpret"  the kernel run by the Pallas interpreter (CPU tests); ``kernel`` picks which
               variant's code is interpreted (default Mosaic, run in TPU interpret mode).
  "xla"        ``nested_jax.memory.apply(path="dual")``: differentiable any number of times.
  "scan"       the kernels' algorithm in plain XLA on any backend: the parallel prep and
               transition, the state-passing loop as ``lax.scan`` (``statepass.scan``), the
               parallel readout; plain autodiff.  Any chunk size, head dims and float dtype.

Which levels a kernel can run is the engine's to say (``nested_jax/memory/pallas.py`` passes
its reason as ``level_unsupported``); this module only knows kernels, chunk sizes and dtypes.
Chunk size: any (the kernels' loop sees only [dk, dk] and [bv, dk] tiles; the chunks' own
[C, .] maths is XLA).  Head dims are free: Triton pads dk and dv with zeros to powers of two
>= 16 (its dots need dims >= 16; zero key columns and zero memory rows never mix into the
rest), Mosaic uses full-dim blocks with dv tiles of whole sublanes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "interpret", "xla", "scan")
KERNELS = ("auto", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class Plan:
    kernel: str  # "triton" | "mosaic" | "scan" | "xla"
    interpret: bool = False
    dk: int = 0  # padded head dims the kernel sees
    dv: int = 0
    bv: int = 0  # rows of W per program (dv tile)
    num_warps: int | None = None  # Triton only; None = triton.py's heuristic
    num_stages: int | None = None  # Triton only; None = triton.py's heuristic
    reason: str = ""  # why "xla" was chosen


def _pow2_at_least(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


_TARGET = contextvars.ContextVar("nested_jax_kernel_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Plan kernels for ``platform`` ("tpu", "gpu") instead of the default backend: ahead-of-time
    compilation for devices this process does not drive (``nested-jax compile``)."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _platform() -> str:
    return _TARGET.get() or jax.default_backend()


def _default_kernel() -> str:
    return {"gpu": "triton", "cuda": "triton", "rocm": "triton",
            "tpu": "mosaic"}.get(_platform(), "")


def unsupported(kernel: str, chunk_size: int, dtype, level_unsupported: str = "") -> str:
    """Why ``kernel`` cannot run this call ('' if it can); ``level_unsupported`` is the
    engine's reason, if any, that no kernel runs the level at all."""
    if level_unsupported:
        return level_unsupported
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64):
        return f"dtype {jnp.dtype(dtype)} is not supported by the kernels; use impl='xla'"
    return ""


def make_plan(dk: int, dv: int, chunk_size: int, dtype, impl: str = "auto",
              kernel: str = "auto", block_dv: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None, *,
              level_unsupported: str = "") -> Plan:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; use one of {IMPLS}.")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; use one of {KERNELS}.")
    if impl == "xla":
        return Plan("xla", reason="impl='xla'")
    if impl == "scan":
        why = unsupported("scan", chunk_size, dtype, level_unsupported)
        if why:
            raise ValueError(why + ".")
        return Plan("scan", dk=dk, dv=dv, bv=dv)
    if kernel == "auto":
        kernel = _default_kernel() or ("mosaic" if impl == "interpret" else "")
    if not kernel:
        if impl == "pallas":
            raise ValueError(f"impl='pallas' needs a GPU or TPU backend, got "
                             f"{_platform()!r}; use impl='interpret' or 'xla'.")
        return Plan("xla", reason=f"no kernel for backend {_platform()!r}")
    why = unsupported(kernel, chunk_size, dtype, level_unsupported)
    if not why and impl == "pallas" and jnp.dtype(dtype) == jnp.float64:
        why = "float64 kernels run in interpret mode only; use impl='interpret' or 'xla'"
    if why:
        if impl == "auto":
            return Plan("xla", reason=why)
        raise ValueError(why + ".")
    if kernel == "triton":
        dkp, dvp = _pow2_at_least(dk, 16), _pow2_at_least(dv, 16)
        # One program per (sequence, head, bv rows of W and S): whole rows at d <= 64,
        # 32-row tiles at d = 128 to keep the f32 state within registers, and to have
        # ~4 programs per (sequence, head) to fill the GPU when B * H is small.  32-bit
        # operands also take 32-row tiles at d = 64: their [dk, dk] operand tiles are twice
        # the bytes, double-buffered in shared memory.
        wide = dkp <= 64 and jnp.dtype(dtype).itemsize <= 2
        bv = block_dv or min(dvp, 64 if wide else 32)
    else:
        dkp, dvp = dk, dv
        bv = block_dv or dv
    if dvp % bv or (kernel == "triton" and (bv < 16 or bv & (bv - 1))):
        raise ValueError(f"block_dv={bv} must divide the (padded) dv={dvp}"
                         + (" and be a power of two >= 16." if kernel == "triton" else "."))
    if kernel == "mosaic" and bv != dvp and (bv % 8):
        raise ValueError(f"block_dv={bv} must be dv={dvp} or a multiple of 8 (Mosaic tiling: "
                         "a dv tile is whole sublanes).")
    if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps={num_warps} must be a power of two (Triton).")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1 (Triton).")
    triton = kernel == "triton"
    return Plan(kernel, interpret=impl == "interpret", dk=dkp, dv=dvp, bv=bv,
                num_warps=num_warps if triton else None,
                num_stages=num_stages if triton else None)

"""Ahead-of-time compile for a TPU topology, on any machine (`nested-jax compile`).

libtpu describes a topology without the hardware (``jax.experimental.topologies``, the approach
of MaxText's train_compile), so the exact train step (model, optimizer, guard, shardings,
donation), the eval step and one decode step are lowered and compiled *for* those chips here,
Mosaic kernels included, and XLA reports what each chip would hold and compute.  Needs libtpu
matching jax: ``pip install "jax[tpu]==<jax version>"`` (the ``tpu`` extra).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax.config_checks import fail
from nested_jax.train import sharding, trainer
from nested_jax.train.config import TrainConfig, with_values
from nested_jax.train.metrics import flops_per_token, peak_flops

STEPS = ("train", "eval", "decode")
# Chips of a slice name -> its topology: 2-D tori for v5e / v6e, 3-D for v4 / v5p (whose slice
# names count TensorCores, two per chip).
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"}
# device_kind prefix -> (HBM bytes per chip, HBM bytes/s), public chip specifications.
_MEMORY = (("TPU v6 lite", 32 * 2**30, 1640e9), ("TPU v5 lite", 16 * 2**30, 819e9),
           ("TPU v5", 95 * 2**30, 2765e9), ("TPU v4", 32 * 2**30, 1228e9))


def topology_name(spec: str) -> str:
    """"v5e:4x4" as is; a slice name such as "v5e-16" or "v5p-32" -> its topology."""
    if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", spec):
        return spec
    m = re.fullmatch(r"(v5e|v6e|v5litepod|v4|v5p)-(\d+)", spec)
    if m:
        gen, n = m.group(1), int(m.group(2))
        if gen in ("v5e", "v6e", "v5litepod") and n in _GRID_2D:
            return f"{'v5e' if gen == 'v5litepod' else gen}:{_GRID_2D[n]}"
        if gen in ("v4", "v5p") and n % 2 == 0 and n // 2 in _GRID_3D:
            return f"{gen}:{_GRID_3D[n // 2]}"
    raise ValueError(f"--topology={spec!r} is not a topology: use GEN:AxB[xC] (e.g. v5e:4x4, "
                     "v5p:2x2x4) or a slice name (v5e-16, v6e-8, v5p-32; v4/v5p names count "
                     "TensorCores, two per chip)")


def check_libtpu() -> str:
    """libtpu's version; a clear error when it is missing (its version pairs with jax's)."""
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"compiling for TPU needs libtpu matching jax {jax.__version__}: "
                          f"pip install \"jax[tpu]=={jax.__version__}\" (the nested-jax[tpu] "
                          "extra)") from None


def topology_devices(spec: str, num_slices: int = 1) -> list:
    """The devices of a TPU topology (no hardware needed), slice_index set when multislice."""
    name = topology_name(spec)
    check_libtpu()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: no metadata server
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            num_slices=num_slices)
    except Exception as e:  # libtpu's own message says what it did not accept
        raise ValueError(f"--topology={spec!r} ({name}): libtpu refused it: {e}") from e
    return list(topo.devices)


@dataclasses.dataclass
class StepReport:
    """One compiled step, per chip (XLA's memory and cost analyses of the SPMD program)."""

    step: str
    compiled: bool
    seconds: float
    error: str = ""
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0

    @property
    def total_bytes(self) -> int:
        """Peak bytes live on a chip: arguments + outputs + temporaries - donated aliases."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


@dataclasses.dataclass
class CompileReport:
    topology: str
    num_slices: int
    chips: int
    device_kind: str
    hbm_bytes: int | None
    hbm_bandwidth: float | None
    peak_flops: float | None
    model: str
    preset: str
    n_params: int
    mesh: dict
    tokens_per_step: int
    model_flops_per_step: float  # 6 N (or the model's count) per token, all chips
    steps: list[StepReport]
    microbatches: int = 1  # the train step scans this many microbatches (optim.grad_accum)

    def fits(self, r: StepReport) -> bool | None:
        return None if self.hbm_bytes is None or not r.compiled else (
            r.total_bytes <= self.hbm_bytes)

    def train_counts(self) -> tuple[float, float] | None:
        """XLA's FLOPs and bytes per chip for the whole train step.  XLA's cost analysis
        counts a loop body once, so the microbatch scan's body is counted grad_accum times
        here (the optimizer update outside it is small beside it)."""
        r = next((s for s in self.steps if s.step == "train" and s.compiled), None)
        if r is None or r.flops <= 0:
            return None
        return r.flops * self.microbatches, r.bytes_accessed * self.microbatches

    def mfu_ceiling(self) -> float | None:
        """Model FLOPs / (peak x the train step's roofline time per chip): the MFU the step
        cannot exceed, whichever bound (XLA's FLOPs at peak, or its bytes at HBM bandwidth)
        binds.  None where it cannot be trusted: XLA's FLOPs below the model's mean XLA
        missed work (a loop inside the model, e.g. a chunk scan, counted once; Pallas
        kernels, which it does not count), so the bound would be too loose to mean anything."""
        counts = self.train_counts()
        if counts is None or not (self.peak_flops and self.hbm_bandwidth):
            return None
        flops, bytes_ = counts
        model_per_chip = self.model_flops_per_step / self.chips
        if flops < model_per_chip:
            return None
        t = max(flops / self.peak_flops, bytes_ / self.hbm_bandwidth)
        return model_per_chip / (self.peak_flops * t)

    def text(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
        hbm = gib(self.hbm_bytes) if self.hbm_bytes else "unknown"
        lines = [f"{self.model}/{self.preset} ({self.n_params / 1e6:.1f}M parameters) on "
                 f"{self.topology} x {self.num_slices} slice(s): {self.chips} chips "
                 f"({self.device_kind}, HBM {hbm} each), mesh {self.mesh}, "
                 f"{self.tokens_per_step} tokens/step"]
        for r in self.steps:
            if not r.compiled:
                lines.append(f"  {r.step}: FAILED to compile ({r.seconds:.0f} s): {r.error}")
                continue
            fit = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[self.fits(r)]
            lines.append(
                f"  {r.step}: compiled in {r.seconds:.0f} s; per chip: arguments "
                f"{gib(r.argument_bytes)}, temporaries {gib(r.temp_bytes)}, outputs "
                f"{gib(r.output_bytes)} (donated {gib(r.alias_bytes)}), total "
                f"{gib(r.total_bytes)} of {hbm}: {fit}; XLA {r.flops / 1e9:.3g} GFLOP")
        mfu, counts = self.mfu_ceiling(), self.train_counts()
        if mfu is not None:
            ceiling = f"{100 * mfu:.1f}%"
        elif counts is None or not (self.peak_flops and self.hbm_bandwidth):
            ceiling = "unknown (no train step or unknown chip)"
        else:
            ceiling = (f"unknown: XLA counts {counts[0] / 1e9:.4g} GFLOP per chip for the train "
                       f"step, below the model's {self.model_flops_per_step / self.chips / 1e9:.4g}"
                       " (it counts a loop body once and leaves Pallas kernels out)")
        lines.append(f"  model FLOPs/step {self.model_flops_per_step / 1e9:.4g} GFLOP (all "
                     f"chips); MFU ceiling {ceiling}")
        return "\n".join(lines)


def _chip(kind: str) -> tuple[int | None, float | None]:
    return next(((m, bw) for k, m, bw in _MEMORY if kind.startswith(k)), (None, None))


def _compile_cfg(cfg: TrainConfig) -> TrainConfig:
    """A tokenizer that is trained on the data at run start is replaced by the byte tokenizer
    with the same vocabulary size: only the size shapes the program."""
    spec = cfg.data.tokenizer
    if not spec.startswith("sentencepiece-train:"):
        return cfg
    vocab = int(spec.split(":", 1)[1])
    pairs = [("data.tokenizer", "byte")]
    if "vocab_size" not in cfg.model_overrides:
        pairs.append(("model.vocab_size", vocab))
    return with_values(cfg, pairs)


def _analyse(step: str, lower) -> StepReport:
    t0 = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:  # the report says which step failed and why; others still run
        return StepReport(step, False, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return StepReport(step, True, seconds, "", int(mem.argument_size_in_bytes),
                      int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes),
                      int(mem.alias_size_in_bytes), float(cost.get("flops", 0.0)),
                      float(cost.get("bytes accessed", 0.0)))


def _batch_struct(cfg: TrainConfig, shape: tuple[int, ...], sharding_: Any):
    """The batch the step will get: int32 tokens, or with data.pack_documents the packed
    {"tokens", "segment_ids"} (document masks and resets are part of the compiled step)."""
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding_)
    return {"tokens": tokens, "segment_ids": tokens} if cfg.data.pack_documents else tokens


def compile_for(cfg: TrainConfig, topology: str, num_slices: int = 1,
                steps: tuple[str, ...] = STEPS) -> CompileReport:
    """Compile the chosen steps of ``cfg`` for a TPU topology; errors name the bad option."""
    if num_slices < 1:
        fail("--num-slices", num_slices, "must be >= 1")
    bad = [s for s in steps if s not in STEPS]
    if bad:
        fail("--steps", bad, f"unknown; choose from {STEPS}")
    devices = topology_devices(topology, num_slices)
    cfg = _compile_cfg(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run = trainer.prepare(cfg, tmp, devices, for_training=False)
    trainer.check_batch(cfg, run.mesh)
    micro = cfg.data.batch_size // cfg.optim.grad_accum
    T1 = cfg.data.seq_len + 1
    params, rest = run.abstract_state["params"], run.abstract_state["rest"]
    lowerings = {
        "train": lambda: trainer.train_jit(run).lower(
            run.abstract_state,
            _batch_struct(cfg, (cfg.optim.grad_accum, micro, T1), run.batch_sharding)),
        "eval": lambda: trainer.eval_jit(run).lower(
            params, rest, _batch_struct(cfg, (micro, T1), run.eval_sharding)),
        "decode": lambda: _decode_lowering(run, params, rest, micro),
    }
    from nested_jax.kernels import target_platform  # kernels plan for the target chips

    with target_platform(devices[0].platform), sharding.mesh_context(run.mesh):
        reports = [_analyse(s, lowerings[s]) for s in steps]
    kind = devices[0].device_kind
    hbm, bw = _chip(kind)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return CompileReport(
        topology=topology_name(topology), num_slices=num_slices, chips=len(devices),
        device_kind=kind, hbm_bytes=hbm, hbm_bandwidth=bw, peak_flops=peak_flops(devices[0]),
        model=cfg.model, preset=cfg.preset, n_params=run.n_params, mesh=dict(run.mesh.shape),
        tokens_per_step=tokens, microbatches=cfg.optim.grad_accum,
        model_flops_per_step=flops_per_token(run.abstract_model, run.n_params,
                                             cfg.data.seq_len) * tokens,
        steps=reports)


def _decode_lowering(run, params, rest, batch: int):
    """One token of ``decode_step`` for ``batch`` sequences, the cache sharded like the batch."""
    graphdef = run.graphdef

    def init(b):
        return jax.eval_shape(lambda p, r: nnx.merge(graphdef, p, r).init_state(b), params, rest)

    cache = init(batch)
    batch_spec = run.eval_sharding.spec[0]
    # Each leaf's batch axis is the one that grows with the batch: stacked caches put the layer
    # axis first ([L, B, S, G, K] KV caches), so "axis 0 has size B" would replicate them.
    batch_axes = jax.tree.map(_grown_axis, cache, init(2 * batch))

    def cache_sharding(x, axis):
        spec = [None] * x.ndim
        if axis is not None:
            spec[axis] = batch_spec
        return jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(*spec))

    cache = jax.tree.map(lambda x, a: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=cache_sharding(x, a)),
                         cache, batch_axes)
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=jax.sharding.NamedSharding(
        run.mesh, jax.sharding.PartitionSpec(batch_spec)))

    def advance(params, rest, cache, token_B):
        return nnx.merge(graphdef, params, rest).decode_step(cache, token_B)

    return jax.jit(advance, donate_argnums=2).lower(params, rest, cache, token)


def _grown_axis(small, large) -> int | None:
    """The one axis where ``large`` (the state at 2B) differs from ``small`` (at B), or None
    for a leaf without a batch axis (a position counter)."""
    grown = [i for i, (a, b) in enumerate(zip(small.shape, large.shape, strict=True)) if a != b]
    return grown[0] if len(grown) == 1 else None


def as_record(report: CompileReport) -> dict[str, Any]:
    d = dataclasses.asdict(report)
    d["mfu_ceiling"] = report.mfu_ceiling()
    for s, r in zip(d["steps"], report.steps, strict=True):
        s["total_bytes"], s["fits"] = r.total_bytes, report.fits(r)
    return d


__all__ = ["STEPS", "CompileReport", "StepReport", "as_record", "check_libtpu", "compile_for",
           "topology_devices", "topology_name"]

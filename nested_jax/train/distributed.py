"""Multi-process setup: `jax.distributed.initialize()` on pods and multi-node runs.

Call `initialize` before anything touches a device. On Cloud TPU pod slices (and
SLURM / Open MPI clusters) JAX finds the coordinator itself; elsewhere pass it.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def on_tpu_pod() -> bool:
    """A multi-worker TPU slice or a multislice job (set by the TPU VM runtime)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(mode: str = "auto", *, coordinator: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
    """Start `jax.distributed` when the run spans several processes.

    Args:
      mode: "auto" (initialize on a TPU pod, or when a coordinator is given), "on", "off".
      coordinator: "host:port" of process 0 (not needed on TPU pods / SLURM).
      num_processes, process_id: this job's size and this process's index.
    """
    if mode == "off" or (mode == "auto" and coordinator is None and not on_tpu_pod()):
        return
    if coordinator is not None and os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # CPU processes talk to each other through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator is not None:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())

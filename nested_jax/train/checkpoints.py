"""Orbax checkpoints of the train state and the data iterator, with fallback on corruption.

One `ocp.CheckpointManager` step holds two items:
  state  the train-state pytree (`ocp.args.StandardSave`, async, sharded arrays)
  data   the grain iterator (grain's orbax handler: one JSON file per process), or the
         numpy fallback iterator's state as JSON
so a restore puts the model, the optimizer and the exact position in the data stream
back together. Orbax writes to a temporary directory and commits by renaming, so a
run killed mid-save leaves no half checkpoint in `all_steps()`. A committed checkpoint
that fails to load (corrupted on disk) is moved aside to `<dir>.corrupt/<step>` with a
warning, and the previous one is tried.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


def _is_grain_iterator(it: Any) -> bool:
    try:
        import grain
    except ImportError:
        return False
    return isinstance(it, grain.DatasetIterator | grain.DataLoaderIterator)


def _data_save_args(it: Any):
    if _is_grain_iterator(it):
        import grain

        return grain.checkpoint.CheckpointSave(it)
    return ocp.args.JsonSave(it.get_state())


def _data_restore_args(it: Any):
    if _is_grain_iterator(it):
        import grain

        return grain.checkpoint.CheckpointRestore(it)
    return ocp.args.JsonRestore()


class Checkpoints:
    """Save/restore (train state, data iterator) pairs under `directory`."""

    def __init__(self, directory: epath.PathLike, *, keep: int = 3, use_async: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False
             ) -> bool:
        """Start saving; returns once arrays are copied off the device (the write is async)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = _data_save_args(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption sync point (all hosts agree on the step to save at)."""
        return self.manager.reached_preemption(step)

    def restore(self, abstract_state: Any, data_iterator: Any = None
                ) -> tuple[int, Any] | None:
        """(step, state) of the newest readable checkpoint, also restoring the iterator in place.

        Returns None when there is no checkpoint; raises when none of them can be read.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = _data_restore_args(data_iterator)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # any failure to read means this checkpoint is unusable
                log.warning("checkpoint at step %d could not be read (%s: %s); falling back to "
                            "the previous one", step, type(e).__name__, str(e)[:300])
                self._move_aside(step)
                continue
            if data_iterator is not None and not _is_grain_iterator(data_iterator):
                data_iterator.set_state(out["data"])
            return step, out["state"]
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} could be "
                               f"read; see the warnings above, or start a new --workdir")
        return None

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                dst = self.directory.parent / (self.directory.name + ".corrupt") / str(step)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists():
                    dst.rmtree()
                src.rename(dst)
                log.warning("moved the unreadable checkpoint to %s", dst)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

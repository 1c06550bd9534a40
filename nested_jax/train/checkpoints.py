"""Orbax checkpoints of the train state and the data iterator, restored without losing any.

One `ocp.CheckpointManager` step holds two items and orbax's per-step custom metadata:
  state     the train-state pytree (`ocp.args.StandardSave`, async, sharded arrays)
  data      the grain iterator (grain's orbax handler: one JSON file per process), or the
            numpy fallback iterator's state as JSON
  metadata  what the step belongs to (model, preset, tokenizer, model config, train config),
            in orbax's `_CHECKPOINT_METADATA`, so a step can be checked without config.json
so a restore puts the model, the optimizer and the exact position in the data stream
back together. Orbax writes to a temporary directory and commits by renaming, so a
run killed mid-save leaves no half checkpoint in `all_steps()`.

Restoring never loses a good checkpoint:
  - before reading any array, the step's metadata (its own, and the array shapes orbax
    stored with the state) is compared with what the caller expects; a difference is a
    `CheckpointMismatchError` naming the fields, and nothing is touched;
  - a step is set aside (renamed to `<dir>.corrupt/<step>`, never deleted) only on
    positive evidence that its own files are corrupt: a decode error on a file that
    is there (bad JSON, a damaged tensorstore chunk or manifest, a missing file inside
    a step directory that exists);
  - an I/O error (permission, unavailable, timeout) is retried, then reported as a
    `CheckpointIOError` with nothing moved;
  - a step that disappears while it is read (a trainer's keep-N deleted it) is skipped;
  - a read-only instance (eval, generate) moves, deletes and writes nothing at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

# tensorstore reports a damaged or truncated file with these status codes (measured on
# garbage, truncated and missing files of a committed step); these are the only failures
# that set a step aside.
CORRUPT_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND")
# ... and storage trouble that may pass with these: retried, then reported, never moved.
IO_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
            "ABORTED", "CANCELLED")
IO_RETRIES = 3
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's per-step metadata (custom_metadata)
IO_BACKOFF_S = 0.5
MAX_LISTINGS = 5  # a reader's directory listings before it gives up on a live run


class CheckpointMismatchError(ValueError):
    """The checkpoint belongs to another model, preset, tokenizer or parameter shapes."""


class CheckpointIOError(OSError):
    """The checkpoint directory could not be read or written (after retries)."""


class _Vanished(Exception):
    """The step directory disappeared while it was read."""


class _Corrupt(Exception):
    """The step's own files failed to decode."""


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


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _quiet_closed_loop_reports() -> None:
    """When a write fails, tensorstore's other writes still in flight complete on orbax's event
    loop, which the failure has already closed (in orbax's background thread, before the error
    reaches us); each reports 'Event loop is closed' as an unraisable exception: up to dozens of
    tracebacks on the console. They add nothing to the error that `_writing` raises, so they go
    to the debug log; any other unraisable report is untouched. Installed once per process."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_closed_loops", False):
        return

    def hook(report):
        if isinstance(report.exc_value, RuntimeError) and (
                str(report.exc_value) == "Event loop is closed"):
            log.debug("a checkpoint write finished after the failed save closed its event loop")
            return
        previous(report)

    hook.quiets_closed_loops = True
    sys.unraisablehook = hook


def _short_cause(e: BaseException) -> str:
    """The operating system's words for a failed write, else the innermost message."""
    for x in _causes(e):
        if isinstance(x, OSError) and x.strerror:
            return f"{x.strerror} ({x.filename})" if x.filename else x.strerror
        code = re.search(r"os_error_code='?(\d+)", str(x))  # tensorstore's wording
        if code:
            return os.strerror(int(code.group(1)))
    return str(list(_causes(e))[-1])[:300]


def classify(e: BaseException) -> str:
    """'corrupt', 'io' or 'unknown': what an exception raised while reading a step says."""
    for x in _causes(e):
        if isinstance(x, json.JSONDecodeError | UnicodeDecodeError | FileNotFoundError):
            return "corrupt"  # a file of the step is garbled, or missing from its directory
        if isinstance(x, OSError):
            return "io"
        code = str(x).split(":", 1)[0].strip()
        if code in CORRUPT_CODES:
            return "corrupt"
        if code in IO_CODES:
            return "io"
    return "unknown"


def normalize(metadata: Any) -> Any:
    """JSON round trip (tuples -> lists, dtypes -> str), as the metadata reads back."""
    return json.loads(json.dumps(metadata, default=str))


def tree_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/embed/embedding": (shape, dtype)} of every array leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        key = key.removesuffix("/value")  # nnx Variables flatten with a trailing .value
        out[key] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def shape_differences(saved: dict, wanted: dict, limit: int = 6) -> list[str]:
    """Lines naming the arrays whose presence, shape or dtype differ."""
    lines = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a == b:
            continue
        if a is None:
            lines.append(f"{key}: not in the checkpoint, this run has {b[0]} {b[1]}")
        elif b is None:
            lines.append(f"{key}: in the checkpoint ({a[0]} {a[1]}), not in this run")
        else:
            lines.append(f"{key}: checkpoint {a[0]} {a[1]}, this run {b[0]} {b[1]}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


class Checkpoints:
    """Save/restore (train state, data iterator) pairs under `directory`.

    `read_only=True` (eval, generate): never creates, moves, deletes or writes anything.
    """

    def __init__(self, directory: epath.PathLike, *, keep: int = 3, use_async: bool = True,
                 read_only: bool = False):
        self.directory = epath.Path(directory)
        self.read_only = read_only
        self._write_failed = False
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   max_to_keep=None, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                   enable_async_checkpointing=use_async)
            _quiet_closed_loop_reports()
        # No item_handlers: orbax picks each item's handler from the save/restore args
        # (grain's or JSON for the data), which a fixed registry would refuse.
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False,
             metadata: dict | None = None) -> bool:
        """Start saving; returns once arrays are copied off the device (the write is async).

        `metadata` (JSON) is stored with the step and handed to `restore`'s `check`.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = _data_save_args(data_iterator)
        with self._writing():
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                                     custom_metadata=normalize(metadata) if metadata else None)

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (full disk, read-only or vanished directory; an async write surfaces at
        the next save or wait) becomes one CheckpointIOError naming the directory, the cause and
        the committed steps, which the failure leaves as they were."""
        try:
            yield
        except CheckpointIOError:
            raise
        except Exception as e:
            self._write_failed = True
            committed = sorted((int(p.name) for p in self._listing() if p.name.isdigit()),
                               reverse=True)
            kept = (f"the committed checkpoints ({', '.join(map(str, committed))}) are intact; "
                    "rerun the same command to resume from the newest" if committed else
                    "no checkpoint was committed")
            raise CheckpointIOError(
                f"could not write a checkpoint under {self.directory}: {_short_cause(e)}. "
                f"Free space or make the directory writable; {kept}.") from e

    def _listing(self) -> list[epath.Path]:
        try:
            return list(self.directory.iterdir())
        except OSError:
            return []

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption sync point (all hosts agree on the step to save at)."""
        return self.manager.reached_preemption(step)

    def step_metadata(self, step: int) -> dict:
        """The metadata saved with `step` ({} for checkpoints written before it existed).

        Read from orbax's step-metadata file directly: `manager.metadata(step)` would also
        open every item with handlers this manager has not registered yet, and it treats
        an undecodable file as empty, where here that is evidence of corruption.
        """
        path = self._step_dir(step) / STEP_METADATA_FILE
        if not path.exists():
            return {}
        return dict(json.loads(path.read_text()).get("custom_metadata") or {})

    def restore(self, abstract_state: Any, data_iterator: Any = None, *,
                check: Callable[[int, dict], None] | None = None,
                partial: bool = False) -> tuple[int, Any] | None:
        """(step, state) of the newest readable checkpoint, also restoring the iterator in place.

        `check(step, metadata)` raises CheckpointMismatchError when the step belongs to
        another run; array shapes are always compared with `abstract_state`. `partial`: read
        only the subtrees `abstract_state` names (eval and generate leave the optimizer
        state on disk: a 1.3B model's AdamW moments would triple what they load). Returns
        None when there is no checkpoint; raises when none of them can be read.
        """
        tried: list[int] = []
        for step in self._candidates(tried):
            tried.append(step)
            try:
                self._attempt(step, lambda s=step: self._check(s, abstract_state, check,
                                                               partial))
                out = self._attempt(step, lambda s=step: self._read(s, abstract_state,
                                                                    data_iterator, partial))
            except _Vanished:
                log.info("checkpoint at step %d disappeared while it was read (deleted by the "
                         "training run's keep_checkpoints); trying the previous one", step)
                continue
            except _Corrupt as e:
                cause = e.__cause__
                log.warning("checkpoint at step %d could not be read: its files are corrupt "
                            "(%s: %s); falling back to the previous one", step,
                            type(cause).__name__, str(cause)[:300])
                if not self.read_only:
                    self._move_aside(step)
                continue
            if data_iterator is not None and not _is_grain_iterator(data_iterator):
                data_iterator.set_state(out["data"])
            return step, out["state"]
        if tried:
            where = "" if self.read_only else f" (set aside in {self._corrupt_dir()})"
            raise CheckpointIOError(f"none of the checkpoints {tried} in {self.directory} could be "
                               f"read{where}; see the warnings above, or start a new --workdir")
        return None

    def _candidates(self, tried: list[int]):
        """Steps newest first; a reader lists again when it runs out, because a live run
        may have saved a newer step while deleting the ones it was reading (keep-N)."""
        for _ in range(MAX_LISTINGS if self.read_only else 1):
            fresh = [s for s in self.all_steps() if s not in tried]
            if not fresh:
                return
            yield from fresh

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _check(self, step: int, abstract_state: Any, check, partial: bool = False) -> None:
        metadata = self.step_metadata(step)
        if check is not None:
            check(step, metadata)
        saved = ocp.StandardCheckpointHandler().metadata(self._step_dir(step) / "state")
        saved_sig, wanted = tree_signature(saved.tree), tree_signature(abstract_state)
        if partial:  # only what is read must match (and be there)
            saved_sig = {k: saved_sig[k] for k in saved_sig
                         if k.split("/", 1)[0] in abstract_state}
        diff = shape_differences(saved_sig, wanted)
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint {self._step_dir(step)} holds other parameter or optimizer "
                "shapes than this run:\n  " + "\n  ".join(diff) + "\nUse the model, preset, "
                "model overrides and optimizer it was trained with, or a new --workdir")

    def _read(self, step: int, abstract_state: Any, data_iterator: Any,
              partial: bool = False) -> Any:
        if partial:
            items = {"state": ocp.args.PyTreeRestore(
                item=abstract_state, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        else:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = _data_restore_args(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def _attempt(self, step: int, fn: Callable[[], Any]) -> Any:
        """fn(), retrying I/O errors; maps failures to _Vanished / _Corrupt / CheckpointIOError."""
        for attempt in range(IO_RETRIES):
            try:
                return fn()
            except CheckpointMismatchError:
                raise
            except Exception as e:
                if not self._step_dir(step).exists():
                    raise _Vanished() from e
                kind = classify(e)
                if kind == "corrupt":
                    raise _Corrupt() from e
                if kind == "unknown":
                    raise CheckpointIOError(
                        f"checkpoint {self._step_dir(step)} could not be restored "
                        f"({type(e).__name__}: {str(e)[:500]}); nothing was moved") from e
                if attempt + 1 == IO_RETRIES:
                    raise CheckpointIOError(
                        f"checkpoint {self._step_dir(step)}: I/O error after {IO_RETRIES} "
                        f"attempts ({type(e).__name__}: {str(e)[:300]}); nothing was moved. "
                        "Check the storage (permissions, mount, space) and retry") from e
                log.warning("reading checkpoint %d failed (%s); retrying", step, str(e)[:200])
                time.sleep(IO_BACKOFF_S * 2 ** attempt)
        raise AssertionError("unreachable")

    def _corrupt_dir(self) -> epath.Path:
        return self.directory.parent / (self.directory.name + ".corrupt")

    def _move_aside(self, step: int) -> None:
        """Rename the step to <dir>.corrupt/<step>[.N]: kept for inspection, never deleted."""
        if jax.process_index() == 0:
            src = self._step_dir(step)
            if src.exists():
                dst = self._corrupt_dir() / str(step)
                n = 1
                while dst.exists():
                    dst = self._corrupt_dir() / f"{step}.{n}"
                    n += 1
                dst.parent.mkdir(parents=True, exist_ok=True)
                src.rename(dst)
                log.warning("moved the corrupt checkpoint to %s", dst)
        self.manager.reload()

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            if not self._write_failed:  # waiting again on a failed write only repeats it
                with self._writing():
                    self.manager.wait_until_finished()
        finally:
            self.manager.close()

"""Perplexity of a run's latest checkpoint on held-out or new data (`nested-jax eval`)."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

import jax

from nested_jax import data as data_lib
from nested_jax.train import trainer

log = logging.getLogger(__name__)


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()
    except OSError:
        return False


# Memories a user can freeze at evaluation, and the config field holding each inner rate.
FREEZE = {"self_modifying": "eta_max", "cms": "cms_lr"}


def freeze_overrides(model: str, freeze: Sequence[str]) -> dict[str, float]:
    """Model overrides setting the named memories' inner learning rates to 0 (clear errors)."""
    import dataclasses as dc

    from nested_jax.models import registry

    fields = {f.name for f in dc.fields(registry.lookup(model)[0])}
    out = {}
    for name in freeze:
        if name not in FREEZE:
            raise ValueError(f"--freeze {name!r}: unknown; choose from {sorted(FREEZE)}")
        if FREEZE[name] not in fields:
            have = [n for n, f in FREEZE.items() if f in fields]
            raise ValueError(f"--freeze {name}: model {model!r} has no {name} memory (no "
                             f"field {FREEZE[name]}); it can freeze {have or 'nothing'}")
        out[FREEZE[name]] = 0.0
    return out


def evaluate_checkpoint(workdir: str, *, data_path: str | None = None,
                        split: str = "auto", num_batches: int | None = None,
                        devices: Sequence[jax.Device] | None = None,
                        freeze: Sequence[str] = ()) -> dict[str, float]:
    """{"step", "loss", "perplexity"} of the latest checkpoint.

    `split="auto"` scores the held-out documents when `data_path` is the training data
    (or omitted) and every document of any other data.  `freeze` names in-context memories
    ("self_modifying", "cms") scored with their inner learning rates at 0: the gap to the
    unfrozen score is what in-context learning contributes (docs/decisions.md #19).
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"--batches {num_batches}: must be a positive number of batches")
    saved = trainer.saved_config(workdir)
    path = data_path or saved.data.path
    if split == "auto":
        split = "heldout" if _same_path(path, saved.data.path) else "all"
    if split == "heldout" and saved.data.eval_fraction <= 0:
        raise ValueError("--split heldout: this run trained on every document "
                         "(data.eval_fraction=0); pass --data with other data or --split all")
    run, state, step = trainer.load_run(workdir, devices=devices, data_path=path,
                                        model_overrides=freeze_overrides(saved.model, freeze))
    cfg = run.cfg
    batches = data_lib.eval_batches(
        run.documents, run.tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
        num_batches=cfg.eval_batches if num_batches is None else num_batches,
        eval_fraction=cfg.data.eval_fraction, split=split,
        document_alignment=trainer.document_alignment(cfg, run.model_cfg))
    loss, ppl = trainer.perplexity(run, state, batches, trainer.make_eval_fn(run))
    log.info("step %d, %s split of %s: loss %.4f", step, split, path, loss)
    return {"step": step, "loss": loss, "perplexity": ppl}

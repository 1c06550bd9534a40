"""data.pack_documents in the trainer: packed batches are sharded, stepped (with gradient
accumulation) and evaluated; bad combinations fail before any work. The bitwise resume with
the option on is in test_resume.py, the rows themselves in tests/data/test_pipeline.py."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from nested_jax import cli
from nested_jax.train import aot, evaluate, trainer
from nested_jax.train.config import DataConfig

from .conftest import tiny_config


def _packed(cfg, **optim):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pack_documents=True),
                               optim=dataclasses.replace(cfg.optim, **optim))


def test_packed_training_accumulates_trains_finitely_and_evaluates(corpus, tmp_path,
                                                                   monkeypatch):
    """Titans (documents at multiples of its chunk, 8) on packed rows, two microbatches."""
    seen = []
    real = trainer.global_batch

    def spy(local, run):
        seen.append(local)
        return real(local, run)

    monkeypatch.setattr(trainer, "global_batch", spy)
    cfg = _packed(tiny_config(corpus, model="titans", steps=4), grad_accum=2)
    summary = trainer.train(cfg, tmp_path / "run", devices=jax.devices()[:1], progress=False)

    assert len(seen) == 4 and all(set(b) == {"tokens", "segment_ids"} for b in seen)
    seg = np.concatenate([b["segment_ids"] for b in seen])
    assert seg.shape == (32, 33) and (seg == 0).any()  # padding between aligned documents
    starts = (seg != 0) & (seg != np.pad(seg[:, :-1], ((0, 0), (1, 0))))
    assert not (starts & (np.arange(33) % 8 != 0)).any()

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert summary["ppl_after"] < summary["ppl_before"]

    # `nested-jax eval` scores the same packed held-out batches
    scored = evaluate.evaluate_checkpoint(str(tmp_path / "run"), devices=jax.devices()[:1])
    assert scored["step"] == 4
    assert abs(scored["perplexity"] - summary["ppl_after"]) < 1e-3 * summary["ppl_after"]


def test_an_alignment_longer_than_a_row_is_refused_before_any_work(corpus, tmp_path, caplog):
    """HopeLM tiny starts documents at multiples of 64 (its slowest CMS period): with rows of
    32 tokens every row would hold one document."""
    workdir = tmp_path / "run"
    rc = cli.main(["train", "--workdir", str(workdir), "--data", str(corpus), "--steps", "2",
                   "--model", "hope", "--preset", "tiny", "--seq-len", "32", "--batch-size", "8",
                   "--no-progress", "--set", "data.pack_documents=true"])
    assert rc == 2
    assert "data.pack_documents=True: the model's document alignment is 64" in caplog.text
    assert "data.seq_len=32" in caplog.text and "cms_periods" in caplog.text
    assert not (workdir / "checkpoints").exists()


def test_pack_documents_is_a_bool():
    with pytest.raises(ValueError, match="data.pack_documents='yes'"):
        DataConfig(pack_documents="yes")


def test_the_compiled_step_is_the_packed_one(corpus, tmp_path):
    """`nested-jax compile` lowers the train and eval steps for packed batches (dicts)."""
    cfg = _packed(tiny_config(corpus), grad_accum=2)
    run = trainer.prepare(cfg, tmp_path, devices=jax.devices()[:1], for_training=False)
    batch = aot._batch_struct(cfg, (2, 4, 33), run.batch_sharding)
    assert set(batch) == {"tokens", "segment_ids"}
    with trainer.sharding.mesh_context(run.mesh):
        text = trainer.train_jit(run).lower(run.abstract_state, batch).as_text()
    assert text.count("tensor<2x4x33xi32>") >= 2  # both arrays are arguments

"""Shared fixtures for the trainer tests: a small local corpus and a tiny config."""

import dataclasses

import pytest

from nested_jax.train.config import DataConfig, OptimConfig, TrainConfig

WORDS = ("memory", "level", "gradient", "chunk", "token", "update", "nested", "momentum",
         "attention", "frequency", "context", "surprise")


def write_corpus(directory, n_docs=120):
    directory.mkdir(parents=True, exist_ok=True)
    paragraphs = []
    for i in range(n_docs):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 9)]
        paragraphs.append(f"Document {i}: " + " ".join(words) + ".")
    (directory / "corpus.txt").write_text("\n\n".join(paragraphs))
    return directory


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data")


def tiny_config(data_path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        preset="tiny", steps=6, log_every=1, eval_every=0, eval_batches=2, checkpoint_every=3,
        async_checkpoints=False,
        data=DataConfig(path=str(data_path), seq_len=32, batch_size=8, eval_fraction=0.1),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant"))
    return dataclasses.replace(cfg, **changes)

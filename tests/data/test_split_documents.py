"""`split_documents` names exactly the documents the batches read, and the trainer fits its
SentencePiece model on the training split only (never on held-out text)."""

import re

import numpy as np
import pytest

from nested_jax.data import pipeline
from nested_jax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
DOCS = [f"<doc{i:03d}> " + "abcdefghij"[: 1 + i % 10] * (1 + i % 4) for i in range(60)]


@pytest.fixture(params=["grain", "numpy"])
def backend(request, monkeypatch):
    if request.param == "grain" and not pipeline.grain_available():
        pytest.skip("grain is not installed")
    if request.param == "numpy":
        monkeypatch.setattr(pipeline, "grain_available", lambda: False)
    return request.param


def _ids(docs) -> set[str]:
    return {re.match(r"<doc(\d{3})>", d).group(1) for d in docs}


def test_the_splits_are_what_the_batches_read(backend):
    heldout = pipeline.split_documents(DOCS, 0.2, "heldout")
    train = pipeline.split_documents(DOCS, 0.2, "train")
    assert len(heldout) == 12 and len(train) == 48
    assert _ids(heldout).isdisjoint(_ids(train)) and len(_ids(heldout) | _ids(train)) == 60
    batches = pipeline.eval_batches(DOCS, TOK, seq_len=31, batch_size=4, num_batches=20,
                                    eval_fraction=0.2, split="heldout")
    text = bytes(int(t) for b in batches for t in np.asarray(b).reshape(-1)).decode("latin-1")
    assert set(re.findall(r"<doc(\d{3})>", text)) == _ids(heldout)


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="part='eval'"):
        pipeline.split_documents(DOCS, 0.2, "eval")


def test_the_trainer_fits_its_tokenizer_on_the_training_split(tmp_path, monkeypatch):
    from nested_jax.data import tokenizers
    from nested_jax.train import trainer
    from nested_jax.train.config import DataConfig, TrainConfig

    seen = []

    def fake_train(texts, vocab, out, **kw):
        seen.extend(texts)
        raise RuntimeError("stop here")

    monkeypatch.setattr(tokenizers, "train_sentencepiece", fake_train)
    cfg = TrainConfig(data=DataConfig(tokenizer="sentencepiece-train:300", eval_fraction=0.2))
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.resolve_tokenizer(cfg, trainer.workdir_path(tmp_path), DOCS)
    assert _ids(seen) == _ids(pipeline.split_documents(DOCS, 0.2, "train"))

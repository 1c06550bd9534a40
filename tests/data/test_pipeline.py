"""Pipelines: packing, held-out split, sharding, determinism and exact iterator resume."""

import json
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


def _train(seed=0, shard=None):
    return pipeline.train_batches(DOCS, TOK, seq_len=31, batch_size=4, seed=seed,
                                  eval_fraction=0.2, shard=shard or pipeline.Shard())


def _doc_ids(batches):
    text = bytes(int(t) for b in batches for t in b.reshape(-1)).decode("latin-1")
    return set(re.findall(r"<doc(\d{3})>", text))


def test_batches_are_packed_rows(backend):
    batch = next(_train())
    assert batch.shape == (4, 32) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < TOK.vocab_size


def test_concat_then_split_keeps_every_token_in_order(backend):
    """Unshuffled rows, concatenated, are exactly the documents each closed by EOS."""
    rows = pipeline.eval_batches(DOCS, TOK, seq_len=15, batch_size=2, num_batches=5,
                                 eval_fraction=0.0, split="all")
    stream = np.concatenate([r.reshape(-1) for r in rows])
    want = np.concatenate([np.append(TOK.encode(d), TOK.eos_id) for d in DOCS])[: stream.size]
    np.testing.assert_array_equal(stream, want)


def test_heldout_and_train_documents_are_disjoint(backend):
    train = _train()
    seen = _doc_ids([next(train) for _ in range(40)])
    heldout = _doc_ids(pipeline.eval_batches(DOCS, TOK, seq_len=31, batch_size=4, num_batches=4,
                                             eval_fraction=0.2))
    assert len(heldout) == 12 and len(seen) == 48
    assert not seen & heldout


def test_processes_read_disjoint_shards(backend):
    def first(index, n=20):
        it = _train(shard=pipeline.Shard(index, 2))
        return _doc_ids([next(it) for _ in range(n)])

    a, b = first(0), first(1)
    assert len(a) == len(b) == 24 and not a & b


def test_deterministic_and_seeded(backend):
    a, b, c = _train(seed=1), _train(seed=1), _train(seed=2)
    xs = [next(a) for _ in range(5)]
    np.testing.assert_array_equal(np.stack(xs), np.stack([next(b) for _ in range(5)]))
    assert not np.array_equal(np.stack(xs), np.stack([next(c) for _ in range(5)]))


def test_restored_iterator_continues_exactly(backend):
    """get_state -> JSON -> set_state on a fresh iterator resumes the stream mid-epoch."""
    it = _train()
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(30)]  # crosses an epoch boundary
    fresh = _train()
    fresh.set_state(state)
    np.testing.assert_array_equal(np.stack(want), np.stack([next(fresh) for _ in range(30)]))


def test_short_heldout_split_is_cycled(backend):
    rows = pipeline.eval_batches(DOCS[:4], TOK, seq_len=63, batch_size=4, num_batches=3,
                                 eval_fraction=0.25)
    assert len(rows) == 3


def test_one_document_cannot_be_split():
    with pytest.raises(ValueError, match="data.eval_fraction"):
        pipeline.train_batches(DOCS[:1], TOK, seq_len=8, batch_size=1, seed=0, eval_fraction=0.1)


# `split_documents` names exactly the documents the batches read, and the trainer fits its
# SentencePiece model on the training split only (never on held-out text).


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


# data.pack_documents: rows of whole documents at multiples of the model's alignment, with
# segment ids; the rows are models/packing.pack_aligned's, streamed and checkpointable.

ALIGN = 8


def _encoded(docs):
    return [np.append(TOK.encode(d), TOK.eos_id).astype(np.int32) for d in docs]


def _pieces(tokens_NxL, seg_NxL):
    """Every document piece of packed rows, in order, with its start position."""
    out = []
    for tok, seg in zip(tokens_NxL, seg_NxL, strict=True):
        for s in np.unique(seg[seg != 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            out.append((int(where[0]), tok[where]))
    return out


def test_packed_rows_hold_every_document_whole_and_aligned(backend):
    batches = pipeline.eval_batches(DOCS, TOK, seq_len=31, batch_size=2, num_batches=40,
                                    eval_fraction=0.0, split="all", document_alignment=ALIGN)
    assert set(batches[0]) == {"tokens", "segment_ids"}
    tok = np.concatenate([b["tokens"] for b in batches])
    seg = np.concatenate([b["segment_ids"] for b in batches])
    assert tok.shape == seg.shape == (80, 32) and tok.dtype == seg.dtype == np.int32
    assert (tok[seg == 0] == 0).all() and (seg[:, 0] != 0).all()  # padding is 0; rows start
    pieces = _pieces(tok, seg)
    assert all(start % ALIGN == 0 for start, _ in pieces)
    # the pieces, joined, are the documents (each closed by EOS) in order; a document longer
    # than a row arrives in row-sized pieces
    stream = np.concatenate([p for _, p in pieces])
    want = np.concatenate(_encoded(DOCS * 3))
    np.testing.assert_array_equal(stream, want[:stream.size])
    assert stream.size > sum(map(len, _encoded(DOCS)))  # past the first epoch of documents
    assert max(map(len, _encoded(DOCS))) > 32  # some document was split
    # ... laid out exactly as pack_aligned lays them out
    from nested_jax.models.packing import pack_aligned

    want_tok, want_seg = pack_aligned(_encoded(DOCS * 3), 32, ALIGN)
    np.testing.assert_array_equal(tok, want_tok[:80])
    np.testing.assert_array_equal(seg, want_seg[:80])


def test_packed_iterator_resumes_exactly_from_any_state(backend):
    """Every state (between rows, or inside a document a row boundary split) resumes the
    stream bit for bit, through JSON as a checkpoint stores it."""

    def train():
        return pipeline.train_batches(DOCS, TOK, seq_len=31, batch_size=2, seed=3,
                                      eval_fraction=0.2, document_alignment=ALIGN)

    it, states, batches = train(), [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    for k in range(0, 12, 3):
        fresh = train()
        fresh.set_state(states[k])
        for want in batches[k:]:
            got = next(fresh)
            for key in ("tokens", "segment_ids"):
                np.testing.assert_array_equal(got[key], want[key])
    if backend == "grain":  # the states include both kinds
        assert {s["offset"] == -1 for s in states} == {True, False}


def test_without_packing_the_batches_are_the_same(backend):
    plain = next(_train())
    again = next(pipeline.train_batches(DOCS, TOK, seq_len=31, batch_size=4, seed=0,
                                        eval_fraction=0.2, document_alignment=None))
    assert isinstance(again, np.ndarray)
    np.testing.assert_array_equal(plain, again)


@pytest.mark.parametrize("bad", [0, -8, 2.0, True])
def test_a_bad_alignment_is_refused(bad):
    with pytest.raises(ValueError, match="document_alignment"):
        pipeline.train_batches(DOCS, TOK, seq_len=31, batch_size=2, seed=0, eval_fraction=0.2,
                               document_alignment=bad)


def test_a_run_killed_while_writing_its_tokenizer_leaves_no_half_model(tmp_path, monkeypatch):
    # The workdir's tokenizer.model is reused by every resume: a truncated one would be read
    # forever. A writer stopped mid-file leaves no model, and the next start trains it whole.
    from nested_jax.data import tokenizers
    from nested_jax.train import trainer
    from nested_jax.train.config import DataConfig, TrainConfig

    def half_then_killed(texts, vocab, out, **kw):
        out.write_bytes(b"\x0a\x10half a sentencepiece model")
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizers, "train_sentencepiece", half_then_killed)
    cfg = TrainConfig(data=DataConfig(tokenizer="sentencepiece-train:300", eval_fraction=0.2))
    workdir = trainer.workdir_path(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        trainer.resolve_tokenizer(cfg, workdir, DOCS)
    assert list(tmp_path.iterdir()) == []
    written = []
    monkeypatch.setattr(tokenizers, "train_sentencepiece",
                        lambda texts, vocab, out, **kw: written.append(out))
    monkeypatch.setattr(tokenizers, "get_tokenizer", lambda spec: spec)
    assert trainer.resolve_tokenizer(cfg, workdir, DOCS) == f"sentencepiece:{tmp_path}/tokenizer.model"
    assert len(written) == 1 and written[0] != tmp_path / "tokenizer.model"  # a private file

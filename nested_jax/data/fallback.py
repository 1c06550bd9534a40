"""The numpy pipeline used only where grain is not installed.

Same stages as `pipeline.py` (held-out split, shard, per-epoch shuffle, end-of-document
id, concat-then-split or aligned document rows, batch) in a few lines of numpy. Its state
is the number of batches served; `set_state` rebuilds the stream and skips that many,
which is exact because the stream is a pure function of (documents, seed). The shuffles differ from
grain's, so runs with and without grain see different (equally valid) orders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from nested_jax.data.packing import aligned_rows

SPLIT_SEED = 20251231


class _Subset(Sequence):
    def __init__(self, docs: Sequence[str], index: np.ndarray):
        self._docs, self._index = docs, index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        return self._docs[int(self._index[i])]


def split(docs: Sequence[str], n_heldout: int, part: str) -> Sequence[str]:
    if part == "all":
        return docs
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    return _Subset(docs, perm[:n_heldout] if part == "heldout" else perm[n_heldout:])


class PackedBatches:
    """Endless int32 [batch_size, seq_len + 1] batches; `seed=None` keeps document order.
    `document_alignment=R`: {"tokens", "segment_ids"} batches of aligned rows (packing.py)."""

    def __init__(self, docs: Sequence[str], tokenizer, *, seq_len: int, batch_size: int,
                 seed: int | None, shard: tuple[int, int] = (0, 1),
                 document_alignment: int | None = None):
        index, count = shard
        self._docs = _Subset(docs, np.arange(index, len(docs), count))
        if not len(self._docs):
            raise ValueError(f"data: process {index} of {count} got no documents")
        self._tokenizer, self._seed = tokenizer, seed
        self._row, self._batch = seq_len + 1, batch_size
        self._alignment = document_alignment
        self._served = 0
        self._rows = self._stream()

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self._docs)
        if self._seed is None:
            return np.arange(n)
        return np.random.default_rng([self._seed, epoch]).permutation(n)

    def _documents(self) -> Iterator[np.ndarray]:
        """Every epoch's documents in order, tokenized and closed by the end-of-document id."""
        epoch = 0
        while True:
            for i in self._order(epoch):
                ids = self._tokenizer.encode(self._docs[int(i)])
                yield np.append(ids, np.int32(self._tokenizer.eos_id)).astype(np.int32)
            epoch += 1

    def _stream(self) -> Iterator[np.ndarray | dict]:
        if self._alignment is not None:
            yield from aligned_rows(self._documents(), self._row, self._alignment)
            return
        buffer = np.zeros((0,), np.int32)
        for doc in self._documents():
            buffer = np.concatenate([buffer, doc])
            while len(buffer) >= self._row:
                yield buffer[: self._row]
                buffer = buffer[self._row:]

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray | dict:
        self._served += 1
        rows = [next(self._rows) for _ in range(self._batch)]
        if isinstance(rows[0], dict):
            return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return np.stack(rows)

    def get_state(self) -> dict[str, int]:
        return {"batches": self._served}

    def set_state(self, state: dict[str, int]) -> None:
        self._served, self._rows = 0, self._stream()
        for _ in range(int(state["batches"])):
            next(self)

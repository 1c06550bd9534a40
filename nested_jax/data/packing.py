"""Rows of whole documents with segment ids, for `data.pack_documents` (pure numpy).

The rule is `nested_jax.models.packing.pack_aligned`'s, streamed: documents in order, each
at the next multiple of R (the model's `document_alignment()`) in the current row, padding
(token 0, segment id 0) in between; a document that does not fit starts the next row; a
document longer than a row is cut into row-sized pieces, each its own document. A row is
seq_len + 1 tokens (inputs row[:-1], targets row[1:]), so every document the model reads
starts at a multiple of R and `model(tokens, segment_ids=...)` runs it as if alone
(docs/decisions.md #23). The rule is restated here rather than imported so that the data
package stays free of jax and the models; tests/data/test_pipeline.py checks that the rows
equal pack_aligned's.

`AlignedRow` is one row being filled. The grain pipeline drives it from a checkpointable
iterator (`grain_packing.py`), the numpy fallback from `aligned_rows`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class AlignedRow:
    """One packed row being filled; `add` places a piece or says it does not fit."""

    def __init__(self, length: int, alignment: int):
        self.tokens = np.zeros(length, np.int32)
        self.segment_ids = np.zeros(length, np.int32)
        self._alignment = alignment
        self._fill = 0  # tokens up to the end of the last piece
        self._docs = 0

    def _next_start(self) -> int:
        return -(-self._fill // self._alignment) * self._alignment

    @property
    def empty(self) -> bool:
        return self._docs == 0

    @property
    def full(self) -> bool:
        """No document can start in this row any more (the next aligned start is past it)."""
        return self._next_start() >= len(self.tokens)

    def add(self, piece: np.ndarray) -> bool:
        """Place `piece` (at most a row long) at the next aligned start; False if it does not
        fit (an empty row takes any piece)."""
        start = self._next_start()
        if start + len(piece) > len(self.tokens):
            return False
        self._docs += 1
        self.tokens[start:start + len(piece)] = piece
        self.segment_ids[start:start + len(piece)] = self._docs
        self._fill = start + len(piece)
        return True

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "segment_ids": self.segment_ids}


def aligned_rows(docs: Iterable[np.ndarray], length: int,
                 alignment: int) -> Iterator[dict[str, np.ndarray]]:
    """Packed rows {"tokens", "segment_ids"} (int32 [length]) of `docs`, as they fill; a last
    partial row is not yielded (the training streams never end)."""
    row = AlignedRow(length, alignment)
    for doc in docs:
        for i in range(0, len(doc), length):
            piece = doc[i:i + length]
            if not row.add(piece):
                yield row.as_dict()
                row = AlignedRow(length, alignment)
                row.add(piece)
            if row.full:
                yield row.as_dict()
                row = AlignedRow(length, alignment)

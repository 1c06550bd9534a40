"""`data.pack_documents` under grain: an IterDataset of aligned rows whose state resumes exactly.

Imported only where grain is (pipeline.py imports it lazily); the packing rule itself is
`packing.AlignedRow`'s.

State between rows: a row is finished when the next piece does not fit, so the iterator has
already read the document that piece comes from (the pending document). Its state is the
parent's state from *before* that document was read, plus where in the document the next
row starts; `set_state` reads the document again and continues from there. The parent is
deterministic, so the resumed stream is the uninterrupted one bit for bit (grain's own
ConcatThenSplitIterDataset keeps its state the same way).
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

from nested_jax.data.packing import AlignedRow

_NONE_PENDING = -1


class _AlignedRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, length: int, alignment: int):
        super().__init__(parent)
        self._length, self._alignment = length, alignment
        self._pending: np.ndarray | None = None  # the document the next row starts in
        self._pending_state: Any = None  # the parent's state before it was read
        self._offset = 0  # where in it the next row starts

    def _read_document(self) -> None:
        self._pending_state = copy.deepcopy(self._parent.get_state())
        self._pending, self._offset = next(self._parent)["tokens"], 0

    def __next__(self) -> dict[str, np.ndarray]:
        row = AlignedRow(self._length, self._alignment)
        while not row.full:
            if self._pending is None:
                try:
                    self._read_document()
                except StopIteration:
                    if row.empty:
                        raise
                    return row.as_dict()  # a finite parent: its last, partial row
            piece = self._pending[self._offset:self._offset + self._length]
            if len(piece) and not row.add(piece):
                break  # the piece starts the next row; the document stays pending
            self._offset += len(piece)
            if self._offset >= len(self._pending):
                self._pending = None
        return row.as_dict()

    def get_state(self) -> dict[str, Any]:
        if self._pending is None:
            return {"parent": self._parent.get_state(), "offset": _NONE_PENDING}
        return {"parent": copy.deepcopy(self._pending_state), "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        if state["offset"] != _NONE_PENDING:
            self._read_document()
            self._offset = int(state["offset"])


class AlignedRowsIterDataset(grain.IterDataset):
    """Rows {"tokens", "segment_ids"} (int32 [length]) of the parent's {"tokens"} documents,
    each document at a multiple of `alignment` (packing.py)."""

    def __init__(self, parent: grain.IterDataset, length: int, alignment: int):
        super().__init__(parent)
        self._length, self._alignment = length, alignment

    def __iter__(self) -> _AlignedRowsIterator:
        return _AlignedRowsIterator(self._parent.__iter__(), self._length, self._alignment)

    def __str__(self) -> str:
        return f"AlignedRowsIterDataset(length={self._length}, alignment={self._alignment})"

"""Pack documents into rows whose documents start where a model can restart (pure NumPy).

``model(tokens, segment_ids=...)`` computes each document of a packed row as if it ran alone,
provided every document starts at a multiple of ``config.document_alignment()`` (R, the lcm of
the model's chunk sizes and CMS periods; models/documents.py, docs/decisions.md #23).  This
lays documents out so: in order, each at the next multiple of R in the current row, padding
(segment id 0) in between; a document that does not fit starts a new row; a document longer
than a row is cut into row-sized pieces, each its own document (a row never sees another row,
packed or not).  The data pipeline calls this; the models only check the alignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pack_aligned(docs: Iterable[Sequence[int]], seq_len: int, alignment: int, *,
                 pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N, seq_len], segment_ids int32 [N, seq_len]) holding every token of
    ``docs`` once, in order.  segment_ids: 1, 2, ... per document within its row, 0 on padding
    (tokens there are ``pad_id``).  Every document starts at a multiple of ``alignment``.

    For next-token training rows of seq_len + 1 tokens (inputs tokens[:, :-1]), pass
    seq_len + 1 and give the model segment_ids[:, :-1]: the starts are the same positions.
    """
    for name, value in (("seq_len", seq_len), ("alignment", alignment)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int.")
    rows_tok, rows_seg = [], []
    tok = seg = None
    fill = seq_len  # no open row yet

    def new_row():
        nonlocal tok, seg, fill
        tok = np.full(seq_len, pad_id, np.int32)
        seg = np.zeros(seq_len, np.int32)
        rows_tok.append(tok)
        rows_seg.append(seg)
        fill = 0

    for doc in docs:
        doc = np.asarray(doc, np.int32).reshape(-1)
        for piece in (doc[i:i + seq_len] for i in range(0, len(doc), seq_len)):
            start = -(-fill // alignment) * alignment
            if start + len(piece) > seq_len:
                new_row()
                start = 0
            tok[start:start + len(piece)] = piece
            seg[start:start + len(piece)] = (seg.max() + 1) if start else 1
            fill = start + len(piece)
    if not rows_tok:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    return np.stack(rows_tok), np.stack(rows_seg)

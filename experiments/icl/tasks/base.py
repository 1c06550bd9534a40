"""The contract every task keeps, in its own module so the task modules can import it without
importing the registry in ``experiments/icl/tasks/__init__.py`` (which imports them).

A task is a frozen dataclass whose ``sample(rng, batch)`` returns ``Batch(tokens_BxT1,
mask_BxT)``: the model reads ``tokens[:, :-1]`` and is scored on predicting ``tokens[:, 1:]``
only where ``mask`` is true (or, where the task gives ``targets``, on predicting those: a
formal language's prefix labels are answers the input never contains).  ``scoring`` says how
the scored positions become one accuracy: ``"token"`` averages over every scored position,
``"sequence"`` counts a row only when all of its scored positions are right (an answer of
several tokens is either retrieved or not).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Protocol

import numpy as np

RESERVED = 2  # ids below this are never task content
PAD = 0  # pad / filler / beginning of sequence
SEP = 1  # separator: ends a part of the layout (a string, a sequence to reproduce, ...)


class Batch(NamedTuple):
    tokens: np.ndarray  # int32 [B, T + 1]
    mask: np.ndarray  # bool [B, T]: score the prediction of tokens[:, 1:] here
    # int32 [B, T] or None: what position t must predict, when that is not the next token
    # (a formal language's prefix labels: the label of s_1..s_t, never fed back as input).
    targets: np.ndarray | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs [B, T], targets [B, T], mask [B, T]) for a model and its scored loss."""
        targets = self.tokens[:, 1:] if self.targets is None else self.targets
        return self.tokens[:, :-1], targets, self.mask


class Task(Protocol):
    scoring: ClassVar[str]  # "token" or "sequence"
    seq_len: int

    @property
    def vocab_size(self) -> int: ...

    @property
    def chance(self) -> float: ...

    def sample(self, rng: np.random.Generator, batch: int) -> Batch: ...

    def at_length(self, seq_len: int) -> Task: ...


def require(ok: bool, message: str) -> None:
    """Raise the ValueError every task uses for a bad parameter (the message names the field
    and the fix)."""
    if not ok:
        raise ValueError(message)

"""Multi-query associative recall, the task the in-context-learning experiments started with."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from experiments.icl.tasks.base import RESERVED, Batch


@dataclasses.dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    Layout: ``k_1 v_1 k_2 v_2 ... k_N v_N`` then the N keys again in a random order, each
    followed by its value: ``k_p(1) v_p(1) ... k_p(N) v_p(N)``, then filler to the length.
    Keys and values are drawn without replacement from disjoint halves of the vocabulary, so
    a value can be predicted only by recalling the pair it was stored in.  Scored: the value
    after each query key (N positions per sequence); chance is 1 / (vocab / 2).
    """

    scoring: ClassVar[str] = "token"

    n_pairs: int = 8
    seq_len: int = 64
    vocab: int = 64  # keys and values, RESERVED excluded

    def __post_init__(self):
        if self.seq_len < 4 * self.n_pairs:
            raise ValueError(f"MQAR seq_len={self.seq_len} must be >= 4 * n_pairs "
                             f"= {4 * self.n_pairs}: pairs and queries take 2 tokens each.")
        if self.vocab // 2 < self.n_pairs:
            raise ValueError(f"MQAR vocab={self.vocab} must be >= 2 * n_pairs: keys are "
                             "distinct and drawn from half the vocabulary.")

    @property
    def vocab_size(self) -> int:
        return self.vocab + RESERVED

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab // 2)

    def at_length(self, seq_len: int) -> MQAR:
        """The same pairs with more filler after the queries (the recall itself is unchanged)."""
        return dataclasses.replace(self, seq_len=seq_len)

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        N, half = self.n_pairs, self.vocab // 2
        keys = np.argsort(rng.random((batch, half)), axis=1)[:, :N] + RESERVED
        vals = rng.integers(0, half, (batch, N)) + RESERVED + half
        order = np.argsort(rng.random((batch, N)), axis=1)
        qk = np.take_along_axis(keys, order, 1)
        qv = np.take_along_axis(vals, order, 1)
        tokens = np.zeros((batch, self.seq_len + 1), np.int32)
        tokens[:, 0:2 * N:2], tokens[:, 1:2 * N:2] = keys, vals
        tokens[:, 2 * N:4 * N:2], tokens[:, 2 * N + 1:4 * N:2] = qk, qv
        mask = np.zeros((batch, self.seq_len), bool)
        mask[:, 2 * N:4 * N:2] = True  # position of query key j predicts its value
        return Batch(tokens, mask)

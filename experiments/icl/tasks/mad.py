"""The six synthetic tasks of MAD (Mechanistic Architecture Design, Poli et al. 2024): in-context
recall, fuzzy in-context recall, noisy in-context recall, selective copying, compression and
memorization, re-implemented in numpy from MAD's task definitions and benchmark baseline sizes.

How they are read into this package's convention (``experiments/icl/tasks/base.py``):

- ``vocab`` is MAD's ``vocab_size``.  MAD's content token ``t`` is our id ``t + RESERVED``; its
  special tokens (pad, blank, copy / compression token) become our reserved ids, so
  ``vocab_size`` counts content tokens plus ``RESERVED``.
- ``seq_len`` is MAD's ``seq_len`` unless a class says otherwise.  A MAD instance is ``seq_len``
  tokens whose model reads the first ``seq_len - 1``; here a leading ``PAD`` plays
  beginning-of-sequence, so the model reads ``seq_len`` tokens and every MAD target is scored.
- MAD reports accuracy over the target positions it does not ignore; ``mask`` marks exactly
  those and ``scoring = "token"`` takes the plain mean over them.  (MAD computes it with
  torchmetrics' multiclass accuracy, whose default averages per class first.)
- MAD draws fixed train and test sets (12,800 and 1,280 instances); here every batch is fresh.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from experiments.icl.tasks.base import PAD, RESERVED, SEP, Batch, require


def _with_bos(body_BxT: np.ndarray) -> np.ndarray:
    """Content ids shifted past the reserved ones, behind a leading PAD (beginning of sequence)."""
    tokens = np.full((body_BxT.shape[0], body_BxT.shape[1] + 1), PAD, np.int32)
    tokens[:, 1:] = body_BxT + RESERVED
    return tokens


@dataclasses.dataclass(frozen=True)
class InContextRecall:
    """MAD in-context recall, multi-query form (the form MAD's benchmark uses).

    Layout: ``PAD k_1 v_1 k_2 v_2 ... k_N v_N`` with ``N = seq_len / 2``.  Keys are drawn with
    replacement from the first half of the content vocabulary, values from the second half; a
    key keeps one value within a sequence.  The last pair's key is one already shown.  Scored:
    the value of every pair whose key appeared earlier in the sequence (the value is in
    context); a key's first value is a fresh random draw and is not scored.  Chance 1 / values.

    MAD baseline sizes (MAD's in-context-recall task config): ``vocab = 16`` (8 keys, 8 values,
    no special token in multi-query form), ``seq_len = 128``.  MAD also trains at ``vocab``
    32..128 and ``seq_len`` 256..1024, so both may change, and so does ``at_length``.

    With ``frac_noise > 0`` each pair slot before the last is, with that probability, two noise
    tokens drawn from the last ``noise_vocab`` ids instead; noise is never scored and never
    stores a key (see ``NoisyRecall``).  One slot is always a real pair so the last key has
    something to recall (MAD's generator could pick the last slot for this and, rarely, leave
    no key to query).
    """

    scoring: ClassVar[str] = "token"

    vocab: int = 16
    seq_len: int = 128
    noise_vocab: int = 0
    frac_noise: float = 0.0

    def __post_init__(self):
        name = type(self).__name__
        require(self.seq_len % 2 == 0 and self.seq_len >= 4,
                f"{name} seq_len={self.seq_len} must be even and >= 4: the sequence is key-value "
                "pairs, at least one to store and the final query.")
        require(0.0 <= self.frac_noise < 1.0,
                f"{name} frac_noise={self.frac_noise} must be in [0, 1): some pairs must be real.")
        require(self.noise_vocab >= 0 and (self.frac_noise == 0 or self.noise_vocab > 0),
                f"{name} noise_vocab={self.noise_vocab} must be > 0 when frac_noise > 0 "
                "(and never negative).")
        require(self.vocab - self.noise_vocab >= 2,
                f"{name} vocab={self.vocab} must be >= noise_vocab + 2 = {self.noise_vocab + 2}: "
                "keys and values need at least one token each.")

    @property
    def n_keys(self) -> int:
        return (self.vocab - self.noise_vocab) // 2

    @property
    def n_values(self) -> int:
        return self.vocab - self.noise_vocab - self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.vocab + RESERVED

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def at_length(self, seq_len: int) -> InContextRecall:
        return dataclasses.replace(self, seq_len=seq_len)

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        K, V, N = self.n_keys, self.n_values, self.seq_len // 2
        M = N - 1  # pair slots before the final query
        rows = np.arange(batch)
        keys_BxM = rng.integers(0, K, (batch, M))
        value_of_BxK = rng.integers(0, V, (batch, K)) + K  # one value per key per sequence
        vals_BxM = np.take_along_axis(value_of_BxK, keys_BxM, 1)
        noise_BxM = rng.random((batch, M)) < self.frac_noise
        noise_BxM[rows, rng.integers(0, M, batch)] = False
        if self.noise_vocab:
            junk_BxMx2 = rng.integers(K + V, K + V + self.noise_vocab, (batch, M, 2))
        else:
            junk_BxMx2 = np.zeros((batch, M, 2), np.int64)

        stored_BxMxK = (keys_BxM[..., None] == np.arange(K)) & ~noise_BxM[..., None]
        before_BxMxK = np.cumsum(stored_BxMxK, 1) - stored_BxMxK
        seen_BxM = np.take_along_axis(before_BxMxK, keys_BxM[..., None], 2)[..., 0] > 0
        # The query key is uniform over the distinct keys shown (as in MAD), not over slots.
        shown_BxK = stored_BxMxK.any(1)
        query_B = np.argmax(np.where(shown_BxK, rng.random((batch, K)), -1.0), 1)

        pairs_BxNx2 = np.empty((batch, N, 2), np.int64)
        pairs_BxNx2[:, :M, 0] = np.where(noise_BxM, junk_BxMx2[..., 0], keys_BxM)
        pairs_BxNx2[:, :M, 1] = np.where(noise_BxM, junk_BxMx2[..., 1], vals_BxM)
        pairs_BxNx2[:, M, 0] = query_B
        pairs_BxNx2[:, M, 1] = value_of_BxK[rows, query_B]
        tokens = _with_bos(pairs_BxNx2.reshape(batch, 2 * N))
        mask = np.zeros((batch, self.seq_len), bool)
        mask[:, 1:2 * M:2] = seen_BxM & ~noise_BxM  # a key's position predicts its value
        mask[:, 2 * M + 1] = True
        return Batch(tokens, mask)


@dataclasses.dataclass(frozen=True)
class NoisyRecall(InContextRecall):
    """MAD noisy in-context recall: in-context recall (``InContextRecall``) with a fraction of
    the pair slots replaced by noise tokens that look like pairs but must be ignored.

    MAD baseline sizes (MAD's noisy-in-context-recall task config): ``vocab = 32`` of which
    ``noise_vocab = 16`` are noise ids (8 keys, 8 values), ``frac_noise = 0.2``,
    ``seq_len = 128``.  Chance 1 / 8.
    """

    vocab: int = 32
    seq_len: int = 128
    noise_vocab: int = 16
    frac_noise: float = 0.2


class _KeyValueVocab:
    """MAD's vocabulary for tasks with one special token (fuzzy recall's pad, memorization's
    insert token): the rest splits into keys, then values; chance is one value in n."""

    vocab: int

    @property
    def n_keys(self) -> int:
        return (self.vocab - 1) // 2

    @property
    def n_values(self) -> int:
        return self.vocab - 1 - self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.vocab - 1 + RESERVED

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values


@dataclasses.dataclass(frozen=True)
class FuzzyRecall(_KeyValueVocab):
    """MAD fuzzy in-context recall: keys and values are motifs of 1..``k_motif`` and
    1..``v_motif`` distinct tokens, so a model must recall spans, not single tokens.

    Layout: left padding, then ``key value`` motif pairs up to about ``seq_len`` tokens, then a
    final query pair ``k* v*`` whose key was shown earlier.  Key tokens come from the first
    ``(vocab - 1) // 2`` content ids and value tokens from the rest (MAD's pad token is our
    ``PAD``, leaving ``vocab - 1`` content ids), so motif boundaries are visible.  A key keeps
    one value within a sequence.  Scored: every value token of a pair whose key appeared
    earlier, and of the final pair.  Chance 1 / value tokens.

    ``split="train"`` draws each key's length uniformly from 1..k_motif, as MAD's training set;
    ``split="test"`` uses k_motif-token keys only, as MAD's test set.  Value lengths are always
    uniform in 1..v_motif.

    MAD baseline sizes (MAD's fuzzy-in-context-recall task config): ``vocab = 16`` (7 key
    tokens, 8 value tokens), ``seq_len = 128``, ``k_motif = v_motif = 3``, multi-query.  The
    tokens here are ``seq_len + 1`` long, as MAD's padded instance before its shift.

    One deliberate difference: the first showing of the final key is placed at a position
    drawn so that it always fits; MAD's draw can land past the end of its filling loop, which
    leaves a few percent of final queries with a key never shown (an unanswerable target).
    """

    scoring: ClassVar[str] = "token"

    vocab: int = 16
    seq_len: int = 128
    k_motif: int = 3
    v_motif: int = 3
    split: str = "train"

    def __post_init__(self):
        require(self.split in ("train", "test"),
                f"FuzzyRecall split={self.split!r} must be 'train' or 'test'.")
        require(self.k_motif >= 1 and self.v_motif >= 1,
                f"FuzzyRecall k_motif={self.k_motif}, v_motif={self.v_motif} must be >= 1.")
        require(self.vocab >= 3, f"FuzzyRecall vocab={self.vocab} must be >= 3: a pad, a key "
                "token and a value token.")
        require(self.k_motif <= self.n_keys and self.v_motif <= self.n_values,
                f"FuzzyRecall k_motif={self.k_motif} must be <= {self.n_keys} key tokens and "
                f"v_motif={self.v_motif} <= {self.n_values} value tokens (a motif repeats no "
                "token): raise vocab or lower the motif sizes.")
        span = self.k_motif + self.v_motif
        require(self.seq_len >= 3 * span,
                f"FuzzyRecall seq_len={self.seq_len} must be >= 3 * (k_motif + v_motif) = "
                f"{3 * span}: room for the stored pair, one more pair and the query.")

    def at_length(self, seq_len: int) -> FuzzyRecall:
        return dataclasses.replace(self, seq_len=seq_len)

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        tokens = np.full((batch, self.seq_len + 1), PAD, np.int32)
        mask = np.zeros((batch, self.seq_len), bool)
        for b in range(batch):
            body, scored = self._row(rng)
            start = self.seq_len + 1 - len(body)  # left padding, as MAD
            tokens[b, start:] = np.asarray(body) + RESERVED
            mask[b, start - 1:] = scored  # token j is predicted at position j - 1
        return Batch(tokens, mask)

    def _row(self, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
        K, kmax, vmax = self.n_keys, self.k_motif, self.v_motif

        def key() -> tuple[int, ...]:
            size = kmax if self.split == "test" else int(rng.integers(1, kmax + 1))
            return tuple(int(t) for t in rng.choice(K, size, replace=False))

        def value() -> tuple[int, ...]:
            size = int(rng.integers(1, vmax + 1))
            return tuple(int(t) + K for t in rng.choice(self.n_values, size, replace=False))

        query_k, query_v = key(), value()
        value_of = {query_k: query_v}
        # Stop filling early enough for the final pair; show the query key no later than
        # one pair before the stop, so the filling loop always reaches it.
        stop = self.seq_len - len(query_k) - len(query_v) - (kmax + vmax)
        show_query_at = int(rng.integers(0, stop - (kmax + vmax) + 1))
        body: list[int] = []
        scored: list[bool] = []
        shown: set[tuple[int, ...]] = set()
        while len(body) < stop:
            k = query_k if query_k not in shown and len(body) >= show_query_at else key()
            if k not in value_of:
                value_of[k] = value()
            v = value_of[k]
            body += [*k, *v]
            scored += [False] * len(k) + [k in shown] * len(v)
            shown.add(k)
        body += [*query_k, *query_v]
        scored += [False] * len(query_k) + [True] * len(query_v)
        return body, scored


@dataclasses.dataclass(frozen=True)
class SelectiveCopying:
    """MAD selective copying: ``n_copy`` content tokens scattered among blanks must be
    reproduced in order, blanks skipped.

    Layout: ``PAD`` then ``seq_len - n_copy - 1`` tokens holding the ``n_copy`` content tokens
    with blanks (``PAD``) between them, then ``SEP`` (MAD's copy token), then the content
    tokens again.  As in MAD, each blank goes before a content token chosen uniformly, so the
    last content token always sits right before ``SEP``.  Scored: the ``n_copy`` copied tokens.
    Chance 1 / (vocab - 2).

    Causal-LM reading: MAD feeds blanks where the answer goes and scores the outputs there, so
    the model never reads its own earlier answers; here the answer is the continuation after
    ``SEP`` and the model reads the previous copied tokens (teacher forcing).

    MAD baseline sizes (MAD's selective-copying task config): ``vocab = 16`` (14 content
    tokens, blank, copy token), ``seq_len = 256``, ``n_copy = 16``.
    """

    scoring: ClassVar[str] = "token"

    vocab: int = 16
    seq_len: int = 256
    n_copy: int = 16

    def __post_init__(self):
        require(self.vocab >= 3, f"SelectiveCopying vocab={self.vocab} must be >= 3: blank, copy "
                "token and at least one content token.")
        require(self.n_copy >= 1, f"SelectiveCopying n_copy={self.n_copy} must be >= 1.")
        require(self.seq_len > 2 * self.n_copy + 1,
                f"SelectiveCopying seq_len={self.seq_len} must be > 2 * n_copy + 1 = "
                f"{2 * self.n_copy + 1}: the tokens, at least one blank, the copy token and "
                "the copy.")

    @property
    def vocab_size(self) -> int:
        return self.vocab - 2 + RESERVED

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 2)

    def at_length(self, seq_len: int) -> SelectiveCopying:
        return dataclasses.replace(self, seq_len=seq_len)

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        T, n = self.seq_len, self.n_copy
        blanks = T - 2 * n - 1
        copy_BxN = rng.integers(0, self.vocab - 2, (batch, n)) + RESERVED
        gaps_BxN = rng.multinomial(blanks, np.full(n, 1.0 / n), size=batch)
        where_BxN = 1 + np.cumsum(gaps_BxN, 1) + np.arange(n)  # after the leading PAD
        tokens = np.full((batch, T + 1), PAD, np.int32)
        np.put_along_axis(tokens, where_BxN, copy_BxN, 1)
        tokens[:, T - n] = SEP
        tokens[:, T - n + 1:] = copy_BxN
        mask = np.zeros((batch, T), bool)
        mask[:, T - n:] = True
        return Batch(tokens, mask)


@dataclasses.dataclass(frozen=True)
class Compression:
    """MAD compression, read as a causal language-modelling task.

    MAD trains an encoder-decoder: the encoder reads random tokens and a compression token,
    its last state is the only thing the decoder sees, and the decoder must rebuild every
    token.  A causal LM has no bottleneck to impose, so here the layout is
    ``PAD x_1 .. x_n SEP x_1 .. x_n`` (``SEP`` is MAD's compression token) and the model must
    reproduce the sequence after ``SEP``; ``n = (seq_len - 1) / 2``.  For a model whose
    context is a fixed-size state (a recurrent memory) this is compression; a model that can
    attend back to ``x`` can solve it by copying, so it is a compression test only for the
    former.  Scored: the n reproduced tokens.  Chance 1 / (vocab - 1).

    MAD baseline sizes (MAD's compression task config): ``vocab = 16`` (15 content tokens and
    the compression token), MAD ``seq_len = 32`` = 31 random tokens plus the compression token,
    hence ``seq_len = 63`` here (31 tokens, ``SEP``, 31 reproduced).
    """

    scoring: ClassVar[str] = "token"

    vocab: int = 16
    seq_len: int = 63

    def __post_init__(self):
        require(self.vocab >= 2, f"Compression vocab={self.vocab} must be >= 2: the "
                "compression token and at least one content token.")
        require(self.seq_len % 2 == 1 and self.seq_len >= 3,
                f"Compression seq_len={self.seq_len} must be odd and >= 3: n tokens, SEP and "
                "the n reproduced (seq_len = 2n + 1).")

    @property
    def vocab_size(self) -> int:
        return self.vocab - 1 + RESERVED

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab - 1)

    def at_length(self, seq_len: int) -> Compression:
        return dataclasses.replace(self, seq_len=seq_len)

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        n = (self.seq_len - 1) // 2
        x_BxN = rng.integers(0, self.vocab - 1, (batch, n)) + RESERVED
        tokens = np.full((batch, self.seq_len + 1), PAD, np.int32)
        tokens[:, 1:n + 1], tokens[:, n + 1], tokens[:, n + 2:] = x_BxN, SEP, x_BxN
        mask = np.zeros((batch, self.seq_len), bool)
        mask[:, n + 1:] = True
        return Batch(tokens, mask)


@dataclasses.dataclass(frozen=True)
class Memorization(_KeyValueVocab):
    """MAD memorization: a fixed key -> value map, the same for every sample, so a value can
    only come from the weights, never from the context.

    The map is drawn once from ``np.random.default_rng(map_seed)`` (independent of the sample
    rng): the ``K = (vocab - 1) // 2`` keys each get a distinct value among the other
    ``vocab - 1 - K`` content ids.  Layout: ``PAD k_1 v_1 .. k_P v_P`` with ``P = seq_len / 2``;
    a key's position predicts its value.  MAD puts an insert token after each key and emits the
    value there, never showing it; our shifted targets must be tokens, so the value follows its
    key and is read afterwards.  To keep the context from ever revealing an answer, the keys
    of one sequence are distinct (MAD draws them with replacement).  Chance 1 / values.

    MAD baseline sizes (MAD's memorization task config): ``vocab = 256`` (255 content ids:
    127 keys, 128 values, and the insert token we drop), ``seq_len = 32`` (16 pairs),
    ``map_seed = 12345`` (MAD's default seed; the map itself differs from MAD's draw).
    """

    scoring: ClassVar[str] = "token"

    vocab: int = 256
    seq_len: int = 32
    map_seed: int = 12345

    def __post_init__(self):
        require(self.vocab >= 3, f"Memorization vocab={self.vocab} must be >= 3: a key, a value "
                "and MAD's insert token.")
        require(self.seq_len % 2 == 0 and self.seq_len >= 2,
                f"Memorization seq_len={self.seq_len} must be even and >= 2: key-value pairs.")
        require(self.seq_len // 2 <= self.n_keys,
                f"Memorization seq_len={self.seq_len} holds {self.seq_len // 2} pairs but there "
                f"are only {self.n_keys} keys (distinct per sequence): lower seq_len to <= "
                f"{2 * self.n_keys} or raise vocab.")

    def value_of(self) -> np.ndarray:
        """int [n_keys]: each key's value id (before the RESERVED shift), fixed by map_seed."""
        return self.n_keys + np.random.default_rng(self.map_seed).permutation(self.n_values)[
            :self.n_keys]

    def at_length(self, seq_len: int) -> Memorization:
        return dataclasses.replace(self, seq_len=seq_len)

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        P = self.seq_len // 2
        keys_BxP = np.argsort(rng.random((batch, self.n_keys)), axis=1)[:, :P]
        pairs_BxPx2 = np.stack([keys_BxP, self.value_of()[keys_BxP]], -1)
        tokens = _with_bos(pairs_BxPx2.reshape(batch, 2 * P))
        mask = np.zeros((batch, self.seq_len), bool)
        mask[:, 1::2] = True
        return Batch(tokens, mask)

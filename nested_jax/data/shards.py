"""Token shards: a corpus tokenized once (`nested-jax prepare-data`), read by many hosts.

A shard directory holds

  manifest.json                                  written last: a directory with it is complete
  tokens-<id>-00000-of-00016.array_record        one record per document: its token ids
  ...

A record is one document's ids (without the end-of-document id, which the pipeline
appends) as little-endian unsigned integers of the manifest's `dtype`: uint8 for a
vocabulary of at most 256 ids, uint16 up to 65,536, uint32 above. The ArrayRecord files
are written with group_size:1, the random-access layout grain reads fast.

manifest.json records what the shards hold and how they were made:

  format, version     "nested_jax.token_shards", 1
  id                  hash of the preparation (tokenizer, inputs and their sizes, options);
                      every shard file carries it, so shards of two preparations never mix
  tokenizer           spec, fingerprint ("byte" or the model file's sha256), vocab_size, eos_id
  dtype, documents, tokens, shards [{file, documents, tokens}], source {inputs, files, ...}

Reading (`open_shards`; `sources.load_documents` calls it for a directory holding a
manifest) reads the manifest and lists the directory; a shard file is opened only when one
of its documents is first read. Held-out split and hosts (`TokenShards.part`):

- held out: heldout_size(documents) documents in all, spread over the shards in
  proportion to their documents; in each shard, the first k positions of a fixed
  permutation (grain's index_shuffle, seed SPLIT_SEED + shard). It depends on the
  directory alone, never on the process count or the seed, so `nested-jax eval` on one
  host scores exactly the documents a pod held out.
- hosts: with at least as many shards as processes, process p reads shards p, p + P,
  p + 2P, ... and opens no other file (a shard count that is a multiple of P balances
  them). With fewer shards than processes, each reads every P-th document of all shards.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import re
import threading
from collections.abc import Sequence

import numpy as np
from etils import epath

from nested_jax.data.fallback import SPLIT_SEED
from nested_jax.data.sources import DataError

log = logging.getLogger(__name__)

FORMAT = "nested_jax.token_shards"
VERSION = 1
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1"
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access
SHARD_NAME = re.compile(r"(?:\.partial-)?tokens-([0-9a-f]+)-(\d{5})-of-(\d{5})\.array_record")


def shard_name(prep_id: str, index: int, count: int) -> str:
    return f"tokens-{prep_id}-{index:05d}-of-{count:05d}.array_record"


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype holding every id of the vocabulary."""
    return "uint8" if vocab_size <= 1 << 8 else "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_identity(tokenizer, spec: str | None = None) -> dict:
    """What the manifest records of a tokenizer (what a run's tokenizer must match); `spec`
    is the name the user gave (e.g. "mistral" rather than the cached model file's path)."""
    return {"spec": spec or tokenizer.spec,
            "fingerprint": getattr(tokenizer, "fingerprint", tokenizer.spec),
            "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id)}


def _as_dir(path: str | epath.Path) -> epath.Path:
    path = epath.Path(path)
    return path.parent if path.name == MANIFEST else path


def read_manifest(directory: epath.Path) -> dict | None:
    """The manifest of a shard directory; None where there is no manifest.json (or another
    program's); a DataError naming the file if it is ours but unreadable or too new."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: {path} is not valid JSON ({e}); prepare-data writes it "
                        "last, so re-run nested-jax prepare-data into a new directory") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if manifest.get("version") != VERSION:
        raise DataError(f"data.path: {path} has format version {manifest.get('version')}; this "
                        f"nested_jax reads version {VERSION}: re-run nested-jax prepare-data")
    return manifest


def is_shard_dir(path: str | epath.Path) -> bool:
    path = _as_dir(path)
    return path.is_dir() and read_manifest(path) is not None


def owning_shard_dir(path: epath.Path) -> epath.Path | None:
    """The shard directory a file belongs to (its directory holds our manifest), if any."""
    if SHARD_NAME.fullmatch(path.name) or read_manifest(path.parent) is not None:
        return path.parent
    return None


class _ShardFile:
    """One shard, opened on first read (a host never opens the shards it does not read)."""

    def __init__(self, path: epath.Path, documents: int, dtype: str):
        self.path, self.documents, self.dtype = path, documents, np.dtype(dtype).newbyteorder("<")
        self._reader = None
        self._lock = threading.Lock()

    def _open(self):
        from array_record.python.array_record_module import ArrayRecordReader

        with self._lock:
            if self._reader is None:
                try:
                    reader = ArrayRecordReader(str(self.path), READER_OPTIONS)
                except (RuntimeError, OSError) as e:
                    raise DataError(f"data.path: cannot read the shard {self.path}: {e}") from e
                if reader.num_records() != self.documents:
                    raise DataError(
                        f"data.path: {self.path} holds {reader.num_records()} documents, its "
                        f"manifest says {self.documents}: the shard was changed or replaced; "
                        "re-run nested-jax prepare-data")
                self._reader = reader
        return self._reader

    def __getitem__(self, position: int) -> np.ndarray:
        reader = self._reader or self._open()
        record = reader.read([int(position)])[0]
        return np.frombuffer(record, self.dtype).astype(np.int32)

    def __getstate__(self):
        return {"path": self.path, "documents": self.documents, "dtype": self.dtype}

    def __setstate__(self, state):
        self.__dict__.update(state, _reader=None, _lock=threading.Lock())


@functools.cache
def _index_shuffle():
    from grain.experimental import index_shuffle

    return index_shuffle


class _Segment:
    """Positions [start, stop) of a shard, in the shard's fixed permutation if `seed` is set."""

    def __init__(self, shard: _ShardFile, start: int, stop: int, seed: int | None):
        self.shard, self.start, self.stop, self.seed = shard, start, stop, seed

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> np.ndarray:
        j = self.start + i
        if self.seed is not None:
            j = _index_shuffle()(j, max_index=self.shard.documents - 1, seed=self.seed, rounds=4)
        return self.shard[j]


class _Documents(Sequence):
    """Segments read as one sequence of token-id arrays (every `step`-th from `offset`)."""

    def __init__(self, segments: list[_Segment], offset: int = 0, step: int = 1):
        self.segments = [s for s in segments if len(s)]
        self._ends = np.cumsum([len(s) for s in self.segments]).tolist()
        total = self._ends[-1] if self._ends else 0
        self._offset, self._step = offset, step
        self._len = max(0, -(-(total - offset) // step))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if not 0 <= i < self._len:
            raise IndexError(i)
        i = self._offset + i * self._step
        k = bisect.bisect_right(self._ends, i)
        return self.segments[k][i - (self._ends[k - 1] if k else 0)]

    @property
    def files(self) -> list[epath.Path]:
        return sorted({s.shard.path for s in self.segments}, key=str)


class TokenShards(_Documents):
    """A shard directory: every document as token ids, plus the split and host parts."""

    def __init__(self, directory: epath.Path, manifest: dict):
        self.path, self.manifest = directory, manifest
        self.description = str(directory)
        dtype = manifest["dtype"]
        self.shards = [_ShardFile(directory / s["file"], int(s["documents"]), dtype)
                       for s in manifest["shards"]]
        super().__init__([_Segment(s, 0, s.documents, None) for s in self.shards])

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    def check_tokenizer(self, tokenizer, spec: str | None = None) -> None:
        """A DataError naming both tokenizers and the fix unless `tokenizer` made the shards
        (same fingerprint and vocabulary; the spec may differ, e.g. another path to the same
        model file). `spec`: the run's tokenizer as the user named it."""
        want, have = self.tokenizer, tokenizer_identity(tokenizer, spec)
        if (want["fingerprint"], want["vocab_size"]) == (have["fingerprint"], have["vocab_size"]):
            return
        same = " (a model file with that sha256)" if want["fingerprint"].startswith("sha") else ""
        raise DataError(
            f"data.path={str(self.path)!r}: the shards were tokenized with {want['spec']!r} "
            f"({want['fingerprint'][:23]}, vocabulary {want['vocab_size']}), this run's tokenizer "
            f"is {have['spec']!r} ({have['fingerprint'][:23]}, vocabulary {have['vocab_size']}). "
            f"Train with --tokenizer {want['spec']}{same}, or tokenize for this tokenizer: "
            f"nested-jax prepare-data --tokenizer {have['spec']} --output NEW_DIR ...")

    def _segments(self, shard_ids: Sequence[int], split: str, n_heldout: int) -> list[_Segment]:
        """This split's documents of the given shards (the held-out ones: n_heldout in all)."""
        total = len(self)
        counts = [s.documents for s in self.shards]
        cum = np.cumsum([0] + counts).tolist()
        out = []
        for k in shard_ids:
            shard = self.shards[k]
            if split == "all":
                out.append(_Segment(shard, 0, shard.documents, None))
                continue
            held = cum[k + 1] * n_heldout // total - cum[k] * n_heldout // total
            start, stop = (0, held) if split == "heldout" else (held, shard.documents)
            out.append(_Segment(shard, start, stop, (SPLIT_SEED + k) % (1 << 32)))
        return out

    def part(self, split: str, n_heldout: int, index: int = 0, count: int = 1, *,
             whole_if_short: bool = False) -> _Documents:
        """Process `index` of `count`'s documents of a split ("train", "heldout" or "all").

        `whole_if_short`: where some process would get no documents, every process reads
        the whole split instead (evaluation: the mean is unchanged).
        """
        n = len(self.shards)
        if count > 1 and n < count:
            log.warning("%s has %d shards for %d processes: each process reads every %d-th "
                        "document of all shards; prepare-data --num-shards %d (a multiple of "
                        "the process count) lets each read only its own shards",
                        self.path, n, count, count, count)
            mine = _Documents(self._segments(range(n), split, n_heldout), index, count)
            sizes = [len(mine)] if not whole_if_short else [
                len(_Documents(mine.segments, i, count)) for i in range(count)]
        else:
            parts = [list(range(i, n, count)) for i in range(count)]
            mine = _Documents(self._segments(parts[index], split, n_heldout))
            sizes = [len(mine)] if not whole_if_short else [
                len(_Documents(self._segments(p, split, n_heldout))) for p in parts]
        if whole_if_short and count > 1 and min(sizes) == 0:
            log.warning("the %s split of %s leaves a process without documents; each of the %d "
                        "processes reads all of it", split, self.path, count)
            return _Documents(self._segments(range(n), split, n_heldout))
        return mine


def open_shards(path: str | epath.Path) -> TokenShards:
    """The token shards at `path` (a directory, or its manifest.json); DataErrors name the path.

    Checks, without opening a shard: the manifest is ours, names files that are all there,
    and the directory holds no shard of another preparation.
    """
    directory = _as_dir(path)
    if not directory.exists():
        raise DataError(f"data.path={str(path)!r}: no such directory; pass --data with a "
                        "directory written by nested-jax prepare-data")
    manifest = read_manifest(directory)
    names = {p.name for p in directory.iterdir()}
    if manifest is None:
        stray = sorted(n for n in names if SHARD_NAME.fullmatch(n))
        hint = (f" (it holds {len(stray)} shard files such as {stray[0]}: an interrupted "
                "prepare-data? run it again)" if stray else "")
        raise DataError(f"data.path={str(path)!r}: no {MANIFEST} of token shards{hint}; "
                        "prepare one with nested-jax prepare-data --output DIR")
    listed = [s["file"] for s in manifest["shards"]]
    missing = [f for f in listed if f not in names]
    if missing:
        raise DataError(f"data.path={str(path)!r}: {len(missing)} of the {len(listed)} shards "
                        f"in {MANIFEST} are missing ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}); copy the whole directory or "
                        "re-run nested-jax prepare-data")
    foreign = sorted(n for n in names - set(listed) if SHARD_NAME.fullmatch(n)
                     or n.endswith(".array_record"))
    if foreign:
        ids = sorted({m.group(1) for n in foreign if (m := SHARD_NAME.fullmatch(n))})
        raise DataError(
            f"data.path={str(path)!r}: holds {len(foreign)} shard files its {MANIFEST} (id "
            f"{manifest['id']}) does not list, e.g. {foreign[0]}"
            + (f" (preparation {', '.join(ids)})" if ids else "")
            + ": shards of two preparations are mixed. Keep each prepare-data output in its "
            "own directory")
    shards = TokenShards(directory, manifest)
    if len(shards) == 0:
        raise DataError(f"data.path={str(path)!r}: its shards hold no documents; prepare them "
                        "from non-empty data")
    return shards

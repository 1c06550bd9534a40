"""`nested-jax prepare-data`: tokenize text or JSONL once, into token shards (data/shards.py).

    prepare(["corpus/*.jsonl.gz"], "gs://bucket/shards", "mistral", num_shards=64)

Every input file is read one document at a time (data/streaming.py: the documents
`--data FILE` would read, never a whole file in memory), tokenized (by `workers`
processes, results kept in input order) and written as document k to shard k mod
num_shards; documents that tokenize to nothing are skipped. The same inputs, tokenizer and
options give byte-identical shards and manifest.

Nothing half-done ever looks done: shards are written under `.partial-` names and renamed
once all are complete, and manifest.json comes last. gs:// output is staged in a local
temporary directory (TMPDIR: room for the whole output) and copied up at the end. Before
any work, the output is checked: a directory holding this same preparation is left as it
is ("already prepared"); the leftovers of an interrupted run of it are overwritten (their
names are the same, and so is their content); anything else there (another preparation,
other files) is refused, naming the path. A second prepare-data into a local output that one
is writing fails at once (OutputBusyError): two writers would truncate each other's shards.
Run it on one machine (`--workers` for its cores); the hosts of a pod then each read their
own shards of the result.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from nested_jax.data import corpus, shards, sources, streaming, tokenizers
from nested_jax.data.sources import DataError

log = logging.getLogger(__name__)

BATCH_DOCS = 256       # documents per tokenizer task
LOG_EVERY_S = 30.0


def _readable(path: epath.Path) -> bool:
    """A file a directory contributes: text, JSONL or ArrayRecord (also gzipped)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return (name.endswith(sources.TEXT_SUFFIXES + sources.JSONL_SUFFIXES)
            or sources.is_array_record(path))


def input_files(inputs: Sequence[str]) -> list[epath.Path]:
    """The files the inputs name (files, directories, globs, builtin:wikipedia), in order.

    A directory gives its text, JSONL and ArrayRecord files (also .gz) below it, sorted; a
    glob every matching file; a file itself. Token shards are refused (they are not text).
    """
    files: list[epath.Path] = []
    for spec in inputs:
        if spec == corpus.NAME:
            files.append(epath.Path(corpus.wikipedia_path()))
            continue
        path = sources._path(spec)
        if shards.is_shard_dir(path):
            raise DataError(f"--input {spec}: already token shards (it holds their manifest); "
                            "train on it with --data, or give the text it was made from")
        if path.is_dir():
            found = sorted((f for f in sources._walk(path) if _readable(f)), key=str)
        else:
            found = [f for f in sources._files(spec) if f.exists() and not f.is_dir()]
        if not found:
            raise DataError(f"--input {spec}: no such file, or no text/JSONL/ArrayRecord file "
                            "under it or matching it")
        for f in found:
            if sources.is_array_record(f) and shards.owning_shard_dir(f) is not None:
                raise DataError(f"--input {spec}: {f} is a token shard, not text; give the text "
                                "the shards were made from")
        files.extend(found)
    return files


def _size(path: epath.Path) -> int:
    try:
        return int(path.stat().length)
    except (AttributeError, OSError, NotImplementedError):
        return -1


def plan(inputs: Sequence[str], tokenizer: tokenizers.Tokenizer, *, spec: str, num_shards: int,
         text_field: str, decode_errors: str) -> tuple[dict, list[epath.Path]]:
    """(the manifest without counts, the input files); its id names this preparation.
    `spec` is the tokenizer as the user named it."""
    files = input_files(inputs)
    listing = hashlib.sha256()
    for f in files:
        listing.update(f"{f}\t{_size(f)}\n".encode())
    manifest = {
        "format": shards.FORMAT, "version": shards.VERSION, "id": "",
        "tokenizer": shards.tokenizer_identity(tokenizer, spec),
        "dtype": shards.token_dtype(tokenizer.vocab_size),
        "source": {"inputs": list(inputs), "files": len(files),
                   "files_sha256": listing.hexdigest(), "text_field": text_field,
                   "decode_errors": decode_errors, "max_doc_chars": sources.MAX_DOC_CHARS,
                   "line_bytes": streaming.LINE_BYTES},
        "num_shards": num_shards,
    }
    manifest["id"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
    return manifest, files


def _check_output(out: epath.Path, prep_id: str) -> dict | None:
    """The manifest of this same preparation if `out` holds it; None if `out` may be written
    (empty, or holding an interrupted run's leftovers); a ValueError naming `out` otherwise."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"--output {out}: a file, not a directory; give a new directory")
    try:
        manifest = shards.read_manifest(out)
    except DataError as e:
        raise ValueError(f"--output {out}: {e}") from e
    if manifest is not None:
        if manifest["id"] == prep_id:
            return manifest
        tok = manifest["tokenizer"]
        raise ValueError(
            f"--output {out}: already holds token shards of another preparation (id "
            f"{manifest['id']}: tokenizer {tok['spec']}, inputs "
            f"{' '.join(manifest['source']['inputs'])}, {manifest['num_shards']} shards); give "
            "a new --output directory, or delete this one to replace it")
    ours = (f".partial-tokens-{prep_id}-", f"tokens-{prep_id}-", ".partial-" + shards.MANIFEST)
    names = [e.name for e in out.iterdir()]
    others = sorted(n for n in names if not n.startswith(ours))
    if others:
        raise ValueError(f"--output {out}: not empty and no token shard directory (it holds "
                         f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); give "
                         "an empty or new directory")
    if names:
        log.info("%s holds %d files of an interrupted run of this preparation: redoing it",
                 out, len(names))
    return None


# ---- tokenizing, in this process or in `workers` processes (in input order) ------------------

_worker_tokenizer = None


def _start_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizers.get_tokenizer(spec)


def _encode(texts: list[str]) -> list[np.ndarray]:
    return [_worker_tokenizer.encode(t) for t in texts]


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenized(docs: Iterable[str], tokenizer: tokenizers.Tokenizer,
               workers: int) -> Iterator[np.ndarray]:
    """Token ids of each document, in order; at most 2 * workers batches in flight."""
    if workers <= 1:
        for doc in docs:
            yield tokenizer.encode(doc)
        return
    ctx = multiprocessing.get_context("spawn")  # safe whatever the parent imported (JAX)
    with ctx.Pool(workers, initializer=_start_worker, initargs=(tokenizer.spec,)) as pool:
        pending = collections.deque()
        for batch in _batches(docs):
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def staged(out: epath.Path) -> bool:
    """Whether shards for `out` are written in a local temporary directory and copied up
    (an object store: ArrayRecord writes local files only)."""
    return "://" in str(out)


# ---- writing --------------------------------------------------------------------------------


class _Writers:
    """num_shards ArrayRecord writers under .partial- names in `stage`."""

    def __init__(self, stage: epath.Path, prep_id: str, num_shards: int, dtype: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.stage = stage
        self.names = [shards.shard_name(prep_id, i, num_shards) for i in range(num_shards)]
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.documents = [0] * num_shards
        self.tokens = [0] * num_shards
        self._writers = [ArrayRecordWriter(str(self.partial(n)), shards.WRITER_OPTIONS)
                         for n in self.names]

    def partial(self, name: str) -> epath.Path:
        return self.stage / f".partial-{name}"

    def write(self, k: int, ids: np.ndarray) -> None:
        i = k % len(self._writers)
        self._writers[i].write(ids.astype(self.dtype).tobytes())
        self.documents[i] += 1
        self.tokens[i] += int(ids.size)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []

    def remove(self) -> None:
        self.close()
        for n in self.names:
            self.partial(n).unlink(missing_ok=True)


def prepare(inputs: Sequence[str], output: str, tokenizer: str, *, num_shards: int = 16,
            text_field: str = "text", decode_errors: str = "strict",
            workers: int = 1) -> dict:
    """Tokenize `inputs` into token shards at `output`; returns the manifest (module docstring).

    Raises ValueError (bad tokenizer or output, before any work) or DataError (unreadable
    input, naming the file, line and byte offset).
    """
    if num_shards < 1 or num_shards > 99_999:
        raise ValueError(f"--num-shards {num_shards}: must be in 1..99999")
    if decode_errors not in ("strict", "replace"):
        raise ValueError(f"--decode-errors {decode_errors}: must be strict or replace")
    if tokenizer.startswith("sentencepiece-train:"):
        raise ValueError(f"--tokenizer {tokenizer}: prepare-data needs a finished tokenizer; "
                         "train one first (e.g. a run's WORKDIR/tokenizer.model) and pass "
                         "sentencepiece:PATH, or use byte or mistral")
    try:
        tok = tokenizers.get_tokenizer(tokenizer)
    except ValueError as e:
        raise ValueError(f"--tokenizer: {e}") from e
    manifest, files = plan(inputs, tok, spec=tokenizer, num_shards=num_shards,
                           text_field=text_field, decode_errors=decode_errors)
    out = epath.Path(output if "://" in output else os.path.abspath(os.path.expanduser(output)))
    done = _check_output(out, manifest["id"])
    if done is not None:
        log.info("%s already holds this preparation (id %s): nothing to do", out, done["id"])
        return done
    out.mkdir(parents=True, exist_ok=True)
    local = not staged(out)
    with _exclusive(out) if local else contextlib.nullcontext():
        if local and (done := _check_output(out, manifest["id"])) is not None:
            log.info("%s was prepared by another run meanwhile (id %s)", out, done["id"])
            return done
        return _write(files, tok, manifest, out, local, workers)


class OutputBusyError(RuntimeError):
    """Another prepare-data is writing the same output directory."""


@contextlib.contextmanager
def _exclusive(out: epath.Path):
    """Hold an exclusive flock on the output directory itself while writing into it.

    Two prepare-data runs into one directory would open the same `.partial-` shards, truncate
    each other's and publish a damaged one.  The lock is on the directory (nothing is left in
    it), and the kernel drops it however the process dies.
    """
    import fcntl

    fd = os.open(str(out), os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(
                f"--output {out}: another prepare-data is writing this directory; wait for it "
                "to finish (then this command has nothing to do) or give another --output"
            ) from None
        except OSError as e:  # a filesystem without flock: say so, write unprotected
            log.warning("could not lock %s (%s); make sure no other prepare-data writes it",
                        out, e.strerror)
        yield
    finally:
        os.close(fd)  # drops the lock


def _write(files, tok, manifest: dict, out: epath.Path, local: bool, workers: int) -> dict:
    num_shards = manifest["num_shards"]
    stage = out if local else epath.Path(tempfile.mkdtemp(prefix="nested_jax_prepare_"))
    log.info("tokenizing %d files with %s into %d shards at %s (id %s)", len(files), tok.spec,
             num_shards, out, manifest["id"])
    writers = _Writers(stage, manifest["id"], num_shards, manifest["dtype"])
    try:
        _fill(writers, files, tok, manifest, workers)
        writers.close()
        _publish(writers, out, stage, manifest, local)
    except BaseException:
        writers.remove()
        raise
    finally:
        if not local:
            shutil.rmtree(str(stage), ignore_errors=True)
    log.info("wrote %d documents, %d tokens into %d shards at %s", manifest["documents"],
             manifest["tokens"], num_shards, out)
    return manifest


def _fill(writers: _Writers, files: list[epath.Path], tok, manifest: dict, workers: int) -> None:
    src = manifest["source"]
    docs = streaming.iter_documents(files, text_field=src["text_field"],
                                    decode_errors=src["decode_errors"])
    vocab, k, skipped, start, last = tok.vocab_size, 0, 0, time.time(), time.time()
    for ids in _tokenized(docs, tok, workers):
        ids = np.asarray(ids)
        if ids.size == 0:
            skipped += 1
            continue
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"--tokenizer {tok.spec}: produced id {int(ids.max())} outside its "
                             f"vocabulary of {vocab}")
        writers.write(k, ids)
        k += 1
        if time.time() - last > LOG_EVERY_S:
            last = time.time()
            log.info("%d documents, %d tokens (%.0f tokens/s)", k, sum(writers.tokens),
                     sum(writers.tokens) / (last - start))
    if k == 0:
        raise DataError(f"--input {' '.join(src['inputs'])}: no documents in {len(files)} files")
    manifest.update(documents=k, tokens=sum(writers.tokens), skipped_empty=skipped,
                    shards=[{"file": n, "documents": d, "tokens": t} for n, d, t in
                            zip(writers.names, writers.documents, writers.tokens, strict=True)])


def _publish(writers: _Writers, out: epath.Path, stage: epath.Path, manifest: dict,
             local: bool) -> None:
    """Shards to their final names, then manifest.json (a directory with it is complete)."""
    for name in writers.names:
        src = writers.partial(name)
        if local:
            src.replace(out / name)
        else:
            src.copy(out / name, overwrite=True)
            src.unlink()
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if local:
        tmp = out / (".partial-" + shards.MANIFEST)
        tmp.write_text(text)
        tmp.replace(out / shards.MANIFEST)
    else:  # an object store writes an object whole or not at all
        (out / shards.MANIFEST).write_text(text)

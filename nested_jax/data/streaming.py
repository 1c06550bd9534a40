"""Documents read one at a time from files of any size (what `prepare-data` tokenizes).

`iter_documents(files)` yields the same documents `sources.load_documents` reads from each
file, but holds at most one line (text: at most LINE_BYTES of it) and one document in
memory, never the whole file:

  *.txt, *.md, *.text   paragraphs, exactly `sources.split_paragraphs` of the file, computed
                        line by line; a line longer than LINE_BYTES arrives in pieces, so
                        only such a line may be cut elsewhere than split_paragraphs cuts it
  *.jsonl, *.json       one JSON object (or bare string) per line; lines end at "\\n" only
  *array_record*        one document per record (UTF-8 text or a JSON object)
  NAME.gz               the same, gunzipped on the fly (corpus.jsonl.gz, notes.txt.gz)

Paths go through `etils.epath` (local or gs://). Bad bytes are a DataError naming the
file, the line and the byte offset in the (uncompressed) file, as `sources.decode` does.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from collections.abc import Iterable, Iterator, Sequence

from etils import epath

from nested_jax.data import sources
from nested_jax.data.sources import DataError

LINE_BYTES = 1 << 20  # text is read in lines of at most this many bytes
RECORDS_PER_READ = 1024  # ArrayRecord records read at a time
_SEPARATOR = re.compile(r"[ \t]*\n")  # a blank line: the paragraph break of split_paragraphs


def kind(path: epath.Path) -> str:
    """"text", "jsonl" or "array_record": how `path` is read (the suffix before any .gz)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if sources.is_array_record(path):
        return "array_record"
    if any(name.endswith(s) for s in sources.JSONL_SUFFIXES):
        return "jsonl"
    return "text"


@contextlib.contextmanager
def _open(path: epath.Path):
    with path.open("rb") as f:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g
        else:
            yield f


def _char_boundary(raw: bytes) -> int:
    """The end of the last whole UTF-8 character in `raw` (an incomplete one is held back)."""
    i = len(raw)
    while i > 0 and len(raw) - i < 4 and raw[i - 1] & 0xC0 == 0x80:
        i -= 1  # continuation bytes
    if i > 0 and raw[i - 1] >= 0xC0:  # a lead byte: is its sequence complete?
        need = 2 if raw[i - 1] < 0xE0 else 3 if raw[i - 1] < 0xF0 else 4
        if len(raw) - (i - 1) < need:
            return i - 1
    return len(raw)


def lines(path: epath.Path, errors: str = "strict", limit: int | None = None) -> Iterator[str]:
    """The decoded lines of a file, each ending in "\\n" (the last may not).

    With `limit`, a line longer than `limit` bytes arrives in pieces (cut between
    characters); without, every line arrives whole.
    """
    offset, line, carry = 0, 1, b""
    with _open(path) as f:
        while True:
            raw = f.readline(limit) if limit else f.readline()
            if not raw and not carry:
                return
            raw, carry = carry + raw, b""
            if raw and not raw.endswith(b"\n") and limit and len(raw) >= limit:
                cut = _char_boundary(raw)
                raw, carry = raw[:cut], raw[cut:]
            yield sources.decode(raw, str(path), errors, offset=offset, line=line)
            offset += len(raw)
            line += raw.count(b"\n")


class _Cutter:
    """`split_paragraphs`' treatment of one paragraph, fed its lines as they come.

    The paragraph is stripped of "\\n" at both ends, skipped if blank, and cut greedily at
    line ends (str.splitlines) into documents of at most max_chars (one line may exceed it).
    Only the current document, the last line and the "\\n"s after it are held.
    """

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.started = False   # a line other than "\n" was seen (the leading strip is done)
        self.held = None       # the last such line: the paragraph's last line loses its "\n"
        self.newlines = 0      # "\n" lines after it: kept only if more text follows
        self.piece = ""        # the document being filled
        self.blank = []        # whitespace-only documents, emitted only if text follows
        self.text = False      # the paragraph has a non-whitespace character

    def add(self, line: str) -> Iterator[str]:
        for sub in line.splitlines(keepends=True):
            if sub == "\n":
                self.newlines += self.started
                continue
            self.started = True
            if self.held is not None:
                yield from self._push(self.held)
                for _ in range(self.newlines):
                    yield from self._push("\n")
            self.held, self.newlines = sub, 0

    def finish(self) -> Iterator[str]:
        if self.held is not None:
            yield from self._push(self.held[:-1] if self.held.endswith("\n") else self.held)
        if self.text and self.piece.strip():
            yield self.piece
        self.__init__(self.max_chars)

    def _push(self, sub: str) -> Iterator[str]:
        if self.piece and len(self.piece) + len(sub) > self.max_chars:
            if self.text:
                yield self.piece
            else:
                self.blank.append(self.piece)
            self.piece = ""
        if not self.text and sub.strip():
            self.text = True
            yield from self.blank
            self.blank = []
        self.piece += sub


def paragraphs(text_lines: Iterable[str],
               max_chars: int = sources.MAX_DOC_CHARS) -> Iterator[str]:
    """`sources.split_paragraphs` of the concatenated lines, one document at a time.

    A paragraph ends at a blank line ([ \\t]* then "\\n") that follows a line end not already
    taken by the previous break, as `re.split(r"\\n[ \\t]*\\n", text)` reads the text.
    """
    cutter = _Cutter(max_chars)
    line_end = False  # the previous line's "\n" is free to start a break
    for line in text_lines:
        if line_end and _SEPARATOR.fullmatch(line):
            yield from cutter.finish()
            line_end = False
            continue
        yield from cutter.add(line)
        line_end = line.endswith("\n")
    yield from cutter.finish()


def _jsonl(path: epath.Path, text_field: str, errors: str) -> Iterator[str]:
    for i, line in enumerate(lines(path, errors), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.path: {path}:{i} is not JSON lines ({e.msg}); give one "
                            "JSON object or string per line") from e
        doc = sources.text_from_json(obj, text_field, f"{path}:{i}")
        if doc.strip():
            yield doc


def _array_record(path: epath.Path, text_field: str, errors: str) -> Iterator[str]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        n = reader.num_records()
        for start in range(0, n, RECORDS_PER_READ):
            for i, record in enumerate(reader.read(start, min(n, start + RECORDS_PER_READ))):
                yield sources.record_text(record, f"{path} record {start + i}", text_field,
                                          errors)
    finally:
        reader.close()


def file_documents(path: epath.Path, *, text_field: str = "text",
                   decode_errors: str = "strict") -> Iterator[str]:
    """The documents of one file, one at a time (see the module docstring)."""
    what = kind(path)
    if what == "jsonl":
        return _jsonl(path, text_field, decode_errors)
    if what == "array_record":
        return _array_record(path, text_field, decode_errors)
    return paragraphs(lines(path, decode_errors, LINE_BYTES))


def iter_documents(files: Sequence[epath.Path], *, text_field: str = "text",
                   decode_errors: str = "strict") -> Iterator[str]:
    """The documents of `files`, in order, one at a time."""
    for path in files:
        yield from file_documents(path, text_field=text_field, decode_errors=decode_errors)

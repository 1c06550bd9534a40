"""Build a cached file once, safely when several processes start at the same time.

Two suite shards launched together both find the corpus cache (or the shared tokenizer) absent
and both build it.  Each writer therefore writes a private temporary file beside the target
and links it into place: the first link wins, later writers discard their copy and use the
winner's, and no reader ever sees a half-written file.  A shared temporary name would let one
writer rename the other's file away mid-write.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Callable


def write_once(target: os.PathLike | str,
               write: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """`target`, created by `write(tmp)` (which writes the file at path `tmp`) unless it exists.

    Safe against concurrent callers and against a writer killed mid-write: the target appears
    whole or not at all, and once it exists it is never replaced.
    """
    target = pathlib.Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        write(tmp)
        try:
            os.link(tmp, target)  # fails if another writer got there first: theirs stands
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: atomic replace, last writer wins
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target

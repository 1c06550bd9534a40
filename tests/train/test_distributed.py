"""A 2-process `jax.distributed` CPU run: each process reads its shard, one checkpoint."""

import json
import socket
import subprocess
import sys

import pytest

from tests.subprocess_env import cpu_env

from .conftest import write_corpus


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    data = write_corpus(tmp_path / "data")
    workdir = tmp_path / "run"
    port = _free_port()
    env = cpu_env(devices=2)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "nested_jax.cli", "train", "--workdir", str(workdir),
             "--data", str(data), "--steps", "6", "--preset", "tiny", "--seq-len", "32",
             "--batch-size", "8", "--no-progress", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), "--set", "log_every=1",
             "--set", "checkpoint_every=3", "--set", "eval_batches=1",
             "--set", "mesh.data=2", "--set", "mesh.fsdp=2",
             "--set", "data.eval_fraction=0.1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    run = json.loads((workdir / "run.json").read_text())
    assert run["processes"] == 2 and run["devices"] == 4
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]
    assert len(list((workdir / "checkpoints" / "6" / "data").glob("process_*-of-2.json"))) == 2
    assert "held-out perplexity" in outs[0][0]

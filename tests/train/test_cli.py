"""`nested-jax` end to end (train -> resume -> eval -> generate) and its config errors."""

import dataclasses
import importlib.util
import json
import re

import jax.numpy as jnp
import pytest
from flax import nnx

from nested_jax import cli
from nested_jax.models import registry
from nested_jax.models.config import ModelConfig, Preset
from nested_jax.train import evaluate

TINY = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--no-progress",
        "--set", "eval_batches=2", "--set", "log_every=2", "--set", "optim.warmup_steps=2"]


def _ppl(text):
    m = re.search(r"held-out perplexity: ([\d.]+) \(step (\d+)\) -> ([\d.]+) \(step (\d+)\)", text)
    assert m, text
    return float(m[1]), int(m[2]), float(m[3]), int(m[4])


def test_train_resume_eval_generate(corpus, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--data", str(corpus), "--steps", "8",
                     *TINY]) == 0
    before, s0, after, s1 = _ppl(capsys.readouterr().out)
    assert (s0, s1) == (0, 8) and after < before
    for name in ("config.json", "run.json", "metrics.jsonl", "loss_curve.png", "train.log"):
        assert (workdir / name).exists(), name
    if importlib.util.find_spec("tensorboardX"):
        assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "run.json").read_text())["tokenizer"] == "byte"

    # a larger --steps resumes the saved run
    assert cli.main(["train", "--workdir", str(workdir), "--steps", "12", "--no-progress"]) == 0
    again, s0, final, s1 = _ppl(capsys.readouterr().out)
    assert (s0, s1) == (8, 12) and abs(again - after) < 1e-3 * after

    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"^perplexity: ([\d.]+)$", out, re.M)[1])
    assert abs(ppl - final) < 1e-3 * final  # same held-out batches, on one device

    assert cli.main(["eval", "--workdir", str(workdir), "--data",
                     str(corpus / "corpus.txt")]) == 0
    assert re.search(r"^perplexity: [\d.]+$", capsys.readouterr().out, re.M)

    assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "Document 7:",
                     "--max-new-tokens", "24", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Document 7:") and len(text) > len("Document 7:\n")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ChunkyConfig(ModelConfig):
    chunk_memory: int = 16
    PRESETS = {"tiny": Preset(1e3, dict(vocab_size=256, d_model=8, n_layers=1, n_heads=2,
                                        max_seq_len=256))}


class _Chunky(nnx.Module):
    def __init__(self, config, *, rngs):
        self.w = nnx.Param(jnp.zeros((config.vocab_size, config.vocab_size)))


@pytest.fixture
def chunky():
    registry.register("test_chunky", _ChunkyConfig)(_Chunky)
    yield
    registry._REGISTRY.pop("test_chunky")


@pytest.mark.parametrize("args, message", [
    (["--set", "mesh.data=3"], r"mesh=\(3, 1, 1\).*8 devices"),
    (["--set", "mesh.data=-1", "--set", "mesh.fsdp=3"], r"mesh=.*divide"),
    (["--seq-len", "512"], r"data.seq_len=512.*max_seq_len=256"),
    (["--model", "test_chunky", "--seq-len", "40"], r"data.seq_len=40.*model.chunk_memory=16"),
    (["--set", "model.vocab_size=100"], r"model.vocab_size=100.*tokenizer"),
    (["--set", "model.n_heads=5"], r"model.d_model=64.*n_heads=5"),
    (["--model", "nope"], r"model='nope'.*transformer"),
    (["--batch-size", "4"], r"data.batch_size=4.*mesh.data \* mesh.fsdp = 8"),
    (["--optimizer", "adamax_typo"], r"optim.name='adamax_typo'"),
    (["--tokenizer", "bpe"], r"data.tokenizer.*bpe"),
])
def test_config_errors_name_the_field_before_compiling(corpus, tmp_path, caplog, chunky, args,
                                                       message):
    workdir = tmp_path / "run"
    rc = cli.main(["train", "--workdir", str(workdir), "--data", str(corpus), "--steps", "2",
                   *TINY, *args])
    assert rc == 2
    assert re.search(message, caplog.text), caplog.text
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", r"data.path=.*no such file"),
    (lambda d: d, r"data.path=.*no documents"),
])
def test_missing_or_empty_data(tmp_path, caplog, make, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["train", "--workdir", str(tmp_path / "run"), "--data", str(make(empty)),
                   *TINY])
    assert rc == cli.EXIT_DATA and re.search(message, caplog.text)


def test_presets_prints_parameter_counts(capsys):
    assert cli.main(["presets", "--model", "transformer"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"transformer\s+1\.3B\s+1,298,761,728", out)


def test_eval_freeze_scores_the_trained_model_with_its_memories_frozen(corpus, tmp_path, capsys):
    """`eval --freeze`: the same checkpoint with inner learning rates at 0 scores differently
    (the memories change predictions), and a memory the model lacks is a clear error."""
    workdir = tmp_path / "hope"
    assert cli.main(["train", "--workdir", str(workdir), "--data", str(corpus), "--steps", "4",
                     "--model", "hope", *TINY]) == 0
    capsys.readouterr()
    scores = {}
    for freeze in ((), ("self_modifying",), ("cms",)):  # each eval compiles a Hope (~15 s)
        args = [a for f in freeze for a in ("--freeze", f)]
        assert cli.main(["eval", "--workdir", str(workdir), *args]) == 0
        scores[freeze] = float(re.search(r"^perplexity: ([\d.]+)$", capsys.readouterr().out,
                                         re.M)[1])
    base = scores[()]
    for freeze, ppl in scores.items():  # printed to 1e-6; the self-modifying gap is ~2e-5 here
        if freeze:
            assert abs(ppl - base) > 1e-6 * base, (freeze, scores)
    tr = tmp_path / "tr"
    assert cli.main(["train", "--workdir", str(tr), "--data", str(corpus), "--steps", "1",
                     *TINY]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(tr), "--freeze", "self_modifying"]) == 2
    with pytest.raises(ValueError, match="--freeze self_modifying: model 'transformer'"):
        evaluate.evaluate_checkpoint(str(tr), freeze=["self_modifying"])

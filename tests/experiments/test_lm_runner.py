"""The language-model suites: matched parameter counts, the sweep rule, and clear errors
before any training."""

import pytest

from experiments.lm import recipes, report, run


@pytest.mark.parametrize("scale", ["cpu"])
def test_models_are_matched_in_parameters_without_the_embedding(scale):
    from nested_jax import models

    s = recipes.SCALES[scale]
    body = {}
    for m in recipes.MODELS:
        cfg = models.make_config(m, recipes.PRESET[scale], vocab_size=s.vocab, **s.overrides(m))
        body[m] = models.count_params(models.abstract_model(m, cfg)) - s.vocab * cfg.d_model
    for m, n in body.items():
        assert abs(n / body["hope"] - 1) < 0.03, (m, n, body["hope"])


def test_every_ablation_row_is_a_hope_config_field_and_has_the_papers_number():
    from nested_jax import models

    for row, flags in recipes.ABLATIONS.items():
        models.make_config("hope", "tiny", **flags)  # unknown fields would raise here
        assert row in recipes.PAPER_ABLATION_PPL


@pytest.mark.parametrize("scale", list(recipes.SCALES))
def test_each_optimizer_sweeps_its_own_grid(scale):
    """Every optimizer has a grid with a middle value (so a best value can be inside it), the
    other suites sweep AdamW's, and at the cpu scale the AdamW arm's grid is compare's HopeLM
    sweep, whose best value (1e-2) is its middle: those runs are reused, not retrained."""
    s = recipes.SCALES[scale]
    assert set(s.optimizer_lrs) == set(recipes.OPTIMIZERS)
    for opt in recipes.OPTIMIZERS:
        grid = s.grid("optimizers", opt)
        assert len(grid) >= 3 and list(grid) == sorted(set(grid)), (opt, grid)
        assert s.grid("compare", opt) == s.grid("ablation", opt) == s.lrs
    if scale == "cpu":
        assert s.grid("optimizers", "adamw")[1] == 1e-2


def test_a_variant_arm_trains_its_optimizer_with_its_kwargs_and_never_reuses_compare():
    """An optimizer-suite variant (e.g. Muon with the CMS levels off Newton-Schulz) sweeps its
    optimizer's grid with its ``optim.kwargs`` in the run's config."""
    a = run.parse(["optimizers", "--optimizers", "adamw", "muon_cms_off_ns"])
    (_, _, _, opt0, kw0), (name, model, over, opt, kw) = run.arms(a)
    assert (opt0, kw0) == ("adamw", {}) and (name, model, opt) == ("muon_cms_off_ns", "hope", "muon")
    assert kw == {"ns_skip": ("levels",)}
    s = recipes.SCALES["cpu"]
    cfg = run.train_config(s, "small", model, over, opt, 3e-2, 0, 10, "byte", kw)
    assert cfg.optim.name == "muon" and cfg.optim.kwargs == kw
    assert s.grid("optimizers", opt) == s.optimizer_lrs["muon"]


def _rec(ppl):
    return {"ppl": ppl}


def test_best_lr_is_the_lowest_perplexity_and_needs_the_whole_sweep():
    done = {(1e-3, 0): _rec(30.0), (3e-3, 0): _rec(25.0), (1e-2, 0): _rec(float("nan"))}
    assert report.best_lr(done, 0, (1e-3, 3e-3, 1e-2)) == 3e-3  # a diverged run never wins
    with pytest.raises(RuntimeError, match=r"lacks lr \[0.03\]"):
        report.best_lr(done, 0, (1e-3, 3e-3, 1e-2, 3e-2))


def test_ablation_gap_to_hope_is_paired_by_seed():
    """HopeLM's seeds differ by ~18 perplexity, more than some rows' effects: each row's gap is
    taken against the reference on the same seed, and only on seeds both have."""
    ref = {0: 144.0, 1: 162.0}
    assert report.paired_gap([{"seed": 0, "ppl": 191.0}], ref) == "+47.00"
    assert report.paired_gap([{"seed": 0, "ppl": 150.0}, {"seed": 1, "ppl": 160.0}],
                             ref) == "+2.00 [-2.00, +6.00]"
    assert report.paired_gap([{"seed": 2, "ppl": 150.0}], ref) == "-"


@pytest.mark.parametrize("argv, message", [
    (["nope"], "suite='nope' is unknown"),
    (["compare", "--scale", "huge"], "--scale='huge' is unknown"),
    (["compare", "--models", "gpt"], "--models: 'gpt' is unknown"),
    (["ablation", "--rows", "no_attention"], "--rows: 'no_attention' is unknown"),
    (["optimizers", "--optimizers", "sgdx"], "--optimizers: 'sgdx' is unknown"),
    (["compare", "--steps", "3"], "--steps=3"),
    (["compare", "--lrs", "30"], "--lrs: 30.0 must be in"),
    (["compare", "--lrs", "0"], "--lrs: 0.0 must be in"),
    (["compare", "--seeds", "0", "0"], "--seeds"),
])
def test_bad_options_fail_before_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse(argv)
    assert message in capsys.readouterr().err


def test_ablation_reference_row_and_adamw_arm_reuse_compares_identical_run(tmp_path, monkeypatch):
    """The ablation's "hope" row and the optimizer suite's AdamW arm are compare's HopeLM run
    (same overrides, optimizer, lr, seed, budget): their record is copied, nothing trains.  A
    row that differs in one flag, lr or seed is not a twin."""
    import json

    scale = recipes.SCALES["cpu"]
    setup = dict(suite="compare", scale="cpu", steps=scale.steps, seq_len=scale.seq_len,
                 batch=scale.batch, vocab=scale.vocab)
    curve = [(100, 5.0), (400, 4.9)]
    position = [5.0] * 8
    record = dict(setup, arm="hope", model="hope", optimizer="adamw",
                  overrides=scale.overrides("hope"), lr=0.01, seed=0, ppl=144.05,
                  frozen={"self_modifying": 220.1}, params_body=1.25e6, sec_per_step=6.0, seconds=2500.0,
                  curve=curve, position=position, position_frozen={"self_modifying": position})
    (tmp_path / "lm_compare_runs.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    monkeypatch.setattr(run.tok_lib, "build", lambda *a, **k: str(tmp_path / "tok.model"))

    def no_training(*a, **k):
        raise AssertionError("a reused run must not train")

    monkeypatch.setattr(run, "one_run", no_training)
    run.main(["ablation", "--rows", "hope", "--lrs", "0.01", "--seeds", "0"])
    run.main(["optimizers", "--optimizers", "adamw", "--lrs", "0.01", "--seeds", "0"])
    for suite, arm in (("ablation", "hope"), ("optimizers", "adamw")):
        (got,) = [json.loads(x) for x in open(tmp_path / f"lm_{suite}_runs.jsonl")]
        assert (got["suite"], got["arm"], got["ppl"]) == (suite, arm, 144.05)
        assert got["reused_from"] == "compare hope lr 0.01 seed 0"
        assert "reused, not retrained" in (tmp_path / f"lm_{suite}.md").read_text()

    twin = dict(suite="ablation", setup=dict(setup, suite="ablation"), model="hope",
                overrides=scale.overrides("hope"), optimizer="adamw", optim_kwargs={},
                lr=0.01, seed=0)
    assert run.compare_twin(**twin) is not None
    for change in (dict(overrides={**scale.overrides("hope"), **recipes.ABLATIONS["no_cms"]}),
                   dict(optimizer="muon"), dict(optim_kwargs={"ns_skip": ("levels",)}),
                   dict(lr=0.003), dict(seed=1),
                   dict(setup=dict(setup, suite="ablation", steps=200))):
        assert run.compare_twin(**{**twin, **change}) is None, change


def test_hope_long_is_the_readme_job_trained_longer_and_reports_every_freeze(tmp_path):
    """The long run differs from the README's main job (`lm:cpu_demo`) only in its length,
    seed and cadences, so its frozen-memory gaps are about that model; and the report puts
    each freeze's gap to the learning score in the table."""
    import dataclasses
    import json

    from experiments.lm import hope_long
    from nested_jax.train.configs import lm

    demo, long = lm.get_config("cpu_demo"), hope_long.config(3)
    differ = {f.name for f in dataclasses.fields(demo)
              if getattr(demo, f.name) != getattr(long, f.name)}
    assert differ <= {"steps", "seed", "log_every", "eval_every", "checkpoint_every",
                      "keep_checkpoints"}
    assert long.steps == hope_long.STEPS and long.seed == 3
    log = tmp_path / "runs.jsonl"
    ppl = {"learning": 10.0, "self-modifying frozen": 13.5, "CMS frozen": 10.25,
           "both frozen": 14.0}
    log.write_text(json.dumps(dict(seed=0, steps=2000, params=123, ppl=ppl,
                                   eval_curve=[[0, 140.0], [2000, 10.0]],
                                   train_curve=[[10, 4.0], [2000, 2.3]],
                                   seconds_per_step=9.0)) + "\n")
    text = hope_long.report(str(log), "cmd", str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").exists()
    assert "| self-modifying frozen | 13.500 [13.500, 13.500] | 3.500 [3.500, 3.500] |" in text
    assert "| CMS frozen | 10.250 [10.250, 10.250] | 0.250 [0.250, 0.250] |" in text


def test_a_run_stopped_by_a_signal_is_neither_scored_nor_logged(tmp_path):
    """The trainer returns, checkpointed, when SIGTERM stops it; a suite that scored what came
    back would log a half-trained run as finished and its sweep would skip it for good. Here a
    real SIGTERM reaches a real run in this process once its loop is stepping."""
    import os
    import signal
    import threading
    import time

    from experiments.lm.finished import train_to_end
    from nested_jax.train import metrics, trainer
    from tests.train.conftest import tiny_config, write_corpus

    cfg = tiny_config(write_corpus(tmp_path / "data"), model="transformer", steps=100_000,
                      checkpoint_every=100_000)
    workdir = tmp_path / "run"

    def stop_once_stepping():
        log = trainer.workdir_path(workdir) / "metrics.jsonl"
        while True:
            try:  # a line being written may not parse yet: read again
                if any("train/loss" in r for r in metrics.read_records(log)):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler owns SIGTERM while stepping

    threading.Thread(target=stop_once_stepping, daemon=True).start()
    with pytest.raises(SystemExit, match=r"stopped by SIGTERM at step \d+ of 100000, so it is "
                                         "neither scored nor logged"):
        train_to_end(cfg, str(workdir))
    assert list((workdir / "checkpoints").iterdir()), "the stop still checkpoints, to resume"


def test_every_spike_and_suite_arm_builds_on_the_suites_hopelm():
    """experiments.lm.spike and the optimizer suite: each arm's optimizer and ``optim.kwargs``
    build and initialize on the suite's HopeLM (an ``ns_skip`` name in no parameter's path is
    refused there), and the spike's groups name real tensors, so no arm fails after the runs
    before it."""
    import jax
    from flax import nnx

    from experiments.lm import spike
    from nested_jax import models
    from nested_jax.train import optimizers
    from nested_jax.train.config import OptimConfig

    s = recipes.SCALES["cpu"]
    cfg = models.make_config("hope", recipes.PRESET["cpu"], vocab_size=s.vocab,
                             **s.overrides("hope"))
    _, params, _ = nnx.split(models.abstract_model("hope", cfg), nnx.Param, ...)
    for optimizer, kwargs in [*spike.ARMS.values(), *recipes.OPTIMIZER_ARMS.values()]:
        tx = optimizers.build(OptimConfig(name=optimizer, learning_rate=spike.LR,
                                          kwargs=kwargs), s.steps)
        jax.eval_shape(tx.init, params)
    names = [optimizers.path_names(path)
             for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert {spike.group_of(n) for n in names} == {*spike.GROUPS, "other"}

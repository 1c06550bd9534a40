"""The ICL suite runner refuses bad names and lengths before any training, naming the option."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.icl import run, tasks, train
from nested_jax.models import create


@pytest.mark.parametrize("argv, needle", [
    (["nosuch"], "suite='nosuch' is unknown"),
    (["mad", "--tasks", "mqar"], "--tasks: 'mqar' is not in suite 'mad'"),
    (["mqar", "--models", "gpt"], "--models: 'gpt' is unknown"),
    (["mqar", "--models", "transformer", "--variants", "sm_only"],
     "--variants: 'sm_only' does not exist for transformer"),
    (["mqar", "--scale", "tpu"], "--scale='tpu' is unknown"),
    (["mqar", "--task-set", "prefix_labels=true"], "--task-set: 'prefix_labels=true' must be"),
    (["formal", "--task-set", "prefix_labels"], "--task-set: 'prefix_labels' must be"),
    (["mqar", "--checkpoint-every", "-1"], "--checkpoint-every=-1: use a positive"),
    (["niah", "--short-first", "256"], "--short-first='256': use LEN:STEPS"),
    (["niah", "--init-from", "conv"], "--init-from='conv': use SEED:PATTERN"),
    (["niah", "--init-from", "0:"], "--init-from='0:': use SEED:PATTERN"),
    (["niah", "--seeds", "0", "1", "--data-seeds", "1"],
     "--data-seeds [1]: give one per --seeds entry [0, 1]"),
])
def test_bad_names_fail_with_the_option(capsys, argv, needle):
    with pytest.raises(SystemExit):
        run.parse(argv)
    assert needle in capsys.readouterr().err


def test_run_dirs_are_per_run_and_per_setup():
    setup = dict(preset="tiny", steps=400, batch=8, lr=3e-3, overrides={})
    d = run.run_dir("runs/icl", "icl_mqar", "mqar_8x64", "hope", "all", 0, setup)
    assert "/runs/icl/icl_mqar/mqar_8x64-hope-all-s0-" in d
    assert d == run.run_dir("runs/icl", "icl_mqar", "mqar_8x64", "hope", "all", 0, dict(setup))
    assert d != run.run_dir("runs/icl", "icl_mqar", "mqar_8x64", "hope", "all", 0,
                            dict(setup, steps=800))
    assert d != run.run_dir("runs/icl", "icl_mqar", "mqar_8x64", "hope", "all", 1, setup)


def test_length_beyond_max_seq_len_fails_before_training():
    task = tasks.make("mqar", n_pairs=8, seq_len=64, vocab=64)
    long = {"T=512": task.at_length(512)}
    with pytest.raises(ValueError, match="seq_len=512 exceeds transformer's max_seq_len=256"):
        train.run(task, "transformer", "tiny", steps=1, eval_tasks=long)


def test_every_suite_builds_its_tasks_and_lengths():
    """Each scale's tasks and evaluation lengths construct (a wrong length fails here)."""
    for suite, scales in run.SUITES.items():
        for name, scale in scales.items():
            built = run.build(scale, list(scale.tasks))
            for task, evals in built.values():
                assert set(evals) == {f"T={n}" for n in scale.eval_lengths}, (suite, name)
                assert all(t.seq_len > task.seq_len for t in evals.values())


def test_report_names_the_never_yes_floor_of_formal_tasks_only():
    """A formal task's line in a report gives the floor of never saying yes in distribution and
    at each evaluation length (a^n b^n's is about 1/3 where a coin flip's is 0.012); tasks
    without one get nothing."""
    built = run.build(run.SUITES["formal"]["cpu"], ["anbn"], {"prefix_labels": True})
    task, at = built["anbn"]
    line = run.all_no(task, at)
    assert line.startswith(f"; answering no everywhere {task.all_no:.3f} (T=96: ")
    assert 0.25 < task.all_no < 0.45 and task.chance < 0.02
    mqar = run.build(run.SUITES["mqar"]["cpu"], ["mqar"])["mqar"]
    assert run.all_no(*mqar) == ""


def test_the_loss_mask_moves_the_loss_not_the_score():
    """train_on="all" (needle tasks): the loss averages every position, the accuracy still
    scores the task's targets only."""
    import jax.numpy as jnp
    import numpy as np
    import optax

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 5)))
    mask = jnp.zeros((2, 5), bool).at[:, -2:].set(True)
    model = lambda inputs: logits  # noqa: E731
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss_t, acc_t = train.masked_loss(model, None, targets, mask, "sequence")
    loss_a, acc_a = train.masked_loss(model, None, targets, mask, "sequence",
                                      jnp.ones_like(mask))
    np.testing.assert_allclose(loss_t, nll[:, -2:].mean(), rtol=1e-6)
    np.testing.assert_allclose(loss_a, nll.mean(), rtol=1e-6)
    assert acc_a == acc_t
    for train_on, want in (("all", nll.mean()), ("both", (nll.mean() + nll[:, -2:].mean()) / 2)):
        loss, acc = train.masked_loss(model, None, targets, mask, "sequence",
                                      train.loss_weights(mask, train_on))
        np.testing.assert_allclose(loss, want, rtol=1e-6, err_msg=train_on)
        assert acc == acc_t


def test_token_and_sequence_accuracy_count_the_masked_positions_only():
    """A row counts for the sequence score only if every masked position is right; the token
    score is the share of masked positions right; unmasked positions count for neither."""
    import jax.numpy as jnp

    targets = jnp.asarray([[1, 2, 3, 4], [1, 2, 3, 4]])
    mask = jnp.asarray([[False, True, True, True]] * 2)
    guess = jnp.asarray([[0, 2, 3, 4], [1, 2, 0, 0]])  # row 0 wrong only where unmasked
    logits = jnp.eye(5)[guess]
    token, sequence = train.accuracies(logits, targets, mask)
    np.testing.assert_allclose([token, sequence], [4 / 6, 1 / 2], rtol=1e-6)
    model = lambda inputs: logits  # noqa: E731
    assert train.masked_loss(model, None, targets, mask, "sequence")[1] == sequence
    assert train.masked_loss(model, None, targets, mask, "token")[1] == token


def test_a_needle_report_gives_the_characters_right_beside_whole_values(tmp_path, monkeypatch):
    """A task scored per sequence logs, per evaluation length, the share of its target
    characters right, and the report gives it at the training length in its own column."""
    import dataclasses
    import json

    scale = dataclasses.replace(run.SUITES["niah"]["cpu"], steps=2, batch=2, eval_batch=2,
                                eval_lengths=(384,),
                                tasks={"niah_noise": ("niah_noise", dict(seq_len=192))})
    monkeypatch.setitem(run.SUITES, "niah", {"cpu": scale})
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    run.main(["niah", "--models", "transformer", "--seeds", "0", "--checkpoint-every", "0",
              "--out", "icl_t"])
    (r,) = [json.loads(x) for x in (tmp_path / "icl_t_runs.jsonl").read_text().splitlines()]
    assert set(r["by_eval_token"]) == {"train", "T=384"}
    token, frozen = r["by_eval_token"]["train"]
    assert 0 <= r["accuracy"] <= token <= 1 and frozen is None  # seven digits a needle
    report = (tmp_path / "icl_t.md").read_text()
    assert "| characters right (frozen at eval) |" in report
    assert f"| {token:.3f} [{token:.3f}, {token:.3f}] |" in report


def test_unknown_train_on_is_refused():
    task = tasks.make("mqar", n_pairs=8, seq_len=64, vocab=64)
    with pytest.raises(ValueError, match="train_on='every'"):
        train.run(task, "transformer", "tiny", steps=1, train_on="every")


class _Interrupting:
    """The task, but the batch draw after ``after`` of them raises KeyboardInterrupt (Ctrl-C
    in the middle of a run)."""

    def __init__(self, task, after: int):
        self.task, self.after, self.calls = task, after, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def __repr__(self):
        return repr(self.task)

    def sample(self, rng, n):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.task.sample(rng, n)


def test_an_interrupted_run_resumes_bitwise_and_refuses_another_runs_checkpoint(tmp_path):
    """Stopped after step 5 with checkpoints every 2 steps, the rerun restores step 4 (params,
    AdamW state, the batch generator) and ends with the uninterrupted run's every-step loss
    curve and held-out accuracy, bit for bit; a run with another seed is refused on that
    directory, naming the field, before anything is read or moved."""
    from nested_jax.train.checkpoints import CheckpointMismatchError

    task = tasks.make("mqar", n_pairs=4, seq_len=32, vocab=32)
    kw = dict(steps=7, batch=4, eval_batches=1, log_every=1, freeze_eval=False)
    whole = train.run(task, "transformer", "tiny", **kw)
    ckdir = str(tmp_path / "ck")
    with pytest.raises(KeyboardInterrupt):
        train.run(_Interrupting(task, after=5), "transformer", "tiny", checkpoint_dir=ckdir,
                  checkpoint_every=2, **kw)
    resumed = train.run(task, "transformer", "tiny", checkpoint_dir=ckdir, checkpoint_every=2,
                        **kw)
    assert [c[0] for c in resumed.curve] == list(range(1, 8))
    assert resumed.curve == whole.curve
    assert resumed.final_loss == whole.final_loss
    assert resumed.accuracy == whole.accuracy
    steps_before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    with pytest.raises(CheckpointMismatchError, match="seed: checkpoint 0, this run 1"):
        train.run(task, "transformer", "tiny", seed=1, checkpoint_dir=ckdir, **kw)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == steps_before


class _Recording(_Interrupting):
    """The task, noting the length of every batch drawn (into ``log``, shared with the
    shorter versions ``at_length`` makes), and interrupted as ``_Interrupting``."""

    def __init__(self, task, after: int, log: list, shared=None):
        super().__init__(task, after)
        self.log, self.shared = log, shared or self

    def at_length(self, seq_len):
        return _Recording(self.task.at_length(seq_len), self.after, self.log, self.shared)

    def sample(self, rng, n):
        self.log.append(self.task.seq_len)
        self.shared.calls += 1
        if self.shared.calls > self.after:
            raise KeyboardInterrupt
        return self.task.sample(rng, n)


def test_a_length_curriculum_trains_short_first_and_resumes_bitwise(tmp_path):
    """``short_first=(32, 3)`` of 6 steps draws three batches at T=32 and then three at the
    task's 64; interrupted after step 4 (checkpoints every 2 steps) it resumes from step 4 in
    the long phase and ends with the uninterrupted run's curve and accuracy, bit for bit.  Its
    identity is not a run's without the curriculum (another checkpoint directory), and a
    curriculum that is not shorter, or not over before the last step, is refused naming the
    option before any batch is drawn."""
    task = tasks.make("mqar", n_pairs=4, seq_len=64, vocab=32)
    kw = dict(steps=6, batch=4, eval_batches=1, log_every=1, freeze_eval=False,
              short_first=(32, 3))
    lengths = []
    whole = train.run(_Recording(task, 10**9, lengths), "transformer", "tiny", **kw)
    assert lengths[:6] == [32, 32, 32, 64, 64, 64]  # then the held-out batches, at 64
    plain = train.run(task, "transformer", "tiny", **dict(kw, short_first=None))
    assert plain.curve != whole.curve
    ckdir = str(tmp_path / "ck")
    with pytest.raises(KeyboardInterrupt):
        train.run(_Recording(task, 5, []), "transformer", "tiny", checkpoint_dir=ckdir,
                  checkpoint_every=2, **kw)
    resumed_lengths = []
    resumed = train.run(_Recording(task, 10**9, resumed_lengths), "transformer", "tiny",
                        checkpoint_dir=ckdir, checkpoint_every=2, **kw)
    assert resumed_lengths[:2] == [64, 64]  # steps 5 and 6, then the held-out batches
    assert resumed.curve == whole.curve and resumed.accuracy == whole.accuracy
    ident = lambda sf: train.run_identity(task, "transformer", "tiny", "all", 0, 3e-3, 6, 4,  # noqa: E731
                                          None, "target", short_first=sf)
    assert "short_first" not in ident(None) and run.digest(ident((32, 3))) != run.digest(
        ident(None))
    for bad, needle in [((64, 3), "the length must be between"),
                        ((32, 6), "the steps must be between")]:
        drawn = []
        with pytest.raises(ValueError, match=f"--short-first {bad[0]}:{bad[1]}: {needle}"):
            train.run(_Recording(task, 10**9, drawn), "transformer", "tiny",
                      **dict(kw, short_first=bad))
        assert drawn == []


class _Batches(_Interrupting):
    """The task, keeping the inputs of the first ``keep`` batches it draws."""

    def __init__(self, task, keep: int):
        super().__init__(task, after=10**9)
        self.keep, self.drawn = keep, []

    def sample(self, rng, n):
        b = super().sample(rng, n)
        if len(self.drawn) < self.keep:
            self.drawn.append(b.arrays()[0].copy())
        return b


def test_a_data_seed_draws_the_batches_and_the_seed_still_initialises():
    """``data_seed`` apart from ``seed``: two runs with one data seed and different seeds draw
    the same training batches and still end apart (the initialisation follows ``seed``); a
    data seed equal to the seed is the run without one, bit for bit and in identity, so no
    logged run changes its identity; another data seed changes both, and its checkpoint
    directory says which (``s0d1``)."""
    task = tasks.make("mqar", n_pairs=4, seq_len=32, vocab=32)
    kw = dict(steps=3, batch=4, eval_batches=1, log_every=1, freeze_eval=False)
    runs = {}
    for seed, data_seed in [(0, 1), (1, 1), (1, None), (0, 0), (0, None)]:
        t = _Batches(task, keep=3)
        runs[seed, data_seed] = (train.run(t, "transformer", "tiny", seed=seed,
                                           data_seed=data_seed, **kw), t.drawn)
    same_data = [runs[0, 1][1], runs[1, 1][1]]
    np.testing.assert_array_equal(np.stack(same_data[0]), np.stack(same_data[1]))
    assert runs[0, 1][0].curve != runs[1, 1][0].curve  # same batches, another init
    assert not np.array_equal(np.stack(runs[0, 1][1]), np.stack(runs[0, None][1]))
    np.testing.assert_array_equal(np.stack(runs[1, 1][1]), np.stack(runs[1, None][1]))
    same = [(r.curve, r.accuracy, r.final_loss) for r in (runs[0, 0][0], runs[0, None][0])]
    assert same[0] == same[1]
    ident = lambda seed, ds: train.run_identity(task, "transformer", "tiny", "all", seed,  # noqa: E731
                                                3e-3, 3, 4, None, "target", data_seed=ds)
    assert ident(0, 0) == ident(0, None) and "data_seed" not in ident(0, 0)
    assert run.digest(ident(0, 1)) != run.digest(ident(0, None))
    assert "-transformer-all-s0d1-" in run.run_dir("r", "icl_x", "t", "transformer", "all", 0,
                                                   ident(0, 1))
    assert "-transformer-all-s0-" in run.run_dir("r", "icl_x", "t", "transformer", "all", 0,
                                                 ident(0, None))


def test_init_from_takes_the_matching_parameters_from_another_seed():
    """``init_from=(1, "mixer/conv")`` starts exactly the parameters on that path from seed 1's
    initialisation and every other from the run's seed 0; the run's identity says so; a pattern
    that matches no parameter, or all of them, is refused naming the option, before any batch
    is drawn."""
    task = tasks.make("mqar", n_pairs=4, seq_len=32, vocab=32)
    cfg = train.model_config(task, "hope", "tiny", "all", None)
    flat = lambda ps: {train.param_path(p): np.asarray(x)  # noqa: E731
                       for p, x in jax.tree_util.tree_flatten_with_path(ps)[0]}
    own, other = (flat(train.initial_params("hope", cfg, s)[1]) for s in (0, 1))
    mixed = flat(train.initial_params("hope", cfg, 0, (1, "mixer/conv"))[1])
    swapped = [p for p in mixed if "mixer/conv" in p]
    assert swapped and all(np.array_equal(mixed[p], other[p]) for p in swapped)
    assert all(np.array_equal(mixed[p], own[p]) for p in mixed if p not in swapped)
    assert not any(np.array_equal(own[p], other[p]) for p in swapped)
    ident = lambda f: train.run_identity(task, "hope", "tiny", "all", 0, 3e-3, 3, 4,  # noqa: E731
                                         None, "target", init_from=f)
    assert "init_from" not in ident(None)
    assert ident((1, "mixer/conv"))["init_from"] == [1, "mixer/conv"]
    for bad, n in [("nosuch", 0), (".", len(own))]:
        drawn = []
        with pytest.raises(ValueError, match=f"--init-from 1:{bad}: the pattern matches {n} of"):
            train.run(_Recording(task, 10**9, drawn), "hope", "tiny", steps=3, batch=4,
                      init_from=(1, bad))
        assert drawn == []


def test_a_run_saved_before_a_config_field_existed_resumes_and_a_changed_default_does_not(
        tmp_path, monkeypatch):
    """A checkpoint whose model config lacks a field (saved before the field was added) is the
    same run when this run has the field at its default: the runner moves its directory to the
    new identity's name and the run resumes there, ending bitwise where the uninterrupted run
    does.  A checkpoint whose config has another value for a field (a changed default) is not
    adopted, and the check refuses it naming the field."""
    from nested_jax.train.checkpoints import CheckpointMismatchError

    task = tasks.make("mqar", n_pairs=4, seq_len=32, vocab=32)
    kw = dict(steps=5, batch=4, eval_batches=1, log_every=1, freeze_eval=False)
    whole = train.run(task, "transformer", "tiny", **kw)
    identity = train.run_identity(task, "transformer", "tiny", "all", 0, 3e-3, 5, 4, None,
                                  "target")
    defaults = train.config_defaults(task, "transformer", "tiny")
    real = train.run_identity

    def saved_by(edit):
        def older(*a, **k):
            ident = real(*a, **k)
            edit(ident["config"])
            return ident
        return older

    old_dir = run.run_dir(str(tmp_path), "s", "mqar", "transformer", "all", 0, {"old": 1})
    monkeypatch.setattr(train, "run_identity", saved_by(lambda c: c.pop("norm_eps")))
    with pytest.raises(KeyboardInterrupt):
        train.run(_Interrupting(task, after=3), "transformer", "tiny", checkpoint_dir=old_dir,
                  checkpoint_every=2, **kw)
    monkeypatch.setattr(train, "run_identity", real)
    new_dir = run.run_dir(str(tmp_path), "s", "mqar", "transformer", "all", 0, identity)
    assert run.adopt_earlier(new_dir, identity, defaults) == old_dir
    assert not os.path.exists(old_dir)
    resumed = train.run(task, "transformer", "tiny", checkpoint_dir=new_dir,
                        checkpoint_every=2, **kw)
    assert resumed.curve == whole.curve and resumed.accuracy == whole.accuracy

    changed = run.run_dir(str(tmp_path), "t", "mqar", "transformer", "all", 0, {"old": 2})
    monkeypatch.setattr(train, "run_identity",
                        saved_by(lambda c: c.update(norm_eps=c["norm_eps"] * 10)))
    with pytest.raises(KeyboardInterrupt):
        train.run(_Interrupting(task, after=3), "transformer", "tiny", checkpoint_dir=changed,
                  checkpoint_every=2, **kw)
    monkeypatch.setattr(train, "run_identity", real)
    fresh = run.run_dir(str(tmp_path), "t", "mqar", "transformer", "all", 0, identity)
    assert run.adopt_earlier(fresh, identity, defaults) is None
    assert os.path.isdir(changed)
    with pytest.raises(CheckpointMismatchError, match="config.norm_eps: checkpoint"):
        train.run(task, "transformer", "tiny", checkpoint_dir=changed, **kw)


def test_needle_distance_is_where_the_needle_sentence_starts():
    """needle_depth bins each needle by its distance from the end: the tokens that far back
    are the needle sentence, with this row's value in it."""
    import numpy as np

    from experiments.icl import needle_depth
    from experiments.icl.tasks.base import RESERVED

    task = tasks.make("niah_noise", seq_len=512)
    b = task.sample(np.random.default_rng(0), 16)
    dist = needle_depth.distances(b.tokens)
    assert len(set(dist.tolist())) > 8  # the depth varies
    for row, d, m in zip(b.tokens, dist, b.mask, strict=True):
        text = bytes((row - RESERVED).astype(np.uint8))
        value = bytes((row[1:][m] - RESERVED).astype(np.uint8))
        assert text[len(row) - 1 - d:].startswith(b"The special magic number for ")
        assert value in text[len(row) - 1 - d:].split(b". ")[0]


def test_needle_depth_scores_a_finished_run_and_refuses_an_unfinished_one(tmp_path, monkeypatch,
                                                                          capsys):
    """The probe restores the runs the runner trained (same arguments) read-only and writes
    its table; pointed at a run never trained, or one that has not reached its last step, it
    stops, saying so."""
    import dataclasses

    from experiments.icl import needle_depth

    scale = dataclasses.replace(run.SUITES["niah"]["cpu"], steps=2,
                                tasks={"niah_noise": ("niah_noise", dict(seq_len=160))},
                                eval_lengths=(320,))
    monkeypatch.setitem(run.SUITES, "niah", {"cpu": scale})
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    monkeypatch.setattr(needle_depth, "SEQUENCES", 4)
    argv = ["niah", "--models", "transformer", "--seeds", "0", "--runs-dir",
            str(tmp_path / "runs"), "--checkpoint-every", "1", "--out", "icl_t"]
    run.main(argv)
    needle_depth.main(argv)
    table = (tmp_path / "icl_t_depth.md").read_text()
    assert "| niah_noise | transformer | all | 0 | as trained | T=160 |" in table
    assert "| T=320 |" in table
    with pytest.raises(SystemExit, match="no checkpoints for niah_noise/transformer/all seed 0"):
        needle_depth.main(argv + ["--steps", "3"])  # never trained
    import shutil
    (ckdir,) = (tmp_path / "runs" / "icl_t").iterdir()
    shutil.rmtree(ckdir / "2")  # the run as it was before its last step
    with pytest.raises(SystemExit, match="at step 1 of 2; finish it first"):
        needle_depth.main(argv)


def test_gate_rows_split_each_row_at_its_needle():
    """The gate table's cells average over the tokens before each row's own needle and after
    it in the rows whose needle came in the first 1K tokens, and the needle ratio is eta's
    peak on the needle sentence over the noise before it."""
    from experiments.icl import needle_depth as nd

    T, span = 4096, nd.NEEDLE_SPAN
    pos = np.array([300, 3000])
    alpha, eta = np.ones((1, 2, T)), np.full((1, 2, T), 0.01)
    for i, p in enumerate(pos):
        alpha[0, i, p + span:] = 0.5 if p < 1024 else 0.25  # forgets after its needle only
        eta[0, i, p:p + span] = 0.04 if p < 1024 else 0.02
    (row,) = nd.gate_rows(alpha, eta, pos, ["t"])
    names = [f"{lo}-{side}" for lo in nd.EDGES[:-1] for side in ("before", "after")]
    cells = dict(zip(names, row[2:-2], strict=True))
    assert cells["0-before"] == "0.0e+00 / 1.0e-02"  # both rows' first 256 tokens
    assert cells["256-before"] == "0.0e+00 / 1.0e-02"
    assert cells["256-after"].startswith("5.0e-01 / ")  # row 0 after its needle
    assert cells["2048-before"] == "0.0e+00 / 1.0e-02" and cells["4096-before"] == "-"
    assert cells["2048-after"] == "5.0e-01 / 1.0e-02"  # row 1's own after (0.25) is left out
    assert row[-2:] == ["4.0 (1)", "2.0 (1)"]


def test_gate_trace_records_each_layer_and_restores_the_model(monkeypatch):
    """The recorded gates are the model's own (a retention in (0, 1], a step in [0, eta_max]),
    one per layer and row, and the probe leaves the model's method as it found it."""
    from experiments.icl import needle_depth as nd
    from experiments.icl.tasks import NeedleNoise
    from nested_jax.models import self_modifying as smod

    monkeypatch.setattr(nd, "GATE_ROWS", 3)
    original = smod.SelfModifyingTitans._scan_coupled
    task = NeedleNoise(seq_len=160)
    cfg = train.model_config(task, "hope", "tiny", "sm_only", {"max_seq_len": 160})
    graph, params, rest = nnx.split(create("hope", cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    alpha, eta, pos = nd.gate_trace(graph, params, rest, task, seed=0, batch=2)
    assert alpha.shape == eta.shape == (cfg.n_layers, 3, 160) and pos.shape == (3,)
    assert np.all((alpha > 0) & (alpha <= 1)) and np.all((eta >= 0) & (eta <= cfg.eta_max))
    assert np.all((pos >= 0) & (pos + nd.NEEDLE_SPAN <= 160))
    assert smod.SelfModifyingTitans._scan_coupled is original


def test_a_logged_run_is_skipped_and_one_logged_under_other_defaults_runs_again(
        tmp_path, monkeypatch):
    """Rerunning a command trains only what its log lacks: a run logged with the same identity
    (budget and whole model config) is skipped; after a default changes, the same command
    trains it again under the new identity."""
    import dataclasses
    import json

    scale = dataclasses.replace(run.SUITES["mqar"]["cpu"], steps=2, batch=4, tasks={
        "mqar": ("mqar", dict(n_pairs=4, seq_len=32, vocab=32))})
    monkeypatch.setitem(run.SUITES, "mqar", {"cpu": scale})
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    argv = ["mqar", "--models", "transformer", "--seeds", "0", "--checkpoint-every", "0",
            "--out", "icl_t"]
    run.main(argv)
    real = train.run

    def must_not_train(*a, **k):
        raise AssertionError("a logged run was trained again")

    monkeypatch.setattr(train, "run", must_not_train)
    run.main(argv)
    log = tmp_path / "icl_t_runs.jsonl"
    assert len(log.read_text().splitlines()) == 1
    assert "characters right" not in (tmp_path / "icl_t.md").read_text()  # scored per token
    monkeypatch.setattr(train, "run", real)
    older = train.run_identity
    monkeypatch.setattr(train, "run_identity", lambda *a, **k: dict(older(*a, **k), new=1))
    run.main(argv)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["identity"] != lines[1]["identity"]


# Hope's case compiles two full Hope models (~75 s on one core): slow, kept out of the default run.
@pytest.mark.parametrize("model, same_as", [
    ("hope_attention", "none"), pytest.param("hope", "cms_only", marks=pytest.mark.slow)])
def test_frozen_at_eval_scores_the_model_with_its_in_context_memory_frozen(model, same_as):
    """With the learning rate at 0 the trained parameters are the initial ones, so scoring the
    ``all`` run with its in-context memory frozen at evaluation (CMS for Hope-Attention, the
    self-modifying memories for Hope) must give exactly the accuracy of the variant that
    freezes that memory throughout; that variant has nothing left to freeze at evaluation."""
    task = tasks.make("mqar", n_pairs=4, seq_len=32, vocab=32)
    kw = dict(lr=0.0, steps=2, batch=4, eval_batches=1, log_every=1)
    learning = train.run(task, model, "tiny", "all", **kw)
    frozen = train.run(task, model, "tiny", same_as, **kw)
    assert learning.accuracy_frozen_eval is not None
    assert learning.accuracy_frozen_eval == frozen.accuracy
    assert frozen.accuracy_frozen_eval is None


def test_trained_keys_measures_an_ideal_one_character_key_as_the_lookup_table():
    """Keys that are exactly the previous character's one-hot and queries the current input's:
    the delta read equals the last-write-wins copier keyed on one character, character by
    character (uuid_keys.ideal_copy), and the key-span cosines are 1 (same previous
    character) and 0 (different)."""
    from experiments.icl import trained_keys, uuid_keys
    from experiments.icl.tasks import NeedleUuid
    from experiments.icl.tasks.base import RESERVED

    task = NeedleUuid(seq_len=512, paragraphs=("A short haystack sentence. " * 4,))
    tokens = task.sample(np.random.default_rng(0), 4).tokens
    writes, reads = trained_keys.value_positions(tokens, task.value_len)
    emb = np.eye(256 + RESERVED)
    k_BxTxK = np.concatenate([np.zeros((4, 1, emb.shape[1])), emb[tokens[:, :-2]]], axis=1)
    q_BxTxK = emb[tokens[:, :-1]]
    m = trained_keys.measures(q_BxTxK, k_BxTxK, tokens, writes, reads)
    for row, delta in zip(tokens, m["delta"], strict=True):
        value = bytes((row[-task.value_len:] - RESERVED).astype(np.uint8)).decode()
        assert delta.tolist() == uuid_keys.ideal_copy(value, 1)
    np.testing.assert_allclose(m["cos_same_prev_diff_before"], 1.0)
    np.testing.assert_allclose(m["cos_diff_prev"], 0.0, atol=1e-12)


def test_trained_keys_records_each_layers_queries_and_keys(monkeypatch):
    """record() returns the model's own unit q and k per self-modifying layer at every input
    position, and leaves the layer's methods as it found them."""
    from experiments.icl import trained_keys
    from experiments.icl.tasks import NeedleNoise
    from nested_jax.models import self_modifying as smod

    originals = smod.SelfModifyingTitans._scan_coupled, smod.SelfModifyingTitans._static
    task = NeedleNoise(seq_len=160)
    cfg = train.model_config(task, "hope", "tiny", "sm_only", {"max_seq_len": 160})
    graph, params, rest = nnx.split(create("hope", cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tokens = task.sample(np.random.default_rng(0), 2).tokens
    out = trained_keys.record(graph, params, rest, tokens)
    assert len(out) == cfg.n_layers
    for q, k in out:
        assert q.shape == k.shape == (2, 160, cfg.d_model // cfg.n_heads)
        # from position 1: k_0 sees only the conv's zero padding before the first token (its
        # small off-identity taps times x_0), where the l2 norm's epsilon shows
        np.testing.assert_allclose(np.linalg.norm(q[:, 1:], axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(k[:, 1:], axis=-1), 1.0, atol=1e-5)
    assert (smod.SelfModifyingTitans._scan_coupled, smod.SelfModifyingTitans._static) == originals

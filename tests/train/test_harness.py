"""The lm-evaluation-harness model (`nested_jax.harness`): its scores against independent oracles.

Runs are tiny randomly initialised models saved as a checkpoint in a temporary workdir (no
training) with max_seq_len=64, so truncation and rolling windows are exercised on short
texts.  The oracles read the model with its plain forward pass on one unpadded sequence
and take log-probabilities in float64 (the model itself computes in float32: model configs
take no float64).  The lm_eval test runs only where the `harness` extra is installed; it
writes its tasks and data into the test's directory, so nothing is downloaded.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from nested_jax.harness import model_args
from nested_jax.harness import requests as req
from nested_jax.harness.scorer import Scorer
from nested_jax.models import registry
from nested_jax.train import generate, trainer
from nested_jax.train.checkpoints import Checkpoints
from nested_jax.train.config import DataConfig, TrainConfig

MAX_LEN = 64
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def save_random_run(workdir, model: str, **changes) -> None:
    """A run directory holding one checkpoint of a randomly initialised tiny `model` (a Hope
    of one block: its memories are all there, and it compiles in half the time)."""
    overrides = {"max_seq_len": MAX_LEN, **({"n_layers": 1} if model == "hope" else {}),
                 **changes}
    cfg = TrainConfig(model=model, preset="tiny", model_overrides=overrides,
                      data=DataConfig(path=str(workdir / "no_data"), seq_len=32, batch_size=8,
                                      eval_fraction=0.0))
    run = trainer.prepare(cfg, workdir, jax.devices()[:1], for_training=False)
    ckpt = Checkpoints(workdir / "checkpoints", use_async=False)
    ckpt.save(1, run.init_state(), metadata=trainer.run_metadata(run), force=True)
    ckpt.close()
    (workdir / "config.json").write_text(cfg.to_json())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """model -> workdir, each saved on first use (a Hope takes ~6 s to initialise)."""

    class Runs(dict):
        def __missing__(self, model):
            self[model] = tmp_path_factory.mktemp(model)
            save_random_run(self[model], model)
            return self[model]

    return Runs()


def float64_models() -> bool:
    """Whether model configs take dtype float64 (where the project supports it, under x64)."""
    try:
        registry.make_config("transformer", "tiny", dtype="float64", param_dtype="float64")
    except ValueError:
        return False
    return jax.config.jax_enable_x64


@pytest.fixture(scope="module")
def scorers(runs):
    class Scorers(dict):
        def __missing__(self, model):
            self[model] = Scorer.from_workdir(runs[model], batch_size=3)
            return self[model]

    return Scorers()


class Oracle:
    """log-probabilities of one unpadded sequence through the model's plain forward pass."""

    def __init__(self, scorer: Scorer):
        graphdef, state = scorer.run.graphdef, scorer.state
        fwd = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
        self.logits = lambda ids: np.asarray(
            fwd(state["params"], state["rest"], np.asarray([ids], np.int32))[0], np.float64)

    def score(self, inputs, targets, n):
        """(sum of log p of the last n targets, whether each is the argmax)."""
        logits = self.logits(inputs)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        rows = range(len(targets) - n, len(targets))
        return (float(sum(logp[j, targets[j]] for j in rows)),
                all(int(np.argmax(logits[j])) == targets[j] for j in rows))


def utf8(text):
    return list(text.encode("utf-8"))


# ---- token conventions (no model) ----------------------------------------------------------------


def test_encode_pair_moves_trailing_space_and_opens_with_the_document_start():
    enc = lambda t: np.asarray(utf8(t), np.int32)
    assert req.encode_pair(enc, 0, "Q: a? ", "b") == ([0, *utf8("Q: a?")], utf8(" b"))
    assert req.encode_pair(enc, 0, "", "hello") == ([0], utf8("hello"))
    assert req.encode_pair(enc, 0, "x\n\n", "y") == ([0, *utf8("x")], utf8("\n\ny"))


def test_rolling_windows_follow_lm_eval():
    """The example of lm-eval's `LM.loglikelihood_rolling` docstring, and every token of any
    document predicted exactly once with at most max_length inputs per window."""
    windows = list(req.rolling_windows(list(range(10)), 99, 4))
    assert windows == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    for n in range(0, 30):
        for L in (1, 4, 7):
            for c in range(1, L + 1):
                ws = list(req.rolling_windows(list(range(n)), -1, L, c))
                assert [t for _, cont in ws for t in cont] == list(range(n))
                for ctx, cont in ws:
                    assert len(ctx) + len(cont) - 1 <= L and ctx
                    whole = [-1, *range(n)]
                    i = whole.index(cont[0])
                    assert whole[i - len(ctx):i] == ctx  # the context is what precedes


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert req.cut_at_stop("ab\ncd.ef", ["." , "\n"]) == ("ab", True)
    assert req.cut_at_stop("abc", ["", "x"]) == ("abc", False)


# ---- scores against the oracles ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["transformer", "hope"])
def test_loglikelihood_equals_the_full_sequence_oracle(x64, tmp_path, scorers, model):
    """Batched, right-padded, left-truncated scores equal one unpadded forward pass per request:
    an empty context, a trailing space, multi-byte text, a context longer than max_length and
    a continuation filling the whole window; batches of 3 with a ragged last one.  The model
    computes in float64 where its config allows it (else float32, to float32 rounding)."""
    if float64_models():
        save_random_run(tmp_path, model, dtype="float64", param_dtype="float64")
        scorer, tol = Scorer.from_workdir(tmp_path, batch_size=3), 1e-7  # logits: float32
    else:
        scorer, tol = scorers[model], 1e-5
    pairs = [("The river", " flows"), ("", "Start"), ("Question: why? ", "Because"),
             ("ünïcödé ", "tëxt"), ("word " * 30, "end"), ("x", "y" * MAX_LEN)]
    if model == "hope":  # each unpadded length compiles the oracle again (~4 s for Hope): one
        pairs = [("The river flows into the sea, and the sea", " into the ocean")]  # 56 -> 64
    got = scorer.loglikelihood(pairs)
    oracle = Oracle(scorer)
    for (context, continuation), score in zip(pairs, got, strict=True):
        spaces = context[len(context.rstrip()):]
        n = len(utf8(spaces + continuation))
        full = ([0] + utf8(context + continuation))[-(MAX_LEN + 1):]
        want, greedy = oracle.score(full[:-1], full[1:], n)
        assert score.logprob == pytest.approx(want, abs=tol * n), (context, continuation)
        assert score.is_greedy == greedy


def test_rolling_loglikelihood_sums_every_token_once_over_full_windows(x64, scorers):
    """A document of 3.2 windows: token i is scored in the block of max_length predictions
    holding it, reading the max_length tokens before the block's end (the last block's end
    is the document's end, so it reads a full window too)."""
    scorer = scorers["transformer"]
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh "), size=k)) for k in (205, 64, 65, 7)]
    got = scorer.loglikelihood_rolling(docs)
    oracle = Oracle(scorer)
    for doc, score in zip(docs, got, strict=True):
        full = [0] + utf8(doc)  # full[j + 1] is token j of the document
        want = 0.0
        for start in range(0, len(full) - 1, MAX_LEN):
            end = min(start + MAX_LEN, len(full) - 1)  # predicts tokens start..end-1
            first = max(0, end - MAX_LEN)
            want += oracle.score(full[first:end], full[first + 1:end + 1], end - start)[0]
        assert score == pytest.approx(want, abs=1e-5 * len(doc))
    assert scorer.loglikelihood_rolling([""]) == [0.0]


def test_is_greedy_for_the_models_own_greedy_continuation(scorers):
    scorer = scorers["transformer"]
    oracle = Oracle(scorer)
    context = [0] + utf8("Once upon a time")
    greedy = []
    for _ in range(4):
        greedy.append(int(np.argmax(oracle.logits(context + greedy)[-1])))
    other = greedy[:-1] + [(greedy[-1] + 1) % 256]
    own, changed = scorer.loglikelihood_tokens([(context, greedy), (context, other)])
    assert own.is_greedy and not changed.is_greedy
    assert own.logprob > changed.logprob


def test_generate_until_equals_generate_and_stops_at_the_stop_string(runs, scorers):
    """Greedy `nested-jax generate` text, cut at the stop string, for prompts of different
    lengths decoded in one batch; a stop string ends the decoding early."""
    workdir, scorer = runs["transformer"], scorers["transformer"]
    prompts = ["The river", "Once upon a time there", "A"]
    full = [generate.generate(workdir, p, max_new_tokens=n, temperature=0.0)
            for p, n in zip(prompts, (12, 12, 5), strict=True)]
    assert len(full[0]) >= 6, full
    stop = full[0][3:5]
    want = [full[0][:full[0].index(stop)], full[1], full[2]]
    got = scorer.generate_until([(prompts[0], [stop], 12), (prompts[1], ["\x00"], 12),
                                 (prompts[2], [], 5)])
    assert got == want

    calls = []
    advance = scorer._advance
    scorer._advance = lambda *a: (calls.append(1), advance(*a))[1]
    try:
        assert scorer.generate_until([(prompts[0], [stop], 40)]) == [want[0]]
    finally:
        scorer._advance = advance
    assert len(calls) < len("The river") + 1 + 40 - 1  # stopped long before max_gen_toks


# ---- errors --------------------------------------------------------------------------------------


def test_errors_name_the_field_and_the_fix(tmp_path, runs):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"workdir=.*holds no checkpoint.*train the run first"):
        Scorer.from_workdir(empty)
    with pytest.raises(ValueError, match=r"workdir=.*no such directory"):
        Scorer.from_workdir(tmp_path / "missing")
    for bad in (0, -2, "x", 1.5, True):
        with pytest.raises(ValueError, match=r"batch_size=.*positive integer.*batch_size=8"):
            Scorer.from_workdir(runs["transformer"], batch_size=bad)
    with pytest.raises(ValueError, match=r"max_length=65: exceeds the model's max_seq_len=64"):
        Scorer.from_workdir(runs["transformer"], max_length=65)
    with pytest.raises(ValueError, match=r"--freeze self_modifying: model 'transformer'"):
        Scorer.from_workdir(runs["transformer"], freeze=["self_modifying"])
    scorer = Scorer.from_workdir(runs["transformer"], max_length=16)
    with pytest.raises(ValueError, match=r"max_gen_toks=16: leaves no room"):
        scorer.generate_until([("a", [], 16)])
    with pytest.raises(ValueError, match=r"continuation of 17 tokens exceeds max_length=16"):
        scorer.loglikelihood([("a", "b" * 17)])


def test_model_args_are_checked_by_name():
    ok = model_args.parse({"workdir": "runs/demo", "batch_size": "4", "freeze": "cms+self_modifying",
                           "max_batch_size": None})
    assert ok["batch_size"] == 4 and ok["freeze"] == ("cms", "self_modifying")
    assert ok["max_gen_toks"] == 256 and ok["max_length"] is None
    with pytest.raises(ValueError, match=r"batchsize=8: unknown model_args key.*workdir, batch_size"):
        model_args.parse({"workdir": "w", "batchsize": 8})
    with pytest.raises(ValueError, match=r"workdir=None: required"):
        model_args.parse({"batch_size": 8})
    with pytest.raises(ValueError, match=r"batch_size='auto': nested_jax has no automatic"):
        model_args.parse({"workdir": "w", "batch_size": "auto"})
    with pytest.raises(ValueError, match=r"batch_size=0: must be a positive integer"):
        model_args.parse({"workdir": "w", "batch_size": 0})
    with pytest.raises(ValueError, match=r"device='mps': unknown"):
        model_args.parse({"workdir": "w", "device": "mps"})
    assert model_args.jax_device("cpu:1") == jax.devices("cpu")[1]


def test_the_core_imports_without_lm_eval():
    """The scorer needs no lm_eval; the adapter names the extra that brings it."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class NoLmEval(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "lm_eval":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoLmEval())
        import nested_jax.harness.scorer, nested_jax.harness.model_args
        try:
            import nested_jax.harness.adapter
        except ImportError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pip install 'nested_jax[harness]'" in r.stdout


# ---- lm-evaluation-harness end to end (the `harness` extra) ----------------------------------


def write_tasks(directory):
    """Three offline tasks, one per request type, over jsonl files in `directory`."""
    mc = [{"question": f"Question {i}: the {w} is", "choices": ["red", "green", "blue"],
           "label": i % 3} for i, w in enumerate(["sky", "grass", "sea", "sun", "rose"])]
    ppl = [{"text": "nested learning " * 6}, {"text": "a memory that learns in context"}]
    gen = [{"prompt": "Document 1:", "answer": "x"}, {"prompt": "The river", "answer": "y"}]
    files = {}
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ntest_split: test\n"
    data = lambda name: f"dataset_kwargs:\n  data_files:\n    test: {files[name]}\n"
    (directory / "nj_mc.yaml").write_text(
        "task: nj_mc\n" + head + data("mc") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (directory / "nj_ppl.yaml").write_text(
        "task: nj_ppl\n" + head + data("ppl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (directory / "nj_gen.yaml").write_text(
        "task: nj_gen\n" + head + data("gen") + "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\ngeneration_kwargs:\n"
        "  until: ['\\n', '.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return mc, ppl, gen


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval is not installed (the harness extra)")
def test_lm_eval_simple_evaluate_offline(tmp_path, runs, monkeypatch):
    """lm_eval scores three local tasks with NestedJaxLM; every response and the accuracy
    equal what the core computes."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from nested_jax.harness.adapter import NestedJaxLM

    for n, L, c in ((0, 4, 1), (10, 4, 1), (37, 8, 3), (64, 64, 1), (200, 64, 1)):
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(
            list(range(n)), -1, L, c)]
        assert list(req.rolling_windows(list(range(n)), -1, L, c)) == [
            (list(a), list(b)) for a, b in theirs]

    mc, ppl, gen = write_tasks(tmp_path)
    lm = NestedJaxLM.create_from_arg_string(f"workdir={runs['transformer']},batch_size=4",
                                            {"batch_size": 1, "device": "cuda:0"})
    assert lm.batch_size == 4  # model_args win over lm-eval's --batch_size default
    out = lm_eval.simple_evaluate(model=lm, tasks=["nj_mc", "nj_ppl", "nj_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True, bootstrap_iters=0)
    core = lm.scorer
    scores = core.loglikelihood([(d["question"], " " + c) for d in mc for c in d["choices"]])
    picks = [int(np.argmax([s.logprob for s in scores[3 * i:3 * i + 3]])) for i in range(len(mc))]
    acc = np.mean([p == d["label"] for p, d in zip(picks, mc, strict=True)])
    assert out["results"]["nj_mc"]["acc,none"] == pytest.approx(acc)
    samples = sorted(out["samples"]["nj_mc"], key=lambda s: s["doc_id"])
    got = [r[0] for s in samples for r in s["resps"]]
    assert [g[0] for g in got] == pytest.approx([s.logprob for s in scores], abs=1e-6)

    rolling = core.loglikelihood_rolling([d["text"] for d in ppl])
    samples = sorted(out["samples"]["nj_ppl"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == pytest.approx(rolling, abs=1e-6)
    words = sum(len(re.split(r"\s+", d["text"])) for d in ppl)  # lm-eval's count_words
    assert out["results"]["nj_ppl"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(rolling) / words))

    texts = core.generate_until([(d["prompt"], ["\n", "."], 8) for d in gen])
    samples = sorted(out["samples"]["nj_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == texts

    with pytest.raises(ValueError, match=r"batchsize=8: unknown model_args key"):
        NestedJaxLM.create_from_arg_string(f"workdir={runs['transformer']},batchsize=8")


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval is not installed (the harness extra)")
def test_python_m_nested_jax_harness_runs_lm_evals_command_line(tmp_path, runs):
    """The documented command: lm-eval's own CLI, with --batch_size and --device defaults."""
    write_tasks(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    r = subprocess.run([sys.executable, "-m", "nested_jax.harness", "--model", "nested_jax",
                        "--model_args", f"workdir={runs['transformer']},batch_size=4",
                        "--tasks", "nj_mc", "--include_path", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"\|nj_mc\s*\|.*\|acc\s*\|", r.stdout), r.stdout

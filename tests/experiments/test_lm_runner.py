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


def _rec(ppl):
    return {"ppl": ppl}


def test_best_lr_is_the_lowest_perplexity_and_needs_the_whole_sweep():
    done = {(1e-3, 0): _rec(30.0), (3e-3, 0): _rec(25.0), (1e-2, 0): _rec(float("nan"))}
    assert report.best_lr(done, 0, (1e-3, 3e-3, 1e-2)) == 3e-3  # a diverged run never wins
    with pytest.raises(RuntimeError, match=r"lacks lr \[0.03\]"):
        report.best_lr(done, 0, (1e-3, 3e-3, 1e-2, 3e-2))


@pytest.mark.parametrize("argv, message", [
    (["nope"], "suite='nope' is unknown"),
    (["compare", "--scale", "huge"], "--scale='huge' is unknown"),
    (["compare", "--models", "gpt"], "--models: 'gpt' is unknown"),
    (["ablation", "--rows", "no_attention"], "--rows: 'no_attention' is unknown"),
    (["optimizers", "--optimizers", "sgdx"], "--optimizers: 'sgdx' is unknown"),
    (["compare", "--steps", "3"], "--steps=3"),
    (["compare", "--lrs", "2"], "--lrs: 2.0 must be in"),
    (["compare", "--seeds", "0", "0"], "--seeds"),
])
def test_bad_options_fail_before_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse(argv)
    assert message in capsys.readouterr().err

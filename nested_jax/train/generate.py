"""Streaming generation through the model's decode path (`nested-jax generate`).

The prompt is fed token by token through `model.decode_step` (the same cache or
fast state the model carries when streaming), then tokens are sampled one at a time
and the decoded text is written as it grows.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax.config_checks import fail
from nested_jax.train import trainer


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy at temperature 0, else softmax(logits / T) restricted to the top k (k=0: all)."""
    if temperature <= 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(workdir: str | pathlib.Path, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0,
             write: Callable[[str], None] | None = None,
             devices: Sequence[jax.Device] | None = None) -> str:
    """The continuation of `prompt` by the latest checkpoint, streamed to `write` as it grows."""
    run, state, _ = trainer.load_run(workdir, devices=devices, for_training=False)
    tok = run.tokenizer
    ids = [tok.eos_id] + [int(i) for i in tok.encode(prompt)]  # a document starts after EOS
    limit = run.model_cfg.max_seq_len
    if len(ids) + max_new_tokens > limit:
        fail("--max-new-tokens", max_new_tokens,
             f"prompt ({len(ids)} tokens) + new tokens exceeds model.max_seq_len={limit}")
    graphdef = run.graphdef

    @functools.partial(jax.jit, donate_argnums=2)
    def advance(params, rest, cache, token_B, key):
        model = nnx.merge(graphdef, params, rest)
        logits_BxV, cache = model.decode_step(cache, token_B)
        return sample(logits_BxV, key, temperature, top_k), cache

    # Copy once: a model may return one buffer twice (e.g. equal zero caches), which
    # cannot be donated twice; every later state comes out of jit in fresh buffers.
    cache = jax.tree.map(lambda x: jnp.array(x, copy=True), run.model(state).init_state(1))
    key = jax.random.key(seed)
    for t in ids:
        key, sub = jax.random.split(key)
        nxt, cache = advance(state["params"], state["rest"], cache, jnp.array([t], jnp.int32), sub)
    out: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        token = int(nxt[0])
        if token == tok.eos_id:
            break
        out.append(token)
        text = tok.decode(out)
        stable = text.rstrip("\ufffd")  # hold back a multi-byte character still arriving
        if write is not None and len(stable) > len(shown):
            write(stable[len(shown):])
            shown = stable
        key, sub = jax.random.split(key)
        nxt, cache = advance(state["params"], state["rest"], cache, jnp.array([token], jnp.int32),
                             sub)
    text = tok.decode(out)
    if write is not None and len(text) > len(shown):
        write(text[len(shown):])
    return text

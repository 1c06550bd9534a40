"""Small-model training comparison: AdamW vs Muon vs M3 vs DMGD (and the other memories).

    python experiments/train_optim_compare.py                # ~5 min on 2 CPU cores
    python experiments/train_optim_compare.py --steps 100    # quick check

A self-contained character-level language model (it does not import the
project's model family, which is written elsewhere): a 16-character context
is embedded, flattened and passed through a 2-layer MLP to next-character
logits. The text is synthetic but structured, built here from a fixed seed: a
lexicon of pseudo-words drawn from a Zipf law, chained by a sparse random
word-bigram table, with punctuation. Each optimizer gets a small
learning-rate grid; the best validation loss (bits per character) is
reported. Writes ``experiments/results/bench_optim_train.md``.

This is a smoke-scale comparison meant to show the optimizers train a real
model end to end; the paper's claims (ViT/LM scale) need the training stack.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nested_jax.optim as no  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "bench_optim_train.md")
CONTEXT, EMBED, HIDDEN = 16, 32, 256


def make_text(n_chars: int, seed: int = 0) -> str:
    """Zipfian pseudo-words chained by a sparse word-bigram table."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    n_words = 400
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(n_words)]
    zipf = 1.0 / np.arange(1, n_words + 1)
    next_words = [
        rng.choice(n_words, size=8, replace=False, p=zipf / zipf.sum()) for _ in range(n_words)
    ]
    out, w, length = [], 0, 0
    while length < n_chars:
        word = words[w]
        out.append(word)
        length += len(word) + 1
        punct = rng.random()
        out.append(". " if punct < 0.08 else ", " if punct < 0.15 else " ")
        w = int(rng.choice(next_words[w]))
    return "".join(out)[:n_chars]


def encode(text: str):
    vocab = sorted(set(text))
    table = {c: i for i, c in enumerate(vocab)}
    return np.array([table[c] for c in text], np.int32), len(vocab)


def init_params(key, vocab):
    k1, k2, k3 = jax.random.split(key, 3)
    scale = lambda fan_in: 1.0 / math.sqrt(fan_in)
    return {
        "embed": jax.random.normal(k1, (vocab, EMBED)) * 0.1,
        "w1": jax.random.normal(k2, (CONTEXT * EMBED, HIDDEN)) * scale(CONTEXT * EMBED),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k3, (HIDDEN, vocab)) * scale(HIDDEN),
        "b2": jnp.zeros(vocab),
    }


def loss_fn(params, x, y):
    h = params["embed"][x].reshape(x.shape[0], -1)
    h = jax.nn.gelu(h @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(data, batch, rng):
    while True:
        idx = rng.integers(0, len(data) - CONTEXT - 1, size=batch)
        x = np.stack([data[i : i + CONTEXT] for i in idx])
        yield x, data[idx + CONTEXT]


def optimizers():
    """(name, factory of the learning rate, learning-rate grid)."""
    dims = no.matrix_dimension_numbers  # NS on matrices, vectors pass through
    wd = 0.01
    return [
        ("adamw", lambda lr: optax.adamw(lr, weight_decay=wd), (1e-3, 3e-3, 1e-2)),
        ("muon (optax.contrib)", lambda lr: contrib.muon(lr, weight_decay=wd), (3e-3, 1e-2, 3e-2)),
        (
            "m3",
            lambda lr: no.m3(lr, weight_dimension_numbers=dims, weight_decay=wd),
            (1e-4, 3e-4, 1e-3),
        ),
        (
            "deep_momentum (DMGD)",
            lambda lr: no.deep_momentum(lr, weight_decay=wd),
            (3e-2, 1e-1, 3e-1),
        ),
        ("momentum_memory", lambda lr: no.momentum_memory(lr, weight_decay=wd), (3e-2, 1e-1, 3e-1)),
        ("delta_momentum", lambda lr: no.delta_momentum(lr, weight_decay=wd), (3e-2, 1e-1, 3e-1)),
        (
            "newton_schulz_momentum",
            lambda lr: no.newton_schulz_momentum(
                lr, weight_dimension_numbers=dims, weight_decay=wd
            ),
            (3e-3, 1e-2, 3e-2),
        ),
        ("adam_memory", lambda lr: no.adam_memory(lr, weight_decay=wd), (1e-3, 3e-3, 1e-2)),
    ]


def train(tx, data, val, vocab, steps, batch, seed=0):
    params = init_params(jax.random.key(seed), vocab)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(loss_fn)
    it = batches(data, batch, np.random.default_rng(seed))
    for _ in range(steps):
        x, y = next(it)
        params, state, loss = step(params, state, x, y)
    vx, vy = val
    val_loss = float(
        np.mean(
            [evaluate(params, vx[i : i + 512], vy[i : i + 512]) for i in range(0, len(vx), 512)]
        )
    )
    return float(loss), val_loss


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chars", type=int, default=300_000)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()

    data, vocab = encode(make_text(args.chars))
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    vi = np.arange(0, len(val_data) - CONTEXT - 1, 7)[:4096]
    val = (np.stack([val_data[i : i + CONTEXT] for i in vi]), val_data[vi + CONTEXT])
    n_params = sum(x.size for x in jax.tree.leaves(init_params(jax.random.key(0), vocab)))
    print(f"vocab {vocab}, {len(data)} chars, {n_params / 1e3:.0f}k params", flush=True)

    rows = []
    for name, make, grid in optimizers():
        results = []
        t0 = time.perf_counter()
        for lr in grid:
            tr, va = train(make(lr), train_data, val, vocab, args.steps, args.batch)
            results.append((va if np.isfinite(va) else np.inf, lr, tr))
        va, lr, tr = min(results)
        secs = (time.perf_counter() - t0) / len(grid)
        rows.append((name, lr, tr, va, secs, results))
        print(
            f"{name:26s} best lr {lr:.0e}  train {tr:.3f}  val {va:.3f} nats  ({secs:.0f}s/run)",
            flush=True,
        )

    bits = 1 / math.log(2)
    lines = [
        "# Small-model training comparison (smoke scale)",
        "",
        f"Command: `python experiments/train_optim_compare.py --steps {args.steps}"
        f" --batch {args.batch} --chars {args.chars}`",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores,"
        f" backend {jax.default_backend()}",
        f"- versions: python {platform.python_version()}, jax {jax.__version__},"
        f" optax {optax.__version__}",
        f"- model: char MLP, context {CONTEXT}, embed {EMBED}, hidden {HIDDEN}, vocab {vocab},"
        f" {n_params / 1e3:.0f}k params; synthetic Zipfian pseudo-word text, {len(data)} chars,"
        " 90/10 split",
        f"- {args.steps} steps of batch {args.batch}, weight decay 0.01, constant learning rate;"
        " the best of a 3-point learning-rate grid per optimizer; Newton–Schulz on matrices,"
        " vectors passed through (M3, NS momentum) or to Adam (optax's Muon)",
        "",
        "| optimizer | best lr | train loss (nats) | val loss (nats) | val bits/char | s / run |"
        " val loss at each lr |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, lr, tr, va, secs, results in rows:
        grid = ", ".join(f"{r[1]:.0e}: {r[0]:.3f}" for r in sorted(results, key=lambda r: r[1]))
        lines.append(
            f"| {name} | {lr:.0e} | {tr:.3f} | {va:.3f} | {va * bits:.3f} | {secs:.0f} | {grid} |"
        )
    lines += [
        "",
        "Smoke scale: a single seed, a short run and a coarse grid; differences of a few"
        " hundredths of a nat are within noise. The paper's comparisons (ViT, 140M-1.3B LMs)"
        " wait for the project's training stack.",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

"""What the induction read can hold at best: an idealised delta-rule memory on MQAR.

    python -m experiments.icl.delta_capacity

Hope's self-modifying memory with decisions #24's initialisation starts out writing every
transition x_{t-1} -> x_t and reading at x_t (docs/decisions.md #24).  This script runs that
mechanism alone, with nothing learned: a linear memory M (d x d) per sequence, each token's
write the delta rule M <- M + eta (v - M k) k^T with k = e(x_{t-1}), v = e(x_t) for fixed
random unit embeddings e, and the prediction after each query key the seen token whose
embedding is nearest M e(k).  Every token writes (no learned gate skips filler or queries), so
later writes erase earlier ones along their keys: the figure is the recall a model starts from
before training tunes embeddings, keys and gates, at a head width d.

The point is diagnostic: at the tiny preset a head is d = 16 wide (4 heads of a 64-wide model).
A second table runs the real self-modifying layer (``SelfModifyingTitans``, untrained, the
tiny preset's width 64 and chunks) on the same sequences, its inputs random Gaussian token
embeddings: M_memory's read o_t after each query key is scored against the layer's own value
vector v_s of every value token seen so far (at its latest position), the nearest taken, so it
measures the same read the idealised table does, with the real keys, gates, momentum, decay
and 2-layer memory.  The engine call is wrapped to capture q, k, v, the gates and o.
Results: ``results/icl_delta_capacity.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from experiments import benchlib
from experiments.icl.tasks.base import RESERVED
from experiments.icl.tasks.mqar import MQAR

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
TASKS = ((8, 64, 64), (32, 256, 256))  # (pairs, T, vocab): the CPU MQAR sizes of the suite
WIDTHS = (16, 32, 64)
ETAS = (0.5, 1.0)


def recall(task: MQAR, d: int, eta: float, seed: int, batch: int = 16) -> float:
    """Fraction of query positions whose value the idealised delta-rule read recovers."""
    rng = np.random.default_rng(seed)
    b = task.sample(rng, batch)
    e_VxD = rng.standard_normal((task.vocab_size, d))
    e_VxD /= np.linalg.norm(e_VxD, axis=1, keepdims=True)
    right = total = 0
    for x, mask in zip(b.tokens, b.mask, strict=True):
        M = np.zeros((d, d))
        for t in range(1, len(x) - 1):
            k, v = e_VxD[x[t - 1]], e_VxD[x[t]]
            M += eta * np.outer(v - M @ k, k)  # write the transition into token t, then read
            if mask[t]:
                seen = np.unique(x[: t + 1])
                right += seen[np.argmax(e_VxD[seen] @ (M @ e_VxD[x[t]]))] == x[t + 1]
                total += 1
    return right / total


def mlp_recall(task: MQAR, d: int, seed: int, orthogonal: bool, write_input_side: bool,
               eta: float = 1.0, batch: int = 8) -> float:
    """The idealised read through the paper's memory form M(z) = z + W1 silu(W2 z) (W1 = 0,
    W2 random at the start of every sequence): each token a normalised gradient step on
    0.5 |M(k) - v|^2 for W1 (and W2 if ``write_input_side``), the read M(q) - q scored against
    the value embeddings seen.  A numpy emulation of the form, not the engine's rule."""
    rng = np.random.default_rng(seed)
    b = task.sample(rng, batch)
    e_VxD = rng.standard_normal((task.vocab_size, d))
    e_VxD /= np.linalg.norm(e_VxD, axis=1, keepdims=True)
    sig = lambda z: 1 / (1 + np.exp(-z))
    lo = RESERVED + task.vocab // 2
    right = total = 0
    for x, mask in zip(b.tokens, b.mask, strict=True):
        w2 = rng.standard_normal((d, d))
        w2 = np.linalg.qr(w2)[0] if orthogonal else w2 / np.sqrt(d)
        w1 = np.zeros((d, d))
        for t in range(1, len(x) - 1):
            k, v = e_VxD[x[t - 1]], e_VxD[x[t]]
            a = w2 @ k
            h = a * sig(a)
            err = k + w1 @ h - v
            g2 = np.outer((w1.T @ err) * sig(a) * (1 + a * (1 - sig(a))), k)
            w1 -= eta / (1 + eta * h @ h) * np.outer(err, h)
            if write_input_side:
                w2 -= eta / (1 + eta * k @ k) * g2
            if mask[t]:
                a = w2 @ e_VxD[x[t]]
                o = w1 @ (a * sig(a))
                seen = [c for c in np.unique(x[: t + 1]) if c >= lo]
                right += seen[int(np.argmax([e_VxD[c] @ o for c in seen]))] == x[t + 1]
                total += 1
    return right / total


# Real-layer rows: (label, heads, config overrides).
MLP = dict(memory_form="mlp")  # the paper's M_memory, Hope's default before decisions #25
LAYER_ROWS = (("MLP M_memory", 4, MLP), ("MLP M_memory", 1, MLP),
              ("MLP M_memory, no weight decay (alpha = 1)", 1, dict(MLP, weight_decay=False)),
              ("MLP M_memory, no weight decay, no momentum", 1,
               dict(MLP, weight_decay=False, momentum=False)),
              ("MLP M_memory, no weight decay, no momentum", 4,
               dict(MLP, weight_decay=False, momentum=False)),
              ("linear M_memory (the default)", 4, dict(memory_form="linear")),
              ("linear M_memory (the default)", 1, dict(memory_form="linear")),
              ("linear M_memory, no weight decay", 1, dict(memory_form="linear",
                                                         weight_decay=False)),
              ("linear M_memory, no weight decay, no momentum", 1,
               dict(memory_form="linear", weight_decay=False, momentum=False)))


def layer_read(task: MQAR, heads: int, seed: int, batch: int = 8, **overrides) -> dict:
    """Recall of the untrained real layer's M_memory read, plus its mean gates and how well
    the query's q matches the key its pair was written under (cosine, per head)."""
    import jax.numpy as jnp
    from flax import nnx

    from nested_jax.models import self_modifying as sm

    caught = {}
    apply = sm.nm.apply

    def capture(level, state, q, k, v, gates, **kw):
        out = apply(level, state, q, k, v, gates, **kw)
        caught.update(q=q, k=k, v=v, gates=gates, o=out[0])
        return out

    rng = np.random.default_rng(seed)
    b = task.sample(rng, batch)
    cfg = sm.SelfModifyingConfig(d_model=64, n_heads=heads, chunk_memory=16, chunk_other=4,
                                 **overrides)
    layer = sm.SelfModifyingTitans(cfg, out_std=0.02, rngs=nnx.Rngs(seed))
    e_VxD = rng.standard_normal((task.vocab_size, 64)).astype(np.float32)
    sm.nm.apply = capture
    try:
        layer(jnp.asarray(e_VxD[b.tokens[:, :-1]]))
    finally:
        sm.nm.apply = apply
    q, k, v, o = (np.asarray(caught[n], np.float64) for n in "qkvo")  # [B, T, H, K]
    cos = lambda a, c: np.mean(np.sum(a * c, -1) / np.linalg.norm(a, axis=-1)
                               / np.linalg.norm(c, axis=-1))
    lo = RESERVED + task.vocab // 2  # values are the upper half of the vocabulary
    right = total = 0
    match = []
    for r, (x, mask) in enumerate(zip(b.tokens, b.mask, strict=True)):
        for t in np.nonzero(mask)[0]:
            last = {int(c): s for s, c in enumerate(x[: t + 1]) if c >= lo}
            cands = list(last)
            scores = [np.sum(o[r, t] * v[r, last[c]]) for c in cands]
            right += cands[int(np.argmax(scores))] == x[t + 1]
            total += 1
            write = next(s for s in range(1, t) if x[s - 1] == x[t])  # the pair's own write
            match.append(cos(q[r, t], k[r, write]))
    g = caught["gates"]
    return {"recall": right / total, "cos": float(np.mean(match)),
            "alpha": float(np.mean(np.asarray(g.alpha))), "eta": float(np.mean(np.asarray(g.eta)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = ap.parse_args(argv)
    rows = []
    for n, T, V in TASKS:
        task = MQAR(n_pairs=n, seq_len=T, vocab=V)
        for d in WIDTHS:
            for eta in ETAS:
                acc = [recall(task, d, eta, s) for s in args.seeds]
                rows.append([f"{n} x {T} (vocab {V})", d, eta,
                             f"{100 * np.mean(acc):.1f}% [{100 * min(acc):.1f}, "
                             f"{100 * max(acc):.1f}]", f"{100 / (V // 2):.1f}%"])
    table = benchlib.markdown_table(
        ["MQAR", "head width d", "eta", "recall, mean [min, max] over seeds", "chance"], rows)
    mlp_rows = []
    task = MQAR(n_pairs=32, seq_len=256, vocab=256)
    for orthogonal in (False, True):
        for write_input_side in (True, False):
            acc = [mlp_recall(task, 64, s, orthogonal, write_input_side) for s in args.seeds]
            mlp_rows.append(["32 x 256", 64, "orthogonal" if orthogonal else "Gaussian / sqrt(d)",
                             "both" if write_input_side else "W1 only",
                             f"{100 * np.mean(acc):.1f}% [{100 * min(acc):.1f}, "
                             f"{100 * max(acc):.1f}]"])
    mlp_table = benchlib.markdown_table(
        ["MQAR", "d", "W2 at the start", "matrices written", "recall, mean [min, max]"],
        mlp_rows)
    layer_rows = []
    for n, T, V in TASKS:
        task = MQAR(n_pairs=n, seq_len=T, vocab=V)
        for label, heads, over in LAYER_ROWS:
            res = [layer_read(task, heads, s, **over) for s in args.seeds]
            acc = [r["recall"] for r in res]
            layer_rows.append([f"{n} x {T}", f"{heads} x {64 // heads}", label,
                               f"{100 * np.mean(acc):.1f}% [{100 * min(acc):.1f}, "
                               f"{100 * max(acc):.1f}]",
                               f"{np.mean([r['cos'] for r in res]):.3f}",
                               f"{np.mean([r['alpha'] for r in res]):.4f}",
                               f"{np.mean([r['eta'] for r in res]):.2f}"])
    layer_table = benchlib.markdown_table(
        ["MQAR", "heads x width", "layer settings", "recall, mean [min, max]",
         "cos(q at query, k at its write)", "mean alpha", "mean eta (M_memory)"], layer_rows)
    command = "python -m experiments.icl.delta_capacity " + " ".join(argv or sys.argv[1:])
    notes = os.path.join(os.path.dirname(__file__), "notes", "delta_capacity.md")
    reading = open(notes).read() if os.path.exists(notes) else "(no notes yet)\n"
    benchlib.write_result(
        os.path.join(RESULTS, "icl_delta_capacity.md"),
        "In-context learning: what an idealised delta-rule induction read holds on MQAR",
        f"Command: `{command.strip()}`\n\nSeeds {args.seeds}, 16 sequences each; every "
        "token writes its transition; nothing is trained.\n\n" + table + "\n\n"
        "**The real layer, untrained** (tiny preset width 64, chunks 16 / 4, Gaussian token "
        "embeddings; 8 sequences per seed):\n\n" + layer_table + "\n\n"
        "**The paper's memory form, idealised** (numpy: M(z) = z + W1 silu(W2 z), normalised "
        "gradient steps at eta = 1, every token writes; 8 sequences per seed):\n\n"
        + mlp_table + "\n\n" + reading)
    return 0


if __name__ == "__main__":
    sys.exit(main())

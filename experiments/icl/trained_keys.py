"""What the trained self-modifying memories key a needle's value on: the keys and queries of a
finished S-NIAH run, measured.

    python -m experiments.icl.trained_keys niah --tasks niah_uuid --models hope \\
        --variants all sm_only --seeds 0 1 --set n_heads=1 retention_init=0.9999 \\
        --train-on both --steps 2400 --out icl_niah_uuid_2400

Takes the arguments of the ``experiments.icl.run`` command that trained the runs and restores
each run's final parameters (read-only, as ``needle_depth`` does).  On fresh held-out needles at
the training length it records, per self-modifying layer, the keys k_t that M_memory writes the
needle's value under (one per character: k_t pairs with v_t ~ x_t) and the queries q_s it
reads with while the model answers (q_s at the character before the one it predicts), and
reports, per layer:

- *nearest key*: the share of the value's characters whose query's nearest needle key (largest
  q . k over the value's write positions) is the right one, and of values with all right;
- *delta read*: the same writes put into a fresh linear delta-rule memory (a full step on the
  trained unit keys, one-hot values, no decay, no haystack) and read back with the trained
  queries: the share of characters and of whole values whose arg-max is right -- what these
  keys allow a memory of this width, the trained counterpart of ``uuid_keys``' ceilings;
- *key span*: mean cos(k_t, k_t') over pairs of value positions whose previous character is
  the same but whose character before that differs, against pairs whose previous character
  differs.  Near 1 for the first: the key sees one character; clearly below: it sees more.

Writes ``experiments/results/<out>_keys.md``; the reading, where one exists, is
``experiments/icl/notes/<out minus icl_>_keys.md``.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import benchlib
from experiments.icl import needle_depth, run, uuid_keys

SEQUENCES = 32  # held-out needles per run


def value_positions(tokens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """([B, n] input positions of the needle's value characters, [B, n] input positions whose
    next-token targets are the answer's characters): the value is the last n tokens of each
    row (inputs + final target) and appears once before, in the needle."""
    writes, reads = [], []
    T = tokens.shape[1] - 1
    for row in tokens:
        value = row[-n:]
        hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
            row, n) == value, axis=1))
        writes.append(hits[0] + np.arange(n))
        reads.append(T - n + np.arange(n))  # input T-n+i predicts target i
    return np.asarray(writes), np.asarray(reads)


def record(graph, params, rest, tokens: np.ndarray):
    """Per self-modifying layer, (q, k) [B, T, K] (head 0) on the inputs tokens[:, :-1]."""
    from nested_jax.models import self_modifying as smod

    @jax.jit
    def qk(p, x):
        with needle_depth.recording(smod.SelfModifyingTitans, "_scan_coupled") as coupled, \
                needle_depth.recording(smod.SelfModifyingTitans, "_static") as static:
            nnx.merge(graph, p, rest)(x)
        T = x.shape[1]
        return [(s["q"][:, :T, 0], c[1][1][:, :T, 0]) for s, c in zip(static, coupled,
                                                                      strict=True)]

    out = qk(params, jnp.asarray(tokens[:, :-1]))
    return [(np.asarray(q, np.float64), np.asarray(k, np.float64)) for q, k in out]


def measures(q_BxTxK, k_BxTxK, tokens, writes, reads) -> dict:
    """The three measures of the module docstring over the rows of one batch."""
    b = np.arange(len(tokens))[:, None]
    kw_BxNxK, qr_BxNxK = k_BxTxK[b, writes], q_BxTxK[b, reads]
    n = writes.shape[1]
    scores_BxNxN = np.einsum("bik,bjk->bij", qr_BxNxK, kw_BxNxK)  # query i against key j
    values = tokens[b, writes]  # the character written at each value position
    # Nearest key: right when the key it picks holds the same character (repeats are fine).
    nearest = values[b, scores_BxNxN.argmax(-1)] == values
    # A fresh delta-rule memory over the value's writes, read with the trained queries.
    symbols = np.unique(values)
    onehot = (values[..., None] == symbols).astype(np.float64)  # [B, N, S]
    delta = symbols[uuid_keys.delta_read(kw_BxNxK, onehot, qr_BxNxK).argmax(-1)] == values
    # Key span over pairs of value positions (the first two have prefix characters before).
    prev1, prev2 = tokens[b, writes - 1], tokens[b, writes - 2]
    cos = np.einsum("bik,bjk->bij", kw_BxNxK, kw_BxNxK) / np.einsum(
        "bi,bj->bij", *[np.linalg.norm(kw_BxNxK, axis=-1)] * 2)
    off = ~np.eye(n, dtype=bool)[None]
    same1 = (prev1[:, :, None] == prev1[:, None, :]) & off
    diff2 = prev2[:, :, None] != prev2[:, None, :]
    return {"nearest": nearest, "delta": delta,
            "cos_same_prev_diff_before": cos[same1 & diff2],
            "cos_diff_prev": cos[(~same1) & off]}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = run.parse(argv)
    scale = run.SUITES[a.suite][a.scale]
    built = run.command_tasks(a, scale)
    overrides = run.settings(a, scale)[2]
    t0, rows = time.time(), []
    for p in run.planned(a, scale, built):
        cfg, graph, params, rest = needle_depth.restore(p, scale.preset, overrides)
        n = p.task.value_len
        rng = np.random.default_rng(needle_depth.EVAL_SEED + p.seed)
        tokens = p.task.sample(rng, SEQUENCES).tokens
        writes, reads = value_positions(tokens, n)
        for layer, (q, k) in enumerate(record(graph, params, rest, tokens)):
            m = measures(q, k, tokens, writes, reads)
            rows.append([p.name, p.model, p.variant, p.seed, layer,
                         f"{m['nearest'].mean():.3f}", f"{m['nearest'].all(1).mean():.3f}",
                         f"{m['delta'].mean():.3f}", f"{m['delta'].all(1).mean():.3f}",
                         f"{m['cos_same_prev_diff_before'].mean():.3f}",
                         f"{m['cos_diff_prev'].mean():.3f}"])
            print(*rows[-1], flush=True)
    stem = a.out or f"icl_{a.suite}"
    notes = os.path.join(run.HERE, "notes", f"{stem.removeprefix('icl_')}_keys.md")
    reading = open(notes).read() if os.path.exists(notes) else "(no notes yet)\n"
    body = (f"Command: `python -m experiments.icl.trained_keys {shlex.join(argv)}` "
            f"({(time.time() - t0) / 60:.1f} min)\n\n"
            f"- the runs trained by `python -m experiments.icl.run` with the same arguments "
            f"(results `{stem}.md`), restored from their last checkpoint; {SEQUENCES} fresh "
            f"held-out needles per run at the training length (generator seed "
            f"{needle_depth.EVAL_SEED} + seed), head 0 of each self-modifying layer\n"
            "- *nearest key*: characters (whole values) whose query's nearest value key holds "
            "the right character; *delta read*: the value's writes under the trained keys in a "
            "fresh linear delta-rule memory (full step, one-hot values, no decay or haystack), "
            "read with the trained queries; *cos, same previous character*: mean cos between "
            "value keys whose previous character is the same and the one before differs; "
            "*cos, different previous*: the same over pairs whose previous character differs "
            "(the module docstring says more)\n\n"
            + benchlib.markdown_table(
                ["task", "model", "variant", "seed", "layer", "nearest key: characters",
                 "nearest key: whole", "delta read: characters", "delta read: whole",
                 "cos, same previous character", "cos, different previous"], rows)
            + "\n\n## Reading (hand-written; experiments/icl/notes/"
            + f"{os.path.basename(notes)})\n\n" + reading)
    benchlib.write_result(os.path.join(run.RESULTS, f"{stem}_keys.md"),
                          "What the trained self-modifying memories key a needle on", body)


if __name__ == "__main__":
    main()

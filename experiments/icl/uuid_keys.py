"""How far a memory keyed on the previous characters can copy an S-NIAH-3 UUID.

    python -m experiments.icl.uuid_keys            # writes results/icl_niah_uuid_keys.md

An associative memory that copies the needle writes, for each character of the value, the
pair (the k characters before it -> the character) and, asked for the value, reads it back
one character at a time.  With k = 1 (the self-modifying memories' key starts on the
previous token, decisions #24) a hex digit's successor is ambiguous: 32 digits from 16
symbols repeat their predecessors.  This counts, on the task's own values
(``NeedleUuid.value``, ``experiments/icl/tasks/niah.py``) and its needle sentence, what an
ideal such copier gets right when a later write to the same key replaces the earlier one:
the fraction of the 36 characters, and of whole UUIDs; and, for contrast, the same for
S-NIAH-1/2's 7-digit numbers (``NeedleNoise.value``).  No model is trained: it is a ceiling
for a copier with that key, to read ``icl_niah_uuid_2400.md`` against.

The self-modifying memories do not hold a table: M_memory is one linear matrix per head
(``memory_form="linear"``, decisions #25) written by the delta rule.  ``delta_copy`` puts the
same writes into such a memory of dimension D -- each character's one-hot under a unit key for
its k-character context, a full delta step (the Sherman-Morrison step at eta = 1), no decay,
the haystack's own writes left out, so again a ceiling -- and reads each character back as the
arg-max of W q.  Two kinds of key:

- ``random``: an independent random unit vector per distinct context, the best a learned
  non-linear key map can hope for (contexts sharing a character get unrelated keys);
- ``linear``: the l2-normalised sum of the k characters' own random unit embeddings weighted
  1, 1/2, 1/4, ...: what a causal conv over the previous tokens gives before any non-linearity.
  Every such key lies in the span of the 17 symbols' embeddings (16 hex digits and the dash),
  so a longer conv alone adds no room.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import benchlib
from experiments.icl.tasks.niah import NeedleNoise, NeedleUuid

HERE = os.path.dirname(__file__)
RESULTS = os.path.join(HERE, "..", "results")
NOTES = os.path.join(HERE, "notes", "niah_uuid_keys.md")
PREFIX = "The special magic {kind} for {key} is: "  # the needle sentence before the value
# The value kinds counted: S-NIAH-3's UUID, and S-NIAH-1/2's 7-digit number for contrast.
VALUES = {"uuid": NeedleUuid, "number": NeedleNoise}


def ideal_copy(value: str, k: int, kind: str = "uuid") -> list[bool]:
    """Per character of ``value``: does a last-write-wins copier keyed on the k characters
    before it (the needle sentence's, before the first) read it back right?"""
    text = PREFIX.format(kind=kind, key="x")[-k:] + value
    table = {}
    for i in range(k, len(text)):
        table[text[i - k:i]] = text[i]
    return [table[text[i - k:i]] == text[i] for i in range(k, len(text))]


def delta_copy(values: list[str], k: int, dim: int, keys: str,
               rng: np.random.Generator) -> np.ndarray:
    """[n, 36] bools: each character of each value read back right from a linear delta-rule
    memory of dimension ``dim`` that stored the value (module docstring).  ``keys`` is
    "random" (one random unit key per distinct context, drawn once for all values) or
    "linear" (a weighted sum of per-character random embeddings)."""
    texts = [PREFIX.format(kind="uuid", key="x")[-k:] + v for v in values]
    symbols = sorted(set("".join(texts)))
    index = {c: i for i, c in enumerate(symbols)}
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    if keys == "random":
        contexts = sorted({t[i - k:i] for t in texts for i in range(k, len(t))})
        table = dict(zip(contexts, unit(rng.normal(size=(len(contexts), dim))), strict=True))
        key = lambda ctx: table[ctx]
    elif keys == "linear":
        emb = unit(rng.normal(size=(len(symbols), dim)))
        weights = 0.5 ** np.arange(k)  # the character just before weighs most
        key = lambda ctx: unit(sum(w * emb[index[c]]
                                   for w, c in zip(weights, ctx[::-1], strict=True)))
    else:
        raise ValueError(f"keys={keys!r}: must be 'random' or 'linear'")
    L = len(texts[0])
    k_NxLxD = np.stack([[key(t[i - k:i]) for i in range(k, L)] for t in texts])
    v_NxL = np.array([[index[c] for c in t[k:]] for t in texts])
    read_NxLxS = delta_read(k_NxLxD, np.eye(len(symbols))[v_NxL], k_NxLxD)
    return read_NxLxS.argmax(-1) == v_NxL


def delta_read(k_NxLxD: np.ndarray, v_NxLxS: np.ndarray, q_NxMxD: np.ndarray) -> np.ndarray:
    """[N, M, S]: a fresh linear memory per row, written by the delta rule at a full step,
    W <- W + (v - W k) k^T, with the L pairs in order (no decay), then read at the queries."""
    W_NxSxD = np.zeros((k_NxLxD.shape[0], v_NxLxS.shape[-1], k_NxLxD.shape[-1]))
    for i in range(k_NxLxD.shape[1]):
        k_NxD = k_NxLxD[:, i]
        err_NxS = v_NxLxS[:, i] - np.einsum("nsd,nd->ns", W_NxSxD, k_NxD)
        W_NxSxD += np.einsum("ns,nd->nsd", err_NxS, k_NxD)
    return np.einsum("nsd,nmd->nms", W_NxSxD, q_NxMxD)


def measure_delta(seed: int, n: int, k: int, dim: int, keys: str) -> tuple[float, float]:
    """(fraction of characters, fraction of whole values) a delta-rule memory reads back."""
    task = NeedleUuid.__new__(NeedleUuid)
    rng = np.random.default_rng(seed)
    right = delta_copy([task.value(rng) for _ in range(n)], k, dim, keys, rng)
    return float(right.mean()), float(right.all(axis=1).mean())


def measure(seed: int, n: int, k: int, kind: str = "uuid") -> tuple[float, float]:
    """(fraction of characters, fraction of whole values) right over n values of one seed."""
    cls = VALUES[kind]
    task = cls.__new__(cls)  # value() needs no haystack
    rng = np.random.default_rng(seed)
    right = [ideal_copy(task.value(rng), k, kind) for _ in range(n)]
    return float(np.mean(right)), float(np.mean([all(r) for r in right]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--n", type=int, default=100_000, help="values per seed (the table)")
    ap.add_argument("--n-delta", type=int, default=5_000,
                    help="values per seed (the delta-rule memory)")
    ap.add_argument("--dims", nargs="+", type=int, default=[64, 128, 256],
                    help="delta-rule memory dimensions (the S-NIAH recipe's head is 64)")
    args = ap.parse_args(argv)
    span = lambda xs: f"{np.mean(xs):.4f} [{min(xs):.4f}, {max(xs):.4f}]"
    rows = []
    for kind in VALUES:
        for k in (1, 2, 3, 4):
            got = [measure(s, args.n, k, kind) for s in args.seeds]
            chars, whole = zip(*got, strict=True)
            rows.append([kind, k, span(chars), span(whole)])
    table = benchlib.markdown_table(["value", "key: characters before", "characters right",
                                     "whole values right"], rows)
    rows = []
    for keys in ("random", "linear"):
        for dim in args.dims:
            for k in (1, 2, 3, 4):
                got = [measure_delta(s, args.n_delta, k, dim, keys) for s in args.seeds]
                chars, whole = zip(*got, strict=True)
                rows.append([keys, dim, k, span(chars), span(whole)])
    delta_table = benchlib.markdown_table(["keys", "D", "key: characters before",
                                           "characters right", "whole UUIDs right"], rows)
    command = "python -m experiments.icl.uuid_keys " + " ".join(argv or [])
    body = (f"Command: `{command.strip()}`; {args.n} values per seed, seeds "
            f"{', '.join(map(str, args.seeds))} (mean [min, max])\n\n"
            "An ideal last-write-wins copier of the S-NIAH-3 value (`uuid`), and of the "
            "S-NIAH-1/2 value (`number`, 7 digits) for contrast, keyed on the k characters "
            "before each character (no model trained; the module docstring says how):\n\n"
            f"{table}\n\n"
            f"The same writes in a linear delta-rule memory of dimension D ({args.n_delta} "
            "values per seed; random keys: one random unit key per distinct context; linear "
            "keys: a weighted sum of the characters' embeddings, what a conv gives):\n\n"
            f"{delta_table}\n"
            f"\n## Reading (hand-written; experiments/icl/notes/{os.path.basename(NOTES)})\n\n"
            + open(NOTES).read())
    benchlib.write_result(os.path.join(RESULTS, "icl_niah_uuid_keys.md"),
                          "S-NIAH-3: what a copier keyed on the previous characters can hold",
                          body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far a memory keyed on the previous characters can copy an S-NIAH-3 UUID.

    python -m experiments.icl.uuid_keys            # writes results/icl_niah_uuid_keys.md

An associative memory that copies the needle writes, for each character of the value, the
pair (the k characters before it -> the character) and, asked for the value, reads it back
one character at a time.  With k = 1 (the self-modifying memories' key starts on the
previous token, decisions #24) a hex digit's successor is ambiguous: 32 digits from 16
symbols repeat their predecessors.  This counts, on the task's own values
(``NeedleUuid.value``, ``experiments/icl/tasks/niah.py``) and its needle sentence, what an
ideal such copier gets right when a later write to the same key replaces the earlier one:
the fraction of the 36 characters, and of whole UUIDs.  No model is trained: it is a ceiling
for a copier with that key, to read ``icl_niah_uuid_2400.md`` against.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import benchlib
from experiments.icl.tasks.niah import NeedleUuid

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
PREFIX = "The special magic uuid for {key} is: "  # NeedleUuid.needle before the value


def ideal_copy(value: str, k: int) -> list[bool]:
    """Per character of ``value``: does a last-write-wins copier keyed on the k characters
    before it (the needle sentence's, before the first) read it back right?"""
    text = PREFIX.format(key="x")[-k:] + value
    table = {}
    for i in range(k, len(text)):
        table[text[i - k:i]] = text[i]
    return [table[text[i - k:i]] == text[i] for i in range(k, len(text))]


def measure(seed: int, n: int, k: int) -> tuple[float, float]:
    """(fraction of characters, fraction of whole values) right over n values of one seed."""
    task = NeedleUuid.__new__(NeedleUuid)  # value() needs no paragraphs
    rng = np.random.default_rng(seed)
    right = [ideal_copy(task.value(rng), k) for _ in range(n)]
    return float(np.mean(right)), float(np.mean([all(r) for r in right]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--n", type=int, default=100_000, help="values per seed")
    args = ap.parse_args(argv)
    rows = []
    for k in (1, 2, 3, 4):
        chars, whole = zip(*(measure(s, args.n, k) for s in args.seeds), strict=True)
        span = lambda xs: f"{np.mean(xs):.4f} [{min(xs):.4f}, {max(xs):.4f}]"
        rows.append([k, span(chars), span(whole)])
    table = benchlib.markdown_table(["key: characters before", "characters right",
                                     "whole UUIDs right"], rows)
    command = "python -m experiments.icl.uuid_keys " + " ".join(argv or [])
    body = (f"Command: `{command.strip()}`; {args.n} values per seed, seeds "
            f"{', '.join(map(str, args.seeds))} (mean [min, max])\n\n"
            "An ideal last-write-wins copier of the S-NIAH-3 value keyed on the k characters "
            "before each character (no model trained; the module docstring says how):\n\n"
            f"{table}\n")
    benchlib.write_result(os.path.join(RESULTS, "icl_niah_uuid_keys.md"),
                          "S-NIAH-3: what a copier keyed on the previous characters can hold",
                          body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

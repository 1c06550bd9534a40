"""The suites' shared tokenizer: SentencePiece trained once on the training split.

    python -m experiments.lm.tokenizer --vocab 4096 --out runs/lm/tokenizer-4096.model
    python -m experiments.lm.tokenizer --data my_corpus.jsonl --vocab 8192 --out tok.model

Trained on the documents the trainer trains on (the held-out split, ``data.eval_fraction`` of
the documents, never reaches it), so held-out perplexity is not flattered by a vocabulary fitted
to the held-out text.  Every run of a suite uses the same file (``--tokenizer
sentencepiece:PATH``), so perplexities are per the same tokens and comparable; it is also copied
into no run: the path is recorded in each run's config.
"""

from __future__ import annotations

import argparse
import pathlib

from nested_jax.data import load_documents, once, pipeline, tokenizers


def training_documents(path: str, eval_fraction: float):
    """The documents of `path` that training reads: all but the held-out split."""
    docs = load_documents(path)
    return pipeline.split_documents(docs, eval_fraction, "train")


def build(path: str, vocab: int, out: str, eval_fraction: float = 0.01) -> pathlib.Path:
    """Train the tokenizer into `out` unless it exists; returns its path."""
    target = pathlib.Path(out)
    if target.exists():
        return target
    docs = training_documents(path, eval_fraction)
    # whole or absent, even when two suite shards start together
    once.write_once(target, lambda tmp: tokenizers.train_sentencepiece(
        (docs[i] for i in range(len(docs))), vocab, tmp))
    return target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="builtin:wikipedia",
                   help="text, JSONL, ArrayRecord, directory or glob (as nested-jax train)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--eval-fraction", type=float, default=0.01,
                   help="the run's data.eval_fraction: these documents are left out")
    p.add_argument("--out", required=True, help="where the .model file goes")
    a = p.parse_args(argv)
    if a.vocab < 300:
        p.error(f"--vocab={a.vocab}: SentencePiece with byte fallback needs >= 300 pieces")
    print(build(a.data, a.vocab, a.out, a.eval_fraction))


if __name__ == "__main__":
    main()

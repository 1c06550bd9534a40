"""Tokenizers: byte-level (always works) and SentencePiece (optional extra).

A tokenizer is named by a spec string, saved with every run so `eval`/`generate`
rebuild the same one:

  byte                        256 byte values; id 0 (NUL) doubles as end-of-document.
  mistral                     the 32k SentencePiece model of PyPI `mistral-common==1.13.1`
                              (`mistral_common/data/tokenizer.model.v1`, fetched once).
  sentencepiece:PATH          any SentencePiece `.model` file.
  sentencepiece-train:VOCAB   train a VOCAB-sized unigram model on the training documents
                              (resolved by the trainer into `sentencepiece:WORKDIR/...`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
from etils import epath

from nested_jax.data import fetch, once

log = logging.getLogger(__name__)

MISTRAL_REQUIREMENT = "mistral-common==1.13.1"
MISTRAL_MEMBER = "mistral_common/data/tokenizer.model.v1"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    spec: str
    fingerprint: str  # the same ids for the same text: "byte", or the model file's sha256

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. NUL never occurs in text, so id 0 marks document ends."""

    vocab_size = 256
    eos_id = 0
    spec = "byte"
    fingerprint = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 < int(i) < 256)
        return data.decode("utf-8", errors="replace")


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(
            "SentencePiece tokenizers need the optional extra: "
            "pip install 'nested_jax[sentencepiece]' (or use --tokenizer byte)") from e
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece model file; end-of-document is the model's eos id."""

    def __init__(self, path: str | pathlib.Path):
        spm = _import_sentencepiece()
        self.path = epath.Path(path)
        if not self.path.is_file():
            raise ValueError(f"tokenizer=sentencepiece:{path}: no such SentencePiece model file")
        proto = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.fingerprint = f"sha256:{hashlib.sha256(proto).hexdigest()}"
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        self.eos_id = eos if eos >= 0 else 0
        self.spec = f"sentencepiece:{self.path}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def mistral_model_path(cache: pathlib.Path | None = None) -> pathlib.Path:
    """The 32k SentencePiece model shipped in mistral-common, fetched once into the cache."""
    root = cache or fetch.cache_dir()
    path = root / "mistral_tokenizer.model.v1"
    if not path.exists():
        data = fetch.read_from_wheel(MISTRAL_REQUIREMENT, MISTRAL_MEMBER, root / "wheels")
        once.write_once(path, lambda tmp: tmp.write_bytes(data))  # never half a model cached
    return path


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out: epath.PathLike,
                        max_sentences: int = 200_000) -> pathlib.Path:
    """Train a unigram SentencePiece model on `texts`, written to `out` (a .model file)."""
    spm = _import_sentencepiece()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", input_sentence_size=max_sentences, shuffle_input_sentence=True,
        byte_fallback=True, character_coverage=0.9995, pad_id=-1, bos_id=1, eos_id=2, unk_id=0,
        minloglevel=2)
    out = epath.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    log.info("trained a %d-piece SentencePiece model at %s", vocab_size, out)
    return out


def get_tokenizer(spec: str) -> Tokenizer:
    """Build the tokenizer a spec string names (see the module docstring)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "mistral":
        return SentencePieceTokenizer(mistral_model_path())
    if spec.startswith("sentencepiece:"):
        return SentencePieceTokenizer(spec.split(":", 1)[1])
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if spec.startswith("sentencepiece-train:"):
        raise ValueError(f"tokenizer={spec!r} must be trained first (the trainer does this); "
                         "pass the resulting sentencepiece:PATH here")
    raise ValueError(f"tokenizer={spec!r}: unknown; use byte, mistral, sentencepiece:PATH or "
                     "sentencepiece-train:VOCAB")

"""Data: documents from local files or the embedded corpus, tokenizers, grain pipelines."""

from nested_jax.data.pipeline import Shard, eval_batches, grain_available, train_batches
from nested_jax.data.sources import DataError, load_documents
from nested_jax.data.tokenizers import ByteTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "Shard",
    "Tokenizer",
    "eval_batches",
    "get_tokenizer",
    "grain_available",
    "load_documents",
    "train_batches",
]

"""Data: documents from local files or the embedded corpus, token shards, tokenizers, grain
pipelines."""

from nested_jax.data.pipeline import Shard, eval_batches, grain_available, train_batches
from nested_jax.data.shards import TokenShards, open_shards
from nested_jax.data.sources import DataError, load_documents
from nested_jax.data.tokenizers import ByteTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "Shard",
    "TokenShards",
    "Tokenizer",
    "eval_batches",
    "get_tokenizer",
    "grain_available",
    "load_documents",
    "open_shards",
    "train_batches",
]

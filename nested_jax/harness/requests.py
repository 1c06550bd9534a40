"""Token-level conventions of a scoring request, as lm-evaluation-harness defines them.

Plain Python on token-id lists (no JAX, no lm_eval), so the conventions are testable alone:

  encode_pair      context and continuation encoded jointly and split (lm-eval's
                   `_encode_pair`), the context opened with the document-start token;
  score_window     the model input and the scored positions of one (context, continuation)
                   pair, truncated on the left to the model's length;
  rolling_windows  a whole document cut into disjoint windows that each predict up to
                   `max_length` tokens with the tokens before them as context (lm-eval's
                   `get_rolling_token_windows` + `make_disjoint_window`);
  cut_at_stop      generated text cut at the first stop string.

The document-start token is the tokenizer's end-of-document id: the training pipeline closes
every document with it, so every document the model has seen starts right after one, and
`nested-jax generate` opens its prompt with it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

Ids = list[int]


def encode_pair(encode: Callable[[str], Sequence[int]], start_id: int, context: str,
                continuation: str) -> tuple[Ids, Ids]:
    """(context ids, continuation ids) of a log-likelihood request.

    As lm-eval's `_encode_pair`: trailing whitespace of the context moves to the start of
    the continuation, `context + continuation` is encoded as one text and split after the
    context's own encoding (a SentencePiece merge across the seam goes to the continuation;
    for the byte tokenizer the split is exact).  The context is opened with `start_id`, so an
    empty context scores the continuation as the start of a document.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = [int(i) for i in encode(context + continuation)]
    n_context = len(encode(context)) if context else 0
    return [start_id] + whole[:n_context], whole[n_context:]


def score_window(context: Sequence[int], continuation: Sequence[int],
                 max_length: int) -> tuple[Ids, Ids, int]:
    """(input ids, target ids, number of scored targets) for one pair.

    The model reads the last `max_length` tokens before each continuation token
    (`(context + continuation)[-(max_length + 1):]`, shifted by one), as lm-eval's HF model
    does; the scored targets are the last `len(continuation)` of the targets.
    """
    if not continuation:
        raise ValueError("a log-likelihood request needs a non-empty continuation (after "
                         "tokenization); the task gave an empty one")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length="
                         f"{max_length}: no window of the model holds it; raise max_length "
                         "(up to the model's max_seq_len) or shorten the continuation")
    if not context:
        raise ValueError("a log-likelihood request needs at least one context token (the "
                         "document-start token that encode_pair adds)")
    whole = [int(i) for i in context] + [int(i) for i in continuation]
    window = whole[-(max_length + 1):]
    return window[:-1], window[1:], len(continuation)


def rolling_windows(ids: Sequence[int], start_id: int, max_length: int,
                    context_len: int = 1) -> Iterator[tuple[Ids, Ids]]:
    """Disjoint (context, continuation) windows whose continuations tile `ids` exactly.

    The first window predicts the first `min(max_length, len(ids))` tokens after `start_id`;
    each later one predicts up to `max_length - context_len + 1` new tokens and reads the
    tokens before them as context, filling the model's `max_length` inputs (lm-eval's
    `get_rolling_token_windows(..., context_len)` followed by `make_disjoint_window`).
    lm-eval's models use `context_len=1`.
    """
    if not 1 <= context_len <= max_length:
        raise ValueError(f"context_len={context_len}: must be in [1, max_length={max_length}]")
    ids = [int(i) for i in ids]
    if not ids:
        return
    pred_len = max_length - context_len + 1
    first = min(max_length, len(ids))
    yield [start_id], ids[:first]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, pred_len)
        end = done + n
        inputs = ids[max(0, end - max_length - 1):end - 1]
        yield inputs[:len(inputs) - (n - 1)], ids[end - n:end]
        done = end


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one occurred); empty stops are ignored."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut], cut < len(text)

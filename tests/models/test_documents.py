"""Document boundaries in packed rows (models/documents.py, docs/decisions.md #23): with segment
ids, every document of a packed row computes what it computes run alone in its own row, for
every model, in float64; without them the later documents see the earlier ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested_jax import models
from nested_jax.models import documents
from nested_jax.models.packing import pack_aligned

V = 256
F64 = dict(dtype="float64", param_dtype="float64")
# Chunks of 2, 4 and 8 tokens: R = 8 for every chunked model below.  Documents of 13, 5 and 8
# tokens packed at multiples of 8 into 32: starts 0, 16, 24, padding at 13..15 and 21..23; the
# first ends in a ragged chunk, the second is shorter than R.
LENGTHS = (13, 5, 8)
T = 32
ALIGN = 8
# Exactness in float64: the packed row and the separate runs differ only in reduction order.
TOL = 1e-12

CASES = {
    # attention_impl="blockwise" keeps the softmax in float64 (jax.nn.dot_product_attention's
    # XLA path runs it in float32: test_default_attention_masks_documents).
    "transformer": ("transformer", dict(attention_impl="blockwise")),
    "hope_attention": ("hope_attention", dict(attention_impl="blockwise", cms_periods=(2, 4, 8))),
    "hope_attention-nested-input": ("hope_attention", dict(
        attention_impl="blockwise", cms_periods=(8, 4, 2), cms_variant="nested",
        cms_teach_at="input", cms_lr=0.5)),
    "hope_attention-independent-reconstruction": ("hope_attention", dict(
        attention_impl="blockwise", cms_periods=(2, 8), cms_variant="independent",
        cms_signal="reconstruction", cms_momentum=0.5)),
    "titans": ("titans", dict(chunk_size=8)),
    "titans-linear": ("titans", dict(chunk_size=8, memory="linear")),  # pallas path -> dual
    "hope": ("hope", dict(chunk_memory=4, chunk_other=2, cms_periods=(2, 4, 8),
                          memory_dtype="float64")),
    "hope-prior": ("hope", dict(chunk_memory=8, chunk_other=4, cms_periods=(8,),
                                memory_read="prior", memory_dtype="float64")),
}


def _docs(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, n) for n in LENGTHS]


def _model(name, overrides):
    return models.create(name, "tiny", rngs=nnx.Rngs(0), **F64, **overrides)


_forward = nnx.jit(lambda m, tok: m(tok))
_packed = nnx.jit(lambda m, tok, seg: m(tok, segment_ids=seg))


def test_pack_aligned_lays_out_documents_at_multiples():
    tokens, seg = pack_aligned(_docs(), T, ALIGN)
    assert tokens.shape == seg.shape == (1, T) and tokens.dtype == seg.dtype == np.int32
    np.testing.assert_array_equal(seg[0], [1] * 13 + [0] * 3 + [2] * 5 + [0] * 3 + [3] * 8)
    np.testing.assert_array_equal(tokens[0, 16:21], _docs()[1])
    # In order (next fit): a document that does not fit opens a row; one longer than a row is
    # cut into row-sized pieces.
    tokens, seg = pack_aligned([np.arange(1, 11), np.arange(1, 8), np.arange(1, 40)], 16, 4)
    assert tokens.shape == (5, 16)
    np.testing.assert_array_equal(seg[0], [1] * 10 + [0] * 6)
    np.testing.assert_array_equal(seg[1], [1] * 7 + [0] * 9)
    np.testing.assert_array_equal(seg[2:4], 1)
    np.testing.assert_array_equal(tokens[4, :7], np.arange(33, 40))
    assert sum(int((s > 0).sum()) for s in seg) == 10 + 7 + 39
    with pytest.raises(ValueError, match="alignment=0"):
        pack_aligned(_docs(), T, 0)


def test_layout_of_segment_ids():
    seg = jnp.asarray([[1, 1, 1, 0, 2, 2, 2, 2, 7, 7, 0, 0, 7, 7]])
    d = documents.from_segment_ids(seg, alignment=4)
    np.testing.assert_array_equal(d.ids[0], [1, 1, 1, 0, 2, 2, 2, 2, 3, 3, 0, 0, 4, 4])
    np.testing.assert_array_equal(np.nonzero(np.asarray(d.starts[0]))[0], [0, 4, 8, 12])
    np.testing.assert_array_equal(d.positions[0, [0, 2, 4, 7, 9, 13]], [0, 2, 0, 3, 1, 1])
    np.testing.assert_array_equal(d.has_next[0], [1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(documents.same_document(d, 1)[0, [0, 1, 4, 9, 12]],
                                  [False, True, False, True, False])


def test_document_alignment():
    cfg = models.make_config("titans", "tiny")
    assert (cfg.document_alignment(), cfg.alignment_reason()) == (8, "lcm of chunk_size=8")
    assert models.make_config("transformer", "tiny").document_alignment() == 1
    hope = models.make_config("hope", "tiny")
    assert hope.document_alignment() == 64  # lcm(16, 4, 4, 16, 64)
    assert models.make_config("hope", "tiny", use_cms=False).document_alignment() == 16
    assert models.make_config("hope_attention", "tiny", cms_periods=(6, 4)).document_alignment() == 12


@pytest.mark.parametrize("case", list(CASES))
def test_packed_row_equals_documents_alone(x64, case):
    name, overrides = CASES[case]
    model = _model(name, overrides)
    assert ALIGN % model.config.document_alignment() == 0
    docs = _docs()
    tokens, seg = pack_aligned(docs, T, ALIGN)
    packed = np.asarray(_packed(model, jnp.asarray(tokens), jnp.asarray(seg)))[0]
    assert packed.dtype == np.float64
    starts = (0, 16, 24)
    errs, leaks = [], []
    leaky = np.asarray(_forward(model, jnp.asarray(tokens)))[0]
    for doc, s in zip(docs, starts, strict=True):
        alone = np.asarray(_forward(model, jnp.asarray(doc)[None]))[0]
        errs.append(float(np.max(np.abs(packed[s:s + len(doc)] - alone))))
        leaks.append(float(np.max(np.abs(leaky[s:s + len(doc)] - alone))))
    print(f"{case}: max |packed - alone| per document {errs}; without segment ids {leaks}")
    assert max(errs) < TOL, errs
    assert leaks[0] < TOL and min(leaks[1:]) > 1e-3, leaks  # the test can fail
    # Padding tokens change nothing: other pad ids, the same logits at every document token.
    other = np.where(seg == 0, 7, tokens)
    again = np.asarray(_packed(model, jnp.asarray(other), jnp.asarray(seg)))[0]
    np.testing.assert_array_equal(again[seg[0] > 0], packed[seg[0] > 0])


def test_default_attention_masks_documents(x64):
    """jax.nn.dot_product_attention's XLA path (the default impl) takes the document mask too;
    its softmax runs in float32, so packed and separate agree to float32 rounding only."""
    model = _model("transformer", {})
    docs = _docs()
    tokens, seg = pack_aligned(docs, T, 1)  # back to back: R = 1
    np.testing.assert_array_equal(seg[0, :26], [1] * 13 + [2] * 5 + [3] * 8)
    packed = np.asarray(_packed(model, jnp.asarray(tokens), jnp.asarray(seg)))[0]
    errs = []
    for doc, s in zip(docs, (0, 13, 18), strict=True):
        alone = np.asarray(_forward(model, jnp.asarray(doc)[None]))[0]
        errs.append(float(np.max(np.abs(packed[s:s + len(doc)] - alone))))
    print(f"transformer (XLA attention): max |packed - alone| per document {errs}")
    assert max(errs) < 1e-7, errs


def test_unaligned_document_start_is_an_error():
    model = models.create("titans", "tiny", rngs=nnx.Rngs(0))
    seg = np.ones((1, 16), np.int32)
    seg[0, 6:] = 2
    with pytest.raises(ValueError, match=r"segment_ids: a document starts at position 6 of row "
                       r"0, not a multiple of the model's document alignment 8 \(lcm of "
                       r"chunk_size=8\)"):
        model(jnp.zeros((1, 16), jnp.int32), segment_ids=jnp.asarray(seg))
    with pytest.raises(ValueError, match=r"segment_ids shape \(1, 8\) must be"):
        model(jnp.zeros((1, 16), jnp.int32), segment_ids=jnp.asarray(seg[:, :8]))


# Four float64 compiles of HopeLM's gradient (~2 min): the default suite keeps the forward per
# model (above) and the engine's gradient through resets (tests/memory/test_resets.py).
@pytest.mark.slow
def test_packed_loss_and_gradients_equal_documents_alone(x64):
    """train/step.next_token_loss with segment ids: the packed row's loss is the token-weighted
    mean of its documents' losses run alone (no prediction across a document or of padding), and
    so are the outer gradients: the restarts route them to every initial state (HopeLM: the
    coupled memories' scan, M_memory, the CMS levels)."""
    from nested_jax.train.step import next_token_loss

    name, overrides = CASES["hope"]
    model = _model(name, overrides)
    docs = _docs(seed=1)
    tokens, seg = pack_aligned(docs, T, ALIGN)

    def alone_loss(m, tok):  # float64 (next_token_loss without segment ids is float32)
        logp = jax.nn.log_softmax(m(tok[:, :-1]))
        nll = -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)
        return nll.mean(), jnp.asarray(nll.size, nll.dtype)

    def grads(tok, seg=None):
        def loss(m):
            return next_token_loss(m, tok, seg) if seg is not None else alone_loss(m, tok)

        (value, count), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        return float(value), float(count), nnx.state(g, nnx.Param)

    packed, n, g_packed = grads(jnp.asarray(tokens), jnp.asarray(seg))
    assert n == sum(len(d) - 1 for d in docs)
    want, g_want = 0.0, None
    for doc in docs:
        value, count, g = grads(jnp.asarray(doc)[None])
        want += value * count / n
        g = jax.tree.map(lambda x, c=count: x * c / n, g)
        g_want = g if g_want is None else jax.tree.map(jnp.add, g_want, g)
    assert abs(packed - want) < TOL
    err = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_want), strict=True))
    print(f"hope: |loss diff| {abs(packed - want):.2e}, max |grad diff| {err:.2e}")
    assert err < TOL

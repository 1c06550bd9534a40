"""The synthetic in-context-learning tasks (experiments/icl/tasks): the batch contract every task
keeps, and that each scored target is what the task claims (recalled from context, copied,
fixed by the weights, decided by a membership checker, or the hidden needle)."""

import re

import numpy as np
import pytest

from experiments.icl import tasks
from experiments.icl.tasks import formal, niah
from experiments.icl.tasks.base import PAD, RESERVED, SEP

PARAGRAPHS = (
    "Alpha beta gamma. Delta epsilon zeta.",
    "The quick brown fox jumps over the lazy dog. It ran away again.",
    "Seven ate nine. Numbers are shy of 1234567 here.",
)
SMALL = {  # the needle tasks at a test size, prose from PARAGRAPHS, never the corpus
    "niah_noise": dict(seq_len=400),
    "niah_prose": dict(seq_len=400, paragraphs=PARAGRAPHS),
    "niah_uuid": dict(seq_len=400, paragraphs=PARAGRAPHS),
}


def build(name, **kwargs):
    return tasks.make(name, **{**SMALL.get(name, {}), **kwargs})


def rng(seed=0):
    return np.random.default_rng(seed)


def targets(batch):
    """Per row: the scored target tokens, in order."""
    return [row[1:][m] for row, m in zip(batch.tokens, batch.mask, strict=True)]


# The contract


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_batch_contract(name):
    task = build(name)
    b = task.sample(rng(0), 8)
    T = task.seq_len
    assert b.tokens.dtype == np.int32 and b.tokens.shape == (8, T + 1)
    assert b.mask.dtype == np.bool_ and b.mask.shape == (8, T)
    assert b.tokens.min() >= 0 and b.tokens.max() < task.vocab_size
    assert b.mask.any(1).all(), "every row must have something to score"
    assert (b.tokens[:, 1:][b.mask] >= RESERVED).all(), "a target is never pad or separator"
    assert task.scoring in ("token", "sequence") and 0 < task.chance < 1

    again = task.sample(rng(0), 8)
    assert (again.tokens == b.tokens).all() and (again.mask == b.mask).all()
    assert (task.sample(rng(1), 8).tokens != b.tokens).any(), "the rng must drive the samples"

    longer_T = 2 * T + T % 2  # keeps the parity some layouts need
    longer = task.at_length(longer_T)
    assert type(longer) is type(task) and longer.seq_len == longer_T
    lb = longer.sample(rng(0), 2)
    assert lb.tokens.shape == (2, longer_T + 1) and lb.mask.shape == (2, longer_T)
    assert lb.mask.any(1).all() and lb.tokens.max() < longer.vocab_size


def test_unknown_task_names_the_flag_and_the_choices():
    with pytest.raises(ValueError, match=r"--task='nope'.*mad_recall.*mqar"):
        tasks.make("nope")


def test_package_keeps_the_old_names():
    assert tasks.make("mqar", n_pairs=4, seq_len=16, vocab=16) == tasks.MQAR(4, 16, 16)
    assert tasks.RESERVED == RESERVED == 2 and tasks.Batch._fields == ("tokens", "mask", "targets")


@pytest.mark.parametrize("name, kwargs, field", [
    ("mqar", dict(n_pairs=8, seq_len=30), "seq_len"),
    ("mad_recall", dict(seq_len=127), "seq_len"),
    ("mad_noisy_recall", dict(frac_noise=1.0), "frac_noise"),
    ("mad_noisy_recall", dict(noise_vocab=0), "noise_vocab"),
    ("mad_fuzzy_recall", dict(seq_len=17), "seq_len"),
    ("mad_fuzzy_recall", dict(vocab=6), "k_motif"),
    ("mad_selective_copy", dict(seq_len=33), "seq_len"),
    ("mad_compression", dict(seq_len=64), "seq_len"),
    ("mad_memorization", dict(seq_len=256), "seq_len"),
    ("anbn", dict(max_len=40, seq_len=41), "seq_len"),
    ("abab_star", dict(min_len=5, max_len=7, seq_len=9), "min_len"),
    ("parity", dict(prefix_labels=1), "prefix_labels"),
    ("niah_noise", dict(seq_len=100), "seq_len"),
    ("niah_prose", dict(paragraphs=("ok", "")), "paragraphs"),
])
def test_bad_parameters_name_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        build(name, **kwargs)


def test_formal_at_length_must_leave_room_for_longer_strings():
    with pytest.raises(ValueError, match="max_len"):
        tasks.make("parity", max_len=40, seq_len=42).at_length(42)


# Recall: every scored value is in the context


def test_mqar_query_values_are_the_stored_ones():
    b = tasks.make("mqar").sample(rng(), 16)
    for row, mask in zip(b.tokens, b.mask, strict=True):
        for t in np.flatnonzero(mask):
            first = list(row[:t]).index(row[t])  # the key where it was stored
            assert row[first + 1] == row[t + 1]


@pytest.mark.parametrize("name", ["mad_recall", "mad_noisy_recall"])
def test_mad_recall_scores_exactly_the_recallable_values(name):
    task = build(name)
    b = task.sample(rng(), 32)
    values_end = RESERVED + task.n_keys + task.n_values  # noise ids from here on
    assert (b.tokens[:, 0] == PAD).all() and not b.mask[:, 0::2].any()
    noise_pairs = 0
    for row, mask in zip(b.tokens, b.mask, strict=True):
        stored = {}
        pairs, scored = row[1:].reshape(-1, 2), mask[1::2]  # a key's position predicts its value
        for (k, v), s in zip(pairs, scored, strict=True):
            if k >= values_end:
                noise_pairs += 1
                assert v >= values_end and not s, "noise is never a target"
                continue
            assert k < RESERVED + task.n_keys <= v < values_end
            assert s == (k in stored)
            if k in stored:
                assert v == stored[k]
            stored[k] = v
        assert scored[-1], "the final query is always scored (its key was shown)"
    assert (noise_pairs > 0) == (task.frac_noise > 0)


def runs(row, key_end):
    """A fuzzy-recall row as (key motif, value motif, value start) triples, pads dropped."""
    out, i = [], int(np.flatnonzero(row != PAD)[0])
    while i < len(row):
        k0 = i
        while i < len(row) and row[i] < key_end:
            i += 1
        v0 = i
        while i < len(row) and row[i] >= key_end:
            i += 1
        assert k0 < v0 < i, "keys and values alternate"
        out.append((tuple(row[k0:v0]), tuple(row[v0:i]), v0))
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_fuzzy_recall_scores_exactly_the_recallable_value_motifs(split):
    task = tasks.make("mad_fuzzy_recall", split=split)
    b = task.sample(rng(), 32)
    key_end = RESERVED + task.n_keys
    for row, mask in zip(b.tokens, b.mask, strict=True):
        assert row[0] == PAD  # left padding, as MAD
        stored, n_scored = {}, 0
        triples = runs(row, key_end)
        for k, v, v0 in triples:
            assert 1 <= len(k) <= task.k_motif and 1 <= len(v) <= task.v_motif
            assert len(set(k)) == len(k) and len(set(v)) == len(v)
            if split == "test":
                assert len(k) == task.k_motif
            scored = mask[v0 - 1:v0 - 1 + len(v)]
            assert scored.all() if k in stored else not scored.any()
            if k in stored:
                assert v == stored[k]
                n_scored += len(v)
            stored[k] = v
        assert triples[-1][0] in {k for k, _, _ in triples[:-1]}, "the final key was shown"
        assert mask.sum() == n_scored, "only value tokens are scored"


def test_selective_copy_targets_are_the_non_blank_tokens_in_order():
    task = tasks.make("mad_selective_copy")
    b = task.sample(rng(), 16)
    T, n = task.seq_len, task.n_copy
    assert (b.tokens[:, T - n] == SEP).all()
    for row, target in zip(b.tokens, targets(b), strict=True):
        body = row[1:T - n]
        kept = body[body != PAD]
        assert len(kept) == n and (target == kept).all()
        assert body[-1] != PAD  # MAD's blanks go before content tokens only


def test_compression_targets_reproduce_the_sequence_after_sep():
    task = tasks.make("mad_compression")
    b = task.sample(rng(), 8)
    n = (task.seq_len - 1) // 2
    assert n == 31 and (b.tokens[:, n + 1] == SEP).all()
    for row, target in zip(b.tokens, targets(b), strict=True):
        assert (target == row[1:n + 1]).all()


def test_memorization_map_is_fixed_across_seeds_and_never_in_context():
    task = tasks.make("mad_memorization")
    value_of = {}
    for seed in range(4):
        b = task.sample(rng(seed), 32)
        for row, mask in zip(b.tokens, b.mask, strict=True):
            keys, values = row[1::2], row[2::2]
            assert len(set(keys)) == len(keys), "a repeated key would reveal its value"
            assert (mask == (np.arange(task.seq_len) % 2 == 1)).all()
            for k, v in zip(keys, values, strict=True):
                assert value_of.setdefault(k, v) == v, "a key kept its value across seeds"
    assert len(value_of) > 100, "the seeds must cover many keys for this to mean anything"
    assert len(set(value_of.values())) == len(value_of), "distinct keys, distinct values"


# Formal languages


@pytest.mark.parametrize("checker, members, others", [
    (formal.in_parity, ["1", "01", "111", "0010"], ["0", "11", "", "0110", "12"]),
    (formal.in_aa_star, ["", "aa", "aaaa"], ["a", "aaa", "ab", "aab"]),
    (formal.in_abab_star, ["", "abab", "abababab"], ["ab", "aba", "abba", "baba", "ababab"]),
    (formal.in_anbn, ["ab", "aabb", "aaabbb"], ["", "aab", "abb", "ba", "abab", "aabbb", "b"]),
    (formal.in_anbncn, ["abc", "aabbcc"], ["", "ab", "aabbc", "acb", "abcabc", "aabcbc"]),
    (formal.in_shuffle2, ["", "()", "([)]", "[(])", "(()[])[]", "[[(]])"],
     [")(", "(", "([)", "(]", "][", "([)]]", "(x)"]),
])
def test_membership_checkers_on_hand_written_strings(checker, members, others):
    assert all(checker(s) for s in members), [s for s in members if not checker(s)]
    assert not any(checker(s) for s in others), [s for s in others if checker(s)]


FORMAL = ["parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2"]


def dyck(s):
    """Balanced: cancelling adjacent pairs empties it (a different method from formal.py's)."""
    while "()" in s:
        s = s.replace("()", "")
    return s == ""


def same_runs(s, letters):
    m = re.fullmatch("".join(f"({c}+)" for c in letters), s)
    return bool(m) and len({len(g) for g in m.groups()}) == 1


# Checkers written apart from formal.py's (regexes, pair cancelling), so a label bug there
# cannot hide behind the same bug here.
CHECKERS = {
    "parity": lambda s: bool(re.fullmatch("[01]+", s)) and s.count("1") % 2 == 1,
    "aa_star": lambda s: bool(re.fullmatch("(aa)*", s)),
    "abab_star": lambda s: bool(re.fullmatch("(abab)*", s)),
    "anbn": lambda s: same_runs(s, "ab"),
    "anbncn": lambda s: same_runs(s, "abc"),
    "shuffle2": lambda s: dyck("".join(c for c in s if c in "()"))
    and dyck("".join({"[": "(", "]": ")"}[c] for c in s if c in "[]")),
}
# What a model could use instead of membership; the negatives must not give it away.
SHORTCUTS = {
    "abab_star": lambda s: len(s) % 4 == 0,
    "anbn": lambda s: s.count("a") == s.count("b"),
    "anbncn": lambda s: s.count("a") == s.count("b") == s.count("c"),
    "shuffle2": lambda s: s.count("(") == s.count(")") and s.count("[") == s.count("]"),
}


def decoded(task, batch):
    return [task.decode(row) for row in batch.tokens]


@pytest.mark.parametrize("name", FORMAL)
@pytest.mark.parametrize("longer", [False, True])
def test_formal_labels_are_the_checkers_verdict_and_balanced(name, longer):
    task = tasks.make(name)
    if longer:
        task = task.at_length(2 * task.seq_len)
    b = task.sample(rng(), 2000)
    rows = decoded(task, b)
    lengths = np.array([len(s) for s, _ in rows])
    assert lengths.min() >= task.min_len and lengths.max() <= task.seq_len - 2
    if longer:
        assert lengths.min() > tasks.make(name).max_len
    assert all(label == CHECKERS[name](s) for s, label in rows)
    assert 0.45 < np.mean([label for _, label in rows]) < 0.55
    # Exactly one scored position, the SEP that precedes the label.
    assert (b.mask.sum(1) == 1).all()
    assert (b.tokens[:, :-1][b.mask] == SEP).all()
    assert (b.tokens[:, 1:][b.mask] >= task.no).all()
    if name in SHORTCUTS:
        negatives = [s for s, label in rows if not label]
        assert np.mean([SHORTCUTS[name](s) for s in negatives]) > 0.2, "negatives are too easy"


@pytest.mark.parametrize("name", FORMAL)
def test_formal_prefix_labels_are_each_prefixs_verdict_and_never_input(name):
    """prefix_labels: position t (reading s_t) is scored on the checker's verdict on s_1..s_t,
    the SEP position on the whole string; inputs are the plain layout, so no label leaks."""
    plain, dense = tasks.make(name), tasks.make(name, prefix_labels=True)
    b, p = dense.sample(rng(), 200), plain.sample(rng(), 200)
    assert (b.tokens == p.tokens).all(), "the inputs are the membership layout, unchanged"
    assert dense.scoring == "sequence" and 0 < dense.chance < plain.chance
    x, y, m = b.arrays()
    for row, tgt, mask in zip(x, y, m, strict=True):
        s, _ = dense.decode(np.append(row, PAD))
        n = len(s)
        assert mask.nonzero()[0].tolist() == list(range(1, n + 2))
        want = [CHECKERS[name](s[:t]) for t in range(1, n + 1)] + [CHECKERS[name](s)]
        assert [t == dense.yes for t in tgt[1:n + 2]] == want
        assert set(tgt[1:n + 2].tolist()) <= {dense.no, dense.yes}


# Needle in a haystack

NEEDLE = re.compile(rb"The special magic (number|uuid) for (\w+) is: ([0-9a-f-]+)\. ")
QUERY = re.compile(rb"\nWhat is the special magic (number|uuid) for (\w+)\? "
                   rb"The special magic \1 for \2 is: ")


@pytest.mark.parametrize("name", ["niah_noise", "niah_prose", "niah_uuid"])
@pytest.mark.parametrize("seq_len", [400, 1500])
def test_needle_is_hidden_once_and_asked_for_at_the_end(name, seq_len):
    task = build(name, seq_len=seq_len)
    assert task.scoring == "sequence" and task.vocab_size == 256 + RESERVED
    b = task.sample(rng(), 16)
    assert b.tokens.shape == (16, seq_len + 1)
    value_len = 36 if name == "niah_uuid" else 7
    depths = []
    for row, mask in zip(b.tokens, b.mask, strict=True):
        text = bytes((row - RESERVED).astype(np.uint8))
        query = list(QUERY.finditer(text))
        assert len(query) == 1
        haystack, answer = text[:query[0].start()], text[query[0].end():]
        needles = list(NEEDLE.finditer(haystack))
        assert len(needles) == 1
        kind, key, value = needles[0].groups()
        assert query[0].groups() == (kind, key) and key.decode() in niah.KEYS
        assert answer == value and len(value) == value_len
        assert haystack.count(value) == 1
        pattern = rb"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}" if name == "niah_uuid" \
            else rb"[1-9][0-9]{6}"
        assert re.fullmatch(pattern, value)
        assert (np.flatnonzero(mask) == np.arange(seq_len - value_len, seq_len)).all()
        depths.append(needles[0].start() / max(len(haystack), 1))
    if seq_len > 1000:
        assert min(depths) < 0.3 and max(depths) > 0.7, "depth must vary over the haystack"


def test_needle_prose_reads_the_corpus_only_when_asked_and_never_with_paragraphs(monkeypatch):
    def offline():
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(niah, "wikipedia_paragraphs", offline)
    tasks.make("niah_prose", seq_len=400, paragraphs=PARAGRAPHS).sample(rng(), 2)
    lazy = tasks.make("niah_uuid", seq_len=400)  # constructing must not read it either
    with pytest.raises(AssertionError, match="corpus was read"):
        lazy.sample(rng(), 1)


def test_needle_prose_haystack_comes_from_the_given_paragraphs():
    task = build("niah_prose", seq_len=1500)
    text = bytes((task.sample(rng(), 1).tokens[0] - RESERVED).astype(np.uint8)).decode()
    haystack = NEEDLE.sub(b"", text[:text.index("\nWhat is")].encode()).decode()
    sentences = {s.strip().rstrip(".") for p in PARAGRAPHS for s in p.split(". ")}
    whole = [s.strip() for s in haystack.split(". ")[1:-1]]  # the ends may be cut
    assert whole and all(s in sentences for s in whole), whole


@pytest.mark.parametrize("name, prefix_labels, want", [
    # membership: never saying yes gets exactly the negatives, half of a balanced sample
    *[(name, False, 0.5) for name in FORMAL],
    # (aa)*: only the string "a" (one of 20 odd negative lengths) has no positive prefix
    ("aa_star", True, 0.5 / 20),
    # parity: only an all-zero string, a negative of n bits with probability 2^-(n-1)
    ("parity", True, 0.5 * np.mean([0.5 ** (n - 1) for n in range(1, 41)])),
])
def test_formal_all_no_is_the_share_of_strings_without_a_yes(name, prefix_labels, want):
    """``all_no``, the floor the reports print beside chance, matches its closed form to four
    standard errors of its 4096-string estimate."""
    got = tasks.make(name, prefix_labels=prefix_labels).all_no
    assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / 4096), (got, want)

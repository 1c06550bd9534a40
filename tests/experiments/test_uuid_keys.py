"""The ideal previous-characters copier behind results/icl_niah_uuid_keys.md."""

import numpy as np

from experiments.icl import uuid_keys
from experiments.icl.tasks.niah import NeedleUuid


def test_a_repeated_key_keeps_only_its_last_successor():
    # "a" is followed by "b" and then by "c": keyed on one character, the later write wins
    assert uuid_keys.ideal_copy("abac", 1) == [True, False, True, True]
    # keyed on two characters (" a" then "ba"), every key is distinct: all read back
    assert uuid_keys.ideal_copy("abac", 2) == [True, True, True, True]


def test_uuids_cannot_be_copied_whole_with_a_one_character_key():
    chars, whole = uuid_keys.measure(seed=0, n=2000, k=1)
    assert whole == 0.0 and 0.4 < chars < 0.55
    assert uuid_keys.measure(seed=0, n=2000, k=4)[1] > 0.98


def test_a_seven_digit_number_is_copied_whole_by_a_one_character_key_sometimes():
    """S-NIAH-1/2's value: 7 digits, so a one-character key is ambiguous less often than on a
    UUID, and a number whose digits never repeat a predecessor copies whole."""
    assert uuid_keys.ideal_copy("1234567", 1, "number") == [True] * 7
    assert uuid_keys.ideal_copy("1213", 1, "number") == [True, False, True, True]
    chars, whole = uuid_keys.measure(seed=0, n=2000, k=1, kind="number")
    assert 0.1 < whole < 0.25 and 0.75 < chars < 0.9


def test_delta_rule_with_near_orthogonal_keys_is_the_lookup_table():
    """At a dimension far above the number of writes, random keys are nearly orthogonal and
    the delta rule reads back exactly what the last-write-wins table does, value by value."""
    rng, task = np.random.default_rng(0), NeedleUuid.__new__(NeedleUuid)
    values = [task.value(rng) for _ in range(20)]
    for k in (1, 2):
        got = uuid_keys.delta_copy(values, k, 8192, "random", rng)
        want = np.array([uuid_keys.ideal_copy(v, k) for v in values])
        np.testing.assert_array_equal(got, want)


def test_linear_keys_from_more_characters_add_nothing():
    """A weighted sum of the previous characters' embeddings stays in their 17-dim span: the
    delta rule copies no more with k = 3 such keys than with one character, at any width,
    while random (non-linear) keys of three characters copy nearly everything."""
    one = uuid_keys.measure_delta(seed=0, n=300, k=1, dim=256, keys="linear")
    three = uuid_keys.measure_delta(seed=0, n=300, k=3, dim=256, keys="linear")
    assert three[0] <= one[0] + 0.01 and three[1] == 0.0
    assert uuid_keys.measure_delta(seed=0, n=300, k=3, dim=256, keys="random")[0] > 0.99

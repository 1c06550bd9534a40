"""The ideal previous-characters copier behind results/icl_niah_uuid_keys.md."""

from experiments.icl import uuid_keys


def test_a_repeated_key_keeps_only_its_last_successor():
    # "a" is followed by "b" and then by "c": keyed on one character, the later write wins
    assert uuid_keys.ideal_copy("abac", 1) == [True, False, True, True]
    # keyed on two characters (" a" then "ba"), every key is distinct: all read back
    assert uuid_keys.ideal_copy("abac", 2) == [True, True, True, True]


def test_uuids_cannot_be_copied_whole_with_a_one_character_key():
    chars, whole = uuid_keys.measure(seed=0, n=2000, k=1)
    assert whole == 0.0 and 0.4 < chars < 0.55
    assert uuid_keys.measure(seed=0, n=2000, k=4)[1] > 0.98

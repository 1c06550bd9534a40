"""Class-incremental tasks from labelled texts, their token arrays, and the continual metrics.

- ``select_classes``: the ``n_tasks * classes_per_task`` classes with the most texts;
- ``split``: a fixed held-out split, balanced per class (``n_test`` held out, ``n_train`` for
  training), the same for every seed and every model;
- ``task_order``: the classes dealt into tasks in a seeded random order (disjoint, every class
  in exactly one task);
- ``encode``: ``text`` -> ``[tokens of the text][marker]`` right-padded; the model's prediction
  at the marker is scored against the label tokens;
- ``accuracy_matrix`` / ``summarize``: R[t, j], the accuracy on task j's held-out texts after
  training task t (j <= t), the average accuracy after each task and the forgetting.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Tasks of classes, and examples per class (balanced)."""

    n_tasks: int
    classes_per_task: int
    n_train: int  # training texts per class
    n_test: int  # held-out texts per class

    @property
    def n_classes(self) -> int:
        return self.n_tasks * self.classes_per_task


def select_classes(by_class: dict[int, list[str]], layout: Layout) -> list[int]:
    """The ``layout.n_classes`` classes with the most texts (ties: lower class first), sorted;
    a ValueError names the option to change when too few classes have enough texts."""
    need = layout.n_train + layout.n_test
    ranked = sorted(by_class, key=lambda c: (-len(by_class[c]), c))[:layout.n_classes]
    if len(ranked) < layout.n_classes:
        raise ValueError(f"--tasks {layout.n_tasks} x --classes-per-task "
                         f"{layout.classes_per_task} = {layout.n_classes} classes, but the data "
                         f"has only {len(by_class)}; ask for fewer")
    short = [c for c in ranked if len(by_class[c]) < need]
    if short:
        have = min(len(by_class[c]) for c in ranked)
        raise ValueError(f"--n-train {layout.n_train} + --n-test {layout.n_test} = {need} texts "
                         f"per class, but class {short[0]} has only {len(by_class[short[0]])} "
                         f"(the {layout.n_classes} largest classes have >= {have}); lower "
                         "--n-train/--n-test or ask for fewer classes")
    return sorted(ranked)


def split(by_class: dict[int, list[str]], classes: list[int],
          layout: Layout) -> dict[int, tuple[list[str], list[str]]]:
    """class -> (training texts, held-out texts): each class's texts shuffled by a fixed key of
    the class alone (no seed: the same split for every seed), the first ``n_test`` held out,
    the next ``n_train`` trained on."""
    out = {}
    for c in classes:
        texts = by_class[c]
        order = np.random.default_rng([0x5EED, c]).permutation(len(texts))
        test = [texts[i] for i in order[:layout.n_test]]
        train = [texts[i] for i in order[layout.n_test:layout.n_test + layout.n_train]]
        out[c] = (train, test)
    return out


def task_order(classes: list[int], layout: Layout, seed: int) -> list[tuple[int, ...]]:
    """The classes dealt into ``n_tasks`` disjoint tasks of ``classes_per_task`` in a random
    order fixed by ``seed`` (within a task, sorted)."""
    perm = np.random.default_rng([seed, zlib.crc32(b"task_order")]).permutation(sorted(classes))
    k = layout.classes_per_task
    return [tuple(sorted(int(c) for c in perm[i * k:(i + 1) * k])) for i in range(layout.n_tasks)]


def encode(texts: list[str], tokenizer, seq_len: int, marker: int,
           pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, seq_len] int32, pos [N] int32): each text's tokens cut to ``seq_len - 1``,
    then ``marker`` at ``pos``, then ``pad``.  Right padding leaves the prediction at the marker
    alone in a causal model (every memory's state is per sequence and reads only the past)."""
    tokens = np.full((len(texts), seq_len), pad, np.int32)
    pos = np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        ids = np.asarray(tokenizer.encode(text), np.int32)[:seq_len - 1]
        tokens[i, :len(ids)] = ids
        tokens[i, len(ids)] = marker
        pos[i] = len(ids)
    return tokens, pos


def accuracies(label_logits: np.ndarray, labels: np.ndarray, allowed: list[int]) -> float:
    """The fraction of rows whose highest logit among the ``allowed`` class slots is the label
    (``label_logits``: [N, n_classes], ``labels``: [N] class slots)."""
    allowed = np.asarray(sorted(allowed))
    pick = allowed[np.argmax(label_logits[:, allowed], axis=1)]
    return float(np.mean(pick == labels))


def summarize(R: np.ndarray) -> dict[str, list[float | None]]:
    """From R[t, j] (accuracy on task j after training task t; j <= t, NaN above the diagonal):

    - ``avg_acc[t]`` = mean over j <= t of R[t, j] (tasks are the same size: this is also the
      accuracy on every held-out text seen so far);
    - ``forgetting[t]`` = mean over j < t of (max over l in [j, t-1] of R[l, j]) - R[t, j]: how
      far each earlier task fell from its best (Chaudhry et al. 2018); None after the first task.
    """
    T = R.shape[0]
    avg = [float(np.mean(R[t, :t + 1])) for t in range(T)]
    fgt: list[float | None] = [None]
    for t in range(1, T):
        fgt.append(float(np.mean([R[j:t, j].max() - R[t, j] for j in range(t)])))
    return {"avg_acc": avg, "forgetting": fgt}

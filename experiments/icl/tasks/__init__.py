"""Synthetic in-context-learning tasks, generated on the fly from a numpy seed (no downloads).

Every task returns ``Batch(tokens_BxT1, mask_BxT)``: the model reads ``tokens[:, :-1]`` and is
scored on predicting ``tokens[:, 1:]`` only where ``mask`` is true; ``scoring`` says whether
accuracy is per scored token or per sequence.  Token ids below ``RESERVED`` are pad (0) and
separator (1); each task documents its layout.  The contract: ``experiments/icl/tasks/base.py``.

- ``mqar``: multi-query associative recall (``mqar.py``);
- ``mad_*``: the six MAD tasks (``mad.py``);
- ``parity`` .. ``shuffle2``: formal-language recognition (``formal.py``);
- ``niah_*``: single-needle retrieval on bytes (``niah.py``).
"""

from __future__ import annotations

from experiments.icl.tasks.base import PAD, RESERVED, SEP, Batch, Task
from experiments.icl.tasks.formal import AAStar, ABABStar, AnBn, AnBnCn, Parity, Shuffle2
from experiments.icl.tasks.mad import (
    Compression,
    FuzzyRecall,
    InContextRecall,
    Memorization,
    NoisyRecall,
    SelectiveCopying,
)
from experiments.icl.tasks.mqar import MQAR
from experiments.icl.tasks.niah import NeedleNoise, NeedleProse, NeedleUuid

TASKS = {
    "mqar": MQAR,
    "mad_recall": InContextRecall,
    "mad_fuzzy_recall": FuzzyRecall,
    "mad_noisy_recall": NoisyRecall,
    "mad_selective_copy": SelectiveCopying,
    "mad_compression": Compression,
    "mad_memorization": Memorization,
    "parity": Parity,
    "aa_star": AAStar,
    "abab_star": ABABStar,
    "anbn": AnBn,
    "anbncn": AnBnCn,
    "shuffle2": Shuffle2,
    "niah_noise": NeedleNoise,
    "niah_prose": NeedleProse,
    "niah_uuid": NeedleUuid,
}


def make(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task={name!r} is unknown; choose one of {sorted(TASKS)}.")
    return TASKS[name](**kwargs)


__all__ = ["MQAR", "PAD", "RESERVED", "SEP", "TASKS", "Batch", "Task", "make"]

"""Selection through the index: class subset, few-shot and test caps, reading no shard.

Returns exactly the samples the streaming reader's label pre-pass returned before indexes existed
(``ShardDataset.select_few_shot``, kept in :mod:`pipeline.data.stream` and checked against this in
tests/test_data_index.py): candidates in shard order, labels remapped to the class subset's order,
:func:`few_shot_indices` on them, and the test cap as ``load_task`` drew it
(a seeded permutation of the candidates, the first ``limit`` kept in shard order).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .index import SplitIndex

log = logging.getLogger(__name__)


def base_new_split(num_classes: int) -> tuple[list[int], list[int]]:
    """CoOp base-to-new convention: the first ceil(n/2) classes are base, the rest new."""
    if num_classes < 2:
        raise ValueError(f"base/new split needs at least 2 classes, got {num_classes}")
    half = math.ceil(num_classes / 2)
    return list(range(half)), list(range(half, num_classes))


def few_shot_indices(labels: Sequence[int], shots: int | None, seed: int) -> list[int]:
    """Indices of ``shots`` samples per class (all when None), ascending, deterministic in ``seed``.

    Each class draws from its own seeded generator, so adding or removing a class leaves the other
    classes' picks unchanged. A class with fewer than ``shots`` samples contributes all of them.
    """
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be a positive integer or None, got {shots}")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        if shots is not None and len(members) < shots:
            log.warning("class %d has %d samples, fewer than %d shots: taking all",
                        label, len(members), shots)
        take_all = shots is None or len(members) <= shots
        chosen += members if take_all else random.Random(f"{seed}:shots:{label}").sample(members, shots)
    return sorted(chosen)


def check_classes(classes: Sequence[int], num_classes: int | None) -> list[int]:
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list without repeats, got {classes}")
    if any(c < 0 or (num_classes is not None and c >= num_classes) for c in classes):
        raise ValueError(f"classes {classes} outside [0, {num_classes})")
    return classes


@dataclass
class Selection:
    """Rows of a split's index (in shard order) and their labels (remapped to the class subset)."""

    index: SplitIndex
    rows: np.ndarray  # int64 positions in the index
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.rows)


def select(index: SplitIndex, *, num_classes: int, classes: Sequence[int] | None = None, shots: int | None = None,
           seed: int = 0, limit: int | None = None) -> Selection:
    """The samples of ``classes`` (all when None, remapped to 0..k-1 in the given order), ``shots``
    per class when given, at most ``limit`` when given."""
    labels = index.label
    rows = np.arange(len(labels), dtype=np.int64)
    if classes is not None:
        kept = check_classes(classes, num_classes)
        remap = np.full(num_classes, -1, dtype=np.int64)
        remap[kept] = np.arange(len(kept))
        labels = remap[labels]
        rows = rows[labels >= 0]
        labels = labels[rows]
    if shots is not None:
        chosen = np.asarray(few_shot_indices(labels.tolist(), shots, seed), dtype=np.int64)
        rows, labels = rows[chosen], labels[chosen]
    if limit is not None and len(rows) > limit:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(rows), generator=g)[:limit].sort().values.numpy()
        rows, labels = rows[keep], labels[keep]
    return Selection(index, rows, labels.astype(np.int64))

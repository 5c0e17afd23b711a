"""Selection through the index: class subset, few-shot and test caps, reading no shard.

Returns exactly the samples the streaming reader's label pre-pass returned before indexes existed
(``ShardDataset.select_few_shot``, kept in :mod:`pipeline.data.stream` and checked against this in
tests/test_data_index.py): candidates in shard order, labels remapped to the class subset's order,
:func:`~pipeline.data.stream.few_shot_indices` on them, and the test cap as ``load_task`` drew it
(a seeded permutation of the candidates, the first ``limit`` kept in shard order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .index import SplitIndex
from .stream import _check_classes, few_shot_indices


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
        kept = _check_classes(classes, num_classes)
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

"""A classification task in memory: class names, templates, train and test tensors.

Few-shot prompt tuning trains on 1-16 images per class, so the train split is held in memory as
tensors; the test split is capped by ``data.test_limit`` when the full split is too large.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import ConfigError, DataConfig
from .data.pixels import as_pixels


@dataclass
class TaskData:
    name: str
    classnames: list[str]
    templates: list[str]
    train_x: torch.Tensor  # (N, 3, H, W): uint8 from shards (see pixels.as_pixels), or float in [0, 1]
    train_y: torch.Tensor  # (N,) long
    test_x: torch.Tensor
    test_y: torch.Tensor
    stats: dict[str, int] = field(default_factory=dict)

    def batches(self, batch_size: int, *, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches; the order depends only on (seed, epoch), so resume is exact."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_y), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield as_pixels(self.train_x[idx]), self.train_y[idx]


def load_task(cfg: DataConfig, image_size: int, *, classes: str | None = None) -> TaskData:
    """Read a shards folder into a TaskData (few-shot train split, capped test split)."""
    from . import data as shards_data

    if not cfg.path:
        raise ConfigError("data.path: no shards folder given (make one with `capt shards`)")
    source = shards_data.ShardSource.open(cfg.path)
    all_names = shards_data.class_names(source)
    subset = _class_subset(classes or cfg.classes, len(all_names))
    names = [all_names[i] for i in subset] if subset is not None else list(all_names)
    train_x, train_y, st_train = shards_data.load_split(
        source, cfg.train_split, image_size=image_size, classes=subset, shots=cfg.shots,
        seed=cfg.seed, strict=cfg.strict)
    test_x, test_y, st_test = shards_data.load_split(
        source, cfg.test_split, image_size=image_size, classes=subset, shots=None,
        seed=cfg.seed, strict=cfg.strict)
    if cfg.test_limit is not None and len(test_y) > cfg.test_limit:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(test_y), generator=g)[: cfg.test_limit].sort().values
        test_x, test_y = test_x[keep], test_y[keep]
    stats = {"train_samples": len(train_y), "test_samples": len(test_y),
             "skipped_shards": st_train.get("skipped_shards", 0) + st_test.get("skipped_shards", 0),
             "skipped_samples": st_train.get("skipped_samples", 0) + st_test.get("skipped_samples", 0)}
    name = str(source.meta.get("name", cfg.path))
    return TaskData(name, names, list(shards_data.templates(source)), train_x, train_y, test_x, test_y, stats)


def _class_subset(which: str, n: int) -> list[int] | None:
    from . import data as shards_data

    if which == "all":
        return None
    base, new = shards_data.base_new_split(n)
    return base if which == "base" else new

"""A classification task: class names, templates, train and test images and labels.

A split is selected through its index (:mod:`pipeline.data.select`), read from a cached subset
when ``data.cache`` is set and the split is a subset (few-shot train, capped test;
:mod:`pipeline.data.subsets`), and held in memory as uint8 when it fits ``data.memory_mb``. A
larger one stays on disk: the test split as a :class:`~pipeline.data.read.LazyImages` (evaluation
reads it a batch at a time), the train split streamed through DataLoader workers each epoch.
Remote sources (URLs) without an index are read whole by the streaming reader, as before indexes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ConfigError, DataConfig
from .data.pixels import as_pixels


@dataclass
class TaskData:
    name: str
    classnames: list[str]
    templates: list[str]
    train_x: Any  # (N, 3, H, W) uint8 tensor (see pixels.as_pixels) or float in [0, 1], or a LazyImages
    train_y: torch.Tensor  # (N,) long
    test_x: Any
    test_y: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    shuffle: bool = True
    workers: int = 0  # DataLoader workers when the train split streams

    @property
    def streaming(self) -> bool:
        return not isinstance(self.train_x, torch.Tensor)

    def batches(self, batch_size: int, *, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches (float pixels); the order depends only on (seed, epoch), so resume is exact.

        In memory: a seeded permutation (shard order when ``shuffle`` is off). Streaming: shards and
        samples shuffled per epoch (:class:`~pipeline.data.read.IndexedStream`), the same order as in
        memory when ``shuffle`` is off."""
        if self.streaming:
            from .data.read import stream_batches

            for x, y in stream_batches(self.train_x.selection, self.train_x.size, batch_size=batch_size,
                                       epoch=epoch, seed=seed, shuffle=self.shuffle, workers=self.workers):
                yield as_pixels(x), y
            return
        if self.shuffle:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(len(self.train_y), generator=g)
        else:
            order = torch.arange(len(self.train_y))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield as_pixels(self.train_x[idx]), self.train_y[idx]


def load_task(cfg: DataConfig, image_size: int, *, classes: str | None = None) -> TaskData:
    """Read a shards folder into a TaskData (few-shot or full train split, capped or full test split)."""
    from .data import stream

    if not cfg.path:
        raise ConfigError("data.path: no shards folder given (make one with `capt shards`)")
    source = stream.ShardSource.open(cfg.path)
    all_names = stream.class_names(source)
    subset = _class_subset(classes or cfg.classes, len(all_names))
    names = [all_names[i] for i in subset] if subset is not None else list(all_names)
    if stream._is_remote(source.root):
        return _load_remote(cfg, source, names, subset, image_size)
    stats: dict[str, Any] = {}
    train_x, train_y = _split(cfg, source, cfg.train_split, subset, cfg.shots, None, image_size, stats, "train")
    test_x, test_y = _split(cfg, source, cfg.test_split, subset, None, cfg.test_limit, image_size, stats, "test")
    stats.update(train_samples=len(train_y), test_samples=len(test_y), skipped_shards=0, skipped_samples=0)
    return TaskData(str(source.meta.get("name", cfg.path)), names, list(stream.templates(source)),
                    train_x, train_y, test_x, test_y, stats, shuffle=cfg.shuffle, workers=cfg.workers)


def _split(cfg: DataConfig, source: Any, split: str, subset: list[int] | None, shots: int | None,
           limit: int | None, size: int, stats: dict[str, Any], role: str) -> tuple[Any, torch.Tensor]:
    """One split: selected through the index (from a cached subset when ``data.cache`` is set), held
    in memory when it fits ``data.memory_mb``, else left on disk (a LazyImages)."""
    from .data import subsets
    from .data.read import LazyImages
    from .data.stream import ShardSource

    spec = subsets.SubsetSpec(split, tuple(subset) if subset is not None else None, shots, cfg.seed, size, limit)
    if cfg.cache and (shots is not None or limit is not None):
        folder = subsets.ensure(cfg.cache, source, spec)
        stats[f"{role}_subset"] = str(folder)
        source = ShardSource.open(folder)
        spec = subsets.SubsetSpec(split, None, None, cfg.seed, size, None)  # the subset is the selection
    selection = subsets.selection_of(source, subsets.source_index(source, split), spec)
    if not len(selection):
        raise ValueError(f"{source.root}: split {split!r} yielded no samples")
    lazy = LazyImages(selection, size)
    nbytes = len(selection) * 3 * size * size
    in_memory = cfg.stream == "never" or (cfg.stream == "auto" and nbytes <= cfg.memory_mb * 2**20)
    stats[f"{role}_in_memory"] = in_memory
    return (lazy.load() if in_memory else lazy), torch.from_numpy(selection.labels.copy())


def _load_remote(cfg: DataConfig, source: Any, names: list[str], subset: list[int] | None,
                 image_size: int) -> TaskData:
    """A remote source (no index): both splits read whole by the streaming reader."""
    from .data import stream

    train_x, train_y, st_train = stream.load_split(source, cfg.train_split, image_size=image_size, classes=subset,
                                                   shots=cfg.shots, seed=cfg.seed, strict=cfg.strict)
    test_x, test_y, st_test = stream.load_split(source, cfg.test_split, image_size=image_size, classes=subset,
                                                shots=None, seed=cfg.seed, strict=cfg.strict)
    if cfg.test_limit is not None and len(test_y) > cfg.test_limit:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(test_y), generator=g)[: cfg.test_limit].sort().values
        test_x, test_y = test_x[keep], test_y[keep]
    stats = {"train_samples": len(train_y), "test_samples": len(test_y),
             "skipped_shards": st_train.get("skipped_shards", 0) + st_test.get("skipped_shards", 0),
             "skipped_samples": st_train.get("skipped_samples", 0) + st_test.get("skipped_samples", 0)}
    return TaskData(str(source.meta.get("name", cfg.path)), names, list(stream.templates(source)),
                    train_x, train_y, test_x, test_y, stats, shuffle=cfg.shuffle, workers=cfg.workers)


def _class_subset(which: str, n: int) -> list[int] | None:
    from .data import select

    if which == "all":
        return None
    base, new = select.base_new_split(n)
    return base if which == "base" else new


def prepare_subsets(cfg: DataConfig, image_size: int, *, classes: str | None = None) -> dict[str, str]:
    """Build (or find) the cached subsets a task on ``cfg`` reads: the few-shot train split and the
    capped test split (``data.cache`` must be set). A search calls this once, before its trials."""
    from .data import stream, subsets

    if not cfg.cache or not cfg.path:
        return {}
    source = stream.ShardSource.open(cfg.path)
    if stream._is_remote(source.root):
        return {}
    subset = _class_subset(classes or cfg.classes, len(source.meta["classes"]))
    picked = tuple(subset) if subset is not None else None
    built = {}
    for role, split, shots, limit in (("train", cfg.train_split, cfg.shots, None),
                                      ("test", cfg.test_split, None, cfg.test_limit)):
        if shots is not None or limit is not None:
            spec = subsets.SubsetSpec(split, picked, shots, cfg.seed, image_size, limit)
            built[role] = str(subsets.ensure(cfg.cache, source, spec))
    return built

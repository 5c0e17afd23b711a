"""The streaming reader of shards folders (format: :mod:`pipeline.data.meta`): whole-split streams (full
data from remote sources without an index, `capt tiny-clip`), in-memory splits, few-shot, base/new.

The reader is a small ``IterableDataset`` made of WebDataset's pieces (``gopen``, tar iteration, key
grouping, ``split_by_node`` / ``split_by_worker``) rather than ``wds.WebDataset``, so that a broken
shard is counted, or refused with a one-line error naming it, and a split with fewer shards than
readers is divided by sample instead of idling readers. Each sample is read once per pass across
nodes (``RANK`` / ``WORLD_SIZE``, else ``torch.distributed``) and DataLoader workers:
shards >= readers: whole shards are dealt out after a seeded shuffle every reader repeats;
shards < readers: every reader streams every shard and keeps sample ``j`` of the ``p``-th shard when
``(p + j) % readers`` is its index. Per-rank counts can differ by up to a shard (bound DDP steps).
Images: float32 ``(3, H, W)`` in [0, 1], shorter side resized (bicubic), centre crop, no mean/std.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from .meta import META_NAME, read_meta, validate_meta
from .pixels import to_tensor, to_uint8
from .select import base_new_split, check_classes, few_shot_indices  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

_MAX_SAMPLE_WARNINGS = 10
_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
_STATS = ("samples", "skipped_shards", "skipped_samples")


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _join(root: str, name: str) -> str:
    """Shard or meta location under ``root``: a local path, a URL, or an ``aws s3 cp`` pipe for s3://."""
    if root.startswith("s3://"):
        return f"pipe:aws s3 cp {root.rstrip('/')}/{name} -"
    if _is_remote(root):
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


@dataclass(frozen=True)
class ShardSource:
    """A shards folder: its root (local folder or URL prefix) and its validated ``meta.json``."""

    root: str
    meta: dict = field(repr=False)

    @classmethod
    def open(cls, path_or_url: str | Path | ShardSource, meta: dict | None = None) -> ShardSource:
        """Open a shards folder; remote roots (http(s)://, s3://, gs://) fetch ``meta.json`` via gopen."""
        if isinstance(path_or_url, ShardSource):
            return path_or_url
        root = str(path_or_url)
        if meta is not None:
            return cls(root, validate_meta(meta, _join(root, META_NAME)))
        if not _is_remote(root):
            return cls(root, read_meta(root))
        where = _join(root, META_NAME)
        try:
            with wds.gopen(where) as stream:
                loaded = json.loads(stream.read().decode("utf-8"))
        except Exception as exc:  # any transport failure: one line naming the location
            raise ValueError(f"{where}: cannot read meta ({type(exc).__name__}: {exc})") from None
        return cls(root, validate_meta(loaded, where))

    def split(self, split: str) -> dict:
        """The meta entry of ``split``; ValueError naming the available splits when missing."""
        splits = self.meta["splits"]
        if split not in splits:
            raise ValueError(f"{_join(self.root, META_NAME)}: no split {split!r} (has {sorted(splits)})")
        return splits[split]


def shard_urls(source: ShardSource | str | Path, split: str) -> list[str]:
    """Locations of a split's shards, in meta order (local paths or URLs)."""
    source = ShardSource.open(source)
    return [_join(source.root, name) for name in source.split(split)["shards"]]


def class_names(source: ShardSource | str | Path, classes: Sequence[int] | None = None) -> list[str]:
    """Class names in label order, or of the ``classes`` subset in the given (remapped) order."""
    names = ShardSource.open(source).meta["classes"]
    return list(names) if classes is None else [names[c] for c in check_classes(classes, len(names))]


def templates(source: ShardSource | str | Path) -> list[str]:
    """The prompt templates recorded with the shards (each holds one ``{}`` for the class name)."""
    return list(ShardSource.open(source).meta["templates"])


class ShardDataset(IterableDataset):
    """Stream ``(image, label)`` (or ``(image, label, key)``) from tar shards; see the module docstring.

    ``stats`` counts the current pass in this process: ``samples`` yielded, ``skipped_shards`` (broken
    shards, abandoned where they broke), ``skipped_samples`` (undecodable, or lost in a broken shard
    when the meta has per-shard counts). Each DataLoader worker counts in its own copy (the parent's
    stay at zero); :func:`load_split` reads in-process, so its counts are complete.
    """

    def __init__(self, urls: Sequence[str], *, image_size: int, num_classes: int | None = None,
                 classes: Sequence[int] | None = None, shuffle_buffer: int = 0, shard_shuffle: bool = False,
                 seed: int = 0, strict: bool = False, resampled: bool = False,
                 expected_counts: dict[str, int] | None = None, with_keys: bool = False,
                 uint8: bool = False) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no shard urls to read")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.urls = list(urls)
        self.image_size = image_size
        self.num_classes = num_classes
        kept = None if classes is None else check_classes(classes, num_classes)
        self.remap = None if kept is None else {c: i for i, c in enumerate(kept)}
        self.shuffle_buffer, self.shard_shuffle, self.seed = shuffle_buffer, shard_shuffle, seed
        self.strict, self.resampled, self.with_keys = strict, resampled, with_keys
        self.uint8 = uint8  # yield uint8 (3, H, W) images (4x smaller; see as_pixels) instead of float
        self.expected_counts = dict(expected_counts or {})
        self.selected: frozenset[tuple[str, str]] | None = None
        self.epoch, self._warnings = 0, 0
        self.stats = dict.fromkeys(_STATS, 0)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard and sample shuffles (call before each pass)."""
        self.epoch = int(epoch)

    def select_few_shot(self, shots: int | None, seed: int) -> None:
        """Restrict the stream to ``shots`` samples per (remapped) class, chosen by a label-only pre-pass."""
        self.selected = None
        if shots is None:
            return
        pairs: list[tuple[str, str]] = []
        labels: list[int] = []
        for url, sample in self._raw_samples(self.urls, sample_owner=None):
            label = self._label(url, sample)
            if label is not None:
                pairs.append((url, sample["__key__"]))
                labels.append(label)
        self.selected = frozenset(pairs[i] for i in few_shot_indices(labels, shots, seed))

    def __iter__(self) -> Iterator[tuple]:
        self.stats, self._warnings = dict.fromkeys(_STATS, 0), 0
        rank, world, worker, workers = wds.utils.pytorch_worker_info()  # as wds's splitters see them
        readers, me = world * workers, rank * workers + worker
        if self.resampled:
            rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}:resample")
            stream = self._raw_samples((rng.choice(self.urls) for _ in itertools.count()), sample_owner=None)
        else:
            urls = list(self.urls)
            if self.shard_shuffle:  # identical order in every reader, so the split below partitions
                random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(urls)
            if len(urls) >= readers:
                urls = list(wds.split_by_worker(list(wds.split_by_node(urls))))
                stream = self._raw_samples(urls, sample_owner=None)
            else:
                stream = self._raw_samples(urls, sample_owner=(me, readers))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}:samples")
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        for url, sample in stream:
            item = self._decode(url, sample)
            if item is not None:
                self.stats["samples"] += 1
                yield item

    def _raw_samples(self, urls, sample_owner: tuple[int, int] | None) -> Iterator[tuple[str, dict]]:
        """Undecoded samples of the given shards that this reader owns and that pass the class filter."""
        for position, url in enumerate(urls):
            read = 0
            try:
                for j, sample in enumerate(_tar_samples(url)):
                    read = j + 1
                    if sample_owner is not None and (position + j) % sample_owner[1] != sample_owner[0]:
                        continue  # another reader's sample
                    if self.selected is not None and (url, sample["__key__"]) not in self.selected:
                        continue
                    if self._label(url, sample) is not None:
                        yield url, sample
                expected = self.expected_counts.get(url)
                if expected is not None and read != expected:  # e.g. cut at a member boundary
                    raise _ShardError(url) from EOFError(f"holds {read} samples, meta.json says {expected}")
            except _ShardError as exc:
                self._shard_failed(url, exc.__cause__ or exc, read, position, sample_owner)

    def _shard_failed(self, url: str, exc: BaseException, read: int, position: int,
                      owner: tuple[int, int] | None) -> None:
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        message = " ".join(message.split(" @ ")[0].split())  # one line, without WebDataset's stream repr
        if self.strict:
            raise ValueError(f"corrupt shard {url}: {type(exc).__name__}: {message}") from None
        expected = self.expected_counts.get(url)
        lost = range(read, expected) if expected is not None and expected > read else range(0)
        if owner is not None:
            lost = [j for j in lost if (position + j) % owner[1] == owner[0]]
        self.stats["skipped_shards"] += 1
        self.stats["skipped_samples"] += len(lost)
        log.warning("skipping the rest of corrupt shard %s after %d samples (%s: %s)",
                    url, read, type(exc).__name__, message)

    def _label(self, url: str, sample: dict) -> int | None:
        """The sample's (remapped) label, None when filtered out or undecodable (non-strict)."""
        try:
            label = int(sample["cls"])
        except (KeyError, ValueError) as exc:
            self._sample_failed(url, sample, f"no integer label ({type(exc).__name__})")
            return None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"shard {url}, sample {sample['__key__']}: label {label} outside "
                             f"[0, {self.num_classes if self.num_classes is not None else '?'})")
        if self.remap is None:
            return label
        return self.remap.get(label)

    def _decode(self, url: str, sample: dict) -> tuple | None:
        key = next((k for k in _IMAGE_KEYS if k in sample), None)
        if key is None:
            self._sample_failed(url, sample, "no image")
            return None
        try:
            with Image.open(io.BytesIO(sample[key])) as image:
                tensor = (to_uint8 if self.uint8 else to_tensor)(image, self.image_size)
        except Exception as exc:  # PIL raises many types on bad bytes
            self._sample_failed(url, sample, f"undecodable image ({type(exc).__name__})")
            return None
        label = torch.tensor(self._label(url, sample), dtype=torch.int64)
        return (tensor, label, sample["__key__"]) if self.with_keys else (tensor, label)

    def _sample_failed(self, url: str, sample: dict, why: str) -> None:
        if self.strict:
            raise ValueError(f"shard {url}, sample {sample.get('__key__')}: {why}")
        self.stats["skipped_samples"] += 1
        self._warnings += 1
        level = logging.WARNING if self._warnings <= _MAX_SAMPLE_WARNINGS else logging.DEBUG
        log.log(level, "skipping sample %s of shard %s: %s", sample.get("__key__"), url, why)


class _ShardError(Exception):
    """One shard could not be read to its end (the cause holds the transport or tar error)."""


def _tar_samples(url: str) -> Iterator[dict]:
    """Samples of one shard as dicts of raw bytes; reading errors come out as ``_ShardError``."""
    stream = None
    try:
        stream = wds.gopen(url)
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        stream.close()  # a pipe: reports a failed command here
    except Exception as exc:
        raise _ShardError(url) from exc
    finally:
        with contextlib.suppress(Exception):  # reported above, or the consumer stopped early
            if stream is not None:
                stream.close()


def _shuffled(stream: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle through a buffer of ``size`` undecoded samples."""
    buffer: list[Any] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _as_urls(value: Any) -> list[str] | None:
    """Brace-expanded shard URLs when ``value`` is a URL list or a tar pattern, else None (a folder)."""
    if not isinstance(value, list | tuple) and (".tar" not in str(value) or os.path.isdir(str(value))):
        return None
    items = [value] if isinstance(value, str | Path) else value
    return [url for item in items for url in braceexpand(str(item))]


def make_dataset(
    source_or_urls: ShardSource | str | Path | Sequence[str], *, split: str | None = None, image_size: int,
    shuffle_buffer: int = 0, seed: int = 0, classes: Sequence[int] | None = None, strict: bool = False,
    resampled: bool = False, shots: int | None = None, shard_shuffle: bool | None = None,
    num_classes: int | None = None, with_keys: bool = False, uint8: bool = False,
) -> ShardDataset:
    """A streaming dataset of ``(image (3, H, W) float32 in [0, 1], label int64)``.

    ``source_or_urls`` is a :class:`ShardSource`, a shards folder (local or remote root, then
    ``split`` is required), or shard URLs passed through to WebDataset's ``gopen`` (a brace pattern
    string or a list; e.g. ``pipe:aws s3 cp s3://b/train-{000000..000003}.tar -``), then labels are
    checked against ``num_classes`` when given. ``classes`` keeps only those original labels,
    remapped to 0..k-1 in the given order; ``shots`` then keeps that many per class (label pre-pass,
    deterministic in ``seed``). Shards are shuffled when ``shard_shuffle`` (default: when
    ``shuffle_buffer`` > 1); ``resampled`` draws shards with replacement, forever.
    """
    expected: dict[str, int] = {}
    urls = _as_urls(source_or_urls)
    if urls is None:
        source = ShardSource.open(source_or_urls)
        if split is None:
            raise ValueError(f"{source.root}: split is required (one of {sorted(source.meta['splits'])})")
        urls = shard_urls(source, split)
        entry = source.split(split)
        expected = dict(zip(urls, entry.get("shard_counts") or [], strict=False))
        num_classes = len(source.meta["classes"])
    dataset = ShardDataset(urls, image_size=image_size, num_classes=num_classes, classes=classes,
                           shuffle_buffer=shuffle_buffer, seed=seed, strict=strict, resampled=resampled,
                           shard_shuffle=shuffle_buffer > 1 if shard_shuffle is None else shard_shuffle,
                           expected_counts=expected, with_keys=with_keys, uint8=uint8)
    if shots is not None:
        dataset.select_few_shot(shots, seed)
    return dataset


def load_split(
    source: ShardSource | str | Path, split: str, *, image_size: int, classes: Sequence[int] | None = None,
    shots: int | None = None, seed: int = 0, strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """A whole split in memory: images (N, 3, H, W) uint8, labels (N,) int64, and read stats.

    Samples come in shard order. Few-shot selection (``shots`` per class, deterministic in
    ``seed``) is applied here. Images stay uint8 (N * 3 * H * W bytes: 7.5 GB for ImageNet's 50,000
    validation images at 224 px, a quarter of float32); consumers convert each batch with
    :func:`as_pixels`, which gives exactly the float pixels of :func:`to_tensor`.
    """
    dataset = make_dataset(source, split=split, image_size=image_size, classes=classes, shots=shots,
                           seed=seed, strict=strict, shard_shuffle=False, uint8=True)
    pairs = list(dataset)
    if not pairs:
        raise ValueError(f"{ShardSource.open(source).root}: split {split!r} yielded no samples")
    images, labels = zip(*pairs, strict=True)
    return torch.stack(images), torch.stack(labels), dict(dataset.stats)


class _EpochLoader(DataLoader):
    """DataLoader that advances the dataset's epoch (shuffle seed) at every new pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_epoch = 0

    def __iter__(self):
        self.dataset.set_epoch(self._next_epoch)
        self._next_epoch += 1
        return super().__iter__()


def make_loader(
    source: ShardSource | str | Path | Sequence[str], split: str | None, *, image_size: int, batch_size: int,
    num_workers: int = 0, shuffle: bool = True, seed: int = 0, classes: Sequence[int] | None = None,
    strict: bool = False, shuffle_buffer: int = 1000, drop_last: bool = False,
) -> DataLoader:
    """Batches ``(images (B, 3, H, W), labels (B,))`` streamed from shards, for full-data training.

    Each pass reshuffles shards and samples (seeded by ``seed`` and the pass number) when
    ``shuffle``; the sample buffer holds undecoded bytes, so ``shuffle_buffer`` costs little memory.
    """
    dataset = make_dataset(source, split=split, image_size=image_size, seed=seed, classes=classes,
                           strict=strict, shuffle_buffer=shuffle_buffer if shuffle else 0,
                           shard_shuffle=shuffle)
    return _EpochLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False)

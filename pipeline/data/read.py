"""Reading samples by their byte offsets: a lazily read image array and a shard-ordered stream.

:class:`LazyImages` behaves like a ``(N, 3, S, S)`` uint8 tensor for the evaluation code (``len``,
slicing gives another lazy view, ``.to(device)`` / :func:`~pipeline.data.pixels.as_pixels` read
and decode), so a test split evaluates in batches in bounded memory. :class:`IndexedStream` is the
training stream: the selected samples of each shard read in order, shards and samples shuffled per
epoch (seeded by ``seed`` and the epoch only, so a run resumed at an epoch boundary sees the same
batches), divided between DataLoader workers; decoding happens in the workers.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import tario
from .pixels import to_uint8
from .select import Selection


def decode(data: bytes, size: int, where: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_uint8(image, size)
    except Exception as exc:  # PIL raises many types on bad bytes
        raise ValueError(f"{where}: undecodable image ({type(exc).__name__}: {exc})") from None


def iter_images(selection: Selection, positions: np.ndarray, size: int) -> Iterator[torch.Tensor]:
    """Decoded uint8 images of ``selection.rows[positions]`` in the given order; a shard stays open
    while consecutive samples come from it (in shard order: each shard opened once, read forward)."""
    index = selection.index
    handle, open_shard = None, -1
    try:
        for r in selection.rows[positions]:
            shard = int(index.shard[r])
            if shard != open_shard:
                if handle is not None:
                    handle.close()
                handle, open_shard = tario.open_shard(index.paths[shard]), shard
            where = f"{index.paths[shard]}, sample {index.key[r]}"
            yield decode(tario.read_member(handle, int(index.offset[r]), int(index.length[r]), where), size, where)
    finally:
        if handle is not None:
            handle.close()


def read_rows(selection: Selection, positions: np.ndarray, size: int) -> torch.Tensor:
    """Decoded uint8 images ``(len(positions), 3, size, size)`` of ``selection.rows[positions]``."""
    out = torch.empty((len(positions), 3, size, size), dtype=torch.uint8)
    order = np.argsort(selection.rows[positions], kind="stable")  # read in shard order
    for k, image in zip(order, iter_images(selection, np.asarray(positions)[order], size), strict=True):
        out[k] = image
    return out


class LazyImages:
    """``(N, 3, size, size)`` uint8 images of a selection, read and decoded when materialised."""

    dtype = torch.uint8

    def __init__(self, selection: Selection, size: int, positions: np.ndarray | None = None):
        self.selection, self.size = selection, size
        self.positions = np.arange(len(selection)) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.size, self.size)

    def __getitem__(self, item: Any) -> LazyImages | torch.Tensor:
        if isinstance(item, int | np.integer):
            return self.load(self.positions[[int(item)]])[0]
        if isinstance(item, torch.Tensor):
            item = item.numpy()
        return LazyImages(self.selection, self.size, self.positions[item])

    def load(self, positions: np.ndarray | None = None) -> torch.Tensor:
        return read_rows(self.selection, self.positions if positions is None else positions, self.size)

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.load().to(*args, **kwargs)


class IndexedStream(IterableDataset):
    """``(image uint8 (3, S, S), label)`` of a selection, shard by shard (see the module docstring)."""

    def __init__(self, selection: Selection, size: int, *, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 512):
        super().__init__()
        self.selection, self.size, self.seed = selection, size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.epoch = 0
        shard_of = selection.index.shard[selection.rows]
        self.by_shard = [np.flatnonzero(shard_of == s) for s in np.unique(shard_of)]  # positions, shard order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _groups(self) -> list[np.ndarray]:
        """This reader's groups of positions (whole shards, or every n-th sample when too few shards)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        groups = list(self.by_shard)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(groups)
        if len(groups) >= workers:
            return groups[worker::workers]
        flat = np.concatenate(groups)
        return [flat[worker::workers]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{info.id if info else 0}:samples")
        buffer: list[int] = []
        for group in self._groups():
            for position, image in zip(group, iter_images(self.selection, group, self.size), strict=True):
                item = (image, torch.tensor(int(self.selection.labels[position])))
                if not self.shuffle or self.shuffle_buffer <= 1:
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    k = rng.randrange(len(buffer))
                    buffer[k], buffer[-1] = buffer[-1], buffer[k]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


def stream_batches(selection: Selection, size: int, *, batch_size: int, epoch: int, seed: int, shuffle: bool,
                   workers: int = 0, shuffle_buffer: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of uint8 training batches streamed through DataLoader workers."""
    dataset = IndexedStream(selection, size, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer)
    dataset.set_epoch(epoch)
    # its own generator: the loader's base seed must not come from (and shift) the global RNG that the
    # training attack's random start draws from
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    yield from loader

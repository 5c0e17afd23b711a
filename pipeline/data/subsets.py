"""Subsets built once: a selection (source, split, classes, shots, seed, image size, cap) written as a
small shards folder of its own, in a content-addressed cache.

The folder name is a hash of the source's identity (its folder, ``meta.json`` and the indexed
shards' sizes and mtimes) and of the selection, so a search resolves each distinct subset once,
before its trials start, and every trial, a later search on the same source and ``--resume`` find
it there. A trial's data setup then reads only the subset (its images already decoded to the
model's size, stored losslessly as PNG: the same uint8 pixels as decoding the source), whatever
the size of the source split. A subset is written to a temporary folder and renamed into place,
so concurrent builders and interrupted builds never leave a half-written subset behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import index as index_mod
from .meta import META_NAME
from .read import iter_images
from .select import Selection, select
from .stream import ShardSource
from .write import write_dataset

log = logging.getLogger(__name__)
VERSION = 1


@dataclass(frozen=True)
class SubsetSpec:
    """What a subset holds: a split of a source, a class subset (None: all), shots, cap, image size."""

    split: str
    classes: tuple[int, ...] | None
    shots: int | None
    seed: int
    image_size: int
    limit: int | None = None


def source_index(source: ShardSource, split: str) -> index_mod.SplitIndex:
    return index_mod.load(source.root, split, source.split(split)["shards"], num_classes=len(source.meta["classes"]))


def subset_key(source: ShardSource, idx: index_mod.SplitIndex, spec: SubsetSpec) -> str:
    ident = {"version": VERSION, "root": os.path.abspath(source.root),
             "meta": hashlib.sha256(json.dumps(source.meta, sort_keys=True).encode()).hexdigest(),
             "shards": [[s["name"], s["size"], s["mtime_ns"]] for s in idx.shards],
             "split": spec.split, "classes": list(spec.classes) if spec.classes is not None else None,
             "shots": spec.shots, "seed": spec.seed, "image_size": spec.image_size, "limit": spec.limit}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def selection_of(source: ShardSource, idx: index_mod.SplitIndex, spec: SubsetSpec) -> Selection:
    return select(idx, num_classes=len(source.meta["classes"]), classes=spec.classes, shots=spec.shots,
                  seed=spec.seed, limit=spec.limit)


def ensure(cache: str | Path, source: ShardSource, spec: SubsetSpec) -> Path:
    """The subset's folder in ``cache``, built now when it is not there yet."""
    idx = source_index(source, spec.split)
    folder = Path(cache) / subset_key(source, idx, spec)
    if (folder / META_NAME).is_file():
        return folder
    selection = selection_of(source, idx, spec)
    if not len(selection):
        raise ValueError(f"{source.root}: split {spec.split!r} has no samples of the chosen classes")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    names = source.meta["classes"]
    classes = [names[c] for c in spec.classes] if spec.classes is not None else list(names)
    try:
        write_dataset(tmp, name=str(source.meta.get("name", "")), classes=classes,
                      splits={spec.split: _samples(selection, spec.image_size)},
                      templates=source.meta["templates"], source=f"subset:{os.path.abspath(source.root)}",
                      image_format="png", shard_size=1000, overwrite=True, progress=False,
                      totals={spec.split: len(selection)},
                      extra={"subset": {**spec.__dict__, "classes": _jsonable(spec.classes)}})
        try:
            os.replace(tmp, folder)
        except OSError:  # another builder won the race: theirs is identical
            if not (folder / META_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built subset %s: %d %s samples of %s", folder, len(selection), spec.split, source.root)
    return folder


def _jsonable(classes: Sequence[int] | None) -> list[int] | None:
    return list(classes) if classes is not None else None


def _samples(selection: Selection, size: int) -> Iterator[tuple]:
    import numpy as np

    positions = np.arange(len(selection))
    for position, image in zip(positions, iter_images(selection, positions, size), strict=True):
        yield image.permute(1, 2, 0).numpy(), int(selection.labels[position]), None

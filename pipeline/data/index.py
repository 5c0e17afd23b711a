"""The per-split index: every sample's shard, key, label and image byte range, beside ``meta.json``.

``<split>.index.json`` (format ``capt-index/1``) is columnar: per sample ``shard`` (position in the
split's shard list), ``key``, ``label``, ``ext`` (image member), ``offset`` and ``length`` (its
bytes inside the shard). Per shard it records the file's size and mtime, so an index that no
longer matches its shards (rewritten or truncated after indexing) is refused with one line naming
the shard, never silently used: a size that differs is refused at once; an mtime that differs
(a copy, a touch) is checked by re-reading that shard's member headers. Selection by class and
shots (:mod:`pipeline.data.select`) then reads this file only, not the shards.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import tario
from .meta import META_NAME, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "capt-index/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class SplitIndex:
    """A split's index in memory (numpy columns; ``paths[shard[i]]`` is sample ``i``'s shard file)."""

    root: str
    split: str
    shards: list[dict]  # name, size, mtime_ns, count
    shard: np.ndarray  # int32
    key: list[str]
    label: np.ndarray  # int64
    ext: list[str]
    offset: np.ndarray  # int64
    length: np.ndarray  # int64
    paths: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.paths = [os.path.join(self.root, s["name"]) for s in self.shards]

    def __len__(self) -> int:
        return len(self.key)

    def to_json(self) -> dict:
        return {"format": FORMAT, "split": self.split, "shards": self.shards, "shard": self.shard.tolist(),
                "key": self.key, "label": self.label.tolist(), "ext": self.ext,
                "offset": self.offset.tolist(), "length": self.length.tolist()}


def index_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.index.json"


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def sample_label(handle: BinaryIO, sample: tario.TarSample, where: str, label_key: str = "label") -> int:
    """The label of a sample: its ``cls`` member, else ``label_key`` inside its ``json`` member."""
    if "cls" in sample.members:
        raw = tario.read_member(handle, *sample.members["cls"], where=where)
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{where}: sample {sample.key}: .cls is not an integer ({raw[:20]!r})") from None
    if "json" in sample.members:
        raw = tario.read_member(handle, *sample.members["json"], where=where)
        try:
            value = json.loads(raw).get(label_key)
        except (ValueError, AttributeError):
            raise ValueError(f"{where}: sample {sample.key}: .json is not a JSON object") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    raise ValueError(f"{where}: sample {sample.key} has no label (no .cls member, no integer "
                     f"{label_key!r} in a .json member)")


def build(root: str | Path, split: str, shard_names: Sequence[str], *, num_classes: int,
          label_key: str = "label") -> SplitIndex:
    """Index a split's shards by reading their member headers and labels (not their images)."""
    root = str(root)
    cols: dict[str, list] = {"shard": [], "key": [], "label": [], "ext": [], "offset": [], "length": []}
    shards = []
    for position, name in enumerate(shard_names):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: shard not found")
        size, mtime = _stat(path)
        count = 0
        with tario.open_shard(path) as handle:
            for sample in list(tario.scan(path, handle)):
                ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
                if ext is None:
                    raise ValueError(f"{path}: sample {sample.key} has no image (png, jpg, jpeg or webp member)")
                label = sample_label(handle, sample, path, label_key)
                if not 0 <= label < num_classes:
                    raise ValueError(f"{path}: sample {sample.key}: label {label} outside the class list "
                                     f"[0, {num_classes})")
                offset, length = sample.members[ext]
                for column, value in zip(cols, (position, sample.key, label, ext, offset, length), strict=True):
                    cols[column].append(value)
                count += 1
        shards.append({"name": name, "size": size, "mtime_ns": mtime, "count": count})
    return SplitIndex(root, split, shards, np.asarray(cols["shard"], dtype=np.int32), cols["key"],
                      np.asarray(cols["label"], dtype=np.int64), cols["ext"],
                      np.asarray(cols["offset"], dtype=np.int64), np.asarray(cols["length"], dtype=np.int64))


def write(index: SplitIndex) -> Path:
    path = index_path(index.root, index.split)
    write_json_atomic(path, index.to_json())
    return path


def _from_json(root: str, doc: dict, where: Path) -> SplitIndex:
    try:
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
        n = len(doc["key"])
        if any(len(doc[c]) != n for c in ("shard", "label", "ext", "offset", "length")):
            raise ValueError("columns of different lengths")
        return SplitIndex(root, doc["split"], list(doc["shards"]), np.asarray(doc["shard"], dtype=np.int32),
                          list(doc["key"]), np.asarray(doc["label"], dtype=np.int64), list(doc["ext"]),
                          np.asarray(doc["offset"], dtype=np.int64), np.asarray(doc["length"], dtype=np.int64))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a valid index ({exc})") from None


def check_fresh(index: SplitIndex, shard_names: Sequence[str], where: Path) -> None:
    """Refuse an index whose shards changed after indexing (one line naming the shard)."""
    hint = f"index {where} is stale; re-index with `capt shards --index {index.root}`"
    if [s["name"] for s in index.shards] != list(shard_names):
        raise ValueError(f"{where}: lists other shards than {META_NAME}; {hint}")
    for position, (entry, path) in enumerate(zip(index.shards, index.paths, strict=True)):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: shard not found ({hint})")
        size, mtime = _stat(path)
        if size != entry["size"]:
            raise ValueError(f"{path}: {size} bytes, indexed at {entry['size']} (rewritten or truncated "
                             f"after indexing); {hint}")
        if mtime != entry["mtime_ns"] and not _same_members(index, position, path):
            raise ValueError(f"{path}: its members moved since indexing (rewritten after indexing); {hint}")


def _same_members(index: SplitIndex, position: int, path: str) -> bool:
    rows = np.flatnonzero(index.shard == position)
    try:
        found = [(s.key, s.members.get(index.ext[r], (-1, -1)))
                 for s, r in zip(tario.scan(path), rows, strict=True)]
    except ValueError:  # broken tar or a different member count
        return False
    return found == [(index.key[r], (int(index.offset[r]), int(index.length[r]))) for r in rows]


def load(root: str | Path, split: str, shard_names: Sequence[str], *, num_classes: int,
         build_missing: bool = True) -> SplitIndex:
    """The split's index, checked against its shards; built (and saved when the folder is writable)
    when missing and ``build_missing``, e.g. for folders written before indexes existed."""
    root, path = str(root), index_path(root, split)
    if not path.is_file():
        if not build_missing:
            raise ValueError(f"{path}: no index (make one with `capt shards --index {root}`)")
        log.info("indexing split %r of %s (no index yet)", split, root)
        index = build(root, split, shard_names, num_classes=num_classes)
        try:
            write(index)
        except OSError as exc:
            log.warning("%s: could not save the index (%s); using it in memory", path, exc)
        return index
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({type(exc).__name__})") from None
    index = _from_json(root, doc, path)
    check_fresh(index, shard_names, path)
    if len(index.label) and (index.label.min() < 0 or index.label.max() >= num_classes):
        raise ValueError(f"{path}: labels outside the class list [0, {num_classes})")
    return index

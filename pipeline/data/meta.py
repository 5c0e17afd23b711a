"""``meta.json`` of a shards folder: the ``capt-shards/1`` format, reading and validating it.

A shards folder holds tar shards plus ``meta.json`` (class names in label order, prompt templates,
splits with shard names and sample counts). ``meta.json`` is written last and atomically, so a
folder without it is an incomplete write and a folder with it is complete. Each split may also have
an index (``<split>.index.json``, :mod:`pipeline.data.index`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FORMAT = "capt-shards/1"
META_NAME = "meta.json"
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}  # what the writer encodes
READABLE_FORMATS = (*IMAGE_FORMATS, "webp", "mixed")  # adopted tars may hold any of png/jpg/webp


def split_entry(split: str, shards: Sequence[str], counts: Sequence[int]) -> dict:
    """The ``meta.json`` entry of one split: brace pattern, shard names, total and per-shard counts."""
    pattern = f"{split}-{{{0:06d}..{len(shards) - 1:06d}}}.tar"
    return {"pattern": pattern, "shards": list(shards), "count": int(sum(counts)),
            "shard_counts": [int(c) for c in counts]}



def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)



def check_templates(templates: Sequence[str], where: Path | str) -> None:
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"{where}: templates must be a non-empty list of strings containing '{{}}'")


def read_meta(path: str | Path) -> dict:
    """Read and validate ``meta.json`` of a shards folder (``path`` is the folder or the file)."""
    path = Path(path)
    meta_path = path / META_NAME if path.is_dir() or not path.suffix else path
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: not found (not a shards folder, or its write did not finish)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: unreadable ({type(exc).__name__}: {exc})") from None
    return validate_meta(meta, meta_path)


def validate_meta(meta: Any, where: str | Path = META_NAME) -> dict:
    """Check a loaded meta dict against the ``capt-shards/1`` format; return it or raise ValueError."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{where}: format is {found!r}, expected {FORMAT!r}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{where}: 'classes' must be a non-empty list of class names")
    check_templates(meta.get("templates") or [], where)
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"{where}: 'splits' must be a non-empty mapping")
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, str) and s and "/" not in s for s in shards):
            raise ValueError(f"{where}: split {split!r} needs a list of shard file names")
        if not isinstance(entry.get("count"), int) or entry["count"] < 0:
            raise ValueError(f"{where}: split {split!r} needs a non-negative integer 'count'")
        counts = entry.get("shard_counts")
        if counts is not None and (len(counts) != len(shards) or sum(counts) != entry["count"]):
            raise ValueError(f"{where}: split {split!r} has shard_counts inconsistent with shards/count")
    if meta.get("image_format") not in READABLE_FORMATS:
        raise ValueError(f"{where}: image_format must be one of {sorted(READABLE_FORMATS)}")
    return meta

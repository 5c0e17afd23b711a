"""Writing self-describing WebDataset shard folders (the format: :mod:`pipeline.data.meta`)::

    OUT/meta.json
    OUT/train-000000.tar ... OUT/test-000000.tar
    OUT/train.index.json OUT/test.index.json

Each sample has ``__key__`` (``<split>_<index>``, no dots), the encoded image under ``png`` or
``jpg``, ``cls`` (ASCII integer label) and an optional ``txt`` caption. Every split written here
is indexed (:mod:`pipeline.data.index`) before ``meta.json`` lands. Reading lives in
:mod:`pipeline.data.stream` and :mod:`pipeline.data.read`.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from . import index
from .meta import (
    DEFAULT_TEMPLATES,
    FORMAT,
    IMAGE_FORMATS,
    META_NAME,
    check_templates,
    read_meta,
    split_entry,
    write_json_atomic,
)

log = logging.getLogger(__name__)

_FORMATS = IMAGE_FORMATS
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")

ImageLike = bytes | Image.Image | np.ndarray
Sample = tuple[ImageLike, int, str | None]


def _check_format(image_format: str) -> str:
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    return image_format


def encode_image(image: ImageLike, image_format: str = "png") -> bytes:
    """Encode an image (encoded bytes, PIL image or HxW / HxWxC uint8 array) as PNG or JPEG bytes.

    Bytes already in the requested format are stored unchanged; anything else is re-encoded.
    """
    pil_format = _FORMATS[_check_format(image_format)]
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format == pil_format:
                return data
            image = probe.copy()
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot encode an image of type {type(image).__name__}")
    if pil_format == "JPEG" or image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    options = {"quality": 95} if pil_format == "JPEG" else {}
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()



def write_split(
    samples: Iterable[Sample],
    out_dir: str | Path,
    split: str,
    *,
    shard_size: int = 1000,
    image_format: str = "png",
    progress: bool = True,
    total: int | None = None,
) -> dict:
    """Write one split's samples ``(image, label, caption or None)`` as tar shards into ``out_dir``.

    Writes only the tars (``<split>-000000.tar`` ...); the caller writes ``meta.json`` (see
    :func:`write_dataset`). Returns the split's ``meta.json`` entry. The progress bar shows on a
    terminal only.
    """
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name must match {_SPLIT_RE.pattern}, got {split!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    _check_format(image_format)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, int]] = []  # (shard file, samples in it), recorded as each shard closes
    pattern = str(out_dir / f"{split}-%06d.tar")
    bar = tqdm(samples, total=total, desc=f"writing {split}", unit="img",
               disable=None if progress else True, leave=False)
    writer = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0,
                             post=lambda fname: written.append((fname, writer.count)),
                             encoder=False, mtime=0.0)
    try:
        with writer:
            for index, (image, label, caption) in enumerate(bar):
                record = {"__key__": f"{split}_{index:06d}",
                          image_format: encode_image(image, image_format),
                          "cls": str(int(label)).encode("ascii")}
                if caption is not None:
                    record["txt"] = str(caption).encode("utf-8")
                writer.write(record)
    finally:
        bar.close()
    names = [Path(fname).name for fname, _ in written]
    counts = [count for _, count in written]
    if sum(counts) == 0:
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        raise ValueError(f"split {split!r} has no samples to write")
    log.info("wrote %d %s samples in %d shards to %s", sum(counts), split, len(names), out_dir)
    return split_entry(split, names, counts)



def _prepare_out(out: Path, overwrite: bool) -> dict | None:
    """Refuse a complete folder unless ``overwrite``; return the old meta (to clean up) or None."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output exists and is not a folder")
    meta_path = out / META_NAME
    if not meta_path.exists():
        out.mkdir(parents=True, exist_ok=True)
        return None
    if not overwrite:
        raise ValueError(f"{out}: already holds a shards folder ({META_NAME}); pass overwrite=True to replace")
    try:
        old = read_meta(out)
    except ValueError:
        old = None
    meta_path.unlink()  # from here on the folder reads as incomplete until the new meta lands
    return old


def _remove_stale(out: Path, old: dict | None, new: dict) -> None:
    if not old:
        return
    keep = {name for entry in new["splits"].values() for name in entry["shards"]}
    for split in set(old.get("splits", {})) - set(new["splits"]):
        index.index_path(out, split).unlink(missing_ok=True)
    for entry in old.get("splits", {}).values():
        for name in entry.get("shards", []):
            if name not in keep and "/" not in name and (out / name).is_file():
                (out / name).unlink()


def write_dataset(
    out: str | Path,
    *,
    name: str,
    classes: Sequence[str],
    splits: Mapping[str, Iterable[Sample]],
    templates: Sequence[str] | None = None,
    source: str = "",
    image_format: str = "png",
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    totals: Mapping[str, int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write a complete shards folder (every split, then ``meta.json`` atomically) and return the meta.

    A caption of None is filled in from the first template and the class name. Refuses an ``out``
    that already holds ``meta.json`` unless ``overwrite``; with it, shards of the old folder that the
    new one does not reuse are removed once the new folder is complete.
    """
    out = Path(out)
    templates = list(templates or DEFAULT_TEMPLATES)
    check_templates(templates, out / META_NAME)
    if not classes:
        raise ValueError("classes must not be empty")
    old = _prepare_out(out, overwrite)
    entries = {}
    for split, samples in splits.items():
        captioned = _with_captions(samples, classes, templates[0])
        entries[split] = write_split(captioned, out, split, shard_size=shard_size, image_format=image_format,
                                     progress=progress, total=(totals or {}).get(split))
    for split, entry in entries.items():  # the index lands before meta.json: a complete folder has it
        index.write(index.build(out, split, entry["shards"], num_classes=len(classes)))
    meta = {"format": FORMAT, "name": name, "classes": list(classes), "templates": templates,
            "splits": entries, "image_format": image_format, "source": source, **(extra or {})}
    write_json_atomic(out / META_NAME, meta)
    _remove_stale(out, old, meta)
    return meta


def _with_captions(samples: Iterable[Sample], classes: Sequence[str], template: str) -> Iterator[Sample]:
    for image, label, caption in samples:
        label = int(label)
        if not 0 <= label < len(classes):
            raise ValueError(f"label {label} outside [0, {len(classes)})")
        yield image, label, template.format(classes[label]) if caption is None else caption

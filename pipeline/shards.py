"""Writing self-describing WebDataset shard folders.

A shards folder holds tar shards plus ``meta.json`` (class names in label order, prompt templates,
splits with shard names and sample counts). ``meta.json`` is written last and atomically, so a
folder without it is an incomplete write and a folder with it is complete::

    OUT/meta.json
    OUT/train-000000.tar ... OUT/test-000000.tar

Each sample has ``__key__`` (``<split>_<index>``, no dots), the encoded image under ``png`` or
``jpg``, ``cls`` (ASCII integer label) and an optional ``txt`` caption.
Reading lives in :mod:`pipeline.data`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

log = logging.getLogger(__name__)

FORMAT = "capt-shards/1"
META_NAME = "meta.json"
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")
_FORMATS = {"png": "PNG", "jpg": "JPEG"}
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


def split_entry(split: str, shards: Sequence[str], counts: Sequence[int]) -> dict:
    """The ``meta.json`` entry of one split: brace pattern, shard names, total and per-shard counts."""
    pattern = f"{split}-{{{0:06d}..{len(shards) - 1:06d}}}.tar"
    return {"pattern": pattern, "shards": list(shards), "count": int(sum(counts)),
            "shard_counts": [int(c) for c in counts]}


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


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
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
    _check_templates(templates, out / META_NAME)
    if not classes:
        raise ValueError("classes must not be empty")
    old = _prepare_out(out, overwrite)
    entries = {}
    for split, samples in splits.items():
        captioned = _with_captions(samples, classes, templates[0])
        entries[split] = write_split(captioned, out, split, shard_size=shard_size, image_format=image_format,
                                     progress=progress, total=(totals or {}).get(split))
    meta = {"format": FORMAT, "name": name, "classes": list(classes), "templates": templates,
            "splits": entries, "image_format": image_format, "source": source, **(extra or {})}
    _write_json_atomic(out / META_NAME, meta)
    _remove_stale(out, old, meta)
    return meta


def _with_captions(samples: Iterable[Sample], classes: Sequence[str], template: str) -> Iterator[Sample]:
    for image, label, caption in samples:
        label = int(label)
        if not 0 <= label < len(classes):
            raise ValueError(f"label {label} outside [0, {len(classes)})")
        yield image, label, template.format(classes[label]) if caption is None else caption


def _check_templates(templates: Sequence[str], where: Path | str) -> None:
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
    _check_templates(meta.get("templates") or [], where)
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
    if meta.get("image_format") not in _FORMATS:
        raise ValueError(f"{where}: image_format must be one of {sorted(_FORMATS)}")
    return meta


def _stratified(labels: Sequence[int], test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Per-class deterministic train/test split of sample indices; each split in a seeded random order."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    parts: dict[str, list[int]] = {"train": [], "test": []}
    for label in sorted(by_class):
        members = by_class[label]
        random.Random(f"{seed}:class:{label}").shuffle(members)
        n_test = round(len(members) * test_fraction)
        if test_fraction > 0 and len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        parts["test"] += members[:n_test]
        parts["train"] += members[n_test:]
    for split, members in parts.items():
        random.Random(f"{seed}:order:{split}").shuffle(members)  # mixed classes in every shard
    return {split: members for split, members in parts.items() if members}


def _image_files(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not src.is_dir():
        raise ValueError(f"{src}: source folder not found")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        found = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)
        if not found:
            log.warning("%s: class folder holds no image files", folder)
        files += [(p, label) for p in found]
    if not files:
        raise ValueError(f"{src}: no image files in class sub-folders (expected SRC/<class>/<images>)")
    return [f.name.replace("_", " ") for f in folders], files


def _read_files(files: Sequence[tuple[Path, int]], image_format: str,
                counter: dict[str, int]) -> Iterator[Sample]:
    pil_format = _FORMATS[image_format]
    for path, label in files:
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if image.format != pil_format:
                    data = encode_image(image, image_format)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            log.warning("skipping unreadable image %s (%s)", path, type(exc).__name__)
            counter["skipped_files"] += 1
            continue
        yield data, label, None


def shards_from_folder(
    src: str | Path,
    out: str | Path,
    *,
    test_fraction: float = 0.2,
    shard_size: int = 1000,
    seed: int = 0,
    image_format: str = "png",
    templates: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Turn an image-folder tree ``src/<class name>/<images>`` into a shards folder; return its meta.

    Classes are the sorted sub-folder names (``_`` becomes a space). The train/test split is
    stratified per class and deterministic in ``seed``. Unreadable images are skipped with a warning;
    their number is recorded in the meta as ``skipped_files``.
    """
    src = Path(src)
    _check_format(image_format)
    classes, files = _image_files(src)
    parts = _stratified([label for _, label in files], test_fraction, seed)
    # write_dataset reads `extra` after the splits are written, so it records the final count
    extra = {"skipped_files": 0}
    splits = {split: _read_files([files[i] for i in members], image_format, extra)
              for split, members in parts.items()}
    totals = {split: len(members) for split, members in parts.items()}
    meta = write_dataset(out, name=src.resolve().name, classes=classes, splits=splits, templates=templates,
                         source=f"folder:{src.name}", image_format=image_format, shard_size=shard_size,
                         overwrite=overwrite, progress=progress, totals=totals, extra=extra)
    if extra["skipped_files"]:
        log.warning("%s: skipped %d unreadable image files", src, extra["skipped_files"])
    return meta


def digits_images(image_size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images) as RGB PIL images and labels."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    digits = load_digits()
    grey = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    images = [Image.fromarray(g, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
              .convert("RGB") for g in grey]
    return images, digits.target.astype(np.int64)


def shards_from_digits(
    out: str | Path,
    *,
    test_fraction: float = 0.3,
    shard_size: int = 500,
    seed: int = 0,
    image_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Offline demo shards from scikit-learn's handwritten digits (real data, no download).

    Class names are the words "zero".."nine" so text prompts are meaningful.
    """
    images, labels = digits_images(image_size)
    parts = _stratified(labels.tolist(), test_fraction, seed)
    splits = {split: ((images[i], int(labels[i]), None) for i in members) for split, members in parts.items()}
    return write_dataset(out, name="digits", classes=list(DIGIT_NAMES), splits=splits,
                         templates=list(DIGIT_TEMPLATES), source="sklearn.datasets.load_digits",
                         image_format="png", shard_size=shard_size, overwrite=overwrite, progress=progress,
                         totals={split: len(members) for split, members in parts.items()},
                         extra={"image_size": image_size})

"""Shards folders from other sources: an image-folder tree (one folder, or one per split) and the
offline demo digits (scikit-learn's bundled handwritten digits)."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .meta import IMAGE_FORMATS as _FORMATS
from .write import Sample, _check_format, encode_image, write_dataset

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")


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


def shards_from_split_folders(
    folders: Mapping[str, str | Path],
    out: str | Path,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    image_format: str = "png",
    templates: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """One image-folder tree per split (e.g. ImageNet's own train and val): the official splits kept.

    Classes are the first split's sorted sub-folder names; every other split's class folders must be
    among them (labels follow the name, not the position). Each split is written in a seeded random order (mixed classes in every shard).
    """
    _check_format(image_format)
    if not folders:
        raise ValueError("no split folders given")
    classes: list[str] | None = None
    parts: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in folders.items():
        names, files = _image_files(Path(folder))
        if classes is None:
            classes = names
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(f"{folder}: class folder(s) {unknown[:3]} not among the {len(classes)} classes of "
                             f"{next(iter(folders.values()))}")
        position = {name: i for i, name in enumerate(classes)}
        parts[split] = [(path, position[names[label]]) for path, label in files]
        random.Random(f"{seed}:order:{split}").shuffle(parts[split])  # mixed classes in every shard
    extra = {"skipped_files": 0}
    splits = {split: _read_files(files, image_format, extra) for split, files in parts.items()}
    first = Path(next(iter(folders.values())))
    return write_dataset(out, name=first.resolve().parent.name or first.name, classes=classes, splits=splits,
                         templates=templates, source="folders:" + ",".join(f"{s}={Path(f).name}" for s, f in folders.items()),
                         image_format=image_format, shard_size=shard_size, overwrite=overwrite, progress=progress,
                         totals={s: len(f) for s, f in parts.items()}, extra=extra)


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

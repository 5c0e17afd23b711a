"""Adopt existing WebDataset tars in place: write ``meta.json`` and the per-split index beside them,
without rewriting (or even opening for writing) a byte of the tars.

Typical inputs: img2dataset output or the usual ImageNet WebDataset layout, samples of
``jpg`` / ``png`` / ``webp`` plus ``cls`` (an integer) or a ``json`` holding the label under
``label_key``. Splits are given as ``name=glob`` patterns over the folder's tar files (official
splits kept as they are), class names come from a file (one name per line, or a JSON list).
Everything is checked before anything is written (a sample without a label or image, a label
outside the class list, a class file of the wrong length: one line naming the shard or file);
the index files land first and ``meta.json`` last, so a failed adoption leaves the folder as it was.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import index as index_mod
from .meta import DEFAULT_TEMPLATES, FORMAT, META_NAME, check_templates, split_entry, write_json_atomic

log = logging.getLogger(__name__)


def read_class_file(path: str | Path) -> list[str]:
    """Class names in label order: a JSON list, or one name per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: class file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a JSON list of class names ({exc})") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: needs a non-empty list of class names")
    return names


def match_splits(root: Path, splits: Mapping[str, str]) -> dict[str, list[str]]:
    """``{split: glob}`` -> sorted tar file names per split; every split non-empty, no tar in two splits."""
    tars = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(".tar"))
    found: dict[str, list[str]] = {}
    for split, pattern in splits.items():
        found[split] = [t for t in tars if fnmatch.fnmatch(t, pattern)]
        if not found[split]:
            raise ValueError(f"{root}: no tar files match {pattern!r} (split {split!r})")
    seen: dict[str, str] = {}
    for split, names in found.items():
        for name in names:
            if name in seen:
                raise ValueError(f"{root / name}: matches both split {seen[name]!r} and {split!r}")
            seen[name] = split
    return found


def adopt(root: str | Path, *, classes_file: str | Path, splits: Mapping[str, str], name: str | None = None,
          label_key: str = "label", templates: Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """Index the tars of ``root`` in place (``splits``: split name -> glob of its tar files); returns the meta."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: folder not found")
    if (root / META_NAME).exists() and not overwrite:
        raise ValueError(f"{root}: already holds {META_NAME}; pass --overwrite to re-index")
    classes = read_class_file(classes_file)
    templates = list(templates or DEFAULT_TEMPLATES)
    check_templates(templates, "templates")
    indexes = {split: index_mod.build(root, split, names, num_classes=len(classes), label_key=label_key)
               for split, names in match_splits(root, splits).items()}
    top = max((int(ix.label.max()) for ix in indexes.values() if len(ix)), default=-1)
    if top + 1 != len(classes):
        raise ValueError(f"{classes_file}: {len(classes)} class names, but the labels go up to {top} "
                         f"({top + 1} classes): wrong class file?")
    kinds = {ext for ix in indexes.values() for ext in ix.ext}
    image_format = {"jpeg": "jpg"}.get(next(iter(kinds)), next(iter(kinds))) if len(kinds) == 1 else "mixed"
    for ix in indexes.values():
        index_mod.write(ix)
    entries = {split: split_entry(split, [s["name"] for s in ix.shards], [s["count"] for s in ix.shards])
               for split, ix in indexes.items()}
    for entry in entries.values():
        entry.pop("pattern")  # adopted names follow no capt pattern
    meta = {"format": FORMAT, "name": name or root.resolve().name, "classes": classes, "templates": templates,
            "splits": entries, "image_format": image_format, "source": "adopted", "adopted": True}
    write_json_atomic(root / META_NAME, meta)
    log.info("adopted %s: %s", root, {s: e["count"] for s, e in entries.items()})
    return meta


def reindex(root: str | Path) -> dict:
    """Rebuild the index of every split of a shards folder in place (after its shards were rewritten)."""
    from .meta import read_meta

    meta = read_meta(root)
    for split, entry in meta["splits"].items():
        index_mod.write(index_mod.build(root, split, entry["shards"], num_classes=len(meta["classes"])))
    return meta

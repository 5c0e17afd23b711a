"""The data plane: shards folders, their per-split index, subsets, streaming, augmentation.

Modules, by concept:

- :mod:`~pipeline.data.meta`: the ``capt-shards/1`` format (``meta.json``), reading and validating it;
- :mod:`~pipeline.data.write`: writing shards folders (``write_dataset``), each split indexed;
- :mod:`~pipeline.data.sources`: shards from an image-folder tree (one, or one per split) and the demo digits;
- :mod:`~pipeline.data.tario` / :mod:`~pipeline.data.index`: tar member offsets; the per-split index
  (write, read, refuse a stale one);
- :mod:`~pipeline.data.adopt`: index existing WebDataset tars in place (not a byte of them rewritten);
- :mod:`~pipeline.data.read`: one sample by its byte offsets; lazily read image arrays;
- :mod:`~pipeline.data.select`: class subsets, few-shot and test caps through the index only;
- :mod:`~pipeline.data.subsets`: content-addressed cached subsets, built once per search;
- :mod:`~pipeline.data.stream`: the streaming reader (``ShardDataset``, ``make_loader``, ``load_split``);
- :mod:`~pipeline.data.augment`: ``data.augment`` (none / flip / random resized crop + flip);
- :mod:`~pipeline.data.pixels`: decoding to the model's input size; the uint8 <-> float convention.

Docs: docs/DATA.md.
"""

from importlib import import_module
from typing import Any

from .meta import DEFAULT_TEMPLATES, META_NAME, read_meta, validate_meta

# The readers and writers need webdataset, which a bare GPU machine lacks: loaded on first use, so that
# `from pipeline.data import augment` (training) and `pipeline.data.pixels` (evaluation) import without it.
_LAZY = {**dict.fromkeys(("ShardDataset", "ShardSource", "base_new_split", "class_names", "few_shot_indices",
                          "load_split", "make_dataset", "make_loader", "shard_urls", "templates"), "stream"),
         "write_dataset": "write", "write_split": "write"}

__all__ = ["DEFAULT_TEMPLATES", "META_NAME", "read_meta", "validate_meta", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

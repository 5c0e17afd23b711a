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

from .meta import DEFAULT_TEMPLATES, META_NAME, read_meta, validate_meta
from .stream import (
                     ShardDataset,
                     ShardSource,
                     base_new_split,
                     class_names,
                     few_shot_indices,
                     load_split,
                     make_dataset,
                     make_loader,
                     shard_urls,
                     templates,
)
from .write import write_dataset, write_split

__all__ = ["DEFAULT_TEMPLATES", "META_NAME", "ShardDataset", "ShardSource", "base_new_split", "class_names",
           "few_shot_indices", "load_split", "make_dataset", "make_loader", "read_meta", "shard_urls",
           "templates", "validate_meta", "write_dataset", "write_split"]

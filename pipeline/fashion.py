"""Fashion-MNIST shards (``capt shards --demo fashion``) from the gzipped IDX files.

The files are the four official ones (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``), as Debian's package
``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``, the default) or as
Zalando's repository publishes them. ``--source DIR`` or ``$CAPT_FASHION_MNIST`` points elsewhere.

Splits: the official 60,000 / 10,000 train / test split; ``val_per_class`` images of every class are
carved from the official training set into a ``val`` split (deterministic in ``seed``) for tuning,
so the test split is never used to choose anything. Images are stored as they are (28x28 grey PNG);
the reader resizes them and repeats the channel.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts them
ENV_VAR = "CAPT_FASHION_MNIST"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# the official label order (Zalando's README); names made to read well inside a prompt
FASHION_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat",
                 "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a photo of a {}, a type of fashion item.",
)
_IDX_TYPES = {0x08: np.uint8}


def source_dir(source: str | Path | None = None) -> Path:
    """The folder of the IDX files: ``source``, else ``$CAPT_FASHION_MNIST``, else Debian's path."""
    return Path(source or os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def find_files(source: str | Path | None = None) -> dict[str, tuple[Path, Path]]:
    """The four IDX files by split; a missing one is a ValueError naming it and the package to install."""
    base = source_dir(source)
    found = {}
    for split, names in FILES.items():
        paths = tuple(base / name for name in names)
        for path in paths:
            if not path.is_file():
                raise ValueError(f"{path}: Fashion-MNIST file not found; install the Debian package "
                                 f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}) or point --source / "
                                 f"${ENV_VAR} at a folder holding {', '.join(n for f in FILES.values() for n in f)}")
        found[split] = paths
    return found


def read_idx(path: str | Path) -> np.ndarray:
    """One gzipped (or plain) IDX file as a numpy array (ubyte data only, as Fashion-MNIST uses)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable IDX file ({type(exc).__name__}: {exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=_IDX_TYPES[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: holds {body.size} values, its header says {dims}")
    return body.reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (the inverse of :func:`read_idx`; used by tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def load_fashion(source: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images (N, 28, 28) uint8, labels (N,)), "test": ...}`` from the IDX files."""
    out = {}
    for split, (images_path, labels_path) in find_files(source).items():
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{images_path}: {images.shape} images do not match {labels.shape} labels")
        if labels.size and int(labels.max()) >= len(FASHION_NAMES):
            raise ValueError(f"{labels_path}: label {int(labels.max())} outside [0, {len(FASHION_NAMES)})")
        out[split] = (images, labels.astype(np.int64))
    return out


def carve_val(labels: np.ndarray, per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): ``per_class`` of each class to val, seeded; both in a shuffled order."""
    train, val = [], []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label).tolist()
        random.Random(f"{seed}:val:{label}").shuffle(members)
        take = min(per_class, len(members) - 1) if per_class > 0 else 0
        val += members[:take]
        train += members[take:]
    random.Random(f"{seed}:order:train").shuffle(train)
    random.Random(f"{seed}:order:val").shuffle(val)
    return train, val


def shards_from_fashion(out: str | Path, *, source: str | Path | None = None, val_per_class: int = 100,
                        seed: int = 0, shard_size: int = 5000, limit: int | None = None,
                        overwrite: bool = False, progress: bool = True) -> dict:
    """Fashion-MNIST as a shards folder: train (official train minus val), val, test (official test).

    ``limit`` keeps only the first ``limit`` images of each official split (tests, quick looks).
    """
    from PIL import Image

    from .data.write import write_dataset  # the data layer's writer (one place for the shard format)

    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    data = load_fashion(source)
    if limit is not None:
        data = {k: (x[:limit], y[:limit]) for k, (x, y) in data.items()}
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    train_idx, val_idx = carve_val(train_y, val_per_class, seed)
    parts = {"train": (train_x, train_y, train_idx), "val": (train_x, train_y, val_idx),
             "test": (test_x, test_y, list(range(len(test_y))))}
    parts = {k: v for k, v in parts.items() if v[2]}

    def samples(x: np.ndarray, y: np.ndarray, idx: list[int]):
        return ((Image.fromarray(x[i], mode="L"), int(y[i]), None) for i in idx)

    return write_dataset(
        out, name="fashion-mnist", classes=list(FASHION_NAMES), templates=list(FASHION_TEMPLATES),
        splits={k: samples(*v) for k, v in parts.items()}, totals={k: len(v[2]) for k, v in parts.items()},
        source=f"Fashion-MNIST IDX files ({DEBIAN_PACKAGE})", image_format="png", shard_size=shard_size,
        overwrite=overwrite, progress=progress,
        extra={"val_from": "train", "val_per_class": val_per_class, "val_seed": seed,
               "official_split": {"train": int(len(train_y)), "test": int(len(test_y))}})

"""The offline demo assets: digits shards and a tiny CLIP trained on them, made once and cached.

Cache folder: ``$CAPT_CACHE`` or ``~/.cache/capt``. A file lock keeps concurrent callers (parallel
tests, several drivers) from building the same assets twice; files appear atomically.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
DEMO_MODEL = "capt-small"


@dataclass(frozen=True)
class DemoAssets:
    shards: Path  # digits shards folder (meta.json + tars)
    checkpoint: Path  # tiny CLIP state dict
    model_name: str
    zero_shot_acc: float | None


def cache_dir() -> Path:
    return Path(os.environ.get("CAPT_CACHE", Path.home() / ".cache" / "capt")).expanduser()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo(root: str | Path | None = None, *, progress: bool = True) -> DemoAssets:
    """Digits shards + tiny CLIP under ``root`` (default :func:`cache_dir`), built on first use."""
    from .data.sources import shards_from_digits
    from .tinyclip import TinyClipConfig, tiny_clip_from_shards

    base = Path(root) if root is not None else cache_dir()
    shards, ckpt, info = base / "digits", base / f"tiny-clip-{DEMO_MODEL}.pt", base / "tiny-clip.json"
    with _lock(base / ".demo.lock"):
        if not (shards / "meta.json").is_file():
            log.info("making digits demo shards in %s", shards)
            shards_from_digits(shards, overwrite=shards.exists(), progress=progress)
        if not ckpt.is_file():
            log.info("training the demo tiny CLIP (%s) on %s: a few minutes on 2 CPUs, once", DEMO_MODEL, shards)
            result = tiny_clip_from_shards(shards, ckpt, TinyClipConfig(model=DEMO_MODEL), progress=progress)
            info.write_text(json.dumps(result, indent=2))
    acc = json.loads(info.read_text()).get("zero_shot_acc") if info.is_file() else None
    return DemoAssets(shards=shards, checkpoint=ckpt, model_name=DEMO_MODEL, zero_shot_acc=acc)


def ensure_shifted(root: str | Path | None = None, *, progress: bool = False) -> Path:
    """A distribution-shifted copy of the digits test data (colours inverted: white background).

    The offline stand-in for "another dataset" in the miniature cross-dataset protocol: same class
    names, different image statistics. Only its test split is used for evaluation.
    """
    from PIL import ImageOps

    from .data.sources import DIGIT_NAMES, DIGIT_TEMPLATES, _stratified, digits_images
    from .data.write import write_dataset

    base = Path(root) if root is not None else cache_dir()
    out = base / "digits-inverted"
    with _lock(base / ".demo.lock"):
        if not (out / "meta.json").is_file():
            images, labels = digits_images(32)
            parts = _stratified(labels.tolist(), 0.3, 0)
            splits = {split: ((ImageOps.invert(images[i].convert("RGB")), int(labels[i]), None) for i in members)
                      for split, members in parts.items()}
            write_dataset(out, name="digits-inverted", classes=list(DIGIT_NAMES), splits=splits,
                          templates=list(DIGIT_TEMPLATES), source="sklearn.datasets.load_digits, inverted",
                          overwrite=out.exists(), progress=progress,
                          totals={split: len(m) for split, m in parts.items()})
    return out


BASE_MODEL = "capt-base"
# capt-base on Fashion-MNIST + digits: 600 steps of 128 pairs (half from each data set), about 4 s a step
# on one CPU thread (measured 2026-12-02, benchmarks/README.md); each Fashion-MNIST image seen about
# two-thirds of a time. The number of steps is what 2 CPUs can afford in well under an hour.
BASE_TRAINING = {"steps": 600, "batch_size": 128, "warmup": 60}


def ensure_fashion(root: str | Path | None = None, *, progress: bool = True) -> Path:
    """Fashion-MNIST shards (official split + `val`) under ``root``, made once from the IDX files
    (Debian's dataset-fashion-mnist; ``$CAPT_FASHION_MNIST`` points elsewhere)."""
    from .fashion import shards_from_fashion

    base = Path(root) if root is not None else cache_dir()
    out = base / "fashion-mnist"
    with _lock(base / ".demo.lock"):
        if not (out / "meta.json").is_file():
            log.info("making Fashion-MNIST shards in %s (about a minute, once)", out)
            shards_from_fashion(out, overwrite=out.exists(), progress=progress)
    return out


def ensure_base(root: str | Path | None = None, *, progress: bool = True, steps: int | None = None) -> DemoAssets:
    """The stronger demo CLIP (``capt-base``), trained from scratch on Fashion-MNIST and digits
    together, cached beside the digits one; ``zero_shot_acc`` is per data set ({name: accuracy})."""
    from .tinyclip import TinyClipConfig, tiny_clip_from_many

    base = Path(root) if root is not None else cache_dir()
    digits = ensure_demo(base, progress=progress).shards
    fashion = ensure_fashion(base, progress=progress)
    ckpt, info = base / f"tiny-clip-{BASE_MODEL}.pt", base / f"tiny-clip-{BASE_MODEL}.json"
    with _lock(base / ".base.lock"):
        if not ckpt.is_file():
            settings = {**BASE_TRAINING, **({"steps": steps} if steps is not None else {})}
            log.info("training the demo CLIP %s on Fashion-MNIST + digits (%d steps): long on CPUs, once",
                     BASE_MODEL, settings["steps"])
            result = tiny_clip_from_many([fashion, digits], ckpt, TinyClipConfig(model=BASE_MODEL, **settings),
                                         progress=progress)
            info.write_text(json.dumps(result, indent=2))
    acc = json.loads(info.read_text()).get("zero_shot_acc") if info.is_file() else None
    return DemoAssets(shards=fashion, checkpoint=ckpt, model_name=BASE_MODEL, zero_shot_acc=acc)


DEMO_DATASETS = {"demo": lambda: ensure_demo().shards, "demo:digits": lambda: ensure_demo().shards,
                 "demo:digits-inverted": ensure_shifted, "demo:fashion": ensure_fashion}
DEMO_MODELS = {DEMO_MODEL: lambda: ensure_demo().checkpoint, BASE_MODEL: lambda: ensure_base().checkpoint}


def resolve_demo(cfg):
    """``data.path: demo`` -> the cached digits shards, and a demo CLIP when no weights are set.

    ``demo``/``demo:digits``, ``demo:fashion`` and ``demo:digits-inverted`` (the shifted digits) name
    the cached demo data sets, as ``data.path`` or in ``data.cross_datasets``. With a demo data set,
    ``model.name`` ``capt-small`` (digits) or ``capt-base`` (Fashion-MNIST + digits) without weights
    gets the cached demo CLIP of that name. Any other path is returned unchanged; the demo is only
    ever used when asked for by name.
    """
    over: dict = {}
    if any(p in DEMO_DATASETS for p in cfg.data.cross_datasets):
        over["data.cross_datasets"] = [str(DEMO_DATASETS[p]()) if p in DEMO_DATASETS else p
                                       for p in cfg.data.cross_datasets]
    if cfg.data.path in DEMO_DATASETS:
        over["data.path"] = str(DEMO_DATASETS[cfg.data.path]())
        if cfg.model.name in DEMO_MODELS and cfg.model.checkpoint is None and not cfg.model.pretrained:
            over["model.checkpoint"] = str(DEMO_MODELS[cfg.model.name]())
    return cfg.replace(**over) if over else cfg

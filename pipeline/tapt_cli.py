"""``capt tapt-stats`` and ``capt tapt``: the TAPT test-time defence from the command line.

Register with ``tapt_cli.register(subparsers)``; each subcommand sets ``func`` (``args -> int``).

    capt tapt-stats --run runs/advvlp --data shards/imagenet --out runs/advvlp/tapt/stats.pt \\
        [--clean-run runs/clean] [--layers 0-7] [--limit 2000] [--eps 1] [--attack-steps 10]
    capt tapt --run runs/advvlp --data shards/caltech101 --stats runs/advvlp/tapt/stats.pt \\
        --out runs/advvlp/tapt/caltech101 [--views 64] [--attack pgd --attack-steps 100] [--limit 500]

Both write ``OUT/summary.json`` (for ``tapt-stats``, OUT is the folder of the statistics file, and
a ``summary.json`` left there by another command is never overwritten). ``tapt`` reports
``clean_acc``, ``tapt_clean_acc``, ``robust_acc``, ``tapt_robust_acc`` and ``adaptive_robust_acc``
(see :func:`pipeline.tapt.evaluate_tapt`). Without ``--stats``, statistics are computed first from
the run's own training shards (its ``data.path``; ``--stats-limit`` images), with a log line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .attacks import build_attack
from .config import ConfigError
from .runs import load_run, write_summary
from .tapt import PUBLISHED_WEIGHT, RESETS, TaptConfig, TaptEvalConfig, check_tunable, evaluate_tapt
from .tapt_stats import ADV_IMAGES, compute_stats, load_stats, parse_layers, resolve_layers, save_stats

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``tapt-stats`` and ``tapt`` to an argparse subparsers object."""
    s = subparsers.add_parser("tapt-stats", help="TAPT reference token statistics of a public dataset")
    s.add_argument("--run", required=True, help="adversarially trained run folder (capt train)")
    s.add_argument("--data", required=True, help="public dataset shards folder")
    s.add_argument("--out", required=True, help="statistics file to write (.pt)")
    s.add_argument("--clean-run", help="clean-trained run for the clean statistics "
                   "(default: the --run prompts on clean images)")
    s.add_argument("--split", default="train")
    s.add_argument("--eps", type=float, help="PGD eps for the adversarial statistics, 1/255 units "
                   "(default: the run's training eps)")
    s.add_argument("--attack-steps", type=int, default=10)
    _adv_images(s)
    _common(s, batch_size=32)
    s.set_defaults(func=cmd_tapt_stats)

    t = subparsers.add_parser("tapt", help="evaluate the TAPT test-time defence (clean, transfer, adaptive)")
    t.add_argument("--run", required=True, help="adversarially trained run folder (capt train)")
    t.add_argument("--data", required=True, help="test dataset shards folder")
    t.add_argument("--out", required=True, help="output folder (summary.json)")
    t.add_argument("--stats", help="statistics file from `capt tapt-stats`")
    t.add_argument("--split", default="test")
    t.add_argument("--views", type=int, default=64)
    t.add_argument("--tau", type=float, default=0.1)
    t.add_argument("--rounding", choices=("floor", "ceil"), default="floor")
    t.add_argument("--steps", type=int, default=1)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--weight", type=float, default=PUBLISHED_WEIGHT)
    t.add_argument("--alpha", type=float, default=0.5)
    t.add_argument("--eps", type=float, default=1.0, help="attack eps, 1/255 units")
    t.add_argument("--attack", choices=("pgd", "autoattack"), default="pgd")
    t.add_argument("--attack-steps", type=int, default=100)
    t.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--adaptive-steps", type=int, default=10)
    t.add_argument("--eot", type=int, default=1, help="view draws per adaptive step")
    t.add_argument("--stats-limit", type=int, default=256)
    t.add_argument("--reset", choices=RESETS, default="trained",
                   help="per-image restart of the prompts: trained (ours: all prompts from their trained values) "
                        "| official (the released code: layer-0 text context trained, every other prompt from its "
                        "random initial value)")
    _adv_images(t, what="(without --stats) ")
    t.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (faster; not bit-exact)")
    _common(t, batch_size=16)
    t.set_defaults(func=cmd_tapt)


def _adv_images(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--adv-images", choices=ADV_IMAGES, default="pgd",
                   help=f"{what}images of the adv statistics: pgd (ours: PGD against the run) | clean (the "
                        "official code: clean training images through the adversarially trained prompts)")


def _common(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    p.add_argument("--layers", type=parse_layers, help="vision blocks to align, e.g. 0-7 (default: 0-7, "
                   "clipped to the encoder)")
    p.add_argument("--limit", type=int, help="use at most N images (a seeded random sample)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


# ----------------------------------------------------------------------------- helpers


def _device(name: str) -> torch.device:
    from .train import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device: {name!r}: {str(exc).splitlines()[0]}") from None


def load_images(path: str, split: str, image_size: int, *, limit: int | None,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Images, labels, class names and templates of a shards split (``limit``: a seeded sample). A
    whole local split is a LazyImages (pipeline/data/read.py): evaluated a batch at a time."""
    from . import data

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: {limit} must be >= 1")
    try:
        source = data.ShardSource.open(path)
        names, templates = data.class_names(source), data.templates(source)
        if limit is None and not data.stream._is_remote(source.root):  # read a batch at a time (bounded memory)
            from .data import subsets
            from .data.read import LazyImages

            selection = subsets.selection_of(source, subsets.source_index(source, split),
                                             subsets.SubsetSpec(split, None, None, seed, image_size))
            if not len(selection):
                raise ValueError(f"{path}: split {split!r} yielded no samples")
            x, y = LazyImages(selection, image_size), torch.from_numpy(selection.labels.copy())
        elif limit is None:
            x, y, _ = data.load_split(source, split, image_size=image_size)
        else:  # stream a shuffled sample instead of decoding the whole split
            stream = data.make_dataset(source, split=split, image_size=image_size, seed=seed,
                                       shuffle_buffer=max(4 * limit, 1000))
            pairs = list(itertools.islice(iter(stream), limit))
            if not pairs:
                raise ValueError(f"{path}: split {split!r} yielded no samples")
            x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"--data: {(str(exc).strip() or type(exc).__name__).splitlines()[0]}") from None
    return x, y, names, templates


def _load(run: str, data: str, split: str, limit: int | None, seed: int, device: torch.device):
    cfg, model = load_run(run, device)
    check_tunable(model)
    x, y, names, templates = load_images(data, split, model.image_size, limit=limit, seed=seed)
    model.set_classes(names, templates)
    return cfg, model, x, y


def _summary_dir(out_file: Path) -> Path:
    """Folder for tapt-stats' summary.json; refuse to overwrite another command's summary."""
    folder = out_file.parent
    existing = folder / "summary.json"
    if existing.is_file():
        try:
            command = json.loads(existing.read_text()).get("command")
        except (OSError, ValueError):
            command = None
        if command != "tapt-stats":
            raise ConfigError(f"--out: {folder} already holds a summary.json of another command; "
                              "write the statistics file into its own folder")
    return folder


# ----------------------------------------------------------------------------- commands


def cmd_tapt_stats(args: argparse.Namespace) -> int:
    """Compute and save the adv / clean reference statistics; write summary.json beside them."""
    out = Path(args.out)
    summary_dir = _summary_dir(out)
    device = _device(args.device)
    cfg, model, x, y = _load(args.run, args.data, args.split, args.limit, args.seed, device)
    layers = resolve_layers(args.layers, model.n_vision_layers)
    clean = None
    if args.clean_run:
        _, clean = load_run(args.clean_run, device)
        clean.set_classes(model.classnames, model.templates)
    eps = cfg.attack.eps if args.eps is None else args.eps
    if not 0 <= eps <= 255 or args.attack_steps < 0 or args.batch_size < 1:
        raise ConfigError("tapt-stats: --eps must be in [0, 255], --attack-steps >= 0, --batch-size >= 1")
    attack = build_attack("pgd", eps=eps / 255.0, steps=args.attack_steps, module=model, seed=args.seed)
    stats = compute_stats(model, x, y, layers, attack=attack, clean_model=clean, batch_size=args.batch_size,
                          device=device, progress=True, adv_images=args.adv_images)
    save_stats(out, stats)
    settings = {"run": args.run, "clean_run": args.clean_run, "data": args.data, "split": args.split,
                "layers": list(layers), "limit": args.limit, "eps": eps, "attack_steps": args.attack_steps,
                "clean_source": "clean_run" if clean is not None else "run prompts on clean images",
                "adv_images": args.adv_images,
                "design": model.cfg.design, "model": cfg.model.name, "out": str(out)}
    metrics = {"n_images": stats.n_images, "tokens": stats.adv_mean[0].shape[0],
               "width": stats.adv_mean[0].shape[1], "n_layers": len(layers)}
    write_summary(summary_dir, command="tapt-stats", config=settings, metrics=metrics)
    log.info("tapt-stats: %d images, layers %s -> %s", stats.n_images, list(layers), out)
    return 0


def _fallback_stats(cfg, model, layers, args, device):
    """Statistics from the run's own training shards, when no --stats is given."""
    if not cfg.data.path or not Path(cfg.data.path).exists():
        raise ConfigError("--stats: not given, and the run's training shards (data.path="
                          f"{cfg.data.path!r}) are not available; make statistics with `capt tapt-stats`")
    log.info("tapt: no --stats; computing them on %d images of %s", args.stats_limit, cfg.data.path)
    x, y, names, templates = load_images(cfg.data.path, cfg.data.train_split, model.image_size,
                                         limit=args.stats_limit, seed=args.seed)
    eval_names, eval_templates = model.classnames, model.templates
    model.set_classes(names, templates)
    try:
        attack = build_attack("pgd", eps=cfg.attack.eps_px, steps=10, module=model, seed=args.seed)
        return compute_stats(model, x, y, layers, attack=attack, batch_size=args.batch_size, device=device,
                             progress=True, adv_images=args.adv_images)
    finally:
        model.set_classes(eval_names, eval_templates)


def cmd_tapt(args: argparse.Namespace) -> int:
    """Evaluate TAPT on a test split; write OUT/summary.json."""
    tapt_cfg = TaptConfig(views=args.views, tau=args.tau, rounding=args.rounding, steps=args.steps, lr=args.lr,
                          weight=args.weight, alpha=args.alpha, layers=args.layers, seed=args.seed,
                          reset=args.reset)
    ev = TaptEvalConfig(eps=args.eps, attack=args.attack, attack_steps=args.attack_steps, adaptive=args.adaptive,
                        adaptive_steps=args.adaptive_steps, eot=args.eot, batch_size=args.batch_size,
                        seed=args.seed)
    device = _device(args.device)
    cfg, model, x, y = _load(args.run, args.data, args.split, args.limit, args.seed, device)
    layers = resolve_layers(args.layers, model.n_vision_layers)
    if tapt_cfg.weight == 0:
        stats = None
    elif args.stats:
        stats = load_stats(args.stats)
    else:
        stats = _fallback_stats(cfg, model, layers, args, device)
    if stats is not None and args.layers is None:  # default: the published layers the file holds
        layers = tuple(i for i in layers if i in stats.layers) or layers
        tapt_cfg = dataclasses.replace(tapt_cfg, layers=layers)
    amp = args.amp and device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        metrics = evaluate_tapt(model, x, y, stats, tapt_cfg, ev, device=device, progress=True)
    settings = {"run": args.run, "data": args.data, "split": args.split, "stats": args.stats,
                "adv_images": None if args.stats else args.adv_images,
                "limit": args.limit, "amp": amp, "design": model.cfg.design, "model": cfg.model.name, "device": str(device),
                "tapt": {**dataclasses.asdict(tapt_cfg), "layers": list(layers), "keep": tapt_cfg.keep},
                "eval": dataclasses.asdict(ev)}
    path = write_summary(args.out, command="tapt", config=settings, metrics=metrics)
    log.info("tapt: %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith("_acc")))
    log.info("tapt: wrote %s", path)
    return 0

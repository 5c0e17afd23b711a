"""The ``capt`` subcommands for data, the demo model, training and evaluation.

Each command resolves its inputs up front (a bad input ends with one line naming the culprit,
before anything is written), does its work with progress on stderr, and writes
``OUT/summary.json``; its last stdout line says where.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config
from .runs import write_summary

log = logging.getLogger(__name__)


def cmd_shards(args: argparse.Namespace) -> int:
    from .data import adopt
    from .data import sources as shards

    given = [name for name in ("from_folder", "demo", "adopt", "index") if getattr(args, name)]
    if len(given) != 1:
        raise ConfigError("capt shards: give exactly one of --from-folder, --demo digits|fashion, --adopt DIR, "
                          "--index DIR")
    if (args.from_folder or args.demo) and not args.out:
        raise ConfigError("capt shards: --out is required with --from-folder and --demo")
    t0 = time.perf_counter()
    where = Path(args.out or args.adopt or args.index) / "meta.json"
    if args.demo == "fashion":
        from .fashion import shards_from_fashion

        meta = shards_from_fashion(args.out, source=getattr(args, "source", None), seed=args.seed,
                                   val_per_class=getattr(args, "val_per_class", 100),
                                   limit=getattr(args, "limit", None), shard_size=args.shard_size or 5000,
                                   overwrite=args.overwrite)
    elif args.demo:
        meta = shards.shards_from_digits(args.out, test_fraction=args.test_fraction or 0.3, seed=args.seed,
                                         shard_size=args.shard_size or 500, overwrite=args.overwrite)
    elif args.adopt:
        if not args.classes or not args.split:
            raise ConfigError("capt shards --adopt: needs --classes FILE and at least one --split SPLIT=GLOB")
        meta = adopt.adopt(args.adopt, classes_file=args.classes, splits=_pairs(args.split, "--split"),
                           label_key=args.label_key, overwrite=args.overwrite)
    elif args.index:
        meta = adopt.reindex(args.index)
    elif all("=" not in item for item in args.from_folder) and len(args.from_folder) == 1:
        meta = shards.shards_from_folder(args.from_folder[0], args.out, test_fraction=args.test_fraction or 0.2,
                                         seed=args.seed, shard_size=args.shard_size or 1000,
                                         image_format=args.image_format, overwrite=args.overwrite)
    else:
        meta = shards.shards_from_split_folders(_pairs(args.from_folder, "--from-folder"), args.out, seed=args.seed,
                                                shard_size=args.shard_size or 1000,
                                                image_format=args.image_format, overwrite=args.overwrite)
    counts = {f"{k}_samples": v["count"] for k, v in meta["splits"].items()}
    print(f"indexed {sum(counts.values())} samples ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
          f"{len(meta['classes'])} classes -> {where} ({time.perf_counter() - t0:.1f}s)")
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        split, sep, value = item.partition("=")
        if not sep or not split or not value:
            raise ConfigError(f"{flag} {item!r}: expected SPLIT=VALUE")
        if split in out:
            raise ConfigError(f"{flag}: split {split!r} given twice")
        out[split] = value
    return out


def cmd_tiny_clip(args: argparse.Namespace) -> int:
    from .tinyclip import TinyClipConfig, tiny_clip_from_many, tiny_clip_from_shards

    cfg = TinyClipConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    data = args.data if isinstance(args.data, list) else [args.data]
    if len(data) == 1:
        result = tiny_clip_from_shards(data[0], args.out, cfg)
        print(f"tiny CLIP {cfg.model}: zero-shot test accuracy {result['zero_shot_acc']:.3f} -> {args.out}")
    else:
        result = tiny_clip_from_many(data, args.out, cfg)
        accs = ", ".join(f"{k} {v:.3f}" for k, v in result["zero_shot_acc"].items())
        print(f"tiny CLIP {cfg.model}: zero-shot test accuracy {accs} -> {args.out}")
    print(f"use it with: --set model.name={cfg.model} --set model.checkpoint={Path(args.out).resolve()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .clip import image_size_of
    from .demo import resolve_demo
    from .protocol import final_evaluation
    from .task import load_task
    from .train import resolve_device, train

    cfg = resolve_demo(load_config(args.config, args.set))
    out = Path(args.out)
    device = resolve_device(cfg.run.device)
    size = image_size_of(cfg.model.name)
    task = load_task(cfg.data, size)
    t0 = time.perf_counter()
    result = train(cfg, task, out_dir=out, device=device)  # train() logs each epoch
    train_s = time.perf_counter() - t0
    print("final evaluation:", ", ".join(cfg.eval.final_attacks) or "clean only", flush=True)
    metrics = final_evaluation(cfg, result.model, task, device, image_size=size)
    metrics["train_seconds"] = train_s
    path = write_summary(out, command="train", config=cfg.to_dict(), metrics=metrics,
                         history=result.history, data=task.stats)
    _print_metrics(metrics)
    print(f"summary: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import label_space
    from .protocol import cross_dataset, eval_settings
    from .runs import load_run
    from .task import load_task
    from .train import resolve_device

    device = resolve_device(args.device)
    cfg, model = load_run(args.run, device)
    over = {"eval.final_attacks": args.attack} if args.attack else {}
    if args.eps:
        over["eval.final_eps"] = args.eps
    if args.autoattack_limit is not None:
        over["eval.autoattack_limit"] = args.autoattack_limit
    over.update({"data.path": str(args.data), "data.test_limit": args.limit, "data.shots": 1})
    cfg = cfg.replace(**over)
    kw = eval_settings(cfg, device)
    metrics: dict[str, float] = {}
    if args.base_to_new:
        metrics.update(_base_to_new(cfg, model, kw))
    else:
        task = load_task(cfg.data.__class__(**{**cfg.data.__dict__, "classes": "all"}), model.image_size)
        with label_space(model, task.classnames, task.templates):
            metrics.update(_final(model, task, kw))
    for path in args.cross or []:
        metrics.update(cross_dataset(cfg, model, path, model.image_size, **kw))
    out_path = write_summary(args.out, command="eval", config=cfg.to_dict(), metrics=metrics,
                             run=str(Path(args.run).resolve()))
    _print_metrics(metrics)
    print(f"summary: {out_path}")
    return 0


def _final(model, task, kw: dict[str, Any], prefix: str = "") -> dict[str, float]:
    from .evaluate import final_metrics

    m = final_metrics(model, task.test_x, task.test_y, prefix=prefix, **kw)
    if kw["attacks"]:
        m[f"{prefix}robust_acc"] = m[f"{prefix}{kw['attacks'][0]}_acc"]
    return m


def _base_to_new(cfg, model, kw: dict[str, Any]) -> dict[str, float]:
    from .evaluate import harmonic_mean, label_space
    from .task import load_task

    out: dict[str, float] = {}
    for part in ("base", "new"):
        task = load_task(cfg.data, model.image_size, classes=part)
        with label_space(model, task.classnames, task.templates):
            out.update(_final(model, task, kw, prefix=f"{part}_"))
    for key in [k.removeprefix("base_") for k in out if k.startswith("base_")]:
        out[f"hm_{key}"] = harmonic_mean(out[f"base_{key}"], out[f"new_{key}"])
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """The offline demo end to end: shards + tiny CLIP (cached), zero-shot eval, CAPT training."""
    from .demo import ensure_demo

    assets = ensure_demo()
    print(f"demo data: {assets.shards}\ndemo CLIP: {assets.checkpoint} (zero-shot acc {assets.zero_shot_acc})")
    out = Path(args.out)
    for name in ("zeroshot", "capt"):
        ns = argparse.Namespace(config=Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml",
                                set=list(args.set), out=out / name)
        if not ns.config.is_file():
            raise ConfigError(f"demo config missing: {ns.config}")
        print(f"== {name}", flush=True)
        cmd_train(ns)
    return 0


def _print_metrics(metrics: dict[str, float]) -> None:
    keys = sorted(k for k in metrics if "_acc" in k and metrics[k] is not None)  # _acc and _acc_eps<E>
    print("  ".join(f"{k} {metrics[k]:.3f}" for k in keys))

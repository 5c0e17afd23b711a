"""TAPT throughput: batched (B images tuned at once) vs the one-by-one reference loop.

Run (CPU, tiny model, about a minute on a laptop core):

    python benchmarks/bench_tapt.py --out benchmarks/results/bench_tapt.json

GPU figures (ms per image at the published 64 views; random ViT-B-16 weights, same cost as trained):

    python benchmarks/bench_tapt.py --model ViT-B-16 --device cuda --classes 100 --images 64 \\
        --views 64 --tau 0.1 --batch-sizes 1 8 16 --out benchmarks/results/bench_tapt_cuda.json

"one-by-one" is :func:`pipeline.tapt.tune_sequential`, the official code's loop (all views forward
with gradient, ``torch.optim.AdamW``, one image at a time). "batched B" is :class:`pipeline.tapt.Tapt`
on B images at once: a no-grad view-selection pass, then forward + backward of the kept views only,
per-image prompt copies and one functional AdamW. Both give the same predictions (tests/test_tapt.py).
The time covers views, selection, tuning and the final prediction; not data loading.
"bound: N views fwd" times only making the views and the no-grad forward of all N of them (the
confident-view selection), which every exact TAPT must do: the ceiling of any speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

import open_clip
import torch
from common import record  # puts the repo on sys.path

from pipeline.clip import load_clip, register_model_configs  # noqa: E402
from pipeline.config import ModelConfig, PromptConfig  # noqa: E402
from pipeline.prompts import PromptedCLIP  # noqa: E402
from pipeline.tapt import Tapt, TaptConfig, tune_sequential  # noqa: E402
from pipeline.tapt_stats import TaptStats, make_views, resolve_layers, token_shape, view_generators  # noqa: E402

log = logging.getLogger("bench_tapt")


def build(model_name: str, design: str, depth: int, classes: int, device: torch.device) -> PromptedCLIP:
    torch.manual_seed(0)
    loaded = load_clip(ModelConfig(name=model_name), device)
    names = [f"class {i}" for i in range(classes)]
    return PromptedCLIP(loaded, PromptConfig(design=design, depth=depth), names, ["a photo of a {}."]).to(device)


def fake_stats(model: PromptedCLIP) -> TaptStats:
    """Reference statistics of the right shape (their values do not change the cost)."""
    layers = resolve_layers(None, model.n_vision_layers)
    t, d = token_shape(model)
    g = torch.Generator().manual_seed(0)
    mk = [[torch.randn(t, d, generator=g) for _ in layers] for _ in range(4)]
    return TaptStats(layers, mk[0], [m.abs() for m in mk[1]], mk[2], [m.abs() for m in mk[3]])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, images: torch.Tensor, batch: int | None, device: torch.device, repeats: int) -> float:
    """Best-of-``repeats`` seconds to run TAPT on all ``images`` (``batch`` None: one-by-one)."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step = batch or len(images)
        for i in range(0, len(images), step):
            fn(images[i:i + step], range(i, i + min(step, len(images) - i)))
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure(model: PromptedCLIP, cfg: TaptConfig, images: torch.Tensor, batch_sizes: list[int],
            device: torch.device, repeats: int, sequential: bool) -> list[dict]:
    stats = fake_stats(model)
    rows = []
    runs: list[tuple[str, int | None]] = ([("one-by-one", None)] if sequential else [])
    runs += [(f"batched B={b}", b) for b in batch_sizes]
    for name, b in runs:
        if b is None:
            fn = lambda x, idx: tune_sequential(model, x, stats, cfg, idx)  # noqa: E731
        else:
            tapt = Tapt(model, stats, cfg)
            fn = lambda x, idx, tapt=tapt: tapt(x, idx)  # noqa: E731
        fn(images[:max(b or 1, 1)], range(max(b or 1, 1)))  # warm-up
        seconds = timed(fn, images, b, device, repeats)
        rows.append({"mode": name, "batch": b or 1, "views": cfg.views, "keep": cfg.keep,
                     "images": len(images), "seconds": round(seconds, 4),
                     "images_per_s": round(len(images) / seconds, 2),
                     "ms_per_image": round(1000 * seconds / len(images), 2)})
    bound = Tapt(model, stats, cfg)  # the floor of any exact TAPT: the no-grad forward of all N views

    def views_forward(x: torch.Tensor, idx: range) -> None:
        bound.select(make_views(x, cfg.views, view_generators(cfg.seed, idx)), bound.initial(len(x)))

    seconds = timed(views_forward, images, max(batch_sizes), device, repeats)
    rows.append({"mode": "bound: N views fwd", "batch": max(batch_sizes), "views": cfg.views, "keep": cfg.keep,
                 "images": len(images), "seconds": round(seconds, 4),
                 "images_per_s": round(len(images) / seconds, 2),
                 "ms_per_image": round(1000 * seconds / len(images), 2)})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = round(row["images_per_s"] / base, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="capt-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--design", default="ivlp")
    p.add_argument("--depth", type=int, default=None, help="prompt depth (default: min(9, encoder layers))")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--settings", nargs="+", default=["16:0.125", "64:0.1"], help="views:tau pairs")
    p.add_argument("--views", type=int, help="shortcut: one setting with this many views (and --tau)")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--no-sequential", action="store_true", help="skip the one-by-one loop (slow on big models)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_tapt.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # open_clip logs to the root logger
    log.setLevel(logging.INFO)
    logging.getLogger("pipeline.clip").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = [(args.views, args.tau)] if args.views else [(int(v), float(t)) for v, t in
                                                            (s.split(":") for s in args.settings)]
    register_model_configs()
    depth = args.depth or min(9, open_clip.get_model_config(args.model)["vision_cfg"]["layers"])
    model = build(args.model, args.design, depth, args.classes, device)
    size = model.image_size
    images = torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    amp = args.amp and device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        for views, tau in settings:
            cfg = TaptConfig(views=views, tau=tau)
            rows += measure(model, cfg, images, args.batch_sizes, device, args.repeats, not args.no_sequential)
    log.info("%-16s %6s %5s %5s %10s %10s %8s", "mode", "views", "keep", "B", "images/s", "ms/image", "speedup")
    for r in rows:
        log.info("%-16s %6d %5d %5d %10.2f %10.2f %8.2f", r["mode"], r["views"], r["keep"], r["batch"],
                 r["images_per_s"], r["ms_per_image"], r["speedup"])
    setup = {"model": args.model, "device": str(device), "design": args.design, "depth": depth,
             "classes": args.classes, "images": args.images, "repeats": args.repeats, "threads": args.threads,
             "amp": amp, "clock": "wall time" + (" (synchronized)" if device.type == "cuda" else "")}
    record(args.out, device, setup, rows)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

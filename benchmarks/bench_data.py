"""Data at real scale: a trial's data setup against the size of the split, before and after indexes
and subsets; the one-off subset build; streaming training throughput; streaming peak memory.

Run (about 10 min on 2 busy cores; makes synthetic 224 px JPEG shards in --work, kept for reruns):

    python benchmarks/bench_data.py --old-code /path/to/checkout-before-indexes \\
        --out benchmarks/results/bench_data.json

``--old-code`` is a checkout of the code before this change (e.g. ``git worktree add /tmp/old
<commit>``): "today's path" is measured by running its ``load_task`` on the same shards (the index
files do not disturb it). Two folders with the same classes, 4x apart in images per class, both
with the same few-shot setting (``--classes`` x ``--shots``, ``--test-limit``), so every trial uses
the same number of samples. Each trial's data setup runs in a fresh process (``load_task`` as a
trial calls it) and reports wall and CPU seconds, bytes read (``rchar`` of /proc/self/io: reads
served by the page cache count too), and peak resident memory (the process's ``ru_maxrss``, torch
and the pipeline imported: the import baseline is reported beside it). Variants, interleaved in
rounds: ``old`` (before), ``index`` (selection through the index, the chosen samples read by
offset from the source, no cache), ``subset`` (what a search's trial does: the cached subset, built
once per search, read; the one-off build is reported separately).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import class_names, record  # noqa: E402
from pipeline.data.write import write_dataset  # noqa: E402

log = logging.getLogger("bench_data")
ROOT = Path(__file__).resolve().parents[1]

# one trial's data setup in a fresh process: argv[1] = code root, argv[2] = JSON arguments
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
args = json.loads(sys.argv[2])
import torch
from pipeline.config import DataConfig
from pipeline.task import load_task

def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

base, r0, t0, c0 = rss_mb(), rchar(), time.perf_counter(), time.process_time()
if args.get("prepare"):
    from pipeline.task import prepare_subsets
    prepare_subsets(DataConfig(**args["data"]), args["image_size"])
    n_train = n_test = None
else:
    task = load_task(DataConfig(**args["data"]), args["image_size"])
    n_train, n_test = len(task.train_y), len(task.test_y)
    if args.get("epoch"):  # one streamed epoch of batches (full data)
        n = sum(len(y) for _, y in task.batches(64, epoch=0, seed=0))
        assert n == n_train, (n, n_train)
out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
       "read_mb": (rchar() - r0) / 2**20, "peak_rss_mb": rss_mb(), "import_rss_mb": base,
       "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
       "train": n_train, "test": n_test}
print("RESULT " + json.dumps(out))
"""


def _image(rng: np.random.Generator, label: int) -> bytes:
    """A 224 px JPEG: a smooth per-class colour field plus noise (compresses like a photo, roughly)."""
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 224.0
    base = np.stack([np.sin(3 * xx + label), np.cos(2 * yy + label / 7), np.sin(xx * yy * 5 + label / 3)], -1)
    noise = rng.normal(0, 0.25, (224, 224, 3))
    pixels = np.clip((base * 0.5 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(out: Path, classes: int, train_per_class: int, test_per_class: int) -> Path:
    """Synthetic JPEG shards (cached: rebuilt only when missing)."""
    if (out / "meta.json").is_file():
        return out
    rng = np.random.default_rng(0)

    def samples(per_class: int):
        order = [c for c in range(classes) for _ in range(per_class)]
        rng.shuffle(order)
        for label in order:
            yield _image(rng, label), label, None

    write_dataset(out, name=out.name, classes=class_names(classes),
                  splits={"train": samples(train_per_class), "test": samples(test_per_class)},
                  image_format="jpg", shard_size=500, progress=False)
    return out


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.tar")) / 2**20


def child(code: Path, data: dict[str, Any], image_size: int, **extra: Any) -> dict[str, Any]:
    args = json.dumps({"data": data, "image_size": image_size, **extra})
    proc = subprocess.run([sys.executable, "-c", CHILD, str(code), args], capture_output=True, text=True,
                          timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(line[len("RESULT "):])


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    out = {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}
    out.update({k: rows[0][k] for k in rows[0] if k not in keys}, runs=len(rows))
    return out


def setup_costs(args: argparse.Namespace, folders: dict[str, Path], cache: Path) -> dict[str, Any]:
    """Per-trial data setup, each size x variant, interleaved over ``args.rounds`` rounds."""
    base = {"shots": args.shots, "test_limit": args.test_limit, "seed": 0}
    results: dict[str, Any] = {"build": {}}
    for size, folder in folders.items():  # the one-off subset build (once per search)
        data = {**base, "path": str(folder), "cache": str(cache / size)}
        results["build"][size] = child(ROOT, data, args.image_size, prepare=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for size, folder in folders.items():
            variants = {"index": (ROOT, {**base, "path": str(folder)}),
                        "subset": (ROOT, {**base, "path": str(folder), "cache": str(cache / size)})}
            if args.old_code:
                variants["old"] = (args.old_code, {**base, "path": str(folder)})
            for name, (code, data) in variants.items():
                runs.setdefault((size, name), []).append(child(code, data, args.image_size))
    results["trial"] = {f"{size}/{name}": _median(rows) for (size, name), rows in runs.items()}
    return results


def streaming_memory(args: argparse.Namespace, folders: dict[str, Path]) -> dict[str, Any]:
    """Peak memory of one streamed full-data epoch (all train images, every class) at both sizes: the
    trial process and its largest DataLoader worker (``read_mb`` counts the trial process only; the
    workers read the images)."""
    out = {}
    for size, folder in folders.items():
        data = {"path": str(folder), "shots": None, "test_limit": args.test_limit, "stream": "always",
                "workers": 2, "seed": 0}
        out[size] = child(ROOT, data, args.image_size, epoch=True)
    return out


def train_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Training images/s on the digits demo (full train split), in memory vs streamed, interleaved."""
    from pipeline.config import load_config
    from pipeline.data.sources import shards_from_digits
    from pipeline.task import load_task
    from pipeline.train import OBJECTIVES, build_model, make_train_attack, train_epoch

    digits = work / "digits"
    if not (digits / "meta.json").is_file():
        shards_from_digits(digits, progress=False)
    rates: dict[str, list[float]] = {"memory": [], "stream": []}
    for _ in range(args.rounds):
        for name, mode in (("memory", "never"), ("stream", "always")):
            cfg = load_config(ROOT / "configs" / "capt.yaml", [
                f"data.path={digits}", "data.shots=null", f"data.stream={mode}", "data.workers=2",
                "model.name=capt-tiny", "attack.steps=2", "optim.batch_size=32"])
            task = load_task(cfg.data, 32)
            torch.manual_seed(0)
            model = build_model(cfg, task.classnames, task.templates, torch.device("cpu"))
            opt = torch.optim.SGD([p for p in model.prompts.parameters() if p.requires_grad], lr=0.01)
            t0 = time.perf_counter()
            train_epoch(model, cfg, task, make_train_attack(cfg, model), OBJECTIVES[cfg.loss.objective], opt, 0,
                        torch.device("cpu"))
            rates[name].append(len(task.train_y) / (time.perf_counter() - t0))
    ratio = [s / m for s, m in zip(rates["stream"], rates["memory"], strict=True)]
    return {"images": 1258, "memory_images_per_s": [round(r, 1) for r in rates["memory"]],
            "stream_images_per_s": [round(r, 1) for r in rates["stream"]],
            "stream_over_memory_median": round(statistics.median(ratio), 3)}


def imagenet_on_paper(subset_png_kb: float) -> dict[str, Any]:
    """Bytes read per trial of an ImageNet 16-shot search (1000 classes), before and after."""
    train_gb, val_gb, n_train, n_val = 140.0, 6.4, 1_281_167, 50_000
    chosen = 16 * 1000
    before = 2 * train_gb + val_gb  # label pre-pass over every train shard, then every shard again; whole val
    after_trial = chosen * subset_png_kb / 2**20  # the cached train subset (224 px PNG); val as below
    build = chosen * train_gb / n_train + 0.1  # the subset build: the chosen JPEGs by offset + the index
    return {"assumptions": {"train_gb": train_gb, "val_gb": val_gb, "train_images": n_train, "val_images": n_val,
                            "subset_png_kb_per_image": round(subset_png_kb, 1)},
            "before_per_trial_gb": round(before, 1), "before_24_trials_tb": round(24 * before / 1000, 2),
            "after_per_trial_train_gb": round(after_trial, 2), "after_val_gb_per_evaluation_pass": val_gb,
            "after_once_per_search_gb": round(build, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-code", type=Path, help="checkout of the code before indexes (today's path)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "capt-bench-data")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=24, help="train images per class of the small folder")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["setup", "stream_memory", "throughput"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_data.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    n, t = args.per_class, max(args.per_class // 4, args.test_limit // args.classes + 1)
    folders = {"1x": make_shards(args.work / "jpeg-1x", args.classes, n, t),
               "4x": make_shards(args.work / "jpeg-4x", args.classes, 4 * n, 4 * t)}
    sizes = {k: round(folder_mb(v), 1) for k, v in folders.items()}
    log.info("folders (MB): %s", sizes)
    results: dict[str, Any] = {"folder_mb": sizes}
    with tempfile.TemporaryDirectory(dir=args.work) as cache:
        if "setup" not in args.skip:
            results["setup"] = setup_costs(args, folders, Path(cache))
            subset_dirs = list(Path(cache).glob("1x/*/train-*.tar"))
            png_kb = sum(p.stat().st_size for p in subset_dirs) / 1024 / (args.classes * args.shots)
            results["imagenet_16_shot_on_paper"] = imagenet_on_paper(png_kb)
    if "stream_memory" not in args.skip:
        results["stream_full_epoch"] = streaming_memory(args, folders)
    if "throughput" not in args.skip:
        results["train_throughput_demo"] = train_throughput(args, args.work)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "work", "old_code", "skip")}
    rec = record(args.out, torch.device("cpu"), setup, results)
    print(json.dumps(rec["results"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

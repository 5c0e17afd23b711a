"""Shard loader throughput: images/s (total and per worker) for DataLoader workers 0, 1, 2.

Run (about 30 s on a laptop; makes digits demo shards in a temporary folder unless --data is given):

    python benchmarks/bench_loader.py --image-size 224 32 --out benchmarks/results/bench_loader.json

Each pass streams the whole train split through ``pipeline.data.make_loader`` (decode, bicubic
resize, centre crop, batch); worker start-up counts, as it does at every training epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.data import make_loader  # noqa: E402
from pipeline.data.meta import read_meta  # noqa: E402
from pipeline.data.sources import shards_from_digits  # noqa: E402

log = logging.getLogger("bench_loader")


def measure(data: Path, split: str, image_size: int, num_workers: int, batch_size: int, passes: int) -> dict:
    """Images per second over ``passes`` full passes of ``split`` (mean of the passes)."""
    loader = make_loader(data, split, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         shuffle=True, seed=0)
    rates, count = [], 0
    for _ in range(passes):
        count, start = 0, time.perf_counter()
        for images, _labels in loader:
            count += images.shape[0]
        rates.append(count / (time.perf_counter() - start))
    rate = sum(rates) / len(rates)
    return {"image_size": image_size, "num_workers": num_workers, "images": count,
            "images_per_s": round(rate, 1), "images_per_s_per_worker": round(rate / max(num_workers, 1), 1)}


def machine() -> dict:
    """Where the figures were measured."""
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the grid, log a table and write the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="shards folder (default: digits demo shards in a temp dir)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, nargs="+", default=[224, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_loader.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "digits"
            shards_from_digits(data, progress=False)
        meta = read_meta(data)
        rows = [measure(data, args.split, size, workers, args.batch_size, args.passes)
                for size in args.image_size for workers in args.workers]
    log.info("%10s %8s %8s %12s %18s", "image_size", "workers", "images", "images/s", "images/s/worker")
    for row in rows:
        log.info("%10d %8d %8d %12.1f %18.1f", row["image_size"], row["num_workers"], row["images"],
                 row["images_per_s"], row["images_per_s_per_worker"])
    record = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "data": {"name": meta["name"], "split": args.split, "batch_size": args.batch_size,
                       "passes": args.passes, "image_format": meta["image_format"]},
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Copy a finished `capt compare` run's results into a committed folder (benchmarks/results/...).

    python benchmarks/compare_export.py runs/compare/fashion benchmarks/results/compare_fashion

Writes DEST/table.md, table.csv, tuning.json (when tuned), cells.json (every cell's and check's metrics,
with its MLflow run id) and cells.csv (one row per cell or check, one column per metric). The MLflow
store and the trained prompts stay in the run folder.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path


def export(run: Path, dest: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("table.md", "table.csv", "tuning.json"):
        if (run / name).is_file():
            shutil.copyfile(run / name, dest / name)
    records = summary["cells"] + summary.get("checks", [])
    keep = {k: summary.get(k) for k in ("honesty_problems", "wall_seconds", "tuning")}
    (dest / "cells.json").write_text(json.dumps({**keep, "cells": summary["cells"],
                                                 "checks": summary.get("checks", [])}, indent=1) + "\n")
    metrics = sorted({k for r in records for k in r["metrics"]})
    with (dest / "cells.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "protocol", "seed", "run_id", *metrics])
        for r in records:
            w.writerow([r["method"], r["protocol"], r["seed"], r.get("run_id") or "",
                        *[_fmt(r["metrics"].get(k)) for k in metrics]])


def _fmt(value: object) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/compare_export.py RUN_DIR DEST_DIR")
    export(Path(sys.argv[1]), Path(sys.argv[2]))

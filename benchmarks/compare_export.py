"""Copy a finished `capt compare` run's results into a committed folder (benchmarks/results/...).

    python benchmarks/compare_export.py runs/compare/fashion benchmarks/results/compare_fashion \
        [--retable configs/compare/fashion.yaml]

Writes DEST/table.md, table.csv, tuning.json and tapt_search.json (when searched), cells.json (every cell's and check's metrics,
with its MLflow run id) and cells.csv (one row per cell or check, one column per metric). The MLflow
store and the trained prompts stay in the run folder. With ``--retable CONFIG`` the table is rewritten
from summary.json by this checkout's table code (same numbers; e.g. the TAPT-vs-same-prompts paired
section of a run made before it existed) instead of copied.
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
    for name in ("table.md", "table.csv", "tuning.json", "tapt_search.json"):
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


def retable(run: Path, dest: Path, config: str) -> None:
    """table.md / table.csv from summary.json with the current table code (pipeline.compare.write_table)."""
    from pipeline.compare import load_compare, write_table

    summary = json.loads((run / "summary.json").read_text())
    plan = load_compare(config, [f"compare.out={run}"])
    cells = [dict(c) for c in summary["cells"]]
    for c in cells:  # runs before summaries kept `tapt_of`: a TAPT cell is the one that reports tapt_images
        if "tapt_images" in c["metrics"] and "tapt_of" not in c:
            c["tapt_of"] = f"{c['method'].split('+tapt')[0]}-{c['protocol']}-s{c['seed']}"
    chosen = {"training": summary.get("tuning") or {}, "tapt": summary.get("tapt_search")}
    write_table(plan, cells, summary.get("checks", []), chosen, dest, None, summary["honesty_problems"])


def _fmt(value: object) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 4) or (len(args) == 4 and args[2] != "--retable"):
        sys.exit("usage: python benchmarks/compare_export.py RUN_DIR DEST_DIR [--retable CONFIG]")
    export(Path(args[0]), Path(args[1]))
    if len(args) == 4:
        retable(Path(args[0]), Path(args[1]), args[3])

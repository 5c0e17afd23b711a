"""Tabular HPO benchmark, part 1: a grid of CAPT configurations with full learning curves.

Run (about 40 minutes on 2 idle CPUs, two shards at once; the demo assets are built on first use, a few minutes once):

    for k in 0 1; do OMP_NUM_THREADS=1 python benchmarks/bench_hpo_grid.py --shard $k/2 & done; wait
    python benchmarks/bench_hpo_grid.py        # merges the shards into benchmarks/results/hpo_grid.json

Every configuration of ``GRID`` (the demo search space of ``search_spaces/demo.yaml`` at a few values
per parameter; ``loss.alpha`` only where ``loss.alpha_rule`` is ``fixed``) is trained for all its epochs
through the project's own training path (``pipeline.train.train`` on ``pipeline.task.load_task``, the
config built as a search trial builds it: the search file's base, ``search_report.resolve_base``, then the
sampled values), one after another in this process (no Ray: its per-trial overhead would dominate). Each
epoch's clean and robust accuracy (``eval.attack`` as in the search) and time are stored; the file is
rewritten after every configuration, so an interrupted run continues where it stopped.
``benchmarks/bench_hpo_replay.py`` replays search strategies against this table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ROOT, machine  # noqa: E402

from pipeline.config import from_dict  # noqa: E402
from pipeline.search_space import load_search  # noqa: E402

log = logging.getLogger("bench_hpo_grid")

# The table's grid: values of the demo space's parameters (the rest stay at the search file's base).
GRID: dict[str, list[Any]] = {
    "optim.lr": [0.001, 0.005, 0.03],
    "loss.lam": [0.1, 1.0, 10.0],
    "prompt.depth": [1, 4],
    "attack.eps": [1.0, 2.0, 4.0],
}
CONDITIONS: dict[str, tuple[str, Any]] = {}  # e.g. {"loss.alpha": ("loss.alpha_rule", "fixed")}
# Every trial is scored by the same monitor: PGD-5 at eps 2/255 on 150 test images (at the demo's eps 1
# every configuration of a first grid sat at a 0.92 ceiling within two test images of 60). 16 shots at
# batch 16 give 10 optimizer steps per epoch (the demo's 8 shots at batch 32 give 3, too few for the
# learning rate to matter). The demo's training attack steps and its 4 epochs.
OVERRIDES = ["base.data.test_limit=150", "base.eval.steps=5", "base.eval.eps=2.0", "base.data.shots=16",
             "base.optim.batch_size=16"]


def grid_configs(grid: dict[str, list[Any]] = GRID, conditions: dict[str, tuple[str, Any]] = CONDITIONS
                 ) -> list[dict[str, Any]]:
    """Every combination; a conditional parameter only where its condition holds."""
    keys = [k for k in grid if k not in conditions]
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, combo, strict=True))
        extra = [k for k, (parent, value) in conditions.items() if params.get(parent) == value]
        for values in itertools.product(*(grid[k] for k in extra)):
            out.append({**params, **dict(zip(extra, values, strict=True))})
    return out


def key_of(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def run_config(base: dict[str, Any], params: dict[str, Any], image_size: int) -> dict[str, Any]:
    """Train one configuration as a search trial would; its per-epoch curve."""
    from pipeline.task import load_task
    from pipeline.train import train

    cfg = from_dict(base).replace(**params)
    task = load_task(cfg.data, image_size)
    curve: list[dict[str, float]] = []

    def report(metrics: dict[str, Any], ckpt: Any) -> None:
        curve.append({k: float(metrics[k]) for k in ("epoch", "clean_acc", "robust_acc", "epoch_time_s")})

    t0 = time.time()
    try:
        train(cfg, task, report=report)
        status = "ok"
    except FloatingPointError as exc:  # a diverged config is a result too (a search trial would FAIL)
        status = f"failed: {exc}"
    return {"params": params, "status": status, "curve": curve, "wall_s": round(time.time() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "search_spaces" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], help="extra search-file overrides (key=value)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hpo_grid.json")
    p.add_argument("--limit", type=int, default=None, help="only the first N configurations (a dry run)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run every N-th configuration from the K-th (0-based) into <out>.shardK.json; a later "
                        "run without --shard merges the shards' rows into <out>")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from pipeline.search_report import image_size, resolve_base

    spec = load_search(args.config, OVERRIDES + list(args.set))
    base = resolve_base(spec.base)
    size = image_size(from_dict(base).model.name)
    configs = grid_configs()[: args.limit]
    done: dict[str, Any] = {}
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        configs = configs[k::n]
        args.out = args.out.with_suffix(f".shard{k}.json")
    for path in [args.out] + ([] if args.shard else sorted(args.out.parent.glob(args.out.stem + ".shard*.json"))):
        if path.is_file():
            done.update({key_of(r["params"]): r for r in json.loads(path.read_text()).get("rows", [])})
    wall = sum(r["wall_s"] for r in done.values() if key_of(r["params"]) in {key_of(c) for c in configs})
    rows = []
    for i, params in enumerate(configs):
        if key_of(params) in done:
            rows.append(done[key_of(params)])
            continue
        row = run_config(base, params, size)
        wall += row["wall_s"]
        rows.append(row)
        last = row["curve"][-1] if row["curve"] else {}
        log.info("[%d/%d] %s: %s robust %.3f clean %.3f (%.0fs)", i + 1, len(configs), params, row["status"],
                 last.get("robust_acc", float("nan")), last.get("clean_acc", float("nan")), row["wall_s"])
        _write(args, spec, rows, wall)
    _write(args, spec, rows, wall)
    print(f"{len(rows)} configurations, grid wall time {wall / 60:.1f} min -> {args.out}")
    return 0


def _write(args: argparse.Namespace, spec: Any, rows: list[dict[str, Any]], wall: float) -> None:
    cpu = machine(torch.device("cpu"))
    rec = {"command": "python benchmarks/bench_hpo_grid.py " + " ".join(sys.argv[1:]), "machine": cpu,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": str(Path(args.config).name),
           "overrides": OVERRIDES + list(args.set), "epochs": spec.base_config().optim.epochs,
           "grid": GRID, "conditions": {k: list(v) for k, v in CONDITIONS.items()},
           "wall_s": round(wall, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    sys.exit(main())

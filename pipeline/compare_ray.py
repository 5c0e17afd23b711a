"""Ray Tune execution of ``capt compare`` cells: a grid of trials, no searcher, no scheduler.

The trial itself is :func:`pipeline.compare_cell.cell_main`; the driver (:mod:`pipeline.compare`)
calls :func:`run_cells`. Nothing here imports the driver.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_TUNE_KEYS = {"done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s",
              "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
              "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint", "run_id", "experiment_tag"}


def init_ray() -> bool:
    """Join ``$RAY_ADDRESS`` (a cluster, ``ray job submit``), else start a local Ray. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # "local": a new local Ray even when `ray start` left a cluster running on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    return True


def run_cells(cells: list[dict[str, Any]], ctx: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every cell as one Tune trial; returns the cells with ``metrics`` and ``run_id`` filled in."""
    import ray
    from ray import tune

    from pipeline.compare_cell import cell_main

    if not cells:
        return []
    started = init_ray()
    res = settings.get("resources") or {}
    trainable = tune.with_resources(cell_main, {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0)})
    first = cells[0]
    stage = ("tapt-search" if "tapt_search" in first else "tapt" if first.get("tapt_of")
             else "check" if first.get("check_of") else "train")
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(cells), "ctx": ctx},
        tune_config=tune.TuneConfig(max_concurrent_trials=int(settings.get("max_concurrent", 2)),
                                    trial_name_creator=lambda t: t.config["cell"]["key"],
                                    trial_dirname_creator=lambda t: t.config["cell"]["key"]),
        run_config=tune.RunConfig(name=f"{settings['name']}-{stage}",
                                  storage_path=str(Path(settings["out"]) / "ray_results"),
                                  failure_config=tune.FailureConfig(max_failures=int(settings.get("max_failures", 1))),
                                  verbose=int(settings.get("verbose", 1))),
    )
    try:
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    done = []
    for result in grid:
        cell = dict(result.config["cell"])
        if result.error is not None:
            log.error("cell %s failed: %s", cell["key"], str(result.error).splitlines()[0])
            continue
        metrics = dict(result.metrics or {})
        cell["run_id"] = metrics.get("run_id")
        cell["metrics"] = {k: v for k, v in metrics.items() if k not in _TUNE_KEYS and isinstance(v, int | float)}
        done.append(cell)
    return done

"""The same replay as ``hpo_replay.replay``, but through Ray Tune itself: a trainable that looks the
results up (sleeping ``time_scale`` x the table's epoch time per epoch, so trials interleave as in the
real search), the product's searcher and scheduler, ``tune.Tuner``. Used by ``bench_hpo_replay.py
--engine tune`` to check the in-process replay against Tune and to measure what Tune costs per replay.
"""

from __future__ import annotations

import os
import time
from typing import Any

import optuna
from hpo_replay import Replay, Table
from ray import tune

from pipeline.search_algo import make_scheduler, make_searcher
from pipeline.search_space import SearchSpec

TABLE = "_table"


def lookup_trainable(config: dict[str, Any]) -> None:
    """A trial that replays its grid point's recorded curve (objective only at the final epoch)."""
    ctx = config[TABLE]
    table: Table = ctx["table"]
    params = table.snap({k: v for k, v in config.items() if k != TABLE}, set(ctx["log_keys"]))
    curve = table.curve(params)
    for row in curve:
        time.sleep(row["epoch_time_s"] * ctx["time_scale"])
        out = {"epoch": int(row["epoch"]), "clean_acc": row["clean_acc"], "robust_acc": row["robust_acc"]}
        if row["epoch"] >= table.epochs:
            out.update({m: out[m.removeprefix("objective_")] for m in ctx["metrics"]})
        tune.report(out)
    if len(curve) < table.epochs:
        raise FloatingPointError("this configuration diverged in the grid")


class _Events(tune.Callback):
    def __init__(self, metric: str):
        self.metric, self.events, self.cum = metric, [], 0

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.cum += 1
        self.events.append({"cum_epochs": self.cum, "trial": trial.trial_id, "epoch": result["epoch"],
                            "clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"],
                            "final": self.metric in result})


class _Budget(tune.Stopper):
    def __init__(self, budget: float):
        self.budget, self.seen = budget, 0

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen += 1
        return False

    def stop_all(self) -> bool:
        return self.seen >= self.budget


def tune_replay(spec: SearchSpec, table: Table, *, budget: float, time_scale: float, storage_path: str) -> Replay:
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    storage = optuna.storages.InMemoryStorage()
    events = _Events(spec.metrics[0])
    ctx = {"table": table, "log_keys": sorted(k for k, p in spec.space.items() if p.log), "metrics": spec.metrics,
           "time_scale": time_scale}
    tuner = tune.Tuner(
        tune.with_resources(lookup_trainable, {"cpu": 1}), param_space={TABLE: ctx},
        tune_config=tune.TuneConfig(search_alg=make_searcher(spec, storage), scheduler=make_scheduler(spec, table.epochs),
                                    num_samples=spec.search.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(name=f"replay_{spec.search.seed}", storage_path=storage_path, verbose=0,
                                  stop=_Budget(budget), callbacks=[events]))
    grid = tuner.fit()
    trials = [{"trial_id": r.metrics.get("trial_id"), "epochs": r.metrics.get("epoch", 0),
               "state": "COMPLETE" if spec.metrics[0] in r.metrics else "PRUNED"} for r in grid]
    return Replay(events=events.events, trials=trials, study=optuna.load_study(study_name=spec.search.name,
                                                                                storage=storage))

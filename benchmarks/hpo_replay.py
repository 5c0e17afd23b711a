"""Replaying a search against a tabular benchmark (the table ``bench_hpo_grid.py`` writes).

The searcher and scheduler are the product's own (``pipeline.search_algo.make_searcher`` /
``make_scheduler`` on a :class:`~pipeline.search_space.SearchSpec`); only the trials are replaced by a
lookup: a suggested configuration is snapped to the nearest grid point (log distance on log ranges)
and its recorded per-epoch results are replayed.

:func:`replay` is a discrete-event loop that drives them the way Ray Tune's trial runner does, without
Ray: ``max_concurrent`` workers; each trial-epoch takes the table's recorded epoch time on the
simulated clock; each result goes to the searcher (``on_trial_result``) and the scheduler (ASHA), whose
STOP ends the trial; a trial ends with ``on_trial_complete`` and its last result, which carries
``objective_*`` only at the final epoch, so a stopped trial reaches Optuna as PRUNED. The search ends
when ``num_samples`` trials ran or ``budget`` trial-epochs are spent. ``bench_hpo_replay.py --engine
tune`` runs the same replay through Ray Tune itself (a lookup trainable) to measure what that costs.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from pipeline.search_algo import make_scheduler, make_searcher
from pipeline.search_space import SearchSpec


class Table:
    """A grid of configurations with per-epoch curves; looks up the nearest grid point."""

    def __init__(self, rec: dict[str, Any]):
        self.grid: dict[str, list[Any]] = rec["grid"]
        self.conditions = {k: tuple(v) for k, v in rec.get("conditions", {}).items()}
        self.epochs = int(rec["epochs"])
        self.rows = {self.key(r["params"]): r for r in rec["rows"]}
        finals = [r["curve"][-1] for r in rec["rows"] if len(r["curve"]) == self.epochs]
        self.best_robust = max(f["robust_acc"] for f in finals)
        self.nadir = (min(f["clean_acc"] for f in finals), min(f["robust_acc"] for f in finals))

    @staticmethod
    def key(params: dict[str, Any]) -> str:
        return json.dumps(params, sort_keys=True)

    def snap(self, config: dict[str, Any], log_keys: set[str]) -> dict[str, Any]:
        """The grid point nearest to a suggested configuration (conditional keys where they apply)."""
        out: dict[str, Any] = {}
        for k, values in self.grid.items():
            if k in self.conditions:
                continue
            out[k] = _nearest(config[k], values, k in log_keys)
        for k, (parent, value) in self.conditions.items():
            if out.get(parent) == value:
                out[k] = _nearest(config.get(k, self.grid[k][0]), self.grid[k], k in log_keys)
        return out

    def curve(self, params: dict[str, Any]) -> list[dict[str, float]]:
        return self.rows[self.key(params)]["curve"]


def _nearest(v: Any, values: list[Any], log: bool) -> Any:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return v
    dist = (lambda a: abs(math.log(a) - math.log(v))) if log and v > 0 else (lambda a: abs(a - v))
    return min(values, key=dist)


@dataclass
class _Trial:
    trial_id: str
    params: dict[str, Any]
    curve: list[dict[str, float]]
    epoch: int = 0
    last: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replay:
    """One replayed search: its trials' fates and the events in order of the simulated clock."""

    events: list[dict[str, Any]]  # one per trial-epoch: cum_epochs, trial, epoch, clean/robust, final
    trials: list[dict[str, Any]]  # trial_id, params, epochs, state (COMPLETE / PRUNED / FAIL / CUT)
    study: optuna.Study


def replay(spec: SearchSpec, table: Table, *, budget: float | None = None, objectives_key: str = "robust_acc"
           ) -> Replay:
    """Run one search of ``spec`` against ``table`` (see the module docstring)."""
    storage = optuna.storages.InMemoryStorage()
    searcher = make_searcher(spec, storage)
    scheduler = make_scheduler(spec, table.epochs)
    np.random.seed(spec.search.seed)  # ASHA draws its bracket from numpy's global generator
    log_keys = {k for k, p in spec.space.items() if p.log}
    metrics = spec.metrics
    clock, cum, started = 0.0, 0, 0
    queue: list[tuple[float, int, str]] = []
    live: dict[str, _Trial] = {}
    events: list[dict[str, Any]] = []
    fates: list[dict[str, Any]] = []
    budget = budget if budget is not None else math.inf

    def start(now: float) -> bool:
        nonlocal started
        tid = f"t{started:04d}"
        config = searcher.suggest(tid)
        if config is None:
            return False
        started += 1
        params = table.snap(config, log_keys)
        trial = _Trial(tid, params, table.curve(params))
        live[tid] = trial
        scheduler.on_trial_add(None, trial)
        _schedule(queue, now, trial)
        return True

    while True:
        while len(live) < spec.search.max_concurrent and started < spec.search.num_samples and cum < budget:
            if not start(clock):
                break
        if not queue:
            break
        clock, _, tid = heapq.heappop(queue)
        trial = live[tid]
        if trial.epoch >= len(trial.curve):  # the configuration diverged here: the trial raises
            searcher.on_trial_complete(tid, None, error=True)
            scheduler.on_trial_remove(None, trial)
            fates.append(_fate(trial, "FAIL"))
            del live[tid]
            continue
        row = trial.curve[trial.epoch]
        trial.epoch += 1
        cum += 1
        result = {"epoch": trial.epoch, "clean_acc": row["clean_acc"], "robust_acc": row["robust_acc"]}
        final = trial.epoch >= table.epochs
        if final:
            result.update({m: result[m.removeprefix("objective_")] for m in metrics})
        trial.last = result
        events.append({"cum_epochs": cum, "trial": tid, "epoch": trial.epoch, "clean_acc": row["clean_acc"],
                       "robust_acc": row["robust_acc"], "final": final})
        searcher.on_trial_result(tid, result)
        action = scheduler.on_trial_result(None, trial, result)
        if final or action == "STOP":
            searcher.on_trial_complete(tid, result)
            scheduler.on_trial_complete(None, trial, result)
            fates.append(_fate(trial, "COMPLETE" if final else "PRUNED"))
            del live[tid]
        else:
            _schedule(queue, clock, trial)
        if cum >= budget:  # out of budget: the trials in flight are cut where they are
            for t in live.values():
                searcher.on_trial_complete(t.trial_id, t.last or None)
                fates.append(_fate(t, "CUT"))
            break
    study = optuna.load_study(study_name=spec.search.name, storage=storage)
    return Replay(events=events, trials=fates, study=study)


def _schedule(queue: list, now: float, trial: _Trial) -> None:
    """The trial's next epoch ends after the table's recorded time for it (ties: the older trial first)."""
    dt = trial.curve[trial.epoch]["epoch_time_s"] if trial.epoch < len(trial.curve) else 0.0
    heapq.heappush(queue, (now + dt, int(trial.trial_id[1:]), trial.trial_id))


def _fate(trial: _Trial, state: str) -> dict[str, Any]:
    return {"trial_id": trial.trial_id, "params": trial.params, "epochs": trial.epoch, "state": state,
            **({k: trial.last[k] for k in ("clean_acc", "robust_acc")} if trial.last else {})}


# ----------------------------------------------------------------------------- what a replay found

def anytime_best(rep: Replay, budget: int, key: str = "robust_acc", empty: float = 0.0) -> np.ndarray:
    """Best final ``key`` among the trials completed after each number of trial-epochs 0..budget
    (what the search would return at that point; ``empty`` before the first completion)."""
    out = np.full(budget + 1, empty, dtype=float)
    best = empty
    for ev in rep.events:
        if ev["final"]:
            best = max(best, ev[key])
            if ev["cum_epochs"] <= budget:
                out[ev["cum_epochs"]:] = best
    return out


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both maximised) above the reference point."""
    pts = sorted({p for p in points if p[0] > ref[0] and p[1] > ref[1]}, key=lambda p: (-p[0], -p[1]))
    area, top = 0.0, ref[1]
    for x, y in pts:
        if y > top:
            area += (x - ref[0]) * (y - top)
            top = y
    return area


def anytime_hypervolume(rep: Replay, budget: int, ref: tuple[float, float]) -> np.ndarray:
    """Hypervolume of the completed trials' (clean, robust) front after each number of trial-epochs."""
    out = np.zeros(budget + 1)
    points: list[tuple[float, float]] = []
    for ev in rep.events:
        if ev["final"] and ev["cum_epochs"] <= budget:
            points.append((ev["clean_acc"], ev["robust_acc"]))
            out[ev["cum_epochs"]:] = hypervolume(points, ref)
    return out


def compute_to(curve: np.ndarray, target: float) -> float:
    """The first number of trial-epochs at which ``curve`` reaches ``target`` (inf: never)."""
    hit = np.nonzero(curve >= target - 1e-12)[0]
    return float(hit[0]) if len(hit) else math.inf


# ----------------------------------------------------------------------------- the strategies

STRATEGIES: dict[str, dict[str, Any]] = {  # search-file settings on top of the search file's own
    "random": {"sampler": {"type": "random"}, "scheduler": {"type": "none"}},
    "grid": {"sampler": {"type": "grid"}, "scheduler": {"type": "none"}},
    "tpe": {"scheduler": {"type": "none"}},
    "random+asha": {"sampler": {"type": "random"}},
    "tpe+asha": {},  # the product's defaults
    "tpe+asha 2-obj": {"objectives": ["clean_acc", "robust_acc"]},
}


def strategy_spec(doc: dict[str, Any], table: Table, strategy: dict[str, Any], *, seed: int,
                  num_samples: int, search: dict[str, Any] | None = None) -> SearchSpec:
    """The search file ``doc`` for one replay: its space cut to the table's parameters (the others stay
    at the base), a grid sampler's values the table's, ``strategy`` and ``search`` settings on top."""
    import copy

    from pipeline.search_space import load_search

    tree = copy.deepcopy(doc)
    tree["space"] = {k: v for k, v in tree["space"].items() if k in table.grid}
    s = tree.setdefault("search", {})
    # Points cut to the table's keys; Ray wants complete points in an unconditional space: the base's values.
    points = [p for p in ({k: v for k, v in pt.items() if k in table.grid}
                          for pt in s.get("points_to_evaluate") or []) if p]
    if points and not any("when" in (v or {}) for v in tree["space"].values()):
        base = load_search(None, tree={**tree, "search": {**s, "points_to_evaluate": []}}).base_config().to_dict()
        points = [{k: p.get(k, _dotted(base, k)) for k in tree["space"]} for p in points]
    s["points_to_evaluate"] = points
    s.update(seed=seed, num_samples=num_samples, optuna_storage=None)
    for settings in (strategy, search or {}):  # the strategy's, then every strategy's (merged per key)
        for key, value in settings.items():
            s[key] = {**(s.get(key) or {}), **value} if isinstance(value, dict) else value
    if s.get("sampler", {}).get("type") == "grid":
        s["sampler"]["grid"] = {k: list(v) for k, v in table.grid.items()}
    return load_search(None, tree=tree)


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree

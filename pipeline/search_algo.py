"""The search's algorithms: the Optuna TPE searcher as Ray Tune sees it, and the ASHA scheduler.

Built from a validated :class:`~pipeline.search_space.SearchSpec` by :func:`make_searcher` and
:func:`make_scheduler`; ``pipeline/search.py`` (the driver) and the benchmarks use exactly these.

How trials reach Optuna: every epoch reports ``clean_acc`` / ``robust_acc`` (ASHA's metric); only a
trial's final epoch adds ``objective_<name>``, the searcher's metric. A trial that ASHA stops early
therefore ends without it and is told to Optuna as PRUNED (not as COMPLETE with a partial accuracy);
a trial that raises ends as FAIL.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from pipeline.config import ConfigError
from pipeline.search_checks import ASHA_DEFAULTS
from pipeline.search_sampler import make_sampler
from pipeline.search_space import SearchSpec, optuna_space

log = logging.getLogger("pipeline.search")
TUNE_ID_ATTR = "tune_trial_id"


class CaptOptunaSearch(OptunaSearch):
    """OptunaSearch that (1) tolerates results without the objective (it comes at the last epoch only)
    and tells a trial without it as PRUNED, with one objective or two, (2) tags each Optuna trial with
    its Tune trial id, and (3) after a restore, reuses Optuna trials that were asked for but never saved
    in the Tune experiment state (a driver killed in between), so the study holds exactly one Optuna
    trial per Tune trial."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        value = result.get(self.metric, result.get(str(self.metric).removeprefix("objective_")))
        if value is not None and trial_id in self._ot_trials and math.isfinite(value):
            self._ot_trials[trial_id].report(value, result.get("epoch", result.get("training_iteration", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # OptunaSearch tells [None, None] for a multi-objective trial without its objectives, which
        # Optuna rejects (the trial would stay RUNNING): make it PRUNED (or FAIL) as for one objective.
        if result and isinstance(self.metric, list) and any(result.get(m) is None for m in self.metric):
            result = None
        super().on_trial_complete(trial_id, result, error)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and getattr(self, "_orphans", None):
            number = self._orphans.pop(0)
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, number)
            log.info("reusing Optuna trial %d (asked before the driver stopped) for %s", number, trial_id)
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_ID_ATTR, trial_id)
        return config

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        self._orphans = [t._trial_id for t in running if t._trial_id not in known]
        if self._orphans:
            log.info("%d Optuna trial(s) were asked but not recorded by Tune; they will be reused", len(self._orphans))
            self._ot_study.sampler.reseed_rng()  # else the restored RNG re-draws the orphans' values


def make_searcher(spec: SearchSpec, storage: optuna.storages.BaseStorage) -> ConcurrencyLimiter:
    modes = ["max"] * len(spec.metrics)
    multi = len(spec.metrics) > 1
    # A grid enumerates its points itself (and Optuna's GridSampler rejects partial enqueued points).
    grid = spec.search.sampler.get("type") == "grid"
    points = [] if grid else complete_points(spec)
    sampler = make_sampler(spec.search.sampler, spec.space, seed=spec.search.seed, conditional=spec.conditional,
                           num_samples=spec.search.num_samples)
    searcher = CaptOptunaSearch(optuna_space(spec), metric=spec.metrics if multi else spec.metrics[0],
                                mode=modes if multi else modes[0],
                                points_to_evaluate=points or None,
                                sampler=sampler, study_name=spec.search.name, storage=storage)
    return ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)


def complete_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """``points_to_evaluate`` as the searcher takes them. A partial point is fine in a conditional
    (define-by-run) space; an unconditional one needs every searched key (Ray's OptunaSearch refuses a
    short point at start), so a missing key takes the base config's value when that lies in its range."""
    points = [dict(p) for p in spec.search.points_to_evaluate]
    if spec.conditional or not points:
        return points
    base = spec.base_config().to_dict()
    for i, point in enumerate(points):
        for key, param in spec.space.items():
            if key in point:
                continue
            value: Any = base
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            inside = (value in param.choices) if param.type == "categorical" else (
                isinstance(value, int | float) and param.low <= value <= param.high)
            if not inside:
                raise ConfigError(f"search.points_to_evaluate[{i}]: give {key!r} (the base value {value!r} is "
                                  "outside its searched range)")
            point[key] = value
    return points


def make_scheduler(spec: SearchSpec, epochs: int) -> Any:
    sched = spec.search.scheduler
    if sched["type"] == "none" or epochs < 1:
        return FIFOScheduler()
    sched = {**ASHA_DEFAULTS, **sched}
    return ASHAScheduler(time_attr="epoch", metric="robust_acc", mode="max", max_t=max(epochs, 1),
                         grace_period=min(int(sched["grace_period"]), epochs),
                         reduction_factor=sched["reduction_factor"])

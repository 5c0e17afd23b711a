"""The search file's cross-checks (settings, each parameter against the base config, ``when``
conditions, ``points_to_evaluate``): each a one-line :class:`~pipeline.config.ConfigError` naming the key.
Used by :func:`pipeline.search_space.parse_search`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pipeline.config import FINAL_ATTACKS, Config, ConfigError

if TYPE_CHECKING:
    from pipeline.search_space import ParamSpec, SearchSettings

OBJECTIVES = ("robust_acc", "clean_acc")
SCHEDULERS = ("asha", "none")
# ASHA's settings when a search file leaves them out. grace 2: on the HPO benchmark's table the epoch-1
# ranking barely predicts the last epoch's (Spearman 0.24; epoch 2: 0.65) and ASHA at grace 1 lost to
# random search (benchmarks/README.md, issue #13)
ASHA_DEFAULTS = {"type": "asha", "grace_period": 2, "reduction_factor": 2}


def check_search(s: SearchSettings) -> None:
    if not s.name or not all(c.isalnum() or c in "-_." for c in s.name):
        raise ConfigError(f"search.name: {s.name!r} must be non-empty letters, digits, '-', '_' or '.'")
    if not s.objectives or len(set(s.objectives)) != len(s.objectives) or any(o not in OBJECTIVES for o in s.objectives):
        raise ConfigError(f"search.objectives: {list(s.objectives)} must be distinct names from {list(OBJECTIVES)}")
    if s.num_samples < 1 or s.max_concurrent < 1 or s.max_failures < 0:
        raise ConfigError("search: num_samples and max_concurrent must be >= 1, max_failures >= 0")
    if s.scheduler.get("type") not in SCHEDULERS:
        raise ConfigError(f"search.scheduler.type: {s.scheduler.get('type')!r} is not one of {list(SCHEDULERS)}")
    if s.scheduler["type"] == "asha":
        grace, rf = ({**ASHA_DEFAULTS, **s.scheduler}[k] for k in ("grace_period", "reduction_factor"))
        if not isinstance(grace, int) or grace < 1 or not is_number(rf) or rf <= 1:
            raise ConfigError("search.scheduler: grace_period must be an integer >= 1 and reduction_factor > 1")
    extra = set(s.resources) - {"cpu", "gpu"}
    if extra or not all(is_number(v) and v >= 0 for v in s.resources.values()) or s.resources.get("cpu", 1) <= 0:
        raise ConfigError(f"search.resources: {s.resources} must be {{cpu: >0, gpu: >=0 (fractions allowed)}}")
    for name in s.final_attacks:
        if name not in FINAL_ATTACKS:
            raise ConfigError(f"search.final_attacks: unknown attack {name!r}; choose from {list(FINAL_ATTACKS)}")
    if any(not is_number(e) or not 0 <= e <= 255 for e in s.final_eps):
        raise ConfigError(f"search.final_eps: {list(s.final_eps)} must be numbers in [0, 255] (units of 1/255)")
    if s.top_k is not None and (not isinstance(s.top_k, int) or s.top_k < 1):
        raise ConfigError(f"search.top_k: {s.top_k!r} must be an integer >= 1 or null")
    knob = s.inject_failure
    if knob is not None and (not isinstance(knob, dict) or set(knob) - {"trial_index", "epoch"}):
        raise ConfigError("search.inject_failure: expected {trial_index: int, epoch: int} (tests only)")


def check_param_against_config(p: ParamSpec, base: Config) -> None:
    """Every sample value must make a valid config: the key exists and the type fits."""
    for value in p.samples():
        try:
            base.replace(**{p.key: value})
        except ConfigError as exc:
            msg = str(exc)
            if msg.startswith("unknown config key"):
                raise ConfigError(f"space.{p.key}: not a config key ({msg})") from None
            raise ConfigError(f"space.{p.key}: value {value!r} is invalid: {msg}") from None


def check_when(p: ParamSpec, space: dict[str, ParamSpec]) -> None:
    for parent, values in p.when.items():
        where = f"space.{p.key}.when"
        if parent == p.key:
            raise ConfigError(f"{where}: a parameter cannot depend on itself")
        if parent not in space:
            raise ConfigError(f"{where}: {parent!r} is not a searched parameter")
        ref = space[parent]
        if ref.type != "categorical" or ref.when:
            raise ConfigError(f"{where}: {parent!r} must be an unconditional categorical parameter")
        bad = [v for v in values if v not in ref.choices]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not one of {parent}'s choices {list(ref.choices)}")


def check_points(points: tuple[dict[str, Any], ...], space: dict[str, ParamSpec], base: Config) -> None:
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise ConfigError(f"search.points_to_evaluate[{i}]: expected a mapping of searched keys")
        for key in point:
            if key not in space:
                raise ConfigError(f"search.points_to_evaluate[{i}]: {key!r} is not a searched parameter")
        try:
            base.replace(**point)
        except ConfigError as exc:
            raise ConfigError(f"search.points_to_evaluate[{i}]: {exc}") from None


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

"""The search's Optuna sampler, from ``search.sampler`` (``{type: tpe | random | grid, ...}``).

* ``tpe`` (default): Optuna's TPE, multivariate, ``group`` for a conditional space (auto), the constant
  liar for concurrent trials, ``n_startup_trials`` random trials first (null: :func:`startup_trials`).
* ``random``: independent uniform sampling (the baseline users would otherwise run).
* ``grid``: every combination of ``grid`` values (``{key: [values]}``; keys left out get
  :func:`grid_values` of their distribution), in an order shuffled by ``search.seed``.

No ray import: validated with the rest of the search file, before Ray starts.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna

from pipeline.config import ConfigError

SAMPLERS = ("tpe", "random", "grid")
DEFAULTS: dict[str, Any] = {"type": "tpe", "n_startup_trials": None, "multivariate": True, "group": None,
                            "constant_liar": True, "grid": None}
TPE_KEYS = {"n_startup_trials", "multivariate", "group", "constant_liar"}


def check_sampler(s: dict[str, Any], space: dict[str, Any] | None = None) -> None:
    """Raise ConfigError naming the bad ``search.sampler`` field."""
    unknown = set(s) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown search.sampler key: search.sampler.{sorted(unknown)[0]} "
                          f"(allowed: {sorted(DEFAULTS)})")
    if s.get("type") not in SAMPLERS:
        raise ConfigError(f"search.sampler.type: {s.get('type')!r} is not one of {list(SAMPLERS)}")
    n = s.get("n_startup_trials")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ConfigError(f"search.sampler.n_startup_trials: {n!r} must be an integer >= 0 or null (auto)")
    for key in ("multivariate", "constant_liar"):
        if not isinstance(s.get(key), bool):
            raise ConfigError(f"search.sampler.{key}: expected true/false, got {s.get(key)!r}")
    if s.get("group") is not None and not isinstance(s["group"], bool):
        raise ConfigError(f"search.sampler.group: expected true/false or null (auto), got {s['group']!r}")
    grid = s.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError("search.sampler.grid: expected {param: [values, ...]} with non-empty lists")
        if space is not None and set(grid) - set(space):
            raise ConfigError(f"search.sampler.grid: {sorted(set(grid) - set(space))[0]!r} is not a space parameter")


def grid_values(p: Any, points: int = 3) -> list[Any]:
    """Default grid points of a parameter: every choice; ``points`` values spread over a numeric range
    (geometrically for a log range), every integer when there are at most ``points`` + 2 of them."""
    if p.type == "categorical":
        return list(p.choices)
    low, high = float(p.low), float(p.high)
    if p.type == "int" and high - low + 1 <= points + 2:
        return list(range(int(low), int(high) + 1, int(p.step or 1)))
    if p.log:
        values = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (points - 1)) for i in range(points)]
    else:
        values = [low + i * (high - low) / (points - 1) for i in range(points)]
    return sorted({int(round(v)) for v in values}) if p.type == "int" else [float(f"{v:.4g}") for v in values]


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models: Optuna's 10, but at most half the search. Optuna's 10 alone
    meant the demo's 6-trial search never used TPE at all (benchmarks/README.md, HPO replay)."""
    return min(10, max(1, num_samples // 2))


def make_sampler(settings: dict[str, Any], space: dict[str, Any], *, seed: int, conditional: bool,
                 num_samples: int = 20) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``search.sampler`` asks for (``space``: key -> ParamSpec)."""
    s = {**DEFAULTS, **settings}
    if s["type"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s["type"] == "grid":
        grid = {key: list((s["grid"] or {}).get(key) or grid_values(p)) for key, p in space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    group = conditional if s["group"] is None else s["group"]
    with warnings.catch_warnings():  # multivariate / group / constant_liar are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        n = s["n_startup_trials"] if s["n_startup_trials"] is not None else startup_trials(num_samples)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n,
                                          multivariate=s["multivariate"], group=group and s["multivariate"],
                                          constant_liar=s["constant_liar"])

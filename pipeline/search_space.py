"""Search-space YAML: parse, override, validate, and turn into Optuna distributions.

A search file has four sections (``search_spaces/README.md`` documents every field)::

    base:      a training config (same keys as pipeline.config), the fixed part of every trial
    search:    the search settings (name, objectives, trial count, concurrency, scheduler, storage ...)
    tracking:  MLflow settings (URI, experiment, registered model name)
    space:     dotted config key -> distribution, optionally conditional (``when``)

Everything is checked here, before Ray starts: an unknown key, an empty range, a wrong type or a
bad ``when`` raises :class:`~pipeline.config.ConfigError` with a one-line message naming the key.
No ray import: this module is pure and fast to test.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from pipeline.config import Config, ConfigError, from_dict, parse_override, read_yaml, set_dotted
from pipeline.search_checks import (
    ASHA_DEFAULTS,
    check_param_against_config,
    check_points,
    check_search,
    check_when,
    is_number,
)
from pipeline.search_sampler import DEFAULTS as SAMPLER_DEFAULTS
from pipeline.search_sampler import check_sampler

SECTIONS = ("base", "search", "tracking", "space")


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a dotted config key and its distribution."""

    key: str
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # parent key -> allowed values

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution of this parameter."""
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                                      step=self.step)

    def suggest(self, trial: Any) -> Any:
        """Sample this parameter from an Optuna trial (define-by-run)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log, step=self.step)

    def samples(self) -> list[Any]:
        """Values that must each make a valid config (range ends or every choice)."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass(frozen=True)
class SearchSettings:
    name: str = "search"
    objectives: tuple[str, ...] = ("robust_acc",)
    num_samples: int = 8
    max_concurrent: int = 2
    seed: int = 0
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(ASHA_DEFAULTS))  # search_checks.py
    sampler: dict[str, Any] = field(default_factory=lambda: dict(SAMPLER_DEFAULTS))  # search_sampler.py
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    storage_path: str | None = None  # Tune storage; None -> <out>/ray_results
    optuna_storage: str | None = None  # None -> sqlite:///<out>/optuna.db
    out: str = "runs/search"
    points_to_evaluate: tuple[dict[str, Any], ...] = ()
    final_attacks: tuple[str, ...] = ("pgd100",)
    final_eps: tuple[float, ...] = ()  # extra eps for the best trial's accuracy-vs-eps curve
    top_k: int | None = None  # None: 1 (one objective) or the whole Pareto front (two)
    max_failures: int = 1  # per-trial retries from the last checkpoint
    ray_address: str | None = None  # None: $RAY_ADDRESS if set, else a local Ray; "auto": a running one
    cache_dir: str | None = None  # demo assets; None -> $CAPT_CACHE_DIR or ~/.cache/capt
    demo_model: bool = True  # data.path null: also use the demo's trained CLIP (else random init)
    inject_failure: dict[str, int] | None = None  # TESTS ONLY: {trial_index: i, epoch: e}


@dataclass(frozen=True)
class TrackingSettings:
    uri: str | None = None  # None -> $MLFLOW_TRACKING_URI or sqlite:///<out>/mlflow.db
    experiment: str | None = None  # None -> search.name
    register_model: str | None = None  # registered model name for the best prompts (alias "champion")


@dataclass(frozen=True)
class SearchSpec:
    """A validated search file."""

    base: dict[str, Any]
    search: SearchSettings
    tracking: TrackingSettings
    space: dict[str, ParamSpec]
    source: str = ""

    @property
    def conditional(self) -> bool:
        return any(p.when for p in self.space.values())

    @property
    def metrics(self) -> list[str]:
        """The names the searcher optimises (reported on a trial's final epoch only)."""
        return [f"objective_{o}" for o in self.search.objectives]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "search": dataclasses.asdict(self.search),
                "tracking": dataclasses.asdict(self.tracking),
                "space": {k: _param_dict(p) for k, p in self.space.items()}}

    def base_config(self) -> Config:
        return from_dict(self.base)

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The base config with a trial's sampled dotted-key values applied."""
        return self.base_config().replace(**params)


# ----------------------------------------------------------------------------- loading

def load_search(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                tree: dict[str, Any] | None = None) -> SearchSpec:
    """Read a search YAML (or take ``tree``), apply ``key=value`` overrides, validate."""
    doc = copy.deepcopy(tree) if tree is not None else read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        apply_override(doc, key, value)
    return parse_search(doc, source=str(path or ""))


def apply_override(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in the whole file; ``space.<param>.<field>`` knows params contain dots."""
    if key.split(".", 1)[0] not in SECTIONS:
        raise ConfigError(f"override {key}: first part must be one of {list(SECTIONS)}")
    if key.startswith("space."):
        rest = key[len("space."):]
        space = doc.setdefault("space", {}) or {}
        doc["space"] = space
        for name in sorted(space, key=len, reverse=True):
            if rest.startswith(name + "."):
                entry = space[name]
                if not isinstance(entry, dict):
                    raise ConfigError(f"override {key}: space.{name} is not a mapping")
                entry[rest[len(name) + 1:]] = value
                return
        if value is None:
            space.pop(rest, None)
        else:
            space[rest] = value
        return
    set_dotted(doc, key, value)


def parse_search(doc: dict[str, Any], source: str = "") -> SearchSpec:
    """Validate a whole search document (already overridden)."""
    unknown = set(doc) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown search-file section: {sorted(unknown)[0]} (allowed: {list(SECTIONS)})")
    base = doc.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("base: expected a mapping (a training config)")
    try:
        base_cfg = from_dict(base)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    search = _settings(SearchSettings, doc.get("search") or {}, "search")
    tracking = _settings(TrackingSettings, doc.get("tracking") or {}, "tracking")
    check_search(search)
    raw_space = doc.get("space") or {}
    if not isinstance(raw_space, dict):
        raise ConfigError("space: expected a mapping of dotted config keys to distributions")
    space = {key: parse_param(key, value) for key, value in raw_space.items()}
    for param in space.values():
        check_param_against_config(param, base_cfg)
        check_when(param, space)
    check_points(search.points_to_evaluate, space, base_cfg)
    check_sampler(search.sampler, space)
    if "attack.eps" in space and "eval.eps" not in space and base_cfg.eval.eps is None:
        raise ConfigError("space.attack.eps: the training eps is searched but base.eval.eps is not set, so trials "
                          "would be scored at different eps; set base.eval.eps (e.g. 1.0)")
    return SearchSpec(base=base, search=search, tracking=tracking, space=space, source=source)


def parse_param(key: str, value: Any) -> ParamSpec:
    """One ``space`` entry -> ParamSpec (type and range checks)."""
    where = f"space.{key}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping like {{type: float, low: 0.1, high: 1}}")
    allowed = {"type", "low", "high", "log", "step", "choices", "when"}
    extra = set(value) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown field {sorted(extra)[0]!r} (allowed: {sorted(allowed)})")
    kind = value.get("type")
    when = _parse_when(where, value.get("when"))
    if kind == "categorical":
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list 'choices'")
        return ParamSpec(key=key, type=kind, choices=tuple(choices), when=when)
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}: type must be float, int or categorical, got {kind!r}")
    low, high, step = value.get("low"), value.get("high"), value.get("step")
    for name, v in (("low", low), ("high", high)):
        if not is_number(v) or (kind == "int" and not float(v).is_integer()):
            raise ConfigError(f"{where}: {name} must be {'an integer' if kind == 'int' else 'a number'}, got {v!r}")
    if low >= high:
        raise ConfigError(f"{where}: empty range: low ({low}) must be < high ({high})")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got {low}")
    if step is not None and (not is_number(step) or step <= 0 or log):
        raise ConfigError(f"{where}: step must be a positive number (and not combined with log)")
    return ParamSpec(key=key, type=kind, low=low, high=high, log=log, step=step, when=when)


# ----------------------------------------------------------------------------- spaces for Optuna

def distributions(spec: SearchSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """A flat ``key -> distribution`` dict (only for unconditional spaces)."""
    if spec.conditional:
        raise ValueError("a conditional space needs define_by_run(), not a distribution dict")
    return {key: p.distribution() for key, p in spec.space.items()}


class DefineByRun:
    """Optuna define-by-run space: samples parents first, children only when their ``when`` holds.

    A picklable callable (Ray Tune pickles the searcher); it does no computation, as OptunaSearch
    requires, and returns None so that only the suggested values make up the trial's config.
    """

    def __init__(self, space: dict[str, ParamSpec]):
        self.params = list(space.values())

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for p in sorted(self.params, key=lambda q: bool(q.when)):
            if all(chosen.get(parent) in values for parent, values in p.when.items()):
                chosen[p.key] = p.suggest(trial)
        return None


def optuna_space(spec: SearchSpec) -> dict[str, Any] | DefineByRun:
    """What OptunaSearch takes: a distribution dict, or a define-by-run callable when conditional."""
    return DefineByRun(spec.space) if spec.conditional else distributions(spec)


# ----------------------------------------------------------------------------- helpers

def _settings(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping")
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown {section} key: {section}.{key}")
    kwargs = {}
    for key, value in values.items():
        default = _default(names[key])
        kwargs[key] = _coerce_setting(f"{section}.{key}", value, default)
    return cls(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _coerce_setting(key: str, value: Any, default: Any) -> Any:
    if value is None:
        if default is None or isinstance(default, tuple | dict):
            return default
        raise ConfigError(f"{key}: must not be null")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(default, tuple):
        value = [value] if isinstance(value, str | int | float | dict) else value
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {**default, **value}
    if isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _parse_when(where: str, when: Any) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where}.when: expected a mapping {{other_param: value or [values]}}")
    return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}


def _param_dict(p: ParamSpec) -> dict[str, Any]:
    d = {"type": p.type}
    if p.type == "categorical":
        d["choices"] = list(p.choices)
    else:
        d.update(low=p.low, high=p.high, log=p.log)
        if p.step is not None:
            d["step"] = p.step
    if p.when:
        d["when"] = {k: list(v) for k, v in p.when.items()}
    return d

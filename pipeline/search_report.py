"""The search driver's before and after: resolve paths and stores, then pick, re-evaluate and report
the best trial(s) (table, ``summary.json``, MLflow parent run with plots and the registered prompts).

Kept apart from ``pipeline/search.py`` (Tune wiring and the trainable) so each stays readable.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from pipeline import search_final, search_stores, tracking
from pipeline.config import ConfigError, from_dict
from pipeline.runs import redact, write_summary
from pipeline.search_space import SearchSpec

log = logging.getLogger("pipeline.search")
CTX = "capt"


@dataclass(frozen=True)
class Plan:
    """Everything resolved before Ray starts (absolute paths: Tune changes the working directory)."""

    out: Path
    base: dict[str, Any]
    storage_path: str
    experiment_path: str
    optuna_url: str
    tracking_uri: str
    experiment_id: str
    image_size: int


def prepare(spec: SearchSpec) -> Plan:
    """Resolve the output folder, data, model and stores; probe MLflow (fails fast when it is down)."""
    out = Path(spec.search.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_uri(spec.tracking.uri, out)
    tracking.probe(uri)  # first: a down server fails in seconds, before demo assets or Ray
    base = resolve_base(spec.base)
    storage = spec.search.storage_path or str(out / "ray_results")
    storage = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    optuna_url = search_stores.optuna_url(spec.search.optuna_storage, out)
    exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment or spec.search.name, out / "mlartifacts")
    size = image_size(from_dict(base).model.name)
    base = prepare_data(base, storage if "://" not in storage else str(out), size)
    return Plan(out=out, base=base, storage_path=storage, experiment_path=f"{storage.rstrip('/')}/{spec.search.name}",
                optuna_url=optuna_url, tracking_uri=uri, experiment_id=exp_id, image_size=size)


def prepare_data(base: dict[str, Any], storage: str, size: int) -> dict[str, Any]:
    """Point ``data.cache`` at ``<storage>/data_subsets`` (unless set) and build the base config's
    subsets there once, before any trial: trials then read only those (pipeline/data/subsets.py).
    A trial whose sampled ``data.*`` values select another subset builds it on first use."""
    from pipeline.task import prepare_subsets

    cfg = from_dict(base)
    if not cfg.data.cache:
        cfg = cfg.replace(**{"data.cache": str(Path(storage) / "data_subsets")})
    for role, folder in prepare_subsets(cfg.data, size).items():
        log.info("data: %s subset %s", role, folder)
    return cfg.to_dict()


def resolve_base(base: dict[str, Any]) -> dict[str, Any]:
    """``data.path: demo`` -> the cached demo assets; local paths made absolute and checked."""
    from pipeline.data import ShardSource

    cfg = from_dict(base)
    if cfg.data.path == "demo":
        from pipeline.demo import resolve_demo

        cfg = resolve_demo(cfg)
    over: dict[str, Any] = {}
    if cfg.data.path and not _remote(cfg.data.path):
        over["data.path"] = str(Path(cfg.data.path).expanduser().resolve())
    if cfg.data.cross_datasets:
        over["data.cross_datasets"] = [p if _remote(p) else str(Path(p).expanduser().resolve())
                                       for p in cfg.data.cross_datasets]
    if cfg.model.checkpoint:
        over["model.checkpoint"] = str(Path(cfg.model.checkpoint).expanduser().resolve())
        if not Path(over["model.checkpoint"]).is_file():
            raise ConfigError(f"base.model.checkpoint: file not found: {over['model.checkpoint']}")
    cfg = cfg.replace(**over) if over else cfg
    if not cfg.data.path:
        raise ConfigError("base.data.path: no shards folder given (a path, or 'demo' for the offline demo data)")
    if not _remote(cfg.data.path):
        ShardSource.open(cfg.data.path)  # raises a one-line error naming a missing / bad folder
    return cfg.to_dict()


def image_size(model_name: str) -> int:
    """The model's input size from its open_clip config (224 when it cannot be known here)."""
    import open_clip

    from pipeline.clip import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(model_name) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def optuna_storage(url: str) -> optuna.storages.BaseStorage:
    """The study's storage (PostgreSQL calls retried across a restart): ``pipeline/search_stores.py``."""
    return search_stores.optuna_storage(url)


def check_fresh(spec: SearchSpec, plan: Plan, storage: Any, *, resume: bool, restorable: bool) -> None:
    """Refuse to mix a new search into an old one; clear a study that a killed driver left empty."""
    name = spec.search.name
    has_study = name in optuna.get_all_study_names(storage)
    if resume and restorable:
        return
    if not resume and (restorable or has_study):
        raise ConfigError(f"search.name: search {name!r} already exists ({plan.experiment_path} / Optuna study); "
                          "pass --resume to continue it, or choose another search.name or search.out")
    if has_study:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        if any(t.state.is_finished() for t in trials):
            raise ConfigError(f"--resume: no Tune experiment to restore at {plan.experiment_path}, but Optuna study "
                              f"{name!r} has finished trials; restore that folder or choose another search.name")
        log.warning("deleting Optuna study %r: %d unfinished trial(s) and no saved Tune state", name, len(trials))
        optuna.delete_study(study_name=name, storage=storage)


def start_parent(spec: SearchSpec, plan: Plan) -> str:
    cfg = from_dict(plan.base)
    s = spec.search
    params = {"search.name": s.name, "search.objectives": ",".join(s.objectives), "search.num_samples": s.num_samples,
              "search.max_concurrent": s.max_concurrent, "search.seed": s.seed, "search.scheduler": s.scheduler,
              "search.resources": s.resources, "search.space": ",".join(spec.space), "method": cfg.method,
              "optim.epochs": cfg.optim.epochs, "eval.attack": cfg.eval.attack, "eval.steps": cfg.eval.steps,
              "eps.unit": "1/255 of the pixel range (L-inf)"}
    doc = {**spec.to_dict(), "base": plan.base}
    run_id, reused = tracking.start_parent(plan.tracking_uri, plan.experiment_id, search_key=plan.experiment_path,
                                           run_name=s.name, tags=tags(cfg), params=params, config=doc)
    log.info("MLflow parent run %s (%s)", run_id, "resumed" if reused else "new")
    return run_id


def tags(cfg: Any) -> dict[str, str]:
    return {"method": cfg.method, "model": cfg.model.name, "data": Path(cfg.data.path).name or cfg.data.path}


def trial_context(spec: SearchSpec, plan: Plan, parent_id: str) -> dict[str, Any]:
    """What every trial receives besides its sampled values (plain, picklable values)."""
    cfg = from_dict(plan.base)
    fixed = {"method": cfg.method, "model.name": cfg.model.name, "data.path": cfg.data.path, "data.shots": cfg.data.shots,
             "optim.epochs": cfg.optim.epochs, "attack.eps": cfg.attack.eps, "attack.steps": cfg.attack.steps}
    fixed = {k: v for k, v in fixed.items() if k not in spec.space}
    return {"base": plan.base, "image_size": plan.image_size, "tracking_uri": plan.tracking_uri,
            "experiment_id": plan.experiment_id, "parent_run_id": parent_id, "objectives": list(spec.search.objectives),
            "tags": {**tracking.source_tags(), **tags(cfg)}, "fixed_params": fixed, "inject_failure": spec.search.inject_failure}


# ----------------------------------------------------------------------------- after the trials

def trial_rows(grid: Any, spec: SearchSpec) -> list[dict[str, Any]]:
    """One row per Tune trial: id, state (COMPLETE / PRUNED / FAIL), params, last metrics, checkpoint."""
    rows = []
    for r in grid:
        metrics = r.metrics or {}
        state = "FAIL" if r.error else ("COMPLETE" if all(m in metrics for m in spec.metrics) else "PRUNED")
        match = re.search(r"_([0-9a-f]{5,8}_\d{5})", Path(str(r.path)).name)
        rows.append({"trial_id": metrics.get("trial_id") or (match.group(1) if match else Path(str(r.path)).name),
                     "state": state, "params": {k: v for k, v in (r.config or {}).items() if k != CTX},
                     "epochs": metrics.get("epoch"), "clean_acc": metrics.get("clean_acc"),
                     "robust_acc": metrics.get("robust_acc"), "checkpoint": r.checkpoint,
                     "error": str(r.error).strip().splitlines()[0][:300] if r.error else None})
    return sorted(rows, key=lambda row: row["trial_id"])


def pareto_front(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Rows not dominated on ``keys`` (all maximised)."""
    def dominates(a: dict, b: dict) -> bool:
        return all(a[k] >= b[k] for k in keys) and any(a[k] > b[k] for k in keys)
    return [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]


def select_best(rows: list[dict[str, Any]], spec: SearchSpec) -> list[dict[str, Any]]:
    """Best by robust accuracy (one objective: top_k, default 1); two objectives: the Pareto front."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    keys = list(spec.search.objectives)
    first = "robust_acc" if "robust_acc" in keys else keys[0]
    order = sorted(done, key=lambda r: (r[first], r["clean_acc"], r["robust_acc"]), reverse=True)
    if len(keys) > 1:
        front = pareto_front(done, keys)
        order = [r for r in order if r in front]
        return order[: spec.search.top_k] if spec.search.top_k else order
    return order[: spec.search.top_k or 1]


def print_table(rows: list[dict[str, Any]]) -> None:
    """The chosen trials, to stdout: every final metric (each attack at each eps, in 1/255) as a column,
    then each trial's parameters with their whole names."""
    from pipeline.search_notes import _eps_order

    cols = ["clean_acc", "robust_acc", *sorted({k for r in rows for k in r["final"] if k != "clean_acc"},
                                               key=_eps_order)]
    zero = rows[0].get("zero_shot") if rows else None
    width = max([len(c) for c in cols] + [10])
    print(f"\n{'trial':<22} " + " ".join(f"{c:>{width}}" for c in cols))
    for r in rows:
        vals = [r["final"].get("clean_acc"), r.get("robust_acc"), *[r["final"].get(c) for c in cols[2:]]]
        print(f"{r.get('name') or r['trial_id']:<22} " + " ".join(f"{_fmt(v):>{width}}" for v in vals))
    if zero:
        vals = [zero.get("clean_acc"), None, *[zero.get(c) for c in cols[2:]]]
        print(f"{'zero-shot CLIP':<22} " + " ".join(f"{_fmt(v):>{width}}" for v in vals))
    print("(robust_acc: the per-epoch monitor at each trial's eval eps; eps in 1/255)")
    for r in rows:
        print(f"{r.get('name') or r['trial_id']}: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(r["params"].items())))
    print()


def param_importances(study: optuna.Study, spec: SearchSpec) -> dict[str, float]:
    """Optuna importances (its default evaluator) of the searched parameters for robust accuracy (needs >= 2 complete trials)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        log.info("parameter importances skipped: %d complete trial(s), need >= 2", len(done))
        return {}
    idx = list(spec.search.objectives).index("robust_acc") if "robust_acc" in spec.search.objectives else 0
    target = (lambda t: t.values[idx]) if len(spec.search.objectives) > 1 else None
    try:
        with warnings.catch_warnings():  # "some regimes have < 2 trials": expected in small searches
            warnings.simplefilter("ignore", UserWarning)
            values = optuna.importance.get_param_importances(study, target=target)
        return {k: float(v) for k, v in values.items()}
    except Exception as exc:  # e.g. no parameter varies across the complete trials
        log.info("parameter importances skipped: %s", str(exc).splitlines()[0])
        return {}


def finish(spec: SearchSpec, plan: Plan, parent_id: str, storage: Any, grid: Any) -> dict[str, Any]:
    """Pick, re-evaluate, print, plot, register, describe, and write ``summary.json``; returns the summary."""
    from pipeline.search_plots import log_plots

    uri = plan.tracking_uri
    rows = trial_rows(grid, spec)
    runs = {r.data.tags.get(tracking.TRIAL_TAG): r for r in tracking.trial_runs(uri, plan.experiment_id, parent_id)}
    for row in rows:
        run = runs.get(row["trial_id"])
        row["run_id"] = run.info.run_id if run else None
        row["name"] = (run.info.run_name or "").split(" · ")[0] if run else row["trial_id"]
    study = optuna.load_study(study_name=spec.search.name, storage=storage)
    best = search_final.final_evaluation(spec, trial_context(spec, plan, parent_id), select_best(rows, spec))
    print_table(best)
    importances = param_importances(study, spec)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    metrics = dict(best[0]["final"], robust_acc=best[0]["robust_acc"]) if best else {}
    zero = (best[0].get("zero_shot") or {}) if best else {}
    tracking.log_metrics(uri, parent_id, {**{f"best_{k}": v for k, v in metrics.items()},
                                          **{f"zeroshot_{k}": v for k, v in zero.items()},
                                          **{f"n_{k.lower()}": v for k, v in counts.items()},
                                          **{f"importance_{k}": v for k, v in importances.items()}})
    log_plots(uri, parent_id, plan.out / "plots", rows, best, importances, list(spec.search.final_attacks))
    registered = _register(spec, plan, parent_id, best)
    _describe(spec, plan, parent_id, rows, best, counts, registered)
    states = {s.name: n for s in optuna.trial.TrialState
              if (n := len(study.get_trials(deepcopy=False, states=(s,))))}
    doc = {**spec.to_dict(), "base": plan.base}
    url = tracking.ui_url(uri, plan.experiment_id)
    summary_path = write_summary(
        plan.out, command="search", config=doc, metrics=metrics, zero_shot=zero,
        best=[_public(r) for r in best], trials=[_public(r) for r in rows], counts=counts, importances=importances,
        optuna={"study": spec.search.name, "storage": redact(plan.optuna_url), "states": states},
        mlflow={"tracking_uri": redact(uri), "experiment_id": plan.experiment_id, "parent_run_id": parent_id,
                "best_run_id": best[0].get("run_id") if best else None, "registered_model": registered,
                "ui": tracking.ui_command(uri), "url": url},
        tune={"experiment_path": plan.experiment_path})
    tracking.log_artifact(uri, parent_id, summary_path)
    tracking.finish_run(uri, parent_id)
    local = "" if uri.startswith(("http://", "https://")) else f"{tracking.ui_command(uri)}, then open "
    print(f"summary: {summary_path}\nbrowse:  {local}{url}")
    return {"path": str(summary_path), "best": best, "rows": rows, "counts": counts}


def _describe(spec: SearchSpec, plan: Plan, parent_id: str, rows: list[dict[str, Any]], best: list[dict[str, Any]],
              counts: dict[str, int], registered: dict[str, str] | None) -> None:
    """The parent run's and the experiment's descriptions; the parent's tag naming the best trial's run."""
    from pipeline.search_notes import search_note

    kw = {"experiment_id": plan.experiment_id, "parent_id": parent_id, "rows": rows, "best": best, "counts": counts,
          "registered": registered}
    tags = {tracking.BEST_TAG: best[0]["run_id"], "capt.best_trial": best[0]["name"]} \
        if best and best[0].get("run_id") else {}
    tracking.set_note(plan.tracking_uri, parent_id, search_note(spec, plan.base, **kw), tags)
    tracking.set_experiment_note(plan.tracking_uri, plan.experiment_id,
                                 search_note(spec, plan.base, **kw, for_experiment=True))


def _register(spec: SearchSpec, plan: Plan, parent_id: str, best: list[dict[str, Any]]) -> dict[str, str] | None:
    """The best prompts under the parent's ``best_prompts/``; with ``tracking.register_model``, the champion
    model logged in the best trial's run and registered (``pipeline/champion.py``)."""
    if not best:
        return None
    path = plan.out / "best_prompts" / "prompts.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(best[0]["prompts"])
    tracking.log_artifact(plan.tracking_uri, parent_id, path, "best_prompts")
    name, b = spec.tracking.register_model, best[0]
    if not name:
        return None
    if not b.get("run_id"):
        log.warning("best trial %s has no MLflow run: champion not registered", b["trial_id"])
        return None
    from pipeline import champion

    cfg = from_dict(plan.base).replace(**b["params"])
    link = f"#/experiments/{plan.experiment_id}/runs/{b['run_id']}"
    text = champion.version_description(name, search=spec.search.name, best=b, cfg=cfg, link=link,
                                        attacks=list(spec.search.final_attacks))
    version = champion.register_champion(plan.tracking_uri, b["run_id"], path, name, text)
    log.info("registered %s version %s as @%s (model logged in the best trial's run %s)", name, version,
             tracking.CHAMPION, b["run_id"])
    return {"name": name, "version": version, "alias": tracking.CHAMPION, "run_id": b["run_id"]}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("checkpoint", "prompts")}


def _remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


"""The search driver's before and after: resolve paths and stores, then pick, re-evaluate and report
the best trial(s) (table, ``summary.json``, MLflow parent run with plots and the registered prompts).

Kept apart from ``pipeline/search.py`` (Tune wiring and the trainable) so each stays readable.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import torch

from pipeline import search_stores, tracking
from pipeline.config import ConfigError, eval_eps, from_dict
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
              "optim.epochs": cfg.optim.epochs}
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
            "tags": tags(cfg), "fixed_params": fixed, "inject_failure": spec.search.inject_failure}


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


def _final_eval(ctx: dict[str, Any], params: dict[str, Any], checkpoint: Any, attacks: list[str],
                eps_list: list[float]) -> tuple[dict[str, float], bytes]:
    """A Ray task (same resources as a trial): strong attacks on the trial's final prompts."""
    import tempfile

    from pipeline.evaluate import final_metrics
    from pipeline.task import load_task
    from pipeline.train import build_model, resolve_device

    cfg = from_dict(ctx["base"]).replace(**params)
    task = load_task(cfg.data, ctx["image_size"])
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)  # as train() does: the same CLIP when its weights are randomly initialised
    model = build_model(cfg, task.classnames, task.templates, device)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.to_directory(d)
        state = torch.load(Path(d) / "last.pt", map_location="cpu", weights_only=True)
    model.load_prompt_state(state["prompts"], source="search checkpoint")
    model.eval()
    metrics = final_metrics(model, task.test_x, task.test_y, attacks=attacks, eps_list=eps_list,
                            primary_eps=eval_eps(cfg), batch_size=cfg.eval.batch_size, device=device,
                            autoattack_limit=cfg.eval.autoattack_limit)
    buf = io.BytesIO()
    torch.save({"prompts": state["prompts"], "config": cfg.to_dict(), "classnames": task.classnames,
                "templates": task.templates}, buf)
    return metrics, buf.getvalue()


def final_evaluation(spec: SearchSpec, ctx: dict[str, Any], chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Re-evaluate the chosen trials, the first also at ``search.final_eps``: one Ray task per
    (trial, eps), all in parallel on the trials' resources, merged per trial."""
    res = spec.search.resources
    task = ray.remote(_final_eval).options(num_cpus=res.get("cpu", 1), num_gpus=res.get("gpu", 0), max_retries=1)
    eps = [eval_eps(from_dict(ctx["base"]).replace(**row["params"])) for row in chosen]
    jobs = []  # (row index, ref)
    for i, row in enumerate(chosen):
        for e in (sorted({eps[i], *spec.search.final_eps}) if i == 0 else [eps[i]]):
            jobs.append((i, task.remote(ctx, row["params"], row["checkpoint"], list(spec.search.final_attacks), [e])))
    log.info("re-evaluating %d trial(s) with %s: %d Ray task(s)", len(chosen),
             ", ".join(spec.search.final_attacks), len(jobs))
    merged: list[dict[str, float]] = [{} for _ in chosen]
    prompts: list[bytes | None] = [None for _ in chosen]
    for (i, _), (metrics, blob) in zip(jobs, ray.get([ref for _, ref in jobs]), strict=True):
        merged[i].update(metrics)
        prompts[i] = prompts[i] or blob
    return [{**row, "eps": e, "final": m, "prompts": b} for row, e, m, b in zip(chosen, eps, merged, prompts, strict=True)]


def print_table(rows: list[dict[str, Any]], attacks: list[str]) -> None:
    """The chosen trials, to stdout."""
    cols = ["clean", "robust", *attacks]
    print(f"\n{'trial':<16} {'params':<60} " + " ".join(f"{c:>10}" for c in cols))
    for r in rows:
        params = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in sorted(r["params"].items()))
        vals = [r["final"].get("clean_acc"), r.get("robust_acc"), *[r["final"].get(f"{a}_acc") for a in attacks]]
        print(f"{r['trial_id']:<16} {params[:60]:<60} " + " ".join(f"{_fmt(v):>10}" for v in vals))
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
    """Pick, re-evaluate, print, plot, register, and write ``summary.json``; returns the summary."""
    rows = trial_rows(grid, spec)
    study = optuna.load_study(study_name=spec.search.name, storage=storage)
    ctx = trial_context(spec, plan, parent_id)
    best = final_evaluation(spec, ctx, select_best(rows, spec))
    print_table(best, list(spec.search.final_attacks))
    importances = param_importances(study, spec)
    uri = plan.tracking_uri
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    metrics = dict(best[0]["final"], robust_acc=best[0]["robust_acc"]) if best else {}
    tracking.log_metrics(uri, parent_id, {**{f"best_{k}": v for k, v in metrics.items()},
                                          **{f"n_{k.lower()}": v for k, v in counts.items()},
                                          **{f"importance_{k}": v for k, v in importances.items()}})
    log_plots(uri, parent_id, plan.out / "plots", rows, best, importances, spec)
    registered = _register(spec, plan, parent_id, best)
    states = {s.name: n for s in optuna.trial.TrialState
              if (n := len(study.get_trials(deepcopy=False, states=(s,))))}
    doc = {**spec.to_dict(), "base": plan.base}
    summary_path = write_summary(
        plan.out, command="search", config=doc, metrics=metrics,
        best=[_public(r) for r in best], trials=[_public(r) for r in rows], counts=counts, importances=importances,
        optuna={"study": spec.search.name, "storage": redact(plan.optuna_url), "states": states},
        mlflow={"tracking_uri": redact(uri), "experiment_id": plan.experiment_id, "parent_run_id": parent_id,
                "registered_model": registered, "ui": tracking.ui_command(uri)},
        tune={"experiment_path": plan.experiment_path})
    tracking.log_artifact(uri, parent_id, summary_path)
    tracking.finish_run(uri, parent_id)
    print(f"summary: {summary_path}\nbrowse:  {tracking.ui_command(uri)}")
    return {"path": str(summary_path), "best": best, "rows": rows, "counts": counts}


def _register(spec: SearchSpec, plan: Plan, parent_id: str, best: list[dict[str, Any]]) -> dict[str, str] | None:
    if not best:
        return None
    path = plan.out / "best_prompts" / "prompts.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(best[0]["prompts"])
    if not spec.tracking.register_model:
        tracking.log_artifact(plan.tracking_uri, parent_id, path, "best_prompts")
        return None
    version = tracking.register_prompts(plan.tracking_uri, parent_id, path, spec.tracking.register_model)
    log.info("registered %s version %s as @%s", spec.tracking.register_model, version, tracking.CHAMPION)
    return {"name": spec.tracking.register_model, "version": version, "alias": tracking.CHAMPION}


def log_plots(uri: str, run_id: str, folder: Path, rows: list[dict[str, Any]], best: list[dict[str, Any]],
              importances: dict[str, float], spec: SearchSpec) -> None:
    """Trade-off (all trials, Pareto front marked), accuracy vs eps (best trial), importances: PNG + MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figures = {"tradeoff.png": _tradeoff(plt, rows), "importances.png": _importances(plt, importances)}
    if best:
        figures["acc_vs_eps.png"] = _acc_vs_eps(plt, best[0], list(spec.search.final_attacks))
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
        tracking.log_figure(uri, run_id, fig, f"plots/{name}")
        plt.close(fig)


def _tradeoff(plt: Any, rows: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(5, 4))
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [r for r in rows if r["state"] == state and r["clean_acc"] is not None and r["robust_acc"] is not None]
        ax.scatter([r["clean_acc"] for r in pts], [r["robust_acc"] for r in pts], marker=marker, label=state.lower())
    done = [r for r in rows if r["state"] == "COMPLETE"]
    front = sorted(pareto_front(done, ["clean_acc", "robust_acc"]), key=lambda r: r["clean_acc"])
    if front:
        ax.plot([r["clean_acc"] for r in front], [r["robust_acc"] for r in front], "r--", marker="o", mfc="none",
                ms=12, label=f"Pareto front ({len(front)})")  # rings: visible with a one-point front too
    ax.set(xlabel="clean accuracy", ylabel="robust accuracy (per-epoch monitor)", title="trials")
    ax.legend()
    return fig


def _acc_vs_eps(plt: Any, best: dict[str, Any], attacks: list[str]) -> Any:
    fig, ax = plt.subplots(figsize=(5, 4))
    for attack in attacks:
        pts = []
        for key, value in best["final"].items():
            if key == f"{attack}_acc":
                pts.append((best["eps"], value))
            elif key.startswith(f"{attack}_acc_eps"):
                pts.append((float(key.rsplit("eps", 1)[1]), value))
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=attack)
    ax.axhline(best["final"].get("clean_acc", 0.0), color="gray", ls=":", label="clean")
    ax.set(xlabel="eps (1/255)", ylabel="accuracy", title=f"best trial {best['trial_id']}")
    ax.legend()
    return fig


def _importances(plt: Any, importances: dict[str, float]) -> Any:
    if not importances:
        return None
    fig, ax = plt.subplots(figsize=(5, 0.4 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (Optuna default evaluator)", title="hyperparameter importances")
    return fig


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("checkpoint", "prompts")}


def _remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


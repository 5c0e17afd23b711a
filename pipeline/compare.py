"""``capt compare``: every method side by side under one protocol, through Ray Tune and MLflow.

A compare file (``configs/compare/*.yaml``) holds a shared ``base`` config, the ``methods`` with their
overrides, ``seeds``, the ``protocols`` (``few_shot``: all classes, evaluated on the test split and
zero-shot on ``data.cross_datasets``; ``base_to_new``: trained on the base half of the classes,
evaluated on base and new) and an optional ``tapt`` stage run on the best training-time method's
prompts. Every (method, protocol, seed) cell is one Ray Tune trial (a grid, no searcher) and one
MLflow child run; the driver writes ``table.md``, ``table.csv`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.compare_table import aggregate, honesty_problems, to_csv, to_markdown
from pipeline.config import ConfigError, from_dict, read_yaml, set_dotted
from pipeline.runs import write_summary

log = logging.getLogger(__name__)
PROTOCOLS = {"few_shot": {}, "base_to_new": {"data": {"classes": "base"}}}
_TOP = {"base", "methods", "seeds", "protocols", "tapt", "compare", "tracking"}


def load_compare(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Read, override (``--set compare.out=...``) and validate a compare file; resolve every cell's config."""
    from pipeline.config import parse_override
    from pipeline.demo import resolve_demo

    doc = read_yaml(path)
    for item in overrides:
        set_dotted(doc, *parse_override(item))
    unknown = set(doc) - _TOP
    if unknown:
        raise ConfigError(f"compare file {path}: unknown section(s) {sorted(unknown)}")
    methods = doc.get("methods") or {}
    if not methods:
        raise ConfigError(f"compare file {path}: `methods` is empty")
    protocols = _protocols(doc.get("protocols"))
    cells = []
    for method, extra in methods.items():
        for protocol, p_extra in protocols.items():
            for seed in doc.get("seeds") or [0]:
                tree = _merge(copy.deepcopy(doc.get("base") or {}), copy.deepcopy(p_extra))
                tree = _merge(_merge(tree, copy.deepcopy(extra or {})), PROTOCOLS[protocol])
                tree = _merge(tree, {"method": method, "run": {"seed": seed}, "data": {"seed": seed}})
                try:
                    cfg = resolve_demo(from_dict(tree))
                except ConfigError as exc:
                    raise ConfigError(f"methods.{method}: {exc}") from None
                cells.append({"method": method, "protocol": protocol, "seed": seed, "config": cfg.to_dict(),
                              "key": f"{method}-{protocol}-s{seed}"})
    settings = {"name": "compare", "out": "runs/compare", "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2,
                **(doc.get("compare") or {})}
    settings["out"] = str(Path(settings["out"]).resolve())
    return {"cells": cells, "methods": list(methods), "settings": settings, "tapt": doc.get("tapt"),
            "tracking": doc.get("tracking") or {}, "source": str(Path(path).resolve()), "doc": doc}


def _protocols(value: Any) -> dict[str, dict[str, Any]]:
    """``protocols``: a list of names, or a mapping name -> config overrides for that protocol's cells
    (e.g. no AutoAttack and no cross-dataset evaluation in ``base_to_new``, whose table columns show
    neither); method overrides apply on top of them."""
    items = {name: {} for name in value} if isinstance(value, list) else dict(value or {"few_shot": {}})
    for name, extra in items.items():
        if name not in PROTOCOLS:
            raise ConfigError(f"protocols: unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
        if not isinstance(extra or {}, dict):
            raise ConfigError(f"protocols.{name}: expected a mapping of config overrides, got {extra!r}")
        items[name] = extra or {}
    return items


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    for k, v in top.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


# ----------------------------------------------------------------------------- the trial

def cell_main(config: dict[str, Any]) -> None:
    """One Tune trial: train and evaluate a cell (or run TAPT on a trained cell), log to MLflow."""
    import torch
    from ray import tune

    from pipeline.train import resolve_device

    cell, ctx = config["cell"], config["ctx"]
    torch.set_num_threads(max(1, int(ctx["cpus"])))  # a trial's share; more threads only contend
    run = tracking.TrialRun(ctx["uri"], ctx["experiment_id"], ctx["parent_id"], cell["key"],
                            run_name=cell["key"], tags={**ctx.get("source_tags", {}), "method": cell["method"],
                                                         "protocol": cell["protocol"], "seed": str(cell["seed"])})
    try:
        cfg = from_dict(cell["config"])
        device = resolve_device(cfg.run.device)
        work = Path(ctx["out"]) / "cells" / cell["key"]
        if cell.get("tapt_of"):
            metrics = _tapt_cell(cfg, cell, ctx, work, device)
        else:
            metrics = _train_cell(cfg, run, work, device, lambda m: tune.report(m))
        tracking.log_metrics(ctx["uri"], run.run_id, metrics)
        if (work / "prompts.pt").is_file():
            run.log_file(work / "prompts.pt")
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
    tune.report({**metrics, "run_id": run.run_id})


def _train_cell(cfg, run, work: Path, device, report) -> dict[str, float]:
    from pipeline.clip import image_size_of
    from pipeline.protocol import final_evaluation
    from pipeline.task import load_task
    from pipeline.train import train

    run.log_params({"method": cfg.method, "design": cfg.prompt.design, "objective": cfg.loss.objective,
                    "eps": cfg.attack.eps, "seed": cfg.run.seed, "classes": cfg.data.classes})
    run.log_config(cfg.to_dict())
    size = image_size_of(cfg.model.name)
    task = load_task(cfg.data, size)

    def on_epoch(metrics: dict[str, Any], _ckpt: Any) -> None:
        run.log_epoch(metrics, metrics["epoch"])
        report({k: v for k, v in metrics.items() if isinstance(v, int | float)})

    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, task, out_dir=work, report=on_epoch, device=device)
    cost = {"train_seconds": time.perf_counter() - wall, "train_cpu_seconds": time.process_time() - cpu}
    metrics = final_evaluation(cfg, result.model, task, device, image_size=size)
    return {**metrics, **cost}


def _tapt_cell(cfg, cell, ctx, work: Path, device) -> dict[str, float]:
    """TAPT on a trained cell's prompts: the paper protocol (PGD-100 transfer) and the adaptive attack."""
    from pipeline.attacks import build_attack
    from pipeline.runs import load_run
    from pipeline.tapt import TaptConfig, TaptEvalConfig, evaluate_tapt
    from pipeline.tapt_stats import compute_stats, resolve_layers
    from pipeline.task import load_task

    base_cfg, model = load_run(Path(ctx["out"]) / "cells" / cell["tapt_of"], device)
    opts = dict(ctx.get("tapt") or {})
    ev = TaptEvalConfig(eps=base_cfg.attack.eps, attack_steps=int(opts.pop("attack_steps", 100)),
                        adaptive_steps=int(opts.pop("adaptive_steps", 10)), seed=cell["seed"])
    tcfg = TaptConfig(**{k: v for k, v in opts.items() if k not in ("method",)})
    task = load_task(base_cfg.data, model.image_size)
    layers = resolve_layers(tcfg.layers, model.n_vision_layers)
    attack = build_attack("pgd", eps=base_cfg.attack.eps_px, steps=10, module=model, keep_best=False)
    stats = compute_stats(model, task.train_x, task.train_y, layers, attack=attack, device=device)
    t0 = time.perf_counter()
    m = evaluate_tapt(model, task.test_x, task.test_y, stats, tcfg, ev, device=device)
    return {"clean_acc": m["tapt_clean_acc"], "pgd100_acc": m["tapt_robust_acc"],
            "adaptive_robust_acc": m.get("adaptive_robust_acc"), "base_clean_acc_no_tapt": m["clean_acc"],
            "base_robust_acc_no_tapt": m["robust_acc"], "tapt_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the driver

def run_compare(plan: dict[str, Any]) -> dict[str, Any]:
    """Run every cell on Ray, then the TAPT stage; write the table; return the summary."""
    from pipeline.compare_ray import run_cells

    s = plan["settings"]
    out = Path(s["out"])
    uri = tracking.resolve_uri(plan["tracking"].get("uri"), out)
    tracking.probe(uri)
    exp_id = tracking.ensure_experiment(uri, plan["tracking"].get("experiment") or s["name"], out / "mlartifacts")
    parent_id, _ = tracking.start_parent(uri, exp_id, search_key=f"compare:{s['name']}:{out}", run_name=s["name"],
                                         tags={"kind": "compare"}, params={"methods": ",".join(plan["methods"])},
                                         config=plan["doc"])
    ctx = {"uri": uri, "experiment_id": exp_id, "parent_id": parent_id, "out": str(out),
           "cpus": s["resources"].get("cpu", 1), "tapt": plan.get("tapt"), "source_tags": tracking.source_tags()}
    t0 = time.perf_counter()
    cells = run_cells(plan["cells"], ctx, s)
    if plan.get("tapt"):
        cells += run_cells(_tapt_cells(plan, cells), ctx, s)
    methods = plan["methods"] + sorted({c["method"] for c in cells if c["method"] not in plan["methods"]})
    rows = aggregate(cells, methods)
    problems = honesty_problems(cells)
    link = f"{uri}#/experiments/{exp_id}/runs/{{run_id}}" if uri.startswith("http") else None
    (out / "table.md").write_text(to_markdown(rows, run_link=link))
    (out / "table.csv").write_text(to_csv(rows))
    for name in ("table.md", "table.csv"):
        tracking.log_artifact(uri, parent_id, out / name)
    tracking.finish_run(uri, parent_id)
    summary = {"cells": [{k: c[k] for k in ("method", "protocol", "seed", "metrics", "run_id")} for c in cells],
               "honesty_problems": problems, "wall_seconds": time.perf_counter() - t0,
               "mlflow_ui": tracking.ui_command(uri), "table": str(out / "table.md")}
    write_summary(out, command="compare", config={"source": plan["source"], **plan["doc"]}, metrics={},
                  **summary)
    return summary


def _tapt_cells(plan: dict[str, Any], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TAPT on the few-shot prompts of the training-time method with the best mean PGD-100 accuracy."""
    wanted = plan["tapt"].get("method", "best")
    trained = [c for c in cells if c["protocol"] == "few_shot" and c["method"] != "zeroshot"]
    if wanted == "best":
        scores: dict[str, list[float]] = {}
        for c in trained:
            scores.setdefault(c["method"], []).append(c["metrics"].get("pgd100_acc") or 0.0)
        wanted = max(scores, key=lambda k: sum(scores[k]) / len(scores[k]))
    return [{**c, "method": f"{wanted}+tapt", "key": f"{wanted}+tapt-few_shot-s{c['seed']}", "tapt_of": c["key"]}
            for c in trained if c["method"] == wanted]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("compare", help="every method side by side: one protocol, seeds, one table")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="output folder (= --set compare.out=...)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    overrides = list(args.set) + ([f"compare.out={args.out}"] if args.out else [])
    plan = load_compare(args.config, overrides)
    summary = run_compare(plan)
    print(Path(summary["table"]).read_text())
    for p in summary["honesty_problems"]:
        print(f"WARNING honesty rule broken: {p}")
    print(f"table: {summary['table']}\nsummary: {Path(plan['settings']['out']) / 'summary.json'}")
    print(summary["mlflow_ui"])
    return 0

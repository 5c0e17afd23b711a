"""``capt compare``: every method side by side under one protocol, through Ray Tune and MLflow.

A compare file (``configs/compare/*.yaml``) holds a shared ``base`` config, the ``methods`` with their
overrides, ``seeds``, the ``protocols`` (``few_shot``: all classes, evaluated on the test split and
zero-shot on ``data.cross_datasets``; ``base_to_new``: trained on the base half of the classes,
evaluated on base and new) and an optional ``tapt`` stage run on the best training-time method's
prompts. Every (method, protocol, seed) cell is one Ray Tune trial (a grid, no searcher) and one
MLflow child run; the driver writes ``table.md``, ``table.csv`` and ``summary.json``.

Modules, the dependency running one way: this driver -> :mod:`pipeline.compare_plan` (the file,
resolved into cells), :mod:`pipeline.compare_tuning` (fair tuning), :mod:`pipeline.compare_tapt` (the
TAPT stage and the search of its settings), :mod:`pipeline.compare_checks` (strong-attack checks),
:mod:`pipeline.compare_ray` (Ray Tune) -> :mod:`pipeline.compare_cell` (one trial), and
:mod:`pipeline.compare_table` / :mod:`pipeline.compare_stats` (the table and its statistics).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.compare_checks import check_cells, checks_markdown
from pipeline.compare_plan import PROTOCOLS, load_compare  # noqa: F401  (re-exported: the plan's API)
from pipeline.compare_stats import paired_comparisons, paired_markdown
from pipeline.compare_table import aggregate, columns, cross_average, honesty_problems, to_csv, to_markdown
from pipeline.compare_tapt import (
    pick,
    search_cells,
    search_markdown,
    searched_variant,
    tapt_cells,
    tapt_gains,
    tapt_gains_markdown,
    write_search,
)
from pipeline.compare_tuning import apply_tuned, run_tuning, tuning_notes
from pipeline.config import from_dict
from pipeline.runs import write_summary

log = logging.getLogger(__name__)
SPREAD_NOTE = ("Cells: mean ± half-width of the 95% Student-t interval of the mean over the seeds "
               "(no interval with one seed); accuracies in percent.")


def run_compare(plan: dict[str, Any]) -> dict[str, Any]:
    """Run the tuning, every cell on Ray, the TAPT stage and the checks; write the table; return the summary."""
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
           "cpus": s["resources"].get("cpu", 1), "tapt": plan.get("tapt"),
           "source_tags": tracking.source_tags()}
    t0 = time.perf_counter()
    chosen = run_tuning(plan["tuning"], out) if plan.get("tuning") else {}
    cells = run_cells(prepare_data(apply_tuned(plan["cells"], chosen), out / "data_subsets"), ctx, s)
    attack = table_attack(plan)
    searched = None
    if plan.get("tapt"):
        searched = _tapt_search(plan, cells, f"{attack}_acc", ctx, out)
        extra = searched_variant(plan, searched) if searched else None
        cells += run_cells(tapt_cells(plan, cells, f"{attack}_acc", extra), ctx, s)
    checks = run_cells(check_cells(plan.get("checks") or {}, cells, s.get("reference", "capt"), f"{attack}_acc"),
                       ctx, s)
    link = f"{uri}#/experiments/{exp_id}/runs/{{run_id}}" if uri.startswith("http") else None
    problems = honesty_problems(cells + checks)
    paired = write_table(plan, cells, checks, {"training": chosen, "tapt": searched}, out, link, problems)
    for name in ("table.md", "table.csv"):
        tracking.log_artifact(uri, parent_id, out / name)
    tracking.finish_run(uri, parent_id)
    keep = ("method", "protocol", "seed", "metrics", "run_id", "tapt_of")
    summary = {"cells": [{k: c[k] for k in keep if k in c} for c in cells],
               "checks": [{k: c[k] for k in keep if k in c} for c in checks],
               "honesty_problems": problems, "paired_comparisons": paired, "tuning": chosen, "tapt_search": searched,
               "wall_seconds": time.perf_counter() - t0,
               "mlflow_ui": tracking.ui_command(uri), "table": str(out / "table.md")}
    write_summary(out, command="compare", config={"source": plan["source"], **plan["doc"]}, metrics={},
                  **summary)
    return summary


def write_table(plan: dict[str, Any], cells: list[dict[str, Any]], checks: list[dict[str, Any]],
                chosen: dict[str, Any], out: Path, link: str | None, problems: list[str]) -> list[dict[str, Any]]:
    """``table.md`` (table, spread note, tuning, paired comparisons, checks, honesty rules) and
    ``table.csv``; ``chosen``: {"training": the tuning's picks, "tapt": the TAPT search's pick or None}.
    Returns the paired comparisons."""
    attack = table_attack(plan)
    methods = plan["methods"] + sorted({c["method"] for c in cells if c["method"] not in plan["methods"]})
    rows = aggregate(cells, methods, columns(attack))
    paired = _paired(plan, cells, methods, attack)
    honesty = (f"Honesty rules (robust <= clean, AutoAttack <= PGD on the same images, accuracy not rising "
               f"with eps) over {len(cells)} cells and {len(checks)} checks: "
               + ("no violation.\n" if not problems else "BROKEN:\n" + "".join(f"- {p}\n" for p in problems)))
    notes = [SPREAD_NOTE + "\n", tuning_notes(chosen["training"]), search_markdown(chosen.get("tapt")),
             paired_markdown(paired) if paired else "", tapt_gains_markdown(tapt_gains(cells, attack)),
             checks_markdown(checks), honesty]
    (out / "table.md").write_text(to_markdown(rows, run_link=link, spread="ci95") + "\n"
                                  + "\n".join(n for n in notes if n))
    (out / "table.csv").write_text(to_csv(rows))
    return paired


def prepare_data(cells: list[dict[str, Any]], cache: Path) -> list[dict[str, Any]]:
    """Set ``data.cache`` (unless set) on every cell and build each distinct data subset once, before
    the cells run (pipeline/data/subsets.py); cells then read only their subsets."""
    from pipeline.clip import image_size_of
    from pipeline.task import prepare_subsets

    seen: set[str] = set()
    out = []
    for cell in cells:
        cfg = from_dict(cell["config"])
        if not cfg.data.cache:
            cfg = cfg.replace(**{"data.cache": str(cache)})
        key = json.dumps([cfg.to_dict()["data"], cfg.model.name], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            prepare_subsets(cfg.data, image_size_of(cfg.model.name))
        out.append({**cell, "config": cfg.to_dict()})
    return out


def table_attack(plan: dict[str, Any]) -> str:
    """The table's robust figure (``compare.table_attack``, default pgd100): one of ``eval.final_attacks``."""
    return str(plan["settings"].get("table_attack", "pgd100"))


def _paired(plan: dict[str, Any], cells: list[dict[str, Any]], methods: list[str], attack: str) -> list[dict[str, Any]]:
    """CAPT (``compare.reference``) against every other method, seed by seed, on the accuracy columns."""
    reference = plan["settings"].get("reference", "capt")
    if reference not in methods:
        return []
    cols = [c for c in columns(attack) if c[2] != "train s"]
    tapt_rows = {c["method"] for c in cells if "tapt_of" in c}  # other images: see tapt_gains
    return paired_comparisons(cells, reference, [m for m in methods if m not in tapt_rows], cols,
                              prepare=cross_average)


def _tapt_search(plan: dict[str, Any], cells: list[dict[str, Any]], robust_key: str, ctx: dict[str, Any],
                out: Path) -> dict[str, Any] | None:
    """Run ``tapt.search``'s candidates (pipeline/compare_tapt.py) and return the pick (also tapt_search.json)."""
    from pipeline.compare_ray import run_cells

    todo = search_cells(plan, cells, robust_key)
    if not todo:
        return None
    chosen = pick(plan["tapt_search"], run_cells(prepare_data(todo, out / "data_subsets"), ctx, plan["settings"]))
    write_search(out, chosen)
    log.info("TAPT search picked %s (%s)", chosen["params"], chosen["objective"])
    return chosen


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

"""Tabular HPO benchmark, part 2: replay search strategies against the grid table, many seeds each.

Run (a few minutes on 2 CPUs; needs the table from ``bench_hpo_grid.py``):

    python benchmarks/bench_hpo_replay.py --table benchmarks/results/hpo_grid.json --seeds 30

Strategies (``hpo_replay.STRATEGIES``): random search, a grid, TPE without early stopping, random +
ASHA, TPE + ASHA (the product's defaults) and its two-objective variant, each through the product's
``make_searcher`` / ``make_scheduler`` with the search file's concurrency (``search.max_concurrent``).
Every strategy gets the same compute, ``--trials`` (default: the file's ``search.num_samples``) x epochs
trial-epochs (a search of ``--trials`` full trials): ASHA's strategies run more trials with it; TPE +
ASHA also runs with exactly ``--trials`` trials (what ASHA saves is then unspent).
``--set sampler='{"n_startup_trials": 3}'`` (JSON values) changes a setting for every strategy. Outputs: ``hpo_replay.json`` (every figure),
``hpo_replay.png`` (anytime curves: median and quartiles over seeds of the best robust accuracy found,
and the two-objective hypervolume, against cumulative trial-epochs) and ``hpo_replay.md`` (the table
for ``benchmarks/README.md``). ``--engine tune`` replays through Ray Tune itself instead (a lookup
trainable; slower: to measure what Tune costs per replay).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from common import ROOT  # noqa: E402
from hpo_replay import (  # noqa: E402
    STRATEGIES,
    Table,
    anytime_best,
    anytime_hypervolume,
    compute_to,
    replay,
    strategy_spec,
)

from pipeline.config import read_yaml  # noqa: E402
from pipeline.search_sampler import startup_trials  # noqa: E402

OURS, BASELINE, TWO_OBJ = "tpe+asha", "random", "tpe+asha 2-obj"
SAME = "tpe+asha, same trial count"


def run_strategy(doc: dict[str, Any], table: Table, name: str, seeds: list[int], trials: int,
                 search: dict[str, Any], engine: Any = None, same_trials: bool = False) -> dict[str, Any]:
    """Replays of one strategy, one per seed, on the budget of ``trials`` full trials (ASHA: as many
    trials as fit; ``same_trials``: exactly ``trials`` trials, using what ASHA leaves of the budget)."""
    budget = trials * table.epochs
    if "n_startup_trials" not in search.get("sampler", {}):  # the real search's (it runs `trials` trials)
        search = {**search, "sampler": {**search.get("sampler", {}), "n_startup_trials": startup_trials(trials)}}
    curves, hvs, counts, pruned, used, t0 = [], [], [], [], [], time.perf_counter()
    for seed in seeds:
        spec = strategy_spec(doc, table, STRATEGIES[name], seed=seed, num_samples=trials * table.epochs,
                             search=search)
        if same_trials or spec.search.scheduler["type"] == "none":  # exactly `trials` trials
            spec = strategy_spec(doc, table, STRATEGIES[name], seed=seed, num_samples=trials, search=search)
        rep = engine(spec, table, budget=budget) if engine else replay(spec, table, budget=budget)
        curves.append(anytime_best(rep, budget))
        hvs.append(anytime_hypervolume(rep, budget, table.nadir))
        counts.append(len(rep.trials))
        used.append(rep.events[-1]["cum_epochs"])
        states = [t.state for t in rep.study.trials]
        pruned.append(states.count(optuna.trial.TrialState.PRUNED))
    return {"curves": np.array(curves), "hv": np.array(hvs), "trials": counts, "pruned": pruned, "used": used,
            "seconds_per_replay": (time.perf_counter() - t0) / len(seeds)}


def summarise(table: Table, results: dict[str, dict[str, Any]], trials: int) -> dict[str, Any]:
    budget = trials * table.epochs
    half = budget // 2
    base = results[BASELINE]["curves"]
    target_random = float(np.median(base[:, -1]))  # random search's final best, median over seeds
    target_table = table.best_robust - 0.01  # within 1 point of the table's best
    out: dict[str, Any] = {"budget_trial_epochs": budget, "random_final_best_median": round(target_random, 4),
                           "table_best_robust": round(table.best_robust, 4), "strategies": {}}
    hv_random = np.median(results[BASELINE]["hv"], axis=0)
    for name, r in results.items():
        c = r["curves"]
        to_random = [compute_to(x, target_random) for x in c]
        to_table = [compute_to(x, target_table) for x in c]
        hv = np.median(r["hv"], axis=0)
        out["strategies"][name] = {
            "final_best": _quartiles(c[:, -1]), "best_at_half_budget": _quartiles(c[:, half]),
            "epochs_to_random_final_best": _quartiles(to_random),
            "reached_random_final_best": f"{sum(math.isfinite(x) for x in to_random)}/{len(c)}",
            "epochs_to_table_best_minus_1pt": _quartiles(to_table),
            "reached_table_best_minus_1pt": f"{sum(math.isfinite(x) for x in to_table)}/{len(c)}",
            "hypervolume_median": {"half_budget": round(float(hv[half]), 5), "budget": round(float(hv[-1]), 5)},
            "hv_ge_random_at_every_compute": bool(np.all(hv >= hv_random - 1e-12)),
            "trial_epochs_used_median": float(np.median(r["used"])),
            "trials_median": float(np.median(r["trials"])), "pruned_median": float(np.median(r["pruned"])),
            "seconds_per_replay": round(r["seconds_per_replay"], 3)}
    if OURS not in results or TWO_OBJ not in results:
        return out
    ours = out["strategies"][OURS]["epochs_to_random_final_best"]["median"]
    out["goal_single"] = {"ours_median_epochs_to_random_final_best": ours, "half_budget": half,
                          "met": ours <= half}
    two, rnd = out["strategies"][TWO_OBJ], out["strategies"][BASELINE]
    out["goal_two_objective"] = {"hv_two_obj": two["hypervolume_median"], "hv_random": rnd["hypervolume_median"],
                                 "met": two["hv_ge_random_at_every_compute"]}
    return out


def _quartiles(values: Any) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    q = np.quantile(v, [0.25, 0.5, 0.75], method="lower") if np.isinf(v).any() else np.quantile(v, [0.25, 0.5, 0.75])
    return {"q25": _r(q[0]), "median": _r(q[1]), "q75": _r(q[2])}


def _r(x: float) -> float:
    return round(float(x), 4) if math.isfinite(x) else math.inf


def plot(table: Table, results: dict[str, dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(summary["budget_trial_epochs"] + 1)
    for name, r in results.items():
        if name == TWO_OBJ:
            continue
        q25, med, q75 = np.quantile(r["curves"], [0.25, 0.5, 0.75], axis=0)
        ax.step(x, med, where="post", label=name, lw=2.5 if name == OURS else 1.3)
        ax.fill_between(x, q25, q75, step="post", alpha=0.12)
    ax.axhline(summary["random_final_best_median"], color="grey", ls=":", lw=1, label="random's final best (median)")
    ax.axhline(table.best_robust, color="black", ls="--", lw=0.8, label="table best")
    ax.axvline(summary["budget_trial_epochs"] / 2, color="grey", lw=0.6)
    lo = np.quantile(results[BASELINE]["curves"][:, -1], 0.05) - 0.05
    ax.set(xlabel="cumulative trial-epochs", ylabel="best robust accuracy found (completed trials)",
           title="anytime: median and quartiles over seeds", ylim=(max(lo, 0), table.best_robust + 0.02))
    ax.legend(fontsize=7, loc="lower right")
    for name in (n for n in (BASELINE, "tpe", OURS, TWO_OBJ) if n in results):
        q25, med, q75 = np.quantile(results[name]["hv"], [0.25, 0.5, 0.75], axis=0)
        bx.step(x, med, where="post", label=name)
        bx.fill_between(x, q25, q75, step="post", alpha=0.12)
    bx.set(xlabel="cumulative trial-epochs", ylabel="hypervolume of the (clean, robust) front",
           title="two objectives (reference: the table's worst)")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(summary: dict[str, Any], setup: dict[str, Any]) -> str:
    lines = [f"Budget {summary['budget_trial_epochs']} trial-epochs (= {setup['trials']} full trials), "
             f"{setup['seeds']} seeds, {setup['max_concurrent']} concurrent; table best robust "
             f"{summary['table_best_robust']:.3f}, random's final best (median) {summary['random_final_best_median']:.3f}.",
             "",
             "| strategy | final best (q25 / median / q75) | best at half budget (median) | trial-epochs to random's "
             "final best (median; reached) | to table best - 1 pt (median; reached) | hypervolume at half / full "
             "budget (median) | trials, pruned, trial-epochs used (medians) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary["strategies"].items():
        f = s["final_best"]
        lines.append(f"| {name} | {f['q25']:.3f} / {f['median']:.3f} / {f['q75']:.3f} | "
                     f"{s['best_at_half_budget']['median']:.3f} | {_fmt(s['epochs_to_random_final_best']['median'])}; "
                     f"{s['reached_random_final_best']} | {_fmt(s['epochs_to_table_best_minus_1pt']['median'])}; "
                     f"{s['reached_table_best_minus_1pt']} | {s['hypervolume_median']['half_budget']:.4f} / "
                     f"{s['hypervolume_median']['budget']:.4f} | {s['trials_median']:.0f}, {s['pruned_median']:.0f}, {s['trial_epochs_used_median']:.0f} |")
    return "\n".join(lines) + "\n"


def _tune_engine(args: argparse.Namespace) -> Any:
    import functools
    import tempfile

    import ray
    from hpo_replay_tune import tune_replay

    here = str(Path(__file__).resolve().parent)  # the trials import hpo_replay (the pickled table)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return functools.partial(tune_replay, time_scale=args.time_scale, storage_path=tempfile.mkdtemp(prefix="replay"))


def _fmt(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "results" / "hpo_grid.json")
    p.add_argument("--config", type=Path, default=ROOT / "search_spaces" / "demo.yaml")
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--trials", type=int, default=None,
                   help="trial count of the searches without early stopping (default: the file's search.num_samples)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="search settings for every strategy, e.g. scheduler={\"grace_period\": 2}")
    p.add_argument("--engine", choices=["loop", "tune"], default="loop",
                   help="loop: the in-process replay (default); tune: through Ray Tune (slower)")
    p.add_argument("--time-scale", type=float, default=0.002,
                   help="tune engine: seconds slept per second of the table's epoch time")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hpo_replay")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rec = json.loads(args.table.read_text())
    table, doc = Table(rec), read_yaml(args.config)
    doc["base"].setdefault("optim", {})["epochs"] = table.epochs
    search = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    args.trials = args.trials or int(doc["search"].get("num_samples", 8))
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    results = {}
    engine = _tune_engine(args) if args.engine == "tune" else None
    for name in args.strategies.split(","):
        results[name] = run_strategy(doc, table, name, seeds, args.trials, search, engine)
        print(f"{name}: {results[name]['seconds_per_replay']:.2f} s per replay", flush=True)
    if OURS in results and not engine:  # ours with the trial count (not the compute) of random search
        results[SAME] = run_strategy(doc, table, OURS, seeds, args.trials, search, same_trials=True)
    summary = summarise(table, results, args.trials)
    setup = {"table": str(args.table.name), "engine": args.engine, "seeds": args.seeds, "trials": args.trials, "search": search,
             "max_concurrent": doc["search"].get("max_concurrent"), "wall_s": round(time.perf_counter() - t0, 1),
             "command": "python benchmarks/bench_hpo_replay.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, **summary}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary, setup))
    plot(table, results, summary, args.out.with_suffix(".png"))
    print(markdown(summary, setup))
    print(json.dumps({k: summary[k] for k in ("goal_single", "goal_two_objective") if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

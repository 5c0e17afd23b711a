"""The search's plots: trade-off of all trials (Pareto front marked), accuracy vs eps of the best trial
beside zero-shot CLIP under the same attacks, hyperparameter importances.

Each is saved as a PNG (tight bounding box) and that same file is logged to the parent run, so the
copy in MLflow is identical to the one on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import tracking


def log_plots(uri: str, run_id: str, folder: Path, rows: list[dict[str, Any]], best: list[dict[str, Any]],
              importances: dict[str, float], attacks: list[str]) -> list[Path]:
    """Save the plots under ``folder`` and log the files to ``run_id`` under ``plots/``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figures = {"tradeoff.png": _tradeoff(plt, rows), "importances.png": _importances(plt, importances)}
    if best:
        figures["acc_vs_eps.png"] = _acc_vs_eps(plt, best[0], attacks)
    saved = []
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        tracking.log_artifact(uri, run_id, folder / name, "plots")
        saved.append(folder / name)
    return saved


def _tradeoff(plt: Any, rows: list[dict[str, Any]]) -> Any:
    from pipeline.search_report import pareto_front

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


def curve(final: dict[str, float], attack: str, eps: float) -> list[tuple[float, float]]:
    """(eps, accuracy) points of one attack from final metrics (``<attack>_acc`` is at ``eps``)."""
    pts = {0.0: final["clean_acc"]} if "clean_acc" in final else {}
    for key, value in final.items():
        if key == f"{attack}_acc":
            pts[float(eps)] = value
        elif key.startswith(f"{attack}_acc_eps"):
            pts[float(key.rsplit("eps", 1)[1])] = value
    return sorted(pts.items())


def _acc_vs_eps(plt: Any, best: dict[str, Any], attacks: list[str]) -> Any:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    zero = best.get("zero_shot") or {}
    for i, attack in enumerate(attacks):
        pts = curve(best["final"], attack, best["eps"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=f"best trial, {attack}")
        if zero:
            pts = curve(zero, attack, best["eps"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color=f"C{i}", alpha=0.6,
                    label=f"zero-shot CLIP, {attack}")
    ax.set(xlabel="eps (1/255, L-inf; 0 = clean)", ylabel="test accuracy",
           title=f"accuracy vs eps: best trial {best.get('name') or best['trial_id']}")
    ax.legend(fontsize="small")
    return fig


def _importances(plt: Any, importances: dict[str, float]) -> Any:
    if not importances:
        return None
    fig, ax = plt.subplots(figsize=(5, 0.4 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance for robust_acc (Optuna default evaluator)", title="hyperparameter importances")
    return fig

"""The results table of ``capt compare``: mean +- spread over seeds, as markdown and CSV.

Pure functions over a list of cell records ``{"method", "protocol", "seed", "metrics", "run_id"}``;
no ray, no mlflow. Accuracies are shown in percent. The spread is the sample standard deviation
(``spread="std"``) or the half-width of the 95% Student-t interval of the mean (``spread="ci95"``,
what ``capt compare`` writes); paired comparisons between methods are in :mod:`pipeline.compare_stats`.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from collections.abc import Sequence
from typing import Any

_EPS_KEY = re.compile(r"^((?:base_|new_|xd_.+_)?)(pgd[0-9]+|cw100|autoattack)_acc(?:_eps([0-9.]+))?$")
# (protocol, metric key in the cell's metrics, column title); percent unless noted. "{a}" is the table's
# robust attack (``compare.table_attack``, e.g. pgd100 -> column "PGD-100"), see :func:`columns`
_COLUMN_TEMPLATE: list[tuple[str, str, str]] = [
    ("few_shot", "clean_acc", "clean"),
    ("few_shot", "{a}_acc", "{A}"),
    ("few_shot", "autoattack_acc", "AutoAttack"),
    ("few_shot", "{a}-aasub_acc", "{A} on AA images"),  # when AutoAttack ran on a subset
    ("few_shot", "adaptive_robust_acc", "adaptive (TAPT)"),  # TAPT rows: PGD through the defence
    ("base_to_new", "base_clean_acc", "base clean"),
    ("base_to_new", "base_{a}_acc", "base {A}"),
    ("base_to_new", "new_clean_acc", "new clean"),
    ("base_to_new", "new_{a}_acc", "new {A}"),
    ("base_to_new", "hm_clean_acc", "HM clean"),
    ("base_to_new", "hm_{a}_acc", "HM {A}"),
    ("few_shot", "xd_clean_acc", "cross clean"),
    ("few_shot", "xd_{a}_acc", "cross {A}"),
    ("few_shot", "train_seconds", "train s"),
]


def attack_title(attack: str) -> str:
    """``pgd100`` -> ``PGD-100``, ``cw100`` -> ``CW-100``, ``autoattack`` -> ``AutoAttack``."""
    match = re.fullmatch(r"([a-z]+)([0-9]+)", attack)
    return f"{match.group(1).upper()}-{match.group(2)}" if match else {"autoattack": "AutoAttack"}.get(attack, attack)


def columns(attack: str = "pgd100") -> list[tuple[str, str, str]]:
    """The table's columns with ``attack`` (a final-evaluation attack name) as the robust figure."""
    title = attack_title(attack)
    return [(p, k.format(a=attack), t.format(A=title)) for p, k, t in _COLUMN_TEMPLATE]


COLUMNS = columns()


def cross_average(metrics: dict[str, float]) -> dict[str, float]:
    """Add ``xd_clean_acc`` / ``xd_<attack>_acc``: the mean over every cross dataset's figure."""
    out = dict(metrics)
    groups: dict[str, list[float]] = {}
    for key, value in metrics.items():
        if key.startswith("xd_") and value is not None:
            parts = key.split("_")
            # xd_<name>_<metric>_acc: the metric is the last two fields, e.g. pgd100_acc / clean_acc
            groups.setdefault("xd_" + "_".join(parts[-2:]), []).append(float(value))
    for key, values in groups.items():
        if key not in metrics:
            out[key] = sum(values) / len(values)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def aggregate(cells: Sequence[dict[str, Any]], methods: Sequence[str],
              cols: Sequence[tuple[str, str, str]] = COLUMNS) -> list[dict[str, Any]]:
    """One row per method: for each column, (mean, std, n) over seeds; plus the cells' run ids."""
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method, "runs": {}, "columns": [t for _, _, t in cols]}
        for protocol, key, title in cols:
            vals = [cross_average(c["metrics"]).get(key) for c in cells
                    if c["method"] == method and c["protocol"] == protocol]
            vals = [v for v in vals if v is not None]
            row[title] = (*mean_std(vals), len(vals))
        for c in cells:
            if c["method"] == method:
                row["runs"].setdefault(c["protocol"], []).append(c.get("run_id"))
        rows.append(row)
    return rows


def ci95(cell: tuple[float, float, int]) -> float:
    """Half-width of the 95% Student-t interval of the mean, from (mean, std, n); nan for n < 2."""
    from scipy import stats

    _, s, n = cell
    return float(stats.t.ppf(0.975, n - 1)) * s / math.sqrt(n) if n >= 2 and math.isfinite(s) else float("nan")


def _fmt(cell: tuple[float, float, int], title: str, spread: str = "std") -> str:
    m, s, n = cell
    if n == 0 or not math.isfinite(m):
        return "-"
    s = s if spread == "std" else ci95(cell)
    if not math.isfinite(s):
        return f"{m:.0f}" if title == "train s" else f"{100 * m:.1f}"
    if title == "train s":
        return f"{m:.0f} ± {s:.0f}"
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def to_markdown(rows: Sequence[dict[str, Any]], *, run_link: str | None = None, spread: str = "std") -> str:
    """A markdown table; ``run_link`` (e.g. ``http://mlflow:5000/#/experiments/1/runs/{run_id}``) links runs.

    ``spread``: ``std`` (mean ± sample standard deviation) or ``ci95`` (mean ± half-width of the 95%
    t-interval of the mean over the seeds).
    """
    if spread not in ("std", "ci95"):
        raise ValueError(f"spread must be std or ci95, got {spread!r}")
    titles = [t for t in _titles(rows) if any(r[t][2] for r in rows)]
    lines = ["| method | " + " | ".join(titles) + " | runs |", "|---" * (len(titles) + 2) + "|"]
    for r in rows:
        links = []
        for protocol, ids in r["runs"].items():
            for i, run_id in enumerate(ids):
                if run_id:
                    target = run_link.format(run_id=run_id) if run_link else run_id[:8]
                    links.append(f"[{protocol}#{i}]({target})" if run_link else f"{protocol}#{i}:{target}")
        lines.append(f"| {r['method']} | " + " | ".join(_fmt(r[t], t, spread) for t in titles) + " | "
                     + " ".join(links) + " |")
    return "\n".join(lines) + "\n"


def _titles(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(rows[0]["columns"]) if rows else [t for _, _, t in COLUMNS]


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV with mean, std and n columns per metric, and the run ids."""
    buf = io.StringIO()
    w = csv.writer(buf)
    titles = _titles(rows)
    w.writerow(["method"] + [f"{t} {s}" for t in titles for s in ("mean", "std", "n", "ci95")] + ["run_ids"])
    for r in rows:
        vals = []
        for t in titles:
            m, s, n = r[t]
            h = ci95(r[t])
            vals += ["" if not math.isfinite(m) else f"{m:.6g}", "" if not math.isfinite(s) else f"{s:.6g}", n,
                     "" if not math.isfinite(h) else f"{h:.6g}"]
        ids = ";".join(f"{p}:{i}" for p, lst in r["runs"].items() for i in lst if i)
        w.writerow([r["method"], *vals, ids])
    return buf.getvalue()


def _primary_eps(cell: dict[str, Any]) -> float | None:
    """The eps of the un-suffixed robust metrics: ``eval.eps``, else the training eps (from the cell's config)."""
    cfg = cell.get("config") or {}
    value = (cfg.get("eval") or {}).get("eps")
    value = (cfg.get("attack") or {}).get("eps") if value is None else value
    return None if value is None else float(value)


def eps_problems(cell: dict[str, Any], tag: str) -> list[str]:
    """Accuracy must not rise with eps: ``<prefix><attack>_acc[_eps<E>]`` for every attack and prefix."""
    curves: dict[str, dict[float, float]] = {}
    primary = _primary_eps(cell)
    for key, value in cell["metrics"].items():
        match = _EPS_KEY.match(key)
        if match is None or value is None or not math.isfinite(value):
            continue
        eps = float(match.group(3)) if match.group(3) else primary
        if eps is not None:
            curves.setdefault(match.group(1) + match.group(2), {})[eps] = float(value)
    out = []
    for name, curve in sorted(curves.items()):
        points = sorted(curve.items())
        for (e1, a1), (e2, a2) in itertools.pairwise(points):
            if a2 > a1 + 1e-9:
                out.append(f"{tag}: {name}_acc rises with eps: {a1:.3f} at {e1:g} < {a2:.3f} at {e2:g}")
    return out


_ROBUST_KEY = re.compile(r"^(pgd[0-9]+|cw100)_acc$")


def honesty_problems(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Cells breaking the honesty rules: robust > clean, AutoAttack > PGD (same model, same eps, same
    images: when AutoAttack ran on a subset, against PGD on that subset), accuracy rising with eps
    (:func:`eps_problems`)."""
    problems = []
    for c in cells:
        m, tag = c["metrics"], f"{c['method']}/{c['protocol']}/seed{c['seed']}"
        problems += eps_problems(c, tag)
        for prefix in ("", "base_", "new_"):
            for weak_name, strong_name, weak, strong, where in _pairs(m, prefix):
                if weak is not None and strong is not None and strong > weak + 1e-9:
                    problems.append(f"{tag}: {prefix}{strong_name} {strong:.3f} > {weak_name} {weak:.3f} {where}".rstrip())
    return problems


def _pairs(m: dict[str, Any], prefix: str) -> list[tuple[str, str, Any, Any, str]]:
    """(weaker name, stronger name, weaker value, stronger value, where) that must not rise."""
    attacks = sorted({k.removeprefix(prefix).removesuffix("_acc") for k in m
                      if k.startswith(prefix) and _ROBUST_KEY.match(k.removeprefix(prefix))})
    pairs = []
    for name in attacks:
        title = attack_title(name)
        pairs.append(("clean", title, m.get(f"{prefix}clean_acc"), m.get(f"{prefix}{name}_acc"), ""))
        sub = "on the AutoAttack subset" if m.get(f"{prefix}{name}-aasub_acc") is not None else ""
        robust = m.get(f"{prefix}{name}-aasub_acc") if sub else m.get(f"{prefix}{name}_acc")
        pairs.append((title, "AutoAttack", robust, m.get(f"{prefix}autoattack_acc"), sub))
        if sub:
            pairs.append(("clean", title, m.get(f"{prefix}clean-aasub_acc"), robust, sub))
    return pairs

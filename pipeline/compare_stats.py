"""Statistics of the results table: 95% t-intervals and paired comparisons over seeds.

Pure functions over cell records ``{"method", "protocol", "seed", "metrics"}`` (see
:mod:`pipeline.compare_table`); no ray, no mlflow.

* :func:`t_interval`: mean and the half-width of its 95% Student-t interval over seeds.
* :func:`paired_comparisons`: the reference method (CAPT) against each peer on the SAME seeds (same
  few-shot draw, same initialisation seed): per seed difference ``reference - peer``, its mean and
  95% t-interval, the two-sided **paired t-test** p-value (the primary test) and the two-sided exact
  **Wilcoxon signed-rank** p-value (distribution-free check), each also Holm-adjusted over the peers
  of one column. With n seeds the smallest possible exact Wilcoxon p is ``2 / 2**n`` (0.0625 for 5
  seeds): at 5 seeds it can never reach 0.05, which is why the t-test is the primary one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PRIMARY_TEST = "paired t-test (two-sided)"
CHECK_TEST = "Wilcoxon signed-rank (two-sided, exact)"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def t_interval(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the ``level`` Student-t interval, n); half-width nan for n < 2."""
    from scipy import stats

    vals = _finite(values)
    n = len(vals)
    if not n:
        return float("nan"), float("nan"), 0
    m = sum(vals) / n
    if n < 2:
        return m, float("nan"), 1
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    return m, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``a - b`` paired: mean difference, its 95% t-interval, t-test and Wilcoxon p-values."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    diff = [x - y for x, y in zip(a, b, strict=True)]
    mean, half, n = t_interval(diff)
    out = {"n": n, "mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half,
           "t_p": float("nan"), "wilcoxon_p": float("nan")}
    if n < 2:
        return out
    if all(d == diff[0] for d in diff):  # no spread: the t statistic is undefined (or infinite)
        out["t_p"] = 1.0 if diff[0] == 0 else 0.0
    else:
        out["t_p"] = float(stats.ttest_rel(a, b).pvalue)
    nonzero = [d for d in diff if d != 0]
    out["wilcoxon_p"] = (1.0 if not nonzero else
                         float(stats.wilcoxon(nonzero, alternative="two-sided", method="exact").pvalue))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan and is not counted)."""
    idx = sorted((i for i, p in enumerate(pvalues) if math.isfinite(p)), key=lambda i: pvalues[i])
    m, out, running = len(idx), [float("nan")] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _by_seed(cells: Sequence[dict[str, Any]], method: str, protocol: str, key: str, prepare) -> dict[Any, float]:
    out = {}
    for c in cells:
        if c["method"] == method and c["protocol"] == protocol:
            v = prepare(c["metrics"]).get(key)
            if v is not None and math.isfinite(v):
                out[c["seed"]] = float(v)
    return out


def paired_comparisons(cells: Sequence[dict[str, Any]], reference: str, peers: Sequence[str],
                       columns: Sequence[tuple[str, str, str]], prepare=dict,
                       alpha: float = 0.05) -> list[dict[str, Any]]:
    """One record per (column, peer): ``reference - peer`` on the seeds both have, tests, verdict.

    ``columns``: (protocol, metric key, title); ``prepare``: metrics -> metrics (e.g. cross averages).
    ``significant`` uses the Holm-adjusted paired t-test p-value at ``alpha``.
    """
    records = []
    for protocol, key, title in columns:
        ref = _by_seed(cells, reference, protocol, key, prepare)
        group = []
        for peer in peers:
            if peer == reference:
                continue
            other = _by_seed(cells, peer, protocol, key, prepare)
            seeds = sorted(set(ref) & set(other), key=str)
            if not seeds:
                continue
            res = paired_test([ref[s] for s in seeds], [other[s] for s in seeds])
            group.append({"column": title, "protocol": protocol, "metric": key, "reference": reference,
                          "peer": peer, "seeds": seeds, **res})
        records += adjust(group, alpha)
    return records


def adjust(group: list[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Holm-adjust one column's paired tests (in place) and mark the significant ones; returns ``group``."""
    for rec, t_adj, w_adj in zip(group, holm([g["t_p"] for g in group]),
                                 holm([g["wilcoxon_p"] for g in group]), strict=True):
        rec.update(t_p_holm=t_adj, wilcoxon_p_holm=w_adj, significant=bool(math.isfinite(t_adj) and t_adj < alpha))
    return group


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{100 * v:+.1f}"


def _p(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3f}"


def paired_markdown(records: Sequence[dict[str, Any]], alpha: float = 0.05, what: str | None = None) -> str:
    """The paired comparisons as a markdown table, with the tests named (``what``: the first words,
    by default "<reference> minus each peer on the same seeds")."""
    if not records:
        return "No paired comparisons (the reference method or its peers have no common seeds).\n"
    what = what or f"{records[0]['reference']} minus each peer on the same seeds"
    lines = [f"Paired comparisons: {what} (percentage points). "
             f"Primary test: {PRIMARY_TEST}, Holm-adjusted over the rows of each column, "
             f"significant at {alpha}; check: {CHECK_TEST} (smallest possible p with n seeds: 2/2^n).",
             "", "| column | peer | n | mean diff | 95% CI | t-test p | Holm p | Wilcoxon p | significant |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['column']} | {r['peer']} | {r['n']} | {_pct(r['mean_diff'])} | "
                     f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] | {_p(r['t_p'])} | {_p(r['t_p_holm'])} | "
                     f"{_p(r['wilcoxon_p'])} | {'yes' if r['significant'] else 'no'} |")
    return "\n".join(lines) + "\n"

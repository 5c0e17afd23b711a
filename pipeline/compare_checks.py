"""Checks of ``capt compare`` beside the table: stronger attacks and other eps, on trained cells.

The table's per-cell evaluation must be affordable on every (method, protocol, seed) cell; the strong
attacks (PGD-100, AutoAttack) and the eps sweep cost many times more and are run here instead, on the
few-shot prompts of one seed, every attack on the same images. A compare file's optional ``checks``::

    checks:
      steps: {methods: all, seed: 0, attacks: [pgd20, pgd100], limit: 50}        # PGD-20 vs PGD-100
      eps: {methods: all, seed: 0, attacks: [pgd20], eps: [1.0, 2.0, 4.0]}       # accuracy falls with eps
      autoattack: {methods: [capt, best], seed: 0, attacks: [pgd100, autoattack], limit: 16}

``methods``: ``all`` or a list of the file's methods; ``best`` is the peer (any method but
``compare.reference``) with the best mean robust table figure. ``eps`` (1/255 units) defaults to the
cell's evaluation eps; ``limit``: the first n test images of the cell (default: all of its test split).
The results go to ``summary.json`` (``checks``), a section of ``table.md``, and the honesty rules
(robust <= clean, AutoAttack <= PGD on the same images, accuracy not rising with eps).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from pipeline.config import FINAL_ATTACKS, ConfigError

log = logging.getLogger(__name__)
_KEYS = {"methods", "seed", "attacks", "eps", "limit"}


def check_specs(section: Any, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``checks`` section, validated: ``{name: {methods, seed, attacks, eps, limit}}``."""
    if not section:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"checks: expected a mapping name -> options, got {section!r}")
    seeds = plan["doc"].get("seeds") or [0]
    specs = {}
    for name, spec in section.items():
        where = f"checks.{name}"
        if not isinstance(spec, dict) or set(spec) - _KEYS:
            raise ConfigError(f"{where}: expected a mapping with keys from {sorted(_KEYS)}, got {spec!r}")
        methods = spec.get("methods", "all")
        methods = list(plan["methods"]) if methods == "all" else list(methods)
        unknown = [m for m in methods if m not in plan["methods"] and m != "best"]
        attacks = list(spec.get("attacks") or [])
        bad = [a for a in attacks if a not in FINAL_ATTACKS]
        eps = [float(e) for e in spec.get("eps") or []]
        limit = spec.get("limit")
        seed = spec.get("seed", seeds[0])
        if unknown or bad or not attacks:
            raise ConfigError(f"{where}: unknown method(s) {unknown} or attack(s) {bad} (attacks from "
                              f"{list(FINAL_ATTACKS)}, at least one)")
        if seed not in seeds or any(not 0 <= e <= 255 for e in eps):
            raise ConfigError(f"{where}: seed {seed!r} must be one of the file's seeds {seeds}, eps in [0, 255]")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"{where}.limit: expected a number of test images >= 1, got {limit!r}")
        specs[name] = {"methods": methods, "seed": seed, "attacks": attacks, "eps": eps, "limit": limit}
    return specs


def check_cells(specs: dict[str, dict[str, Any]], cells: list[dict[str, Any]], reference: str,
                robust_key: str) -> list[dict[str, Any]]:
    """One cell per (check, method): it re-evaluates that method's trained few-shot cell at the check's seed."""
    few = {(c["method"], c["seed"]): c for c in cells if c["protocol"] == "few_shot" and "tapt_of" not in c}
    out = []
    for name, spec in specs.items():
        methods = [best_peer(cells, reference, robust_key) if m == "best" else m for m in spec["methods"]]
        for method in dict.fromkeys(m for m in methods if m):
            source = few.get((method, spec["seed"]))
            if source is None:
                log.warning("check %s: no trained few-shot cell of %s at seed %s (failed?); skipped",
                            name, method, spec["seed"])
                continue
            out.append({"method": method, "protocol": f"check:{name}", "seed": spec["seed"], "check": spec,
                        "key": f"{method}-check-{name}-s{spec['seed']}", "check_of": source["key"],
                        "config": source["config"]})
    return out


def best_peer(cells: list[dict[str, Any]], reference: str, robust_key: str) -> str | None:
    """The method other than ``reference`` with the best mean ``robust_key`` over its few-shot cells."""
    scores: dict[str, list[float]] = {}
    for c in cells:
        if c["protocol"] == "few_shot" and c["method"] != reference and "tapt_of" not in c:
            scores.setdefault(c["method"], []).append(c["metrics"].get(robust_key) or 0.0)
    return max(scores, key=lambda k: sum(scores[k]) / len(scores[k])) if scores else None


def run_check(cell: dict[str, Any], run_dir: Path, device: Any) -> dict[str, float]:
    """Evaluate one trained cell (its folder ``run_dir``) as ``cell["check"]`` says; metric names as
    :func:`pipeline.evaluate.final_metrics` gives them (un-suffixed at the cell's evaluation eps)."""
    from pipeline.config import eval_eps
    from pipeline.evaluate import final_metrics
    from pipeline.runs import load_run
    from pipeline.task import load_task

    cfg, model = load_run(run_dir, device)
    task = load_task(cfg.data, model.image_size)
    spec = cell["check"]
    n = min(spec["limit"] or len(task.test_y), len(task.test_y))
    t0 = time.perf_counter()
    metrics = final_metrics(model, task.test_x[:n], task.test_y[:n], attacks=spec["attacks"],
                            eps_list=spec["eps"] or [eval_eps(cfg)], primary_eps=eval_eps(cfg),
                            batch_size=cfg.eval.batch_size, device=device)
    return {**metrics, "check_images": float(n), "check_seconds": time.perf_counter() - t0}


def checks_markdown(cells: list[dict[str, Any]]) -> str:
    """One small table per check: a row per method, a column per accuracy (percent)."""
    if not cells:
        return ""
    parts = ["Checks beside the table (few-shot prompts of one seed; within a check, every attack on the "
             "same images):\n"]
    for protocol in dict.fromkeys(c["protocol"] for c in cells):
        rows = [c for c in cells if c["protocol"] == protocol]
        keys = sorted({k for c in rows for k in c["metrics"] if k.endswith("_acc") or "_acc_eps" in k},
                      key=_order)
        n = int(rows[0]["metrics"].get("check_images", 0))
        parts.append(f"{protocol.removeprefix('check:')} (seed {rows[0]['seed']}, {n} test images):\n")
        parts.append("| method | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
        for c in rows:
            vals = [c["metrics"].get(k) for k in keys]
            parts.append(f"| {c['method']} | " + " | ".join(
                "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}" for v in vals) + " |")
        parts.append("")
    return "\n".join(parts) + "\n"


def _order(key: str) -> tuple[int, str]:
    return (0 if key.startswith("clean") else 2 if key.startswith("autoattack") else 1, key)

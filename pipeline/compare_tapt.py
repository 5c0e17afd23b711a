"""The TAPT stage of ``capt compare``: whose prompts TAPT tunes, its variants, and a search of its settings.

TAPT runs on the few-shot prompts of one training-time method (``tapt.method``; ``best``: the best mean
table robust figure), once per variant (:func:`pipeline.compare_plan.tapt_variants`). With a
``tapt.search`` section it also runs with settings picked by a search::

    tapt:
      lr: 5.0e-4                  # the published settings: the `+tapt` rows
      search:                     # adds `+tapt-searched` rows: the settings the search picks
        num_samples: 6            # candidates: the published settings, then seeded random draws
        split: val                # images the candidates are scored on: never the test split
        limit: 32                 # first images of that split (after data.test_limit's sample)
        seed: 0                   # whose trained few-shot prompts the candidates tune
        objective: adaptive_robust_acc   # or pgd<N>_acc (the transfer protocol) or clean_acc
        space: {lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}, steps: {type: int, low: 1, high: 3}}

The candidates are scored on images no table cell is scored on, so the pick sees no test image; the
chosen values go into ``tapt_search.json`` and the table's notes. The search is random (seeded), not
TPE: with a handful of candidates a model of the objective has nothing to learn from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

_SEARCH_KEYS = {"num_samples", "split", "limit", "seed", "objective", "space"}
SEARCHED = "-searched"  # the method suffix of the rows with the searched settings


def tapt_target(plan: dict[str, Any], cells: list[dict[str, Any]], robust_key: str) -> str:
    """The method whose few-shot prompts TAPT tunes (``best``: the best mean ``robust_key``)."""
    wanted = plan["tapt"].get("method", "best")
    if wanted != "best":
        return str(wanted)
    scores: dict[str, list[float]] = {}
    for c in _trained(cells):
        scores.setdefault(c["method"], []).append(c["metrics"].get(robust_key) or 0.0)
    return max(scores, key=lambda k: sum(scores[k]) / len(scores[k]))


def tapt_cells(plan: dict[str, Any], cells: list[dict[str, Any]], robust_key: str = "pgd100_acc",
               extra: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """TAPT cells: every variant (and ``extra`` ones, e.g. the searched settings) on every seed's
    few-shot prompts of :func:`tapt_target`."""
    wanted = tapt_target(plan, cells, robust_key)
    variants = {**(plan.get("tapt_variants") or {"": _base_options(plan["tapt"])}), **(extra or {})}
    return [{**c, "method": f"{wanted}+tapt{suffix}", "key": f"{wanted}+tapt{suffix}-few_shot-s{c['seed']}",
             "tapt_of": c["key"], "tapt_opts": opts}
            for suffix, opts in variants.items() for c in _trained(cells) if c["method"] == wanted]


def search_spec(tapt: dict[str, Any] | None, attack_steps: int) -> dict[str, Any] | None:
    """``tapt.search`` validated (space entries parsed), or None without one."""
    from pipeline.compare_plan import tapt_options
    from pipeline.search_space import parse_param

    section = (tapt or {}).get("search")
    if not section:
        return None
    if not isinstance(section, dict) or set(section) - _SEARCH_KEYS:
        raise ConfigError(f"tapt.search: expected a mapping with keys from {sorted(_SEARCH_KEYS)}, got {section!r}")
    try:
        space = {k: parse_param(k, v) for k, v in (section.get("space") or {}).items()}
    except ConfigError as exc:
        raise ConfigError(f"tapt.search.{exc}") from None
    if not space:
        raise ConfigError("tapt.search.space: nothing to search (e.g. lr: {type: float, low: 1e-4, high: 1e-2, log: true})")
    base = _base_options(tapt)
    for p in space.values():
        for value in p.samples():
            try:
                tapt_options({**base, p.key: value})
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"tapt.search.space.{p.key}: {exc}") from None
    objectives = ("adaptive_robust_acc", f"pgd{attack_steps}_acc", "clean_acc")
    spec = {"num_samples": int(section.get("num_samples", 6)), "split": str(section.get("split", "val")),
            "limit": int(section.get("limit", 32)), "seed": int(section.get("seed", 0)),
            "objective": str(section.get("objective", "adaptive_robust_acc")), "space": space}
    if spec["objective"] not in objectives:
        raise ConfigError(f"tapt.search.objective: {spec['objective']!r} is not one of {list(objectives)}")
    if spec["objective"] == "adaptive_robust_acc" and int(base.get("adaptive_steps", 10)) < 1:
        raise ConfigError("tapt.search.objective: adaptive_robust_acc needs tapt.adaptive_steps >= 1")
    if spec["num_samples"] < 1 or spec["limit"] < 1:
        raise ConfigError("tapt.search: num_samples and limit must be >= 1")
    return spec


def check_search_split(spec: dict[str, Any] | None, cells: list[dict[str, Any]]) -> None:
    """The search's split must exist and must not be a split any table cell is scored on."""
    from pipeline.compare_tuning import _check_split

    if not spec:
        return
    for c in cells:
        data = c["config"]["data"]
        if spec["split"] == data["test_split"]:
            raise ConfigError(f"tapt.search.split: {spec['split']!r} is the test split of cell {c['key']}; score "
                              "candidates on a split carved from the training data (e.g. `val`)")
        _check_split(data["path"], spec["split"])


def search_cells(plan: dict[str, Any], cells: list[dict[str, Any]], robust_key: str) -> list[dict[str, Any]]:
    """One TAPT cell per candidate setting, on seed ``spec.seed``'s few-shot prompts and ``spec.split``'s images."""
    spec = plan.get("tapt_search")
    if not spec:
        return []
    wanted = tapt_target(plan, cells, robust_key)
    source = next((c for c in _trained(cells) if c["method"] == wanted and c["seed"] == spec["seed"]), None)
    if source is None:
        raise ConfigError(f"tapt.search.seed: no trained few-shot cell of {wanted} with seed {spec['seed']}")
    base = _base_options(plan["tapt"])
    config = {**source["config"], "data": {**source["config"]["data"], "test_split": spec["split"]}}
    return [{**source, "config": config, "method": f"{wanted}+tapt-search", "key": f"{wanted}+tapt-search{i}-{spec['split']}-s{spec['seed']}",
             "tapt_of": source["key"], "tapt_search": i, "tapt_params": params,
             "tapt_opts": {**base, **params, "split": spec["split"], "limit": spec["limit"]}}
            for i, params in enumerate(candidates(spec, base))]


def candidates(spec: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """The published (base) settings first, then ``num_samples - 1`` seeded random draws from the space."""
    import optuna

    from pipeline.compare_plan import tapt_options

    tcfg = tapt_options(base)[0]
    first = {k: base.get(k, getattr(tcfg, k, None)) for k in spec["space"]}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=spec["seed"]))
    out = [first]
    while len(out) < spec["num_samples"]:
        trial = study.ask({k: p.distribution() for k, p in spec["space"].items()})
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


def pick(spec: dict[str, Any], scored: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the best objective (ties: higher clean accuracy, then the earlier candidate)."""
    if not scored:
        raise RuntimeError("tapt.search: no candidate completed")

    def score(c: dict[str, Any]) -> tuple[float, float, int]:
        value = c["metrics"].get(spec["objective"])
        value = -math.inf if value is None or math.isnan(value) else value
        return value, c["metrics"].get("clean_acc") or 0.0, -c["tapt_search"]

    best = max(scored, key=score)
    rows = [{"candidate": c["tapt_search"], "params": c["tapt_params"],
             **{k: c["metrics"].get(k) for k in (spec["objective"], "clean_acc", "adaptive_robust_acc")}}
            for c in sorted(scored, key=lambda c: c["tapt_search"])]
    return {"params": best["tapt_params"], "candidate": best["tapt_search"], "objective": spec["objective"],
            "split": spec["split"], "images": spec["limit"], "seed": spec["seed"], "prompts_of": best["tapt_of"],
            "candidates": rows}


def searched_variant(plan: dict[str, Any], chosen: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"-searched": options}``: the section's options with the chosen values; empty when the search
    kept the published settings (candidate 0), whose rows are the ``+tapt`` ones already (not run twice)."""
    if chosen["candidate"] == 0:
        return {}
    return {SEARCHED: {**_base_options(plan["tapt"]), **chosen["params"]}}


def write_search(out: Path, chosen: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tapt_search.json").write_text(json.dumps(chosen, indent=2, default=str))


def search_markdown(chosen: dict[str, Any] | None) -> str:
    """The table's note on the TAPT search: every candidate's score and the pick."""
    if not chosen:
        return ""
    obj = chosen["objective"]
    lines = [f"TAPT settings searched ({len(chosen['candidates'])} candidates, candidate 0 = the published ones; "
             f"scored by {obj} on the first {chosen['images']} `{chosen['split']}` images with the prompts of "
             f"{chosen['prompts_of']}; no test image): picked candidate {chosen['candidate']}, "
             f"{_fmt_params(chosen['params'])} "
             + (f"(rows `{SEARCHED[1:]}`)." if chosen["candidate"] else "(the published settings: rows `+tapt`)."),
             "",
             f"| candidate | settings | {obj} | clean |", "|---|---|---|---|"]
    for r in chosen["candidates"]:
        lines.append(f"| {r['candidate']} | {_fmt_params(r['params'])} | {_pct(r.get(obj))} | {_pct(r.get('clean_acc'))} |")
    return "\n".join(lines) + "\n"


def tapt_gains(cells: list[dict[str, Any]], attack: str) -> list[dict[str, Any]]:
    """Each TAPT row minus the same prompts without TAPT ON THE SAME IMAGES (a TAPT cell reports both),
    seed by seed: clean, the table attack (transfer) and the adaptive attack. The table's other paired
    comparisons cannot do this: TAPT rows are scored on the first ``tapt.limit`` test images only."""
    from pipeline.compare_stats import adjust, paired_test
    from pipeline.compare_table import attack_title

    rows = [c for c in cells if "tapt_of" in c]
    cols = (("clean", "clean_acc", "base_clean_acc_no_tapt"),
            (attack_title(attack), f"{attack}_acc", "base_robust_acc_no_tapt"),
            ("adaptive (TAPT)", "adaptive_robust_acc", "base_robust_acc_no_tapt"))
    records = []
    for title, key, base_key in cols:
        group = []
        for method in sorted({c["method"] for c in rows}):
            pairs = [(c["metrics"].get(key), c["metrics"].get(base_key))
                     for c in sorted(rows, key=lambda c: str(c["seed"])) if c["method"] == method]
            pairs = [(a, b) for a, b in pairs if _finite(a) and _finite(b)]
            if pairs:
                group.append({"column": title, "peer": method, "reference": "no TAPT", "metric": key,
                              **paired_test([a for a, _ in pairs], [b for _, b in pairs])})
        records += adjust(group)
    return records


def tapt_gains_markdown(records: list[dict[str, Any]]) -> str:
    from pipeline.compare_stats import paired_markdown

    if not records:
        return ""
    what = ("each TAPT row (peer) minus the same trained prompts without TAPT, on the same images of each "
            "seed; adaptive: against the same prompts' transfer accuracy")
    return paired_markdown(records, what=what)


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(v)


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _base_options(tapt: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (tapt or {}).items() if k not in ("method", "variants", "search")}


def _trained(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cells if c["protocol"] == "few_shot" and c["method"] != "zeroshot" and "tapt_of" not in c]

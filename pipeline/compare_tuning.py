"""Fair tuning for ``capt compare``: each method's hyperparameters chosen by the project's own search,
with the same budget per method, on a validation split carved from the training data.

A compare file's optional ``tuning`` section::

    tuning:
      split: val              # data.test_split while tuning; a split of the shards, never the test split
      seed: 100               # few-shot draw and initialisation while tuning (not one of the table's seeds)
      objective: robust_acc   # what the search maximises on `split` (per-epoch monitor attack)
      num_samples: 8          # trials per method: the SAME budget for every method
      space: {optim.lr: {type: float, low: 0.002, high: 0.1, log: true}}   # searched for every method
      method_space: {capt: {loss.lam: {type: float, low: 0.1, high: 10, log: true}}}  # extra, per method
      search: {scheduler: {type: none}, max_concurrent: 2}    # any other `search:` setting
      overrides: {eval.attack: pgd, eval.steps: 5}  # dotted config keys set while tuning only (the monitor)

For every tuned method (every method but ``zeroshot``) the driver runs one ``capt search``
(:func:`pipeline.search.run_search`) whose base is that method's few-shot config with
``data.test_split = split`` and ``seed``, then applies the best trial's values to ALL of the method's
cells (few-shot and base-to-new, every seed). The chosen values go into ``tuning.json`` and the
table's notes. What this does not do: tune per protocol (base-to-new reuses the few-shot choice),
or repeat the search per seed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, from_dict

UNTUNED = ("zeroshot",)  # nothing to tune: no training
_KEYS = {"split", "seed", "objective", "num_samples", "space", "method_space", "search", "overrides"}


def tuning_docs(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One search document per tuned method (validated); empty without a ``tuning`` section."""
    from pipeline.search_space import parse_search

    tuning = plan["doc"].get("tuning")
    if not tuning:
        return {}
    unknown = set(tuning) - _KEYS
    if unknown:
        raise ConfigError(f"tuning: unknown key(s) {sorted(unknown)} (allowed: {sorted(_KEYS)})")
    split, seed = str(tuning.get("split", "val")), int(tuning.get("seed", 100))
    docs = {}
    for method in plan["methods"]:
        if method in UNTUNED:
            continue
        cell = next(c for c in plan["cells"] if c["method"] == method and c["protocol"] == "few_shot")
        if split == cell["config"]["data"]["test_split"]:
            raise ConfigError(f"tuning.split: {split!r} is the test split; tune on a split carved from the "
                              "training data (e.g. `val` of `capt shards --demo fashion`)")
        _check_split(cell["config"]["data"]["path"], split)
        over = {**(tuning.get("overrides") or {}), "data.test_split": split, "data.seed": seed, "run.seed": seed,
                "data.cross_datasets": []}
        try:
            base_cfg = from_dict(cell["config"]).replace(**over)
        except ConfigError as exc:
            raise ConfigError(f"tuning.overrides: {exc}") from None
        objective = tuning.get("objective", "robust_acc")
        if objective == "robust_acc" and base_cfg.eval.attack == "none":
            raise ConfigError("tuning: objective robust_acc needs a per-epoch monitor attack; set "
                              "tuning.overrides: {eval.attack: pgd}")
        base = base_cfg.to_dict()
        space = {**(tuning.get("space") or {}), **((tuning.get("method_space") or {}).get(method) or {})}
        if not space:
            raise ConfigError(f"tuning: nothing to search for method {method!r} (empty space)")
        out = Path(plan["settings"]["out"]) / "tuning" / method
        search = {**copy.deepcopy(tuning.get("search") or {}), "name": f"{plan['settings']['name']}-tune-{method}",
                  "objectives": [objective],
                  "num_samples": int(tuning.get("num_samples", 8)), "out": str(out), "seed": seed}
        doc = {"base": base, "search": search, "space": copy.deepcopy(space),
               "tracking": {"uri": plan["tracking"].get("uri")}}
        try:
            parse_search(doc, source=f"tuning of {method}")
        except ConfigError as exc:
            raise ConfigError(f"tuning ({method}): {exc}") from None
        docs[method] = doc
    return docs


def _check_split(path: str, split: str) -> None:
    """A local shards folder must hold the tuning split (remote ones are checked when read)."""
    from pipeline.data.meta import META_NAME, read_meta

    if path and (Path(path) / META_NAME).is_file() and split not in read_meta(path)["splits"]:
        raise ConfigError(f"tuning.split: {path} has no split {split!r} (make one with `capt shards --demo fashion`, "
                          "which carves `val` from the training data)")


def run_tuning(docs: dict[str, dict[str, Any]], out: Path) -> dict[str, dict[str, Any]]:
    """Run each method's search; return ``{method: {"params": ..., <val metrics>}}``, also as tuning.json."""
    from pipeline.search import run_search
    from pipeline.search_space import parse_search

    chosen: dict[str, dict[str, Any]] = {}
    for method, doc in docs.items():
        summary = run_search(parse_search(doc, source=f"tuning of {method}"))
        best = summary.get("best") or []
        if not best:
            raise RuntimeError(f"tuning of {method}: no trial completed; see {doc['search']['out']}")
        chosen[method] = {"params": dict(best[0]["params"]), "val_robust_acc": best[0].get("robust_acc"),
                          "val_clean_acc": best[0].get("clean_acc"), "trials": sum(summary["counts"].values()),
                          "split": doc["base"]["data"]["test_split"], "seed": doc["base"]["run"]["seed"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(chosen, indent=2, default=str))
    return chosen


def apply_tuned(cells: list[dict[str, Any]], chosen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells with each method's chosen values applied to its config."""
    out = []
    for cell in cells:
        params = (chosen.get(cell["method"]) or {}).get("params")
        if params:
            cell = {**cell, "config": from_dict(cell["config"]).replace(**params).to_dict()}
        out.append(cell)
    return out


def tuning_notes(chosen: dict[str, dict[str, Any]]) -> str:
    """Markdown lines recording the chosen values (for the table's notes)."""
    if not chosen:
        return ""
    lines = ["Hyperparameters chosen per method by `capt search` on the validation split (same trial budget):"]
    for method, c in chosen.items():
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(c["params"].items()))
        acc = c.get("val_robust_acc")
        lines.append(f"- {method}: {vals} ({c['trials']} trials on `{c['split']}`, seed {c['seed']}"
                     + (f", val robust {100 * acc:.1f}%" if isinstance(acc, float) else "") + ")")
    return "\n".join(lines) + "\n"

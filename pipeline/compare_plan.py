"""A compare file, read and resolved: every (method, protocol, seed) cell's full config.

A compare file (``configs/compare/*.yaml``) holds a shared ``base`` config, the ``methods`` with their
overrides, ``seeds``, the ``protocols`` (``few_shot``: all classes, evaluated on the test split and
zero-shot on ``data.cross_datasets``; ``base_to_new``: trained on the base half of the classes,
evaluated on base and new), an optional ``tapt`` stage and an optional ``tuning`` stage
(:mod:`pipeline.compare_tuning`). No Ray, no MLflow here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipeline.compare_checks import check_specs
from pipeline.compare_tapt import check_search_split, search_spec
from pipeline.compare_tuning import tuning_docs
from pipeline.config import ConfigError, from_dict, read_yaml, set_dotted

PROTOCOLS = {"few_shot": {}, "base_to_new": {"data": {"classes": "base"}}}
_TOP = {"base", "methods", "seeds", "protocols", "tapt", "compare", "tracking", "tuning", "checks"}


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
    _check_table_attack(settings, cells, doc.get("tapt"))
    plan = {"cells": cells, "methods": list(methods), "settings": settings, "tapt": doc.get("tapt"),
            "tracking": doc.get("tracking") or {}, "source": str(Path(path).resolve()), "doc": doc}
    plan["tuning"] = tuning_docs(plan)  # validated now, before anything runs
    plan["tapt_variants"] = tapt_variants(doc.get("tapt"))
    plan["tapt_search"] = search_spec(doc.get("tapt"), int((doc.get("tapt") or {}).get("attack_steps", 100)))
    check_search_split(plan["tapt_search"], cells)
    plan["checks"] = check_specs(doc.get("checks"), plan)
    return plan


_TAPT_EVAL = ("attack_steps", "adaptive_steps", "limit", "split")  # evaluation options, not TaptConfig fields


def tapt_variants(tapt: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``tapt`` section -> {method suffix: options}: ``+tapt`` with the section's options, and one
    ``+tapt-<name>`` per entry of ``tapt.variants`` (options overriding the section's), each checked.

    E.g. ``variants: {official: {reset: official, adv_images: clean}}`` adds the released code's TAPT.
    """
    if not tapt:
        return {}
    base = {k: v for k, v in tapt.items() if k not in ("method", "variants", "search")}
    variants = tapt.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError(f"tapt.variants: expected a mapping name -> options, got {variants!r}")
    out = {"": base, **{f"-{name}": {**base, **(v or {})} for name, v in variants.items()}}
    for suffix, opts in out.items():
        try:
            tapt_options(opts)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"tapt{' variant ' + suffix[1:] if suffix else ''}: {exc}") from None
    return out


def tapt_options(opts: dict[str, Any]) -> tuple[Any, dict[str, int], str]:
    """(TaptConfig, TaptEvalConfig keywords, adv_images) from one variant's options."""
    from pipeline.tapt import TaptConfig
    from pipeline.tapt_stats import ADV_IMAGES

    rest = {k: v for k, v in opts.items() if k not in (*_TAPT_EVAL, "adv_images")}
    adv_images = str(opts.get("adv_images", "pgd"))
    if adv_images not in ADV_IMAGES:
        raise ConfigError(f"adv_images must be one of {list(ADV_IMAGES)}, got {adv_images!r}")
    if "layers" in rest and rest["layers"] is not None:
        rest["layers"] = tuple(rest["layers"])
    ev = {"attack_steps": int(opts.get("attack_steps", 100)), "adaptive_steps": int(opts.get("adaptive_steps", 10))}
    limit = opts.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: expected a number of test images >= 1, got {limit!r}")
    return TaptConfig(**rest), ev, adv_images


def _check_table_attack(settings: dict[str, Any], cells: list[dict[str, Any]], tapt: dict[str, Any] | None) -> None:
    """``compare.table_attack`` (the table's robust figure) must be run by every cell, and by TAPT's transfer attack."""
    from pipeline.config import FINAL_ATTACKS

    attack = settings.setdefault("table_attack", "pgd100")
    if attack not in FINAL_ATTACKS or attack == "autoattack":
        raise ConfigError(f"compare.table_attack: {attack!r} is not one of {[a for a in FINAL_ATTACKS if a != 'autoattack']}")
    missing = [c["key"] for c in cells if attack not in c["config"]["eval"]["final_attacks"]]
    if missing:
        raise ConfigError(f"compare.table_attack: {attack} is not in eval.final_attacks of cell {missing[0]}")
    steps = int((tapt or {}).get("attack_steps", 100))
    if tapt and attack != f"pgd{steps}":
        raise ConfigError(f"tapt.attack_steps: {steps} does not match compare.table_attack {attack} "
                          f"(TAPT's transfer attack fills the table's robust column; set attack_steps to match)")


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

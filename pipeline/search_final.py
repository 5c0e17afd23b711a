"""The search's final re-evaluation: the chosen trials' prompts (and zero-shot CLIP beside the best) under
the strong attacks, one Ray task per (model, eps), on the trials' resources."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.config import eval_eps, from_dict
from pipeline.search_space import SearchSpec

log = logging.getLogger("pipeline.search")

def _final_eval(ctx: dict[str, Any], params: dict[str, Any], checkpoint: Any, attacks: list[str],
                eps_list: list[float]) -> tuple[dict[str, float], bytes | None]:
    """A Ray task (same resources as a trial): strong attacks on the trial's final prompts
    (``checkpoint`` None: on zero-shot CLIP, the same frozen model without prompts)."""
    import tempfile

    from pipeline.evaluate import final_metrics
    from pipeline.task import load_task
    from pipeline.train import build_model, resolve_device

    cfg = from_dict(ctx["base"]).replace(**params)
    if checkpoint is None:
        cfg = cfg.replace(**{"prompt.design": "none"})
    task = load_task(cfg.data, ctx["image_size"])
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)  # as train() does: the same CLIP when its weights are randomly initialised
    model = build_model(cfg, task.classnames, task.templates, device)
    state = None
    if checkpoint is not None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint.to_directory(d)
            state = torch.load(Path(d) / "last.pt", map_location="cpu", weights_only=True)
        model.load_prompt_state(state["prompts"], source="search checkpoint")
    model.eval()
    metrics = final_metrics(model, task.test_x, task.test_y, attacks=attacks, eps_list=eps_list,
                            primary_eps=eval_eps(cfg), batch_size=cfg.eval.batch_size, device=device,
                            autoattack_limit=cfg.eval.autoattack_limit)
    if state is None:
        return metrics, None
    buf = io.BytesIO()
    torch.save({"prompts": state["prompts"], "config": cfg.to_dict(), "classnames": task.classnames,
                "templates": task.templates}, buf)
    return metrics, buf.getvalue()


def final_evaluation(spec: SearchSpec, ctx: dict[str, Any], chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Re-evaluate the chosen trials, the first also at ``search.final_eps`` and zero-shot CLIP beside it
    (``zero_shot``): one Ray task per (model, eps), all in parallel on the trials' resources, merged."""
    res = spec.search.resources
    task = ray.remote(_final_eval).options(num_cpus=res.get("cpu", 1), num_gpus=res.get("gpu", 0), max_retries=1)
    eps = [eval_eps(from_dict(ctx["base"]).replace(**row["params"])) for row in chosen]
    jobs = []  # (row index, ref); index len(chosen): zero-shot CLIP with the first trial's settings
    attacks = list(spec.search.final_attacks)
    for i, row in enumerate(chosen):
        for e in (sorted({eps[i], *spec.search.final_eps}) if i == 0 else [eps[i]]):
            jobs.append((i, task.remote(ctx, row["params"], row["checkpoint"], attacks, [e])))
            if i == 0:
                jobs.append((len(chosen), task.remote(ctx, row["params"], None, attacks, [e])))
    log.info("re-evaluating %d trial(s) and zero-shot CLIP with %s: %d Ray task(s)", len(chosen),
             ", ".join(attacks), len(jobs))
    merged: list[dict[str, float]] = [{} for _ in range(len(chosen) + 1)]
    prompts: list[bytes | None] = [None for _ in chosen]
    for (i, _), (metrics, blob) in zip(jobs, ray.get([ref for _, ref in jobs]), strict=True):
        merged[i].update(metrics)
        if i < len(chosen):
            prompts[i] = prompts[i] or blob
    rows = [{**row, "eps": e, "final": m, "prompts": b} for row, e, m, b in zip(chosen, eps, merged, prompts, strict=False)]
    if rows:
        rows[0]["zero_shot"] = merged[-1]
    return rows

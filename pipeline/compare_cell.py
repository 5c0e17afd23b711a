"""One ``capt compare`` cell as a Ray Tune trial: train and evaluate, or run TAPT on a trained cell.

Imported by :mod:`pipeline.compare_ray` (the trainable); imports neither the driver nor Ray Tune's
runner, so the dependency runs one way: compare -> compare_ray -> compare_cell.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import from_dict


def cell_main(config: dict[str, Any]) -> None:
    """One Tune trial: train and evaluate a cell (or run TAPT on a trained cell), log to MLflow."""
    import torch
    from ray import tune

    from pipeline.train import resolve_device

    cell, ctx = config["cell"], config["ctx"]
    torch.set_num_threads(max(1, int(ctx["cpus"])))  # a trial's share; more threads only contend
    run = tracking.TrialRun(ctx["uri"], ctx["experiment_id"], ctx["parent_id"], cell["key"],
                            run_name=cell["key"], tags={**ctx.get("source_tags", {}), "method": cell["method"],
                                                         "protocol": cell["protocol"], "seed": str(cell["seed"])})
    try:
        cfg = from_dict(cell["config"])
        device = resolve_device(cfg.run.device)
        work = Path(ctx["out"]) / "cells" / cell["key"]
        if cell.get("tapt_of"):
            metrics = _tapt_cell(cfg, cell, ctx, work, device)
        elif cell.get("check_of"):
            from pipeline.compare_checks import run_check

            metrics = run_check(cell, Path(ctx["out"]) / "cells" / cell["check_of"], device)
        else:
            metrics = _train_cell(cfg, run, work, device, lambda m: tune.report(m))
        tracking.log_metrics(ctx["uri"], run.run_id, metrics)
        if (work / "prompts.pt").is_file():
            run.log_file(work / "prompts.pt")
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
    tune.report({**metrics, "run_id": run.run_id})


def _train_cell(cfg, run, work: Path, device, report) -> dict[str, float]:
    from pipeline.clip import image_size_of
    from pipeline.protocol import final_evaluation
    from pipeline.task import load_task
    from pipeline.train import train

    run.log_params({"method": cfg.method, "design": cfg.prompt.design, "objective": cfg.loss.objective,
                    "eps": cfg.attack.eps, "seed": cfg.run.seed, "classes": cfg.data.classes})
    run.log_config(cfg.to_dict())
    size = image_size_of(cfg.model.name)
    task = load_task(cfg.data, size)

    def on_epoch(metrics: dict[str, Any], _ckpt: Any) -> None:
        run.log_epoch(metrics, metrics["epoch"])
        report({k: v for k, v in metrics.items() if isinstance(v, int | float)})

    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, task, out_dir=work, report=on_epoch, device=device)
    cost = {"train_seconds": time.perf_counter() - wall, "train_cpu_seconds": time.process_time() - cpu}
    metrics = final_evaluation(cfg, result.model, task, device, image_size=size)
    return {**metrics, **cost}


def _tapt_cell(cfg, cell, ctx, work: Path, device) -> dict[str, float]:
    """TAPT on a trained cell's prompts: the paper protocol (PGD-100 transfer) and the adaptive attack."""
    from pipeline.compare_plan import tapt_options
    from pipeline.runs import load_run
    from pipeline.tapt import TaptEvalConfig, evaluate_tapt
    from pipeline.tapt_stats import resolve_layers
    from pipeline.task import load_task

    base_cfg, model = load_run(Path(ctx["out"]) / "cells" / cell["tapt_of"], device)
    if cell["tapt_opts"].get("split"):  # a TAPT search candidate: scored on that split, never on test
        base_cfg = base_cfg.replace(**{"data.test_split": cell["tapt_opts"]["split"]})
    tcfg, ev_kw, adv_images = tapt_options(cell["tapt_opts"])
    ev = TaptEvalConfig(eps=base_cfg.attack.eps, seed=cell["seed"], **ev_kw)
    task = load_task(base_cfg.data, model.image_size)
    n = cell["tapt_opts"].get("limit") or len(task.test_y)  # TAPT costs ~100x a forward pass per image
    layers = resolve_layers(tcfg.layers, model.n_vision_layers)
    stats = tapt_stats(model, task, base_cfg.attack.eps_px, layers, adv_images,
                       Path(ctx["out"]) / "cells" / cell["tapt_of"], device)
    t0 = time.perf_counter()
    m = evaluate_tapt(model, task.test_x[:n], task.test_y[:n], stats, tcfg, ev, device=device)
    return {"clean_acc": m["tapt_clean_acc"], f"pgd{ev.attack_steps}_acc": m["tapt_robust_acc"],
            "adaptive_robust_acc": m.get("adaptive_robust_acc"), "base_clean_acc_no_tapt": m["clean_acc"],
            "base_robust_acc_no_tapt": m["robust_acc"], "tapt_images": float(n), "tapt_pool_images": float(len(task.test_y)),
            "tapt_seconds": time.perf_counter() - t0}


def tapt_stats(model, task, eps_px: float, layers, adv_images: str, run_dir: Path, device):
    """TAPT's reference statistics of one trained cell's prompts on its few-shot train images, computed
    once per (adv_images, layers) and kept in the cell's folder: every TAPT row and search candidate on
    those prompts reads them instead of attacking the train split again."""
    from pipeline.attacks import build_attack
    from pipeline.tapt_stats import compute_stats, load_stats, save_stats

    path = run_dir / f"tapt-stats-{adv_images}-l{'_'.join(str(i) for i in layers)}.pt"
    if path.is_file():
        return load_stats(path)
    attack = build_attack("pgd", eps=eps_px, steps=10, module=model, keep_best=False)
    stats = compute_stats(model, task.train_x, task.train_y, layers, attack=attack, device=device,
                          adv_images=adv_images)
    save_stats(path, stats)  # atomic: two trials computing it at once both write a whole file
    return stats

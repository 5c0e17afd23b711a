"""One Tune trial of the search: build its config, load its data once, train with per-epoch reports
(MLflow per epoch, then ``tune.report`` with the checkpoint folder).

Runs in Ray worker processes; everything it needs besides the sampled values comes in
``config[CTX]`` (see ``search_report.trial_context``).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from pipeline import tracking
from pipeline.config import from_dict
from pipeline.search_notes import eval_params

log = logging.getLogger("pipeline.search")
CTX = "capt"  # param_space key holding everything a trial needs besides the sampled values


def trial_main(config: dict[str, Any]) -> None:
    """One Tune trial: build its config, load its data once, train with per-epoch reports."""
    from pipeline.task import load_task
    from pipeline.train import train

    ctx = config[CTX]
    params = {k: v for k, v in config.items() if k != CTX}
    cfg = from_dict(ctx["base"]).replace(**params)
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    work = Path.cwd() if os.environ.get("RAY_CHDIR_TO_TRIAL_DIR", "1") != "0" else \
        Path(tempfile.gettempdir()) / "capt-trials" / trial_id
    run = tracking.TrialRun(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"], trial_id,
                            run_name=tctx.get_trial_name(), tags=ctx["tags"])
    try:
        run.log_params({**params, **ctx["fixed_params"], **eval_params(cfg)})  # + what measured robust_acc
        run.log_config(cfg.to_dict())
        work.mkdir(parents=True, exist_ok=True)
        if _report_recorded(run, cfg, ctx, work):  # finished before a driver restart: do not train again
            run.finish()
            return
        task = load_task(cfg.data, ctx["image_size"])
        resume_from = _restore_checkpoint(work)
        reporter = _Reporter(ctx, run, trial_id, cfg, task, work)
        train(cfg, task, report=reporter, out_dir=work, resume_from=resume_from)
    except Exception as exc:
        run.set_tags({"error": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]})
        run.finish("FAILED")
        raise


def _console_first(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numeric metrics, ``clean_acc`` and ``robust_acc`` first: Tune's console table shows the first
    four metrics of a result, so these are what it shows per trial while the search runs."""
    first = [k for k in ("clean_acc", "robust_acc", "epoch") if k in metrics]
    return {k: metrics[k] for k in [*first, *metrics] if isinstance(metrics[k], int | float)}


def _restore_checkpoint(work: Path) -> Path | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    dst = work / "restored"
    checkpoint.to_directory(str(dst))
    log.info("trial resumes from its Tune checkpoint %s", checkpoint.path)
    return dst / "last.pt"


def _report_recorded(run: tracking.TrialRun, cfg: Any, ctx: dict[str, Any], work: Path) -> bool:
    """Report a trial that an earlier driver saw finish (MLflow has its final metrics and prompts)."""
    recorded = run.recorded_final(work / "recorded")
    if recorded is None:
        return False
    metrics, prompts = recorded
    state = torch.load(prompts, map_location="cpu", weights_only=True)
    folder = work / "recorded" / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": cfg.optim.epochs, "prompts": state["prompts"], "config": cfg.to_dict(), "optimizer": {},
                "history": []}, folder / "last.pt")
    out = {**_console_first(metrics), "epoch": cfg.optim.epochs}
    out.update({f"objective_{n}": metrics[n] for n in ctx["objectives"] if math.isfinite(metrics.get(n, math.nan))})
    log.info("trial %s already finished before a restart: reporting its recorded result", run.run_id)
    tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(folder)))
    return True


class _Reporter:
    """train()'s report callback: MLflow per epoch, then ``tune.report`` with the checkpoint folder."""

    def __init__(self, ctx: dict[str, Any], run: tracking.TrialRun, trial_id: str, cfg: Any, task: Any, work: Path):
        self.ctx, self.run, self.trial_id, self.cfg, self.task, self.work = ctx, run, trial_id, cfg, task, work

    def __call__(self, metrics: dict[str, Any], ckpt_path: Path | None) -> None:
        epoch = int(metrics["epoch"])
        self.run.log_epoch(metrics, epoch)
        self._maybe_fail(epoch)
        out = _console_first(metrics)
        if epoch >= self.cfg.optim.epochs:  # the final epoch: the searcher's objective, the prompts
            for name in self.ctx["objectives"]:
                if math.isfinite(metrics.get(name, math.nan)):
                    out[f"objective_{name}"] = float(metrics[name])
            if ckpt_path is not None:
                self.run.log_file(self._prompts_file(ckpt_path))
                self.run.mark_final(epoch)
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_path.parent)) if ckpt_path is not None else None
        tune.report(out, checkpoint=checkpoint)

    def _maybe_fail(self, epoch: int) -> None:
        knob = self.ctx.get("inject_failure") or {}
        index = int(tune.get_context().get_trial_name().split("_")[1])
        if knob and index == knob.get("trial_index") and epoch >= knob.get("epoch", 1):
            raise RuntimeError(f"injected failure (search.inject_failure) at epoch {epoch}")

    def _prompts_file(self, ckpt_path: Path) -> Path:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        path = self.work / "prompts.pt"
        torch.save({"prompts": state["prompts"], "config": self.cfg.to_dict(), "classnames": self.task.classnames,
                    "templates": self.task.templates}, path)
        return path

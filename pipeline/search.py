"""Distributed hyperparameter search: Ray Tune trials, an Optuna (TPE) searcher, ASHA early stopping,
MLflow tracking, then a strong-attack re-evaluation of the best trial(s).

Run: ``python pipeline/search.py --config search_spaces/demo.yaml [--set k=v ...] [--resume]``
(= ``capt search ...``), locally or as ``ray job submit --working-dir . -- python pipeline/search.py ...``.

How trials reach Optuna: every epoch reports ``clean_acc`` / ``robust_acc`` (ASHA's metric) and a
checkpoint; only a trial's final epoch adds ``objective_<name>``, the searcher's metric. A trial that
ASHA stops early therefore ends without it and is told to Optuna as PRUNED (not as COMPLETE with a
partial accuracy); a trial that raises ends as FAIL. ``--resume`` restores the Tune experiment
(searcher and scheduler state included) from ``search.storage_path``; the Optuna study and the MLflow
runs live in persistent stores and are reused, keyed by Tune trial id, so nothing runs or logs twice.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if not __package__:  # run as a script: pipeline/ (not the repo root) is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the objective comes at the end only
# Per-epoch checkpoints with num_to_keep=2 force frequent experiment snapshots: intended (an exact
# resume); silence Tune's "snapshotting may become a bottleneck" warning about it.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import optuna  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search import ConcurrencyLimiter  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.config import ConfigError, from_dict  # noqa: E402
from pipeline.search_space import SearchSpec, load_search, optuna_space  # noqa: E402

log = logging.getLogger("pipeline.search")
CTX = "capt"  # param_space key holding everything a trial needs besides the sampled values
TUNE_ID_ATTR = "tune_trial_id"


# ----------------------------------------------------------------------------- the searcher

class CaptOptunaSearch(OptunaSearch):
    """OptunaSearch that (1) tolerates results without the objective (it comes at the last epoch only)
    and tells a trial without it as PRUNED, with one objective or two, (2) tags each Optuna trial with
    its Tune trial id, and (3) after a restore, reuses Optuna trials that were asked for but never saved
    in the Tune experiment state (a driver killed in between), so the study holds exactly one Optuna
    trial per Tune trial."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        value = result.get(self.metric, result.get(str(self.metric).removeprefix("objective_")))
        if value is not None and trial_id in self._ot_trials and math.isfinite(value):
            self._ot_trials[trial_id].report(value, result.get("epoch", result.get("training_iteration", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # OptunaSearch tells [None, None] for a multi-objective trial without its objectives, which
        # Optuna rejects (the trial would stay RUNNING): make it PRUNED (or FAIL) as for one objective.
        if result and isinstance(self.metric, list) and any(result.get(m) is None for m in self.metric):
            result = None
        super().on_trial_complete(trial_id, result, error)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and getattr(self, "_orphans", None):
            number = self._orphans.pop(0)
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, number)
            log.info("reusing Optuna trial %d (asked before the driver stopped) for %s", number, trial_id)
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_ID_ATTR, trial_id)
        return config

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        self._orphans = [t._trial_id for t in running if t._trial_id not in known]
        if self._orphans:
            log.info("%d Optuna trial(s) were asked but not recorded by Tune; they will be reused", len(self._orphans))
            self._ot_study.sampler.reseed_rng()  # else the restored RNG re-draws the orphans' values


def make_searcher(spec: SearchSpec, storage: optuna.storages.BaseStorage) -> ConcurrencyLimiter:
    modes = ["max"] * len(spec.metrics)
    multi = len(spec.metrics) > 1
    with warnings.catch_warnings():  # multivariate / group / constant_liar are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=spec.search.seed, multivariate=True, group=spec.conditional,
                                             constant_liar=True)
    searcher = CaptOptunaSearch(optuna_space(spec), metric=spec.metrics if multi else spec.metrics[0],
                                mode=modes if multi else modes[0],
                                points_to_evaluate=[dict(p) for p in spec.search.points_to_evaluate] or None,
                                sampler=sampler, study_name=spec.search.name, storage=storage)
    return ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)


def make_scheduler(spec: SearchSpec, epochs: int) -> Any:
    sched = spec.search.scheduler
    if sched["type"] == "none" or epochs < 1:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric="robust_acc", mode="max", max_t=max(epochs, 1),
                         grace_period=min(int(sched.get("grace_period", 1)), epochs),
                         reduction_factor=sched.get("reduction_factor", 2))


# ----------------------------------------------------------------------------- the trainable

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
        run.log_params({**params, **ctx["fixed_params"]})
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
    out = {**metrics, "epoch": cfg.optim.epochs}
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
        out = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
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


class MlflowStatus(tune.Callback):
    """Driver side: the terminal status of each trial's child run, even when its process died."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, objective: str):
        self.uri, self.experiment_id, self.parent_run_id, self.objective = uri, experiment_id, parent_run_id, objective

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = self.objective in (trial.last_result or {})
        tracking.set_trial_status(self.uri, self.experiment_id, self.parent_run_id, trial.trial_id,
                                  "FINISHED" if done else "KILLED", "COMPLETE" if done else "PRUNED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tracking.set_trial_status(self.uri, self.experiment_id, self.parent_run_id, trial.trial_id, "FAILED", "FAIL")


# ----------------------------------------------------------------------------- the driver

def run_search(spec: SearchSpec, *, resume: bool = False) -> dict[str, Any]:
    """The whole search; returns the summary (also written to ``search.out/summary.json``).

    Raises KeyboardInterrupt when stopped (Ctrl-C, SIGTERM) before all trials ended."""
    from pipeline import search_report as report

    plan = report.prepare(spec)  # paths, data, MLflow probe: all before Ray starts
    storage = report.optuna_storage(plan.optuna_url)
    restorable = tune.Tuner.can_restore(plan.experiment_path)
    report.check_fresh(spec, plan, storage, resume=resume, restorable=restorable)
    started = _init_ray(spec)
    try:
        parent_id = report.start_parent(spec, plan)
        trainable = tune.with_resources(trial_main, {"cpu": spec.search.resources.get("cpu", 1),
                                                     "gpu": spec.search.resources.get("gpu", 0)})
        param_space = {CTX: report.trial_context(spec, plan, parent_id)}
        if resume and restorable:
            log.info("resuming the search from %s", plan.experiment_path)
            tuner = tune.Tuner.restore(plan.experiment_path, trainable, resume_errored=True, param_space=param_space)
        else:
            tuner = _new_tuner(spec, plan, storage, trainable, param_space, parent_id)
        if _fit(tuner):
            raise KeyboardInterrupt(f"search stopped; run again with --resume to continue ({plan.experiment_path})")
        return report.finish(spec, plan, parent_id, storage, tuner.get_results())
    finally:
        if started:
            ray.shutdown()


def _new_tuner(spec: SearchSpec, plan: Any, storage: Any, trainable: Any, param_space: dict, parent_id: str) -> Any:
    epochs = int(plan.base["optim"].get("epochs", from_dict(plan.base).optim.epochs))
    tune_config = tune.TuneConfig(search_alg=make_searcher(spec, storage), scheduler=make_scheduler(spec, epochs),
                                  num_samples=spec.search.num_samples, reuse_actors=False,
                                  trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    run_config = tune.RunConfig(
        name=spec.search.name, storage_path=plan.storage_path,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        callbacks=[MlflowStatus(plan.tracking_uri, plan.experiment_id, parent_id, spec.metrics[0])],
        verbose=1)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _fit(tuner: Any) -> bool:
    """Run the trials; SIGTERM (Kubernetes, `ray job stop`) stops Tune gracefully like Ctrl-C.
    Returns True when the search was interrupted before all trials ended."""
    stopped = {"flag": False}

    def on_term(signum: int, frame: Any) -> None:
        stopped["flag"] = True
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        return True
    finally:
        signal.signal(signal.SIGTERM, old)
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    return stopped["flag"] or unfinished > 0


def trial_name(trial: Any) -> str:
    """``trial_<n>_<id>``: n counts trials from 1 in creation order (the sampled values are in MLflow)."""
    return f"trial_{int(str(trial.experiment_tag).split('_', 1)[0]):03d}_{trial.trial_id}"


def _init_ray(spec: SearchSpec) -> bool:
    """Join ``search.ray_address`` / ``$RAY_ADDRESS`` (a cluster, ``ray job submit``), else start a local Ray.
    Returns True when this call started (and so must stop) Ray."""
    if ray.is_initialized():
        return False
    address = spec.search.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    return True


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="search-space YAML (search_spaces/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key of the file, e.g. search.num_samples=2 or base.optim.epochs=1")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment in search.storage_path if there is one (else start it)")


def cmd_search(args: argparse.Namespace) -> int:
    """``capt search`` / ``python pipeline/search.py``: 0 done, 1 no trial completed, 130 interrupted."""
    spec = load_search(args.config, list(args.set))
    try:
        summary = run_search(spec, resume=args.resume)
    except KeyboardInterrupt as exc:
        log.warning("%s", exc or "search interrupted; run again with --resume to continue")
        return 130
    if not summary["best"]:
        print(f"search: error: no trial completed ({summary['counts']}); see {summary['path']}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    """Add ``capt search`` to the ``capt`` command line."""
    p = subparsers.add_parser("search", help="hyperparameter search: Ray Tune + Optuna + ASHA, tracked in MLflow")
    add_arguments(p)
    p.set_defaults(func=cmd_search)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="search", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    try:
        return cmd_search(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"search: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"search: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from pipeline import search as _module  # the importable module: Ray pickles its functions by reference

    sys.exit(_module.main())

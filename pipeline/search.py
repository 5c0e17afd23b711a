"""Distributed hyperparameter search: Ray Tune trials, an Optuna (TPE) searcher, ASHA early stopping,
MLflow tracking, then a strong-attack re-evaluation of the best trial(s).

Run: ``python pipeline/search.py --config search_spaces/demo.yaml [--set k=v ...] [--resume]``
(= ``capt search ...``), locally or as ``ray job submit --working-dir . -- python pipeline/search.py ...``.

How trials reach Optuna: every epoch reports ``clean_acc`` / ``robust_acc`` (ASHA's metric) and a
checkpoint; only a trial's final epoch adds ``objective_<name>``, the searcher's metric. A trial that
ASHA stops early therefore ends without it and is told to Optuna as PRUNED (not as COMPLETE with a
partial accuracy); a trial that raises ends as FAIL. ``--resume`` restores the Tune experiment from
``search.storage_path``: Tune restores the searcher, and ``pipeline/search_resume.py`` rebuilds ASHA's
rungs from the recorded results (Tune does not save a scheduler), so a resumed search stops the trials
an uninterrupted one would. The Optuna study and the MLflow runs live in persistent stores and are
reused, keyed by Tune trial id, so nothing runs or logs twice.

Stopping (Ctrl-C, SIGTERM from ``ray job stop`` or Kubernetes) lets Tune stop gracefully, then marks the
parent run and the unfinished trials' runs KILLED and parks their Optuna trials; a driver killed before
it could (``ray job stop`` kills it ``RAY_JOB_STOP_WAIT_TIME_S`` after SIGTERM, 3 s by default: submit
with ``--runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}'``) is repaired by the next
``--resume``. Stores: ``$MLFLOW_TRACKING_URI`` and ``$OPTUNA_STORAGE_URL`` (``pipeline/search_stores.py``).
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
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from ray import tune  # noqa: E402

from pipeline import search_resume, search_stores, tracking  # noqa: E402
from pipeline.config import ConfigError, from_dict  # noqa: E402
from pipeline.search_algo import TUNE_ID_ATTR, CaptOptunaSearch, make_scheduler, make_searcher  # noqa: E402,F401
from pipeline.search_notes import trial_label, trial_note  # noqa: E402
from pipeline.search_space import SearchSpec, load_search  # noqa: E402
from pipeline.search_trial import CTX, trial_main  # noqa: E402

log = logging.getLogger("pipeline.search")


class MlflowStatus(tune.Callback):
    """Driver side: the terminal status of each trial's child run, even when its process died, with its
    state in the run name and description (pruned: FINISHED, ``... · pruned@epoch k``; failed: FAILED)."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, objective: str, epochs: int):
        self.uri, self.experiment_id, self.parent_run_id, self.objective = uri, experiment_id, parent_run_id, objective
        self.epochs = epochs

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark(trial, "COMPLETE" if self.objective in (trial.last_result or {}) else "PRUNED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark(trial, "FAIL")

    def _mark(self, trial: Any, state: str) -> None:
        result = trial.last_result or {}
        tracking.set_trial_status(self.uri, self.experiment_id, self.parent_run_id, trial.trial_id,
                                  tracking.TRIAL_STATUS[state], state, label=trial_label(state, result.get("epoch")),
                                  note=trial_note(state, result, self.epochs))


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
    old_term = _on_sigterm(_interrupt)  # outside tune.fit too (the final re-evaluation): stop, then mark
    try:
        parent_id = report.start_parent(spec, plan)
        trainable = tune.with_resources(trial_main, {"cpu": spec.search.resources.get("cpu", 1),
                                                     "gpu": spec.search.resources.get("gpu", 0)})
        param_space = {CTX: report.trial_context(spec, plan, parent_id)}
        study = _study(spec, storage)
        if resume and restorable:
            log.info("resuming the search from %s", plan.experiment_path)
            search_resume.repair(plan.tracking_uri, plan.experiment_id, parent_id, study)
            tuner = tune.Tuner.restore(plan.experiment_path, trainable, resume_errored=True, param_space=param_space)
            if not isinstance(search_resume.scheduler_of(tuner), search_resume.RecordedScheduler | type(None)):
                log.warning("this experiment predates recorded scheduler state: ASHA restarts with empty rungs")
        else:
            tuner = _new_tuner(spec, plan, storage, trainable, param_space, parent_id)
        if _fit(tuner):
            _mark_interrupted(spec, plan, parent_id, storage)
            raise KeyboardInterrupt(f"search stopped; run again with --resume to continue ({plan.experiment_path})")
        grid = tuner.get_results()
        fixed = search_resume.reconcile(plan.tracking_uri, plan.experiment_id, parent_id, report.trial_rows(grid, spec))
        if fixed:
            log.info("%d trial run(s) left RUNNING by an earlier driver given their final state", fixed)
        try:
            return report.finish(spec, plan, parent_id, storage, grid)
        except (KeyboardInterrupt, SystemExit):  # stopped while re-evaluating (SIGTERM: Ray's SystemExit)
            _mark_interrupted(spec, plan, parent_id, storage)
            raise KeyboardInterrupt(f"search stopped after its trials; --resume re-evaluates and reports "
                                    f"({plan.experiment_path})") from None
    finally:
        _on_sigterm(old_term)
        if started:
            ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _on_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler (main thread only); returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler) if handler is not None else None
    except ValueError:  # not the main thread: leave signals alone
        return None


def _mark_interrupted(spec: SearchSpec, plan: Any, parent_id: str, storage: Any) -> None:
    try:
        search_resume.mark_interrupted(plan.tracking_uri, plan.experiment_id, parent_id, _study(spec, storage))
    except Exception as exc:  # a store down: --resume repairs what could not be marked now
        log.warning("could not mark the interrupted search in MLflow / Optuna (%s); --resume repairs it",
                    (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])


def _study(spec: SearchSpec, storage: Any) -> Any:
    """The search's Optuna study, or None before the first trial was asked."""
    import optuna

    if spec.search.name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=spec.search.name, storage=storage)


def _new_tuner(spec: SearchSpec, plan: Any, storage: Any, trainable: Any, param_space: dict, parent_id: str) -> Any:
    epochs = int(plan.base["optim"].get("epochs", from_dict(plan.base).optim.epochs))
    scheduler = search_resume.RecordedScheduler(make_scheduler(spec, epochs), plan.experiment_path)
    tune_config = tune.TuneConfig(search_alg=make_searcher(spec, storage), scheduler=scheduler,
                                  num_samples=spec.search.num_samples, reuse_actors=False,
                                  trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    run_config = tune.RunConfig(
        name=spec.search.name, storage_path=plan.storage_path,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        callbacks=[MlflowStatus(plan.tracking_uri, plan.experiment_id, parent_id, spec.metrics[0], epochs)],
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
    Returns True when this call started (and so must stop) Ray.

    Trials on other nodes do not inherit the driver's environment: its MLflow credentials
    (``search_stores.FORWARDED_ENV``) go to them in this job's runtime environment."""
    if ray.is_initialized():
        return False
    address = spec.search.ray_address or os.environ.get("RAY_ADDRESS")
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars")
    env = search_stores.forwarded_env(job_env)
    runtime_env = {"env_vars": env} if env else None
    if env:
        log.info("passing %s to the trials (job runtime environment)", ", ".join(sorted(env)))
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
    else:  # "local": a new local Ray even when `ray start` left a cluster running on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=runtime_env)
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
    except Exception as exc:  # a service gone for longer than its retries: one line naming it
        service = _service_of(exc)
        if service is None:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(f"search: error: {service} failed ({first}); once it is back, run again with --resume", file=sys.stderr)
        return 1


def _service_of(exc: BaseException) -> str | None:
    """Which of the search's services an exception comes from (None: not a service failure)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, MlflowException):
        return f"MLflow tracking server {tracking.redact(os.environ.get('MLFLOW_TRACKING_URI', ''))}".rstrip()
    if isinstance(exc, DBAPIError):
        return "the Optuna storage database"
    return None


if __name__ == "__main__":
    from pipeline import search as _module  # the importable module: Ray pickles its functions by reference

    sys.exit(_module.main())

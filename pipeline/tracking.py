"""MLflow adapter: with the champion model (``champion.py``, ``champion_model.py``), the only modules of the
project that import mlflow.

One parent run per search, one nested child run per Tune trial (tag ``mlflow.parentRunId`` and
``trial_id``). Every call goes through an explicit ``MlflowClient(tracking_uri)``, never the fluent
global state: trials run in other processes and get the URI and run ids through their config.

Store: ``sqlite:///<out>/mlflow.db`` by default (the plain file store raises since MLflow 3.13),
with artifacts in ``<out>/mlartifacts``; on a cluster an ``http://`` tracking server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline.config import ConfigError
from pipeline.runs import redact

log = logging.getLogger(__name__)
TRIAL_TAG = "trial_id"
PARENT_TAG = "mlflow.parentRunId"
SEARCH_KEY_TAG = "capt.search_key"
ROLE_TAG = "capt.role"
CHAMPION = "champion"
FINAL_TAG = "final_epoch"
NOTE_TAG = "mlflow.note.content"  # the run's / experiment's markdown description in the MLflow UI
BEST_TAG = "capt.best_trial_run_id"
COMMAND_TAG = "capt.command"
GIT_TAG = "mlflow.source.git.commit"
# MLflow status of a trial's run per search state: a pruned trial ended as planned (ASHA stopped it), so
# FINISHED with its run name saying "pruned@epoch k"; only a crash is FAILED; KILLED is an interrupted search.
TRIAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}
STEP_METRIC = "clean_acc"  # logged every epoch: its steps tell which epochs a run already has


def resolve_uri(configured: str | None, out_dir: str | Path) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<out>/mlflow.db`` (absolute)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in uri or uri.startswith("file:"):
        raise ConfigError(f"tracking.uri: {uri!r}: the MLflow file store is not supported (MLflow >= 3.13); "
                          "use sqlite:///path/mlflow.db or http://server:5000")
    return uri


def ui_command(uri: str) -> str:
    """The command that browses this store (credentials redacted)."""
    return f"mlflow ui --backend-store-uri {redact(uri)}"


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs (or of one run) in the model-training view.

    A server URI is its own UI; a SQLite store is browsed with :func:`ui_command` on its default port."""
    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


def source_tags() -> dict[str, str]:
    """What produced a run: the command line (redacted) and, in a git checkout, its commit."""
    argv = [str(redact(a)) for a in sys.argv] or ["python"]
    argv[0] = Path(argv[0]).name if Path(argv[0]).is_absolute() else argv[0]
    argv = ["python", *argv] if argv[0].endswith(".py") else argv
    tags = {COMMAND_TAG: " ".join(shlex.quote(a) for a in argv)[:5000], "mlflow.source.name": argv[argv[0] == "python"]
            if len(argv) > 1 else argv[0]}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                                capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if len(commit) == 40:
        tags[GIT_TAG] = commit
    return tags


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def probe(uri: str, timeout_s: int = 5) -> None:
    """Fail fast with a one-line ConfigError when the tracking store cannot be reached.

    Also creates / migrates a new SQLite store here, in the driver, before trials write to it.
    """
    with _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # connection refused, DNS, auth, bad database URL ...
            text = str(exc)
            code = next((c for c in ("401", "403") if f"error code {c}" in text or f"status code {c}" in text), None)
            if code:
                who = f"user {os.environ['MLFLOW_TRACKING_USERNAME']!r}" if os.environ.get("MLFLOW_TRACKING_USERNAME") \
                    else "no credentials"
                raise ConfigError(f"MLflow tracking server {redact(uri)} refused the request (HTTP {code}, {who}); "
                                  "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD to a user of that "
                                  "server") from None
            first = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"MLflow tracking store {redact(uri)} is unreachable ({first}); start it or set "
                              "tracking.uri / MLFLOW_TRACKING_URI") from None


def retry(fn: Callable[..., Any], *args: Any, tries: int = 6, **kwargs: Any) -> Any:
    """Call ``fn``; retry SQLite 'database is locked' errors (concurrent trials share one file)."""
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if "locked" not in str(exc).lower() or attempt == tries - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
    return None


def ensure_experiment(uri: str, name: str, artifact_root: str | Path | None) -> str:
    """The experiment id of ``name``, created (artifacts under ``artifact_root`` for local stores)."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if artifact_root is not None and not uri.startswith(("http://", "https://", "databricks")):
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root).resolve().as_uri()
    try:  # the kind makes the UI open the experiment on its runs (model training), not on traces
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def start_parent(uri: str, experiment_id: str, *, search_key: str, run_name: str, tags: dict[str, str],
                 params: dict[str, Any], config: dict[str, Any]) -> tuple[str, bool]:
    """The parent run of a search: reused when one with ``search_key`` exists (resume), else created."""
    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_KEY_TAG}` = '{search_key}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {**source_tags(), **tags, SEARCH_KEY_TAG: search_key, ROLE_TAG: "search"}
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
    client.log_text(run_id, yaml.safe_dump(redact(config), sort_keys=False), "search_config.yaml")
    return run_id, False


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def set_run_status(uri: str, run_id: str, status: str, tags: dict[str, Any] | None = None) -> None:
    """Set a run's status (RUNNING / FINISHED / KILLED / FAILED) and tags, e.g. to repair a stopped search."""
    client = MlflowClient(tracking_uri=uri)
    if tags:
        retry(client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if status == "RUNNING":
        retry(client.update_run, run_id, status=status)
    else:
        retry(client.set_terminated, run_id, status=status)


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    """Log the finite numeric values of ``metrics`` in one batch."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _finite(v)]
    if items:
        retry(MlflowClient(tracking_uri=uri).log_batch, run_id, metrics=items)


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    retry(MlflowClient(tracking_uri=uri).log_batch, run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    retry(MlflowClient(tracking_uri=uri).log_artifact, run_id, str(path), artifact_path)


def log_dict(uri: str, run_id: str, doc: dict[str, Any], artifact_file: str) -> None:
    retry(MlflowClient(tracking_uri=uri).log_text, run_id, yaml.safe_dump(redact(doc), sort_keys=False),
          artifact_file)


def find_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The child run of ``trial_id`` under ``parent_run_id``, if one exists."""
    runs = retry(MlflowClient(tracking_uri=uri).search_runs, [experiment_id],
                 filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.{TRIAL_TAG} = '{trial_id}'",
                 max_results=1)
    return runs[0].info.run_id if runs else None


def trial_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """All child runs of a search (mlflow Run objects)."""
    return MlflowClient(tracking_uri=uri).search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000)


def set_trial_status(uri: str, experiment_id: str, parent_run_id: str, trial_id: str, status: str,
                     state: str | None = None, note: str | None = None, label: str | None = None) -> None:
    """Terminal status of a trial's child run (FINISHED / KILLED / FAILED), its search state tag, its
    description, and ``label`` appended to its run name (e.g. ``pruned@epoch 1``)."""
    run_id = find_trial_run(uri, experiment_id, parent_run_id, trial_id)
    if run_id is None:
        return
    client = MlflowClient(tracking_uri=uri)
    tags = {**({"trial_state": state} if state is not None else {}), **({NOTE_TAG: note} if note else {})}
    if tags:
        retry(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if label:
        name = client.get_run(run_id).info.run_name or trial_id
        retry(client.update_run, run_id, name=f"{name.split(' · ')[0]} · {label}")
    retry(client.set_terminated, run_id, status=status)


def set_note(uri: str, run_id: str, text: str, tags: dict[str, str] | None = None) -> None:
    """A run's markdown description (MLflow's note), with more tags."""
    items = [RunTag(NOTE_TAG, text[:60000]), *[RunTag(k, str(v)) for k, v in (tags or {}).items()]]
    retry(MlflowClient(tracking_uri=uri).log_batch, run_id, tags=items)


def set_experiment_note(uri: str, experiment_id: str, text: str) -> None:
    retry(MlflowClient(tracking_uri=uri).set_experiment_tag, experiment_id, NOTE_TAG, text[:60000])


class TrialRun:
    """A trial's child run, as used from inside a Tune trainable (any process)."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, *,
                 run_name: str, tags: dict[str, str]):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        existing = find_trial_run(uri, experiment_id, parent_run_id, trial_id)
        self.logged_steps: set[int] = set()
        if existing is not None:  # a retried or resumed trial keeps its run
            self.run_id = existing
            retry(self.client.update_run, existing, status="RUNNING")
            self.resumed = True
            self.logged_steps = {m.step for m in self.client.get_metric_history(existing, STEP_METRIC)}
        else:
            all_tags = {**tags, PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, ROLE_TAG: "trial"}
            self.run_id = retry(self.client.create_run, experiment_id, tags=all_tags, run_name=run_name).info.run_id
            self.resumed = False

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        fresh = {k: v for k, v in params.items() if k not in existing}
        if fresh:
            log_params(self.uri, self.run_id, fresh)

    def log_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        """Per-epoch metrics at ``step=epoch``, once: an epoch re-run after a resume is not logged twice."""
        if epoch in self.logged_steps:
            return
        log_metrics(self.uri, self.run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        self.logged_steps.add(epoch)

    def mark_final(self, epoch: int) -> None:
        """Record that the final epoch and its prompts are logged (see :meth:`recorded_final`)."""
        self.set_tags({FINAL_TAG: epoch})

    def recorded_final(self, dst: str | Path) -> tuple[dict[str, float], Path] | None:
        """(last metrics, prompts file) when an earlier attempt of this trial already finished it
        (a driver killed before Tune saved that), else None."""
        if not self.resumed:
            return None
        run = self.client.get_run(self.run_id)
        if FINAL_TAG not in run.data.tags:
            return None
        path = self.client.download_artifacts(self.run_id, "prompts.pt", str(dst))
        return dict(run.data.metrics), Path(path)

    def log_config(self, config: dict[str, Any]) -> None:
        log_dict(self.uri, self.run_id, config, "config.yaml")

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        log_artifact(self.uri, self.run_id, path, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        retry(self.client.set_terminated, self.run_id, status=status)


def champion_version(uri: str, name: str) -> str:
    """The version number that ``name@champion`` resolves to."""
    return str(MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, CHAMPION).version)


def download(uri: str, artifact_uri: str, dst: str | Path) -> Path:
    """Download an artifact (``runs:/...`` or ``models:/name@champion``) into ``dst``."""
    import mlflow.artifacts

    with _env(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri):  # models:/ URIs resolve through the globals
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                        tracking_uri=uri, registry_uri=uri))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _param_value(v: Any) -> str:
    return str(redact(v))[:6000]

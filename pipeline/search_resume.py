"""What a resumed search needs beyond Tune's own restore: the early-stopping state and truthful stores.

**The scheduler.** Tune does not save a scheduler: its controller drops it from the experiment
checkpoint, and ``Tuner.restore`` brings back the ASHA pickled in ``tuner.pkl`` as it was first built,
with empty rungs. A resumed ASHA would then judge the next results against nothing and let trials go
on (or stop them) where the uninterrupted search would not. :class:`RecordedScheduler` wraps the
search's scheduler and appends every event that changes its state (trial added, result with the
decision taken, trial completed / removed / errored) to ``<experiment>/scheduler_events.jsonl`` on the
experiment's storage, in the order the driver saw them. After a restore it replays that log into the
fresh scheduler before the first new event, so the rungs hold what they held, and a result that is
reported again (a trial restarted from an older checkpoint) gets the decision it got the first time.
The log is appended before Tune's own experiment snapshot, so it is never older than the snapshot.

**The stores.** A stopped driver (Ctrl-C, SIGTERM from ``ray job stop`` or Kubernetes) marks what it
leaves behind (:func:`mark_interrupted`); a driver killed before it could (SIGKILL, a lost head node)
leaves runs RUNNING, and the next ``--resume`` repairs them (:func:`repair`) before Tune restarts
anything; :func:`reconcile` settles every child run against Tune's final trial states at the end.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import TrialScheduler

from pipeline import tracking

log = logging.getLogger("pipeline.search")
EVENTS_FILE = "scheduler_events.jsonl"
INTERRUPTED_ATTR = "capt_interrupted"  # Optuna user attr on trials parked as WAITING by a stop


class _Replayed:
    """The part of a Tune trial a scheduler reads while replaying (its id)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class RecordedScheduler(TrialScheduler):
    """A Tune scheduler that records its events on the experiment storage and replays them after a
    restore, so that a resumed search makes the decisions an uninterrupted one would."""

    def __init__(self, inner: TrialScheduler, experiment_path: str):
        super().__init__()
        self.inner, self.experiment_path = inner, str(experiment_path)
        self._reset()

    def _reset(self) -> None:
        self._loaded = False
        self._seq = 0
        self._known: set[str] = set()  # trials added (and not removed)
        self._done: set[str] = set()  # trials completed, removed
        self._decisions: dict[tuple[str, float], str] = {}

    def __getstate__(self) -> dict[str, Any]:  # tuner.pkl holds the scheduler as built, never its history
        return {"inner": self.inner, "experiment_path": self.experiment_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        TrialScheduler.__init__(self)
        self.inner, self.experiment_path = state["inner"], state["experiment_path"]
        self._reset()

    # ------------------------------------------------------------------ what Tune calls
    @property
    def metric(self) -> str | None:
        return self.inner.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self.inner.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        if trial.trial_id in self._known or trial.trial_id in self._done:  # re-added by a restore
            return
        self.inner.on_trial_add(tune_controller, trial)
        self._known.add(trial.trial_id)
        self._append({"event": "add", "trial_id": trial.trial_id, **self._bracket(trial.trial_id)})

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        key = (trial.trial_id, self._time(result))
        if key in self._decisions:  # reported again after a restore: the same answer as the first time
            return self._decisions[key]
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        self._decisions[key] = decision
        self._append({"event": "result", "trial_id": trial.trial_id, "result": self._subset(result),
                      "decision": decision})
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load()
        if trial.trial_id in self._done:
            return
        self.inner.on_trial_complete(tune_controller, trial, result)
        self._done.add(trial.trial_id)
        self._append({"event": "complete", "trial_id": trial.trial_id, "result": self._subset(result or {})})

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        if trial.trial_id in self._done:
            return
        self.inner.on_trial_remove(tune_controller, trial)
        self._done.add(trial.trial_id)
        self._append({"event": "remove", "trial_id": trial.trial_id})

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        self.inner.on_trial_error(tune_controller, trial)
        self._append({"event": "error", "trial_id": trial.trial_id})

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        return self.inner.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return self.inner.debug_string()

    # ------------------------------------------------------------------ the log
    @property
    def events_path(self) -> str:
        return f"{self.experiment_path.rstrip('/')}/{EVENTS_FILE}"

    def events(self) -> list[dict[str, Any]]:
        """The recorded events, oldest first (empty when there is no log yet)."""
        text = _read(self.events_path)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _load(self) -> None:
        """Replay the log into the (fresh) inner scheduler once, before the first new event."""
        if self._loaded:
            return
        self._loaded = True
        events = self.events()
        for ev in events:
            self._replay(ev)
        self._seq = len(events)
        if events:
            log.info("scheduler state rebuilt from %d recorded event(s) of %d trial(s) (%s)", len(events),
                     len(self._known | self._done), self.events_path)

    def _replay(self, ev: dict[str, Any]) -> None:
        trial, kind = _Replayed(ev["trial_id"]), ev["event"]
        if kind == "add":
            self.inner.on_trial_add(None, trial)
            self._known.add(trial.trial_id)
            if "bracket" in ev and hasattr(self.inner, "_brackets"):  # the bracket drawn the first time
                self.inner._trial_info[trial.trial_id] = self.inner._brackets[ev["bracket"]]
        elif kind == "result":
            decision = self.inner.on_trial_result(None, trial, ev["result"])
            if decision != ev["decision"]:
                log.warning("scheduler replay: trial %s at %s gave %s, recorded %s", trial.trial_id,
                            ev["result"], decision, ev["decision"])
            self._decisions[(trial.trial_id, self._time(ev["result"]))] = ev["decision"]
        elif kind == "complete":
            self.inner.on_trial_complete(None, trial, ev["result"])
            self._done.add(trial.trial_id)
        elif kind == "remove":
            self.inner.on_trial_remove(None, trial)
            self._done.add(trial.trial_id)
        elif kind == "error":
            self.inner.on_trial_error(None, trial)

    def _append(self, ev: dict[str, Any]) -> None:
        self._seq += 1
        _append(self.events_path, json.dumps({"seq": self._seq, "time": round(time.time(), 3), **ev}) + "\n")

    def _time(self, result: dict) -> float:
        return float(result.get(getattr(self.inner, "_time_attr", "training_iteration"),
                                result.get("training_iteration", 0)))

    def _subset(self, result: dict) -> dict[str, Any]:
        keys = {getattr(self.inner, "_time_attr", "training_iteration"), "training_iteration", self.inner.metric}
        return {k: result[k] for k in keys if k and k in result and isinstance(result[k], int | float)}

    def _bracket(self, trial_id: str) -> dict[str, int]:
        info, brackets = getattr(self.inner, "_trial_info", None), getattr(self.inner, "_brackets", None)
        if info is None or brackets is None or trial_id not in info:
            return {}
        return {"bracket": next(i for i, b in enumerate(brackets) if b is info[trial_id])}


def _read(path: str) -> str:
    if "://" not in path:
        p = Path(path)
        return p.read_text() if p.is_file() else ""
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
        return ""
    with fs.open_input_stream(inner) as f:
        return f.readall().decode()


def _append(path: str, line: str) -> None:
    """Append one line (local or mounted shared storage: a real append; object stores: rewrite)."""
    if "://" not in path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as f:
            f.write(line)
            f.flush()
        return
    import pyarrow.fs

    old = _read(path)
    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_output_stream(inner) as f:
        f.write((old + line).encode())


def scheduler_of(tuner: Any) -> Any:
    """The scheduler a (restored) Tuner will use (None when it cannot be found)."""
    local = getattr(tuner, "_local_tuner", None)
    config = getattr(local, "_tune_config", None)
    return getattr(config, "scheduler", None)


# ----------------------------------------------------------------------------- truthful stores

def mark_interrupted(uri: str, experiment_id: str, parent_id: str, study: optuna.Study | None) -> None:
    """A stopped search: parent and unfinished child runs KILLED (tag ``trial_state=INTERRUPTED``),
    unfinished Optuna trials parked as WAITING (Optuna's "not running"); ``--resume`` takes them up."""
    n = _kill_running_children(uri, experiment_id, parent_id)
    tracking.set_run_status(uri, parent_id, "KILLED", {"capt.search_state": "interrupted"})
    parked = 0
    if study is not None:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.WAITING)
            parked += 1
    log.warning("search interrupted: MLflow parent run and %d unfinished trial run(s) marked KILLED, %d Optuna "
                "trial(s) parked as WAITING; --resume continues them", n, parked)


def repair(uri: str, experiment_id: str, parent_id: str, study: optuna.Study | None) -> None:
    """Before a resume: what a stop left (or a killed driver could not mark) made consistent again.
    Child runs still RUNNING are marked KILLED (a trial that restarts sets its run RUNNING again);
    Optuna trials parked by :func:`mark_interrupted` become RUNNING again for the trials Tune restarts."""
    n = _kill_running_children(uri, experiment_id, parent_id)
    revived = 0
    if study is not None:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            if t.user_attrs.get(INTERRUPTED_ATTR):
                study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING)
                revived += 1
    if n or revived:
        log.info("resume: %d stale RUNNING trial run(s) marked KILLED, %d parked Optuna trial(s) running again",
                 n, revived)


def reconcile(uri: str, experiment_id: str, parent_id: str, rows: list[dict[str, Any]]) -> int:
    """After the trials: every child run still RUNNING gets the status of its trial's final state
    (a run of a trial id Tune no longer knows, from a driver killed before saving it, is KILLED)."""
    from pipeline.search_notes import trial_label

    final = {r["trial_id"]: r for r in rows}
    fixed = 0
    for run in tracking.trial_runs(uri, experiment_id, parent_id):
        if run.info.status != "RUNNING":
            continue
        row = final.get(run.data.tags.get(tracking.TRIAL_TAG), {})
        state = row.get("state", "INTERRUPTED")
        tracking.set_trial_status(uri, experiment_id, parent_id, run.data.tags.get(tracking.TRIAL_TAG),
                                  tracking.TRIAL_STATUS.get(state, "KILLED"), state,
                                  label=trial_label(state, row.get("epochs")))
        fixed += 1
    return fixed


def _kill_running_children(uri: str, experiment_id: str, parent_id: str) -> int:
    n = 0
    for run in tracking.trial_runs(uri, experiment_id, parent_id):
        if run.info.status == "RUNNING":
            tracking.set_run_status(uri, run.info.run_id, "KILLED", {"trial_state": "INTERRUPTED"})
            n += 1
    return n

"""The cluster path end to end (slow): scripts/local_stack.py brings up PostgreSQL, an MLflow server with
basic auth, a Ray head with no CPUs and two worker nodes; one small search is submitted with `ray job
submit` and goes through faults, one at a time: a worker node killed mid-trial, PostgreSQL restarted, the
MLflow server down for 20 s, `ray job stop`, the driver killed (each stop followed by `--resume`). At
the end: one MLflow child run per Tune trial under one parent, one Optuna trial per Tune trial, none
left RUNNING, the summary intact, and ASHA's decisions those of an uninterrupted replay.

Each fault's time to recover is printed and written to <stack>/faults.json (run with -s to see it).
Skips, with the reason, where no PostgreSQL server can be started (scripts/local_stack.py says how).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.data.sources import shards_from_digits
from pipeline.search_algo import TUNE_ID_ATTR, make_scheduler
from pipeline.search_resume import EVENTS_FILE, RecordedScheduler
from pipeline.search_space import load_search

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NAME = "faults"
TRIALS, EPOCHS = 10, 4  # long enough for five faults in turn on an idle 2-core machine
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
pytestmark = pytest.mark.slow


def st_parent(pid: int) -> int:
    return _load_stack_module().parent_of(pid)


@functools.lru_cache(maxsize=1)
def _load_stack_module():
    spec = importlib.util.spec_from_file_location("local_stack", ROOT / "scripts" / "local_stack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stack():
    mod = _load_stack_module()
    folder = tempfile.mkdtemp(prefix="cs", dir="/tmp")  # short: PostgreSQL's and Ray's socket paths
    st = mod.Stack(folder, base_port=int(os.environ.get("CAPT_FAULT_BASE_PORT", "21100")), workers=2)
    try:
        st.up()
    except mod.StackUnavailable as exc:  # this machine cannot run it: say why
        st.down()
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"local stack unavailable: {exc}")
    except mod.StackError:  # it should have started: a failure, with the logs kept
        st.down()
        raise
    shards_from_digits(st.shared / "digits", progress=False)
    yield st
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(k, None)
    st.down()
    shutil.rmtree(folder, ignore_errors=True)


def _sets(st) -> list[str]:
    sets = {"search.name": NAME, "search.storage_path": f"{st.shared}/ray_results", "search.out": f"{st.shared}/out",
            "base.data.path": f"{st.shared}/digits", "search.num_samples": TRIALS, "search.max_failures": 2,
            "base.optim.epochs": EPOCHS, "base.data.shots": 4, "tracking.register_model": "null"}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def _ray(st, sub: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "ray"), "job", sub, "--address", st.job_address, *args], cwd=ROOT,
                       env=st.client_env(), capture_output=True, text=True, timeout=timeout)
    r.stdout, r.stderr = _ANSI.sub("", r.stdout), _ANSI.sub("", r.stderr)
    return r


def _submit(st, sid: str) -> None:
    r = _ray(st, "submit", "--no-wait", "--submission-id", sid, "--working-dir", ".", "--", "python",
             "pipeline/search.py", "--config", "search_spaces/smoke.yaml", *_sets(st), "--resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _status(st, sid: str) -> str:
    r = _ray(st, "status", sid)
    out = r.stdout + r.stderr
    for pattern, state in ((f"Job '{sid}' succeeded", "SUCCEEDED"), (f"Job '{sid}' was stopped", "STOPPED"),
                           (f"Job '{sid}' failed", "FAILED")):
        if pattern in out:
            return state
    m = re.search(rf"Status for job '{sid}': (\w+)", out)
    return m[1] if m else "UNKNOWN"


def _wait_job(st, sid: str, states: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _status(st, sid)
        if s in states:
            return s
        time.sleep(3)
    logs = _ray(st, "logs", sid).stdout[-3000:]
    raise AssertionError(f"job {sid} not in {states} after {timeout:.0f} s:\n{logs}")


def _events(st) -> list[dict]:
    path = st.shared / "ray_results" / NAME / EVENTS_FILE
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _results(st) -> list[dict]:
    return [e for e in _events(st) if e["event"] == "result"]


def _wait_results(st, after: int, timeout: float = 600, sid: str | None = None) -> float:
    """Seconds until the driver records a result beyond the first ``after`` ones."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(_results(st)) > after:
            return time.monotonic() - t0
        if sid and _status(st, sid) in ("FAILED", "SUCCEEDED", "STOPPED"):
            break
        time.sleep(1)
    logs = _ray(st, "logs", sid).stdout[-3000:] if sid else ""
    raise AssertionError(f"no new trial result within {timeout:.0f} s after result #{after}\n{logs}")


def _driver_pids(st) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"python") and b"pipeline/search.py" in cmd and \
                    f"search.out={st.shared}/out".encode() in cmd:
                pids.append(int(proc.name))
    return pids


def _stores(st):
    env = st.secrets()
    os.environ["MLFLOW_TRACKING_USERNAME"] = env["MLFLOW_TRACKING_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = env["MLFLOW_TRACKING_PASSWORD"]
    client = MlflowClient(st.mlflow_url)
    exp = client.get_experiment_by_name(NAME)
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'search'")
    study = optuna.load_study(study_name=NAME, storage=env["OPTUNA_STORAGE_URL"]) \
        if NAME in optuna.get_all_study_names(env["OPTUNA_STORAGE_URL"]) else None
    return client, exp.experiment_id, parents, study


def test_wrong_mlflow_credential_is_refused_with_one_line(stack, tmp_path):
    env = {**stack.head_env(), "MLFLOW_TRACKING_PASSWORD": "wrong", "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "pipeline/search.py", "--config", "search_spaces/smoke.yaml",
                        "--set", f"search.out={tmp_path}", "--set", f"base.data.path={stack.shared}/digits"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("search: error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert stack.mlflow_url in lines[0] and "401" in lines[0] and "wrong" not in lines[0]


def test_search_survives_faults_one_at_a_time(stack):
    times: dict[str, float] = {}
    t_start = time.monotonic()
    _submit(stack, "faults-1")
    _wait_results(stack, 0, timeout=300, sid="faults-1")

    # 1. a worker node killed in the middle of a trial: the trial resumes from its checkpoint elsewhere
    node, trial_id, last = _wait_for(lambda: _node_in_mid_trial(stack), "faults-1")
    n_events = len(_events(stack))
    t0 = time.monotonic()
    stack.stop(node, hard=True)
    time.sleep(3)
    stack.start(node)
    _wait_for(lambda: [e for e in _events(stack)[n_events:] if e["event"] == "error" and e["trial_id"] == trial_id],
              "faults-1")
    n = len(_results(stack))
    _wait_for(lambda: [e for e in _results(stack)[n:] if e["trial_id"] == trial_id], "faults-1")
    times["worker node killed (to the trial's next epoch)"] = time.monotonic() - t0
    epochs = [e["result"]["epoch"] for e in _results(stack) if e["trial_id"] == trial_id]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > last, (trial_id, last, epochs)  # from its checkpoint

    # 2. PostgreSQL restarted mid-search: the next write to the Optuna study goes through
    study_state = _optuna_state(stack)
    stack.stop("postgres")
    time.sleep(5)
    stack.start("postgres")
    t0 = time.monotonic()
    _wait_for(lambda: _optuna_state(stack) != study_state, "faults-1")
    times["PostgreSQL restarted (5 s down; to the next Optuna write)"] = time.monotonic() - t0 + 5

    # 3. the MLflow server down for 20 s: the trials' logging waits and goes through
    stack.stop("mlflow")
    t_down = time.time()
    time.sleep(20)
    stack.start("mlflow")
    t0 = time.monotonic()
    _wait_for(lambda: _last_metric_ms(stack) > t_down * 1000, "faults-1")
    times["MLflow down 20 s (to the next logged metric)"] = time.monotonic() - t0 + 20
    assert _status(stack, "faults-1") in ("RUNNING", "SUCCEEDED"), _ray(stack, "logs", "faults-1").stdout[-3000:]

    # 4. `ray job stop`: the driver gets RAY_JOB_STOP_WAIT_TIME_S to stop Tune and mark the stores
    if _status(stack, "faults-1") == "RUNNING":
        t0 = time.monotonic()
        _ray(stack, "stop", "faults-1", timeout=200)
        assert _wait_job(stack, "faults-1", ("STOPPED", "SUCCEEDED"), 120) == "STOPPED"
        times["ray job stop (graceful)"] = time.monotonic() - t0
        client, exp_id, parents, study = _stores(stack)
        assert [p.info.status for p in parents] == ["KILLED"], "the driver did not finish its stop path"
        children = tracking.trial_runs(stack.mlflow_url, exp_id, parents[0].info.run_id)
        assert children and not [r for r in children if r.info.status == "RUNNING"]
        assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))

        # 5. resumed, then the driver killed outright (no stop path): the next --resume repairs and completes
        n = len(_results(stack))
        t0 = time.monotonic()
        _submit(stack, "faults-2")
        times["resume after stop (to next result)"] = _wait_results(stack, n, sid="faults-2")
        pids = _driver_pids(stack)
        assert pids, "the driver process was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _wait_job(stack, "faults-2", ("FAILED", "STOPPED", "SUCCEEDED"), 120)
        t0 = time.monotonic()
        _submit(stack, "faults-3")
        final = _wait_job(stack, "faults-3", ("SUCCEEDED", "FAILED"), 600)
        times["resume after driver killed (to the end)"] = time.monotonic() - t0
        assert final == "SUCCEEDED", _ray(stack, "logs", "faults-3").stdout[-4000:]
    else:
        pytest.fail("the search ended before the driver faults: make its trials longer")
    times["whole search with faults"] = time.monotonic() - t_start
    _check_final(stack)
    report = {k: round(v, 1) for k, v in times.items()}
    (stack.dir / "faults.json").write_text(json.dumps(report, indent=1))
    print("\ntime to recover per fault (s):", json.dumps(report, indent=1))


def _wait_for(fn, sid: str, timeout: float = 600):
    """fn()'s first truthy value, polling; fails when the job ends or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {fn}")


def _optuna_state(st) -> tuple:
    env = st.secrets()
    try:
        trials = optuna.load_study(study_name=NAME, storage=env["OPTUNA_STORAGE_URL"]).get_trials(deepcopy=False)
    except Exception:  # down, or restarting
        return ()
    return tuple((t.number, t.state.name) for t in trials)


def _last_metric_ms(st) -> int:
    try:
        client, exp_id, parents, _ = _stores(st)
        runs = client.search_runs([exp_id], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'trial'")
        return max((m.timestamp for r in runs for m in client.get_metric_history(r.info.run_id, "clean_acc")),
                   default=0)
    except Exception:  # down, or starting
        return 0


def _node_in_mid_trial(st) -> tuple[str, str, int] | None:
    """(worker node, trial id, its last epoch) for a trial process that has reported and not finished."""
    running = _running_trials(st)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith((b"ray::trial_main", b"ray::ImplicitFunc")):
                continue
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        tid = next((t for t in running if t in cwd), None)
        pid = int(proc.name)
        for _ in range(6):  # up to the node's `ray start` process
            pid = st_parent(pid)
            node = next((n for n, p in st.pids.items() if p == pid and n.startswith("worker-")), None)
            if node and tid:
                return node, tid, running[tid]
    return None


def _running_trials(st) -> dict[str, int]:
    """Trials with results and not yet complete: trial id -> last reported epoch."""
    last, done = {}, set()
    for e in _events(st):
        if e["event"] == "result":
            last[e["trial_id"]] = e["result"]["epoch"]
            if e["decision"] == "STOP":
                done.add(e["trial_id"])
        elif e["event"] in ("complete", "remove"):
            done.add(e["trial_id"])
    return {t: ep for t, ep in last.items() if t not in done}


def _check_final(st) -> None:
    client, exp_id, parents, study = _stores(st)
    summary = json.loads((st.shared / "out" / "summary.json").read_text())
    tune_ids = {t["trial_id"] for t in summary["trials"]}
    assert len(tune_ids) == TRIALS and summary["best"] and summary["counts"]["COMPLETE"] >= 1
    assert [p.info.status for p in parents] == ["FINISHED"]  # one parent, finished
    children = tracking.trial_runs(st.mlflow_url, exp_id, parents[0].info.run_id)
    by_trial = {}
    for run in children:
        by_trial.setdefault(run.data.tags[tracking.TRIAL_TAG], []).append(run)
    assert set(by_trial) == tune_ids and all(len(v) == 1 for v in by_trial.values()), sorted(by_trial)
    assert not [r for r in children if r.info.status == "RUNNING"]
    for run in children:  # nothing logged twice, nothing lost: epochs 1..k once each
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "robust_acc")]
        assert steps == list(range(1, len(steps) + 1)), (run.data.tags[tracking.TRIAL_TAG], steps)
    trials = study.get_trials()
    assert len(trials) == TRIALS and all(t.state.is_finished() for t in trials), [(t.number, t.state) for t in trials]
    assert {t.user_attrs[TUNE_ID_ATTR] for t in trials} == tune_ids  # one Optuna trial per Tune trial
    # ASHA across three drivers decided as one uninterrupted ASHA replaying the same results
    spec = load_search(ROOT / "search_spaces" / "smoke.yaml", [x for x in _sets(st) if x != "--set"])
    fresh = make_scheduler(spec, EPOCHS)
    replay = RecordedScheduler(fresh, str(st.dir / "replay"))
    logged = _events(st)
    for e in logged:
        trial = type("T", (), {"trial_id": e["trial_id"]})()
        if e["event"] == "add":
            replay.on_trial_add(None, trial)
        elif e["event"] == "result":
            assert replay.on_trial_result(None, trial, e["result"]) == e["decision"], e
        elif e["event"] == "complete":
            replay.on_trial_complete(None, trial, e["result"])

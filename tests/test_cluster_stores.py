"""The search's store handling on the cluster path, without a cluster: where URLs and credentials come from,
a refused MLflow credential, a lost database connection, and a stopped search left truthful then repaired."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc

from pipeline import search_resume, search_stores, tracking
from pipeline.config import ConfigError


def test_optuna_url_from_setting_then_environment_then_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE_URL", raising=False)
    assert search_stores.optuna_url(None, tmp_path) == f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE_URL", "postgresql+psycopg://u:pw@db:5432/optuna")
    assert search_stores.optuna_url(None, tmp_path) == "postgresql+psycopg://u:pw@db:5432/optuna"
    assert search_stores.optuna_url("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="unexpanded shell variable.*OPTUNA_STORAGE_URL"):
        search_stores.optuna_url("${OPTUNA_STORAGE_URL}", tmp_path)  # what Ray hands over from single quotes


def test_psycopg2_uri_is_refused_naming_the_installed_driver():
    pytest.importorskip("psycopg")
    try:
        import psycopg2  # noqa: F401
        pytest.skip("psycopg2 is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"psycopg2 driver.*postgresql\+psycopg://") as err:
        search_stores.optuna_storage("postgresql+psycopg2://u:secret@127.0.0.1:1/optuna")
    assert "secret" not in str(err.value)


def test_forwarded_env_takes_mlflow_credentials_but_not_what_the_job_sets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "u")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p")
    monkeypatch.setenv("OPTUNA_STORAGE_URL", "postgresql+psycopg://u:p@h/db")  # the driver's only
    env = search_stores.forwarded_env({"MLFLOW_TRACKING_USERNAME": "job"})
    assert env == {"MLFLOW_TRACKING_PASSWORD": "p"}


def test_storage_calls_retry_a_lost_connection_then_fail_with_one_line(monkeypatch):
    calls = []

    def flaky(self, n):
        calls.append(n)
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
        return n

    class Fake:
        url = "postgresql+psycopg://u:secret@db:5432/optuna"

    monkeypatch.setattr(search_stores.time, "sleep", lambda s: None)
    assert search_stores._retrying(flaky)(Fake(), 7) == 7 and len(calls) == 3
    monkeypatch.setenv("OPTUNA_STORAGE_RETRY_S", "0")
    calls.clear()
    with pytest.raises(RuntimeError, match=r"Optuna storage postgresql\+psycopg://u:\*\*\*@db:5432/optuna is "
                                           r"unreachable .*--resume") as err:
        search_stores._retrying(flaky)(Fake(), 7)
    assert "secret" not in str(err.value)
    with pytest.raises(ValueError):  # not a connection problem: no retry
        search_stores._retrying(lambda self: (_ for _ in ()).throw(ValueError("bad")))(Fake())
    assert "create_new_trial" in vars(search_stores.RetryingRDBStorage)


class _Refuse(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(401)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"You are not authenticated.")

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_refused_mlflow_credential_is_one_line_naming_the_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-secret")
    try:
        with pytest.raises(ConfigError) as err:
            tracking.probe(uri)
    finally:
        server.shutdown()
    msg = str(err.value)
    assert "\n" not in msg and uri in msg and "HTTP 401" in msg and "'someone'" in msg
    assert "wrong-secret" not in msg and "MLFLOW_TRACKING_PASSWORD" in msg


def _stores(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.probe(uri)
    exp = tracking.ensure_experiment(uri, "s", tmp_path / "art")
    parent, _ = tracking.start_parent(uri, exp, search_key="k", run_name="s", tags={}, params={}, config={})
    runs = {tid: tracking.TrialRun(uri, exp, parent, tid, run_name=tid, tags={}) for tid in ("a", "b", "c")}
    runs["a"].finish("FINISHED")
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    done, running = study.ask(), study.ask()
    study.tell(done, 1.0)
    return uri, exp, parent, runs, study, running


def test_a_stop_leaves_the_stores_truthful_and_resume_repairs(tmp_path):
    uri, exp, parent, runs, study, running = _stores(tmp_path)
    search_resume.mark_interrupted(uri, exp, parent, study)
    status = {r.data.tags["trial_id"]: r.info.status for r in tracking.trial_runs(uri, exp, parent)}
    assert status == {"a": "FINISHED", "b": "KILLED", "c": "KILLED"}
    assert tracking.MlflowClient(uri).get_run(parent).info.status == "KILLED"
    parked = study.trials[running.number]
    assert parked.state == optuna.trial.TrialState.WAITING and parked.user_attrs[search_resume.INTERRUPTED_ATTR]

    # a killed driver could not mark anything: a run left RUNNING; the next --resume repairs first
    tracking.set_run_status(uri, runs["b"].run_id, "RUNNING")
    search_resume.repair(uri, exp, parent, study)
    assert tracking.MlflowClient(uri).get_run(runs["b"].run_id).info.status == "KILLED"
    assert study.trials[running.number].state == optuna.trial.TrialState.RUNNING  # Tune continues it
    study.tell(running.number, 0.5)  # ... and can tell it at the end

    # the end of the search: what is still RUNNING gets its trial's final state
    tracking.set_run_status(uri, runs["c"].run_id, "RUNNING")
    fixed = search_resume.reconcile(uri, exp, parent, [{"trial_id": "c", "state": "PRUNED"}])
    run = tracking.MlflowClient(uri).get_run(runs["c"].run_id)
    assert fixed == 1 and run.info.status == "FINISHED" and run.data.tags["trial_state"] == "PRUNED"
    assert run.info.run_name == "c · pruned"  # stopped by ASHA: a normal end, named so (a crash is FAILED)


def test_a_service_gone_for_good_ends_the_driver_with_one_line(monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from pipeline import search

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")

    def down(args):
        raise MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed: "
                              "Max retries exceeded\nlong details")

    monkeypatch.setattr(search, "cmd_search", down)
    assert search.main(["--config", "search_spaces/smoke.yaml"]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("search: error: MLflow tracking server http://mlflow:5000 failed")
    assert "--resume" in err[0]

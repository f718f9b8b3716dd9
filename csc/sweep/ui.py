"""The MLflow UI of the sweeps: a local tracking server on 127.0.0.1, and headless Chromium to look at it.

Server and browser run in sessions of their own, so stopping them signals only the processes started
here. Nothing needs the internet. mlflow is only run as a subprocess, never imported here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from csc.errors import CscError

# Any sort other than by start time makes the runs table list child runs as rows of their own; the
# default nests them under their parent run, collapsed (MLflow 3.17).
FLAT_QUERY = "?orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
    "--hide-scrollbars", "--no-proxy-server",  # the page is on 127.0.0.1: a proxy could only get in the way
)


def default_tracking() -> tuple[str, str]:
    """The default store of the working directory: (sqlite:///<abs>/mlflow.db, <abs>/mlartifacts)."""
    return f"sqlite:///{Path('mlflow.db').resolve()}", str(Path("mlartifacts").resolve())


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def check_store(uri: str) -> None:
    """Refuse a SQLite store that does not exist: mlflow would create an empty one and serve an empty UI."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise CscError(f"no MLflow store at {path}: run `csc ui` where `csc sweep` ran (it writes mlflow.db in its "
                       f"working directory), or give --uri sqlite:///PATH/mlflow.db")


SHARED_VIEW_TAG = "mlflow.sharedViewState."
"""MLflow 3's shared views of the runs table: an experiment tag per view, opened by the page's viewStateShareKey."""


def sweep_view(sweep: str) -> str:
    """The name of a sweep's view of its experiment's runs table (csc.sweep.tracking.mlflow writes it)."""
    return f"csc-{sweep}"


def runs_page_url(server_url: str, experiment_id: str, flat: bool = False, view: str | None = None) -> str:
    """The runs table of an experiment. flat=True lists child runs as rows instead of under their parent;
    `view`: a shared view of the table (sweep_view of a sweep: its trials, outcomes and figures)."""
    page = f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return page + (f"?viewStateShareKey={view}" if view else FLAT_QUERY if flat else "")


def free_port(port: int = 0) -> int:
    """port if it is free on 127.0.0.1 (0: any free port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            # Checked first, or /health would be answered by whatever already listens there.
            raise CscError(f"port {port} on 127.0.0.1 is in use ({e.strerror}): choose another one") from None
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies waiting for a reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 counts zombies too, which is good enough there
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class MlflowServer:
    """`mlflow server` on 127.0.0.1 for a tracking store, as a context manager (`.url` answers inside it)."""

    def __init__(self, backend_store_uri: str, artifact_root: str | None = None, port: int | None = None,
                 start_timeout: float = 120.0, grace: float = 10.0, app_name: str | None = None,
                 env: dict[str, str] | None = None):
        """`app_name`: mlflow server's --app-name (e.g. "basic-auth"); `env`: added to the server's environment
        (e.g. MLFLOW_AUTH_CONFIG_PATH)."""
        self.backend_store_uri, self.artifact_root = backend_store_uri, artifact_root
        self.app_name, self.extra_env = app_name, env or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout, self.grace = start_timeout, grace
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        free_port(self.port)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
               "--host", "127.0.0.1", "--port", str(self.port),
               # uvicorn's default of 4 workers costs ~1.3 GB and ~13 s to start on 2 cores; 1 worker
               # (a single process, no supervisor) ~0.5 GB with the CLI parent and ~5 s.
               "--workers", "1"]
        if self.artifact_root:
            cmd += ["--default-artifact-root", self.artifact_root]
        if self.app_name:
            cmd += ["--app-name", self.app_name]
        env = {**os.environ, **self.extra_env,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else 3.x starts a job runner beside the UI
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
        fd, log = tempfile.mkstemp(prefix="csc-mlflow-server-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "wb") as out:  # the child keeps its own copy of the descriptor
            # A session of its own: the server's workers form one process group that stop() can end
            # whole, and Ctrl+C in the terminal reaches only us (stop() then ends the server).
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        atexit.register(self.stop)  # a session of its own outlives us unless stopped, even on errors
        try:
            self._wait_healthy()
        except BaseException:
            self.stop(keep_log=True)
            raise

    def _wait_healthy(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise CscError(f"mlflow server exited with code {self.proc.returncode} before answering "
                               f"(log {self.log_path}):\n{_tail(self.log_path)}")
            try:
                with opener.open(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CscError(f"mlflow server did not answer on {self.url}/health within {self.start_timeout:.0f} s "
                               f"(log {self.log_path}):\n{_tail(self.log_path)}")
            time.sleep(0.25)

    def wait(self) -> int:
        """Block until the server exits (for `csc ui`); its exit code."""
        return self.proc.wait()

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after the grace period."""
        if self.proc is None:
            return
        atexit.unregister(self.stop)
        pgid = self.proc.pid  # the leader of the session started above; never anything else's
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is None or _group_alive(pgid):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            # Reap the leader as it exits: an unreaped zombie would keep the group "alive".
            while (self.proc.poll() is None or _group_alive(pgid)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.proc.poll() is not None and not _group_alive(pgid):
                break
        if not keep_log and self.log_path:
            self.log_path.unlink(missing_ok=True)


def chromium() -> str:
    exe = shutil.which("chromium")
    if not exe:
        raise CscError("rendering MLflow pages needs headless Chromium: install the Debian package `chromium` "
                       "(apt-get install chromium)")
    return exe


def _run_chromium(args: list[str], wait_ms: int) -> str:
    if wait_ms < 1:  # a budget of 0 makes Chromium 156 hang instead of dumping at once
        raise ValueError(f"wait_ms must be at least 1, got {wait_ms}")
    exe = chromium()
    with tempfile.TemporaryDirectory(prefix="csc-chromium-", ignore_cleanup_errors=True) as profile:
        # A fresh profile each time: no state (runs table layout, cached app) leaks between renders.
        # --virtual-time-budget: Chromium stops the page's clock while requests are pending, so the React
        # app gets its ajax answers and wait_ms of timers to render, usually in a few seconds of wall time.
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}", *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=wait_ms / 1000 + 90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet, so the group is still ours
            out, err = proc.communicate()
            raise CscError(f"headless Chromium did not finish: {' '.join(cmd)}\n{err[-3000:]}") from None
    if proc.returncode != 0:
        raise CscError(f"headless Chromium failed with code {proc.returncode}: {' '.join(cmd)}\n{err[-3000:]}")
    return out


def render_page(url: str, wait_ms: int = 15000, size: tuple[int, int] = (1600, 900)) -> str:
    """The DOM of a page after headless Chromium ran its scripts for wait_ms of (virtual) time, in a window of
    `size` (a table draws only the columns that fit)."""
    return _run_chromium([f"--window-size={size[0]},{size[1]}", "--dump-dom", url], wait_ms)


def screenshot(url: str, path_png: str | Path, wait_ms: int = 15000, size: tuple[int, int] = (1600, 900)) -> Path:
    """A PNG of a page, for humans (e.g. to check what the runs table shows)."""
    path = Path(path_png).resolve()
    _run_chromium([f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url], wait_ms)
    if not path.is_file():
        raise CscError(f"headless Chromium wrote no screenshot to {path}")
    return path

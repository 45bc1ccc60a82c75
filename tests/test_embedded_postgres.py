"""The embedded PostgreSQL: started on first use, shared by the processes of a folder, stopped after the last."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg2
import pytest

from sqapi.connectors.db import _embedded
from sqapi.connectors.db.postgres import Database

#: a process that uses the server of the folder given as argv[1], says "up", then waits for stdin to close
USER = textwrap.dedent("""
    import sys
    from sqapi.connectors.db.postgres import Database

    database = Database({"type": "postgres", "embedded": {"directory": sys.argv[1]}})
    database.execute_query("SELECT 1 AS one")
    print("up", flush=True)
    sys.stdin.read()
""")


def start_user(folder: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", USER, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "up"
    return process


def server_pid(folder: Path) -> int | None:
    """The postmaster of ``folder``'s cluster, if one runs."""
    try:
        pid = int((folder / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if str(folder / "data").encode() in cmdline else None


def wait_for(predicate: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_the_first_user_starts_the_server_the_last_one_to_exit_stops_it(tmp_path: Path) -> None:
    folder = tmp_path / "pg"
    first = start_user(folder)
    pid = server_pid(folder)
    assert pid is not None and (folder / "data" / "PG_VERSION").exists()
    second = start_user(folder)
    assert server_pid(folder) == pid  # joined the running server, did not start another
    first.communicate(timeout=30)
    assert first.returncode == 0
    time.sleep(1)
    assert server_pid(folder) == pid  # another process still uses it
    second.communicate(timeout=30)
    assert server_pid(folder) is None  # the last one to exit stopped it before exiting
    assert not (folder / "keeper.pid").exists()


def test_a_killed_user_does_not_keep_the_server_running(tmp_path: Path) -> None:
    folder = tmp_path / "pg"
    user = start_user(folder)
    assert server_pid(folder) is not None
    user.send_signal(signal.SIGKILL)
    user.wait(10)
    assert wait_for(lambda: server_pid(folder) is None), "the keeper did not stop the unused server"


def test_the_server_listens_on_a_unix_socket_only_and_keeps_its_data(tmp_path: Path) -> None:
    folder = tmp_path / "pg"
    user = start_user(folder)
    connection = _embedded.Layout(folder).connection()
    assert connection["host"].startswith("/")  # a socket folder, no TCP address
    with psycopg2.connect(**connection) as conn, conn.cursor() as cursor:
        cursor.execute("SHOW listen_addresses")
        assert cursor.fetchone() == ("",)
        cursor.execute("CREATE TABLE kept (x INTEGER); INSERT INTO kept VALUES (42)")
    user.communicate(timeout=30)
    user = start_user(folder)  # a warm start of the same cluster
    with psycopg2.connect(**_embedded.Layout(folder).connection()) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT x FROM kept")
        assert cursor.fetchall() == [(42,)]
    user.communicate(timeout=30)


def test_a_folder_too_deep_for_a_socket_path_gets_a_short_socket_folder(tmp_path: Path) -> None:
    folder = tmp_path / ("deep" * 20)
    layout = _embedded.Layout(folder)
    assert len(str(layout.socket_dir / ".s.PGSQL.5432")) <= 107
    assert not str(layout.socket_dir).startswith(str(folder))
    user = start_user(folder)
    try:
        assert (layout.socket_dir / ".s.PGSQL.5432").exists()
    finally:
        user.communicate(timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root user needs a user namespace")
def test_as_root_the_server_runs_in_a_user_namespace_and_its_files_stay_roots(tmp_path: Path) -> None:
    folder = tmp_path / "pg"
    user = start_user(folder)
    try:
        assert (folder / "data").stat().st_uid == 0
        pid = server_pid(folder)
        assert pid is not None
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == [str(_embedded._NAMESPACE_ID), "0", "1"]
    finally:
        user.communicate(timeout=30)


def test_status_commands_on_a_folder_never_set_up_create_nothing(tmp_path: Path) -> None:
    database = Database({"type": "postgres", "embedded": {"directory": str(tmp_path / "pg")}})
    assert database.has_status_tables() is False
    assert not (tmp_path / "pg").exists()


def test_a_socket_folder_someone_else_made_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / ("deep" * 20)  # long enough for the socket to go to a folder in /tmp
    layout = _embedded.Layout(folder)
    layout.socket_dir.mkdir(mode=0o777)
    layout.socket_dir.chmod(0o777)  # as another user could have made it, open to all
    try:
        database = Database({"type": "postgres", "embedded": {"directory": str(folder)},
                             "connect_retry": {"attempts": 1}})
        from sqapi.errors import ConnectorError

        with pytest.raises(ConnectorError, match="is not a private folder of this user"):
            database.ping()
        database.close()
    finally:
        layout.socket_dir.rmdir()


def test_only_its_own_user_may_use_the_socket(tmp_path: Path) -> None:
    folder = tmp_path / "pg"
    user = start_user(folder)
    try:
        socket = _embedded.Layout(folder).socket_dir / ".s.PGSQL.5432"
        assert socket.stat().st_mode & 0o777 == 0o700
        assert (folder.stat().st_mode & 0o077) == 0
    finally:
        user.communicate(timeout=30)


def test_a_server_that_died_is_started_again_by_the_next_connection(tmp_path: Path) -> None:
    from sqapi.errors import ConnectorError

    folder = tmp_path / "pg"
    database = Database({"type": "postgres", "embedded": {"directory": str(folder)}})
    try:
        database.execute_query("CREATE TABLE survivors (x INTEGER)")
        database.execute_query("INSERT INTO survivors VALUES (1)")
        first = server_pid(folder)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: not (folder / "keeper.pid").exists()), "the keeper did not notice"
        answers = []
        for _ in range(20):  # the pool's connections to the dead server fail one by one, then a new one starts
            try:
                answers = database.execute_query("SELECT x FROM survivors")
                break
            except ConnectorError:
                time.sleep(0.1)
        assert answers == [{"x": 1}]
        assert server_pid(folder) not in (None, first)
    finally:
        database.close()

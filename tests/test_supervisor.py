"""The supervisor behind ``sqapi loader --processes N``, with small stand-in loader processes.

(tests/rabbitmq/test_faults.py runs it with real loaders against RabbitMQ and PostgreSQL.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqapi import supervisor
from sqapi.supervisor import Supervisor

#: a stand-in loader process: notes its start, exits 0 on SIGTERM, else sleeps (or exits with $EXIT_WITH)
CHILD = """
import os, signal, sys, time
with open(sys.argv[1], "a") as log:
    log.write(f"{os.environ['SQAPI_LOADER_PROCESS']} {os.getpid()}\\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if os.environ.get("EXIT_WITH"):
    sys.exit(int(os.environ["EXIT_WITH"]))
time.sleep(120)
"""


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def starts(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(number, int(pid)) for number, pid in (line.split() for line in log.read_text().splitlines())]


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def in_background(run) -> tuple[threading.Thread, list[int]]:  # type: ignore[no-untyped-def]
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run()), daemon=True)
    thread.start()
    return thread, result


def test_it_starts_n_numbered_processes_restarts_a_killed_one_and_passes_sigterm_on(tmp_path: Path) -> None:
    log = tmp_path / "starts.log"
    boss = Supervisor(2, [sys.executable, "-c", CHILD, str(log)])
    thread, result = in_background(boss.run)
    wait_for(lambda: len(starts(log)) == 2)
    assert sorted(number for number, _pid in starts(log)) == ["1", "2"]
    killed = starts(log)[0]
    os.kill(killed[1], signal.SIGKILL)
    wait_for(lambda: len(starts(log)) == 3)
    assert starts(log)[2][0] == killed[0]  # the same slot, a new process
    pids = [pid for _number, pid in starts(log)[1:]]
    boss.stop(signal.SIGTERM)             # what the SIGTERM handler does
    thread.join(20)
    assert result == [0]
    for pid in pids:                      # every loader process is gone (and reaped)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigterm_to_the_supervisor_stops_everything_with_status_zero(tmp_path: Path) -> None:
    log = tmp_path / "starts.log"
    boss = Supervisor(2, [sys.executable, "-c", CHILD, str(log)])
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    wait_started = time.monotonic()
    assert boss.run() == 0               # the handler runs in this (the main) thread
    assert len(starts(log)) == 2 and time.monotonic() - wait_started < 20


def test_processes_that_keep_dying_at_start_make_it_give_up_with_their_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "MAX_QUICK_EXITS", 3)
    monkeypatch.setenv("EXIT_WITH", "3")
    log = tmp_path / "starts.log"
    boss = Supervisor(1, [sys.executable, "-c", CHILD, str(log)])
    assert boss.run() == 3
    assert len(starts(log)) == 3          # started, restarted after 1 s, after 2 s, then gave up


def test_a_loader_process_stops_when_its_supervisor_is_gone(tmp_path: Path) -> None:
    """The parent watch: the middle process (a supervisor) is killed; its child notices and stops."""
    marker = tmp_path / "stopped"
    child = (f"import os, sys, time\nfrom sqapi import supervisor\n"
             f"supervisor.watch_parent(lambda: open({str(marker)!r}, 'w').close(), interval=0.1)\n"
             f"time.sleep(30)\n")
    parent = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(0.5)\n"
    import subprocess

    subprocess.run([sys.executable, "-c", parent], check=True, timeout=30)  # exits: the child is orphaned
    wait_for(marker.exists, timeout=10)


def test_a_stop_that_comes_while_processes_are_being_started_stops_them_all(tmp_path: Path) -> None:
    """stop() signals only processes already started: one started just after must be signalled too."""
    log = tmp_path / "starts.log"

    class StoppedEarly(Supervisor):
        def _start(self, slot):  # type: ignore[no-untyped-def]
            super()._start(slot)
            if slot.number == 1:
                self.stop()  # the SIGTERM handler runs here, before slot 2 is started

    boss = StoppedEarly(3, [sys.executable, "-c", CHILD, str(log)])
    thread, result = in_background(boss.run)
    thread.join(20)
    assert not thread.is_alive(), "the supervisor waits for a process nobody told to stop"
    assert result == [0]
    for _number, pid in starts(log):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_loader_process_whose_supervisor_died_before_it_started_watching_stops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's pid comes from the environment: getppid() may already name a subreaper."""
    stopped = threading.Event()
    monkeypatch.setenv(supervisor.PARENT_ENV, str(os.getppid() + 1_000_000))  # not our parent: it is gone
    supervisor.watch_parent(stopped.set, interval=0.05)
    assert stopped.wait(5)


# -- how many: processing.processes ----------------------------------------------------------------------------
SHARED = {"msg_broker": {"type": "rabbitmq"}, "database": {"type": "postgres"}}


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (3, 3), (16, supervisor.AUTO_MAX)])
def test_auto_runs_one_process_per_cpu_up_to_the_cap_on_rabbitmq_with_postgres(
        monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int) -> None:
    monkeypatch.setattr(supervisor, "usable_cpus", lambda: cpus)
    assert supervisor.loader_processes(SHARED) == expected
    assert supervisor.loader_processes({**SHARED, "processing": {"processes": "auto"}}) == expected


@pytest.mark.parametrize("config", [
    {"msg_broker": {"type": "rabbitmq"}, "database": {"type": "sqlite"}},      # one writer at a time
    {"msg_broker": {"type": "directory"}, "database": {"type": "postgres"}},   # the spool folder
    {"msg_broker": {"type": "mine.listener:Listener"}, "database": {"type": "postgres"}},
    {},
])
def test_auto_runs_one_process_where_processes_would_not_share_the_work(
        monkeypatch: pytest.MonkeyPatch, config: dict[str, object]) -> None:
    monkeypatch.setattr(supervisor, "usable_cpus", lambda: 8)
    assert supervisor.loader_processes(config) == 1


def test_a_number_of_processes_is_taken_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "usable_cpus", lambda: 8)
    assert supervisor.loader_processes({**SHARED, "processing": {"processes": 1}}) == 1
    assert supervisor.loader_processes({"processing": {"processes": 6}}) == 6


def test_usable_cpus_follows_the_affinity_mask_as_taskset_sets_it() -> None:
    import shutil
    import subprocess

    assert supervisor.usable_cpus() == len(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    assert taskset, "taskset (util-linux) is needed for this test: apt-get install util-linux"
    pinned = subprocess.run([taskset, "-c", "0", sys.executable, "-c",
                             "from sqapi.supervisor import usable_cpus; print(usable_cpus())"],
                            check=True, capture_output=True, text=True).stdout
    assert pinned.strip() == "1"

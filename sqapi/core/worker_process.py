"""The loader's end of one plugin worker process: starting it, stopping it, killing it, reaping it.

A worker is a fresh interpreter (``python -m sqapi.core.worker FD``, see :mod:`sqapi.core.worker`
for its side of the socket), never a fork of the loader with its threads and connections.  It
runs in a session of its own, so a kill reaches the programs the plugin started too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from sqapi import logs
from sqapi.core.plugins import Plugin
from sqapi.core.worker import WorkerSpec
from sqapi.errors import PluginFailed

log = logging.getLogger(__name__)

#: seconds a new worker may take to import its plugin and answer
WORKER_START_TIMEOUT = 120.0
#: seconds a stopping worker gets to close its database before it is killed
WORKER_STOP_TIMEOUT = 5.0


class WorkerProcess:
    """A worker process and the loader's end of its socket."""

    def __init__(self, process: subprocess.Popen[bytes], conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        return self.process.pid


def start_worker(plugin: Plugin) -> WorkerProcess:
    """A fresh interpreter for ``plugin``, its plugin loaded (and set up); :class:`PluginFailed` when it cannot."""
    ours, theirs = socket.socketpair()
    try:
        # a session of its own: a kill reaches the programs the plugin started too (see kill)
        process = subprocess.Popen([sys.executable, "-m", "sqapi.core.worker", str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                                   cwd=os.getcwd(), env=dict(os.environ), start_new_session=True)
    except OSError as exc:
        ours.close()
        raise PluginFailed(f"its worker process could not start: {exc.strerror or exc}", retryable=True) from None
    finally:
        theirs.close()
    parent = Connection(ours.detach())
    worker = WorkerProcess(process, parent)
    try:
        parent.send(spec_of(plugin))
        if not parent.poll(WORKER_START_TIMEOUT):
            raise PluginFailed(f"its worker process did not start within {WORKER_START_TIMEOUT:g}s",
                               retryable=True)
        answer = parent.recv()
    except (EOFError, OSError):
        wait(process)
        kill(worker)
        raise PluginFailed(f"its worker process {ended(process)} while loading the plugin", retryable=True) \
            from None
    except BaseException:
        kill(worker)
        raise
    if answer[0] != "ready":
        kill(worker)
        raise PluginFailed(f"its worker process could not load the plugin: {answer[1]}", retryable=True)
    log.debug("plugin %s: worker process %s started", plugin.name, process.pid)
    return worker


def stop_worker(worker: WorkerProcess) -> None:
    """Ask the worker to stop after its call (it tears down and closes its database), then make sure it ended."""
    try:
        worker.conn.send(("stop",))
    except (OSError, ValueError):
        pass
    wait(worker.process)
    kill(worker)


def reap(process: subprocess.Popen[bytes]) -> int | None:
    """Reap a worker whose socket closed (killed first if it has not ended within WORKER_STOP_TIMEOUT); the most
    memory it held (bytes), when the system says."""
    if process.returncode is not None:
        return None
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return int(usage.ru_maxrss) * 1024
            if time.monotonic() > deadline:
                process.kill()
                deadline = float("inf")
            time.sleep(0.005)
    except ChildProcessError:  # reaped already
        wait(process)
        return None


def wait(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(WORKER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


def kill(worker: WorkerProcess) -> None:
    """SIGKILL the worker and everything it started (its process group), then reap it."""
    try:
        os.killpg(worker.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if worker.process.poll() is None:
        worker.process.kill()
    wait(worker.process)
    worker.conn.close()


def ended(process: subprocess.Popen[bytes]) -> str:
    """How a worker process ended, in words ("crashed (killed by SIGSEGV)", "exited with status 1", ...)."""
    code = process.poll()
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"crashed (killed by {name})"
    return f"exited with status {code}"


def spec_of(plugin: Plugin) -> WorkerSpec:
    """What a worker needs to load ``plugin`` as the loader did."""
    level, json_logs, secrets = logs.current_settings()
    return WorkerSpec(
        name=plugin.name,
        directory=str(plugin.directory) if plugin.directory is not None and plugin.entry_point is None else None,
        entry_point=plugin.entry_point,
        config=plugin.config,
        database=None if plugin.database_section is None else {
            **plugin.database_section, **({"synchronous_commit": "off"} if plugin.async_commit else {})},
        max_memory=plugin.max_memory,
        sys_path=list(sys.path),
        log_level=level,
        json_logs=json_logs,
        secrets=secrets,
    )

"""A RabbitMQ node of our own, for runs that stop, restart or kill their broker.

bench/faults.py and the fault tests (tests/rabbitmq) start their nodes with it, so that the machine's
shared node (rabbit@localhost on 5672), which other runs use at the same time, is never stopped.  A
node has its own name, AMQP and distribution ports, data and log folders, a config listening on
127.0.0.1 only, an empty plugins file (no management port) and an Erlang cookie of its own (a
``HOME`` under its root folder), so it cannot even talk to the machine's node.  It is run by the
package's scripts themselves (/usr/sbin's wrappers would switch to user rabbitmq, which may not
write to our folders).

Imported as ``rabbit_node`` by the scripts in bench/ (their folder is on sys.path) and as
``bench.rabbit_node`` by the tests; it needs nothing but the standard library.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shlex
import signal
import string
import subprocess
import time
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # the scripts themselves: /usr/sbin's wrappers switch to user rabbitmq
LOCAL = "127.0.0.1"
TOOLS = ("rabbitmq-server", "rabbitmqctl")


def run_tool(command: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120,
             check: bool = True) -> int:
    """Run a service tool with its output appended to ``log`` (never a pipe: a daemon it starts may keep it)."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                              timeout=timeout, start_new_session=True).returncode
    if check and code != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... exited with {code}; see {log}")
    return code


def pid_gone(pid: int, timeout: float) -> bool:
    """Whether the process has exited (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def missing_tools() -> list[Path]:
    """The RabbitMQ scripts a node needs that are not installed (install the rabbitmq-server package)."""
    return [RABBIT_BIN / tool for tool in TOOLS if not (RABBIT_BIN / tool).exists()]


class RabbitNode:
    """One RabbitMQ node of ours, ``<name>@localhost``, with its files in ``root / name``.

    Nodes made with the same ``root`` share its Erlang cookie and plugins file, so they can be
    clustered; ``rabbitmqctl`` run through :meth:`ctl` talks to this node only.
    """

    def __init__(self, root: Path, name: str, port: int, dist_port: int) -> None:
        self.name = f"{name}@localhost"
        self.port = port
        self.dist_port = dist_port
        self.folder = root / name
        self.home = root / "erlang-home"     # HOME: our own cookie, shared by our nodes and our rabbitmqctl
        self.plugins_file = root / "rabbit-enabled-plugins"
        self.log = self.folder / "tools.log"
        self.pid: int | None = None
        self.running = False
        self.closed = False
        self.log_offsets: dict[Path, int] = {}  # where each log file ended when the node was last started

    def prepare(self) -> None:
        """Write the node's folders, config and env file (and the root's cookie and plugins file, once)."""
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(24)))
            cookie.chmod(0o400)
        if not self.plugins_file.exists():
            self.plugins_file.write_text("[].\n")  # no management plugin, so no port of its own
        for sub in ("mnesia", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = {LOCAL}:{self.port}\n"
                                                  "loopback_users = none\n")
        # our own env file, so that /etc/rabbitmq/rabbitmq-env.conf (the shared node's name) is not read
        (self.folder / "rabbitmq-env.conf").write_text("# bench/rabbit_node.py: everything is in the environment\n")

    def own_env(self) -> dict[str, str]:
        """The variables that make the package's scripts run (or talk to) this node and no other."""
        return {
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": LOCAL,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_file),
            "RABBITMQ_PID_FILE": str(self.folder / "pid"),
            "ERL_EPMD_ADDRESS": LOCAL,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_CRASH_DUMP": str(self.folder / "erl_crash.dump"),  # never in the working directory
        }

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.own_env()}

    def start_command(self) -> str:
        """The shell command :meth:`start` runs (after :meth:`prepare`), to quote when it fails."""
        assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.own_env().items())
        return f"{assignments} {RABBIT_BIN / 'rabbitmq-server'} -detached"

    def ctl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> ARGS``; a RuntimeError with its output when it fails and ``check``."""
        done = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", self.name, *args], capture_output=True,
                              text=True, env=self.env(), timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")
        return done

    def start(self) -> None:
        """Start the node and return once it has booted (``rabbitmqctl await_startup``); RuntimeError if it
        does not, or if its Erlang VM exits while starting (a port taken, a bad config)."""
        if self.closed:
            raise RuntimeError(f"RabbitMQ node {self.name} is being stopped for good")
        (self.folder / "pid").unlink(missing_ok=True)
        (self.folder / "erl_crash.dump").unlink(missing_ok=True)
        self.log_offsets = {path: path.stat().st_size for path in (self.folder / "log").glob("*.log")}
        run_tool([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], self.log, env=self.env())
        self.running = True
        deadline = time.monotonic() + 180
        # await_startup fails at once until the node has registered with epmd, hence the loop
        while self.ctl("await_startup", "--timeout", "60", timeout=90, check=False).returncode != 0:
            if not self.processes():
                self.running = False
                raise RuntimeError(f"RabbitMQ node {self.name} exited while starting:\n  "
                                   + "\n  ".join(self.complaints()) + f"\n(its files: {self.folder})")
            if time.monotonic() > deadline or self.closed:
                raise RuntimeError(f"RabbitMQ node {self.name} did not start; see {self.folder / 'log'}")
            time.sleep(0.5)
        self.pid = int((self.folder / "pid").read_text().strip())
        if self.closed:  # stopped for good while it was starting (Ctrl-C during a restart): no orphan
            self.kill()

    def complaints(self, most: int = 8) -> list[str]:
        """Why the node stopped since it was last started, as its files say: the Erlang crash dump's
        slogan (a distribution port taken, say) and the log's first errors (an AMQP port taken)."""
        found = []
        dump = self.folder / "erl_crash.dump"
        if dump.exists():
            with open(dump, errors="replace") as lines:
                found += [line.strip()[:400] for line in itertools.islice(lines, 5) if line.startswith("Slogan:")]
        for path in sorted((self.folder / "log").glob("*.log")):
            with open(path, errors="replace") as lines:
                lines.seek(self.log_offsets.get(path, 0))
                found += [line.rstrip()[:400] for line in lines
                          if ("[error]" in line or "[critical]" in line) and not line.rstrip().endswith(">")]
        return found[:most]

    def processes(self) -> list[int]:
        """Every process of this node: its Erlang VM and any rabbitmqctl talking to it (their environment says).

        Never epmd, even one our node started: the machine's own RabbitMQ node registers with it too."""
        mark = f"RABBITMQ_NODENAME={self.name}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0") \
                            and (entry / "comm").read_text().strip() != "epmd":
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (a crash) -- and anything else of this node's."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.processes():
            pid_gone(pid, 30)
        self.running = False

    def stop(self) -> None:
        """Stop it for good (cleanup): no restart after this, however far one had gone."""
        self.closed = True
        if self.processes():
            self.ctl("stop", timeout=90, check=False)
            deadline = time.monotonic() + 30
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        self.kill()

"""``msg_broker: {type: directory, directory: .sqapi/spool}`` -- a spool folder of JSON message files.

Publishers drop one JSON message per ``*.json`` file into the folder (write it under another
name first, e.g. ``.x.json.tmp``, then rename: half-written files are never read).  Layout::

    spool/*.json                  waiting
    spool/.processing/<owner>/    claimed by a running loader (atomic rename), lock held
    spool/retry/<n>~<name>        waiting for attempt n; its mtime is when it is due
    spool/done/<name>             processed (DONE, or already done)
    spool/failed/<name>           dead-lettered, with <name>.reason beside it

Several loaders may share a spool: a rename claims a file for exactly one of them.  A loader
holds an ``flock`` on its ``.processing/<owner>/.lock``; at start, every claimed folder whose
lock is free belonged to a process that died, and its files go back to the spool.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from sqapi.connectors.listeners import ProcessMessage
from sqapi.core.message import MAX_BODY_BYTES
from sqapi.core.outcome import Action, Delivery
from sqapi.errors import ConfigError, ConnectorError

log = logging.getLogger(__name__)

PROCESSING, RETRY, DONE, FAILED = ".processing", "retry", "done", "failed"
RETRY_SEPARATOR = "~"
STARTING_GRACE = 60.0  # seconds a starting loader's staging folder is left alone
HANDBACK_DELAY = 5.0  # seconds before a file whose handling raised is tried again


def validate_config(config: dict[str, Any]) -> None:
    """``directory`` a folder path, ``poll_interval`` a positive number, ``workers`` a positive whole number."""
    directory = config.get("directory")
    if directory is not None and not isinstance(directory, str):
        raise ConfigError("msg_broker.directory", f"must be a folder path, not {directory!r}",
                          "set msg_broker.directory to the spool folder (quote it if it looks like a number)")
    if "poll_interval" in config:
        interval = config["poll_interval"]
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigError("msg_broker.poll_interval", f"must be a positive number of seconds, not {interval!r}",
                              "set msg_broker.poll_interval, e.g. 0.5")
    if "handback_delay" in config:
        delay = config["handback_delay"]
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ConfigError("msg_broker.handback_delay", f"must be a number of seconds, not {delay!r}",
                              "set msg_broker.handback_delay, e.g. 5")
    if config.get("workers") is not None:
        workers = config["workers"]
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError("msg_broker.workers", f"must be a positive whole number, not {workers!r}",
                              "set msg_broker.workers, e.g. 4")


class Listener:
    def __init__(self, config: dict[str, Any], process_message: ProcessMessage, workers: int | None = None) \
            -> None:
        self.config = config
        self.process_message = process_message
        self.root = Path(str(config.get("directory") or ".sqapi/spool"))
        self.poll_interval = float(config.get("poll_interval", 0.5))
        self.workers = int(workers or config.get("workers") or 4)
        self.handback_delay = float(config.get("handback_delay", HANDBACK_DELAY))
        self.max_body_bytes = int(config.get("max_body_bytes") or MAX_BODY_BYTES)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self.consuming = False  # True while start_listeners scans the spool (sqapi loader's liveness)
        self._wake = threading.Event()
        self._lock_handle: IO[str] | None = None
        self.claim_dir = self.root / PROCESSING / self.owner

    # -- lifecycle ----------------------------------------------------------------------------
    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConnectorError(f"spool folder '{self.root}' cannot be created: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise ConnectorError(f"spool folder '{self.root}' is not writable")

    def prepare(self) -> None:
        """Create the layout, take this loader's claim folder and recover files of dead loaders."""
        self.ping()
        for name in (PROCESSING, RETRY, DONE, FAILED):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        # the claim folder becomes visible only with its lock already held, so that another loader's
        # recovery never mistakes a starting loader for a dead one
        staging = self.root / PROCESSING / f".new-{self.owner}"
        staging.mkdir(parents=True, exist_ok=True)
        self._lock_handle = open(staging / ".lock", "w")  # noqa: SIM115 -- held for the loader's life
        fcntl.flock(self._lock_handle, fcntl.LOCK_EX)
        os.rename(staging, self.claim_dir)
        self.recover_orphans()

    def stop(self) -> None:
        """Stop claiming; in-flight messages finish, claimed-but-unstarted ones go back to the spool."""
        self._stop.set()
        self._wake.set()

    def start_listeners(self, until_idle: bool = False) -> None:
        """Consume until :meth:`stop` (or, with ``until_idle``, until nothing is waiting or due)."""
        self.prepare()
        log.info("listening on spool %s with %d workers", self.root, self.workers)
        pending: dict[concurrent.futures.Future[None], Path] = {}
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="sqapi-spool") as pool:
            self.consuming = True
            try:
                while not self._stop.is_set():
                    pending = {f: p for f, p in pending.items() if not f.done()}
                    room = self.workers * 2 - len(pending)
                    try:
                        claimed = self.claim(room) if room > 0 else []
                    except OSError as exc:  # e.g. the spool's file system went away for a moment
                        log.error("cannot scan spool %s: %s", self.root, exc)
                        claimed = []
                    for path in claimed:
                        future = pool.submit(self._handle, path)
                        future.add_done_callback(lambda _f: self._wake.set())
                        pending[future] = path
                    if not claimed:
                        if until_idle and not pending and not self._has_retry_waiting():
                            break
                        self._wake.wait(self.poll_interval)
                        self._wake.clear()
            finally:
                self.consuming = False
                for future, path in pending.items():
                    if future.cancel():
                        self._move(path, self.root / path.name)
        self._release()

    # -- claiming -----------------------------------------------------------------------------
    def claim(self, limit: int) -> list[Path]:
        """Atomically move up to ``limit`` waiting or due files into this loader's claim folder."""
        claimed: list[Path] = []
        now = time.time()
        candidates = [p for p in self._waiting()] + [p for p in self._due_retries(now)]
        for source in candidates:
            if len(claimed) >= limit:
                break
            target = self.claim_dir / source.name
            try:
                os.rename(source, target)
            except FileNotFoundError:
                continue  # another loader took it
            claimed.append(target)
        return claimed

    def _waiting(self) -> list[Path]:
        """Message files in the spool, oldest first."""
        found = self._files_with_mtime(self.root)
        return [path for _, path in sorted(found) if path.name.endswith(".json") and not path.name.startswith(".")]

    def _due_retries(self, now: float) -> list[Path]:
        return [path for mtime, path in sorted(self._files_with_mtime(self.root / RETRY)) if mtime <= now]

    @staticmethod
    def _files_with_mtime(folder: Path) -> list[tuple[float, Path]]:
        """(mtime, path) of the regular files in ``folder``; files another loader takes meanwhile are skipped."""
        found = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_file():
                            found.append((entry.stat().st_mtime, Path(entry.path)))
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return []
        return found

    def _has_retry_waiting(self) -> bool:
        try:
            return any(True for _ in os.scandir(self.root / RETRY))
        except FileNotFoundError:
            return False

    def recover_orphans(self) -> int:
        """Hand back files claimed by loaders that died; returns how many."""
        recovered = 0
        for folder in (self.root / PROCESSING).iterdir():
            if not folder.is_dir() or folder == self.claim_dir or not (folder / ".lock").exists():
                continue
            if folder.name.startswith(".new-") and time.time() - folder.stat().st_mtime < STARTING_GRACE:
                continue  # a loader that is starting right now
            with open(folder / ".lock", "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its loader is alive
                for path in folder.iterdir():
                    if path.name == ".lock":
                        continue
                    destination = self.root / RETRY / path.name if RETRY_SEPARATOR in path.name \
                        else self.root / path.name
                    self._move(path, destination)
                    recovered += 1
                os.unlink(folder / ".lock")
            try:
                folder.rmdir()
            except OSError:
                pass
        if recovered:
            log.warning("recovered %d message file(s) claimed by a loader that died", recovered)
        return recovered

    # -- one file -----------------------------------------------------------------------------
    def _handle(self, path: Path) -> None:
        try:
            self._handle_one(path)
        except Exception:  # hand the file back to retry/ (as the next attempt, after a short delay); keep consuming
            log.exception("could not finish spool file %s: trying it again in %gs", path, self.handback_delay)
            self._hand_back(path)

    def _hand_back(self, path: Path) -> None:
        """Move a claimed file whose handling raised to ``retry/``, due after ``handback_delay``."""
        if not path.exists():
            return  # it was moved on before the failure
        attempt, name = self._split(path.name)
        try:
            due = time.time() + self.handback_delay
            os.utime(path, (due, due))  # before the move: in retry/ with its old time, it would be due at once
            self._move(path, self.root / RETRY / f"{attempt + 1}{RETRY_SEPARATOR}{name}")
        except OSError as exc:  # it stays claimed and is recovered at the next start
            log.error("could not hand spool file %s back to %s: %s", path, RETRY, exc)

    def _handle_one(self, path: Path) -> None:
        attempt, name = self._split(path.name)
        try:
            with open(path, "rb") as handle:  # no more than the parser takes: a larger file is refused unread
                raw = handle.read(self.max_body_bytes + 1)
        except FileNotFoundError:
            return
        outcome = self.process_message(raw, Delivery(id=f"{self.root.name}/{name}", attempt=attempt))
        if outcome.action is Action.ACK:
            self._move(path, self.root / DONE / name)
        elif outcome.action is Action.RETRY:
            due = time.time() + outcome.delay
            os.utime(path, (due, due))  # before the move (a rename keeps it): never due at once in retry/
            following = attempt + 1 if outcome.counted else attempt  # nothing tried: the same attempt again
            self._move(path, self.root / RETRY / f"{following}{RETRY_SEPARATOR}{name}")
        else:
            target = self._move(path, self.root / FAILED / name)
            lines = [outcome.reason or "failed"]
            if outcome.plugin:
                lines.append(f"plugin: {outcome.plugin}")
            lines.append(f"attempts: {attempt}")
            target.with_name(target.name + ".reason").write_text("\n".join(lines) + "\n", encoding="utf-8")

    @staticmethod
    def _split(filename: str) -> tuple[int, str]:
        head, sep, rest = filename.partition(RETRY_SEPARATOR)
        if sep and head.isdigit():
            return int(head), rest
        return 1, filename

    @staticmethod
    def _move(source: Path, destination: Path) -> Path:
        """Rename without overwriting: a taken name gets a numeric suffix."""
        candidate, n = destination, 1
        while candidate.exists():
            candidate = destination.with_name(f"{destination.stem}.{n}{destination.suffix}")
            n += 1
        os.replace(source, candidate)
        return candidate

    def _release(self) -> None:
        if self._lock_handle is not None:
            try:
                self.claim_dir.joinpath(".lock").unlink(missing_ok=True)
                self._lock_handle.close()
                self.claim_dir.rmdir()
            except OSError:
                pass
            self._lock_handle = None

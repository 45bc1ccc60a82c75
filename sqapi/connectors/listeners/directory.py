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

import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from sqapi.config import DEFAULT_WORKERS
from sqapi.connectors.listeners import Inbox, Received, Transport
from sqapi.connectors.listeners._dead_letters import SpoolDeadLetters
from sqapi.connectors.listeners._queue_depths import QueueDepth, spool_queue_depths
from sqapi.core.message import MAX_BODY_BYTES
from sqapi.core.outcome import Action, Delivery, Outcome
from sqapi.errors import ConfigError, ConnectorError

log = logging.getLogger(__name__)

#: the spool folder when the section names none (relative to the working directory)
DEFAULT_SPOOL = ".sqapi/spool"
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


def spool_root(config: dict[str, Any]) -> Path:
    """The spool folder of a ``msg_broker`` section: its ``directory``, else :data:`DEFAULT_SPOOL`."""
    return Path(str(config.get("directory") or DEFAULT_SPOOL))


def make_spool(root: Path) -> None:
    """The spool folder, created when missing; :class:`ConnectorError` when it cannot be."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConnectorError(f"spool folder '{root}' cannot be created: {exc.strerror}") from None


class Listener(Transport):
    """The spool folder: files claimed by rename, settled by moving them on."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.root = spool_root(config)
        self.poll_interval = float(config.get("poll_interval", 0.5))
        self.workers = int(config.get("workers") or DEFAULT_WORKERS)
        self.handback_delay = float(config.get("handback_delay", HANDBACK_DELAY))
        self.max_body_bytes = int(config.get("max_body_bytes") or MAX_BODY_BYTES)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._receiving = True
        self._wake = threading.Event()   # a delivery settled, or the consumer is stopping
        self._lock_handle: IO[str] | None = None
        self.claim_dir = self.root / PROCESSING / self.owner

    # -- the transport ----------------------------------------------------------------------------
    def ping(self) -> None:
        make_spool(self.root)
        if not os.access(self.root, os.W_OK):
            raise ConnectorError(f"spool folder '{self.root}' is not writable")

    def open(self) -> None:
        """Create the layout, take this loader's claim folder and recover files of dead loaders."""
        if self._lock_handle is not None:
            return
        self.ping()
        try:
            for name in (PROCESSING, RETRY, DONE, FAILED):
                (self.root / name).mkdir(parents=True, exist_ok=True)
            # the claim folder becomes visible only with its lock already held, so that another loader's
            # recovery never mistakes a starting loader for a dead one
            staging = self.root / PROCESSING / f".new-{self.owner}"
            staging.mkdir(parents=True, exist_ok=True)
            self._lock_handle = open(staging / ".lock", "w")  # noqa: SIM115 -- held for the loader's life
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX)
            os.rename(staging, self.claim_dir)
        except OSError as exc:
            raise ConnectorError(f"spool folder '{self.root}' cannot be set up: {exc.strerror or exc}") from None
        self.recover_orphans()
        self._receiving = True
        log.info("listening on spool %s", self.root)

    def receive(self, inbox: Inbox, timeout: float) -> None:
        """Claim what waits or is due (no more than twice ``workers`` unsettled); else wait for a settled
        one, the next scan (``poll_interval``) or a stop."""
        room = self.workers * 2 - inbox.outstanding() if self._receiving else 0
        try:
            claimed = self.claim(room) if room > 0 else []
        except OSError as exc:  # e.g. the spool's file system went away for a moment
            log.error("cannot scan spool %s: %s", self.root, exc)
            claimed = []
        for path in claimed:
            attempt, name = self._split(path.name)
            try:
                with open(path, "rb") as handle:  # no more than the parser takes: a larger file is refused unread
                    raw = handle.read(self.max_body_bytes + 1)
            except OSError as exc:
                log.error("cannot read spool file %s: %s", path, exc)
                self._hand_back(path)
                continue
            inbox.put(Received(raw, Delivery(id=f"{self.root.name}/{name}", attempt=attempt), path))
        if not claimed:
            self._wake.wait(min(timeout, self.poll_interval))
            self._wake.clear()

    def settle(self, received: Sequence[Received], outcomes: Sequence[Outcome | None]) -> None:
        for item, outcome in zip(received, outcomes, strict=True):
            try:
                if outcome is None:
                    raise RuntimeError("the processor failed")
                self._settle_one(item.handle, outcome)
            except Exception:  # hand the file back to retry/ (as the next attempt, after a short delay)
                log.exception("could not finish spool file %s: trying it again in %gs", item.handle,
                              self.handback_delay)
                self._hand_back(item.handle)
        self._wake.set()

    def hand_back(self, received: Sequence[Received]) -> None:
        """Claimed files no worker started go back where they were taken from, unchanged."""
        for item in received:
            try:
                self._unclaim(item.handle)
            except OSError as exc:  # it stays claimed and is recovered at the next start
                log.error("could not hand spool file %s back: %s", item.handle, exc)

    def stop_receiving(self) -> None:
        self._receiving = False

    def interrupt(self) -> None:
        self._wake.set()

    @classmethod
    def publisher(cls, config: dict[str, Any]) -> SpoolPublisher:
        return SpoolPublisher(config)

    @classmethod
    def dead_letters(cls, config: dict[str, Any]) -> SpoolDeadLetters:
        return SpoolDeadLetters(spool_root(config))

    @classmethod
    def queue_depths(cls, config: dict[str, Any]) -> list[QueueDepth]:
        return spool_queue_depths(spool_root(config), PROCESSING, RETRY, FAILED)

    def drained(self) -> bool:
        return not self._waiting() and not self._has_retry_waiting()

    def close(self) -> None:
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
                    self._unclaim(path)
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
    def _unclaim(self, path: Path) -> None:
        """A claimed file back where it was taken from: the spool, or ``retry/`` with its attempt and due time."""
        self._move(path, self.root / RETRY / path.name if RETRY_SEPARATOR in path.name else self.root / path.name)

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

    def _settle_one(self, path: Path, outcome: Outcome) -> None:
        attempt, name = self._split(path.name)
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


class SpoolPublisher:
    """``sqapi publish`` to a spool folder: each body written (and synced) under a hidden name, then renamed
    in as ``<uuid>-<random>.json`` -- a loader never reads a half-written file."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.root = spool_root(config)

    def open(self) -> None:
        make_spool(self.root)

    def publish(self, body: bytes, message_id: str | None = None, routing_key: str | None = None,
                headers: dict[str, Any] | None = None) -> None:
        stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in (message_id or "message"))[:100]
        name = f"{stem.lstrip('.') or 'message'}-{uuid.uuid4().hex[:8]}.json"
        hidden = self.root / f".{name}.tmp"
        try:
            with open(hidden, "wb") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(hidden, self.root / name)
        except OSError as exc:
            hidden.unlink(missing_ok=True)
            raise ConnectorError(f"cannot write to spool folder '{self.root}': {exc.strerror or exc}") from None

    def close(self) -> None:
        return None

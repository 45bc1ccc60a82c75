"""The processor: one message in, one recorded :class:`~sqapi.core.outcome.Outcome` out.

validate -> record -> download data -> fetch metadata -> guess mime type -> sha256 ->
run every active plugin that accepts the type (in ``plugin.after`` order, each with its
own copies, each bounded by its timeout, each failure isolated) -> record the outcome.

Only the processor writes status.  Listeners act on the outcome it returns: ack, retry
after a delay, or dead-letter.  A message is never acknowledged before its outcome is
recorded: when the status database itself fails, the outcome is RETRY.

:meth:`Processor.process_batch` takes several deliveries at once (the RabbitMQ listener's
batches) and shares their status writes: the attempts in one statement, then each plugin over
the batch with its rows in one statement, the last plugin's rows together with the final
statuses.  A message's plugin DONE (and its hash) is recorded before its next plugin runs, so a
crash never re-runs a finished plugin.  The PROCESSING status goes with the first plugin rows,
or on its own once a plugin call has run for :data:`~sqapi.core.calls.SLOW_AFTER` seconds (so a
long plugin shows as PROCESSING while it runs): quick plugins cost no write of their own.  The
calls themselves run where the plugin's ``isolation`` says (:class:`~sqapi.core.runner.PluginRunner`:
worker processes by default); the processor only hands them over and records what comes back.
:meth:`Processor.process` is a batch of one: there is one code path.

This module is the front: the claims and the steps before the plugins (fetch, hash, mime type);
what one attempt records is :mod:`sqapi.core.attempt`, the plugins' order, resumption and rows
:mod:`sqapi.core.pipeline`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sqapi.config import DEFAULT_WORKERS
from sqapi.core.attempt import (
    DELETE,
    DELETED,
    DONE,
    FAILED,
    MAX_REASON_CHARS,
    PROCESS,
    PROCESSING,
    QUERYING,
    RETRY,
    VALIDATING,
    PluginFailure,
    Progress,
    Work,
    attempt_number,
    conclude,
    fail,
)
from sqapi.core.content import mime_type, sha256_of
from sqapi.core.contracts import DataStore, MetaStore, StatusStore
from sqapi.core.message import Message, MessageParser
from sqapi.core.outcome import Action, Delivery, Outcome, RetryPolicy
from sqapi.core.pipeline import PluginPipeline
from sqapi.core.plugins import PluginSet
from sqapi.core.runner import PluginRunner
from sqapi.errors import ConnectorError, MessageError, is_retryable
from sqapi.errors import describe_error as describe
from sqapi.logs import abbreviate

if TYPE_CHECKING:
    from sqapi.core.tracing import MessageTracing

#: re-exported: their home is sqapi.core.attempt
__all__ = ["DELETE", "DELETED", "MAX_REASON_CHARS", "PROCESS", "PluginFailure", "Processor", "ProcessorHooks"]

log = logging.getLogger(__name__)


class ProcessorHooks(Protocol):
    """Observers of the processor (metrics); every method must be cheap and must not raise."""

    def message_started(self) -> None: ...

    def message_finished(self, outcome: Outcome, seconds: float) -> None: ...

    def plugin_finished(self, plugin: str, status: str, seconds: float, reason: str | None) -> None: ...


class Processor:
    def __init__(self, config: Mapping[str, Any], database: StatusStore, data_store: DataStore, meta_store: MetaStore,
                 plugins: PluginSet, policy: RetryPolicy | None = None, runner: PluginRunner | None = None,
                 tracing: MessageTracing | None = None) -> None:
        broker = config.get("msg_broker") or {}
        processing = config.get("processing") or {}
        self.database = database
        self.data_store = data_store
        self.meta_store = meta_store
        self.plugins = plugins
        self.parser = MessageParser(broker)
        self.policy = policy or RetryPolicy.from_config(broker)
        self.max_result_bytes = int(processing.get("max_result_bytes", 1 << 20))
        self.hooks: list[ProcessorHooks] = []
        self.mime_field: str | None = broker.get("mime_field") or None
        #: runs the plugin calls (worker processes, or the loader's threads): the processor only asks it
        workers = int(processing.get("workers") or DEFAULT_WORKERS)
        self.runner = runner if runner is not None else PluginRunner(plugins, workers)
        #: the spans of each delivery when tracing is configured (:mod:`sqapi.tracing`); None: off, nothing traced
        self.tracing = tracing
        self.pipeline = PluginPipeline(database, plugins, self.runner, self.max_result_bytes, self._notify_plugin,
                                       tracing)

    @property
    def overdue(self) -> dict[str, int]:
        """Plugin name -> calls on the loader's threads still running past their timeout (``isolation: thread``)."""
        return self.runner.overdue

    def close(self) -> None:
        """Stop the plugins' worker processes."""
        self.runner.close()

    # -- the entry points -----------------------------------------------------------------------
    def process(self, raw: bytes | str | Mapping[str, Any], delivery: Delivery) -> Outcome:
        """Process one delivery and return what to do with it; never raises for a message's fault."""
        return self.process_batch([(raw, delivery)])[0]

    def process_batch(self, items: Sequence[tuple[bytes | str | Mapping[str, Any], Delivery]]) -> list[Outcome]:
        """Process several deliveries together: one outcome each, in order; never raises for a message's fault.

        Status writes are shared: the attempts of the whole batch are recorded at once, then each
        plugin runs over the batch and its rows are written at once, then the final statuses.  A
        message's plugin DONE is recorded before its next plugin runs, and every outcome is
        recorded before this returns.  When the batch fails as a whole (the status database, a
        bug of ours), each delivery is processed again on its own, so one cannot hold up others.
        """
        started = time.monotonic()
        for hook in self.hooks:
            for _ in items:
                hook.message_started()
        outcomes: list[Outcome | None] = [None] * len(items)
        spans = [self.tracing.start(delivery) for _raw, delivery in items] if self.tracing is not None else None
        try:
            self._process_batch(items, outcomes, spans)
        except Exception as exc:
            if len(items) > 1:
                log.warning("a batch of %d deliveries failed (%s): processing them one by one",
                            len(items), describe(exc))
                for index, item in enumerate(items):
                    if outcomes[index] is None:
                        outcomes[index] = self._single(item, spans[index:index + 1] if spans else None)
            else:
                outcomes[0] = self._failed_outright(exc, items[0][1])
        seconds = (time.monotonic() - started) / max(1, len(items))
        done: list[Outcome] = []
        for outcome, (_raw, delivery) in zip(outcomes, items, strict=True):
            assert outcome is not None
            for hook in self.hooks:
                hook.message_finished(outcome, seconds)
            level = logging.INFO if outcome.status == DONE else logging.WARNING
            if log.isEnabledFor(level):
                log.log(level, "%s", outcome.line(),
                        extra={"uuid": outcome.uuid, "status": outcome.status, "delivery": delivery.id})
            done.append(outcome)
        if spans is not None and self.tracing is not None:
            for span, outcome in zip(spans, done, strict=True):
                self.tracing.finish(span, outcome)
        return done

    def _single(self, item: tuple[bytes | str | Mapping[str, Any], Delivery], spans: list[Any] | None) -> Outcome:
        outcomes: list[Outcome | None] = [None]
        try:
            self._process_batch([item], outcomes, spans)
        except Exception as exc:
            return self._failed_outright(exc, item[1])
        assert outcomes[0] is not None
        return outcomes[0]

    def _failed_outright(self, exc: Exception, delivery: Delivery) -> Outcome:
        if isinstance(exc, ConnectorError):  # the status database is down (or aborted): nothing recorded, so redeliver
            log.error("status database failed, message %s will be redelivered: %s", delivery.id, exc)
            return Outcome(None, RETRY, Action.RETRY, reason=f"status database: {exc}",
                           delay=self.policy.delay_for(delivery.attempt), attempt=delivery.attempt, counted=False)
        # a bug of ours: keep the delivery (redelivered later), keep consuming -- up to its attempts
        log.error("internal error processing delivery %s", delivery.id, exc_info=exc)
        reason = abbreviate(f"internal error: {describe(exc)}", MAX_REASON_CHARS)
        if not self.policy.may_retry(delivery.attempt):
            return Outcome(None, FAILED, Action.DEAD_LETTER, reason=f"gave up after {delivery.attempt} "
                           f"attempt{'s' if delivery.attempt > 1 else ''}: {reason}", attempt=delivery.attempt)
        return Outcome(None, RETRY, Action.RETRY, reason=reason, delay=self.policy.delay_for(delivery.attempt),
                       attempt=delivery.attempt)

    def _process_batch(self, items: Sequence[tuple[bytes | str | Mapping[str, Any], Delivery]],
                       outcomes: list[Outcome | None], spans: list[Any] | None = None) -> None:
        """Fill ``outcomes``; raises when the batch cannot go on (outcomes already set stay recorded).

        ``spans``: each item's process span, when tracing is on."""
        work: list[Work] = []
        for index, (raw, delivery) in enumerate(items):
            try:
                message = self.parser.parse(raw, delivery.id)
            except MessageError as exc:
                outcomes[index] = self._malformed(exc, delivery, spans[index] if spans else None)
                continue
            w = Work(index, delivery, message)
            if spans is not None and self.tracing is not None:
                w.span = spans[index]
                self.tracing.parsed(w.span, message)
            work.append(w)
        # concurrent duplicates of one uuid take turns: the later one finds the earlier one's DONE;
        # a uuid twice in one batch goes in a later round, as does one another process holds
        first_round = True
        while work:
            seen: set[str] = set()
            now: list[Work] = []
            later: list[Work] = []
            for w in work:
                (later if w.message.uuid in seen else now).append(w)
                seen.add(w.message.uuid)
            # after the first round, one at a time with the blocking claim (it waits with backoff and
            # gives up after claim_timeout) instead of asking again for uuids another process holds
            if len(now) == 1 or not first_round:
                with self.database.claim(now[0].message.uuid):
                    self._attempt(now[:1], outcomes)
                later = now[1:] + later
            else:  # claims and attempts together (one round trip on PostgreSQL)
                tracing = self.tracing
                writing = tracing.start_write([w.span for w in now], QUERYING) if tracing is not None else []
                with self.database.claim_attempts([w.message for w in now], QUERYING) as recorded:
                    if tracing is not None:
                        tracing.end_write(writing)
                    self._attempt([w for w in now if w.message.uuid in recorded], outcomes, recorded)
                later = [w for w in now if w.message.uuid not in recorded] + later
            first_round = False
            work = later

    # -- one attempt at several messages (distinct uuids, all claimed) ----------------------------------
    def _attempt(self, work: list[Work], outcomes: list[Outcome | None],
                 recorded: Mapping[str, dict[str, Any] | None] | None = None) -> None:
        """One attempt at each of ``work``; ``recorded``: the attempts are already counted (the rows as they were)."""
        if not work:
            return
        # the messages are valid (parsed) by now: their rows say QUERYING while data and metadata are fetched
        if recorded is not None:
            previous = [recorded[w.message.uuid] for w in work]
        elif self.tracing is not None:
            with self.tracing.write([w.span for w in work], QUERYING):
                previous = self._record_attempts(work)
        else:
            previous = self._record_attempts(work)
        finals: list[Work] = []   # outcome known, status still to write
        running: list[Work] = []  # plugins to run
        try:
            for w, row in zip(work, previous, strict=True):
                w.previous = row
                w.attempt = attempt_number(w.delivery, row)
                if w.message.action == DELETE and row is not None and row["status"] == DONE \
                        and row.get("hash_digest") == DELETED:
                    outcomes[w.index] = Outcome(w.message.uuid, DONE, Action.ACK, attempt=w.attempt,
                                                reason="already deleted, no plugin run again", skipped=True)
                elif w.message.action == DELETE:
                    self._prepare_delete(w)
                    running.append(w)
                elif self._prepare(w):
                    running.append(w)
                elif w.final is not None:
                    finals.append(w)
                else:
                    assert w.outcome is not None
                    outcomes[w.index] = w.outcome
            # plugin rows from other data (an earlier hash) must not count as done for this data
            stale = [w for w in running if w.message.action == PROCESS and w.previous is not None and not w.resume]
            if stale:
                self.database.forget_plugin_rows([w.message.uuid for w in stale])
            # finished work taken up again (new data, a deletion) counts its attempts anew, as attempt_number did
            restarted = {w.message.uuid: w.attempt for w in running + finals
                         if w.previous is not None and w.previous["status"] == DONE}
            if restarted:
                self.database.restart_attempts(restarted)
            # the hash goes with the first plugin rows (or before): a crash then resumes, never re-runs
            progress = Progress(self.database, running)
            if any(self.runner.inline(p) for w in running for p in w.plugins):  # no time to write it later
                if self.tracing is not None:
                    with self.tracing.write([w.span for w in running], PROCESSING):
                        self.database.update_messages(progress.take())
                else:
                    self.database.update_messages(progress.take())
            for w in running:
                w.may_retry = self.policy.may_retry(w.attempt)
            last_rows = self.pipeline.run(running, progress)
        finally:
            for w in work:
                if w.local is not None:
                    w.local.release()
        for w in running:
            conclude(w, self.policy)
        finals += running
        if self.tracing is not None:
            with self.tracing.write_each([(w.span, w.final[1]) for w in finals if w.final is not None]):
                self.database.record_progress([w.final for w in finals if w.final is not None], last_rows, last=True)
        else:
            self.database.record_progress([w.final for w in finals if w.final is not None], last_rows, last=True)
        for w in finals:
            assert w.outcome is not None
            outcomes[w.index] = w.outcome

    def _record_attempts(self, work: list[Work]) -> list[dict[str, Any] | None]:
        if len(work) > 1:
            return self.database.record_attempts([w.message for w in work], QUERYING)
        return [self.database.record_attempt(work[0].message, QUERYING)]

    def _prepare(self, w: Work) -> bool:
        """Fetch data and metadata, hash; whether plugins are to run (else ``w.outcome``/``w.final`` are set)."""
        message, previous, delivery = w.message, w.previous, w.delivery
        was_done = previous is not None and previous["status"] == DONE
        try:
            if self.tracing is not None:
                with self.tracing.step(w.span, "fetch data"):
                    w.local = self.data_store.fetch(message.data_location)
            else:
                w.local = self.data_store.fetch(message.data_location)
        except Exception as exc:
            if was_done:  # a redelivery of finished work whose data has since gone: still done
                w.outcome = Outcome(message.uuid, DONE, Action.ACK, attempt=delivery.attempt, skipped=True,
                                    reason=f"already done, no plugin run again (data now unavailable: "
                                           f"{describe(exc)})")
                return False
            fail(w, f"data: {describe(exc)}", is_retryable(exc), None, self.policy)
            return False
        try:
            if self.tracing is not None and message.metadata is None and message.meta_location:
                with self.tracing.step(w.span, "fetch metadata"):
                    w.metadata = self._metadata(message)
            else:
                w.metadata = self._metadata(message)
            message.hash_digest = sha256_of(w.local.path)
            message.type = message.type or mime_type(w.local.path, message.data_location, w.metadata, self.mime_field)
        except Exception as exc:
            fail(w, f"metadata: {describe(exc)}", is_retryable(exc), None, self.policy)
            return False
        if was_done and previous is not None and previous.get("hash_digest") == message.hash_digest:
            w.outcome = Outcome(message.uuid, DONE, Action.ACK, reason="already done, no plugin run again",
                                attempt=delivery.attempt, skipped=True)
            return False
        w.path = w.local.path
        w.resume = bool(previous) and previous.get("hash_digest") == message.hash_digest  # type: ignore[union-attr]
        w.plugins = self.plugins.for_type(message.type, PROCESS)
        return True

    def _prepare_delete(self, w: Work) -> None:
        """A message asking for deletion: no data is fetched; plugins with ``delete`` in ``plugin.actions`` run."""
        message = w.message
        message.type = message.type or (w.previous or {}).get("data_type")
        message.hash_digest = DELETED
        w.metadata = self._metadata_or_empty(message)
        w.path = os.devnull
        w.plugins = self.plugins.for_type(message.type, DELETE)

    def _metadata_or_empty(self, message: Message) -> dict[str, Any]:
        try:
            return self._metadata(message)
        except Exception as exc:  # a deletion does not need metadata that is gone
            log.info("deleting %s without metadata: %s", message.uuid, describe(exc))
            return {}

    # -- steps --------------------------------------------------------------------------------
    def _malformed(self, exc: MessageError, delivery: Delivery, span: Any = None) -> Outcome:
        reason = abbreviate(f"malformed message: {exc}" if exc.uuid else f"malformed message ({delivery.id}): {exc}",
                            MAX_REASON_CHARS)
        if exc.uuid:  # recorded under the uuid's claim, never waited for: an attempt in progress has the last word
            stub = Message(id=delivery.id, uuid=exc.uuid, data_location=None)  # type: ignore[arg-type]
            if span is not None and self.tracing is not None:
                self.tracing.parsed(span, stub)
            with self.database.try_claim(exc.uuid) as held:
                if held:
                    previous = self.database.record_attempt(stub, VALIDATING)
                    if not previous or previous["status"] != DONE:
                        self.database.update_message(stub, FAILED, reason)
                else:
                    log.info("malformed copy of %s dead-lettered without a status write: another attempt at it "
                             "is in progress", exc.uuid)
        return Outcome(exc.uuid, FAILED, Action.DEAD_LETTER, reason=reason, attempt=delivery.attempt)

    def _metadata(self, message: Message) -> dict[str, Any]:
        if message.metadata is not None:
            return message.metadata
        if message.meta_location:
            message.metadata = self.meta_store.fetch(message.meta_location)
            return message.metadata
        return {}

    def _notify_plugin(self, name: str, status: str, seconds: float, reason: str | None) -> None:
        for hook in self.hooks:
            hook.plugin_finished(name, status, seconds, reason)

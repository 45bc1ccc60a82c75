"""The plugin pipeline of an attempt: each plugin, in order, over the messages of a batch that it takes.

For each plugin (in the order of the active plugins, ``plugin.after`` respected) the pipeline
prepares one call per message (its own copies of the message, the metadata and the results it
may see), hands them to the :class:`~sqapi.core.runner.PluginRunner` at once, takes in each
result or error, and records the plugin's rows before the next plugin runs.  A plugin DONE in an
earlier attempt on the same data is not run again (its stored result is handed on), and a plugin
that runs after one that failed and will be retried waits for that retry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqapi.core.attempt import DONE, FAILED, MAX_REASON_CHARS, RETRY, PluginFailure, Progress, Work
from sqapi.core.calls import Call
from sqapi.core.contracts import StatusStore
from sqapi.core.message import private_copy
from sqapi.core.plugins import Plugin, PluginSet
from sqapi.core.results import dump_result, result_was_omitted
from sqapi.core.runner import PluginRunner
from sqapi.errors import PermanentError, PluginFailed, PluginTimeout, is_retryable
from sqapi.errors import describe_error as describe
from sqapi.logs import abbreviate

if TYPE_CHECKING:
    from sqapi.core.tracing import MessageTracing

log = logging.getLogger(__name__)


class PluginPipeline:
    """Runs the plugins over the messages of an attempt and records their rows; the processor's second half."""

    def __init__(self, database: StatusStore, plugins: PluginSet, runner: PluginRunner, max_result_bytes: int,
                 on_plugin_finished: Callable[[str, str, float, str | None], None],
                 tracing: MessageTracing | None = None) -> None:
        self.database = database
        #: makes a span per plugin call when tracing is on (None: off)
        self.tracing = tracing
        self.plugins = plugins
        self.runner = runner
        self.max_result_bytes = max_result_bytes
        #: told of every plugin call's outcome: (plugin, status, seconds, reason)
        self.on_plugin_finished = on_plugin_finished

    def run(self, running: list[Work], progress: Progress) -> list[dict[str, Any]]:
        """Run each plugin, in order, over every message in ``running`` that it takes; record its rows at once.

        The last plugin's rows are returned, not recorded: they go with the final statuses.

        With ``resume``, plugins DONE in an earlier attempt on the same data are not run again
        (their stored results are handed on), unless their result was too large to store.  A
        plugin that runs after one that failed and will be retried waits for that retry.
        """
        for w in running:
            if w.resume:
                w.done_before = {row["plugin"]: row for row in self.database.get_plugin_rows(w.message.uuid)
                                 if row["status"] == DONE and not result_was_omitted(row.get("result"))}
        order: list[Plugin] = []
        seen: set[str] = set()
        for w in running:
            for plugin in w.plugins:
                if plugin.name not in seen:
                    seen.add(plugin.name)
                    order.append(plugin)
        if len(order) > 1:  # every message's plugins are in the order of the active plugins
            rank = {p.name: i for i, p in enumerate(self.plugins.active)}
            order.sort(key=lambda p: rank.get(p.name, len(rank)))
        rows: list[dict[str, Any]] = []
        for number, plugin in enumerate(order, start=1):
            rows = []
            calls: list[tuple[Work, Call]] = []
            for w in running:
                if any(p is plugin for p in w.plugins):
                    prepared = self._before_run(plugin, w)
                    if isinstance(prepared, Call):
                        calls.append((w, prepared))
                    elif prepared is not None:
                        rows.append(prepared)
            spans = self._start_spans(plugin, calls) if self.tracing is not None else None
            ran = self.runner.run(plugin, [call for _w, call in calls], progress.write)
            for (w, _call), (result, error, seconds) in zip(calls, ran, strict=True):
                rows.append(self._after_run(plugin, w, result, error, seconds))
            if spans is not None:
                self._end_spans(spans, ran)
            if number < len(order):
                if self.tracing is not None:
                    with self.tracing.write([w.span for w in running], "PROCESSING"):
                        self.database.record_progress(progress.take(), rows)
                else:
                    self.database.record_progress(progress.take(), rows)
            for _w, (_result, error, seconds) in zip(calls, ran, strict=True):
                self.on_plugin_finished(plugin.name, FAILED if error else DONE, seconds,
                                        describe(error) if error else None)
        return rows

    def _start_spans(self, plugin: Plugin, calls: list[tuple[Work, Call]]) -> list[Any]:
        """A span per call (tracing on), its context handed to the call: where it runs, it runs in it."""
        assert self.tracing is not None
        spans: list[Any] = []
        for w, call in calls:
            if w.span is None:
                spans.append(None)
                continue
            span, call.trace_context = self.tracing.start_plugin(w.span, plugin.name, w.attempt)
            spans.append(span)
        return spans

    def _end_spans(self, spans: list[Any], ran: list[Any]) -> None:
        assert self.tracing is not None
        for span, (_result, error, seconds) in zip(spans, ran, strict=True):
            if span is not None:
                self.tracing.end_plugin(span, FAILED if error is not None else DONE, seconds, error)

    def _before_run(self, plugin: Plugin, w: Work) -> Call | dict[str, Any] | None:
        """The call to make for ``plugin`` on one message, or the row to record instead (``None``: done before)."""
        message, results, statuses = w.message, w.results, w.statuses
        if plugin.name in w.done_before:
            stored = w.done_before[plugin.name].get("result")
            results[plugin.name] = json.loads(stored) if stored else None
            statuses[plugin.name] = {"status": DONE, "info": "done in an earlier attempt"}
            return None
        waits_for = sorted(w.retrying) if "*" in plugin.after else sorted(w.retrying & set(plugin.after))
        if waits_for:
            info = f"waits for {', '.join(waits_for)}, which will be retried"
            statuses[plugin.name] = {"status": RETRY, "info": info}
            w.retrying.add(plugin.name)
            return {"uuid": message.uuid, "plugin": plugin.name, "status": RETRY, "info": info}
        wanted = results if "*" in plugin.after else plugin.after  # '*': after (and given) every other
        own = message.copy(results={name: private_copy(results[name]) for name in wanted if name in results},
                           plugin_statuses=private_copy(statuses))
        return Call(own, private_copy(w.metadata), w.path)

    def _after_run(self, plugin: Plugin, w: Work, result: Any, error: BaseException | None, seconds: float) \
            -> dict[str, Any]:
        """Take in one plugin call's result or error; the row to record."""
        message = w.message
        if error is not None:
            reason = abbreviate(describe(error), MAX_REASON_CHARS)
            retryable = is_retryable(error)
            if isinstance(error, PluginFailed):  # from a worker process: its traceback came as text
                log.warning("plugin %s failed on %s: %s%s", plugin.name, message.uuid, reason,
                            f"\n{error.details.rstrip()}" if error.details and error.retryable else "")
            else:
                log.warning("plugin %s failed on %s: %s", plugin.name, message.uuid, reason,
                            exc_info=error if not isinstance(error, PermanentError | PluginTimeout) else None)
            w.failures.append(PluginFailure(plugin.name, reason, retryable))
            w.statuses[plugin.name] = {"status": FAILED, "info": reason}
            if retryable and w.may_retry:
                w.retrying.add(plugin.name)
            return {"uuid": message.uuid, "plugin": plugin.name, "status": FAILED, "info": reason,
                    "duration_ms": seconds * 1000.0, "version": plugin.version}
        w.results[plugin.name] = result
        w.statuses[plugin.name] = {"status": DONE, "info": None}
        return {"uuid": message.uuid, "plugin": plugin.name, "status": DONE, "duration_ms": seconds * 1000.0,
                "result": dump_result(result, self.max_result_bytes), "version": plugin.version}

"""sqapi's own exceptions.

Connectors translate driver errors (pika, psycopg2, redis, swiftclient, requests)
into these at their boundary with ``raise ... from``, so that core code never
imports a driver.  The processor decides what to do with a message from the kind
of error alone:

* :class:`NotFound` (a :class:`LookupError`): the data or metadata is not there
  yet -- retried with growing delays.
* :class:`ConnectorError`: a system sqapi depends on is down -- retried.
* :class:`PermanentError` and its children (:class:`MessageError`,
  :class:`AccessDenied`): retrying cannot help -- failed/dead-lettered at once.
"""

from __future__ import annotations


class SqapiError(Exception):
    """Base class of every error sqapi raises on purpose."""


class ConfigError(SqapiError):
    """A configuration that cannot work; stops startup.

    The message always names the file, the key and the fix, and never a secret value.
    """

    def __init__(self, key: str, problem: str, fix: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        self.source = source or "<embedded default>"
        super().__init__(f"{self.source}: {key}: {problem}. Fix: {fix}")


class PermanentError(SqapiError):
    """Retrying the same message cannot succeed (bad input, refused access, corrupt data).

    Plugins raise this (or a subclass) to say "record the failure, do not retry".
    """


class MessageError(PermanentError):
    """The message body cannot be parsed or lacks a required field."""

    def __init__(self, reason: str, uuid: str | None = None) -> None:
        self.uuid = uuid
        super().__init__(reason)


class AccessDenied(PermanentError):
    """The message refers to something sqapi may not read (outside base_dir, host not allowed, too large)."""


class NotFound(SqapiError, LookupError):
    """The referenced data object or metadata does not exist (yet); retryable."""


class ConnectorError(SqapiError):
    """A connector could not reach its system (network, auth, server error); retryable."""


class PluginLoadError(SqapiError):
    """A plugin could not be loaded; the message names the plugin and its path."""


class PluginNotConfigured(SqapiError):
    """Raised by a plugin's optional ``check(config)`` to stay inactive until configured."""


class PluginTimeout(SqapiError):
    """A plugin ran past its ``plugin.timeout``."""


class PluginFailed(SqapiError):
    """A plugin call that failed in a worker process: its reason, whether to retry, and the worker's traceback.

    The plugin's own exception stays in the worker; this carries what the processor records.
    A worker that crashed or was killed (timeout, memory) is reported the same way.
    """

    def __init__(self, reason: str, retryable: bool, details: str = "") -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.details = details


def describe_error(exc: BaseException) -> str:
    """An error as recorded in a status row: sqapi's own errors by their words, others with their type."""
    if isinstance(exc, PluginTimeout | ConnectorError | PermanentError | NotFound | PluginFailed):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def is_retryable(exc: BaseException) -> bool:
    """Permanent errors are not retried; missing objects, outages, timeouts and crashes are."""
    if isinstance(exc, PluginFailed):
        return exc.retryable
    return not isinstance(exc, PermanentError)

"""Logging set-up: ``--log-level`` and ``--json-logs``, with every record redacted and capped.

:func:`configure` logs to stderr through one handler on the root logger, and that handler's
:class:`SecretFilter` cleans every record that reaches it, whoever logged it (sqapi, a plugin, or a
library: urllib3, requests, pika, elastic_transport, swiftclient, ...) and at every level, in its
message, its traceback, its stack and its string ``extra`` fields (so JSON logs too):

* a URL keeps its scheme, host, port and path; its user info becomes ``***@`` and the value of
  each query (and fragment) parameter ``***``:
  ``amqp://guest:pw@mq:5672/v?heartbeat=60`` -> ``amqp://***@mq:5672/v?heartbeat=***``;
  a parameter without a value is ``***`` whole (``/x?abc`` -> ``/x?***``);
* a path with a query logged without its host, as urllib3 logs its request lines, loses the
  values the same way: ``"POST /hook?token=abc HTTP/1.1"`` -> ``"POST /hook?token=*** HTTP/1.1"``;
* a credential in HTTP header form keeps its name and scheme only:
  ``Authorization: Bearer abc`` -> ``Authorization: Bearer ***`` (also ``X-Auth-Token``, ``X-Api-Key``...);
* every known secret value (:func:`sqapi.config.secret_values` of the config) becomes ``***``;
* a message longer than :data:`MAX_MESSAGE_CHARS` becomes its start and a marker with its length
  and hash (:func:`abbreviate`); so does each line of a traceback, and a traceback as a whole
  past :data:`MAX_TRACEBACK_CHARS`.

This module imports the standard library only, so any code may use :func:`redact` and
:func:`abbreviate` on text it shows or stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

#: The most characters a log record's message (and each string ``extra`` field, and each line of
#: its traceback) keeps; longer text is abbreviated to this length, marker included.
MAX_MESSAGE_CHARS = 2000
#: The most characters a record's traceback (or stack) keeps as a whole.
MAX_TRACEBACK_CHARS = 20000
#: The loggers of the libraries sqapi uses: :func:`configure` makes them propagate to the root
#: handler (and drops any stream handler of their own), so their records are redacted too.
#: ``elastic_transport.node`` (a dump of every request and response body) stays as the library
#: ships it: silent, because it logs only when a handler is attached to it directly.
LIBRARY_LOGGERS = ("urllib3", "requests", "pika", "elastic_transport", "elasticsearch", "swiftclient",
                   "keystoneauth", "keystoneclient", "redis", "waitress", "werkzeug")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_PLAIN_TYPES = (int, float, bool, type(None))

# A URL with a scheme.  The scheme is bounded and must start a word, and no part of a URL can hold
# the characters that may precede another one's start, so matching stays linear on any text
# (a 5 MB data_location included).
_URL = re.compile(
    r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31}://)"
    r"(?:(?P<userinfo>[^\s/?#'\"<>`]*)@)?"
    r"(?P<rest>[^\s?#'\"<>`]*)"
    r"(?:\?(?P<query>[^\s#'\"<>`]*))?"
    r"(?:\#(?P<fragment>[^\s'\"<>`]*))?")
# A path with a query but no host (urllib3: '"POST /hook?token=abc HTTP/1.1"', 'url: /hook?token=abc').
_PATH_QUERY = re.compile(
    r"(?:(?<=[\s'\"(\[=,`])|^)(?P<path>/[^\s?#'\"<>()\[\]=,`]*)\?(?P<query>[^\s#'\"<>`]*)"
    r"(?:\#(?P<fragment>[^\s'\"<>`]*))?", re.MULTILINE)
# Whatever else looks like a query string: '?name=value...' anywhere (e.g. 'hook?token=abc').
_LOOSE_QUERY = re.compile(r"\?(?P<query>[\w.~%+-]+=[^\s#'\"<>`]*)")
# A credential in HTTP header form: 'Authorization: Bearer abc', "'X-Auth-Token': 'abc'", 'x-api-key=abc'.
_HEADER = re.compile(
    r"\b(?P<name>(?:proxy-)?authorization|x-auth-token|x-auth-key|x-storage-token|x-service-token"
    r"|x-subject-token|x-api-key|api-key)"
    r"(?P<sep>['\"]?\s*[:=]\s*['\"]?)"
    r"(?:(?P<scheme>basic|bearer|digest|negotiate|token|apikey)\s+)?"
    r"(?P<value>[^\s'\",;]+)", re.IGNORECASE)


def abbreviate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` itself when it has at most ``limit`` characters; else its start, then
    ``… [N chars, sha256 XXXXXXXXXXXX]``, at most ``limit`` characters in all (the marker alone
    when ``limit`` is shorter than the marker).

    ``N`` is ``len(text)`` and the hash the first 12 hex digits of the SHA-256 of its UTF-8 bytes:
    the same text always gives the same marker, so a shortened value can be matched with a full copy."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    marker = f"… [{len(text)} chars, sha256 {digest}]"
    return text[:max(0, limit - len(marker))] + marker


def _masked_params(params: str) -> str:
    """``a=1&b&c=`` -> ``a=***&***&c=``: names kept, values hidden."""
    masked = []
    for pair in params.split("&"):
        name, equals, value = pair.partition("=")
        if equals:
            masked.append(f"{name}={'***' if value else ''}")
        else:
            masked.append("***" if name else "")
    return "&".join(masked)


def _url_redacted(match: re.Match[str]) -> str:
    userinfo, query, fragment = match.group("userinfo"), match.group("query"), match.group("fragment")
    text = match.group("scheme")
    if userinfo is not None:
        text += "***@" if userinfo else "@"
    text += match.group("rest")
    if query is not None:
        text += "?" + _masked_params(query)
    if fragment is not None:
        text += "#" + _masked_params(fragment)
    return text


def _path_redacted(match: re.Match[str]) -> str:
    fragment = match.group("fragment")
    text = f"{match.group('path')}?{_masked_params(match.group('query'))}"
    return text if fragment is None else f"{text}#{_masked_params(fragment)}"


def _header_redacted(match: re.Match[str]) -> str:
    scheme = match.group("scheme")
    return f"{match.group('name')}{match.group('sep')}{scheme + ' ' if scheme else ''}***"


def redact(text: str) -> str:
    """``text`` with the credentials any URL, query string or HTTP header in it carries replaced by
    ``***`` (see the module's docstring); everything else unchanged.  Redacting twice changes nothing."""
    if "://" in text:
        text = _URL.sub(_url_redacted, text)
    if "?" in text:
        text = _PATH_QUERY.sub(_path_redacted, text)
        text = _LOOSE_QUERY.sub(lambda m: "?" + _masked_params(m.group("query")), text)
    return _HEADER.sub(_header_redacted, text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_text:  # already formatted (and redacted) by SecretFilter
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str)


class SecretFilter(logging.Filter):
    """Redacts and caps every record (see the module's docstring); never drops one.

    The record is changed in place, before any formatter sees it: its message is rendered
    (``args`` dropped) when that changes it, its traceback is formatted into ``exc_text``,
    ``stack_info`` and ``extra`` fields are cleaned (a value JSON cannot hold becomes its
    cleaned ``str``).  ``secrets`` lists the values masked as ``***``, longest first."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these values too (longest first, so a secret containing another is masked whole)."""
        self.secrets = sorted(set(self.secrets) | set(secrets), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - logging would print the raw arguments; show them cleaned instead
            message = f"{record.msg!r} % {record.args!r} (the log call's format and arguments do not match)"
            record.msg, record.args = message, None
        cleaned = abbreviate(self.mask(message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.mask_lines(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask_lines(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and not key.startswith("_"):
                setattr(record, key, self.mask_value(value))
        return True

    def mask(self, text: str) -> str:
        """``text`` redacted (:func:`redact`), then every known secret in it replaced by ``***``."""
        text = redact(text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def mask_lines(self, text: str) -> str:
        """A traceback or stack, masked, each line and the whole abbreviated."""
        lines = self.mask(text).split("\n")
        return abbreviate("\n".join(abbreviate(line) for line in lines), MAX_TRACEBACK_CHARS)

    def mask_value(self, value: Any, depth: int = 0) -> Any:
        """An ``extra`` field cleaned: strings masked and abbreviated, also inside dicts, lists and tuples."""
        if isinstance(value, _PLAIN_TYPES):
            return value
        if isinstance(value, str) or depth > 8:
            return abbreviate(self.mask(str(value)))
        if isinstance(value, dict):
            return {self.mask_value(k, depth + 1): self.mask_value(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mask_value(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            return tuple(self.mask_value(v, depth + 1) for v in value)
        return abbreviate(self.mask(str(value)))


def configure(level: str = "INFO", json_logs: bool = False) -> SecretFilter:
    """Log to stderr through one handler whose :class:`SecretFilter` redacts every record, the
    :data:`LIBRARY_LOGGERS`' included; returns the filter, so that secrets can be added once the
    config is read."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    secret_filter = SecretFilter()
    handler.addFilter(secret_filter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.propagate = True
        for own in list(library.handlers):  # e.g. urllib3.add_stderr_logger(): unfiltered, so removed
            if not isinstance(own, logging.NullHandler):
                library.removeHandler(own)
    return secret_filter


def current_settings() -> tuple[str, bool, list[str]]:
    """This process's logging as :func:`configure` set it: level, JSON or not, secrets masked.

    Plugin worker processes log the same way as the loader that starts them."""
    root = logging.getLogger()
    level = logging.getLevelName(root.level) if root.level else "WARNING"
    json_logs = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    secrets = [s for h in root.handlers for f in h.filters if isinstance(f, SecretFilter) for s in f.secrets]
    return str(level), json_logs, secrets

"""Configuration: YAML files, ``${VAR}`` substitution, merging and validation.

The main config comes from ``-c/--config``, else ``$CFG_FILE``, else the embedded
default (``sqapi/default.yml``); a given file is merged over the embedded default.
Each plugin's ``config.yml`` is merged over the main config for that plugin only.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

import yaml

from sqapi.errors import ConfigError

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yml")
EMBEDDED = "<embedded default>"

TOPICS = (
    "msg_broker",
    "data_store",
    "meta_store",
    "database",
    "active_plugins",
    "plugin_dirs",
    "api",
    "custom",
    "packages",
    "plugin",
    "processing",
    "tracing",
)
MAPPING_TOPICS = ("msg_broker", "data_store", "meta_store", "database", "api", "custom", "packages",
                  "plugin", "processing", "tracing")

#: The keys of the sections sqapi owns, all of them (connector sections belong to their connectors, and
#: sqAPI configs may carry keys of their own there).  Any other key is refused with a suggestion:
#: ``processing.wrokers: 4`` would otherwise be ignored in silence.
#: processing.workers (msg_broker.workers) when not given: a loader's worker threads at most, and a plugin's processes
DEFAULT_WORKERS = 4

KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "processing": ("workers", "processes", "plugin_timeout", "max_result_bytes", "temp_dir", "metrics_port",
                   "metrics_host", "history_retention"),
    "api": ("host", "port", "token", "threads", "max_body_bytes", "max_upload_bytes", "health_timeout",
            "blueprints_directory", "secure_cookie"),
    "msg_broker.retry": ("max_attempts", "initial_delay", "multiplier", "max_delay"),
    "msg_broker.reconnect": ("initial_delay", "max_delay"),
    "tracing": ("enabled", "exporter", "endpoint", "service_name"),  # sqapi.tracing.KEYS
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|api_?key|private_?key|credential)", re.IGNORECASE)
_PATH_KEY = re.compile(r"(dir|directory|dirs|path|paths|file|files|folder|location|root)$", re.IGNORECASE)
_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+")


class Config(dict[str, Any]):
    """A dict with attribute access per topic: ``config.custom``, ``config.plugin.name``.

    Nested mappings come back as :class:`Config` too, so sqAPI plugins' ``config.database.get(...)``
    and ``config.plugin.get('directory')`` work.  ``source`` names the file it was loaded from.
    """

    source: str = EMBEDDED

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            if name in MAPPING_TOPICS:
                return Config()
            raise AttributeError(name) from None
        if isinstance(value, dict) and not isinstance(value, Config):
            value = Config(value)
        return value

    def __deepcopy__(self, memo: dict[int, Any]) -> Config:
        new = Config(copy.deepcopy(dict(self), memo))
        new.source = self.source
        return new

    def copy_for_plugin(self) -> Config:
        return copy.deepcopy(self)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``over`` merged in: mappings merge key by key, anything else is replaced."""
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def substitute_env(value: Any, source: str, key: str = "", env: Mapping[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``value``.

    A string that is nothing but one ``${...}`` becomes an int, a float or a bool when its
    value is unambiguously one (``5432``, ``-1``, ``2.5``, ``true``/``false``), so
    ``port: ${PORT:-5432}`` gives an int; anything else (``0777``, ``no``, ``1e3``) stays the
    exact string, and so does every value under a key naming a secret or a path.  An empty
    value is ``None``.  An unset variable without a default is a :class:`ConfigError` naming
    the file, the key and the variable.
    """
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: substitute_env(v, source, f"{key}.{k}" if key else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, source, f"{key}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(key, f"environment variable {name} is not set",
                          f"export {name}=... or write ${{{name}:-default}}", source)

    whole = _VAR.fullmatch(value.strip())
    result = _VAR.sub(replace, value)
    if whole:
        if result == "":
            return None
        return scalar(result, key)
    return result


def scalar(text: str, key: str) -> Any:
    """``text`` as an int, float or bool when it is unambiguously one and ``key`` names no secret or path."""
    name = re.sub(r"\[\d+\]$", "", key.rsplit(".", 1)[-1])
    if _SECRET_KEY.search(name) or _PATH_KEY.search(name):
        return text
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping with ``yaml.safe_load``; an empty file is ``{}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("-", "config file not found", "check the path given to -c/--config or $CFG_FILE",
                          str(path)) from None
    except OSError as exc:
        raise ConfigError("-", f"cannot read the file ({exc.strerror})", "check its permissions",
                          str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        context = getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "-"
        if context is not None and mark is not None and context.line != mark.line:
            where += f" (in what starts at line {context.line + 1})"
        raise ConfigError(where, f"not valid YAML ({getattr(exc, 'problem', exc)})",
                          "fix the YAML syntax there", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("-", f"the top level is a {type(data).__name__}, not a mapping",
                          "write the config as 'topic: {...}' entries", str(path))
    return data


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the main config: embedded default, with ``path`` (or ``$CFG_FILE``) merged over it."""
    env = os.environ if env is None else env
    default = substitute_env(read_yaml(DEFAULT_CONFIG_PATH), EMBEDDED, env=env)
    chosen = os.fspath(path) if path else env.get("CFG_FILE") or None
    if chosen:
        user = substitute_env(read_yaml(chosen), chosen, env=env)
        merged = deep_merge(default, user)
        source = chosen
    else:
        user, merged, source = {}, default, EMBEDDED
    config = Config(merged)
    config.source = source
    validate_structure(config, user, source)
    return config


def key_source(user: Mapping[str, Any], dotted: str, source: str) -> str:
    """The file that set ``dotted``: the user's file when it names the key, else the embedded default."""
    node: Any = user
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return EMBEDDED
        node = node[part]
    return source


def validate_structure(config: Mapping[str, Any], user: Mapping[str, Any], source: str) -> None:
    """Check the shape of the core topics; connectors check their own keys when they are resolved."""

    def fail(key: str, problem: str, fix: str) -> None:
        raise ConfigError(key, problem, fix, key_source(user, key, source))

    for topic in MAPPING_TOPICS:
        value = config.get(topic)
        if value is not None and not isinstance(value, Mapping):
            fail(topic, f"must be a mapping, not {type(value).__name__}", f"write '{topic}:' followed by keys")
    for topic in ("msg_broker", "data_store", "meta_store", "database"):
        section = config.get(topic) or {}
        kind = section.get("type")
        if not isinstance(kind, str) or not kind:
            fail(f"{topic}.type", "missing or not a string", f"set {topic}.type to a connector type name")
    for key in ("active_plugins", "plugin_dirs"):
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            fail(key, "must be a list of names", f"write {key}: [name, ...]")
    unknown = [k for k in config if k not in TOPICS]
    for key in unknown:
        hint = difflib.get_close_matches(key, TOPICS, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"remove it; known topics: {', '.join(TOPICS)}"
        fail(key, "unknown topic", fix)

    for section_key, known in KNOWN_KEYS.items():
        owned: Any = config
        for part in section_key.split("."):
            owned = owned.get(part) if isinstance(owned, Mapping) else None
        if isinstance(owned, Mapping):
            for key in owned:
                if key not in known:
                    hint = difflib.get_close_matches(str(key), known, n=1)
                    fail(f"{section_key}.{key}", "unknown key",
                         f"did you mean '{hint[0]}'?" if hint else f"remove it; known keys: {', '.join(known)}")

    broker = config.get("msg_broker") or {}
    retry = broker.get("retry") or {}
    check_number(retry, "max_attempts", "msg_broker.retry", fail, integer=True, minimum=1)
    for name in ("initial_delay", "multiplier", "max_delay"):
        check_number(retry, name, "msg_broker.retry", fail, minimum=0)
    processing = config.get("processing") or {}
    check_number(processing, "workers", "processing", fail, integer=True, minimum=1)
    processes = processing.get("processes", "auto")
    if processes != "auto" and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        fail("processing.processes", f"must be a whole number of at least 1 or auto, not {processes!r}",
             "set processing.processes to auto (one per CPU where that helps) or a number")
    check_number(processing, "plugin_timeout", "processing", fail, minimum=0, optional=True)
    check_number(processing, "max_result_bytes", "processing", fail, integer=True, minimum=0)
    if processing.get("history_retention") not in (None, ""):
        try:
            parse_duration(processing["history_retention"], "processing.history_retention")
        except ValueError:
            fail("processing.history_retention", f"must be a duration, not {processing['history_retention']!r}",
                 "write e.g. history_retention: 30d (units s, m, h, d, w), or null to keep every event")
    check_number(processing, "metrics_port", "processing", fail, integer=True, minimum=0, optional=True)
    check_api(config.get("api") or {}, fail)
    parser = broker.get("parser") or {}
    if parser.get("type", "json") not in ("json", "string"):
        fail("msg_broker.parser.type", f"unknown parser {parser.get('type')!r}", "use 'json' or 'string'")
    fields = broker.get("message_fields")
    if fields is not None and not isinstance(fields, Mapping):
        fail("msg_broker.message_fields", "must be a mapping of field: {key: ..., required: ...}",
             "see docs/configuration.md")


def check_api(api: Mapping[str, Any], fail: Any) -> None:
    """``api.host`` a string, ``api.port`` a whole number 0..65535, ``api.token`` a string or null."""
    if "host" in api and not isinstance(api["host"], str):
        fail("api.host", f"must be a string, not {api['host']!r}", "set api.host to an address, e.g. 127.0.0.1")
    if "port" in api:
        port = api["port"]
        if isinstance(port, bool) or not isinstance(port, int):
            fail("api.port", f"must be a whole number, not {port!r}", "set api.port to a number from 0 to 65535")
        if not 0 <= port <= 65535:
            fail("api.port", f"{port} is out of range", "set api.port to a number from 0 to 65535")
    for name in ("max_body_bytes", "max_upload_bytes"):
        try:
            parse_size(api.get(name), f"api.{name}")
        except ValueError as exc:
            fail(f"api.{name}", str(exc), f"set api.{name} to a size like 1MB or 2GiB")
    if api.get("secure_cookie", "auto") not in ("auto", True, False):
        fail("api.secure_cookie", f"must be auto, true or false, not {api['secure_cookie']!r}",
             "set api.secure_cookie: true when a proxy in front ends TLS, else leave it auto")
    token = api.get("token")
    if token is not None and not isinstance(token, str):
        fail("api.token", f"must be a string, not a {type(token).__name__}",
             "quote the token (api.token: '...') or set $SQAPI_API_TOKEN")


def check_number(section: Mapping[str, Any], name: str, topic: str, fail: Any, *, integer: bool = False,
                 minimum: float | None = None, optional: bool = False) -> None:
    """Fail unless ``section[name]`` is a number (an int when ``integer``) at least ``minimum``."""
    if name not in section or (optional and section[name] is None):
        return
    value = section[name]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        fail(f"{topic}.{name}", f"must be {'a whole number' if integer else 'a number'}, not {value!r}",
             f"set {topic}.{name} to a number")
    if minimum is not None and value < minimum:
        fail(f"{topic}.{name}", f"must be at least {minimum}, not {value}", f"raise {topic}.{name}")


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(value: Any, key: str) -> int | None:
    """Bytes from a number or a text like ``512MB``, ``1.5 GiB`` or ``800M`` (powers of 1024); ``None`` stays None.

    Raises ``ValueError`` naming ``key`` for anything else."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{key} must be a size like 512MB or 2GiB (or a number of bytes), not {value!r}")
    return int(float(match.group(1)) * 1024 ** _SIZE_UNITS[match.group(2).upper()])


_DURATION = re.compile(r"\s*(\d+)\s*([smhdw])\s*")
_DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any, key: str) -> timedelta:
    """A duration from a text like ``30d``, ``12h``, ``45m``, ``90s`` or ``2w``.

    Raises ``ValueError`` naming ``key`` for anything else (zero included: it would mean everything)."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{key} must be a duration like 30d, 12h, 45m, 90s or 2w, not {value!r}")
    return timedelta(seconds=int(match.group(1)) * _DURATION_SECONDS[match.group(2)])


def require_keys(section: Mapping[str, Any], topic: str, keys: Iterable[tuple[str, type | tuple[type, ...]]],
                 source: str = EMBEDDED) -> None:
    """Raise :class:`ConfigError` for the first key of ``keys`` missing from ``section`` or of the wrong type."""
    for name, kind in keys:
        if section.get(name) in (None, ""):
            raise ConfigError(f"{topic}.{name}", "missing", f"set {topic}.{name}", source)
        if not isinstance(section[name], kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{topic}.{name}", f"must be {expected}", f"set {topic}.{name} to a {expected}",
                              source)


def init_script_of(config: Mapping[str, Any]) -> str | None:
    """The init script a database section names: ``init`` or sqAPI's ``scripts.init``."""
    scripts = config.get("scripts")
    init = config.get("init") or (scripts.get("init") if isinstance(scripts, dict) else None)
    return str(init) if init else None


def secret_values(config: Any) -> set[str]:
    """Every secret ``config`` holds, for masking in log records (3 characters or more).

    That is every string under a key that names a secret (password, token, ...), and the
    credentials carried by any URL anywhere in it, whatever its key (:func:`url_secrets`):
    ``custom.webhook.urls: ['https://h/hook?token=abc123xyz']`` gives ``abc123xyz``.
    """
    found: set[str] = set()

    def walk(node: Any, secret: bool) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, secret or bool(_SECRET_KEY.search(str(key))))
        elif isinstance(node, list):
            for value in node:
                walk(value, secret)
        elif secret and isinstance(node, str | int) and not isinstance(node, bool) and str(node):
            found.add(str(node))
        if isinstance(node, str) and "://" in node:
            found.update(url_secrets(node))

    walk(config, False)
    return {s for s in found if len(s) >= 3}


_SECRET_PARAM = re.compile(r"(pass|pwd|secret|token|key|sig|auth|credential|session|jwt|code)", re.IGNORECASE)


def _looks_like_credential(value: str) -> bool:
    """Eight characters or more mixing letters and digits: a token, a key, a signature."""
    return (len(value) >= 8 and not any(c.isspace() for c in value) and any(c.isdigit() for c in value)
            and any(c.isalpha() for c in value))


def url_secrets(text: str) -> set[str]:
    """The credentials in each URL of ``text`` (URLs separated by commas or white space), as written
    and percent-decoded: the password of its user info (or a user name given without a password
    that looks like a credential, ``https://ghp_x1y2z3...@host``), and the value of each query or
    fragment parameter whose name names a secret (``token``, ``sig``, ``key``, ...) or that looks
    like a credential (8+ characters mixing letters and digits).  Plain values such as
    ``heartbeat=60`` or ``sslmode=require`` are left out: masked everywhere they would garble
    unrelated log lines (in URLs themselves every value is redacted anyway, see :mod:`sqapi.logs`).
    """
    found: set[str] = set()

    def add(raw: str) -> None:
        found.update(v for v in (raw, unquote(raw), unquote_plus(raw)) if v)

    for piece in re.split(r"[\s,]+", text):
        if "://" not in piece:
            continue
        # split by hand (as sqapi.logs finds URLs in text): urlsplit refuses some malformed hosts
        rest, _, fragment = piece.partition("://")[2].partition("#")
        rest, _, query = rest.partition("?")
        username, _, password = rest.split("/", 1)[0].rpartition("@")[0].partition(":")
        if password:
            add(password)
        elif username and _looks_like_credential(unquote(username)):
            add(username)
        for params in (query, fragment):
            for pair in params.split("&") if params else ():
                name, _, value = pair.partition("=")
                if value and (_SECRET_PARAM.search(unquote_plus(name)) or _looks_like_credential(unquote_plus(value))):
                    add(value)
    return found


def redacted(config: Any) -> Any:
    """A copy of ``config`` with every secret value replaced by ``'***'``, fit for printing."""
    if isinstance(config, Mapping):
        return {k: "***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redacted(v)
                for k, v in config.items()}
    if isinstance(config, list):
        return [redacted(v) for v in config]
    return config


def url_for_logs(url: str) -> str:
    """``url`` without user info, query or fragment (any may carry a credential): fit for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed '[' in the host: shown as written, still without the user info
        scheme, sep, rest = url.partition("://")
        netloc, slash, path = re.split(r"[?#]", rest, maxsplit=1)[0].partition("/")
        return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # a malformed port is shown as written, still without the user info
        port, host = None, parts.netloc.rpartition("@")[2]
    if port:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))

"""Log records: secrets, URL credentials and long values redacted in every record, tracebacks kept, text and JSON."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from sqapi import logs
from sqapi.logs import JsonFormatter, SecretFilter
from tests.plugins.receiver import WebhookReceiver


def log_exception_as_json(secrets: list[str]) -> dict[str, str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter(secrets))
    logger = logging.getLogger("tests.logs.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError("login with hunter22 refused")
        except RuntimeError:
            logger.exception("could not connect")
    finally:
        logger.removeHandler(handler)
    return json.loads(stream.getvalue())


def test_json_logs_keep_the_traceback_masked_when_secrets_are_configured() -> None:
    entry = log_exception_as_json(["hunter22"])
    assert entry["message"] == "could not connect"
    assert "Traceback (most recent call last)" in entry["exception"]
    assert "RuntimeError: login with *** refused" in entry["exception"]
    assert "hunter22" not in json.dumps(entry)


def test_json_logs_keep_the_traceback_without_secrets() -> None:
    entry = log_exception_as_json([])
    assert "RuntimeError: login with hunter22 refused" in entry["exception"]


def test_register_plugin_secrets_masks_a_password_from_a_plugins_own_config(workdir, write_plugin, write_data,
                                                                            make_app) -> None:
    import click

    from sqapi.cli import Options, main, register_plugin_secrets
    from sqapi.config import secret_values
    from sqapi.core.outcome import Delivery

    write_plugin("leaky", "import logging\ndef execute(config, database, message, metadata, data):\n"
                          "    logging.getLogger('leaky').error('connecting with %s', config.plugin['password'])\n",
                 config={"plugin": {"password": "plugin-only-secret", "thread_safe": True, "isolation": "thread"}})
    app = make_app({"active_plugins": ["leaky"]})
    secret_filter = SecretFilter(secret_values(app.config))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(secret_filter)
    logging.getLogger("leaky").addHandler(handler)
    try:
        with click.Context(main, obj=Options(secret_filter=secret_filter)) as ctx:
            register_plugin_secrets(ctx, app)
        outcome = app.process({"uuid_ref": "leak", "data_location": write_data("a.txt", "x")}, Delivery("leak"))
    finally:
        logging.getLogger("leaky").removeHandler(handler)
    assert outcome.status == "DONE"
    assert stream.getvalue() == "connecting with ***\n"


# --- URLs, credentials and long values, redacted in every record ---

SQAPI = str(Path(sys.executable).parent / "sqapi")
URL = "https://deploy:pw-5ecret-77@hooks.example:8443/notify?token=tok-abc123xyz&kind=pdf"
REDACTED_URL = "https://***@hooks.example:8443/notify?token=***&kind=***"

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """``logs.configure`` as the CLI calls it, writing to a stream the test reads; undone afterwards."""
    root = logging.getLogger()
    level = root.level
    libraries = {name: (lg.propagate, lg.level, list(lg.handlers))
                 for name in logs.LIBRARY_LOGGERS for lg in [logging.getLogger(name)]}
    streams: list[io.StringIO] = []

    def configure(level: str = "DEBUG", json_logs: bool = False, secrets: tuple[str, ...] = ()) -> io.StringIO:
        stream = io.StringIO()
        streams.append(stream)
        monkeypatch.setattr(sys, "stderr", stream)
        logs.configure(level, json_logs).add(secrets)
        return stream

    yield configure
    for handler in list(root.handlers):
        if getattr(handler, "stream", None) in streams:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, (propagate, library_level, handlers) in libraries.items():
        library = logging.getLogger(name)
        library.propagate, library.handlers = propagate, handlers
        library.setLevel(library_level)


def entries(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("json_logs", [False, True], ids=["plain", "json"])
def test_a_url_logged_by_sqapi_code_shows_neither_its_user_info_nor_its_query_values(configured: Configure,
                                                                                    json_logs: bool) -> None:
    stream = configured("DEBUG", json_logs)
    logging.getLogger("sqapi.tests").debug("notifying %s", URL, extra={"target": URL, "targets": [URL]})
    text = stream.getvalue()
    assert "pw-5ecret-77" not in text and "tok-abc123xyz" not in text and "deploy" not in text
    if json_logs:
        [entry] = entries(stream)
        assert entry["message"] == f"notifying {REDACTED_URL}"
        assert entry["target"] == REDACTED_URL and entry["targets"] == [REDACTED_URL]
    else:
        assert text.rstrip("\n").endswith(f"DEBUG   sqapi.tests: notifying {REDACTED_URL}")


@pytest.mark.parametrize("json_logs", [False, True], ids=["plain", "json"])
def test_urllib3_request_lines_at_debug_show_no_credential_of_a_real_request(configured: Configure,
                                                                            json_logs: bool) -> None:
    receiver = WebhookReceiver().start()
    port = receiver.server.server_address[1]
    try:
        stream = configured("DEBUG", json_logs)
        response = requests.post(f"http://hook-user:hook-pw-31337@127.0.0.1:{port}/hook?token=tok-98765xyz&x=1",
                                 data=b"{}", timeout=5)
    finally:
        receiver.stop()
    assert response.status_code == 200
    assert receiver.received[0].path == "/hook?token=tok-98765xyz&x=1"  # the token was really sent
    text = stream.getvalue()
    assert "tok-98765xyz" not in text and "hook-pw-31337" not in text
    lines = [e["message"] for e in entries(stream) if e["logger"] == "urllib3.connectionpool"] if json_logs \
        else text.splitlines()
    assert any('"POST /hook?token=***&x=*** HTTP/1.1" 200' in line for line in lines), text


@pytest.mark.parametrize("json_logs", [False, True], ids=["plain", "json"])
def test_an_exception_whose_message_holds_a_url_is_redacted_in_the_traceback(configured: Configure,
                                                                            json_logs: bool) -> None:
    stream = configured("INFO", json_logs)
    try:
        raise ConnectionError(f"cannot reach {URL}")
    except ConnectionError:
        logging.getLogger("sqapi.tests").exception("delivery failed")
    text = stream.getvalue()
    assert "pw-5ecret-77" not in text and "tok-abc123xyz" not in text
    traceback = entries(stream)[0]["exception"] if json_logs else text
    assert "Traceback (most recent call last)" in traceback
    assert f"ConnectionError: cannot reach {REDACTED_URL}" in traceback


@pytest.mark.parametrize("json_logs", [False, True], ids=["plain", "json"])
def test_a_5_mb_value_is_logged_as_one_line_with_its_start_length_and_hash(configured: Configure,
                                                                          json_logs: bool) -> None:
    stream = configured("INFO", json_logs)
    location = "/data/" + "x" * 5_000_000
    logging.getLogger("sqapi.tests").warning("no such data_location %s", location, extra={"location": location})
    message = f"no such data_location {location}"
    marker = f"… [{len(message)} chars, sha256 {hashlib.sha256(message.encode()).hexdigest()[:12]}]"
    [line] = stream.getvalue().splitlines()
    shown = json.loads(line)["message"] if json_logs else line.split("sqapi.tests: ", 1)[1]
    assert len(shown) <= logs.MAX_MESSAGE_CHARS
    assert shown.startswith("no such data_location /data/xxx") and shown.endswith(marker)
    assert len(line) < 2 * logs.MAX_MESSAGE_CHARS + 300  # the JSON line holds the message and the extra field


def test_a_traceback_holding_a_5_mb_value_keeps_every_line_under_the_cap(configured: Configure) -> None:
    stream = configured("INFO", True)
    try:
        raise LookupError("no object " + "y" * 5_000_000)
    except LookupError:
        logging.getLogger("sqapi.tests").exception("download failed")
    [entry] = entries(stream)
    assert len(stream.getvalue()) < logs.MAX_TRACEBACK_CHARS
    last = entry["exception"].splitlines()[-1]
    assert last.startswith("LookupError: no object yyy") and f"[{5_000_000 + 23} chars, sha256 " in last
    assert len(last) <= logs.MAX_MESSAGE_CHARS


def test_abbreviate_keeps_short_text_and_shortens_long_text_to_the_limit_marker_included() -> None:
    assert logs.abbreviate("short", 10) == "short"
    assert logs.abbreviate("x" * 100, 100) == "x" * 100
    long = "y" * 101
    shortened = logs.abbreviate(long, 100)
    assert len(shortened) == 100
    assert shortened.endswith(f"… [101 chars, sha256 {hashlib.sha256(long.encode()).hexdigest()[:12]}]")
    assert logs.abbreviate(long, 100) == shortened  # the same text, the same marker


@pytest.mark.parametrize(("text", "shown"), [
    ("amqp://guest:pw@mq:5672/v?heartbeat=60", "amqp://***@mq:5672/v?heartbeat=***"),
    ('http://127.0.0.1:80 "POST /hook?token=abc HTTP/1.1" 200 0',
     'http://127.0.0.1:80 "POST /hook?token=*** HTTP/1.1" 200 0'),
    ("Max retries exceeded with url: /hook?token=abc (Caused by X)",
     "Max retries exceeded with url: /hook?token=*** (Caused by X)"),
    ("Incremented Retry for (url='/hook?sig=abc&a='): x", "Incremented Retry for (url='/hook?sig=***&a='): x"),
    ("{'url': 'redis://:p@ss@h:6379/0'}", "{'url': 'redis://***@h:6379/0'}"),
    ("GET /x?opaque-token and hook?token=abc", "GET /x?*** and hook?token=***"),
    ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=***&state=***"),
    ("{'Authorization': 'Bearer abc', 'X-Auth-Token': 'tok'}",
     "{'Authorization': 'Bearer ***', 'X-Auth-Token': '***'}"),
    ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
    ("http://es:9200/_bulk is up; done? yes", "http://es:9200/_bulk is up; done? yes"),
])
def test_redact_hides_user_info_query_values_and_credential_headers_and_nothing_else(text: str, shown: str) -> None:
    assert logs.redact(text) == shown
    assert logs.redact(shown) == shown


@pytest.mark.parametrize("name", ["urllib3.connectionpool", "requests.sessions", "pika.connection",
                                  "elastic_transport.transport", "elasticsearch", "swiftclient"])
def test_records_of_the_libraries_sqapi_uses_reach_the_redacting_handler_at_debug(configured: Configure,
                                                                                 name: str) -> None:
    import urllib3

    urllib3.add_stderr_logger()  # a library's own stream handler would bypass the redaction
    stream = configured("DEBUG")
    logging.getLogger(name).debug("GET %s", URL)
    assert stream.getvalue().rstrip("\n").endswith(f"DEBUG   {name}: GET {REDACTED_URL}")
    assert [type(h) for h in logging.getLogger("urllib3").handlers] == [logging.NullHandler]


def test_a_log_call_whose_arguments_do_not_fit_its_format_is_shown_redacted(configured: Configure) -> None:
    stream = configured("INFO")
    logging.getLogger("sqapi.tests").info("two values %s %s", URL)
    assert "tok-abc123xyz" not in stream.getvalue() and REDACTED_URL in stream.getvalue()


def test_secret_values_include_the_credentials_of_urls_anywhere_in_the_config() -> None:
    from sqapi.config import secret_values

    config = {"custom": {"webhook": {"urls": ["http://127.0.0.1:9/hook?token=tok-1&mode=quiet"]},
                         "mirrors": "https://u:mirror%40pw@a.example/x, https://ghp_4bc123def456@b.example/"},
              "msg_broker": {"url": "amqp://guest:broker-pw@mq:5672/%2F?heartbeat=60&sig=a1b2c3d4e5"},
              "database": {"dsn": "postgresql://postgres@db/sqapi?sslmode=require"}}
    assert secret_values(config) == {"tok-1", "mirror%40pw", "mirror@pw", "ghp_4bc123def456", "broker-pw",
                                     "a1b2c3d4e5"}


@pytest.mark.parametrize("json_logs", [False, True], ids=["plain", "json"])
def test_a_full_run_at_debug_logs_no_configured_secret(workdir: Path, write_plugin, write_data,
                                                       json_logs: bool) -> None:
    secrets = {"password": "hunter2-very-secret", "api token": "api-token-0123456789",
               "webhook secret": "webhook-signing-secret-1", "webhook query token": "hook-token-abc123",
               "password in a URL's user info": "upstream-pass-4242"}
    receiver = WebhookReceiver().start()
    url = f"{receiver.url}?token={secrets['webhook query token']}"
    upstream = "https://svc-user:" + secrets["password in a URL's user info"] + "@upstream.example/api"
    write_plugin("leaky", """\
        import logging

        def execute(config, database, message, metadata, data):
            url, upstream = config.custom['webhook']['urls'][0], config.custom['upstream']
            log = logging.getLogger('leaky')
            log.debug('posting to %s and %s as %s with %s', url, upstream, config.custom['password'],
                      config.api['token'])
            log.debug('token alone: %s, password alone: %s', url.split('token=')[1], upstream.split(':')[2][:-21])
        """)
    config = {"active_plugins": ["leaky", "webhook"], "api": {"token": secrets["api token"]},
              "custom": {"password": secrets["password"], "upstream": upstream,
                         "webhook": {"urls": [url], "secret": secrets["webhook secret"],
                                     "allow_private_addresses": True, "backoff": 0.01, "timeout": 5}}}
    (workdir / "cfg.yml").write_text(json.dumps(config), encoding="utf-8")
    (workdir / "m.json").write_text(json.dumps({"uuid_ref": "full-run", "data_location": write_data("a.txt", "x")}))
    try:
        json_option = ["--json-logs"] if json_logs else []
        result = subprocess.run([SQAPI, "-c", "cfg.yml", "--log-level", "DEBUG", *json_option, "process", "m.json"],
                                cwd=workdir, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    finally:
        receiver.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("full-run DONE")
    assert [r.path for r in receiver.received] == [f"/hook?token={secrets['webhook query token']}"]
    messages = [json.loads(line)["message"] for line in result.stderr.splitlines()] if json_logs \
        else result.stderr.splitlines()
    assert any('"POST /hook?token=*** HTTP/1.1" 200' in m for m in messages)  # urllib3's DEBUG line, redacted
    assert any(m.endswith("token alone: ***, password alone: ***") for m in messages)
    leaked = [name for name, value in secrets.items() if value in result.stderr + result.stdout]
    assert leaked == []

"""Log records: secrets masked, tracebacks kept, in text and JSON."""

from __future__ import annotations

import io
import json
import logging

from sqapi.logs import JsonFormatter, SecretFilter


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

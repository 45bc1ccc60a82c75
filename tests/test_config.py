from __future__ import annotations

import os
from pathlib import Path

import pytest

from sqapi.app import build, validate
from sqapi.config import Config, load_config, redacted, secret_values
from sqapi.errors import ConfigError


def test_no_config_gives_the_embedded_default(workdir: Path) -> None:
    config = load_config()
    assert config.source == "<embedded default>"
    assert config.msg_broker.type == "directory"
    assert config.data_store.type == "disk"
    assert config.database.type == "postgres"  # the embedded PostgreSQL: no connection or dsn given
    assert config.database.get("connection") is None and config.database.get("dsn") is None
    assert config.database.embedded.directory == os.environ["SQAPI_EMBEDDED_DIR"]


def test_a_config_file_is_merged_over_the_embedded_default(write_config) -> None:
    config = load_config(write_config({"msg_broker": {"retry": {"max_attempts": 9}}, "custom": {"x": 1}}))
    assert config.msg_broker.retry.max_attempts == 9
    assert config.msg_broker.retry.initial_delay == 1.0  # kept from the default
    assert config.msg_broker.type == "directory"
    assert config.custom.x == 1


def test_cfg_file_names_the_config_when_no_option_is_given(write_config, monkeypatch) -> None:
    path = write_config({"custom": {"from": "env"}}, name="env.yml")
    monkeypatch.setenv("CFG_FILE", str(path))
    assert load_config().custom["from"] == "env"
    assert load_config(write_config({"custom": {"from": "option"}})).custom["from"] == "option"


def test_environment_variables_are_substituted_with_defaults_and_types(write_config, monkeypatch) -> None:
    monkeypatch.setenv("SQ_HOST", "db.example")
    path = write_config("custom:\n  host: ${SQ_HOST}\n  port: ${SQ_PORT:-5432}\n  url: 'http://${SQ_HOST}:80'\n"
                        "  flag: ${SQ_FLAG:-true}\n")
    custom = load_config(path).custom
    assert custom == {"host": "db.example", "port": 5432, "url": "http://db.example:80", "flag": True}


@pytest.mark.parametrize(("key", "value"), [
    ("password", "0777"), ("password", "no"), ("password", "12345"), ("api_token", "true"),
    ("base_dir", "2024"), ("spool_path", "1.5"), ("directory", "10"), ("plugin_file", "false"),
])
def test_substituted_secrets_and_paths_keep_the_exact_string(write_config, monkeypatch, key, value) -> None:
    monkeypatch.setenv("SQ_VALUE", value)
    custom = load_config(write_config(f"custom:\n  {key}: ${{SQ_VALUE}}\n")).custom
    assert custom[key] == value and isinstance(custom[key], str)


@pytest.mark.parametrize(("value", "expected"), [
    ("0777", "0777"), ("007", "007"), ("no", "no"), ("yes", "yes"), ("on", "on"), ("off", "off"), ("~", "~"),
    ("null", "null"), ("1e3", "1e3"), ("0x1F", "0x1F"), ("1_000", "1_000"), ("12:30", "12:30"),
    ("[1, 2]", "[1, 2]"), ("{a: 1}", "{a: 1}"), ("2024-01-01", "2024-01-01"), (".5", ".5"),
    ("5432", 5432), ("0", 0), ("-3", -3), ("2.5", 2.5), ("-0.25", -0.25),
    ("true", True), ("false", False), ("True", True), ("FALSE", False),
])
def test_a_substituted_value_becomes_a_number_or_bool_only_when_unambiguous(write_config, monkeypatch, value,
                                                                             expected) -> None:
    monkeypatch.setenv("SQ_VALUE", value)
    custom = load_config(write_config("custom:\n  setting: ${SQ_VALUE}\n")).custom
    assert custom["setting"] == expected and type(custom["setting"]) is type(expected)


def test_defaults_of_ports_and_flags_still_give_numbers_and_bools(write_config) -> None:
    custom = load_config(write_config("custom:\n  port: ${SQ_UNSET_PORT:-5432}\n  ssl: ${SQ_UNSET_SSL:-false}\n"
                                      "  timeout: ${SQ_UNSET_T:-2.5}\n  password: ${SQ_UNSET_PW:-}\n")).custom
    assert custom == {"port": 5432, "ssl": False, "timeout": 2.5, "password": None}


def test_an_unset_variable_without_default_names_the_file_the_key_and_the_variable(write_config) -> None:
    path = write_config("database:\n  type: sqlite\n  path: ${SQ_MISSING_PATH}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "database.path" in message and "SQ_MISSING_PATH" in message


def test_an_unknown_connector_type_lists_the_types_available_and_suggests_one(write_config) -> None:
    path = write_config({"data_store": {"type": "dsik"}})
    with pytest.raises(ConfigError) as info:
        validate(load_config(path))
    message = str(info.value)
    assert "data_store.type" in message and "unknown type 'dsik'" in message
    assert "did you mean 'disk'" in message and "http" in message and str(path) in message


@pytest.mark.parametrize(("content", "key"), [
    ({"msg_broker": {"retry": {"max_attempts": "five"}}}, "msg_broker.retry.max_attempts"),
    ({"processing": {"workers": 0}}, "processing.workers"),
    ({"processing": {"processes": "many"}}, "processing.processes"),
    ({"processing": {"processes": 0}}, "processing.processes"),
    ({"custom": ["not", "a", "mapping"]}, "custom"),
    ({"active_plugins": "sizes"}, "active_plugins"),
    ({"msg_broker": {"parser": {"type": "xml"}}}, "msg_broker.parser.type"),
    ({"database": {"type": None}}, "database.type"),
])
def test_a_wrong_value_stops_startup_with_one_message_naming_the_key_and_the_fix(write_config, content, key) -> None:
    path = write_config(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_an_unknown_topic_suggests_the_topic_meant(write_config) -> None:
    with pytest.raises(ConfigError, match="did you mean 'data_store'"):
        load_config(write_config({"data_stor": {"type": "disk"}}))


def test_invalid_yaml_names_the_line(write_config) -> None:
    with pytest.raises(ConfigError, match=r"line 4 \(in what starts at line 3\): not valid YAML"):
        load_config(write_config("custom:\n  a: 1\n  b: [1, 2\nother: 3\n"))


def test_a_missing_database_init_script_stops_startup(write_config) -> None:
    path = write_config({"database": {"init": "nowhere/init.sql"}})
    with pytest.raises(ConfigError, match="init script 'nowhere/init.sql' not found"):
        build(load_config(path))


def test_a_connector_section_missing_a_required_key_is_named(write_config) -> None:
    with pytest.raises(ConfigError, match="data_store.allowed_hosts: missing"):
        validate(load_config(write_config({"data_store": {"type": "http"}})))


def test_secret_values_are_found_and_redacted_for_printing() -> None:
    config = Config({"msg_broker": {"user": "guest", "password": "s3cret-pw"},
                     "api": {"token": "tok-123456"}, "data_store": {"secret_access_key": "swiftkey"}})
    assert secret_values(config) == {"s3cret-pw", "tok-123456", "swiftkey"}
    shown = redacted(config)
    assert shown["msg_broker"] == {"user": "guest", "password": "***"}
    assert "tok-123456" not in repr(shown) and "swiftkey" not in repr(shown)


def test_a_connector_can_be_named_by_its_qualified_module_path(write_config, workdir, monkeypatch) -> None:
    (workdir / "mystore.py").write_text("def download_to_disk(config, ref):\n    return ref\n")
    monkeypatch.syspath_prepend(str(workdir))
    config = load_config(write_config({"data_store": {"type": "mystore"}}))
    with pytest.raises(ConfigError, match="unknown type 'mystore'"):
        validate(config)
    config = load_config(write_config({"data_store": {"type": "mystore:download_to_disk"}}))
    from sqapi.app import resolve_connector
    assert resolve_connector(config, "data_store")({}, "x") == "x"


def test_a_connector_can_come_from_an_installed_entry_point(write_config, workdir, monkeypatch) -> None:
    site = workdir / "site"
    dist = site / "sqapi_extra-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sqapi-extra\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sqapi.connectors.meta]\nconstant = extra_meta\n")
    (site / "extra_meta.py").write_text("def fetch_metadata(config, ref):\n    return {'ref': ref}\n")
    monkeypatch.syspath_prepend(str(site))
    from sqapi import registry
    assert "constant" in registry.available_types("meta")
    module = registry.resolve("meta_store", "constant")
    assert module.fetch_metadata({}, "k") == {"ref": "k"}


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:secret@host.example:8443/a/b?token=x#frag", "https://host.example:8443/a/b"),
    ("http://127.0.0.1/auth/v1.0", "http://127.0.0.1/auth/v1.0"),
    ("http://u:p@host:99999999/x?k=v", "http://host:99999999/x"),
])
def test_urls_are_shown_without_user_info_query_or_fragment(url: str, shown: str) -> None:
    from sqapi.config import url_for_logs
    assert url_for_logs(url) == shown


def test_a_listener_written_for_sqapi_gets_its_two_arguments_and_a_batch_listener_gets_batches(
        make_app, workdir, monkeypatch) -> None:
    (workdir / "mylisteners").mkdir()
    (workdir / "mylisteners" / "__init__.py").write_text("")
    (workdir / "mylisteners" / "old.py").write_text(
        "class Listener:\n"
        "    def __init__(self, config, process_message):\n"
        "        self.config, self.process_message = config, process_message\n"
        "    def start_listeners(self):\n        pass\n")
    monkeypatch.syspath_prepend(str(workdir))
    app = make_app({"msg_broker": {"type": "mylisteners.old"}})
    listener = app.create_listener()
    assert listener.listener.process_message == app.processor.process  # sqAPI's two arguments, adapted
    from sqapi.connectors.listeners import Transport
    from sqapi.connectors.listeners.rabbitmq import Listener as RabbitListener
    assert issubclass(RabbitListener, Transport)  # sqapi's own is a transport the consumer drives

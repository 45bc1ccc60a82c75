"""Plugin discovery and loading: sqAPI's folder layout, failures pinned on their plugin."""

from __future__ import annotations

import json
from pathlib import Path

from sqapi.core.outcome import Delivery

NOOP = "def execute(config, database, message, metadata, data):\n    return None\n"

# A plugin written exactly as sqAPI plugins are (cf. sqAPI's "sizes"): module-level script paths,
# database.execute_script with %(name)s parameters, a blueprint importing sqapi.api.responding and flask_cors.
SQAPI_STYLE = {
    "__init__.py": """
        import io
        import logging
        import os
        import uuid

        SQL_SCRIPT_DIR = '{}/scripts'.format(os.path.dirname(__file__))
        INSERT_ITEM = 'insert_item.sql'

        log = logging.getLogger(__name__)


        def execute(config, database, message, metadata: dict, data: io.BufferedReader):
            data_size = data.seek(0, 2)
            out = {
                'id': str(uuid.uuid4()),
                'uuid_ref': message.uuid_ref,
                'meta_location': message.meta_location,
                'data_location': message.data_location,
                'metadata_size': len(metadata),
                'data_size': data_size,
            }
            log.info('Metadata count: {}, payload size: {}'.format(len(metadata), data_size))
            script = os.path.join(SQL_SCRIPT_DIR, INSERT_ITEM)
            database.execute_script(script, **out)
        """,
    "config.yml": """
        msg_broker:
          supported_mime:
            - 'text/plain'

        database:
          init: 'scripts/init.sql'

        api:
          blueprints_directory: 'blueprints'
        """,
    "scripts/init.sql": """
        CREATE TABLE IF NOT EXISTS items (
            id            VARCHAR(36) PRIMARY KEY,
            uuid_ref      VARCHAR(36) NOT NULL,
            meta_location VARCHAR(256),
            data_location VARCHAR(256) NOT NULL,
            metadata_size INT,
            data_size     INT
        );
        """,
    "scripts/insert_item.sql": """
        INSERT INTO items (id, uuid_ref, meta_location, data_location, metadata_size, data_size)
        VALUES (%(id)s, %(uuid_ref)s, %(meta_location)s, %(data_location)s, %(metadata_size)s, %(data_size)s);
        """,
    "scripts/select_by_uuid.sql": "SELECT * FROM items WHERE uuid_ref = %(uuid_ref)s;\n",
    "blueprints/items.py": """
        import logging
        import os

        from flask import Blueprint, current_app
        from flask_cors import cross_origin

        from sqapi.api import responding

        log = logging.getLogger(__name__)
        bp = Blueprint(__name__, __name__, url_prefix='/items')


        @bp.route('/uuid/<uuid>', methods=['GET'])
        @cross_origin()
        def get_item_with_uuid(uuid):
            db = current_app.database.get('legacy')
            script = os.path.join(current_app.config.get('legacy').plugin.get('directory'), 'scripts',
                                  'select_by_uuid.sql')
            items = db.execute_script(script, uuid_ref=uuid)
            return responding.ok(items) if items else responding.no_content(items)
        """,
}


def load_sqapi_style_plugin(write_plugin) -> Path:
    files = dict(SQAPI_STYLE)
    source = files.pop("__init__.py")
    return write_plugin("legacy", source, files=files)


def test_a_plugin_written_in_sqapi_style_loads_unmodified_and_runs(make_app, write_plugin, write_data) -> None:
    load_sqapi_style_plugin(write_plugin)
    app = make_app({"active_plugins": ["legacy"]})
    plugin = app.plugins.plugins["legacy"]
    assert plugin.state == "active", plugin.reason
    assert plugin.mime_types == ["text/plain"]
    assert [bp.url_prefix for bp in plugin.blueprints] == ["/items"] and plugin.blueprint_errors == []
    outcome = app.process(json.dumps({"uuid_ref": "u1", "data_location": write_data("a.txt", "12345"),
                                      "metadata": {"a": 1, "b": 2}}), Delivery("d"))
    assert outcome.status == "DONE"
    rows = plugin.database.execute_query("SELECT uuid_ref, metadata_size, data_size FROM items")
    assert rows == [{"uuid_ref": "u1", "metadata_size": 2, "data_size": 5}]

    import flask
    web = flask.Flask("t")
    web.config["legacy"] = plugin.config
    web.database = {"legacy": plugin.database}  # type: ignore[attr-defined]
    for bp in plugin.blueprints:
        web.register_blueprint(bp)
    answer = web.test_client().get("/items/uuid/u1")
    assert answer.status_code == 200 and answer.get_json()[0]["data_size"] == 5


def test_a_broken_plugin_is_reported_with_its_reason_while_the_others_load(make_app, write_plugin) -> None:
    write_plugin("good", NOOP)
    write_plugin("broken_import", "import module_that_does_not_exist\n" + NOOP)
    write_plugin("wrong_signature", "def execute(message):\n    pass\n")
    write_plugin("no_execute", "x = 1\n")
    write_plugin("missing_init", NOOP, config={"database": {"init": "scripts/init.sql"}})
    write_plugin("bad_timeout", NOOP, config={"plugin": {"timeout": "soon"}})
    write_plugin("raises_at_import", "raise RuntimeError('cannot start')\n")
    app = make_app()
    plugins = app.plugins.plugins
    assert plugins["good"].state == "active"
    assert "good" in app.plugins.order
    expected = {
        "broken_import": "ModuleNotFoundError: No module named 'module_that_does_not_exist'",
        "wrong_signature": "cannot be called as execute(config, database, message, metadata, data)",
        "no_execute": "has no function execute",
        "missing_init": "init script 'scripts/init.sql' not found",
        "bad_timeout": "plugin.timeout must be a number of seconds",
        "raises_at_import": "RuntimeError: cannot start (at __init__.py:1)",
    }
    for name, reason in expected.items():
        assert plugins[name].state == "failed", name
        assert reason in plugins[name].reason, (name, plugins[name].reason)
        assert f"plugin '{name}'" in plugins[name].reason
        assert name not in app.plugins.order


def test_a_plugin_init_script_runs_against_the_plugins_database(make_app, write_plugin) -> None:
    write_plugin("tabled", NOOP, init_sql="CREATE TABLE IF NOT EXISTS tabled_rows (x INTEGER);")
    app = make_app({"active_plugins": ["tabled"]})
    database = app.plugins.plugins["tabled"].database
    assert database.execute_query("SELECT COUNT(*) AS n FROM tabled_rows") == [{"n": 0}]


def test_active_plugins_and_plugin_env_select_which_plugins_load(make_app, write_plugin, monkeypatch) -> None:
    write_plugin("one", NOOP)
    write_plugin("two", NOOP)
    app = make_app({"active_plugins": ["two"]})
    states = {n: (p.state, p.reason) for n, p in app.plugins.plugins.items()}
    assert states["two"] == ("active", None)
    assert states["one"] == ("unloaded", "not in active_plugins")
    monkeypatch.setenv("PLUGIN", "one")
    app = make_app({"active_plugins": ["two"]})
    assert app.plugins.order == ["one"]
    assert app.plugins.plugins["two"].reason == "PLUGIN selects another plugin"


def test_plugins_are_found_in_plugin_dirs_and_sqapi_plugin_dirs(make_app, workdir, monkeypatch) -> None:
    for folder, name in (("extra_a", "from_config"), ("extra_b", "from_env")):
        (workdir / folder / name).mkdir(parents=True)
        (workdir / folder / name / "__init__.py").write_text(NOOP)
    monkeypatch.setenv("SQAPI_PLUGIN_DIRS", str(workdir / "extra_b"))
    app = make_app({"plugin_dirs": [str(workdir / "extra_a")]})
    assert {"from_config", "from_env", "sizes"} <= set(app.plugins.order)


def test_a_plugin_that_needs_configuration_stays_unloaded_and_says_why(make_app, write_plugin) -> None:
    write_plugin("needs_url", "from sqapi.errors import PluginNotConfigured\n"
                              "def check(config):\n"
                              "    if not config.custom.get('url'):\n"
                              "        raise PluginNotConfigured('set custom.url to enable it')\n" + NOOP)
    app = make_app({"active_plugins": None})
    plugin = app.plugins.plugins["needs_url"]
    assert (plugin.state, plugin.reason) == ("unloaded", "not configured: set custom.url to enable it")
    app = make_app({"custom": {"url": "http://x"}})
    assert app.plugins.plugins["needs_url"].state == "active"


def test_a_cycle_in_after_fails_the_plugins_in_it(make_app, write_plugin) -> None:
    write_plugin("p", NOOP, config={"plugin": {"after": ["q"]}})
    write_plugin("q", NOOP, config={"plugin": {"after": ["p"]}})
    write_plugin("r", NOOP, config={"plugin": {"after": ["missing_is_ignored"]}})
    app = make_app({"active_plugins": ["p", "q", "r"]})
    assert app.plugins.order == ["r"]
    assert "cycle" in app.plugins.plugins["p"].reason and "cycle" in app.plugins.plugins["q"].reason


def test_a_blueprint_that_fails_to_import_is_recorded_and_the_plugin_still_runs(make_app, write_plugin) -> None:
    write_plugin("webby", NOOP, files={
        "blueprints/ok.py": "from flask import Blueprint\nbp = Blueprint('ok', __name__)\n",
        "blueprints/bad.py": "import nope_not_here\n",
        "blueprints/nobp.py": "x = 1\n"})
    plugin = make_app({"active_plugins": ["webby"]}).plugins.plugins["webby"]
    assert plugin.state == "active" and [bp.name for bp in plugin.blueprints] == ["ok"]
    assert len(plugin.blueprint_errors) == 2
    assert any("bad.py" in e and "nope_not_here" in e for e in plugin.blueprint_errors)
    assert any("nobp.py" in e and "bp = flask.Blueprint" in e for e in plugin.blueprint_errors)


def test_the_plugin_config_is_merged_over_the_main_config_for_that_plugin_only(make_app, write_plugin) -> None:
    write_plugin("mine", NOOP, config={"custom": {"colour": "red", "nested": {"b": 2}}})
    write_plugin("other", NOOP)
    app = make_app({"custom": {"colour": "blue", "nested": {"a": 1}}})
    mine, other = app.plugins.plugins["mine"].config, app.plugins.plugins["other"].config
    assert mine.custom == {"colour": "red", "nested": {"a": 1, "b": 2}}
    assert other.custom == {"colour": "blue", "nested": {"a": 1}}
    assert mine.plugin["name"] == "mine" and mine.plugin["directory"].endswith("plugins/mine")


def test_the_shipped_sizes_plugin_records_a_row_per_message(make_app, write_data) -> None:
    app = make_app({"active_plugins": ["sizes"]})
    location = write_data("x.bin", b"0123456789")
    app.process(json.dumps({"uuid_ref": "s1", "data_location": location, "metadata": {"a": 1}}), Delivery("d"))
    app.process(json.dumps({"uuid_ref": "s1", "data_location": location, "metadata": {"a": 1}}), Delivery("d"))
    rows = app.plugins.plugins["sizes"].database.execute_query("SELECT uuid_ref, metadata_size, data_size FROM sizes")
    assert rows == [{"uuid_ref": "s1", "metadata_size": 1, "data_size": 10}]


def test_sqapi_testing_runs_a_plugin_as_a_plain_function(tmp_path) -> None:
    from sqapi.testing import run_plugin
    run = run_plugin(Path(__file__).parents[1] / "plugins" / "sizes", data=b"abc", metadata={"k": 1, "j": 2},
                     tmp_path=tmp_path)
    assert run.result == {"metadata_size": 2, "data_size": 3}
    assert run.database.execute_query("SELECT data_size FROM sizes") == [{"data_size": 3}]


def test_a_plugin_installed_as_a_package_is_found_through_its_entry_point(make_app, workdir, monkeypatch) -> None:
    site = workdir / "site"
    dist = site / "sqapi_wordy-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sqapi-wordy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sqapi.plugins]\nwordy = wordy_plugin\n")
    (site / "wordy_plugin").mkdir()
    (site / "wordy_plugin" / "__init__.py").write_text(
        "def execute(config, database, message, metadata, data):\n    return {'words': len(data.read().split())}\n")
    monkeypatch.syspath_prepend(str(site))
    app = make_app({"active_plugins": ["wordy"]})
    assert app.plugins.order == ["wordy"]
    location = workdir / "data" / "w.txt"
    location.write_text("three little words")
    app.process(json.dumps({"uuid_ref": "w", "data_location": "w.txt"}), Delivery("d"))
    assert json.loads(app.database.get_plugin_rows("w")[0]["result"]) == {"words": 3}


def test_a_mistyped_plugin_name_stops_startup_naming_the_plugins_available(make_app, write_plugin,
                                                                            monkeypatch) -> None:
    import pytest

    from sqapi.errors import ConfigError
    write_plugin("indexer", NOOP)
    with pytest.raises(ConfigError) as info:
        make_app({"active_plugins": ["indexr"]})
    assert info.value.key == "active_plugins" and "no plugin named 'indexr'" in str(info.value)
    assert "did you mean 'indexer'?" in str(info.value)
    monkeypatch.setenv("PLUGIN", "sizez")
    with pytest.raises(ConfigError, match=r"\$PLUGIN: no plugin named 'sizez'. Fix: did you mean 'sizes'"):
        make_app()


def test_a_requested_plugin_that_failed_to_load_stops_the_loader_but_not_the_listing(workdir, write_plugin,
                                                                                     write_data) -> None:
    import subprocess
    import sys
    write_plugin("wanted", "import not_installed_anywhere\n" + NOOP)
    (workdir / "cfg.yml").write_text("active_plugins: [sizes, wanted]\n")
    (workdir / "m.json").write_text(json.dumps({"uuid_ref": "m", "data_location": write_data("a.txt", "x")}))
    sqapi = str(Path(sys.executable).parent / "sqapi")
    processed = subprocess.run([sqapi, "-c", "cfg.yml", "process", "m.json"], cwd=workdir, capture_output=True,
                               text=True, timeout=60)
    assert processed.returncode == 1 and processed.stdout == ""
    assert "plugin failed to load, so nothing is processed (wanted: " in processed.stderr
    listed = subprocess.run([sqapi, "-c", "cfg.yml", "plugins"], cwd=workdir, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and "not_installed_anywhere" in listed.stdout


def test_sqapi_testing_serves_a_plugins_blueprint_on_its_own_database(tmp_path) -> None:
    from sqapi.testing import blueprint_client, run_plugin

    run = run_plugin(Path(__file__).parents[1] / "plugins" / "sizes", data=b"abcd", tmp_path=tmp_path, uuid="s-1")
    assert run.database.describe().startswith("the embedded PostgreSQL in ")
    client = blueprint_client(run.plugin)
    assert client.get("/sizes/s-1").get_json()["data_size"] == 4
    assert client.get("/sizes/larger/3").get_json() == [{"uuid_ref": "s-1", "data_location": str(tmp_path / "data.bin"),
                                                         "data_size": 4}]
    assert client.get("/sizes/unknown").status_code == 404


def test_the_built_in_plugins_are_found_through_sqapis_own_entry_points(workdir, monkeypatch) -> None:
    from importlib import metadata

    from sqapi.core import plugins as plugin_module
    from sqapi.resources import BUILTIN_PLUGINS

    folders = sorted(p.name for p in BUILTIN_PLUGINS.iterdir() if (p / "__init__.py").exists())
    registered = {ep.name: ep.value for ep in metadata.distribution("sqapi").entry_points
                  if ep.group == "sqapi.plugins"}
    assert sorted(registered) == folders  # pyproject.toml names every built-in folder, and nothing else
    assert all(value == f"sqapi.builtin_plugins.{name}" for name, value in registered.items())
    found = plugin_module.discover({}, env={})
    assert {name for name, p in found.items() if p.builtin} == set(folders)
    assert all(found[name].directory == (BUILTIN_PLUGINS / name).resolve() for name in folders)
    # found through the entry points, not by scanning sqapi's folder: without them there are none
    monkeypatch.setattr(plugin_module.importlib_metadata, "entry_points", lambda group: [])
    assert plugin_module.discover({}, env={}) == {}


def test_every_package_of_sqapi_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages by hand (the built-ins are mapped from plugins/): none may be forgotten."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "sqapi").rglob("__init__.py")}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"

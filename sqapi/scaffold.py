"""``sqapi new-plugin NAME``: a working plugin folder with a test, ready to edit."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_INIT = '''"""{name}: describe what this plugin does with each message."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).parent / "scripts"


def execute(config: Any, database: Any, message: Any, metadata: dict[str, Any], data: io.BufferedReader) \\
        -> dict[str, Any]:
    """Called once per message whose type this plugin accepts (see config.yml).

    ``data`` is the object's bytes, ``metadata`` its metadata, ``message.results`` what the
    plugins named in ``plugin.after`` returned.  Raise to fail (retried);
    raise ``sqapi.errors.PermanentError`` to fail without retry.  The dict returned is
    recorded and handed to plugins that run after this one.
    """
    head = data.read(64)
    database.execute_script(str(SCRIPTS / "insert_item.sql"), uuid_ref=message.uuid, first_bytes=len(head))
    return {{"first_bytes": len(head)}}
'''

_CONFIG = """# Merged over the main config for this plugin only.
plugin:
  version: '1'        # recorded with every run (message_plugins.version); raise it when the output changes
  mime_types: []      # e.g. [application/pdf, 'text/*']; empty: every type
  after: []           # plugins whose results this one needs (message.results)
  timeout: 60         # seconds; a call still running then has its worker process killed
  # Calls run in worker processes, one at a time in each (up to concurrency at once); a crash
  # fails only that call.  A plugin whose code is thread-safe may run on the loader's threads:
  # thread_safe: true
  # isolation: thread
  # concurrency: 4    # worker processes at most (default: processing.workers)
  # max_memory: 1GB   # a call that needs more fails with MemoryError
"""

_INIT_SQL = """CREATE TABLE IF NOT EXISTS {name}_items (
    uuid_ref    TEXT PRIMARY KEY,
    first_bytes INTEGER NOT NULL
);
"""

_INSERT_SQL = """INSERT INTO {name}_items (uuid_ref, first_bytes) VALUES (%(uuid_ref)s, %(first_bytes)s)
ON CONFLICT (uuid_ref) DO UPDATE SET first_bytes = excluded.first_bytes;
"""

_BLUEPRINT = '''"""HTTP endpoints of the {name} plugin, mounted by sqapi's API."""

from __future__ import annotations

from flask import Blueprint, current_app

from sqapi.api import responding

bp = Blueprint("{name}", __name__, url_prefix="/{name}")


@bp.route("/<uuid_ref>", methods=["GET"])
def get_item(uuid_ref: str):  # type: ignore[no-untyped-def]
    rows = current_app.database["{name}"].execute_query(
        "SELECT * FROM {name}_items WHERE uuid_ref = %(uuid_ref)s", uuid_ref=uuid_ref)
    return responding.ok(rows[0]) if rows else responding.not_found(uuid_ref)
'''

_TEST = '''from pathlib import Path

from sqapi.testing import blueprint_client, run_plugin

PLUGIN = Path(__file__).resolve().parents[1]


def test_the_plugin_records_the_first_bytes_of_the_data(tmp_path):
    run = run_plugin(PLUGIN, data=b"hello world", metadata={{"k": "v"}}, tmp_path=tmp_path)
    assert run.result == {{"first_bytes": 11}}
    rows = run.database.execute_query("SELECT * FROM {name}_items")
    assert rows == [{{"uuid_ref": run.message.uuid, "first_bytes": 11}}]


def test_its_endpoint_serves_what_it_recorded(tmp_path):
    run = run_plugin(PLUGIN, data=b"hello", tmp_path=tmp_path, uuid="item-1")
    client = blueprint_client(run.plugin)
    assert client.get("/{name}/item-1").get_json() == {{"uuid_ref": "item-1", "first_bytes": 5}}
    assert client.get("/{name}/no-such-item").status_code == 404
'''


def create_plugin(name: str, parent: Path) -> Path:
    """Create ``parent/name`` with a working plugin; refuses bad names and existing folders."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise ValueError(f"'{name}' is not a valid plugin name: use lower-case letters, digits and _")
    folder = parent / name
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    files = {
        "__init__.py": _INIT,
        "config.yml": _CONFIG,
        "scripts/init.sql": _INIT_SQL,
        "scripts/insert_item.sql": _INSERT_SQL,
        "blueprints/api.py": _BLUEPRINT,
        "tests/test_plugin.py": _TEST,
        "README.md": "# {name}\n\nDescribe what the plugin does, its config keys and its endpoints.\n",
    }
    for relative, template in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name), encoding="utf-8")
    return folder

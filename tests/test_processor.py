"""The processor end to end on the embedded default: status rows, idempotency, isolation, retries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sqapi.core.outcome import Action, Delivery

COUNTER = """
import json, os
from pathlib import Path

def execute(config, database, message, metadata, data):
    log = Path(config.custom["log"])
    with log.open("a") as out:
        out.write(json.dumps({"plugin": config.plugin["name"], "uuid": message.uuid}) + "\\n")
    return {"seen": data.read().decode()}
"""

FLAKY = """
from pathlib import Path

def execute(config, database, message, metadata, data):
    marker = Path(config.custom["flaky_marker"])
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError("first attempt fails")
    return {"ok": True}
"""


def runs(workdir: Path) -> list[dict[str, str]]:
    log = workdir / "runs.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def message(uuid: str, location: str, **extra: object) -> bytes:
    return json.dumps({"uuid_ref": uuid, "data_location": location, **extra}).encode()


@pytest.fixture
def counting_app(make_app, write_plugin, workdir):
    write_plugin("alpha", COUNTER)
    write_plugin("beta", COUNTER)

    def make(**overrides):
        config = {"active_plugins": ["alpha", "beta"], "custom": {"log": str(workdir / "runs.jsonl"),
                                                                  "flaky_marker": str(workdir / "flaky")}}
        config.update(overrides)
        return make_app(config)

    return make


def test_a_message_runs_every_plugin_and_records_done(counting_app, write_data, workdir) -> None:
    app = counting_app()
    location = write_data("hello.txt", "hello world\n")
    outcome = app.process(message("u1", location, metadata={"a": 1}), Delivery("d1"))
    assert (outcome.status, outcome.action) == ("DONE", Action.ACK)
    row = app.database.get_message("u1")
    assert row["status"] == "DONE" and row["attempts"] == 1
    assert row["data_type"] == "text/plain"  # guessed from the content
    import hashlib
    assert row["hash_digest"] == hashlib.sha256(b"hello world\n").hexdigest()
    plugins = {r["plugin"]: r for r in app.database.get_plugin_rows("u1")}
    assert set(plugins) == {"alpha", "beta"} and {r["status"] for r in plugins.values()} == {"DONE"}
    assert json.loads(plugins["alpha"]["result"]) == {"seen": "hello world\n"}
    assert plugins["alpha"]["duration_ms"] >= 0


def test_a_redelivered_done_message_runs_no_plugin_again(counting_app, write_data, workdir) -> None:
    app = counting_app()
    location = write_data("a.txt", "a")
    app.process(message("u1", location), Delivery("d1"))
    again = app.process(message("u1", location), Delivery("d2"))
    assert again.status == "DONE" and again.skipped and again.action is Action.ACK
    assert len(runs(workdir)) == 2  # alpha and beta once each
    assert app.database.get_message("u1")["status"] == "DONE"
    assert app.database.get_message("u1")["attempts"] == 2


def test_a_done_message_with_new_data_runs_every_plugin_again(counting_app, write_data, workdir) -> None:
    app = counting_app()
    location = write_data("a.txt", "first")
    app.process(message("u1", location), Delivery("d1"))
    write_data("a.txt", "second")
    outcome = app.process(message("u1", location), Delivery("d2"))
    assert outcome.status == "DONE" and not outcome.skipped
    assert len(runs(workdir)) == 4


def test_a_partly_done_message_reruns_only_the_plugins_that_did_not_finish(counting_app, write_plugin,
                                                                          write_data, workdir) -> None:
    write_plugin("flaky", FLAKY)
    app = counting_app(active_plugins=["alpha", "flaky"])
    location = write_data("a.txt", "x")
    first = app.process(message("u1", location), Delivery("d1", attempt=1))
    assert (first.status, first.action, first.plugin) == ("RETRY", Action.RETRY, "flaky")
    assert "first attempt fails" in first.reason
    rows = {r["plugin"]: r["status"] for r in app.database.get_plugin_rows("u1")}
    assert rows == {"alpha": "DONE", "flaky": "FAILED"}
    second = app.process(message("u1", location), Delivery("d1", attempt=2))
    assert second.status == "DONE"
    assert [r["plugin"] for r in runs(workdir)] == ["alpha"]  # alpha ran once, not again
    rows = {r["plugin"]: (r["status"], r["attempts"]) for r in app.database.get_plugin_rows("u1")}
    assert rows == {"alpha": ("DONE", 1), "flaky": ("DONE", 2)}


def test_a_crashing_plugin_is_recorded_and_the_others_still_run(make_app, write_plugin, write_data,
                                                              workdir) -> None:
    write_plugin("crash", "def execute(config, database, message, metadata, data):\n    raise KeyError('boom')\n")
    write_plugin("alpha", COUNTER)
    app = make_app({"active_plugins": ["crash", "alpha"], "custom": {"log": str(workdir / "runs.jsonl")},
                    "msg_broker": {"retry": {"max_attempts": 2, "initial_delay": 0.5}}})
    location = write_data("a.txt", "x")
    first = app.process(message("u1", location), Delivery("d", attempt=1))
    assert (first.status, first.action, first.delay) == ("RETRY", Action.RETRY, 0.5)
    assert app.database.get_message("u1")["status"] == "RETRY"
    last = app.process(message("u1", location), Delivery("d", attempt=2))
    assert (last.status, last.action, last.plugin) == ("FAILED", Action.DEAD_LETTER, "crash")
    assert "gave up after 2 attempts" in last.reason and "KeyError: 'boom'" in last.reason
    row = app.database.get_message("u1")
    assert row["status"] == "FAILED" and "KeyError" in row["info"]
    plugins = {r["plugin"]: r for r in app.database.get_plugin_rows("u1")}
    assert plugins["alpha"]["status"] == "DONE" and plugins["crash"]["status"] == "FAILED"
    assert "boom" in plugins["crash"]["info"]
    assert len(runs(workdir)) == 1


def test_a_permanent_plugin_error_fails_at_once_without_retry(make_app, write_plugin, write_data) -> None:
    write_plugin("strict", "from sqapi.errors import PermanentError\n"
                           "def execute(config, database, message, metadata, data):\n"
                           "    raise PermanentError('not a document I can read')\n")
    app = make_app({"active_plugins": ["strict"]})
    outcome = app.process(message("u1", write_data("a.txt", "x")), Delivery("d", attempt=1))
    assert (outcome.status, outcome.action) == ("FAILED", Action.DEAD_LETTER)
    assert outcome.reason == "plugin strict: not a document I can read"


def test_a_plugin_past_its_timeout_is_recorded_and_the_others_finish(make_app, write_plugin, write_data,
                                                                    workdir) -> None:
    write_plugin("slow", "import time\ndef execute(config, database, message, metadata, data):\n"
                         "    time.sleep(3)\n", config={"plugin": {"timeout": 0.3}})
    write_plugin("alpha", COUNTER)
    app = make_app({"active_plugins": ["slow", "alpha"], "custom": {"log": str(workdir / "runs.jsonl")}})
    outcome = app.process(message("u1", write_data("a.txt", "x")), Delivery("d"))
    assert outcome.status == "RETRY" and outcome.plugin == "slow"
    plugins = {r["plugin"]: r for r in app.database.get_plugin_rows("u1")}
    assert plugins["slow"]["status"] == "FAILED" and "timed out after 0.3s" in plugins["slow"]["info"]
    assert plugins["alpha"]["status"] == "DONE"


def test_plugins_run_in_after_order_and_get_the_results_they_run_after(make_app, write_plugin,
                                                                       write_data) -> None:
    write_plugin("first", "def execute(config, database, message, metadata, data):\n"
                          "    return {'words': len(data.read().split())}\n")
    write_plugin("aaa_last", "def execute(config, database, message, metadata, data):\n"
                             "    return {'got': message.results, 'before': sorted(message.plugin_statuses)}\n",
                 config={"plugin": {"after": ["first", "middle"]}})
    write_plugin("middle", "def execute(config, database, message, metadata, data):\n"
                           "    return {'saw_first': message.results.get('first')}\n",
                 config={"plugin": {"after": ["first"]}})
    app = make_app({"active_plugins": ["aaa_last", "first", "middle"]})
    assert app.plugins.order == ["first", "middle", "aaa_last"]
    app.process(message("u1", write_data("a.txt", "one two three")), Delivery("d"))
    results = {r["plugin"]: json.loads(r["result"]) for r in app.database.get_plugin_rows("u1")}
    assert results["middle"] == {"saw_first": {"words": 3}}
    assert results["aaa_last"] == {"got": {"first": {"words": 3}, "middle": {"saw_first": {"words": 3}}},
                                   "before": ["first", "middle"]}


def test_each_plugin_gets_private_copies_of_message_and_metadata(make_app, write_plugin, write_data) -> None:
    write_plugin("a_mutator", "def execute(config, database, message, metadata, data):\n"
                              "    metadata['x'] = 'changed'; message.uuid = 'changed'; data.read()\n")
    write_plugin("b_reader", "def execute(config, database, message, metadata, data):\n"
                             "    return {'x': metadata['x'], 'uuid': message.uuid, 'head': data.read(3).decode()}\n")
    app = make_app({"active_plugins": ["a_mutator", "b_reader"]})
    app.process(message("u1", write_data("a.txt", "abcdef"), metadata={"x": "original"}), Delivery("d"))
    rows = {r["plugin"]: r for r in app.database.get_plugin_rows("u1")}
    assert json.loads(rows["b_reader"]["result"]) == {"x": "original", "uuid": "u1", "head": "abc"}


def test_plugins_only_get_the_mime_types_they_accept(make_app, write_plugin, write_data) -> None:
    write_plugin("pdf_only", "def execute(config, database, message, metadata, data):\n    return {}\n",
                 config={"plugin": {"mime_types": ["application/pdf"]}})
    write_plugin("texts", "def execute(config, database, message, metadata, data):\n    return {}\n",
                 config={"plugin": {"mime_types": ["text/*"]}})
    app = make_app({"active_plugins": ["pdf_only", "texts"]})
    app.process(message("u1", write_data("a.txt", "plain words")), Delivery("d"))
    app.process(message("u2", write_data("b.bin", b"%PDF-1.4 whatever"), data_type="application/pdf"),
                Delivery("d"))
    assert [r["plugin"] for r in app.database.get_plugin_rows("u1")] == ["texts"]
    assert [r["plugin"] for r in app.database.get_plugin_rows("u2")] == ["pdf_only"]


def test_a_missing_data_object_is_retried_and_picked_up_when_it_appears(counting_app, write_data) -> None:
    app = counting_app()
    first = app.process(message("u1", "later.txt"), Delivery("d", attempt=1))
    assert (first.status, first.action) == ("RETRY", Action.RETRY)
    assert "does not exist" in first.reason
    assert "attempt 1 of 5" in app.database.get_message("u1")["info"]
    write_data("later.txt", "here now")
    assert app.process(message("u1", "later.txt"), Delivery("d", attempt=2)).status == "DONE"


def test_metadata_comes_from_the_message_or_from_the_meta_store(make_app, write_plugin, write_data) -> None:
    write_plugin("echo", "def execute(config, database, message, metadata, data):\n    return metadata\n")
    app = make_app({"active_plugins": ["echo"]})
    location = write_data("a.txt", "x")
    write_data("meta/a.json", '{"from": "file"}')
    app.process(message("u1", location, metadata={"from": "message"}, meta_location="meta/a.json"),
                Delivery("d"))
    app.process(message("u2", location, meta_location="meta/a.json"), Delivery("d"))
    missing = app.process(message("u3", location, meta_location="meta/none.json"), Delivery("d"))
    result = {u: json.loads(app.database.get_plugin_rows(u)[0]["result"]) for u in ("u1", "u2")}
    assert result == {"u1": {"from": "message"}, "u2": {"from": "file"}}
    assert missing.status == "RETRY" and missing.reason.startswith("metadata:")


def test_a_malformed_message_is_dead_lettered_and_recorded_when_its_uuid_is_known(counting_app) -> None:
    app = counting_app()
    unknown = app.process(b"{broken", Delivery("spool/x.json"))
    assert (unknown.uuid, unknown.status, unknown.action) == (None, "FAILED", Action.DEAD_LETTER)
    assert "spool/x.json" in unknown.reason and "not valid JSON" in unknown.reason
    known = app.process(b'{"uuid_ref": "u9"}', Delivery("d"))
    assert (known.status, known.action) == ("FAILED", Action.DEAD_LETTER)
    row = app.database.get_message("u9")
    assert row["status"] == "FAILED" and row["info"] == "malformed message: missing required field: data_location"


def test_a_malformed_copy_leaves_the_row_of_an_attempt_in_progress_alone_and_does_not_wait(
        counting_app, write_data) -> None:
    """Its read-then-write could read QUERYING, then write FAILED over the valid copy's DONE; waiting for the
    claim would hold up a whole batch.  So: dead-lettered at once, the row left to the attempt in progress."""
    import threading

    app = counting_app()
    location = write_data("a.txt", "x")
    valid = app.processor.parser.parse(message("u1", location), "valid")
    holding, finish = threading.Event(), threading.Event()

    def valid_attempt() -> None:  # another worker's attempt at the valid copy, holding the claim
        with app.database.claim("u1"):
            app.database.record_attempt(valid, "QUERYING")
            holding.set()
            finish.wait(30)
            app.database.update_message(valid, "DONE")  # the valid copy finishes

    worker = threading.Thread(target=valid_attempt)
    worker.start()
    assert holding.wait(30)
    bad = app.process(b'{"uuid_ref": "u1"}', Delivery("bad"))  # returns: never waits for the claim
    assert (bad.status, bad.action) == ("FAILED", Action.DEAD_LETTER)
    row = app.database.get_message("u1")
    assert (row["status"], row["attempts"]) == ("QUERYING", 1)   # untouched
    finish.set()
    worker.join(30)
    assert app.database.get_message("u1")["status"] == "DONE"
    again = app.process(b'{"uuid_ref": "u1"}', Delivery("bad-again"))  # no attempt in progress: recorded
    assert again.status == "FAILED" and app.database.get_message("u1")["status"] == "DONE"  # DONE stays DONE
    assert app.database.get_message("u1")["attempts"] == 2


def test_a_reference_outside_base_dir_fails_without_retry(counting_app) -> None:
    outcome = counting_app().process(message("u1", "../../etc/passwd"), Delivery("d", attempt=1))
    assert (outcome.status, outcome.action) == ("FAILED", Action.DEAD_LETTER)
    assert "outside base_dir" in outcome.reason


def test_a_status_database_failure_redelivers_instead_of_acknowledging(counting_app, write_data) -> None:
    app = counting_app()
    location = write_data("a.txt", "x")
    from sqapi.errors import ConnectorError

    def broken(*args, **kwargs):
        raise ConnectorError("database is gone")

    app.database.record_attempt = broken
    outcome = app.process(message("u1", location), Delivery("d"))
    assert outcome.action is Action.RETRY and outcome.reason == "status database: database is gone"


def test_remote_data_is_streamed_to_a_temp_file_that_is_removed_afterwards(make_app, write_plugin, workdir) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
            body = b"remote bytes"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    temp = workdir / "tmp"
    temp.mkdir()
    write_plugin("reader", "def execute(config, database, message, metadata, data):\n"
                           "    return {'data': data.read().decode(), 'path_exists': True}\n")
    try:
        app = make_app({"active_plugins": ["reader"],
                        "data_store": {"type": "http", "allowed_hosts": [f"127.0.0.1:{server.server_address[1]}"],
                                       "temp_dir": str(temp),
                                       "base_url": f"http://127.0.0.1:{server.server_address[1]}/"}})
        assert app.process(message("h1", "object/1"), Delivery("d")).status == "DONE"
    finally:
        server.shutdown()
    assert json.loads(app.database.get_plugin_rows("h1")[0]["result"])["data"] == "remote bytes"
    assert list(temp.iterdir()) == []


def test_a_thread_isolated_plugin_past_its_timeout_is_abandoned_and_counted_until_it_returns(make_app, write_plugin,
                                                                            write_data) -> None:
    write_plugin("stuck", "import threading\nRELEASE = threading.Event()\n"
                          "def execute(config, database, message, metadata, data):\n    RELEASE.wait(30)\n",
                 config={"plugin": {"timeout": 0.2, "thread_safe": True, "isolation": "thread"}})
    app = make_app({"active_plugins": ["stuck"]})
    outcome = app.process(message("u1", write_data("a.txt", "x")), Delivery("d"))
    assert outcome.status == "RETRY" and "timed out" in outcome.reason
    assert app.processor.overdue == {"stuck": 1}
    app.plugins.plugins["stuck"].module.RELEASE.set()
    import time
    deadline = time.monotonic() + 5
    while app.processor.overdue and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.processor.overdue == {}


def test_sqapi_process_exits_promptly_even_when_a_plugin_never_returns(workdir, write_plugin, write_data) -> None:
    import subprocess
    import sys
    write_plugin("forever", "import time\ndef execute(config, database, message, metadata, data):\n"
                            "    time.sleep(3600)\n", config={"plugin": {"timeout": 0.5}})
    location = write_data("a.txt", "x")
    (workdir / "m.json").write_text(json.dumps({"uuid_ref": "f1", "data_location": location}))
    sqapi = str(Path(sys.executable).parent / "sqapi")
    result = subprocess.run([sqapi, "process", "m.json"], cwd=workdir, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout.strip() == ("f1 FAILED gave up after 1 attempt: plugin forever: timed out after 0.5s (its "
                                     "worker process was killed)")


def test_a_result_too_large_to_keep_is_recomputed_for_a_plugin_that_needs_it(make_app, write_plugin,
                                                                            write_data, workdir) -> None:
    write_plugin("big", "from pathlib import Path\n"
                        "def execute(config, database, message, metadata, data):\n"
                        "    with open(config.custom['log'], 'a') as out: out.write('big\\n')\n"
                        "    return {'text': 'x' * 5000}\n")
    write_plugin("user", FLAKY.replace("return {\"ok\": True}", "return {'len': len(message.results['big']['text'])}"),
                 config={"plugin": {"after": ["big"]}})
    app = make_app({"active_plugins": ["big", "user"], "processing": {"max_result_bytes": 1000},
                    "custom": {"log": str(workdir / "big.log"), "flaky_marker": str(workdir / "flaky")}})
    location = write_data("a.txt", "x")
    assert app.process(message("u1", location), Delivery("d", attempt=1)).status == "RETRY"
    stored = app.database.get_plugin_rows("u1")[0]
    assert stored["plugin"] == "big" and "over processing.max_result_bytes" in stored["result"]
    assert app.process(message("u1", location), Delivery("d", attempt=2)).status == "DONE"
    assert (workdir / "big.log").read_text() == "big\nbig\n"  # run again: its result was not kept
    rows = {r["plugin"]: r for r in app.database.get_plugin_rows("u1")}
    assert json.loads(rows["user"]["result"]) == {"len": 5000}


def test_a_redelivered_done_message_whose_data_is_gone_stays_done(counting_app, write_data, workdir) -> None:
    app = counting_app()
    location = write_data("a.txt", "x")
    app.process(message("u1", location), Delivery("d"))
    (workdir / "data" / "a.txt").unlink()
    again = app.process(message("u1", location), Delivery("d2"))
    assert (again.status, again.action, again.skipped) == ("DONE", Action.ACK, True)
    assert "data now unavailable" in again.reason
    assert app.database.get_message("u1")["status"] == "DONE"


def test_a_delete_message_runs_only_plugins_that_handle_deletion(make_app, write_plugin, write_data) -> None:
    write_plugin("remover", "def execute(config, database, message, metadata, data):\n"
                            "    return {'action': message.action, 'bytes': len(data.read())}\n",
                 config={"plugin": {"actions": ["process", "delete"]}})
    write_plugin("processor_only", "def execute(config, database, message, metadata, data):\n    return {}\n")
    app = make_app({"active_plugins": ["remover", "processor_only"]})
    outcome = app.process(message("u1", "never-existed.txt", action="DELETE"), Delivery("d"))
    assert (outcome.status, outcome.reason) == ("DONE", "deleted")
    rows = {r["plugin"]: json.loads(r["result"]) for r in app.database.get_plugin_rows("u1")}
    assert rows == {"remover": {"action": "delete", "bytes": 0}}
    bad = app.process(message("u2", "x.txt", action="shred"), Delivery("d"))
    assert bad.status == "FAILED" and "action must be one of process, delete" in bad.reason


@pytest.mark.parametrize("plugin_timeout, isolation", [(30, "process"), (30, "thread"), (0, "thread")],
                         ids=["worker-process", "plugins-on-a-thread", "plugins-inline"])
def test_a_message_reads_querying_while_its_data_is_fetched_and_processing_while_plugins_run(
        make_app, write_plugin, write_data, workdir, monkeypatch, plugin_timeout, isolation, status_schema,
        embedded_dir) -> None:
    """A plugin that runs a while sees PROCESSING and the data's hash recorded (written after
    SLOW_AFTER seconds while the caller waits, at once when plugins run inline)."""
    from sqapi.connectors.db import _embedded
    from sqapi.core import calls

    monkeypatch.setattr(calls, "SLOW_AFTER", 0.05)
    for name in ("peek_pkg", "peek_pkg.store"):  # a fresh module (its SEEN) for each parameter
        monkeypatch.delitem(sys.modules, name, raising=False)
    (workdir / "peek_pkg").mkdir()
    (workdir / "peek_pkg" / "__init__.py").write_text("")
    (workdir / "peek_pkg" / "store.py").write_text(
        "import psycopg2, os\n"
        "SEEN = []\n"
        "def download_to_disk(config, ref):\n"
        "    with psycopg2.connect(**config['db']) as db, db.cursor() as cursor:\n"
        "        cursor.execute('SELECT status FROM messages')\n"
        "        SEEN.append(cursor.fetchone()[0])\n"
        "    return os.path.join(config['base_dir'], ref)\n")
    monkeypatch.syspath_prepend(str(workdir))
    write_plugin("peek", "import time\ndef execute(config, database, message, metadata, data):\n"
                         "    deadline = time.monotonic() + 10\n"
                         "    while True:\n"
                         "        row = database.execute_query('SELECT status, hash_digest FROM messages')[0]\n"
                         "        if row['status'] != 'QUERYING' or time.monotonic() > deadline:\n"
                         "            return row\n"
                         "        time.sleep(0.01)\n",
                 config={"plugin": {"thread_safe": True, "isolation": isolation}})
    connection = dict(_embedded.Layout(embedded_dir).connection(), options=f"-c search_path={status_schema}")
    app = make_app({"active_plugins": ["peek"], "processing": {"plugin_timeout": plugin_timeout},
                    "data_store": {"type": "peek_pkg.store", "base_dir": str(workdir / "data"), "db": connection}})
    location = write_data("a.txt", "x")
    assert app.process(message("u1", location), Delivery("d")).status == "DONE"
    import peek_pkg.store  # type: ignore[import-not-found]
    assert peek_pkg.store.SEEN == ["QUERYING"]
    seen_by_plugin = json.loads(app.database.get_plugin_rows("u1")[0]["result"])
    assert seen_by_plugin["status"] == "PROCESSING" and seen_by_plugin["hash_digest"] == app.database.get_message(
        "u1")["hash_digest"]


def test_plugin_rows_of_earlier_data_do_not_count_as_done_for_new_data(make_app, write_plugin, write_data) -> None:
    write_plugin("p1", "def execute(config, database, message, metadata, data):\n"
                       "    return {'saw': data.read().decode()}\n")
    write_plugin("p2", "import sys\ndef execute(config, database, message, metadata, data):\n"
                       "    seen = data.read().decode()\n"
                       "    if seen == 'v2' and not getattr(sys.modules[__name__], 'crashed', False):\n"
                       "        sys.modules[__name__].crashed = True\n"
                       "        raise KeyboardInterrupt  # stands in for the process dying mid-plugin\n"
                       "    return {'saw': seen}\n",  # inline on the caller's thread: the "crash" escapes
                 config={"plugin": {"timeout": 0, "thread_safe": True, "isolation": "thread"}})
    app = make_app({"active_plugins": ["p1", "p2"]})
    location = write_data("a.txt", "v1")
    assert app.process(message("u1", location), Delivery("d")).status == "DONE"
    write_data("a.txt", "v2")
    with pytest.raises(KeyboardInterrupt):
        app.process(message("u1", location), Delivery("d2"))
    assert app.process(message("u1", location), Delivery("d3")).status == "DONE"
    rows = {r["plugin"]: json.loads(r["result"]) for r in app.database.get_plugin_rows("u1")}
    assert rows == {"p1": {"saw": "v2"}, "p2": {"saw": "v2"}}


def test_a_plugin_calling_sys_exit_fails_like_any_other(make_app, write_plugin, write_data) -> None:
    write_plugin("quitter", "import sys\ndef execute(config, database, message, metadata, data):\n    sys.exit(3)\n",
                 config={"plugin": {"timeout": 0}})
    app = make_app({"active_plugins": ["quitter"]})
    outcome = app.process(message("u1", write_data("a.txt", "x")), Delivery("d"))
    assert outcome.status == "RETRY" and outcome.plugin == "quitter" and "SystemExit" in outcome.reason


def test_a_nul_character_makes_a_message_malformed(counting_app) -> None:
    outcome = counting_app().process(message("u1", "item\u0000.txt"), Delivery("d"))
    assert (outcome.status, outcome.action) == ("FAILED", Action.DEAD_LETTER)
    assert outcome.reason == "malformed message: body holds a NUL character, which no text column stores"
    assert outcome.uuid == "u1"


def test_an_internal_error_is_dead_lettered_once_its_attempts_are_used(counting_app, write_data) -> None:
    app = counting_app(msg_broker={"retry": {"max_attempts": 2}})

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    app.database.record_attempt = broken
    app.database.record_attempts = broken
    first = app.process(message("u1", write_data("a.txt", "x")), Delivery("d", attempt=1))
    assert first.action is Action.RETRY
    last = app.process(message("u1", "a.txt"), Delivery("d", attempt=2))
    assert last.action is Action.DEAD_LETTER and "gave up after 2 attempts: internal error" in last.reason


def test_a_redelivered_deletion_runs_no_plugin_again(make_app, write_plugin, workdir) -> None:
    write_plugin("remover", "def execute(config, database, message, metadata, data):\n"
                            "    with open(config.custom['log'], 'a') as out: out.write('deleted\\n')\n",
                 config={"plugin": {"actions": ["process", "delete"]}})
    app = make_app({"active_plugins": ["remover"], "custom": {"log": str(workdir / "del.log")}})
    for n in range(3):
        outcome = app.process(message("u1", "gone.txt", action="delete"), Delivery(f"d{n}"))
        assert outcome.status == "DONE"
    assert outcome.skipped and outcome.reason == "already deleted, no plugin run again"
    assert (workdir / "del.log").read_text() == "deleted\n"


FAILING = "def execute(config, database, message, metadata, data):\n    raise RuntimeError('not today')\n"


def test_the_attempts_column_and_the_given_up_text_count_the_same_attempts(make_app, write_plugin,
                                                                              write_data) -> None:
    write_plugin("failing", FAILING)
    app = make_app({"active_plugins": ["failing"], "msg_broker": {"retry": {"max_attempts": 2}}})
    location = write_data("a.txt", "x")
    app.database.record_attempt(app.processor.parser.parse(message("u1", location), "lost"), "QUERYING")
    # the loader died during that attempt; the broker redelivers the same delivery (its header still says 1)
    outcome = app.process(message("u1", location), Delivery("redelivered", attempt=1))
    row = app.database.get_message("u1")
    assert outcome.status == "FAILED" and row["attempts"] == 2
    assert outcome.reason == "gave up after 2 attempts: plugin failing: RuntimeError: not today" == row["info"]


def test_finished_work_whose_data_changed_counts_its_attempts_anew(make_app, write_plugin, write_data) -> None:
    write_plugin("picky", "def execute(config, database, message, metadata, data):\n"
                          "    if data.read() == b'v2':\n        raise RuntimeError('not v2')\n")
    app = make_app({"active_plugins": ["picky"], "msg_broker": {"retry": {"max_attempts": 3}}})
    location = write_data("a.txt", "v1")
    assert app.process(message("u1", location), Delivery("d1")).status == "DONE"
    assert app.process(message("u1", location), Delivery("d2")).reason == "already done, no plugin run again"
    assert app.database.get_message("u1")["attempts"] == 2
    write_data("a.txt", "v2")
    outcome = app.process(message("u1", location), Delivery("d3"))
    row = app.database.get_message("u1")
    assert outcome.status == "RETRY" and row["attempts"] == 1
    assert row["info"] == "attempt 1 of 3 failed, retrying in 1s: plugin picky: RuntimeError: not v2"


def test_a_deletion_of_finished_work_counts_its_own_attempts(make_app, write_plugin, write_data) -> None:
    write_plugin("remover", "def execute(config, database, message, metadata, data):\n"
                            "    if message.action == 'delete':\n        raise RuntimeError('index down')\n",
                 config={"plugin": {"actions": ["process", "delete"]}})
    app = make_app({"active_plugins": ["remover"], "msg_broker": {"retry": {"max_attempts": 3}}})
    location = write_data("a.txt", "x")
    assert app.process(message("u1", location), Delivery("d1")).status == "DONE"
    for n in (2, 3):
        app.process(message("u1", location), Delivery(f"d{n}"))  # redeliveries of finished work count too
    assert app.database.get_message("u1")["attempts"] == 3
    first = app.process(message("u1", location, action="delete"), Delivery("del-1"))
    assert first.status == "RETRY" and app.database.get_message("u1")["attempts"] == 1
    second = app.process(message("u1", location, action="delete"), Delivery("del-2", attempt=2))
    assert second.status == "RETRY" and app.database.get_message("u1")["attempts"] == 2
    assert app.database.get_message("u1")["info"].startswith("attempt 2 of 3 failed")


PROSE = ("The loader reads each message, fetches the data, and hands it to every plugin that takes its type.\n"
         "Plugins record what they find, in tables of their own, and the loader records how each one did.\n"
         "Nothing is lost: a message that fails is retried, and one that cannot succeed is set aside.\n") * 4


def test_prose_is_text_plain_and_a_metadata_mime_field_wins(make_app, write_plugin, write_data) -> None:
    write_plugin("texts", "def execute(config, database, message, metadata, data):\n"
                          "    return {'type': message.type}\n", config={"plugin": {"mime_types": ["text/plain"]}})
    app = make_app({"active_plugins": ["texts"], "msg_broker": {"mime_field": "Content-Type"}})
    prose = app.process(message("p1", write_data("notes.txt", PROSE)), Delivery("d1"))
    assert prose.status == "DONE" and app.database.get_message("p1")["data_type"] == "text/plain"
    assert json.loads(app.database.get_plugin_rows("p1")[0]["result"]) == {"type": "text/plain"}
    labelled = app.process(message("p2", write_data("blob.bin", b"\x00\x01binary"),
                                   metadata={"content-type": "Text/Plain; charset=utf-8"}), Delivery("d2"))
    assert labelled.status == "DONE" and app.database.get_message("p2")["data_type"] == "text/plain"


def test_a_huge_reason_is_stored_as_its_start_its_length_and_a_hash(make_app, write_plugin, write_data) -> None:
    write_plugin("wordy", "def execute(config, database, message, metadata, data):\n"
                          "    raise RuntimeError('x' * 5_000_000)\n")
    app = make_app({"active_plugins": ["wordy"], "msg_broker": {"retry": {"max_attempts": 1}}})
    outcome = app.process(message("u1", write_data("a.txt", "x")), Delivery("d"))
    info = app.database.get_message("u1")["info"]
    assert outcome.status == "FAILED" and len(info) <= 2100 and len(outcome.reason or "") <= 2100
    assert info.startswith("gave up after 1 attempt: plugin wordy: RuntimeError: xxx")
    assert "chars, sha256 " in info


def test_a_five_megabyte_data_location_is_refused_without_being_stored_or_logged_whole(
        counting_app, caplog: pytest.LogCaptureFixture) -> None:
    app = counting_app(msg_broker={"max_body_bytes": 8 << 20})  # let the body in: the field's own bound refuses it
    location = "d" * (5 << 20)
    with caplog.at_level("DEBUG"):
        outcome = app.process(message("big-location", location), Delivery("d"))
    assert (outcome.status, outcome.action) == ("FAILED", Action.DEAD_LETTER)
    assert outcome.reason == "malformed message: data_location is 5242880 characters long, over 4096"
    row = app.database.get_message("big-location")
    assert row["status"] == "FAILED" and row["data_location"] is None and len(row["info"]) < 200
    assert max(len(record.getMessage()) for record in caplog.records) < 2100


def test_a_status_database_outage_does_not_use_up_the_attempts(counting_app, write_data) -> None:
    from sqapi.errors import ConnectorError

    app = counting_app()

    def down(*_args, **_kwargs):
        raise ConnectorError("PostgreSQL at db:5432 unavailable")

    app.database.claim_attempts = app.database.record_attempt = app.database.record_attempts = down
    outcome = app.process(message("u1", write_data("a.txt", "x")), Delivery("d", attempt=3))
    assert (outcome.status, outcome.action) == ("RETRY", Action.RETRY)
    assert outcome.attempt == 3 and outcome.counted is False  # the next delivery is attempt 3 again

"""The dashboard you act from, clicked in headless Chromium: sign in with the token, open a message a plugin
failed on (since fixed), redrive it, confirm, and watch it run again to DONE -- a real ``sqapi loader`` on
RabbitMQ, the status database in PostgreSQL, ``sqapi api`` serving the pages."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.api.conftest import PROJECT, Server, start_server  # noqa: F401 (a fixture, used by name)
from tests.rabbitmq.conftest import Loaders, count, declare, depth, message, publish, wait_until

TOKEN = "browser-t0ken-for-the-dashboard"
ARTIFACTS = PROJECT / "test-artifacts"

# fails on messages whose metadata says "flaky", until a file "fixed" appears in the loader's working directory
FLAKY_PLUGIN = '''
import os


def execute(config, database, message, metadata, data):
    if metadata.get("flaky") and not os.path.exists("fixed"):
        raise RuntimeError("flaky is broken for this one")
    return {"ok": True}
'''


def test_a_person_redrives_a_fixed_failure_from_the_dashboard_and_sees_it_done(
        workdir: Path, broker: dict[str, Any], pg_section: dict[str, Any], write_plugin: Callable[..., Path],
        status_db: Callable[[str], list[dict[str, Any]]], loaders: Loaders,
        start_server: Callable[..., Server], browser: Any) -> None:  # noqa: F811 (the fixture imported above)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    write_plugin("flaky", FLAKY_PLUGIN)
    config = workdir / "sqapi.yml"
    config.write_text(yaml.safe_dump({
        "msg_broker": {**broker, "retry": {"max_attempts": 2, "initial_delay": 0.2, "max_delay": 0.5}},
        "database": pg_section, "active_plugins": ["flaky"], "api": {"token": TOKEN}}), encoding="utf-8")
    declare(broker["vhost"], broker)
    loader = loaders.start(config)
    publish(broker["vhost"], [message(0, flaky=True), message(1), message(2)])
    wait_until(lambda: count(status_db, "SELECT COUNT(*) AS n FROM messages WHERE status IN ('DONE', 'FAILED')")
               == 3, timeout=120, what="the three messages DONE or FAILED")
    assert status_db("SELECT status FROM messages WHERE uuid = 'msg-0'") == [{"status": "FAILED"}]
    wait_until(lambda: depth(broker["vhost"], "sqapi.dead") == 1, what="msg-0 dead-lettered")
    (workdir / "fixed").touch()  # the plugin is fixed; the loader keeps running
    server = start_server("api", "-c", str(config))
    wait = WebDriverWait(browser, 60)

    # signing in: the dashboard sends a browser without a session to the form, then back
    browser.get(server.url + "/")
    wait.until(seen.presence_of_element_located((By.ID, "token")))
    assert "/login" in browser.current_url and TOKEN not in browser.current_url
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(seen.presence_of_element_located((By.ID, "message-rows")))
    assert browser.find_element(By.ID, "count-FAILED").text == "1"
    queues = {row.find_element(By.TAG_NAME, "code").text: row.text.split()
              for row in browser.find_elements(By.CSS_SELECTOR, "#queue-rows tr")}
    assert queues["sqapi.dead"][-2:] == ["1", "0"]  # one dead letter, no consumer
    assert queues["sqapi"][1:3] == ["work", "0"] and int(queues["sqapi"][3]) >= 1  # the loader consumes
    cookie = browser.get_cookie("sqapi_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]

    # the failed message, from its link on the overview
    browser.find_element(By.CSS_SELECTOR, 'a[href="/dashboard/messages/msg-0"]').click()
    status = wait.until(seen.presence_of_element_located((By.ID, "message-status")))
    assert status.text == "FAILED"
    assert "flaky is broken for this one" in browser.find_element(By.ID, "plugin-rows").text

    # redrive it: first what it would do, then confirmed
    browser.find_element(By.ID, "redrive-button").click()
    confirm = wait.until(seen.element_to_be_clickable((By.ID, "confirm-redrive")))
    assert "1 message(s) would run again" in browser.find_element(By.ID, "redrive-count").text
    assert depth(broker["vhost"], "sqapi.dead") == 1  # asking took nothing from the dead letters
    confirm.click()
    wait.until(seen.presence_of_element_located((By.ID, "redrive-notice")))
    browser.execute_script("window.sqapiSamePage = true;")  # gone if the page were loaded again

    # the page follows the message as the loader runs it again
    wait.until(seen.text_to_be_present_in_element((By.ID, "message-status"), "DONE"))
    assert browser.execute_script("return window.sqapiSamePage === true;")  # updated in place, not reloaded
    assert "DONE" in browser.find_element(By.ID, "plugin-rows").text
    timeline = browser.find_element(By.ID, "history-rows").text  # updated by the same poll
    assert timeline.index("flaky is broken") < timeline.index("redrive") < timeline.rindex("DONE")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-message.png"))
    assert status_db("SELECT status FROM messages WHERE uuid = 'msg-0'") == [{"status": "DONE"}]
    assert depth(broker["vhost"], "sqapi.dead") == 0

    loader.signal(signal.SIGTERM)
    assert loader.wait() == 0
    assert server.stop() == 0

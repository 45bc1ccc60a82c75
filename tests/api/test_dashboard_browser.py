"""The dashboard as a person sees it: the real server, headless Chromium, a screenshot to look at.

Chromium comes from Debian (``bash scripts/setup.sh`` installs it when missing; tests/browser.py).
The screenshot lands in ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqapi.app import Sqapi
from sqapi.core.outcome import Delivery

from .conftest import BASE_CONFIG, PROJECT, Server, process_samples

ARTIFACTS = PROJECT / "test-artifacts"


def browse(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def test_the_dashboard_in_a_browser_shows_counts_and_the_failure_reason(
        plugin_folders: None, make_app: Callable[..., Sqapi], write_data: Callable[[str, bytes | str], str],
        start_server: Callable[..., Server], chromium: str, tmp_path: Path) -> None:
    sqapi = make_app(BASE_CONFIG)
    process_samples(sqapi, write_data)
    sqapi.close()  # the server process reads the same SQLite file
    server = start_server("api")

    dom = browse(chromium, tmp_path / "profile-dom", "--dump-dom", server.url + "/")
    assert dom.returncode == 0, dom.stderr
    page = dom.stdout
    assert 'id="count-DONE">2<' in page
    assert 'id="count-FAILED">1<' in page
    assert 'id="count-total">3<' in page
    assert "uuid-bad" in page and "the data starts with 'bad'" in page
    assert "picky" in page and "p95" in page
    assert "a_module_that_does_not_exist" in page  # the broken plugin and why

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    screenshot.unlink(missing_ok=True)
    shot = browse(chromium, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1280,1000",
                  server.url + "/")
    assert shot.returncode == 0, shot.stderr
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    assert server.stop() == 0


def test_the_overview_updates_in_place_and_its_search_narrows_the_list(
        plugin_folders: None, make_app: Callable[..., Sqapi], write_data: Callable[[str, bytes | str], str],
        start_server: Callable[..., Server], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sqapi = make_app(BASE_CONFIG)
    process_samples(sqapi, write_data)
    server = start_server("api")
    browser.get(server.url + "/")
    assert browser.find_element(By.ID, "count-total").text == "3"
    browser.execute_script("window.sqapiSamePage = true;")  # gone if the page were loaded again

    location = write_data("four.txt", "bad again")
    assert sqapi.process({"uuid_ref": "uuid-four", "data_location": location}, Delivery(id="four")).status == "FAILED"
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "count-total").text == "4")
    assert browser.find_element(By.ID, "count-FAILED").text == "2"
    wait.until(lambda b: "uuid-four" in b.find_element(By.ID, "message-rows").text)
    assert browser.execute_script("return window.sqapiSamePage === true;")

    search = browser.find_element(By.ID, "filter-q")
    search.send_keys("four.txt")
    browser.find_element(By.ID, "apply-filters").click()
    wait.until(lambda b: "q=four.txt" in b.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#message-rows a.uuid")
    assert [row.text for row in rows] == ["uuid-four"]
    assert browser.find_element(By.ID, "redrive-selection-button").is_displayed()  # a filtered list can be redriven
    assert server.stop() == 0

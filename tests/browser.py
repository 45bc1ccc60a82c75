"""Headless Chromium for the dashboard's browser tests: Debian's chromium driven through its chromedriver
by selenium (pointed at /usr/bin/chromedriver, so it downloads nothing).

``bash scripts/setup.sh`` installs both when missing; a test that finds them missing fails with the
command that installs them, never skips.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver  (or: bash scripts/install_chromium.sh)"


def chromium_binary() -> str:
    """The chromium binary; fails the test with the install command when it or chromedriver is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None or shutil.which("chromedriver") is None:
        missing = "chromium" if binary is None else "chromedriver"
        pytest.fail(f"{missing} is not installed: install it with `{INSTALL}`", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def chromium() -> str:
    return chromium_binary()


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[object]:
    """A selenium ``webdriver.Chrome`` on headless Chromium with a fresh profile; quit after the test."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()

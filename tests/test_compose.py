"""``docker-compose.yml`` passes the Compose validator that is installed.

Docker Compose v2 (``docker compose``) is not packaged by Debian 12, so the test uses whichever
of v2 or Debian's v1 (``docker-compose``) is present. Neither needs a running Docker engine for
``config``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def compose_command() -> list[str] | None:
    """Return the Compose command line available here, or None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_valid() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    environment = {**os.environ, "LIVERNODE_DB_PASSWORD": "test", "ORTHANC_PASSWORD": "test"}

    result = subprocess.run(
        [*command, "-f", str(REPO_ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
    )

    print(f"{' '.join(command)} config: exit {result.returncode}")
    assert result.returncode == 0, result.stderr
    assert "orthanc" in result.stdout
    assert "node" in result.stdout
    assert "db" in result.stdout

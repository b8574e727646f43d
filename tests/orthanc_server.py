"""A throwaway Orthanc for tests: Debian's ``Orthanc`` binary on loopback ports.

:func:`orthanc_server` copies the project's ``orthanc/`` configuration and routing script
into a temporary folder, adds a generated ``test.json`` (free HTTP and DICOM ports on
127.0.0.1, storage in the folder, a random password, ``DicomModalities`` pointing at the
node) and runs Orthanc as a normal child process until the block ends.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

try:
    from tests.pg import free_port
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from pg import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
ORTHANC_CONFIG_DIR = REPO_ROOT / "orthanc"

#: Files of ``orthanc/`` used by every deployment; ``site.json`` is replaced by ``test.json``.
SHARED_CONFIG_FILES = ("orthanc.json", "autorouting.lua")

ORTHANC_BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_DIR_CANDIDATES = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"

ORTHANC_AE_TITLE = "ORTHANC"
USERNAME = "livernode"
START_TIMEOUT_S = 60


class OrthancUnavailable(RuntimeError):
    """Raised when the Orthanc binary or its DICOMweb plugin is not installed."""


@dataclass
class OrthancServer:
    """A running test Orthanc.

    Attributes
    ----------
    http_port, dicom_port : int
        Loopback ports of the REST API and the DICOM server.
    password : str
        Password of user :data:`USERNAME`, generated for this run.
    config_dir, storage_dir, log_path : Path
        Configuration folder, storage folder and log file.
    process : subprocess.Popen
        The Orthanc process.
    """

    http_port: int
    dicom_port: int
    password: str
    config_dir: Path
    storage_dir: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb service root."""
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        """HTTP basic credentials."""
        return (USERNAME, self.password)

    def get(self, path: str, **options: Any) -> Any:
        """GET ``path`` of the REST API and return the decoded JSON."""
        response = requests.get(self.url + path, auth=self.auth, timeout=30, **options)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        """POST JSON to ``path`` of the REST API and return the decoded JSON."""
        response = requests.post(self.url + path, auth=self.auth, json=body, timeout=120)
        response.raise_for_status()
        return response.json() if response.content else None

    def delete(self, path: str) -> None:
        """DELETE ``path`` of the REST API."""
        requests.delete(self.url + path, auth=self.auth, timeout=30).raise_for_status()

    def log_text(self) -> str:
        """Return Orthanc's log so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def find_orthanc() -> tuple[Path, Path]:
    """Return the Orthanc binary and the folder holding the DICOMweb plugin.

    Raises
    ------
    OrthancUnavailable
        Naming the Debian packages to install.
    """
    binary = next((Path(p) for p in ORTHANC_BINARY_CANDIDATES if Path(p).is_file()), None)
    plugins = next(
        (Path(p) for p in PLUGIN_DIR_CANDIDATES if (Path(p) / DICOMWEB_PLUGIN).is_file()), None
    )
    if binary is None or plugins is None:
        raise OrthancUnavailable(
            "Orthanc or its DICOMweb plugin is not installed: run "
            "'apt-get install -y orthanc orthanc-dicomweb'"
        )
    return binary, plugins


@contextmanager
def orthanc_server(
    *,
    node_ae_title: str = "LIVERNODE",
    node_port: int | None = None,
    stable_age_s: int = 2,
    extra: dict[str, Any] | None = None,
) -> Iterator[OrthancServer]:
    """Run Orthanc with the project configuration on loopback ports.

    Parameters
    ----------
    node_ae_title : str, optional
        AE title of the node in ``DicomModalities``.
    node_port : int, optional
        DICOM port of the node on 127.0.0.1; without it, no modality is configured.
    stable_age_s : int, optional
        Orthanc's ``StableAge``: seconds without a new instance before a study is stable.
    extra : dict, optional
        More settings for ``test.json``.

    Yields
    ------
    OrthancServer

    Raises
    ------
    OrthancUnavailable
        When Orthanc is not installed.
    """
    binary, plugin_dir = find_orthanc()
    base = Path(tempfile.mkdtemp(prefix="livernode-orthanc-"))
    config_dir = base / "config"
    storage_dir = base / "storage"
    config_dir.mkdir()
    storage_dir.mkdir()
    for name in SHARED_CONFIG_FILES:
        shutil.copy(ORTHANC_CONFIG_DIR / name, config_dir / name)

    http_port, dicom_port = free_port(), free_port()
    password = secrets.token_urlsafe(16)
    modalities: dict[str, Any] = {}
    if node_port is not None:
        modalities["livernode"] = {
            "AET": node_ae_title,
            "Host": "127.0.0.1",
            "Port": node_port,
            "AllowEcho": True,
            "AllowFind": True,
            "AllowStore": True,
        }
    test_settings: dict[str, Any] = {
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(storage_dir),
        "Plugins": [str(plugin_dir / DICOMWEB_PLUGIN)],
        "RegisteredUsers": {USERNAME: password},
        "StableAge": stable_age_s,
        "DicomModalities": modalities,
        "HttpTimeout": 60,
        "ConcurrentJobs": 2,
        **(extra or {}),
    }
    (config_dir / "test.json").write_text(json.dumps(test_settings, indent=2), encoding="utf-8")

    log_path = base / "orthanc.log"
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [str(binary), "--verbose", str(config_dir)], stdout=log, stderr=subprocess.STDOUT, cwd=base
    )
    server = OrthancServer(http_port, dicom_port, password, config_dir, storage_dir, log_path, process)
    try:
        _wait_until_up(server)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _wait_until_up(server: OrthancServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited at start:\n{server.log_text()[-4000:]}")
        try:
            server.get("/system")
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s:\n{server.log_text()[-4000:]}")

"""Node settings: defaults, the TOML configuration file and ``LIVERNODE_*`` overrides.

Precedence, lowest to highest: the defaults below, the TOML file named by ``--config`` or
``LIVERNODE_CONFIG``, then the ``LIVERNODE_*`` environment variables listed in
:data:`ENV_OVERRIDES`. Paths left unset are derived from ``data_dir``.

Example TOML file::

    data_dir = "/var/lib/livernode"
    database_url = "postgresql+psycopg2://livernode@127.0.0.1:5432/livernode"

    [scp]
    ae_title = "LIVERNODE"
    host = "0.0.0.0"
    port = 11112
    allowed_calling_ae_titles = ["PACS"]

    [series]
    quiet_time_s = 30

    [destination]
    kind = "dicom"
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.settings import DEFAULT_MIN_ANALYSABLE_COVERAGE_MM

logger = logging.getLogger(__name__)

#: Environment variable naming the TOML configuration file.
CONFIG_ENV_VAR = "LIVERNODE_CONFIG"

#: Environment variable that overrides ``weights_cache_dir``.
WEIGHTS_CACHE_ENV_VAR = "LIVERNODE_WEIGHTS_CACHE"

DEFAULT_DATA_DIR = Path("./livernode-data")

#: DICOM AE titles are at most 16 characters (PS3.5, value representation AE).
AE_TITLE_MAX_LENGTH = 16

MIN_PORT = 1
MAX_PORT = 65535

#: Smallest and largest maximum PDU length that pynetdicom accepts; 0 means unlimited.
MIN_PDU_BYTES = 4096
MAX_PDU_BYTES = 2**32 - 1

DESTINATION_KINDS = ("dicom", "folder", "dicomweb")

#: Values of ``analysis.precision``.
PRECISIONS = ("auto", "bfloat16", "float32")

#: URL schemes a DICOMweb destination may use.
DICOMWEB_URL_SCHEMES = ("http://", "https://")


class ConfigError(ValueError):
    """Raised when a setting is missing, of the wrong type or out of range."""


@dataclass
class AllowedPeer:
    """A calling AE title allowed to associate from one host address.

    Attributes
    ----------
    ae_title : str
        Calling AE title of the peer.
    host : str
        IP address the peer connects from, as the SCP receives it (for example ``"127.0.0.1"``).
    """

    ae_title: str
    host: str


@dataclass
class ScpSettings:
    """The C-STORE SCP that receives CT series.

    Attributes
    ----------
    ae_title : str
        AE title of the node; default ``"LIVERNODE"``.
    host : str
        Address the SCP listens on; default ``"127.0.0.1"`` (loopback only). Use
        ``"0.0.0.0"`` to accept associations from other hosts.
    port : int
        TCP port, 1-65535; default 11112.
    allowed_calling_ae_titles : list of str
        Calling AE titles allowed to associate; empty (default) accepts any calling AE.
    acse_timeout_s : float
        Seconds to wait for association messages; default 30.
    dimse_timeout_s : float
        Seconds to wait for DIMSE messages; default 30.
    network_timeout_s : float
        Seconds an idle association stays open; default 60.
    max_pdu_bytes : int
        Maximum PDU length the node receives, in bytes; 0 means unlimited; default 16382
        (the pynetdicom default).
    allowed_peers : list of AllowedPeer
        Calling AE titles allowed only from one host address each, as TOML tables
        ``{ ae_title = "PACS", host = "10.0.0.5" }``. A peer is accepted when its calling AE
        title is in ``allowed_calling_ae_titles`` or its AE title and address match an
        entry here; when both lists are empty, any peer is accepted.
    """

    ae_title: str = "LIVERNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_ae_titles: list[str] = field(default_factory=list)
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    max_pdu_bytes: int = 16382
    allowed_peers: list[AllowedPeer] = field(default_factory=list)


@dataclass
class SeriesSettings:
    """When a received series counts as complete.

    Attributes
    ----------
    quiet_time_s : float
        Seconds without a new instance after which a series is complete; default 30.
    sweep_interval_s : float
        Seconds between two scheduler sweeps for complete series and due delivery
        retries; default 5.
    """

    quiet_time_s: float = 30.0
    sweep_interval_s: float = 5.0


@dataclass
class SelectionSettings:
    """Rules that select the complete series to analyse; the others are skipped with an audited reason.

    Attributes
    ----------
    min_slices : int
        Minimum number of qualifying CT images in a series; default 3. Short series that
        pass are still reported as not analysable when their coverage is below
        ``analysis.min_coverage_mm``.
    image_type_values : list of str
        Accepted third values of ImageType; default ``["AXIAL"]``. Images whose ImageType
        contains LOCALIZER never qualify.
    orientation_tolerance_deg : float
        Largest angle between the slice normal and the feet-head axis, in degrees;
        default 30 (oblique axial passes, coronal and sagittal reformats do not).
    """

    min_slices: int = 3
    image_type_values: list[str] = field(default_factory=lambda: ["AXIAL"])
    orientation_tolerance_deg: float = 30.0


@dataclass
class DestinationSettings:
    """Destination of the SEG and SR of each analysed series.

    Attributes
    ----------
    kind : str
        ``"dicom"`` (C-STORE to ``ae_title`` at ``host``:``port``), ``"dicomweb"`` (STOW-RS
        to ``url``) or ``"folder"`` (copy into ``path/<StudyInstanceUID>/``); default
        ``"folder"``.
    ae_title : str
        Called AE title of the DICOM destination; required when ``kind`` is ``"dicom"``.
    host : str
        Host name or address of the DICOM destination; required when ``kind`` is ``"dicom"``.
    port : int
        TCP port of the DICOM destination, 1-65535; default 104.
    path : Path or None
        Folder destination; default ``<data_dir>/outbox``.
    calling_ae_title : str
        Calling AE title used when sending; default ``"LIVERNODE"``.
    send_timeout_s : float
        Seconds for association and DIMSE timeouts while sending; default 30.
    send_retries : int
        Delivery retries after the first failed attempt; default 3 (4 attempts in all).
    retry_backoff_s : float
        Seconds before the first retry; each further retry waits twice as long as the one
        before; default 10.
    url : str
        DICOMweb base URL (the service root, such as ``http://pacs:8042/dicom-web``);
        required when ``kind`` is ``"dicomweb"``.
    username : str
        User name for HTTP basic authentication of the DICOMweb destination; empty (default)
        sends no credentials.
    password : str
        Password for ``username``; prefer ``password_file``.
    password_file : Path or None
        File whose first line is the password for ``username``; read at each delivery.
    confirm_delivery : bool
        Whether a delivery counts only once the destination lists the SEG and SR in a query
        (C-FIND for ``"dicom"``, QIDO-RS for ``"dicomweb"``); default true.
    confirm_timeout_s : float
        Seconds to wait for the sent instances to appear in the destination's query
        results; default 60.
    confirm_interval_s : float
        Seconds between two confirmation queries; default 2.
    """

    kind: str = "folder"
    ae_title: str = ""
    host: str = ""
    port: int = 104
    path: Path | None = None
    calling_ae_title: str = "LIVERNODE"
    send_timeout_s: float = 30.0
    send_retries: int = 3
    retry_backoff_s: float = 10.0
    url: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: Path | None = None
    confirm_delivery: bool = True
    confirm_timeout_s: float = 60.0
    confirm_interval_s: float = 2.0

    def read_password(self) -> str:
        """Return the DICOMweb password: the first line of ``password_file`` when set.

        Raises
        ------
        ConfigError
            When ``password_file`` cannot be read.
        """
        if self.password_file is None:
            return self.password
        try:
            lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(
                f"destination.password_file {self.password_file} cannot be read: {error}"
            ) from None
        return lines[0].strip() if lines else ""

    def retry_delay_s(self, failed_attempts: int) -> float:
        """Return the seconds to wait after ``failed_attempts`` failed delivery attempts."""
        return self.retry_backoff_s * 2 ** max(failed_attempts - 1, 0)


@dataclass
class AnalysisSettings:
    """Resources and output options of the analysis.

    Attributes
    ----------
    torch_threads : int
        Threads PyTorch may use; default 2.
    memory_budget_mb : int
        Peak memory of the analysis, in MiB; default 6000. An analysis whose estimated peak
        exceeds it fails before inference starts, with a message naming both numbers. The liver
        network's default tile needs about 1.6 GiB on top of the loaded process in float32 and
        0.8 GiB in bfloat16 (``python -m bench.run_benchmarks`` measures both).
    keep_empty_frames : bool
        Whether the DICOM SEG keeps frames without any segmented voxel; default false. Empty
        frames omitted is what dcmqi (3D Slicer's SEG writer) and highdicom write by default;
        on a 300-slice CT it made the SEG 4.0 MiB instead of 19.1 MiB and encoded in 0.7 s
        instead of 1.0 s. Each kept frame still names its source instance and position.
    precision : str
        Arithmetic of the networks: ``"float32"``, ``"bfloat16"`` (bfloat16 copies of the
        networks) or ``"auto"`` (default), which picks bfloat16 where the CPU computes it
        natively (AVX512-BF16 or AMX) and float32 elsewhere. On a real abdominal CT, bfloat16
        changed liver Dice against reference labels from 0.9631 to 0.9630 and took the
        analysis from 29.7 s to 16.5 s on 2 cores.
    min_analysable_coverage_mm : float
        Cranio-caudal coverage below which a series is reported "not analysable" (an SR with
        the reason, no SEG and no volumes) instead of being segmented, in mm; default
        :data:`pipeline.settings.DEFAULT_MIN_ANALYSABLE_COVERAGE_MM`. 0 analyses everything.
    """

    torch_threads: int = 2
    memory_budget_mb: int = 6000
    keep_empty_frames: bool = False
    precision: str = "auto"
    min_analysable_coverage_mm: float = DEFAULT_MIN_ANALYSABLE_COVERAGE_MM


@dataclass
class WorkerSettings:
    """The job worker.

    Attributes
    ----------
    poll_interval_s : float
        Seconds an idle worker waits before it looks for a queued job again; default 2.
    """

    poll_interval_s: float = 2.0


@dataclass
class WebSettings:
    """The login-protected web page for administrators and radiologists.

    Attributes
    ----------
    enabled : bool
        Whether ``livernode serve`` also serves the web page; default true.
    host : str
        Address the web server listens on; default ``"127.0.0.1"`` (loopback only).
    port : int
        TCP port, 1-65535; default 8080.
    users : dict of str to str
        User names and their password hashes from ``livernode web hash-password``, as a TOML
        table ``{ admin = "scrypt$..." }``; default none, so no user can log in.
    secret_key : str
        Key that signs the session cookie; default empty, which makes the node generate a
        random key at first start into ``<data_dir>/web-session.key`` (mode 0600).
    session_max_age_s : int
        Seconds a login stays valid; default 28800 (8 hours).
    page_size : int
        Series per page of the study list; default 50.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    users: dict[str, str] = field(default_factory=dict)
    secret_key: str = ""
    session_max_age_s: int = 28800
    page_size: int = 50


@dataclass
class Settings:
    """All node settings.

    Attributes
    ----------
    data_dir : Path
        Base folder for the spool, outputs, weights and SQLite database; default
        ``./livernode-data``.
    spool_dir : Path
        Received instances, as ``<spool_dir>/<study>/<series>/<sop>.dcm``; default
        ``<data_dir>/spool``.
    output_dir : Path
        Analysis outputs, as ``<output_dir>/<study>/<series>/``; default ``<data_dir>/output``.
    weights_cache_dir : Path
        Converted network weights; default ``<data_dir>/weights``, overridden by the
        ``LIVERNODE_WEIGHTS_CACHE`` environment variable.
    database_url : str
        SQLAlchemy URL; default ``sqlite:///<data_dir>/livernode.db``. PostgreSQL works with
        ``postgresql+psycopg2://user:password@host:port/database``.
    scp, series, selection, destination, analysis, worker, web
        The sections described by their classes.
    """

    data_dir: Path = DEFAULT_DATA_DIR
    spool_dir: Path | None = None
    output_dir: Path | None = None
    weights_cache_dir: Path | None = None
    database_url: str = ""
    scp: ScpSettings = field(default_factory=ScpSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    destination: DestinationSettings = field(default_factory=DestinationSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    web: WebSettings = field(default_factory=WebSettings)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

        if self.spool_dir is None:
            self.spool_dir = self.data_dir / "spool"
        if self.output_dir is None:
            self.output_dir = self.data_dir / "output"
        if self.weights_cache_dir is None:
            self.weights_cache_dir = self.data_dir / "weights"
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'livernode.db'}"
        if self.destination.path is None:
            self.destination.path = self.data_dir / "outbox"

        self.spool_dir = Path(self.spool_dir)
        self.output_dir = Path(self.output_dir)
        self.weights_cache_dir = Path(self.weights_cache_dir)
        self.destination.path = Path(self.destination.path)

    def validate(self) -> None:
        """Check every setting against its allowed range.

        Raises
        ------
        ConfigError
            Naming the first invalid key, its value and the allowed range.
        """
        scp = self.scp
        _check_ae_title("scp.ae_title", scp.ae_title)
        _check_port("scp.port", scp.port)
        for index, title in enumerate(scp.allowed_calling_ae_titles):
            _check_ae_title(f"scp.allowed_calling_ae_titles[{index}]", title)
        for index, peer in enumerate(scp.allowed_peers):
            _check_ae_title(f"scp.allowed_peers[{index}].ae_title", peer.ae_title)
            if not peer.host.strip():
                raise ConfigError(
                    f"scp.allowed_peers[{index}].host is empty: give the address the peer "
                    "connects from"
                )
        _check_positive("scp.acse_timeout_s", scp.acse_timeout_s)
        _check_positive("scp.dimse_timeout_s", scp.dimse_timeout_s)
        _check_positive("scp.network_timeout_s", scp.network_timeout_s)
        if scp.max_pdu_bytes != 0 and not MIN_PDU_BYTES <= scp.max_pdu_bytes <= MAX_PDU_BYTES:
            raise ConfigError(
                f"scp.max_pdu_bytes = {scp.max_pdu_bytes} is out of range: use 0 (unlimited) "
                f"or {MIN_PDU_BYTES}-{MAX_PDU_BYTES} bytes"
            )

        _check_positive("series.quiet_time_s", self.series.quiet_time_s)
        _check_positive("series.sweep_interval_s", self.series.sweep_interval_s)
        if self.selection.min_slices < 1:
            raise ConfigError(
                f"selection.min_slices = {self.selection.min_slices} is out of range: use 1 or more"
            )
        if not 0 <= self.selection.orientation_tolerance_deg <= 90:
            raise ConfigError(
                f"selection.orientation_tolerance_deg = {self.selection.orientation_tolerance_deg} "
                "is out of range: use 0-90 degrees"
            )

        destination = self.destination
        if destination.kind not in DESTINATION_KINDS:
            raise ConfigError(
                f"destination.kind = {destination.kind!r} is invalid: use one of "
                f"{', '.join(DESTINATION_KINDS)}"
            )
        if destination.kind == "dicom":
            _check_ae_title("destination.ae_title", destination.ae_title)
            if not destination.host:
                raise ConfigError(
                    "destination.host is missing: a 'dicom' destination needs the host name "
                    "or address of the receiving AE"
                )
            _check_port("destination.port", destination.port)
        if destination.kind == "dicomweb" and not destination.url.startswith(
            DICOMWEB_URL_SCHEMES
        ):
            raise ConfigError(
                f"destination.url = {destination.url!r} is invalid: a 'dicomweb' destination "
                "needs the service root URL, starting with http:// or https://"
            )
        _check_positive("destination.confirm_timeout_s", destination.confirm_timeout_s)
        _check_positive("destination.confirm_interval_s", destination.confirm_interval_s)
        _check_ae_title("destination.calling_ae_title", destination.calling_ae_title)
        _check_positive("destination.send_timeout_s", destination.send_timeout_s)
        if destination.send_retries < 0:
            raise ConfigError(
                f"destination.send_retries = {destination.send_retries} is out of range: "
                "use 0 or more"
            )
        if destination.retry_backoff_s < 0:
            raise ConfigError(
                f"destination.retry_backoff_s = {destination.retry_backoff_s} is out of "
                "range: use 0 or more seconds"
            )

        if self.analysis.torch_threads < 1:
            raise ConfigError(
                f"analysis.torch_threads = {self.analysis.torch_threads} is out of range: "
                "use 1 or more"
            )
        if self.analysis.memory_budget_mb < 1:
            raise ConfigError(
                f"analysis.memory_budget_mb = {self.analysis.memory_budget_mb} is out of "
                "range: use 1 MiB or more"
            )
        if self.analysis.precision not in PRECISIONS:
            raise ConfigError(
                f"analysis.precision = {self.analysis.precision!r} is not known: use one of "
                + ", ".join(repr(value) for value in PRECISIONS)
            )
        if self.analysis.min_analysable_coverage_mm < 0:
            raise ConfigError(
                f"analysis.min_analysable_coverage_mm = {self.analysis.min_analysable_coverage_mm} "
                "is out of range: use 0 or more mm"
            )
        _check_positive("worker.poll_interval_s", self.worker.poll_interval_s)

        web = self.web
        _check_port("web.port", web.port)
        if not isinstance(web.users, dict) or not all(
            isinstance(name, str) and isinstance(value, str) for name, value in web.users.items()
        ):
            raise ConfigError(
                f"web.users = {web.users!r} is invalid: use a table of user names and password "
                'hashes, for example { admin = "scrypt$..." } (see livernode web hash-password)'
            )
        if web.session_max_age_s < 1:
            raise ConfigError(
                f"web.session_max_age_s = {web.session_max_age_s} is out of range: use 1 or more"
            )
        if web.page_size < 1:
            raise ConfigError(f"web.page_size = {web.page_size} is out of range: use 1 or more")


#: ``LIVERNODE_*`` environment variables and the dotted setting each one overrides.
ENV_OVERRIDES: dict[str, str] = {
    "LIVERNODE_DATA_DIR": "data_dir",
    "LIVERNODE_SPOOL_DIR": "spool_dir",
    "LIVERNODE_OUTPUT_DIR": "output_dir",
    WEIGHTS_CACHE_ENV_VAR: "weights_cache_dir",
    "LIVERNODE_DATABASE_URL": "database_url",
    "LIVERNODE_AE_TITLE": "scp.ae_title",
    "LIVERNODE_HOST": "scp.host",
    "LIVERNODE_PORT": "scp.port",
    "LIVERNODE_ALLOWED_CALLING_AE_TITLES": "scp.allowed_calling_ae_titles",
    "LIVERNODE_ALLOWED_PEERS": "scp.allowed_peers",
    "LIVERNODE_QUIET_TIME_S": "series.quiet_time_s",
    "LIVERNODE_SWEEP_INTERVAL_S": "series.sweep_interval_s",
    "LIVERNODE_DESTINATION_KIND": "destination.kind",
    "LIVERNODE_DESTINATION_AE_TITLE": "destination.ae_title",
    "LIVERNODE_DESTINATION_HOST": "destination.host",
    "LIVERNODE_DESTINATION_PORT": "destination.port",
    "LIVERNODE_DESTINATION_PATH": "destination.path",
    "LIVERNODE_DESTINATION_URL": "destination.url",
    "LIVERNODE_DESTINATION_USERNAME": "destination.username",
    "LIVERNODE_DESTINATION_PASSWORD": "destination.password",
    "LIVERNODE_DESTINATION_PASSWORD_FILE": "destination.password_file",
    "LIVERNODE_TORCH_THREADS": "analysis.torch_threads",
    "LIVERNODE_MEMORY_BUDGET_MB": "analysis.memory_budget_mb",
    "LIVERNODE_PRECISION": "analysis.precision",
    "LIVERNODE_WEB_ENABLED": "web.enabled",
    "LIVERNODE_WEB_HOST": "web.host",
    "LIVERNODE_WEB_PORT": "web.port",
}

_SECTION_TYPES: dict[str, type] = {
    "scp": ScpSettings,
    "series": SeriesSettings,
    "selection": SelectionSettings,
    "destination": DestinationSettings,
    "analysis": AnalysisSettings,
    "worker": WorkerSettings,
    "web": WebSettings,
}


def load_settings(
    config_path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build validated settings from the defaults, a TOML file and the environment.

    Parameters
    ----------
    config_path : Path or str, optional
        TOML configuration file. When omitted, the file named by ``LIVERNODE_CONFIG`` is
        read if that variable is set; otherwise only defaults and overrides apply.
    environ : Mapping, optional
        Environment to read ``LIVERNODE_*`` variables from; default ``os.environ``.

    Returns
    -------
    Settings
        Validated settings with derived paths filled in.

    Raises
    ------
    ConfigError
        When the file is missing or not valid TOML, a key is unknown, a value has the wrong
        type or is out of range.
    """
    env = os.environ if environ is None else environ

    if config_path is None and env.get(CONFIG_ENV_VAR):
        config_path = env[CONFIG_ENV_VAR]

    raw: dict[str, Any] = {}
    if config_path is not None:
        raw = _read_toml(Path(config_path))

    for variable, dotted_key in ENV_OVERRIDES.items():
        if variable in env and env[variable] != "":
            _set_dotted(raw, dotted_key, env[variable], source=variable)

    settings = settings_from_mapping(raw)
    settings.validate()

    logger.debug("Loaded settings from %s", config_path or "defaults and environment")
    return settings


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Build settings from a nested mapping shaped like the TOML file, without validating.

    Raises
    ------
    ConfigError
        When a key is unknown or a value cannot be converted to the setting's type.
    """
    top_level: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTION_TYPES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table of settings, not {value!r}")
            top_level[key] = _build_section(key, _SECTION_TYPES[key], value)
        else:
            top_level[key] = value

    return _build_dataclass("", Settings, top_level, nested=set(_SECTION_TYPES))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"Configuration file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Configuration file {path} is not valid TOML: {error}") from None


def _set_dotted(raw: dict[str, Any], dotted_key: str, value: str, source: str) -> None:
    parts = dotted_key.split(".")
    target = raw
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    # Environment values are strings; a list setting takes a comma-separated value.
    if parts[-1] == "allowed_calling_ae_titles":
        target[parts[-1]] = [title.strip() for title in value.split(",") if title.strip()]
    elif parts[-1] == "allowed_peers":
        # "AE@host,AE2@host2"
        peers = []
        for item in (entry.strip() for entry in value.split(",")):
            if not item:
                continue
            ae_title, _, host = item.partition("@")
            peers.append({"ae_title": ae_title.strip(), "host": host.strip()})
        target[parts[-1]] = peers
    else:
        target[parts[-1]] = value
    logger.debug("Setting %s overridden by %s", dotted_key, source)


def _build_section(name: str, section_type: type, values: Mapping[str, Any]) -> Any:
    return _build_dataclass(f"{name}.", section_type, dict(values), nested=set())


def _build_dataclass(prefix: str, cls: type, values: dict[str, Any], nested: set[str]) -> Any:
    known = {item.name: item for item in fields(cls)}
    converted: dict[str, Any] = {}

    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"Unknown setting {prefix}{key}: known settings are "
                f"{', '.join(prefix + name for name in known)}"
            )
        if key in nested:
            converted[key] = value
            continue
        converted[key] = _convert(prefix + key, known[key].type, value)

    return cls(**converted)


def _convert(key: str, type_name: Any, value: Any) -> Any:
    # Field types are strings because of ``from __future__ import annotations``.
    type_text = str(type_name)
    if type_text == "list[AllowedPeer]":
        if not isinstance(value, list):
            raise ConfigError(f"Setting {key} = {value!r} has the wrong type: expected a list of tables")
        return [_to_allowed_peer(key, index, item) for index, item in enumerate(value)]
    try:
        if type_text == "bool":
            return _to_bool(key, value)
        if type_text == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if type_text == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_text == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if type_text.startswith("Path"):
            return Path(value) if value not in (None, "") else None
        if type_text.startswith("list"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Setting {key} = {value!r} has the wrong type: expected {type_text}"
        ) from None
    return value


def _to_allowed_peer(key: str, index: int, value: Any) -> AllowedPeer:
    if isinstance(value, AllowedPeer):
        return value
    if (
        not isinstance(value, Mapping)
        or set(value) != {"ae_title", "host"}
        or not all(isinstance(item, str) for item in value.values())
    ):
        raise ConfigError(
            f"Setting {key}[{index}] = {value!r} is invalid: use a table "
            '{ ae_title = "AE", host = "address" } with exactly these two keys'
        )
    return AllowedPeer(ae_title=value["ae_title"], host=value["host"])


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"Setting {key} = {value!r} has the wrong type: expected true or false")


def _check_port(key: str, port: int) -> None:
    if not MIN_PORT <= port <= MAX_PORT:
        raise ConfigError(f"{key} = {port} is out of range: use {MIN_PORT}-{MAX_PORT}")


def _check_positive(key: str, seconds: float) -> None:
    if not seconds > 0:
        raise ConfigError(f"{key} = {seconds} is out of range: use a value above 0")


def _check_ae_title(key: str, title: str) -> None:
    stripped = title.strip()
    if not stripped or len(stripped) > AE_TITLE_MAX_LENGTH or "\\" in stripped:
        raise ConfigError(
            f"{key} = {title!r} is not a valid AE title: use 1-{AE_TITLE_MAX_LENGTH} "
            "characters without a backslash"
        )

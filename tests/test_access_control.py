"""Access control of the node's SCP: calling AE titles, peer addresses and C-ECHO.

Real associations on 127.0.0.1 against the real :class:`node.scp.StorageSCP`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import list_audit_events
from node.config import AllowedPeer, load_settings
from node.db import init_db
from node.models import AuditKind
from node.scp import StorageSCP
from tests.test_scp import make_settings

#: A-ASSOCIATE-RJ result, source and reason of "calling-AE-title-not-recognized" (PS3.8 9.3.4).
REJECTED_CALLING_AE = (0x01, 0x01, 0x03)


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator:
    started: list[StorageSCP] = []

    def start(**scp_options: object) -> tuple[StorageSCP, object]:
        settings = make_settings(tmp_path / f"node{len(started)}", **scp_options)
        engine = init_db(settings.database_url)
        scp = StorageSCP(settings, engine)
        scp.start()
        started.append(scp)
        return scp, engine

    yield start
    for scp in started:
        scp.stop()
        scp.engine.dispose()


def echo(port: int, calling_ae_title: str) -> tuple[int | None, tuple[int, int, int] | None]:
    """Associate with ``calling_ae_title`` and send C-ECHO; return its status and any rejection."""
    responses: list[A_ASSOCIATE] = []

    def keep(event: evt.Event) -> None:
        if isinstance(event.primitive, A_ASSOCIATE) and event.primitive.result is not None:
            responses.append(event.primitive)

    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LIVERNODE", evt_handlers=[(evt.EVT_ACSE_RECV, keep)])
    if not assoc.is_established:
        response = responses[-1] if responses else None
        rejection = (
            (response.result, response.result_source, response.diagnostic) if response else None
        )
        return None, rejection
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status), None


def test_allowed_peer_from_its_host_is_accepted(scp_factory) -> None:
    scp, _ = scp_factory(allowed_peers=[AllowedPeer("ORTHANC", "127.0.0.1")])

    assert echo(scp.port, "ORTHANC") == (0x0000, None)


def test_allowed_peer_from_another_host_is_rejected(scp_factory) -> None:
    # 192.0.2.10 is a documentation address: the peer entry exists, but not for 127.0.0.1.
    scp, engine = scp_factory(allowed_peers=[AllowedPeer("ORTHANC", "192.0.2.10")])

    status, rejection = echo(scp.port, "ORTHANC")

    assert status is None
    assert rejection == REJECTED_CALLING_AE
    events = list_audit_events(engine, kind=AuditKind.ASSOCIATION_REJECTED)
    assert len(events) == 1
    assert events[0].calling_ae_title == "ORTHANC"
    assert "127.0.0.1" in events[0].message and "ORTHANC@192.0.2.10" in events[0].message


def test_unknown_calling_ae_rejected_known_title_accepted(scp_factory) -> None:
    scp, engine = scp_factory(
        allowed_calling_ae_titles=["PACS"], allowed_peers=[AllowedPeer("ORTHANC", "127.0.0.1")]
    )

    assert echo(scp.port, "PACS") == (0x0000, None)
    assert echo(scp.port, "ORTHANC") == (0x0000, None)
    assert echo(scp.port, "INTRUDER") == (None, REJECTED_CALLING_AE)
    events = list_audit_events(engine, kind=AuditKind.ASSOCIATION_REJECTED)
    assert [event.calling_ae_title for event in events] == ["INTRUDER"]
    assert "calling-AE-title-not-recognized" in events[0].message


def test_open_scp_answers_any_echo(scp_factory) -> None:
    scp, engine = scp_factory()

    assert echo(scp.port, "ANYONE") == (0x0000, None)
    assert list_audit_events(engine, kind=AuditKind.ASSOCIATION_REJECTED) == []


def test_allowed_peers_from_toml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[scp]\nallowed_peers = [{ ae_title = "ORTHANC", host = "127.0.0.1" }]\n', encoding="utf-8"
    )

    from_file = load_settings(config, environ={})
    from_env = load_settings(config, environ={"LIVERNODE_ALLOWED_PEERS": "PACS@10.0.0.5, CT1@10.0.0.6"})

    assert from_file.scp.allowed_peers == [AllowedPeer("ORTHANC", "127.0.0.1")]
    assert from_env.scp.allowed_peers == [AllowedPeer("PACS", "10.0.0.5"), AllowedPeer("CT1", "10.0.0.6")]


def test_allowed_peer_without_host_is_a_config_error(tmp_path: Path) -> None:
    from node.config import ConfigError

    config = tmp_path / "node.toml"
    config.write_text('[scp]\nallowed_peers = [{ ae_title = "ORTHANC" }]\n', encoding="utf-8")

    with pytest.raises(ConfigError, match=r"scp.allowed_peers\[0\]"):
        load_settings(config, environ={})

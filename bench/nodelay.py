"""Turn on TCP_NODELAY for every pynetdicom socket of this process (benchmark instrument).

The benchmark starts one ``livernode serve`` with :func:`install` called first, to measure what
disabling Nagle's algorithm on DICOM sockets changes for ingest; the product does not import it.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

logger = logging.getLogger(__name__)


def _set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as error:
        logger.warning("TCP_NODELAY could not be set: %s", error)


def install() -> None:
    """Patch pynetdicom so that accepted and outgoing association sockets use TCP_NODELAY."""
    from pynetdicom import transport

    original_get_request = transport.AssociationServer.get_request
    original_create_socket = transport.AssociationSocket._create_socket

    def get_request(self: Any) -> Any:
        client, address = original_get_request(self)
        _set_nodelay(client)
        return client, address

    def create_socket(self: Any, address: Any) -> socket.socket:
        sock = original_create_socket(self, address)
        _set_nodelay(sock)
        return sock

    transport.AssociationServer.get_request = get_request  # type: ignore[method-assign]
    transport.AssociationSocket._create_socket = create_socket  # type: ignore[method-assign]
    logger.info("TCP_NODELAY set on pynetdicom sockets")

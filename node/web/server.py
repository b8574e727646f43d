"""Run the web application with uvicorn, alone (``livernode web``) or beside the node."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from types import FrameType

import uvicorn
from sqlalchemy import Engine

from node.config import Settings
from node.web.app import create_app

logger = logging.getLogger(__name__)

#: Seconds :meth:`WebServer.stop` waits for the server thread.
STOP_TIMEOUT_S = 10.0


class WebServer:
    """The uvicorn server of the web page.

    Parameters
    ----------
    settings : Settings
        Uses ``web.host`` and ``web.port``, and what :func:`node.web.app.create_app` uses.
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.app = create_app(settings, engine)
        # log_config=None keeps the node's logging set-up; access lines go to uvicorn.access.
        config = uvicorn.Config(
            self.app,
            host=settings.web.host,
            port=settings.web.port,
            log_config=None,
            access_log=True,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``http://host:port`` of the web page."""
        return f"http://{self.settings.web.host}:{self.settings.web.port}"

    def run(self) -> None:
        """Serve in the calling thread until SIGINT or SIGTERM (``livernode web``).

        Raises
        ------
        OSError
            When the address is in use or cannot be bound.
        """
        sock = self._bind()
        logger.info("Web page listening on %s", self.address)

        # uvicorn handles SIGINT and SIGTERM while it runs and raises the signal again after
        # shutting down; these handlers make that second delivery a normal exit.
        stop_signals = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.signal(number, _log_stop_signal) for number in stop_signals}
        try:
            self._server.run(sockets=[sock])
        finally:
            sock.close()
            for number, handler in previous.items():
                signal.signal(number, handler)
            logger.info("Web page stopped")

    def start_in_background(self) -> bool:
        """Serve from a daemon thread beside the node; return whether the server started.

        A port that cannot be bound is logged as an error and the node runs on without the
        web page, because receiving and analysing series must not depend on it.
        """
        try:
            sock = self._bind()
        except OSError as error:
            logger.error(
                "Web page not started: cannot listen on %s:%d: %s. Set [web] port, or "
                "enabled = false",
                self.settings.web.host,
                self.settings.web.port,
                error,
            )
            return False

        def serve() -> None:
            try:
                self._server.run(sockets=[sock])
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="web", daemon=True)
        self._thread.start()
        logger.info("Web page listening on %s", self.address)
        return True

    def stop(self) -> None:
        """Ask the background server to stop and wait up to :data:`STOP_TIMEOUT_S` seconds."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            logger.warning("Web page server still running after %s s", STOP_TIMEOUT_S)
        else:
            logger.info("Web page stopped")
        self._thread = None

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.settings.web.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.web.host, self.settings.web.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.set_inheritable(True)
        return sock


def _log_stop_signal(signal_number: int, frame: FrameType | None) -> None:
    logger.debug("Received %s again after the web page shut down", signal.Signals(signal_number).name)

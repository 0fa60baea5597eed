"""Serving the app with uvicorn: in the foreground (``serve``) or from a background thread.

``RunningServer`` is for tests, the demo and the simulators that need a control
plane beside them: it binds 127.0.0.1 (port 0: any free one), serves from its own
thread and event loop, and knows its ``url`` and ``api_url`` once started.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI

__all__ = ["RunningServer", "is_loopback", "uvicorn_config"]


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def uvicorn_config(app: FastAPI, *, host: str, port: int, **extra: Any) -> uvicorn.Config:
    """The one uvicorn configuration of comfyfleet (no access log: URLs are logged by nobody)."""
    options: dict[str, Any] = {
        "access_log": False,
        "log_level": "warning",
        "lifespan": "auto",
        "timeout_graceful_shutdown": 5,
        **extra,
    }
    return uvicorn.Config(app, host=host, port=port, **options)


class RunningServer:
    """``app`` served on ``host`` from a daemon thread; a context manager."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """What an instance's ``COMFYFLEET_URL`` is set to."""
        return f"{self.url}/api"

    def start(self, timeout: float = 20.0) -> RunningServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = int(sock.getsockname()[1])
        self._socket = sock
        self._server = uvicorn.Server(uvicorn_config(self.app, host=self.host, port=self.port))
        self._thread = threading.Thread(target=self._run, name="comfyfleet-api", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self._server.started or self._failed is not None or not self._thread.is_alive():
                break
            deadline.wait(0.02)
        if not self._server.started:
            self.stop()
            raise RuntimeError("the control plane's server did not start") from self._failed
        return self

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as error:  # reported by start()
            self._failed = error

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

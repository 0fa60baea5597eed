"""An aiohttp application served from a background thread with its own event loop.

The ComfyUI simulator (``sim.comfy``) and the file server (``sim.files``) run this
way inside tests and the demo: the caller binds the sockets, ``start`` returns once
the application listens on them, ``stop`` shuts it down and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Sequence

from aiohttp import web

__all__ = ["BackgroundApp", "bind_loopback"]


def bind_loopback(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:``port`` (0: any free port), not yet listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class BackgroundApp:
    """Serve the application ``make_app`` builds (in the serving loop) on bound sockets.

    ``name`` names the thread; ``what`` the server in the error raised when it does
    not start (``"the file server"``). ``loop`` is the serving loop while it runs.
    """

    def __init__(self, make_app: Callable[[], web.Application], *, name: str, what: str) -> None:
        self._make_app = make_app
        self._name = name
        self._what = what
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, socks: Sequence[socket.socket], *, timeout: float = 10) -> None:
        """Serve on ``socks``; a ``RuntimeError`` when it fails or is not up within ``timeout``."""
        self._thread = threading.Thread(
            target=self._run, args=(list(socks),), name=self._name, daemon=True
        )
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None or not self._ready.is_set():
            raise RuntimeError(f"{self._what} did not start") from self._error

    def _run(self, socks: list[socket.socket]) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve(socks))
        except BaseException as exc:  # reported to the thread that called start()
            self._error = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(self, socks: list[socket.socket]) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        for sock in socks:
            await web.SockSite(runner, sock).start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), 5)

    def stop(self) -> None:
        """Stop serving and wait (up to 10 s) for the thread to end."""
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

"""An HTTP file server for generated content: the stand-in for CDNs and model hosts.

It serves deterministic bytes (registered files, or ``/files/NAME?size=N&seed=S``)
with the parts of HTTP a downloader depends on: single Range requests (206 and
``Content-Range``), ``ETag``, ``HEAD``, bandwidth limits per connection and in
total, a Hugging Face-style redirect (``X-Linked-Etag``, ``X-Linked-Size``) to a
"CDN" host with signed URLs that expire, and faults injected on the next N
requests for a file (an HTTP status, a dropped connection, a stall, wrong
bytes). It counts what it does, so tests can assert on parallelism and on bytes
sent again after a resume, not only on results.

``RunningFileServer`` runs it in a background thread on 127.0.0.1 (and on
127.0.0.2 for the CDN, so that redirects cross to another host name).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import re
import secrets
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from comfyfleet.clock import Clock, SystemClock

Route = Literal["files", "resolve", "cdn"]
FaultKind = Literal["status", "drop", "stall", "corrupt"]

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def generate_content(name: str, size: int, seed: int = 0) -> bytes:
    """The deterministic bytes of file ``name`` of ``size`` bytes for ``seed``."""
    return random.Random(f"{name}:{seed}").randbytes(size)


@dataclass
class SimFile:
    """A file the server knows. ``rate_bps`` overrides the per-connection limit."""

    name: str
    data: bytes
    sha256: str
    etag: str
    rate_bps: float | None = None
    ranges: bool = True
    token: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class Fault:
    """What goes wrong on one request.

    ``status``: answer ``status`` (with ``Retry-After`` when given) instead of the file.
    ``drop``: send ``after_bytes`` of the body, then close the connection.
    ``stall``: send ``after_bytes``, then send nothing for ``stall_s`` seconds
    (or until the client goes away), then close.
    ``corrupt``: send the body with the byte at ``after_bytes`` flipped.
    ``route`` limits the fault to one route (``files``, ``resolve`` or ``cdn``).
    """

    kind: FaultKind
    status: int = 0
    after_bytes: int = 0
    stall_s: float = 3600.0
    retry_after: float | None = None
    route: Route | None = None


@dataclass
class FileStats:
    """What the server did for one file name (all routes together)."""

    requests: int = 0
    bytes_sent: int = 0
    range_requests: list[tuple[int, int]] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    by_route: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    peak_ranged_in_flight: int = 0
    ranged_in_flight: int = 0


@dataclass
class ServerStats:
    """A snapshot of the server's accounting."""

    files: dict[str, FileStats]
    in_flight: int
    peak_in_flight: int
    peak_files_in_flight: int
    #: ``(route, file name, value)`` for every Authorization header received.
    authorization_seen: list[tuple[str, str, str]]

    def file(self, name: str) -> FileStats:
        return self.files.get(name, FileStats())

    @property
    def bytes_sent(self) -> int:
        return sum(f.bytes_sent for f in self.files.values())


class _Throttle:
    """A token bucket on the server loop: ``reserve(n)`` says how long to wait first."""

    def __init__(self, rate_bps: float) -> None:
        self.rate = rate_bps
        self._next = 0.0

    def reserve(self, n: int) -> float:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + n / self.rate
        return start - now


class FileServer:
    """The application and its state. Thread-safe: tests read stats from another thread."""

    def __init__(
        self,
        *,
        per_connection_bps: float | None = None,
        total_bps: float | None = None,
        signed_url_ttl_s: float = 3600.0,
        clock: Clock | None = None,
    ) -> None:
        self.per_connection_bps = per_connection_bps
        self.total_bps = total_bps
        self.signed_url_ttl_s = signed_url_ttl_s
        self.clock: Clock = clock or SystemClock()
        self.base_url = ""
        self.cdn_base_url = ""
        self._secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._files: dict[str, SimFile] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._stats: dict[str, FileStats] = {}
        self._in_flight = 0
        self._peak_in_flight = 0
        self._files_in_flight: Counter[str] = Counter()
        self._peak_files_in_flight = 0
        self._auth_seen: list[tuple[str, str, str]] = []
        self._total_throttle: _Throttle | None = None

    # -- files and faults -------------------------------------------------

    def add_file(
        self,
        name: str,
        size: int | None = None,
        *,
        seed: int = 0,
        data: bytes | None = None,
        rate_bps: float | None = None,
        ranges: bool = True,
        token: str | None = None,
    ) -> SimFile:
        """Register ``name`` with generated (or given) content and return it."""
        if data is None:
            if size is None:
                raise ValueError("add_file needs a size or data")
            data = generate_content(name, size, seed)
        digest = hashlib.sha256(data).hexdigest()
        f = SimFile(
            name=name,
            data=data,
            sha256=digest,
            etag=f'"{digest[:32]}"',
            rate_bps=rate_bps,
            ranges=ranges,
            token=token,
        )
        with self._lock:
            self._files[name] = f
        return f

    def get_file(self, name: str) -> SimFile:
        with self._lock:
            return self._files[name]

    def inject(self, name: str, fault: Fault, count: int = 1) -> None:
        """Apply ``fault`` to the next ``count`` matching requests for ``name``."""
        with self._lock:
            self._faults.setdefault(name, deque()).extend([fault] * count)

    def clear_faults(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._faults.clear()
            else:
                self._faults.pop(name, None)

    def _take_fault(self, name: str, route: Route, body: int) -> Fault | None:
        """The next fault for this request; body faults wait for a body longer than
        their ``after_bytes`` (a 1-byte probe does not use up "corrupt" or "drop")."""
        with self._lock:
            queue = self._faults.get(name)
            if not queue:
                return None
            for i, fault in enumerate(queue):
                if fault.route not in (None, route):
                    continue
                if fault.kind != "status" and body <= fault.after_bytes:
                    continue
                del queue[i]
                return fault
            return None

    # -- URLs -------------------------------------------------------------

    def file_url(self, name: str) -> str:
        return f"{self.base_url}/files/{name}"

    def resolve_url(self, name: str) -> str:
        """The Hugging Face-style URL that redirects to a signed CDN URL."""
        return f"{self.base_url}/resolve/{name}"

    def redirect_url(self, target: str) -> str:
        """A URL on this server that answers 302 to ``target``."""
        from urllib.parse import quote

        return f"{self.base_url}/goto?to={quote(target, safe='')}"

    def _sign(self, name: str, expires: int) -> str:
        msg = f"{name}:{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    # -- stats ------------------------------------------------------------

    def stats(self) -> ServerStats:
        with self._lock:
            files = {
                k: FileStats(
                    requests=v.requests,
                    bytes_sent=v.bytes_sent,
                    range_requests=list(v.range_requests),
                    statuses=Counter(v.statuses),
                    by_route=Counter(v.by_route),
                    in_flight=v.in_flight,
                    peak_in_flight=v.peak_in_flight,
                    peak_ranged_in_flight=v.peak_ranged_in_flight,
                    ranged_in_flight=v.ranged_in_flight,
                )
                for k, v in self._stats.items()
            }
            return ServerStats(
                files=files,
                in_flight=self._in_flight,
                peak_in_flight=self._peak_in_flight,
                peak_files_in_flight=self._peak_files_in_flight,
                authorization_seen=list(self._auth_seen),
            )

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()
            self._peak_in_flight = self._in_flight
            self._peak_files_in_flight = len(self._files_in_flight)
            self._auth_seen.clear()

    def _fstats(self, name: str) -> FileStats:
        s = self._stats.get(name)
        if s is None:
            s = self._stats[name] = FileStats()
        return s

    def _record_request(self, name: str, route: Route, request: web.Request) -> None:
        with self._lock:
            s = self._fstats(name)
            s.requests += 1
            s.by_route[route] += 1
            auth = request.headers.get("Authorization")
            if auth is not None:
                self._auth_seen.append((route, name, auth))

    def _record_status(self, name: str, status: int) -> None:
        with self._lock:
            self._fstats(name).statuses[status] += 1

    def _enter(self, name: str, ranged: bool) -> None:
        with self._lock:
            s = self._fstats(name)
            s.in_flight += 1
            s.peak_in_flight = max(s.peak_in_flight, s.in_flight)
            if ranged:
                s.ranged_in_flight += 1
                s.peak_ranged_in_flight = max(s.peak_ranged_in_flight, s.ranged_in_flight)
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            self._files_in_flight[name] += 1
            self._peak_files_in_flight = max(
                self._peak_files_in_flight, len(+self._files_in_flight)
            )

    def _leave(self, name: str, ranged: bool) -> None:
        with self._lock:
            s = self._fstats(name)
            s.in_flight -= 1
            if ranged:
                s.ranged_in_flight -= 1
            self._in_flight -= 1
            self._files_in_flight[name] -= 1
            if self._files_in_flight[name] <= 0:
                del self._files_in_flight[name]

    def _count_bytes(self, name: str, n: int) -> None:
        with self._lock:
            self._fstats(name).bytes_sent += n

    # -- the application --------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/files/{name}", self._files_route)
        app.router.add_route("*", "/resolve/{name}", self._resolve_route)
        app.router.add_route("*", "/cdn/{name}", self._cdn_route)
        app.router.add_route("*", "/goto", self._goto_route)
        return app

    def _lookup(self, request: web.Request) -> SimFile | None:
        name = request.match_info["name"]
        with self._lock:
            f = self._files.get(name)
        if f is None and "size" in request.query:
            f = self.add_file(
                name, int(request.query["size"]), seed=int(request.query.get("seed", "0"))
            )
        return f

    async def _files_route(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "files", check_token=True)

    async def _cdn_route(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            expires = -1
        sig = request.query.get("sig", "")
        if not hmac.compare_digest(sig, self._sign(name, expires)):
            self._record_request(name, "cdn", request)
            self._record_status(name, 403)
            return web.Response(status=403, text="SignatureDoesNotMatch")
        if self.clock.now() > expires:
            self._record_request(name, "cdn", request)
            self._record_status(name, 403)
            return web.Response(status=403, text="Request has expired")
        return await self._serve(request, "cdn", check_token=False)

    async def _resolve_route(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self._record_request(name, "resolve", request)
        f = self._lookup(request)
        early = self._early_answer(request, name, "resolve", f, check_token=True)
        if early is not None:
            return early
        assert f is not None
        expires = int(self.clock.now() + self.signed_url_ttl_s)
        location = (
            f"{self.cdn_base_url}/cdn/{name}?expires={expires}&sig={self._sign(name, expires)}"
        )
        self._record_status(name, 302)
        return web.Response(
            status=302,
            headers={
                "Location": location,
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "X-Repo-Commit": hashlib.sha1(name.encode()).hexdigest(),
                "ETag": f.etag,
            },
        )

    async def _goto_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": request.query.get("to", "/")})

    def _early_answer(
        self,
        request: web.Request,
        name: str,
        route: Route,
        f: SimFile | None,
        *,
        check_token: bool,
    ) -> web.Response | None:
        if f is None:
            self._record_status(name, 404)
            return web.Response(status=404, text="Entry not found")
        if (
            check_token
            and f.token is not None
            and request.headers.get("Authorization") != f"Bearer {f.token}"
        ):
            self._record_status(name, 401)
            return web.Response(status=401, text="Invalid credentials in Authorization header")
        fault = self._take_fault(name, route, body=0)
        if fault is not None:
            self._record_status(name, fault.status)
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            return web.Response(
                status=fault.status, text=f"injected {fault.status}", headers=headers
            )
        return None

    async def _serve(
        self, request: web.Request, route: Route, *, check_token: bool
    ) -> web.StreamResponse:
        name = request.match_info["name"]
        self._record_request(name, route, request)
        f = self._lookup(request)
        early = self._early_answer(request, name, route, f, check_token=check_token)
        if early is not None:
            return early
        assert f is not None
        size = f.size
        start, end = 0, size  # [start, end)
        ranged = False
        header = request.headers.get("Range")
        if header and f.ranges:
            m = _RANGE_RE.match(header.strip())
            parsed: tuple[int, int] | None = None
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    a = int(m.group(1))
                    b = int(m.group(2)) + 1 if m.group(2) else size
                    parsed = (a, min(b, size))
                else:
                    n = int(m.group(2))
                    parsed = (max(0, size - n), size)
            if parsed is None or parsed[0] >= parsed[1]:
                self._record_status(name, 416)
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start, end = parsed
            ranged = True
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f.etag,
            "Content-Length": str(end - start),
        }
        if f.ranges:
            headers["Accept-Ranges"] = "bytes"
        status = 200
        if ranged:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._record_status(name, status)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        if ranged:
            with self._lock:
                self._fstats(name).range_requests.append((start, end))
        fault = self._take_fault(name, route, body=end - start)
        resp = web.StreamResponse(status=status, headers=headers)
        self._enter(name, ranged)
        try:
            await resp.prepare(request)
            await self._send_body(request, resp, f, start, end, fault)
        except ConnectionError:
            pass  # the client went away: that is its business
        finally:
            self._leave(name, ranged)
        return resp

    async def _send_body(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        f: SimFile,
        start: int,
        end: int,
        fault: Fault | None,
    ) -> None:
        rate = f.rate_bps or self.per_connection_bps
        if self.total_bps and self._total_throttle is None:
            self._total_throttle = _Throttle(self.total_bps)
        chunk = 1 << 20
        if rate:
            chunk = max(4096, min(chunk, int(rate / 20)))
        if self._total_throttle is not None:
            chunk = max(4096, min(chunk, int(self._total_throttle.rate / 20)))
        limit = end
        if fault is not None and fault.kind in ("drop", "stall"):
            limit = min(end, start + fault.after_bytes)
        conn = _Throttle(rate) if rate else None
        pos = start
        view = memoryview(f.data)
        flip = start + fault.after_bytes if fault is not None and fault.kind == "corrupt" else -1
        while pos < limit:
            n = min(chunk, limit - pos)
            wait = 0.0
            if conn is not None:
                wait = conn.reserve(n)
            if self._total_throttle is not None:
                wait = max(wait, self._total_throttle.reserve(n))
            if wait > 0:
                await asyncio.sleep(wait)
            piece = bytes(view[pos : pos + n])
            if pos <= flip < pos + n:
                i = flip - pos
                piece = piece[:i] + bytes([piece[i] ^ 0xFF]) + piece[i + 1 :]
            await resp.write(piece)
            self._count_bytes(f.name, n)
            pos += n
        if fault is not None and fault.kind == "stall":
            until = time.monotonic() + fault.stall_s
            while time.monotonic() < until:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await asyncio.sleep(0.02)
        if limit < end:
            transport = request.transport
            if transport is not None:
                transport.abort()
            return
        await resp.write_eof()


class RunningFileServer:
    """``FileServer`` served from a background thread; a context manager.

    ``url`` is ``http://127.0.0.1:PORT``. The CDN side listens on 127.0.0.2 (another
    host name, so auth headers must be dropped on the redirect); where 127.0.0.2
    cannot be bound, it falls back to ``localhost`` on the main port.
    """

    def __init__(
        self,
        server: FileServer | None = None,
        *,
        port: int = 0,
        cdn_host: str | None = "127.0.0.2",
    ) -> None:
        self.server = server or FileServer()
        self._port = port
        self._cdn_host = cdn_host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.url = ""
        self.cdn_url = ""

    def file_url(self, name: str) -> str:
        return self.server.file_url(name)

    def resolve_url(self, name: str) -> str:
        return self.server.resolve_url(name)

    def __enter__(self) -> RunningFileServer:
        main = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        main.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        main.bind(("127.0.0.1", self._port))
        port = main.getsockname()[1]
        socks = [main]
        self.url = f"http://127.0.0.1:{port}"
        self.cdn_url = f"http://localhost:{port}"
        if self._cdn_host:
            cdn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                cdn.bind((self._cdn_host, 0))
            except OSError:
                cdn.close()
            else:
                socks.append(cdn)
                self.cdn_url = f"http://{self._cdn_host}:{cdn.getsockname()[1]}"
        self.server.base_url = self.url
        self.server.cdn_base_url = self.cdn_url
        self._thread = threading.Thread(
            target=self._run, args=(socks,), name="sim-files", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError("the file server did not start") from self._error
        return self

    def _run(self, socks: list[socket.socket]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(socks))
        except BaseException as exc:  # reported to the thread that called __enter__
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self, socks: list[socket.socket]) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.server.app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        for s in socks:
            await web.SockSite(runner, s).start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), 5)

    def __exit__(self, *exc_info: object) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

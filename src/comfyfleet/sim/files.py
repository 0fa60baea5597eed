"""An HTTP file server for generated content: the stand-in for CDNs and model hosts.

It serves deterministic bytes (registered files, or ``/files/NAME?size=N&seed=S``)
with the parts of HTTP a downloader depends on: single Range requests (206 and
``Content-Range``), ``ETag``, ``HEAD``, bandwidth limits per connection and in
total, a Hugging Face-style redirect (``X-Linked-Etag``, ``X-Linked-Size``) to a
"CDN" host with signed URLs that expire, and faults injected on the next N
requests for a file (an HTTP status, a dropped connection, a stall, wrong
bytes). It counts what it does, so tests can assert on parallelism and on bytes
sent again after a resume, not only on results.

It also speaks the three model hosts' own contracts (downloads.md sections 1-3, 7),
so the production resolvers are the ones tested:

- Hugging Face: ``/{owner}/{repo}/resolve/{revision}/{path}`` (and ``/datasets/...``)
  with ``X-Repo-Commit``, ``X-Linked-Etag``, ``X-Linked-Size``, a 302 to the CDN host
  for LFS files, 200 with the git blob sha1 for small ones; gated repos (401 without a
  token, 403 for an account not approved, ``X-Error-Code: GatedRepo``), private
  repos (401/404 ``RepoNotFound``), bad tokens, missing revisions and files.
- Civitai: ``/api/v1/model-versions/{id}`` (upper-case SHA256, ``sizeKB`` as a
  float) and ``/api/download/models/{id}`` (token as Bearer header or ``?token=``,
  JSON errors 401/403/404/410/429, a 307 to a storage host whose signed URL sets
  ``Content-Disposition``).
- Dropbox: shared links ``/scl/fi/{id}/{name}?rlkey=..&dl=0|1`` (an HTML preview
  for ``dl=0``, a 302 to the content host for ``dl=1``, bytes straight from the
  content host), and the API routes ``comfyfleet dropbox links`` calls, in the SDK's
  wire format (exact ``Content-Type: application/json``, schema-complete bodies,
  409 route errors, 401 ``missing_scope`` when the token lacks the route's scope).

``RunningFileServer`` runs it in a background thread on 127.0.0.1 (the hosts'
front doors and APIs), 127.0.0.2 (the Hugging Face CDN), 127.0.0.3 (Civitai's
storage) and 127.0.0.4 (``dl.dropboxusercontent.com``), so every redirect crosses
to another host name, as it does for real.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import random
import re
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from aiohttp import web

from comfyfleet.clock import Clock, SystemClock
from comfyfleet.sim.background import BackgroundApp, bind_loopback

#: Where a request arrived: the old generic routes, the hosts' front doors, the byte hosts.
Route = Literal["files", "resolve", "cdn", "hf", "civitai", "dropbox"]
FaultKind = Literal["status", "drop", "stall", "corrupt"]

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")

#: Every Dropbox scope this server knows, and the one each API route needs.
DROPBOX_SCOPES = frozenset(
    {"files.metadata.read", "files.content.read", "sharing.read", "sharing.write"}
)
_DROPBOX_ROUTE_SCOPES = {
    "files/list_folder": "files.metadata.read",
    "files/list_folder/continue": "files.metadata.read",
    "files/get_temporary_link": "files.content.read",
    "sharing/create_shared_link_with_settings": "sharing.write",
    "sharing/list_shared_links": "sharing.read",
}
_DROPBOX_TIME = "2026-01-15T10:00:00Z"
_MiB = 1 << 20


def generate_content(name: str, size: int, seed: int = 0) -> bytes:
    """The deterministic bytes of file ``name`` of ``size`` bytes for ``seed``."""
    return random.Random(f"{name}:{seed}").randbytes(size)


def dropbox_content_hash(data: bytes) -> str:
    """Dropbox's ``content_hash``: sha256 over the sha256 of each 4 MiB block."""
    blocks = b"".join(
        hashlib.sha256(data[i : i + 4 * _MiB]).digest() for i in range(0, len(data), 4 * _MiB)
    )
    return hashlib.sha256(blocks).hexdigest()


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

    @property
    def git_sha1(self) -> str:
        """The git blob sha1: what Hugging Face sends as ``ETag`` for small files."""
        return hashlib.sha1(b"blob %d\0" % self.size + self.data).hexdigest()


@dataclass
class Fault:
    """What goes wrong on one request.

    ``status``: answer ``status`` (with ``Retry-After`` when given) instead of the file.
    ``drop``: send ``after_bytes`` of the body, then close the connection.
    ``stall``: send ``after_bytes``, then send nothing for ``stall_s`` seconds
    (or until the client goes away), then close.
    ``corrupt``: send the body with the byte at ``after_bytes`` flipped.
    ``route`` limits the fault to one route: ``files``, ``resolve``, ``cdn`` (every byte
    host), or a front door: ``hf``, ``civitai``, ``dropbox`` (a status there comes with
    that host's own error body and headers).
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
    #: ``(host, value)`` for the same headers: the host name the request was sent to.
    authorization_hosts: list[tuple[str, str]] = field(default_factory=list)
    #: Most bodies sent at once by each host name (``127.0.0.3``...).
    peak_in_flight_by_host: dict[str, int] = field(default_factory=dict)

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


@dataclass
class HFRepo:
    """A Hugging Face repository: its files, revisions, and who may read it.

    ``authorized`` holds the tokens of accounts that accepted a gated repo's licence
    (or are members of a private one). Every revision shows the same files.
    """

    repo_id: str
    repo_type: Literal["model", "dataset"] = "model"
    gated: bool = False
    private: bool = False
    authorized: set[str] = field(default_factory=set)
    #: Branch or tag name -> commit sha (40 hex).
    revisions: dict[str, str] = field(default_factory=dict)
    #: Path in the repo -> (file, stored in LFS/Xet).
    files: dict[str, tuple[SimFile, bool]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"datasets/{self.repo_id}" if self.repo_type == "dataset" else self.repo_id

    def commit_for(self, revision: str) -> str | None:
        if revision in self.revisions:
            return self.revisions[revision]
        return revision if revision in self.revisions.values() else None


@dataclass
class CivitaiFile:
    """One file of a Civitai model version, as ``files[]`` of the version API shows it."""

    id: int
    file: SimFile
    filename: str
    type: str = "Model"
    format: str = "SafeTensor"
    fp: str | None = "fp16"
    size_label: str | None = "pruned"
    primary: bool = False


@dataclass
class CivitaiVersion:
    """A Civitai model version. ``require_auth``: anonymous downloads get a 401.

    ``early_access``: only the tokens in ``early_access_tokens`` may download (403
    ``Early Access`` otherwise). ``archived``: 410.
    """

    id: int
    model_id: int
    name: str
    files: list[CivitaiFile] = field(default_factory=list)
    require_auth: bool = True
    early_access: bool = False
    early_access_tokens: set[str] = field(default_factory=set)
    archived: bool = False

    def pick(self, query: Mapping[str, str]) -> CivitaiFile | None:
        """The file the download endpoint serves for these query parameters."""
        files = self.files
        if "fileId" in query:
            return next((f for f in files if str(f.id) == query["fileId"]), None)
        for key, attr in (("type", "type"), ("format", "format"), ("fp", "fp")):
            if key in query:
                files = [f for f in files if str(getattr(f, attr)) == query[key]]
        if "size" in query:
            files = [f for f in files if f.size_label == query["size"]]
        if not files:
            return None
        return next((f for f in files if f.primary), files[0])


@dataclass
class DropboxEntry:
    """A file in the simulated Dropbox account."""

    path_display: str
    file: SimFile
    id: str
    rev: str
    content_hash: str

    @property
    def path_lower(self) -> str:
        return self.path_display.lower()

    @property
    def name(self) -> str:
        return self.path_display.rsplit("/", 1)[-1]


@dataclass
class DropboxSharedLink:
    """A shared link: ``url`` is what Dropbox hands out (``...?rlkey=K&dl=0``)."""

    link_id: str
    rlkey: str
    path_lower: str
    url: str
    is_folder: bool = False


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is None:
        return None
    return auth[7:] if auth.startswith("Bearer ") else auth


def _attachment(filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


def _visibility(tag: str, allowed: bool, reason: str | None = None) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "policy": {".tag": tag},
        "resolved_policy": {".tag": tag},
        "allowed": allowed,
    }
    if reason is not None:
        policy["disallowed_reason"] = {".tag": reason}
    return policy


#: A Basic account's public link, as Dropbox sends it (every field the SDK requires).
_LINK_PERMISSIONS: dict[str, Any] = {
    "resolved_visibility": {".tag": "public"},
    "requested_visibility": {".tag": "public"},
    "can_revoke": True,
    "visibility_policies": [
        _visibility("public", True),
        _visibility("team_only", False, "user_not_on_team"),
        _visibility("password", False, "user_account_type"),
    ],
    "can_set_expiry": False,
    "can_remove_expiry": True,
    "allow_download": True,
    "can_allow_download": True,
    "can_disallow_download": False,
    "allow_comments": True,
    "team_restricts_comments": False,
    "effective_audience": {".tag": "public"},
    "link_access_level": {".tag": "viewer"},
}


class FileServer:
    """The application and its state. Thread-safe: tests read stats from another thread.

    The ``*_base_url`` attributes are set by ``RunningFileServer``: ``base_url`` serves
    Hugging Face (and the generic routes), ``civitai_base_url`` Civitai's API,
    ``dropbox_base_url`` Dropbox's links and API, ``cdn_base_url`` the Hugging Face
    CDN, ``storage_base_url`` Civitai's storage and ``dropbox_content_base_url``
    Dropbox's content host. Every host serves every route; the names only decide
    which host each link and redirect points at.
    """

    def __init__(
        self,
        *,
        per_connection_bps: float | None = None,
        total_bps: float | None = None,
        signed_url_ttl_s: float = 3600.0,
        dropbox_temporary_link_ttl_s: float = 4 * 3600.0,
        dropbox_page_size: int = 500,
        clock: Clock | None = None,
    ) -> None:
        self.per_connection_bps = per_connection_bps
        self.total_bps = total_bps
        self.signed_url_ttl_s = signed_url_ttl_s
        self.dropbox_temporary_link_ttl_s = dropbox_temporary_link_ttl_s
        #: Most entries per ``files/list_folder`` page (small values exercise ``continue``).
        self.dropbox_page_size = dropbox_page_size
        #: ``shared_link_already_exists`` without the link's metadata (Dropbox may omit it).
        self.dropbox_omit_existing_link_metadata = False
        self.clock: Clock = clock or SystemClock()
        self.base_url = ""
        self.civitai_base_url = ""
        self.dropbox_base_url = ""
        self.cdn_base_url = ""
        self.storage_base_url = ""
        self.dropbox_content_base_url = ""
        self._secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._files: dict[str, SimFile] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._stats: dict[str, FileStats] = {}
        self._in_flight = 0
        self._peak_in_flight = 0
        self._files_in_flight: Counter[str] = Counter()
        self._peak_files_in_flight = 0
        self._host_in_flight: Counter[str] = Counter()
        self._peak_host_in_flight: dict[str, int] = {}
        self._auth_seen: list[tuple[str, str, str]] = []
        self._auth_hosts: list[tuple[str, str]] = []
        self._total_throttle: _Throttle | None = None
        self._blobs: dict[str, str] = {}
        self.hf_tokens: set[str] = set()
        self._hf_repos: dict[str, HFRepo] = {}
        self.civitai_tokens: set[str] = set()
        self._civitai: dict[int, CivitaiVersion] = {}
        self._civitai_file_ids = 1000
        #: Dropbox access token -> the scopes it was granted.
        self.dropbox_tokens: dict[str, frozenset[str]] = {}
        self._dropbox: dict[str, DropboxEntry] = {}
        self._dropbox_links: dict[str, DropboxSharedLink] = {}

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
            self._blobs[self._blob_key(name)] = name
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
                authorization_hosts=list(self._auth_hosts),
                peak_in_flight_by_host=dict(self._peak_host_in_flight),
            )

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()
            self._peak_in_flight = self._in_flight
            self._peak_files_in_flight = len(self._files_in_flight)
            self._auth_seen.clear()
            self._auth_hosts.clear()
            self._peak_host_in_flight = {h: n for h, n in self._host_in_flight.items() if n > 0}

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
                self._auth_hosts.append((request.host.rsplit(":", 1)[0], auth))

    def _record_status(self, name: str, status: int) -> None:
        with self._lock:
            self._fstats(name).statuses[status] += 1

    def _enter(self, name: str, ranged: bool, host: str = "") -> None:
        with self._lock:
            self._host_in_flight[host] += 1
            self._peak_host_in_flight[host] = max(
                self._peak_host_in_flight.get(host, 0), self._host_in_flight[host]
            )
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

    def _leave(self, name: str, ranged: bool, host: str = "") -> None:
        with self._lock:
            self._host_in_flight[host] -= 1
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

    # -- Hugging Face, Civitai and Dropbox content ----------------------------

    def add_hf_repo(
        self,
        repo_id: str,
        *,
        repo_type: Literal["model", "dataset"] = "model",
        gated: bool = False,
        private: bool = False,
        authorized: Iterable[str] = (),
        revisions: Mapping[str, str] | None = None,
    ) -> HFRepo:
        """Create (or reconfigure) a repository; ``main`` points at a commit by default."""
        key = f"datasets/{repo_id}" if repo_type == "dataset" else repo_id
        with self._lock:
            repo = self._hf_repos.get(key)
            if repo is None:
                repo = self._hf_repos[key] = HFRepo(repo_id=repo_id, repo_type=repo_type)
            repo.gated, repo.private = gated, private
            repo.authorized = set(authorized)
            if revisions is not None:
                repo.revisions = dict(revisions)
            if not repo.revisions:
                repo.revisions = {"main": hashlib.sha1(f"{key}@main".encode()).hexdigest()}
        return repo

    def hf_repo(self, repo_id: str, repo_type: Literal["model", "dataset"] = "model") -> HFRepo:
        with self._lock:
            return self._hf_repos[f"datasets/{repo_id}" if repo_type == "dataset" else repo_id]

    def add_hf_file(
        self,
        repo_id: str,
        path: str,
        size: int | None = None,
        *,
        data: bytes | None = None,
        seed: int = 0,
        lfs: bool = True,
        repo_type: Literal["model", "dataset"] = "model",
        rate_bps: float | None = None,
    ) -> SimFile:
        """Add ``path`` to a repository (created public if new). ``lfs=False``: a small
        file stored in git, served directly with its blob sha1 as ETag."""
        key = f"datasets/{repo_id}" if repo_type == "dataset" else repo_id
        with self._lock:
            exists = key in self._hf_repos
        repo = (
            self.hf_repo(repo_id, repo_type)
            if exists
            else self.add_hf_repo(repo_id, repo_type=repo_type)
        )
        f = self.add_file(f"hf/{key}/{path}", size, data=data, seed=seed, rate_bps=rate_bps)
        with self._lock:
            repo.files[path] = (f, lfs)
        return f

    def add_civitai_file(
        self,
        version_id: int,
        filename: str,
        size: int | None = None,
        *,
        data: bytes | None = None,
        seed: int = 0,
        primary: bool | None = None,
        file_type: str = "Model",
        file_format: str = "SafeTensor",
        fp: str | None = "fp16",
        size_label: str | None = "pruned",
        rate_bps: float | None = None,
    ) -> SimFile:
        """Add a file to a model version (created if new; by default it needs a token).

        The first file of a version is its primary one unless ``primary`` says otherwise.
        """
        f = self.add_file(
            f"civitai/{version_id}/{filename}", size, data=data, seed=seed, rate_bps=rate_bps
        )
        with self._lock:
            version = self._civitai.get(version_id)
            if version is None:
                version = self._civitai[version_id] = CivitaiVersion(
                    id=version_id, model_id=version_id // 10 + 1, name=f"v{version_id}"
                )
            self._civitai_file_ids += 1
            version.files.append(
                CivitaiFile(
                    id=self._civitai_file_ids,
                    file=f,
                    filename=filename,
                    type=file_type,
                    format=file_format,
                    fp=fp,
                    size_label=size_label,
                    primary=not version.files if primary is None else primary,
                )
            )
        return f

    def civitai_version(self, version_id: int) -> CivitaiVersion:
        with self._lock:
            return self._civitai[version_id]

    def add_dropbox_token(self, token: str, scopes: Iterable[str] = DROPBOX_SCOPES) -> None:
        """Accept ``token`` on the Dropbox API, with only ``scopes``."""
        with self._lock:
            self.dropbox_tokens[token] = frozenset(scopes)

    def add_dropbox_file(
        self,
        path: str,
        size: int | None = None,
        *,
        data: bytes | None = None,
        seed: int = 0,
        rate_bps: float | None = None,
    ) -> SimFile:
        """Put a file at ``path`` (``/Folder/sub/name``) in the Dropbox account."""
        if not path.startswith("/") or path.endswith("/"):
            raise ValueError(f"a Dropbox file path starts with / and names a file: {path!r}")
        f = self.add_file(f"dropbox{path}", size, data=data, seed=seed, rate_bps=rate_bps)
        digest = hashlib.sha256(path.lower().encode()).digest()
        entry = DropboxEntry(
            path_display=path,
            file=f,
            id="id:" + base64.urlsafe_b64encode(digest[:16]).decode().rstrip("="),
            rev=hashlib.sha1(f.sha256.encode()).hexdigest()[:15],
            content_hash=dropbox_content_hash(f.data),
        )
        with self._lock:
            self._dropbox[entry.path_lower] = entry
        return f

    def dropbox_entry(self, path: str) -> DropboxEntry:
        with self._lock:
            return self._dropbox[path.lower()]

    def share_dropbox_path(self, path: str) -> str:
        """The shared link of ``path`` (a file or folder), made if there is none yet."""
        lower = path.lower().rstrip("/")
        with self._lock:
            for link in self._dropbox_links.values():
                if link.path_lower == lower:
                    return link.url
            is_folder = lower not in self._dropbox
            name = path.rstrip("/").rsplit("/", 1)[-1]
            link_id = base64.b32encode(hashlib.sha256(lower.encode()).digest()[:15]).decode()
            link_id = link_id.lower()
            rlkey = secrets.token_hex(12)
            kind = "fo" if is_folder else "fi"
            web = self.dropbox_base_url or self.base_url
            url = f"{web}/scl/{kind}/{link_id}/{quote(name)}?rlkey={rlkey}&dl=0"
            self._dropbox_links[link_id] = DropboxSharedLink(
                link_id=link_id, rlkey=rlkey, path_lower=lower, url=url, is_folder=is_folder
            )
            return url

    def dropbox_shared_links(self) -> list[DropboxSharedLink]:
        with self._lock:
            return list(self._dropbox_links.values())

    # -- signed URLs on the byte hosts ----------------------------------------

    def _blob_key(self, name: str) -> str:
        return hashlib.sha256(f"blob:{name}".encode()).hexdigest()[:24]

    def signed_blob_url(
        self,
        name: str,
        *,
        base: str | None = None,
        ttl_s: float | None = None,
        disposition: str | None = None,
        dropbox: bool = False,
    ) -> str:
        """A signed, expiring URL for file ``name`` on a byte host.

        ``dropbox``: a ``/cd/`` URL, which answers 410 Gone once expired (Dropbox's
        temporary links); otherwise ``/blobs/``, which answers 403 like S3 and R2.
        ``disposition`` becomes the ``Content-Disposition`` of the answer, as
        ``response-content-disposition`` does on a presigned R2 URL.
        """
        key = self._blob_key(name)
        expires = int(self.clock.now() + (self.signed_url_ttl_s if ttl_s is None else ttl_s))
        filename = quote(name.rsplit("/", 1)[-1])
        route = "cd" if dropbox else "blobs"
        url = (
            f"{base or self.cdn_base_url}/{route}/{key}/{filename}"
            f"?expires={expires}&sig={self._sign('blob:' + key, expires)}"
        )
        if disposition is not None:
            url += "&response-content-disposition=" + quote(disposition, safe="")
        return url

    # -- the application --------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/files/{name}", self._files_route)
        app.router.add_route("*", "/resolve/{name}", self._resolve_route)
        app.router.add_route("*", "/cdn/{name}", self._cdn_route)
        app.router.add_route("*", "/goto", self._goto_route)
        app.router.add_route("*", "/blobs/{key}/{filename}", self._blob_route)
        app.router.add_route("*", "/cd/{key}/{filename}", self._blob_route)
        app.router.add_route("*", "/api/v1/model-versions/{id}", self._civitai_version_route)
        app.router.add_route("*", "/api/download/models/{id}", self._civitai_download_route)
        app.router.add_route("*", "/scl/{kind}/{link_id}/{name}", self._dropbox_link_route)
        app.router.add_route("*", "/2/{route:.+}", self._dropbox_api_route)
        app.router.add_route(
            "*", "/datasets/{owner}/{repo}/resolve/{revision}/{path:.+}", self._hf_route
        )
        app.router.add_route("*", "/{owner}/{repo}/resolve/{revision}/{path:.+}", self._hf_route)
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
        return await self._serve_file(request, route, f)

    async def _serve_file(
        self,
        request: web.Request,
        route: Route,
        f: SimFile,
        *,
        headers: Mapping[str, str] | None = None,
        etag: str | None = None,
    ) -> web.StreamResponse:
        """The bytes of ``f`` (a Range, HEAD, body faults); the request is recorded."""
        name = f.name
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
        out = {
            "Content-Type": "application/octet-stream",
            "ETag": etag or f.etag,
            "Content-Length": str(end - start),
            **(headers or {}),
        }
        if f.ranges:
            out["Accept-Ranges"] = "bytes"
        status = 200
        if ranged:
            status = 206
            out["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._record_status(name, status)
        if request.method == "HEAD":
            return web.Response(status=status, headers=out)
        if ranged:
            with self._lock:
                self._fstats(name).range_requests.append((start, end))
        fault = self._take_fault(name, route, body=end - start)
        resp = web.StreamResponse(status=status, headers=out)
        host = request.host.rsplit(":", 1)[0]
        self._enter(name, ranged, host)
        try:
            await resp.prepare(request)
            await self._send_body(request, resp, f, start, end, fault)
        except ConnectionError:
            pass  # the client went away: that is its business
        finally:
            self._leave(name, ranged, host)
        return resp

    # -- byte hosts: signed, expiring URLs ----------------------------------------

    async def _blob_route(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        dropbox = request.path.startswith("/cd/")
        with self._lock:
            name = self._blobs.get(key)
            f = self._files.get(name) if name is not None else None
        stat_name = name or f"blob/{key}"
        self._record_request(stat_name, "cdn", request)
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            expires = -1
        sig = request.query.get("sig", "")
        if f is None or not hmac.compare_digest(sig, self._sign("blob:" + key, expires)):
            self._record_status(stat_name, 403)
            return web.Response(status=403, text="SignatureDoesNotMatch")
        if self.clock.now() > expires:
            status = 410 if dropbox else 403
            self._record_status(stat_name, status)
            return web.Response(status=status, text="Gone" if dropbox else "Request has expired")
        early = self._early_answer(request, f.name, "cdn", f, check_token=False)
        if early is not None:
            return early
        headers: dict[str, str] = {}
        if dropbox:
            headers["Content-Disposition"] = _attachment(request.match_info["filename"])
        elif "response-content-disposition" in request.query:
            headers["Content-Disposition"] = request.query["response-content-disposition"]
        return await self._serve_file(request, "cdn", f, headers=headers)

    # -- Hugging Face ----------------------------------------------------------------

    def _hf_error(
        self,
        name: str,
        status: int,
        code: str | None,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        self._record_status(name, status)
        out = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
        if code is not None:
            out["X-Error-Code"] = code
        return web.Response(
            status=status, body=json.dumps({"error": message}).encode(), headers=out
        )

    async def _hf_route(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        dataset = request.path.startswith("/datasets/")
        repo_id = f"{mi['owner']}/{mi['repo']}"
        key = f"datasets/{repo_id}" if dataset else repo_id
        revision, path = mi["revision"], mi["path"]
        name = f"hf/{key}/{path}"
        self._record_request(name, "hf", request)
        token = _bearer(request)
        with self._lock:
            repo = self._hf_repos.get(key)
            entry = repo.files.get(path) if repo is not None else None
            valid = token in self.hf_tokens
        if token is not None and not valid:
            return self._hf_error(name, 401, None, "Invalid credentials in Authorization header")
        if repo is None or (repo.private and token not in repo.authorized):
            return self._hf_error(
                name, 404 if token else 401, "RepoNotFound", "Repository not found"
            )
        kind = "dataset" if dataset else "model"
        if repo.gated and token is None:
            return self._hf_error(
                name,
                401,
                "GatedRepo",
                f"Access to {kind} {repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )
        if repo.gated and token not in repo.authorized:
            return self._hf_error(
                name,
                403,
                "GatedRepo",
                f"Access to {kind} {repo_id} is restricted and you are not in the authorized "
                f"list. Visit {self.base_url}/{key} to ask for access.",
            )
        commit = repo.commit_for(revision)
        if commit is None:
            return self._hf_error(name, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if entry is None:
            return self._hf_error(
                name,
                404,
                "EntryNotFound",
                f"{path} does not exist on {revision!r}",
                {"X-Repo-Commit": commit},
            )
        f, lfs = entry
        fault = self._take_fault(name, "hf", body=0)
        if fault is not None:
            extra = {}
            if fault.status == 429:
                wait = 1 if fault.retry_after is None else fault.retry_after
                extra["RateLimit"] = f'"resolvers";r=0;t={wait:g}'
                extra["RateLimit-Policy"] = '"fixed window";"resolvers";q=3000;w=300'
            elif fault.retry_after is not None:
                extra["Retry-After"] = f"{fault.retry_after:g}"
            message = "Too Many Requests" if fault.status == 429 else f"injected {fault.status}"
            return self._hf_error(name, fault.status, None, message, extra)
        if not lfs:
            return await self._serve_file(
                request, "hf", f, headers={"X-Repo-Commit": commit}, etag=f'"{f.git_sha1}"'
            )
        basename = path.rsplit("/", 1)[-1]
        location = self.signed_blob_url(
            f.name,
            base=self.cdn_base_url,
            disposition=f"inline; filename*=UTF-8''{quote(basename)}; filename=\"{basename}\";",
        )
        self._record_status(name, 302)
        return web.Response(
            status=302,
            headers={
                "Location": location,
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "ETag": f'"{f.sha256}"',
                "Accept-Ranges": "bytes",
            },
        )

    # -- Civitai ---------------------------------------------------------------------

    def _civitai_json(
        self, name: str, status: int, body: Mapping[str, Any], **headers: str
    ) -> web.Response:
        self._record_status(name, status)
        return web.Response(
            status=status,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json; charset=utf-8", **headers},
        )

    def _civitai_version_body(self, version: CivitaiVersion) -> dict[str, Any]:
        base = self.civitai_base_url or self.base_url
        files = []
        for cf in version.files:
            url = f"{base}/api/download/models/{version.id}"
            if not cf.primary:
                url += f"?type={quote(cf.type)}&format={quote(cf.format)}"
            files.append(
                {
                    "id": cf.id,
                    "sizeKB": cf.file.size / 1024,
                    "name": cf.filename,
                    "type": cf.type,
                    "pickleScanResult": "Success",
                    "pickleScanMessage": "No Pickle imports",
                    "virusScanResult": "Success",
                    "virusScanMessage": None,
                    "scannedAt": "2026-01-15T10:00:00.000Z",
                    "metadata": {"format": cf.format, "size": cf.size_label, "fp": cf.fp},
                    "hashes": {
                        "AutoV2": cf.file.sha256[:10].upper(),
                        "SHA256": cf.file.sha256.upper(),
                        "CRC32": f"{binascii.crc32(cf.file.data):08X}",
                        "BLAKE3": hashlib.blake2s(cf.file.data).hexdigest().upper(),
                    },
                    "primary": cf.primary,
                    "downloadUrl": url,
                }
            )
        return {
            "id": version.id,
            "modelId": version.model_id,
            "name": version.name,
            "createdAt": "2026-01-15T10:00:00.000Z",
            "updatedAt": "2026-01-15T10:00:00.000Z",
            "status": "Published",
            "publishedAt": "2026-01-15T10:00:00.000Z",
            "trainedWords": [],
            "baseModel": "SDXL 1.0",
            "baseModelType": "Standard",
            "availability": "EarlyAccess" if version.early_access else "Public",
            "description": None,
            "model": {
                "name": f"Model {version.model_id}",
                "type": "Checkpoint",
                "nsfw": False,
                "poi": False,
            },
            "files": files,
            "images": [],
            "downloadUrl": f"{base}/api/download/models/{version.id}",
        }

    async def _civitai_version_route(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["id"]
        name = f"civitai-api/{raw}"
        self._record_request(name, "civitai", request)
        if not raw.isdigit():
            return self._civitai_json(name, 400, {"error": f"Invalid id: {raw!r} is not a number"})
        with self._lock:
            version = self._civitai.get(int(raw))
        if version is None:
            return self._civitai_json(name, 404, {"error": f"No model version with id {raw}"})
        return self._civitai_json(name, 200, self._civitai_version_body(version))

    async def _civitai_download_route(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["id"]
        if not raw.isdigit():
            name = f"civitai/{raw}"
            self._record_request(name, "civitai", request)
            return self._civitai_json(name, 400, {"error": "modelVersionId: Expected number"})
        with self._lock:
            version = self._civitai.get(int(raw))
        picked = version.pick(request.query) if version is not None else None
        name = picked.file.name if picked is not None else f"civitai/{raw}"
        self._record_request(name, "civitai", request)
        if version is None or picked is None:
            return self._civitai_json(name, 404, {"error": "File not found"})
        token = _bearer(request) or request.query.get("token")
        authed = token is not None and token in self.civitai_tokens
        if version.archived:
            return self._civitai_json(
                name, 410, {"error": "Model archived, not available for download"}
            )
        if version.require_auth and not authed:
            return self._civitai_json(
                name,
                401,
                {
                    "error": "Unauthorized",
                    "message": "The creator of this asset requires you to be logged in to "
                    "download it",
                },
            )
        if version.early_access and token not in version.early_access_tokens:
            return self._civitai_json(
                name,
                403,
                {
                    "error": "Early Access",
                    "deadline": "2026-12-31T00:00:00.000Z",
                    "message": "This asset is in Early Access. You can use Buzz access it now!",
                },
            )
        fault = self._take_fault(name, "civitai", body=0)
        if fault is not None:
            bodies: dict[int, dict[str, Any]] = {
                403: {"error": "Forbidden"},
                404: {"error": "File not found"},
                429: {
                    "error": "We've noticed an unusual amount of downloading from your "
                    "account. Contact support@civitai.com or come back later."
                },
                500: {"error": "Error getting file"},
            }
            extra = {}
            if fault.retry_after is not None:
                extra["Retry-After"] = f"{fault.retry_after:g}"
            body = bodies.get(fault.status, {"error": f"injected {fault.status}"})
            return self._civitai_json(name, fault.status, body, **extra)
        location = self.signed_blob_url(
            picked.file.name,
            base=self.storage_base_url,
            disposition=f'attachment; filename="{picked.filename}"',
        )
        self._record_status(name, 307)
        return web.Response(
            status=307,
            headers={"Location": location, "Cache-Control": "no-store, max-age=0"},
        )

    # -- Dropbox: shared links --------------------------------------------------------

    async def _dropbox_link_route(self, request: web.Request) -> web.StreamResponse:
        link_id = request.match_info["link_id"]
        with self._lock:
            link = self._dropbox_links.get(link_id)
            entry = self._dropbox.get(link.path_lower) if link is not None else None
        name = entry.file.name if entry is not None else f"dropbox-link/{link_id}"
        self._record_request(name, "dropbox", request)
        if link is None or request.query.get("rlkey") != link.rlkey:
            self._record_status(name, 404)
            return web.Response(
                status=404,
                text="<html><body>That didn't work for some reason</body></html>",
                content_type="text/html",
            )
        if entry is None:
            # A folder link with dl=1 is a zip of the whole folder: never what a
            # downloader of multi-GB models wants, so it is not simulated.
            self._record_status(name, 501)
            return web.Response(status=501, text="folder downloads (zip) are not simulated")
        on_content_host = request.host == urlsplit(self.dropbox_content_base_url).netloc
        if on_content_host:
            early = self._early_answer(request, name, "dropbox", entry.file, check_token=False)
            if early is not None:
                return early
            return await self._serve_file(
                request,
                "dropbox",
                entry.file,
                headers={"Content-Disposition": _attachment(entry.name)},
            )
        if request.query.get("dl") != "1":
            self._record_status(name, 200)
            return web.Response(
                text=f"<!DOCTYPE html><html><head><title>{entry.name} - Dropbox</title></head>"
                "<body>preview</body></html>",
                content_type="text/html",
            )
        early = self._early_answer(request, name, "dropbox", entry.file, check_token=False)
        if early is not None:
            return early
        location = self.signed_blob_url(
            entry.file.name, base=self.dropbox_content_base_url, dropbox=True
        )
        self._record_status(name, 302)
        return web.Response(status=302, headers={"Location": location})

    # -- Dropbox: the API --------------------------------------------------------------

    def _dbx_json(self, status: int, body: Any) -> web.Response:
        return web.Response(
            status=status,
            body=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "X-Dropbox-Request-Id": secrets.token_hex(16),
            },
        )

    def _dbx_route_error(self, tag: str, inner: Mapping[str, Any] | None = None) -> web.Response:
        error: dict[str, Any] = {".tag": tag}
        summary = f"{tag}/"
        if inner is not None:
            error[tag] = dict(inner)
            if ".tag" in inner:
                summary = f"{tag}/{inner['.tag']}/"
        return self._dbx_json(409, {"error_summary": summary, "error": error})

    def _dbx_tree(self) -> tuple[dict[str, str], dict[str, DropboxEntry]]:
        """Folders (path_lower -> path_display, implied by the files) and files."""
        with self._lock:
            files = dict(self._dropbox)
        folders: dict[str, str] = {}
        for entry in files.values():
            parts = entry.path_display.split("/")[1:-1]
            for i in range(1, len(parts) + 1):
                display = "/" + "/".join(parts[:i])
                folders.setdefault(display.lower(), display)
        return folders, files

    @staticmethod
    def _dbx_file(entry: DropboxEntry) -> dict[str, Any]:
        return {
            ".tag": "file",
            "name": entry.name,
            "path_lower": entry.path_lower,
            "path_display": entry.path_display,
            "id": entry.id,
            "client_modified": _DROPBOX_TIME,
            "server_modified": _DROPBOX_TIME,
            "rev": entry.rev,
            "size": entry.file.size,
            "is_downloadable": True,
            "content_hash": entry.content_hash,
        }

    @staticmethod
    def _dbx_folder(display: str) -> dict[str, Any]:
        digest = hashlib.sha256(display.lower().encode()).digest()
        return {
            ".tag": "folder",
            "name": display.rsplit("/", 1)[-1],
            "path_lower": display.lower(),
            "path_display": display,
            "id": "id:" + base64.urlsafe_b64encode(digest[:16]).decode().rstrip("="),
        }

    def _dbx_link(self, link: DropboxSharedLink) -> dict[str, Any]:
        folders, files = self._dbx_tree()
        entry = files.get(link.path_lower)
        if entry is not None:
            return {
                ".tag": "file",
                "url": link.url,
                "id": entry.id,
                "name": entry.name,
                "path_lower": entry.path_lower,
                "link_permissions": _LINK_PERMISSIONS,
                "client_modified": _DROPBOX_TIME,
                "server_modified": _DROPBOX_TIME,
                "rev": entry.rev,
                "size": entry.file.size,
            }
        folder = self._dbx_folder(folders.get(link.path_lower, link.path_lower))
        return {
            ".tag": "folder",
            "url": link.url,
            "id": folder["id"],
            "name": folder["name"],
            "path_lower": link.path_lower,
            "link_permissions": _LINK_PERMISSIONS,
        }

    async def _dropbox_api_route(self, request: web.Request) -> web.StreamResponse:
        route = request.match_info["route"]
        self._record_request(f"dropbox-api/{route}", "dropbox", request)
        handlers = {
            "files/list_folder": self._dbx_list_folder,
            "files/list_folder/continue": self._dbx_list_folder_continue,
            "files/get_temporary_link": self._dbx_get_temporary_link,
            "sharing/create_shared_link_with_settings": self._dbx_create_shared_link,
            "sharing/list_shared_links": self._dbx_list_shared_links,
        }
        handler = handlers.get(route)
        if request.method != "POST" or handler is None:
            return web.Response(status=404, text=f"Unknown API function: {route!r}")
        auth = request.headers.get("Authorization")
        if auth is None:
            return web.Response(
                status=400,
                text=f'Error in call to API function "{route}": Must provide HTTP header '
                '"Authorization" or URL parameter "authorization".',
            )
        token = auth[7:] if auth.startswith("Bearer ") else ""
        with self._lock:
            scopes = self.dropbox_tokens.get(token)
        if scopes is None:
            return self._dbx_json(
                401,
                {
                    "error_summary": "invalid_access_token/",
                    "error": {".tag": "invalid_access_token"},
                },
            )
        needed = _DROPBOX_ROUTE_SCOPES[route]
        if needed not in scopes:
            return self._dbx_json(
                401,
                {
                    "error_summary": "missing_scope/",
                    "error": {".tag": "missing_scope", "required_scope": needed},
                },
            )
        try:
            body = json.loads(await request.read() or b"null")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return web.Response(
                status=400,
                text=f'Error in call to API function "{route}": request body: could not '
                "decode input as JSON",
            )
        try:
            return handler(body)
        except (KeyError, TypeError, ValueError) as exc:
            return web.Response(
                status=400,
                text=f'Error in call to API function "{route}": request body: {exc}',
            )

    def _dbx_path(self, body: Mapping[str, Any]) -> str:
        path = body["path"]
        if not isinstance(path, str):
            raise TypeError("path: expected a string")
        if path == "/" or (path and not path.startswith("/")):
            raise ValueError(f"path: {path!r} did not match pattern '(/(.|[\\r\\n])*)?'")
        return path.lower().rstrip("/")

    def _dbx_list_folder(self, body: Mapping[str, Any]) -> web.Response:
        lower = self._dbx_path(body)
        recursive = bool(body.get("recursive", False))
        folders, files = self._dbx_tree()
        if lower in files:
            return self._dbx_route_error("path", {".tag": "not_folder"})
        if lower and lower not in folders:
            return self._dbx_route_error("path", {".tag": "not_found"})
        limit = body.get("limit")
        page = min(int(limit), self.dropbox_page_size) if limit else self.dropbox_page_size
        return self._dbx_page(lower, recursive, 0, page)

    def _dbx_entries(self, lower: str, recursive: bool) -> list[dict[str, Any]]:
        folders, files = self._dbx_tree()
        prefix = lower + "/"
        entries: list[tuple[str, dict[str, Any]]] = []
        if lower and recursive:
            entries.append((lower, self._dbx_folder(folders[lower])))

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        entries += [(p, self._dbx_folder(d)) for p, d in folders.items() if wanted(p)]
        entries += [(p, self._dbx_file(e)) for p, e in files.items() if wanted(p)]
        return [e for _, e in sorted(entries, key=lambda pe: pe[0])]

    def _dbx_page(self, lower: str, recursive: bool, offset: int, page: int) -> web.Response:
        entries = self._dbx_entries(lower, recursive)
        end = offset + page
        state = {"p": lower, "r": recursive, "o": end, "n": page}
        cursor = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
        return self._dbx_json(
            200, {"entries": entries[offset:end], "cursor": cursor, "has_more": end < len(entries)}
        )

    def _dbx_list_folder_continue(self, body: Mapping[str, Any]) -> web.Response:
        try:
            state = json.loads(base64.urlsafe_b64decode(str(body["cursor"]).encode()))
            lower, recursive = str(state["p"]), bool(state["r"])
            offset, page = int(state["o"]), int(state["n"])
        except (ValueError, KeyError, TypeError):
            return self._dbx_route_error("reset")
        return self._dbx_page(lower, recursive, offset, page)

    def _dbx_get_temporary_link(self, body: Mapping[str, Any]) -> web.Response:
        lower = self._dbx_path(body)
        folders, files = self._dbx_tree()
        entry = files.get(lower)
        if entry is None:
            tag = "not_file" if lower in folders or not lower else "not_found"
            return self._dbx_route_error("path", {".tag": tag})
        link = self.signed_blob_url(
            entry.file.name,
            base=self.dropbox_content_base_url,
            ttl_s=self.dropbox_temporary_link_ttl_s,
            dropbox=True,
        )
        return self._dbx_json(200, {"metadata": self._dbx_file(entry), "link": link})

    def _dbx_create_shared_link(self, body: Mapping[str, Any]) -> web.Response:
        lower = self._dbx_path(body)
        folders, files = self._dbx_tree()
        if lower not in files and lower not in folders:
            return self._dbx_route_error("path", {".tag": "not_found"})
        with self._lock:
            existing = next(
                (k for k in self._dropbox_links.values() if k.path_lower == lower), None
            )
        if existing is not None:
            if self.dropbox_omit_existing_link_metadata:
                return self._dbx_route_error("shared_link_already_exists")
            return self._dbx_route_error(
                "shared_link_already_exists",
                {".tag": "metadata", "metadata": self._dbx_link(existing)},
            )
        display = files[lower].path_display if lower in files else folders[lower]
        self.share_dropbox_path(display)
        with self._lock:
            link = next(k for k in self._dropbox_links.values() if k.path_lower == lower)
        return self._dbx_json(200, self._dbx_link(link))

    def _dbx_list_shared_links(self, body: Mapping[str, Any]) -> web.Response:
        links = self.dropbox_shared_links()
        if body.get("path") is not None:
            lower = self._dbx_path(body)
            folders, files = self._dbx_tree()
            if lower not in files and lower not in folders:
                return self._dbx_route_error("path", {".tag": "not_found"})
            if body.get("direct_only"):
                links = [k for k in links if k.path_lower == lower]
            else:
                links = [
                    k
                    for k in links
                    if k.path_lower == lower or lower.startswith(k.path_lower + "/")
                ]
        return self._dbx_json(200, {"links": [self._dbx_link(k) for k in links], "has_more": False})

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

    ``url`` is ``http://127.0.0.1:PORT``: Hugging Face and the generic routes. Every
    other host listens on its own loopback address, so each token has a host of its
    own and auth headers must be dropped on each redirect: ``civitai_url``
    (127.0.0.5, Civitai's API), ``dropbox_url`` (127.0.0.6, www.dropbox.com and the
    Dropbox API), ``cdn_url`` (127.0.0.2, Hugging Face's CDN), ``storage_url``
    (127.0.0.3, Civitai's storage) and ``dropbox_content_url`` (127.0.0.4,
    ``dl.dropboxusercontent.com``). Where one cannot be bound, it falls back to
    ``localhost`` on the main port.
    ``env()`` points comfyfleet's sources at this server.
    """

    def __init__(
        self,
        server: FileServer | None = None,
        *,
        port: int = 0,
        cdn_host: str | None = "127.0.0.2",
        storage_host: str | None = "127.0.0.3",
        dropbox_content_host: str | None = "127.0.0.4",
        civitai_host: str | None = "127.0.0.5",
        dropbox_host: str | None = "127.0.0.6",
    ) -> None:
        self.server = server or FileServer()
        self._port = port
        self._cdn_host = cdn_host
        self._storage_host = storage_host
        self._dropbox_content_host = dropbox_content_host
        self._civitai_host = civitai_host
        self._dropbox_host = dropbox_host
        self._app = BackgroundApp(self.server.app, name="sim-files", what="the file server")
        self.url = ""
        self.civitai_url = ""
        self.dropbox_url = ""
        self.cdn_url = ""
        self.storage_url = ""
        self.dropbox_content_url = ""

    def file_url(self, name: str) -> str:
        return self.server.file_url(name)

    def resolve_url(self, name: str) -> str:
        return self.server.resolve_url(name)

    @property
    def hosts(self) -> list[str]:
        """Every host name this server answers on (for an allowlist)."""
        urls = (
            self.url,
            self.civitai_url,
            self.dropbox_url,
            self.cdn_url,
            self.storage_url,
            self.dropbox_content_url,
        )
        return sorted({urlsplit(u).hostname or "" for u in urls} - {""})

    def env(self) -> dict[str, str]:
        """Environment variables that point comfyfleet's sources at this server."""
        hosts = ",".join(self.hosts)
        return {
            "HF_ENDPOINT": self.url,
            "CIVITAI_BASE_URL": self.civitai_url,
            "DROPBOX_API_URL": self.dropbox_url,
            "DROPBOX_CONTENT_URL": self.dropbox_url,
            "DROPBOX_WEB_URL": self.dropbox_url,
            "DM_ALLOWED_DOMAINS": hosts,
            "DM_ALLOWED_HTTP_HOSTS": hosts,
        }

    def __enter__(self) -> RunningFileServer:
        main = bind_loopback(self._port)
        port = main.getsockname()[1]
        socks = [main]
        self.url = f"http://127.0.0.1:{port}"

        def side(host: str | None) -> str:
            if host:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.bind((host, 0))
                except OSError:
                    sock.close()
                else:
                    socks.append(sock)
                    return f"http://{host}:{sock.getsockname()[1]}"
            return f"http://localhost:{port}"

        self.civitai_url = side(self._civitai_host)
        self.dropbox_url = side(self._dropbox_host)
        self.cdn_url = side(self._cdn_host)
        self.storage_url = side(self._storage_host)
        self.dropbox_content_url = side(self._dropbox_content_host)
        self.server.base_url = self.url
        self.server.civitai_base_url = self.civitai_url
        self.server.dropbox_base_url = self.dropbox_url
        self.server.cdn_base_url = self.cdn_url
        self.server.storage_base_url = self.storage_url
        self.server.dropbox_content_base_url = self.dropbox_content_url
        self._app.start(socks)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._app.stop()

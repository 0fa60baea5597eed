"""Where model files come from: ``hf://``, ``civitai://``, Dropbox links and plain URLs.

``SourceResolver.resolve`` turns a source as a manifest writes it into a
``ResolvedSource``: the direct URL to fetch (a signed CDN URL, resolved once here so
the engine never walks the redirects again per connection), the auth headers that
belong to that URL's host and to no other, the file name, the sha256 and size when
the host publishes them, and a stable identity for resuming. ``download_item`` makes
it a ``DownloadItem`` whose ``resolve`` callback asks again when a signed URL
expires; ``download_options`` gives the engine the domain allowlist (checked on the
first URL and on every redirect) and Civitai's limit of 2 connections per host.

- ``hf://owner/repo/path/in/repo[@revision]`` (also ``hf://datasets/...``): a ``HEAD``
  of the resolve URL without following the cross-host redirect gives the signed CDN
  URL, the sha256 (``X-Linked-Etag``) and the size (``X-Linked-Size``).
- ``civitai://MODEL_VERSION_ID[?fileId=..|type=..&format=..&fp=..&size=..]``: the
  model-version API gives the file name and sha256; the download endpoint, asked
  with the token and without following its 307, gives a signed storage URL that is
  then fetched with no token at all (R2 refuses, and would log, a forwarded one).
- Dropbox shared links (``www.dropbox.com/scl/fi/...?rlkey=..&dl=0``) become direct
  downloads (``dl=1``, keeping ``rlkey``); a whole Dropbox workspace folder travels as
  a links file (``parse_links_file``, ``decode_links_env``) that maps each file's
  path in the workspace to its link.
- ``https://`` to an allowed host; ``http://`` only to a host named in
  ``DM_ALLOWED_HTTP_HOSTS`` (a local mirror). Anything else: "Download domain not
  allowed: HOST".

Endpoints are configurable (``HF_ENDPOINT``, ``CIVITAI_BASE_URL``, ``DROPBOX_API_URL``,
``DROPBOX_CONTENT_URL``, ``DROPBOX_WEB_URL``) so that the simulator in
``comfyfleet.sim.files`` exercises these very resolvers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
from multidict import CIMultiDict

from comfyfleet.agent.downloads import DownloadItem, DownloadOptions, redact_url
from comfyfleet.clock import Clock, SystemClock
from comfyfleet.envvars import env_value
from comfyfleet.errors import (
    ConfigError,
    DownloadDomainNotAllowed,
    DropboxLinksError,
    GatedRepo,
    InvalidSource,
    MissingToken,
    PlainHTTPNotAllowed,
    SourceAuthError,
    SourceError,
    SourceMismatch,
    SourceNotFound,
    SourceRateLimited,
)

__all__ = [
    "DEFAULT_ALLOWED_DOMAINS",
    "LINKS_ENV_VAR",
    "DropboxLink",
    "ResolvedSource",
    "SourceResolver",
    "SourceSettings",
    "decode_links_env",
    "dropbox_direct_url",
    "dropbox_workspace_items",
    "encode_links_env",
    "format_links_file",
    "parse_links_file",
    "safe_relative_path",
    "workspace_path",
]

HF_ENDPOINT = "https://huggingface.co"
CIVITAI_BASE_URL = "https://civitai.com"
DROPBOX_API_URL = "https://api.dropboxapi.com"
DROPBOX_CONTENT_URL = "https://content.dropboxapi.com"
DROPBOX_WEB_URL = "https://www.dropbox.com"

#: The hosts (and their subdomains) a download may touch when ``DM_ALLOWED_DOMAINS``
#: is not set: the three model hosts and the CDNs they redirect to (downloads.md).
DEFAULT_ALLOWED_DOMAINS: tuple[str, ...] = (
    "huggingface.co",  # the Hub, cdn-lfs*.huggingface.co
    "hf.co",  # cas-bridge.xethub.hf.co (Xet), cdn-lfs*.hf.co
    "civitai.com",
    "r2.cloudflarestorage.com",  # Civitai's presigned storage (its delivery worker)
    "dropbox.com",  # www.dropbox.com shared links
    "dropboxusercontent.com",  # dl.dropboxusercontent.com and *.dl.dropboxusercontent.com
    "dropboxapi.com",  # api. and content.dropboxapi.com
)

#: The environment variable that carries a links file to an instance, base64-encoded.
LINKS_ENV_VAR = "PROVISION_DROPBOX_LINKS_B64"
LINKS_HEADER = "# comfyfleet dropbox links v1"

#: Linux refuses to exec with one environment string longer than this (MAX_ARG_STRLEN).
ENV_VALUE_LIMIT = 128 * 1024

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HF_URL_PATH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)$")
_CIVITAI_URL_PATH = re.compile(r"^/api/download/models/(\d+)/?$")
_RATELIMIT_T = re.compile(r"\bt=(\d+(?:\.\d+)?)")

_ENDPOINT_VARIABLES = {
    "hf_endpoint": "HF_ENDPOINT",
    "civitai_base_url": "CIVITAI_BASE_URL",
    "dropbox_api_url": "DROPBOX_API_URL",
    "dropbox_content_url": "DROPBOX_CONTENT_URL",
    "dropbox_web_url": "DROPBOX_WEB_URL",
}


# ---------------------------------------------------------------- settings


def _domain(entry: str) -> str:
    """``https://Mirror.local:8080/x`` -> ``mirror.local``; ``*.hf.co`` -> ``hf.co``."""
    e = entry.strip().lower()
    if "://" in e:
        e = urlsplit(e).hostname or ""
    e = e.split("/", 1)[0]
    if e.count(":") == 1:
        e = e.split(":", 1)[0]
    return e.lstrip("*").strip(".")


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))


def _split_list(value: str) -> list[str]:
    return [v for v in (p.strip() for p in re.split(r"[,\s]+", value)) if v]


@dataclass(frozen=True)
class SourceSettings:
    """Endpoints, tokens and the allowlist. ``from_env`` reads the environment.

    ``allowed_domains`` allow a host and its subdomains over https. Hosts in
    ``allowed_http_hosts`` (exact names) may also be reached over plain http. The
    configured endpoints are always allowed, and an ``http://`` endpoint (the
    simulator, a mirror) makes its host an http host. Tokens never show in ``repr``.
    """

    hf_endpoint: str = HF_ENDPOINT
    hf_token: str | None = field(default=None, repr=False)
    civitai_base_url: str = CIVITAI_BASE_URL
    civitai_token: str | None = field(default=None, repr=False)
    dropbox_api_url: str = DROPBOX_API_URL
    dropbox_content_url: str = DROPBOX_CONTENT_URL
    #: Where Dropbox shared links live (``www.dropbox.com``).
    dropbox_web_url: str = DROPBOX_WEB_URL
    allowed_domains: tuple[str, ...] = DEFAULT_ALLOWED_DOMAINS
    allowed_http_hosts: tuple[str, ...] = ()
    civitai_connections_per_host: int = 2
    #: Tries of one metadata request on network errors, 408, 429 and 5xx.
    resolve_attempts: int = 3
    resolve_backoff_s: float = 1.0
    #: A 429 asking to wait longer than this fails at once (Civitai's can last hours).
    resolve_max_wait_s: float = 30.0
    resolve_timeout_s: float = 30.0
    #: Not a browser's: Civitai answers browsers with login pages instead of JSON.
    user_agent: str = "comfyfleet-agent"

    def __post_init__(self) -> None:
        endpoints: list[str] = []
        http_hosts = [_domain(h) for h in self.allowed_http_hosts]
        for name, variable in _ENDPOINT_VARIABLES.items():
            value = str(getattr(self, name)).strip().rstrip("/")
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"expected an http(s) URL such as {getattr(type(self), name)}, got {value!r}",
                    source=variable,
                )
            object.__setattr__(self, name, value)
            endpoints.append(parts.hostname.lower())
            if parts.scheme == "http":
                http_hosts.append(parts.hostname.lower())
        object.__setattr__(self, "allowed_http_hosts", _dedupe(http_hosts))
        domains = [_domain(d) for d in self.allowed_domains]
        object.__setattr__(self, "allowed_domains", _dedupe([*domains, *endpoints, *http_hosts]))
        for name in ("hf_token", "civitai_token"):
            token = getattr(self, name)
            object.__setattr__(self, name, token.strip() or None if token else None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SourceSettings:
        """Settings from ``env`` (default ``os.environ``).

        ``HF_TOKEN`` (or ``HUGGINGFACE_HUB_TOKEN``, or the older
        ``HUGGING_FACE_HUB_TOKEN``), ``CIVITAI_TOKEN``, the endpoint variables,
        ``DM_ALLOWED_DOMAINS`` (comma-separated; replaces the default list, as in the
        seeds) and ``DM_ALLOWED_HTTP_HOSTS``.
        """
        kw: dict[str, Any] = {}
        for name, variable in _ENDPOINT_VARIABLES.items():
            value = env_value(env, variable)
            if value is not None:
                kw[name] = value
        domains = env_value(env, "DM_ALLOWED_DOMAINS")
        if domains is not None:
            kw["allowed_domains"] = tuple(_split_list(domains))
        http_hosts = env_value(env, "DM_ALLOWED_HTTP_HOSTS")
        if http_hosts is not None:
            kw["allowed_http_hosts"] = tuple(_split_list(http_hosts))
        return cls(
            hf_token=env_value(env, "HF_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
            civitai_token=env_value(env, "CIVITAI_TOKEN"),
            **kw,
        )


# ---------------------------------------------------------------- resolved sources


@dataclass(frozen=True)
class ResolvedSource:
    """What the engine needs to fetch one source.

    ``headers`` hold auth for the host of ``url`` only (empty when ``url`` is a signed
    CDN URL). ``sha256`` (lower-case) and ``size`` are the host's word when it gives
    one. ``identity`` names the content, not the signed URL: it keys resume state.
    """

    url: str
    headers: Mapping[str, str]
    filename: str
    sha256: str | None
    size: int | None
    identity: str
    #: The source as given to ``resolve`` (asked again when the URL expires).
    source: str = ""
    kind: Literal["hf", "civitai", "dropbox", "url"] = "url"
    #: Civitai's ``sizeKB`` x 1024, when the exact size could not be read.
    approx_size: int | None = None
    #: Dropbox's ``content_hash`` (block-based, not a sha256), when known.
    content_hash: str | None = None

    def __repr__(self) -> str:
        return (
            f"ResolvedSource(url={redact_url(self.url)!r}, filename={self.filename!r}, "
            f"sha256={self.sha256!r}, size={self.size!r}, identity={self.identity!r})"
        )


@dataclass(frozen=True)
class _HFRef:
    repo_type: Literal["model", "dataset", "space"]
    repo_id: str
    path: str
    revision: str

    @property
    def prefix(self) -> str:
        return {"model": "", "dataset": "datasets/", "space": "spaces/"}[self.repo_type]

    def show(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf://{self.prefix}{self.repo_id}/{self.path}{rev}"


def _parse_hf(source: str) -> _HFRef:
    body = source[len("hf://") :]
    revision = "main"
    if "@" in body:
        body, _, revision = body.rpartition("@")
    parts = body.split("/")
    repo_type: Literal["model", "dataset", "space"] = "model"
    if parts and parts[0] in ("datasets", "spaces"):
        repo_type = "dataset" if parts[0] == "datasets" else "space"
        parts = parts[1:]
    if len(parts) < 3 or any(p in ("", ".", "..") for p in parts) or not revision:
        raise InvalidSource(
            f"{source}: expected hf://OWNER/REPO/PATH/IN/REPO[@REVISION]", source=source
        )
    return _HFRef(repo_type, "/".join(parts[:2]), "/".join(parts[2:]), revision)


def _parse_civitai(source: str) -> tuple[int, dict[str, str]]:
    parts = urlsplit(source)
    if not parts.netloc.isdigit() or parts.path.strip("/"):
        raise InvalidSource(
            f"{source}: expected civitai://MODEL_VERSION_ID (digits), optionally with "
            "?fileId=.. or ?type=..&format=..&fp=..&size=..",
            source=source,
        )
    query = {k: v for k, v in parse_qsl(parts.query) if k != "token"}
    return int(parts.netloc), query


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _netloc(url: str) -> str:
    _, host, port = _origin(url)
    return f"{host}:{port}"


def _sha256_of(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip().strip('"').lower()
    return v if _HEX64.match(v) else None


def _basename(path: str) -> str:
    return unquote(path.rstrip("/").rsplit("/", 1)[-1])


def _filename_from_disposition(value: str | None) -> str | None:
    if not value:
        return None
    m = re.search(r"filename\*\s*=\s*UTF-8''([^;]+)", value, re.IGNORECASE)
    if m:
        return unquote(m.group(1).strip())
    m = re.search(r'filename\s*=\s*"([^"]*)"', value) or re.search(r"filename\s*=\s*([^;]+)", value)
    return m.group(1).strip() if m else None


def dropbox_direct_url(url: str) -> str:
    """A Dropbox shared file link as a direct download: ``dl=1``, ``rlkey`` kept.

    ``/scl/fi/ID/NAME?rlkey=K&dl=0`` and legacy ``/s/ID/NAME?dl=0`` links get
    ``dl=1`` (Dropbox then redirects to its content host); links already on
    ``*.dropboxusercontent.com`` are direct and stay as they are. Folder links
    (``/scl/fo/``, ``/sh/``) download as one zip and are refused: share each file
    (``comfyfleet dropbox links``).
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host == "dropboxusercontent.com" or host.endswith(".dropboxusercontent.com"):
        return url
    if parts.path.startswith(("/scl/fo/", "/sh/")):
        raise InvalidSource(
            f"{redact_url(url)} is a Dropbox folder link, which downloads as a zip of the "
            "whole folder: share each file instead (comfyfleet dropbox links /Folder)",
            source=redact_url(url),
        )
    if not parts.path.startswith(("/scl/fi/", "/s/")):
        raise InvalidSource(
            f"{redact_url(url)} is not a Dropbox shared file link (/scl/fi/... or /s/...)",
            source=redact_url(url),
        )
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dl"]
    query.append(("dl", "1"))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


@dataclass
class _Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error_text(self) -> str:
        """The host's own words: ``error`` and ``message`` of a JSON body, else its text."""
        data = self.json()
        if isinstance(data, dict):
            words = [str(data[k]) for k in ("error", "message") if data.get(k)]
            if words:
                return ": ".join(words) if len(words) == 1 else f"{words[0]}: {words[1]}"
        text = self.body.decode("utf-8", "replace").strip()
        if text.lower().startswith(("<!doctype", "<html")):
            return "an HTML page"
        return text[:200]


# ---------------------------------------------------------------- the resolver


class SourceResolver:
    """Resolves sources with ``settings``; see the module's documentation.

    With ``session`` given, every request goes through it (the caller closes it);
    otherwise each resolve opens and closes its own, so the resolver can be used from
    any event loop. ``clock`` paces retries (a ``ManualClock`` makes tests instant).
    """

    def __init__(
        self,
        settings: SourceSettings,
        session: aiohttp.ClientSession | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self._session = session
        self._clock: Clock = clock or SystemClock()
        #: Storage hosts Civitai sent us to: they get Civitai's connection limit too.
        self._civitai_hosts: set[str] = {urlsplit(settings.civitai_base_url).hostname or ""}

    async def aclose(self) -> None:
        """Nothing to release: a session passed in belongs to the caller."""

    async def __aenter__(self) -> SourceResolver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the allowlist -------------------------------------------------------

    def allow_url(self, url: str) -> bool:
        """Whether ``url`` may be fetched: https to an allowed domain (or a subdomain),
        http only to an allowed http host. Applied to every redirect as well."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            return False
        if parts.scheme == "http":
            return host in self.settings.allowed_http_hosts
        if parts.scheme != "https":
            return False
        return any(host == d or host.endswith("." + d) for d in self.settings.allowed_domains)

    def check_url(self, url: str) -> None:
        """Raise ``DownloadDomainNotAllowed`` (or ``PlainHTTPNotAllowed``) for a refused URL."""
        if self.allow_url(url):
            return
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme == "http" and any(
            host == d or host.endswith("." + d) for d in self.settings.allowed_domains
        ):
            raise PlainHTTPNotAllowed(host, url=redact_url(url))
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidSource(f"not an http(s) URL: {redact_url(url)}", source=redact_url(url))
        raise DownloadDomainNotAllowed(host, url=redact_url(url))

    # -- resolving -------------------------------------------------------------

    async def resolve(self, source: str, *, metadata_only: bool = False) -> ResolvedSource:
        """Resolve ``source``; raises a ``SourceError`` (or ``DownloadDomainNotAllowed``).

        ``metadata_only`` asks Civitai only its model-version API: no call to the
        download endpoint, which Civitai counts as a download (and so no check of
        the token, no storage URL and no exact size: ``url`` is then the download
        endpoint, with the token for Civitai's host, and ``approx_size`` is set).
        The other sources resolve the same either way.
        """
        s = source.strip()
        scheme = urlsplit(s).scheme.lower()
        if scheme == "hf":
            return await self._resolve_hf(_parse_hf(s), s)
        if scheme == "civitai":
            version_id, query = _parse_civitai(s)
            return await self._resolve_civitai(version_id, query, s, metadata_only)
        if scheme not in ("http", "https"):
            raise InvalidSource(
                f"unsupported source {redact_url(s)!r}: use hf://, civitai://, https:// "
                "(Dropbox links included) or http:// to a host in DM_ALLOWED_HTTP_HOSTS",
                source=redact_url(s),
            )
        self.check_url(s)
        parts = urlsplit(s)
        netloc = _netloc(s)
        if netloc == _netloc(self.settings.hf_endpoint):
            m = _HF_URL_PATH.match(parts.path)
            if m:
                kind, repo_id, revision, path = m.groups()
                repo_type: Literal["model", "dataset", "space"] = (
                    "dataset" if kind == "datasets" else "space" if kind == "spaces" else "model"
                )
                ref = _HFRef(repo_type, repo_id, unquote(path), unquote(revision))
                return await self._resolve_hf(ref, s)
        if netloc == _netloc(self.settings.civitai_base_url):
            m = _CIVITAI_URL_PATH.match(parts.path)
            if m:
                query = {k: v for k, v in parse_qsl(parts.query) if k != "token"}
                return await self._resolve_civitai(int(m.group(1)), query, s, metadata_only)
        if self._is_dropbox(s):
            return self._resolve_dropbox(s)
        return ResolvedSource(
            url=s,
            headers={},
            filename=_basename(parts.path) or parts.hostname or "download",
            sha256=None,
            size=None,
            identity=redact_url(s),
            source=s,
            kind="url",
        )

    def _is_dropbox(self, url: str) -> bool:
        host = (urlsplit(url).hostname or "").lower()
        if host in ("dropbox.com", "www.dropbox.com") or host.endswith(".dropboxusercontent.com"):
            return True
        if host == "dropboxusercontent.com":
            return True
        return _netloc(url) == _netloc(self.settings.dropbox_web_url)

    def _resolve_dropbox(self, url: str) -> ResolvedSource:
        direct = dropbox_direct_url(url)
        self.check_url(direct)
        path = urlsplit(direct).path
        return ResolvedSource(
            url=direct,
            headers={},
            filename=_basename(path) or "download",
            sha256=None,
            size=None,
            identity=f"dropbox:{path}",
            source=url,
            kind="dropbox",
        )

    # -- HTTP with retries ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session_ctx(self) -> AsyncIterator[aiohttp.ClientSession]:
        if self._session is not None:
            yield self._session
            return
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.resolve_timeout_s),
            auto_decompress=False,
        ) as session:
            yield session

    async def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        what: str,
        source: str,
    ) -> _Answer:
        """One request, redirects not followed, retried on network errors, 408, 429 and
        5xx (honouring ``Retry-After`` and Hugging Face's ``RateLimit: ...;t=``). Reads
        at most 64 KiB of the body: enough for any API answer, never a model."""
        st = self.settings
        req_headers = {
            "User-Agent": st.user_agent,
            "Accept-Encoding": "identity",
            **headers,
        }
        attempt = 0
        while True:
            attempt += 1
            try:
                async with (
                    self._session_ctx() as session,
                    session.request(
                        method,
                        url,
                        headers=req_headers,
                        allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=st.resolve_timeout_s),
                    ) as resp,
                ):
                    body = b"" if method == "HEAD" else await resp.content.read(1 << 16)
                    answer = _Answer(resp.status, CIMultiDict(resp.headers), body, url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt >= st.resolve_attempts:
                    raise SourceError(
                        f"cannot reach {what} at {redact_url(url)} for {source}: "
                        f"{type(exc).__name__}: {exc}",
                        source=source,
                        url=redact_url(url),
                    ) from exc
                await self._clock.sleep(st.resolve_backoff_s * 2 ** (attempt - 1))
                continue
            if answer.status not in (408, 429) and answer.status < 500:
                return answer
            wait = _wait_of(answer.headers)
            if attempt >= st.resolve_attempts or (wait or 0) > st.resolve_max_wait_s:
                return answer
            backoff = st.resolve_backoff_s * 2 ** (attempt - 1)
            await self._clock.sleep(max(backoff, wait or 0.0))

    # -- Hugging Face ------------------------------------------------------------------

    def _hf_url(self, ref: _HFRef) -> str:
        return (
            f"{self.settings.hf_endpoint}/{ref.prefix}{ref.repo_id}/resolve/"
            f"{quote(ref.revision, safe='')}/{quote(ref.path)}"
        )

    async def _resolve_hf(self, ref: _HFRef, source: str) -> ResolvedSource:
        token = self.settings.hf_token
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        url = self._hf_url(ref)
        origin = _origin(url)
        commit: str | None = None
        linked_sha: str | None = None
        linked_size: int | None = None
        for _ in range(10):
            self.check_url(url)
            answer = await self._request(
                "HEAD", url, headers=auth, what="Hugging Face", source=source
            )
            h = answer.headers
            commit = commit or h.get("X-Repo-Commit")
            linked_sha = linked_sha or _sha256_of(h.get("X-Linked-Etag"))
            if linked_size is None and h.get("X-Linked-Size", "").isdigit():
                linked_size = int(h["X-Linked-Size"])
            if 300 <= answer.status < 400 and h.get("Location"):
                target = urljoin(url, h["Location"])
                if _origin(target) == origin:
                    url = target  # a renamed repo, or resolve-cache: same host, same token
                    continue
                self.check_url(target)
                return self._hf_resolved(ref, source, target, {}, commit, linked_sha, linked_size)
            if answer.status == 200:
                size = linked_size
                if size is None and h.get("Content-Length", "").isdigit():
                    size = int(h["Content-Length"])
                sha = linked_sha or _sha256_of(h.get("ETag"))  # a git file's ETag is a sha1
                return self._hf_resolved(ref, source, url, auth, commit, sha, size)
            raise self._hf_error(ref, source, answer)
        raise SourceError(f"too many redirects resolving {source}", source=source)

    def _hf_resolved(
        self,
        ref: _HFRef,
        source: str,
        url: str,
        headers: Mapping[str, str],
        commit: str | None,
        sha256: str | None,
        size: int | None,
    ) -> ResolvedSource:
        return ResolvedSource(
            url=url,
            headers=dict(headers),
            filename=_basename(ref.path),
            sha256=sha256,
            size=size,
            identity=f"hf:{ref.prefix}{ref.repo_id}@{commit or ref.revision}/{ref.path}",
            source=source,
            kind="hf",
        )

    def _hf_error(self, ref: _HFRef, source: str, answer: _Answer) -> SourceError:
        status = answer.status
        code = answer.headers.get("X-Error-Code")
        said = answer.headers.get("X-Error-Message") or answer.error_text()
        page = f"{self.settings.hf_endpoint}/{ref.prefix}{ref.repo_id}"
        has_token = self.settings.hf_token is not None
        shown = ref.show()
        kw: dict[str, Any] = {"source": source, "status": status, "url": redact_url(answer.url)}
        if code == "GatedRepo":
            if not has_token:
                return MissingToken(
                    "HF_TOKEN",
                    f"{shown} is in the gated repository {ref.repo_id}: accept its licence "
                    f"at {page} (logged in), then export HF_TOKEN (or HUGGINGFACE_HUB_TOKEN) "
                    f"with a token of that account. Hugging Face says: {said}",
                    **kw,
                )
            return GatedRepo(
                f"{shown}: the gated repository {ref.repo_id} refused HF_TOKEN's account "
                f"(HTTP {status}): accept its licence at {page} with that account, or wait "
                f"until the authors approve the request. Hugging Face says: {said}",
                **kw,
            )
        if status == 401 and has_token and code is None:
            return SourceAuthError(
                f"{shown}: Hugging Face refused HF_TOKEN ({said}): create a new token at "
                "https://huggingface.co/settings/tokens and export HF_TOKEN",
                **kw,
            )
        if code == "RepoNotFound" or status == 401:
            advice = (
                "or HF_TOKEN has no access to it"
                if has_token
                else "or it is private: then export HF_TOKEN with access to it"
            )
            return SourceNotFound(
                f"{shown}: Hugging Face repository {ref.repo_id} not found, {advice}", **kw
            )
        if code == "RevisionNotFound":
            return SourceNotFound(
                f"{shown}: Hugging Face repository {ref.repo_id} has no revision {ref.revision!r}",
                **kw,
            )
        if code == "EntryNotFound" or status == 404:
            return SourceNotFound(
                f"{shown}: no file {ref.path!r} in Hugging Face repository {ref.repo_id} at "
                f"revision {ref.revision!r}",
                **kw,
            )
        if status == 429:
            return SourceRateLimited(
                f"{shown}: Hugging Face is rate limiting this machine (HTTP 429); try again "
                "later. A token (HF_TOKEN) gets a higher limit than anonymous requests.",
                retry_after=_wait_of(answer.headers),
                source=source,
                url=redact_url(answer.url),
            )
        if status == 403:
            return SourceAuthError(f"{shown}: Hugging Face refused access (403): {said}", **kw)
        return SourceError(f"{shown}: Hugging Face answered HTTP {status}: {said}", **kw)

    # -- Civitai ---------------------------------------------------------------------------

    async def _resolve_civitai(
        self, version_id: int, query: Mapping[str, str], source: str, metadata_only: bool = False
    ) -> ResolvedSource:
        st = self.settings
        base = st.civitai_base_url
        token = st.civitai_token
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        shown = f"civitai://{version_id}"
        meta_url = f"{base}/api/v1/model-versions/{version_id}"
        self.check_url(meta_url)
        answer = await self._request("GET", meta_url, headers=auth, what="Civitai", source=source)
        data = answer.json()
        if answer.status != 200 or not isinstance(data, dict):
            raise self._civitai_error(shown, source, answer, token is not None, metadata=True)
        picked = _pick_civitai_file(data.get("files") or [], query)
        if picked is None:
            wanted = "the primary file" if not query else urlencode(query)
            raise SourceNotFound(
                f"{shown}: Civitai model version {version_id} has no file matching {wanted}",
                source=source,
                status=404,
            )
        file_id = picked.get("id")
        hashes = picked.get("hashes") or {}
        sha = _sha256_of(hashes.get("SHA256") if isinstance(hashes, dict) else None)
        size_kb = picked.get("sizeKB")
        approx = round(float(size_kb) * 1024) if isinstance(size_kb, int | float) else None
        name = str(picked.get("name") or "")

        download = f"{base}/api/download/models/{version_id}"
        if file_id is not None:
            download += f"?fileId={file_id}"
        self.check_url(download)
        filename = _basename(name) if name else f"{version_id}.safetensors"
        identity = f"civitai:{version_id}/{file_id}:{sha or ''}"
        if metadata_only:
            return ResolvedSource(
                url=download,
                headers=dict(auth),
                filename=filename,
                sha256=sha,
                size=None,
                identity=identity,
                source=source,
                kind="civitai",
                approx_size=approx,
            )
        answer = await self._request("GET", download, headers=auth, what="Civitai", source=source)
        if 300 <= answer.status < 400 and answer.headers.get("Location"):
            url = urljoin(download, answer.headers["Location"])
            self.check_url(url)
            headers: dict[str, str] = {}
        elif answer.status == 200:
            url, headers = download, dict(auth)  # served by Civitai itself: the token stays
        else:
            raise self._civitai_error(shown, source, answer, token is not None)
        self._civitai_hosts.add((urlsplit(url).hostname or "").lower())
        size, disposition_name = await self._probe_size(url, headers, source)
        return ResolvedSource(
            url=url,
            headers=headers,
            filename=_basename(name) if name else disposition_name or filename,
            sha256=sha,
            size=size,
            identity=identity,
            source=source,
            kind="civitai",
            approx_size=approx if size is None else size,
        )

    async def _probe_size(
        self, url: str, headers: Mapping[str, str], source: str
    ) -> tuple[int | None, str | None]:
        """The exact size (``Content-Range``) and ``Content-Disposition`` name of ``url``.

        Civitai's ``sizeKB`` is a rounded float: the storage host knows the bytes.
        A failed probe leaves both unknown; the engine learns them itself.
        """
        try:
            answer = await self._request(
                "GET", url, headers={**headers, "Range": "bytes=0-0"}, what="storage", source=source
            )
        except SourceError:
            return None, None
        name = _filename_from_disposition(answer.headers.get("Content-Disposition"))
        if answer.status == 206:
            total = answer.headers.get("Content-Range", "").rpartition("/")[2]
            return (int(total) if total.isdigit() else None), name
        if answer.status == 200 and answer.headers.get("Content-Length", "").isdigit():
            return int(answer.headers["Content-Length"]), name
        return None, name

    def _civitai_error(
        self, shown: str, source: str, answer: _Answer, has_token: bool, *, metadata: bool = False
    ) -> SourceError:
        status = answer.status
        said = answer.error_text()
        data = answer.json()
        error = str(data.get("error", "")) if isinstance(data, dict) else ""
        message = str(data.get("message", "")) if isinstance(data, dict) else ""
        kw: dict[str, Any] = {"source": source, "status": status, "url": redact_url(answer.url)}
        account = f"{self.settings.civitai_base_url}/user/account"
        if said == "an HTML page":
            return SourceError(
                f"{shown}: Civitai answered HTTP {status} with an HTML page instead of JSON "
                "(a login or error page)",
                **kw,
            )
        if status == 401:
            if "disabled downloads" in message:
                return SourceAuthError(f"{shown}: Civitai refused the download: {message}", **kw)
            if not has_token:
                return MissingToken(
                    "CIVITAI_TOKEN",
                    f'{shown}: Civitai says "{message or said}". Create an API key at '
                    f"{account} and export CIVITAI_TOKEN.",
                    **kw,
                )
            return SourceAuthError(
                f"{shown}: Civitai refused CIVITAI_TOKEN (401: {message or said}): check the "
                f"API key at {account}",
                **kw,
            )
        if status == 403:
            if error == "Early Access":
                deadline = data.get("deadline") if isinstance(data, dict) else None
                until = f" until {deadline}" if deadline else ""
                return SourceAuthError(
                    f"{shown}: Civitai refused the download: the model is in Early Access"
                    f"{until} ({message or said}); this account has not unlocked it",
                    **kw,
                )
            if error == "Forbidden":
                return SourceAuthError(
                    f"{shown}: Civitai refused the download (403 Forbidden): this IP address "
                    "or account is blocked",
                    **kw,
                )
            return SourceAuthError(f"{shown}: Civitai refused the download (403): {said}", **kw)
        if status == 404:
            if metadata:
                return SourceNotFound(f"{shown}: Civitai has no such model version ({said})", **kw)
            return SourceNotFound(
                f"{shown}: Civitai has no file to download ({said}): the model may be "
                "unpublished or deleted (a storage hiccup also answers 404: try again later)",
                **kw,
            )
        if status == 410:
            return SourceNotFound(f"{shown}: Civitai archived this model ({said})", **kw)
        if status == 429:
            return SourceRateLimited(
                f"{shown}: Civitai is limiting downloads from this account (429): {said} "
                "Wait before downloading more.",
                retry_after=_wait_of(answer.headers),
                source=source,
                url=redact_url(answer.url),
            )
        return SourceError(f"{shown}: Civitai answered HTTP {status}: {said}", **kw)

    # -- items and options ---------------------------------------------------------------

    def download_item(
        self,
        resolved: ResolvedSource,
        dest: Path | str,
        *,
        sha256: str | None = None,
        size: int | None = None,
    ) -> DownloadItem:
        """A ``DownloadItem`` for ``resolved`` at ``dest``.

        ``sha256`` and ``size`` (the manifest's) win over the source's; when both are
        known and differ, ``SourceMismatch`` is raised before any byte moves. The item's
        ``resolve`` callback resolves the source again (a signed URL expired) and
        refuses content that changed meanwhile.
        """
        want = sha256.strip().lower() if sha256 else None
        shown = redact_url(resolved.source) if resolved.source else redact_url(resolved.url)
        if want and resolved.sha256 and want != resolved.sha256.lower():
            raise SourceMismatch(
                f"{shown}: the source's sha256 is {resolved.sha256.lower()}, expected {want}",
                source=shown,
            )
        if size is not None and resolved.size is not None and size != resolved.size:
            raise SourceMismatch(
                f"{shown}: the source's size is {resolved.size} bytes, expected {size}",
                source=shown,
            )
        source = resolved.source or resolved.url

        async def again() -> tuple[str, Mapping[str, str]]:
            fresh = await self.resolve(source)
            if resolved.sha256 and fresh.sha256 and fresh.sha256 != resolved.sha256:
                raise SourceMismatch(
                    f"{shown}: the content changed while downloading (sha256 "
                    f"{resolved.sha256} -> {fresh.sha256})",
                    source=shown,
                )
            return fresh.url, fresh.headers

        return DownloadItem(
            url=resolved.url,
            dest=Path(dest),
            headers=dict(resolved.headers),
            sha256=want or resolved.sha256,
            size=size if size is not None else resolved.size,
            resolve=again,
            identity=resolved.identity,
        )

    def host_limits(self) -> dict[str, int]:
        """Civitai's limit for its API host and every storage host it sent us to."""
        n = self.settings.civitai_connections_per_host
        return {h: n for h in sorted(self._civitai_hosts) if h}

    def download_options(self, **overrides: Any) -> DownloadOptions:
        """``DownloadOptions`` with this resolver's allowlist and Civitai's host limits.

        Call it after resolving: Civitai's storage hosts are learnt then. ``host_limits``
        in ``overrides`` is merged over Civitai's; other overrides replace the defaults.
        """
        limits = self.host_limits()
        limits.update(overrides.pop("host_limits", None) or {})
        overrides.setdefault("allow_url", self.allow_url)
        overrides.setdefault("user_agent", self.settings.user_agent)
        return DownloadOptions(host_limits=limits, **overrides)


def _wait_of(headers: Mapping[str, str]) -> float | None:
    """Seconds a 429/503 asks to wait: ``Retry-After``, or ``RateLimit: ...;t=N``."""
    value = headers.get("Retry-After")
    if value is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value))
    m = _RATELIMIT_T.search(headers.get("RateLimit", ""))
    return float(m.group(1)) if m else None


def _pick_civitai_file(files: Sequence[Any], query: Mapping[str, str]) -> dict[str, Any] | None:
    """The file the download endpoint would serve: ``fileId``, else the filters, else primary."""
    candidates = [f for f in files if isinstance(f, dict)]
    if "fileId" in query:
        return next((f for f in candidates if str(f.get("id")) == query["fileId"]), None)
    if "type" in query:
        candidates = [f for f in candidates if f.get("type") == query["type"]]
    for key in ("format", "fp", "size"):
        if key in query:
            candidates = [
                f for f in candidates if str((f.get("metadata") or {}).get(key)) == query[key]
            ]
    if not candidates:
        return None
    return next((f for f in candidates if f.get("primary")), candidates[0])


# ---------------------------------------------------------------- Dropbox links files


@dataclass(frozen=True)
class DropboxLink:
    """One file of a shared Dropbox workspace: where it goes, and its direct link.

    ``path`` is relative to the workspace; ``size`` and ``content_hash`` (Dropbox's)
    come from the folder listing when the links file carries them.
    """

    path: PurePosixPath
    url: str
    size: int | None = None
    content_hash: str | None = None

    def __repr__(self) -> str:
        return f"DropboxLink(path={str(self.path)!r}, url={redact_url(self.url)!r})"


def safe_relative_path(value: str) -> PurePosixPath:
    """``value`` as a relative POSIX path that cannot leave its base directory."""
    if not value.strip():
        raise ValueError("an empty path")
    if "\x00" in value or "\\" in value:
        raise ValueError(f"{value!r}: use '/' separators, and no NUL")
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"{value!r} is absolute: paths are relative to the workspace")
    path = PurePosixPath(value)
    if ".." in path.parts:
        raise ValueError(f"{value!r} escapes the workspace")
    if not path.parts or path == PurePosixPath("."):
        raise ValueError(f"{value!r} names no file")
    return path


def workspace_path(workspace: Path, relative: PurePosixPath) -> Path:
    """``workspace / relative``, refused when it leads outside (``..``, symlinks)."""
    try:
        rel = safe_relative_path(str(relative))
    except ValueError as exc:
        raise DropboxLinksError(str(exc)) from None
    dest = workspace / rel
    base = Path(os.path.realpath(workspace))
    real = Path(os.path.realpath(dest))
    if not real.is_relative_to(base):
        raise DropboxLinksError(f"{rel} leads outside the workspace {workspace} (a symlink)")
    return dest


def format_links_file(links: Sequence[DropboxLink], *, folder: str | None = None) -> str:
    """The links file: a header, then ``PATH<TAB>URL<TAB>SIZE<TAB>CONTENT_HASH`` per file."""
    lines = [LINKS_HEADER]
    if folder is not None:
        lines.append(f"# Dropbox folder: {folder}")
    lines.append("# PATH<TAB>URL<TAB>SIZE<TAB>CONTENT_HASH; PATH is relative to the workspace")
    for link in sorted(links, key=lambda k: str(k.path)):
        size = "" if link.size is None else str(link.size)
        lines.append("\t".join([str(link.path), link.url, size, link.content_hash or ""]))
    return "\n".join(lines) + "\n"


def parse_links_file(text: str, *, source: str = "dropbox links") -> list[DropboxLink]:
    """Read a links file (``format_links_file``'s output).

    Blank lines and ``#`` comments are skipped. A line holds ``PATH<TAB>URL`` and,
    optionally, the size and Dropbox content hash; a line with only a URL puts the
    file at the top of the workspace under the link's name. Paths that escape the
    workspace (``..``, absolute), non-http(s) URLs and two links to one path are
    refused with ``DropboxLinksError`` naming the line.
    """
    links: list[DropboxLink] = []
    seen: dict[PurePosixPath, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"line {lineno}"
        fields = line.split("\t")
        if len(fields) == 1:
            url = fields[0].strip()
            path_text = _basename(urlsplit(url).path)
        else:
            path_text, url = fields[0].strip(), fields[1].strip()
        if len(fields) > 4:
            raise DropboxLinksError(
                f"expected PATH<TAB>URL[<TAB>SIZE[<TAB>CONTENT_HASH]], got {len(fields)} fields",
                source=source,
                field=where,
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DropboxLinksError(
                f"expected an http(s) link, got {redact_url(url)!r}", source=source, field=where
            )
        try:
            path = safe_relative_path(path_text)
        except ValueError as exc:
            raise DropboxLinksError(str(exc), source=source, field=where) from None
        size: int | None = None
        if len(fields) > 2 and fields[2].strip():
            if not fields[2].strip().isdigit():
                raise DropboxLinksError(
                    f"expected a size in bytes, got {fields[2]!r}", source=source, field=where
                )
            size = int(fields[2])
        content_hash = fields[3].strip().lower() or None if len(fields) > 3 else None
        if content_hash is not None and not _HEX64.match(content_hash):
            raise DropboxLinksError(
                f"expected a Dropbox content hash (64 hex), got {fields[3]!r}",
                source=source,
                field=where,
            )
        if path in seen:
            raise DropboxLinksError(
                f"{path} is already linked on line {seen[path]}", source=source, field=where
            )
        seen[path] = lineno
        links.append(DropboxLink(path=path, url=url, size=size, content_hash=content_hash))
    return links


def encode_links_env(text: str) -> str:
    """The base64 form of a links file, for ``PROVISION_DROPBOX_LINKS_B64``."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode_links_env(b64: str) -> list[DropboxLink]:
    """The links of ``PROVISION_DROPBOX_LINKS_B64`` (standard or URL-safe base64)."""
    compact = "".join(b64.split())
    try:
        try:
            raw = base64.b64decode(compact, validate=True)
        except binascii.Error:
            raw = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        raise DropboxLinksError(
            "is not the base64 of a links file (comfyfleet dropbox links writes it)",
            source=LINKS_ENV_VAR,
        ) from None
    return parse_links_file(text, source=LINKS_ENV_VAR)


async def dropbox_workspace_items(
    resolver: SourceResolver, links: Sequence[DropboxLink], workspace: Path
) -> list[DownloadItem]:
    """One ``DownloadItem`` per link, each at its path in ``workspace``.

    Every link goes through the resolver (allowlist, direct-download form); a path
    that leads outside the workspace, symlinks included, raises ``DropboxLinksError``.
    """
    items = []
    for link in links:
        dest = workspace_path(workspace, link.path)
        resolved = await resolver.resolve(link.url)
        items.append(resolver.download_item(resolved, dest, size=link.size))
    return items

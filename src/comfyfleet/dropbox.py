"""Share a Dropbox workspace folder as direct links: the library of ``comfyfleet dropbox links``.

``share_folder`` lists a folder recursively with the official SDK, creates a shared
link for each file (or reuses the one that exists) and returns ``DropboxLink`` s
whose paths are relative to the folder, so the folder maps onto a workspace tree.
``write_links`` stores them as the links file and its base64 form, which travels to
an instance in ``PROVISION_DROPBOX_LINKS_B64`` (the seeds' "full Dropbox workspace
transfer"); the agent reads it back with ``comfyfleet.agent.sources``.

The SDK hard-codes ``https://api.dropboxapi.com``; ``DROPBOX_API_URL`` and
``DROPBOX_CONTENT_URL`` point it elsewhere (the simulator) through a
``requests.Session`` that rewrites those two origins (downloads.md section 3.2).
Every SDK error becomes a ``DropboxError`` that says what to do; a token without
the scopes this needs gets a ``DropboxScopeError`` naming all the missing ones.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import dropbox
import requests
from dropbox import exceptions as dbx_exceptions
from dropbox import files as dbx_files
from dropbox import sharing as dbx_sharing

from comfyfleet.agent.sources import (
    DROPBOX_API_URL,
    DROPBOX_CONTENT_URL,
    ENV_VALUE_LIMIT,
    LINKS_ENV_VAR,
    DropboxLink,
    SourceSettings,
    dropbox_direct_url,
    encode_links_env,
    format_links_file,
    safe_relative_path,
)
from comfyfleet.envvars import env_value
from comfyfleet.errors import (
    DropboxError,
    DropboxScopeError,
    MissingDropboxToken,
)

__all__ = [
    "REQUIRED_SCOPES",
    "DropboxFile",
    "LinksWritten",
    "check_scopes",
    "dropbox_client",
    "list_files",
    "share_folder",
    "share_folder_to_files",
    "shared_link",
    "token_from_env",
    "write_links",
]

T = TypeVar("T")

#: What ``comfyfleet dropbox links`` does with each scope.
REQUIRED_SCOPES: Mapping[str, str] = {
    "files.metadata.read": "list the folder",
    "sharing.read": "find the shared links that already exist",
    "sharing.write": "create shared links",
}
APP_CONSOLE = "https://www.dropbox.com/developers/apps"


def token_from_env(env: Mapping[str, str] | None = None) -> str:
    """``DROPBOX_TOKEN``, or ``MissingDropboxToken`` saying how to get one."""
    token = env_value(env, "DROPBOX_TOKEN")
    if not token:
        raise MissingDropboxToken(
            "missing DROPBOX_TOKEN: create an app at "
            f"{APP_CONSOLE}, enable the scopes {', '.join(REQUIRED_SCOPES)} on its "
            "Permissions tab, generate an access token and export DROPBOX_TOKEN"
        )
    return token


class _EndpointSession(requests.Session):
    """Sends the SDK's requests for Dropbox's API origins to other base URLs."""

    def __init__(self, rewrites: Mapping[str, str]) -> None:
        super().__init__()
        self._rewrites = dict(rewrites)

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
        if isinstance(url, str):
            for real, target in self._rewrites.items():
                if url == real or url.startswith(real + "/"):
                    url = target + url[len(real) :]
                    break
        return super().request(method, url, *args, **kwargs)


def dropbox_client(
    token: str, settings: SourceSettings | None = None, *, timeout: float = 60.0
) -> dropbox.Dropbox:
    """An SDK client for ``token``, pointed at ``settings``' Dropbox endpoints.

    Errors are not retried blindly: 5xx twice, 429 five times (the SDK honours
    ``Retry-After``), so a broken server ends in a message, not a hang.
    """
    settings = settings or SourceSettings.from_env()
    rewrites = {}
    if settings.dropbox_api_url != DROPBOX_API_URL:
        rewrites[DROPBOX_API_URL] = settings.dropbox_api_url
    if settings.dropbox_content_url != DROPBOX_CONTENT_URL:
        rewrites[DROPBOX_CONTENT_URL] = settings.dropbox_content_url
    session = _EndpointSession(rewrites) if rewrites else None
    return dropbox.Dropbox(
        token,
        session=session,
        max_retries_on_error=2,
        max_retries_on_rate_limit=5,
        user_agent="comfyfleet",
        timeout=timeout,
    )


# ---------------------------------------------------------------- errors


def _scope_message(missing: Sequence[str]) -> str:
    uses = "; ".join(f"{s} to {REQUIRED_SCOPES.get(s, 'work')}" for s in missing)
    them = "it" if len(missing) == 1 else "them"
    plural = "" if len(missing) == 1 else "s"
    return (
        f"the Dropbox token lacks the scope{plural} {', '.join(missing)} ({uses}): enable "
        f"{them} on the app's Permissions tab at {APP_CONSOLE}, then generate a new token "
        "(a token keeps the scopes it was made with)"
    )


#: What the SDK raises: its own exceptions, and requests' for the network.
_SDK_ERRORS = (dbx_exceptions.DropboxException, requests.RequestException)


def _as_dropbox_error(what: str, exc: Exception) -> DropboxError:
    """One of ``_SDK_ERRORS`` as a ``DropboxError`` that says what to do."""
    if isinstance(exc, dbx_exceptions.AuthError):
        return _auth_error(exc)
    if isinstance(exc, dbx_exceptions.ApiError):
        return DropboxError(f"Dropbox could not {what}: {_route_error_text(exc)}")
    if isinstance(exc, dbx_exceptions.RateLimitError):
        return DropboxError(
            f"Dropbox is rate limiting this app (429) and did not let it {what}: try again "
            "in a few minutes"
        )
    if isinstance(exc, dbx_exceptions.BadInputError):
        return DropboxError(f"Dropbox refused the request to {what}: {exc.message}")
    if isinstance(exc, dbx_exceptions.InternalServerError):
        return DropboxError(f"Dropbox failed to {what} (HTTP {exc.status_code}): try again later")
    if isinstance(exc, dbx_exceptions.HttpError):
        return DropboxError(f"Dropbox answered HTTP {exc.status_code} to {what}")
    return DropboxError(f"cannot reach Dropbox to {what}: {exc}")


def _call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with the SDK's failures as ``DropboxError`` s."""
    try:
        return fn(*args, **kwargs)
    except _SDK_ERRORS as exc:
        raise _as_dropbox_error(what, exc) from None


def _auth_error(exc: dbx_exceptions.AuthError) -> DropboxError:
    err = exc.error
    if err.is_missing_scope():
        scope = str(err.get_missing_scope().required_scope)
        return DropboxScopeError([scope], _scope_message([scope]))
    if err.is_expired_access_token():
        return DropboxError(
            "DROPBOX_TOKEN has expired (short-lived tokens last 4 hours): generate a new one "
            f"at {APP_CONSOLE}"
        )
    if err.is_invalid_access_token():
        return DropboxError(
            "Dropbox refused DROPBOX_TOKEN (invalid_access_token): check that it is a whole "
            f"access token of your app, or generate a new one at {APP_CONSOLE}"
        )
    return DropboxError(f"Dropbox refused DROPBOX_TOKEN ({err})")


def _route_error_text(exc: dbx_exceptions.ApiError) -> str:
    if exc.user_message_text:
        return str(exc.user_message_text)
    err = exc.error
    summary = str(getattr(err, "_tag", None) or err)
    path = getattr(err, "get_path", None)
    if callable(path) and getattr(err, "is_path", lambda: False)():
        lookup = path()
        if getattr(lookup, "is_not_found", lambda: False)():
            return "not found"
        summary = f"path/{getattr(lookup, '_tag', lookup)}"
    return summary


# ---------------------------------------------------------------- listing and sharing


@dataclass(frozen=True)
class DropboxFile:
    """A file under the shared folder; ``relative`` is its path below that folder."""

    path_display: str
    relative: PurePosixPath
    size: int
    content_hash: str | None
    id: str


def _api_path(folder: str) -> str:
    """The API's form of a folder path: ``""`` for the root, ``/A/B`` otherwise."""
    folder = folder.strip()
    if not folder or folder == "/":
        return ""
    if not folder.startswith("/"):
        folder = "/" + folder
    return folder.rstrip("/")


def check_scopes(dbx: dropbox.Dropbox, folder: str) -> list[str]:
    """The scopes ``comfyfleet dropbox links`` needs that the token lacks.

    Each scope is probed with a call that changes nothing: listing one entry,
    listing the folder's links, and creating a link to a path that does not exist
    (Dropbox checks the scope before it looks at the path). A route error (the
    folder is missing, say) means the scope let the call through.
    """
    root = _api_path(folder)
    nonce = secrets.token_hex(8)
    probes: list[tuple[str, Callable[[], object]]] = [
        ("files.metadata.read", lambda: dbx.files_list_folder(root, limit=1)),
        (
            "sharing.read",
            lambda: dbx.sharing_list_shared_links(path=root or None, direct_only=True),
        ),
        (
            "sharing.write",
            lambda: dbx.sharing_create_shared_link_with_settings(
                f"{root}/.comfyfleet-scope-check-{nonce}"
            ),
        ),
    ]
    missing: list[str] = []
    for scope, probe in probes:
        try:
            _call(f"check the scope {scope}", probe)
        except DropboxScopeError as exc:
            missing += [s for s in exc.missing if s not in missing]
        except DropboxError:
            continue  # not a scope problem: the real calls will say what it is
    return missing


def list_files(dbx: dropbox.Dropbox, folder: str) -> list[DropboxFile]:
    """Every file under ``folder``, recursively (``list_folder`` then ``continue``)."""
    root = _api_path(folder)
    shown = root or "/"
    try:
        result = dbx.files_list_folder(root, recursive=True)
    except dbx_exceptions.ApiError as exc:
        err = exc.error
        if isinstance(err, dbx_files.ListFolderError) and err.is_path():
            lookup = err.get_path()
            if lookup.is_not_found():
                raise DropboxError(f"Dropbox folder {shown} not found") from None
            if lookup.is_not_folder():
                raise DropboxError(f"{shown} is a file, not a folder: give its folder") from None
        raise DropboxError(f"Dropbox could not list {shown}: {_route_error_text(exc)}") from None
    except _SDK_ERRORS as exc:
        raise _as_dropbox_error(f"list {shown}", exc) from None
    files: list[DropboxFile] = []
    prefix = root.lower() + "/"
    while True:
        for entry in result.entries:
            if not isinstance(entry, dbx_files.FileMetadata):
                continue
            if entry.is_downloadable is False:
                continue  # Paper docs and the like: nothing to download
            lower = str(entry.path_lower)
            if not lower.startswith(prefix):
                continue
            try:
                relative = safe_relative_path(str(entry.path_display)[len(prefix) :])
            except ValueError as exc:
                raise DropboxError(
                    f"cannot map {entry.path_display} into a workspace: {exc}"
                ) from None
            files.append(
                DropboxFile(
                    path_display=str(entry.path_display),
                    relative=relative,
                    size=int(entry.size),
                    content_hash=entry.content_hash,
                    id=str(entry.id),
                )
            )
        if not result.has_more:
            break
        result = _call(f"list {shown}", dbx.files_list_folder_continue, result.cursor)
    return sorted(files, key=lambda f: str(f.relative))


def shared_link(dbx: dropbox.Dropbox, path: str) -> str:
    """The shared link of ``path``: a new one, or the one that already exists."""
    try:
        return str(dbx.sharing_create_shared_link_with_settings(path).url)
    except dbx_exceptions.ApiError as exc:
        err = exc.error
        if not (
            isinstance(err, dbx_sharing.CreateSharedLinkWithSettingsError)
            and err.is_shared_link_already_exists()
        ):
            raise DropboxError(
                f"Dropbox could not share {path}: {_route_error_text(exc)}"
            ) from None
        existing = err.get_shared_link_already_exists()
        if existing is not None and existing.is_metadata():
            return str(existing.get_metadata().url)
    except _SDK_ERRORS as exc:
        raise _as_dropbox_error(f"share {path}", exc) from None
    links = _call(
        f"find the shared link of {path}",
        dbx.sharing_list_shared_links,
        path=path,
        direct_only=True,
    ).links
    if not links:
        raise DropboxError(f"Dropbox says {path} has a shared link, but lists none")
    return str(links[0].url)


def share_folder(
    dbx: dropbox.Dropbox,
    folder: str,
    *,
    prefix: str = "",
    progress: Callable[[int, int, DropboxFile], None] | None = None,
) -> list[DropboxLink]:
    """Links to every file under ``folder``, at their paths below it (under ``prefix``).

    Raises ``DropboxScopeError`` before doing anything when the token lacks scopes.
    ``progress(done, total, file)`` is called after each link.
    """
    missing = check_scopes(dbx, folder)
    if missing:
        raise DropboxScopeError(missing, _scope_message(missing))
    under = safe_relative_path(prefix) if prefix.strip("/ ") and prefix != "." else PurePosixPath()
    files = list_files(dbx, folder)
    if not files:
        raise DropboxError(f"Dropbox folder {_api_path(folder) or '/'} holds no files")
    links: list[DropboxLink] = []
    for i, f in enumerate(files, start=1):
        url = dropbox_direct_url(shared_link(dbx, f.path_display))
        links.append(
            DropboxLink(path=under / f.relative, url=url, size=f.size, content_hash=f.content_hash)
        )
        if progress is not None:
            progress(i, len(files), f)
    return links


# ---------------------------------------------------------------- the links files


@dataclass(frozen=True)
class LinksWritten:
    """What ``write_links`` wrote: the links file, its base64 form, and their sizes."""

    path: Path
    b64_path: Path
    links: int
    total_bytes: int
    b64_chars: int

    @property
    def fits_in_env(self) -> bool:
        """Whether the base64 form fits in one environment variable (Linux: 128 KiB)."""
        return self.b64_chars + len(LINKS_ENV_VAR) + 1 < ENV_VALUE_LIMIT


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_links(links: Sequence[DropboxLink], out: Path, *, folder: str) -> LinksWritten:
    """Write the links file at ``out`` and its base64 form at ``out`` + ``.b64``."""
    text = format_links_file(links, folder=_api_path(folder) or "/")
    b64 = encode_links_env(text)
    b64_path = out.with_name(out.name + ".b64")
    _write_atomic(out, text)
    _write_atomic(b64_path, b64 + "\n")
    return LinksWritten(
        path=out,
        b64_path=b64_path,
        links=len(links),
        total_bytes=sum(link.size or 0 for link in links),
        b64_chars=len(b64),
    )


def share_folder_to_files(
    folder: str,
    out: Path,
    *,
    settings: SourceSettings | None = None,
    env: Mapping[str, str] | None = None,
    prefix: str = "",
    progress: Callable[[int, int, DropboxFile], None] | None = None,
) -> LinksWritten:
    """The whole of ``comfyfleet dropbox links``: token, client, links, files."""
    token = token_from_env(env)
    settings = settings or SourceSettings.from_env(env)
    try:
        under = safe_relative_path(prefix) if prefix.strip("/ ") else PurePosixPath()
    except ValueError as exc:
        raise DropboxError(f"--prefix: {exc}") from None
    with dropbox_client(token, settings) as dbx:
        links = share_folder(dbx, folder, prefix=str(under), progress=progress)
    return write_links(links, out, folder=folder)

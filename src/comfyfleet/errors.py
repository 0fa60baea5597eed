"""One exception hierarchy for comfyfleet.

Every error a user can meet says what went wrong and, where there is one, what
to do next. Nothing here ever carries an API key or token: messages are built
from the server's own words and our own, never from request headers or URLs
that hold a secret.
"""

from __future__ import annotations


class ComfyfleetError(Exception):
    """Root of every error comfyfleet raises on purpose."""


class ConfigError(ComfyfleetError):
    """A configuration file, profile or environment variable is wrong or missing.

    ``source`` names the file (or variable) and ``field`` the dotted path of the
    offending field, so the CLI can print one precise line.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        self.reason = message
        where = ""
        if source and field:
            where = f"{source}: {field}: "
        elif source:
            where = f"{source}: "
        elif field:
            where = f"{field}: "
        super().__init__(f"{where}{message}")


class ProviderError(ComfyfleetError):
    """A GPU provider (Vast.ai or the simulator) refused or failed a call.

    ``status`` is the HTTP status (0 when no answer came back), ``code`` the
    provider's error code when it gave one (``no_such_ask``, ``auth_error``...),
    and the message is the provider's own ``msg`` text.
    """

    def __init__(self, message: str, *, status: int = 0, code: str | None = None):
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


class MissingAPIKey(ProviderError):
    """No API key was found anywhere comfyfleet looks."""


class AuthError(ProviderError):
    """The provider refused the API key (it is never printed)."""


class OfferUnavailable(ProviderError):
    """The offer was rented by someone else or withdrawn (Vast's ``no_such_ask``)."""


class InsufficientCredit(ProviderError):
    """The account has too little credit for the call."""


class RateLimited(ProviderError):
    """The provider kept answering 429 after every retry."""


class InstanceNotFound(ProviderError):
    """The instance does not exist (or no longer exists) at the provider."""


class ProviderUnavailable(ProviderError):
    """The provider could not be reached, or kept failing with 5xx, after every retry."""


class DownloadError(ComfyfleetError):
    """A file could not be downloaded. ``url`` never carries a query string (tokens live there)."""

    def __init__(self, message: str, *, url: str | None = None):
        self.url = url
        self.message = message
        super().__init__(message)


class DownloadDomainNotAllowed(DownloadError):
    """A URL, or one of its redirects, points at a host the allowlist does not name."""

    def __init__(self, host: str, *, url: str | None = None):
        self.host = host
        super().__init__(f"Download domain not allowed: {host}", url=url)


class DownloadHTTPError(DownloadError):
    """The server kept answering an HTTP error status."""

    def __init__(self, message: str, *, status: int, url: str | None = None):
        self.status = status
        super().__init__(message, url=url)


class HashMismatch(DownloadError):
    """The bytes on disk do not have the expected sha256 (after every retry)."""

    def __init__(self, *, expected: str, actual: str, url: str | None = None):
        self.expected = expected
        self.actual = actual
        super().__init__(f"sha256 mismatch: expected {expected}, got {actual}", url=url)


class DownloadTimeout(DownloadError):
    """A file ran past its deadline, or stalled below the lowest speed for too long."""


class InsufficientDiskSpace(DownloadError):
    """Not enough free disk for the batch; nothing was started.

    ``missing`` is how many more bytes must be freed on ``path``'s filesystem.
    """

    def __init__(self, *, path: str, needed: int, free: int):
        self.path = path
        self.needed = needed
        self.free = free
        self.missing = needed - free
        super().__init__(
            f"not enough free disk space on {path}: {needed} bytes needed, {free} free; "
            f"free {self.missing} more bytes or download fewer files"
        )

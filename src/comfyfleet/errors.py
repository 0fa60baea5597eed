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


class ComfyError(ComfyfleetError):
    """ComfyUI (local, or the simulator) failed a call or could not be kept running.

    ``url`` is the ComfyUI base URL (loopback, never a secret).
    """

    def __init__(self, message: str, *, url: str | None = None):
        self.url = url
        self.message = message
        super().__init__(message)


class ComfyUnavailable(ComfyError):
    """ComfyUI did not answer: not started yet, crashed, or listening elsewhere."""


class ComfyHTTPError(ComfyError):
    """ComfyUI answered an unexpected HTTP status (``status``)."""

    def __init__(self, message: str, *, status: int, url: str | None = None):
        self.status = status
        super().__init__(message, url=url)


class ComfyValidationError(ComfyHTTPError):
    """ComfyUI refused a workflow (HTTP 400 on ``POST /prompt``).

    ``error_type`` is ComfyUI's ``error.type`` (``invalid_prompt``,
    ``prompt_outputs_failed_validation``...), ``node_errors`` its per-node errors
    as sent; the message lists them one node per line.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str,
        node_errors: dict[str, object],
        status: int = 400,
        url: str | None = None,
    ):
        self.error_type = error_type
        self.node_errors = node_errors
        super().__init__(message, status=status, url=url)


class ComfyExecutionError(ComfyError):
    """A queued workflow failed while running (``execution_error``)."""

    def __init__(
        self,
        message: str,
        *,
        prompt_id: str,
        node_id: str | None = None,
        node_type: str | None = None,
        exception_type: str | None = None,
        exception_message: str | None = None,
        url: str | None = None,
    ):
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        super().__init__(message, url=url)


class ComfyInterrupted(ComfyExecutionError):
    """A queued workflow was interrupted (``execution_interrupted``)."""


class ComfyPromptLost(ComfyError):
    """A prompt is neither queued, running nor in the history: deleted, or ComfyUI restarted."""


class ComfyTimeout(ComfyError):
    """A workflow, or ComfyUI's readiness, ran past its deadline."""


class ComfyFailed(ComfyError):
    """Supervision gave up on ComfyUI; ``reason`` is the failure code the instance reports.

    Codes: ``comfy_crash_loop``, ``warmup_failed``, ``comfy_missing_nodes``,
    ``gpu_memory_busy``, ``comfy_not_ready``, ``comfy_port_busy``, ``comfy_start_failed``.
    """

    def __init__(self, reason: str, message: str, *, url: str | None = None):
        self.reason = reason
        super().__init__(message, url=url)


class ComfyMissingNodes(ComfyFailed):
    """ComfyUI lacks node types the workspace's workflows use (``nodes``, sorted)."""

    def __init__(self, nodes: list[str], message: str, *, url: str | None = None):
        self.nodes = nodes
        super().__init__("comfy_missing_nodes", message, url=url)


class ManifestError(ConfigError):
    """A workspace manifest is invalid; nothing was installed or downloaded.

    ``source`` names the manifest file and ``field`` the dotted path of the
    offending entry (``models[3].dest``); the message ends with its YAML line.
    """


class ProvisionFailed(ComfyfleetError):
    """A strict provision left critical items missing; ``missing`` names each one.

    Each entry reads ``WHAT: REASON``, for example
    ``models/checkpoints/x.safetensors: sha256 mismatch ...``.
    """

    def __init__(self, missing: list[str]):
        self.missing = missing
        listed = "; ".join(missing)
        super().__init__(
            f"provision failed: {len(missing)} critical item"
            f"{'s' if len(missing) != 1 else ''} missing: {listed}"
        )


class SourceError(DownloadError):
    """A model source (``hf://``, ``civitai://``, a Dropbox link, a URL) cannot be fetched.

    Raised while resolving the source, before any byte moves; the message says why
    and what to do. ``source`` is the source as written (never with a token),
    ``status`` the HTTP status that decided it (0 when none).
    """

    def __init__(
        self, message: str, *, source: str | None = None, status: int = 0, url: str | None = None
    ):
        self.source = source
        self.status = status
        super().__init__(message, url=url)


class InvalidSource(SourceError):
    """The source is not one comfyfleet understands (scheme, form, or a Dropbox folder link)."""


class MissingToken(SourceError):
    """The source needs a token that is not set; ``variable`` names it (``HF_TOKEN``...).

    The message starts with the seeds' words: ``Missing HF_TOKEN`` / ``Missing CIVITAI_TOKEN``.
    """

    def __init__(
        self,
        variable: str,
        message: str,
        *,
        source: str | None = None,
        status: int = 0,
        url: str | None = None,
    ):
        self.variable = variable
        super().__init__(f"Missing {variable}: {message}", source=source, status=status, url=url)


class GatedRepo(SourceError):
    """A gated Hugging Face repository whose licence the token's account has not accepted."""


class SourceAuthError(SourceError):
    """The host refused the token, or refused this account the file (401/403)."""


class SourceNotFound(SourceError):
    """The repository, revision, file or model version does not exist (or is not visible)."""


class SourceRateLimited(SourceError):
    """The host kept answering 429; ``retry_after`` is its advice in seconds, when given."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        source: str | None = None,
        status: int = 429,
        url: str | None = None,
    ):
        self.retry_after = retry_after
        super().__init__(message, source=source, status=status, url=url)


class SourceMismatch(SourceError):
    """The source now serves other content than the manifest pins (sha256 or size)."""


class PlainHTTPNotAllowed(DownloadDomainNotAllowed):
    """A plain ``http://`` URL to a host that is not named as a local mirror."""

    def __init__(self, host: str, *, url: str | None = None):
        self.host = host
        DownloadError.__init__(
            self,
            f"Download domain not allowed: {host} (plain http:// is allowed only for the "
            "hosts in DM_ALLOWED_HTTP_HOSTS; use https://)",
            url=url,
        )


class DropboxError(ComfyfleetError):
    """The Dropbox API refused or failed a call; the message says what to do."""


class MissingDropboxToken(DropboxError):
    """``DROPBOX_TOKEN`` is not set."""


class DropboxScopeError(DropboxError):
    """The Dropbox token lacks scopes; ``missing`` lists them (``sharing.write``...)."""

    def __init__(self, missing: list[str], message: str):
        self.missing = missing
        super().__init__(message)


class DropboxLinksError(ConfigError):
    """A Dropbox links file (or its base64 form) is malformed, or a path escapes the workspace."""


class StoreError(ComfyfleetError):
    """The control plane's store refused or could not do an operation."""


class StoreUnavailable(StoreError):
    """The database could not be reached or opened; the message says which and what to do."""


class UnknownInstance(StoreError):
    """The store has no instance with this id."""

    def __init__(self, instance_id: int):
        self.instance_id = instance_id
        super().__init__(f"no instance {instance_id} in the store")


class IllegalTransition(StoreError):
    """A move the instance lifecycle does not allow (states are their lowercase names)."""

    def __init__(
        self,
        instance_id: int,
        from_state: str,
        to_state: str,
        *,
        allowed: list[str],
        hint: str | None = None,
    ):
        self.instance_id = instance_id
        self.from_state = str(from_state)
        self.to_state = str(to_state)
        self.allowed = [str(state) for state in allowed]
        why = hint or "from {} it may go to: {}".format(
            self.from_state, ", ".join(self.allowed) or "nothing (it has ended)"
        )
        super().__init__(
            f"instance {instance_id} cannot go from {self.from_state} to {self.to_state}: {why}"
        )


class StaleInstanceState(StoreError):
    """An instance was not in the state the caller expected: someone moved it first."""

    def __init__(self, instance_id: int, *, expected: str, actual: str):
        self.instance_id = instance_id
        self.expected = str(expected)
        self.actual = str(actual)
        super().__init__(
            f"instance {instance_id} is {self.actual}, not {self.expected}: "
            "another writer moved it; read it again"
        )


class SlotTaken(StoreError):
    """A live instance already holds this (profile, slot): a second rental is refused."""

    def __init__(self, profile: str, slot: int | None):
        self.profile = profile
        self.slot = slot
        super().__init__(
            f"slot {slot} of profile {profile!r} is held by a live instance; "
            "it frees when that instance is destroyed or has failed"
        )


class LeaseLost(StoreError):
    """The lease's epoch moved on (another process took over, or it expired)."""

    def __init__(self, name: str, epoch: int):
        self.name = name
        self.epoch = epoch
        super().__init__(
            f"lease {name!r} is no longer held in epoch {epoch}: another process took over "
            "or it expired; stop acting and acquire it again"
        )

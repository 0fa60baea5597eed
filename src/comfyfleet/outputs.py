"""Where job outputs are kept: a content-addressed store, by sha256, with a size cap.

The agent streams each output to the control plane with its sha256; ``put_stream``
writes it to ``<root>/tmp/<random>.part`` while hashing it, stops (and keeps nothing)
past the size cap, fsyncs it, and renames it to ``<root>/sha256/ab/abcdef…`` only when
the hash matches the one announced. A blob is therefore complete and verified once it
has its name; two uploads of the same content end in the same file. The job's outputs
(names, kinds) are rows in the store (``store.jobs.record_output``) that point here.

The root is ``<data dir>/outputs`` by default (``comfyfleet.store.db.data_dir``).
``OutputStore`` is what the API needs from a store, so that an S3-compatible one can
be added next to ``LocalOutputStore``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple, Protocol, TypeAlias

from comfyfleet.errors import ComfyfleetError

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "ByteSource",
    "LocalOutputStore",
    "OutputHashMismatch",
    "OutputNotFound",
    "OutputStore",
    "OutputStoreError",
    "OutputTooLarge",
    "StoredBlob",
    "default_outputs_root",
]

DEFAULT_MAX_OUTPUT_BYTES: Final = 4 * 1024**3
"""The default cap on one output: room for a long video, not for a runaway upload."""

READ_CHUNK: Final = 1024 * 1024
# Writes are batched to this size: one trip to a worker thread per batch, not per chunk.
_WRITE_BATCH: Final = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")

ByteSource: TypeAlias = AsyncIterable[bytes] | BinaryIO
"""An upload: an async iterator of byte chunks (a request body), or a file opened ``rb``."""


class OutputStoreError(ComfyfleetError):
    """The output store refused or could not keep an output."""


class OutputHashMismatch(OutputStoreError):
    """The bytes received do not have the sha256 announced; nothing was kept."""

    def __init__(self, *, expected: str, actual: str):
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"output sha256 mismatch: announced {expected}, received {actual}; "
            "nothing was kept, upload it again"
        )


class OutputTooLarge(OutputStoreError):
    """The upload ran past the size cap; nothing was kept."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(
            f"output larger than the cap of {limit} bytes; nothing was kept "
            "(raise the output size cap in the control plane's settings if it is legitimate)"
        )


class OutputNotFound(OutputStoreError):
    """No blob with this sha256 in the store."""

    def __init__(self, sha256: str):
        self.sha256 = sha256
        super().__init__(f"no stored output with sha256 {sha256}")


class StoredBlob(NamedTuple):
    """A blob as stored: its sha256, its size, and its file (None where not on a local disk)."""

    sha256: str
    size: int
    path: Path | None


class OutputStore(Protocol):
    """What the control plane needs from an output store (local disk, or S3-compatible)."""

    async def put_stream(
        self,
        source: ByteSource,
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> StoredBlob:
        """Store ``source``; verified against ``expected_sha256`` and capped at ``max_bytes``."""
        ...

    async def exists(self, sha256: str) -> bool:
        """Whether a complete blob ``sha256`` is stored."""
        ...

    def iter_bytes(self, sha256: str, *, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks; ``OutputNotFound`` when there is none."""
        ...


def default_outputs_root(env: Mapping[str, str] | None = None) -> Path:
    """``<data dir>/outputs``: where outputs go unless the root is configured."""
    from comfyfleet.store.db import data_dir

    return data_dir(env) / "outputs"


def _check_sha256(sha256: str) -> str:
    digest = sha256.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise OutputStoreError(f"not a sha256 (64 hexadecimal digits): {sha256[:80]!r}")
    return digest


class _PartFile:
    """A ``.part`` file being written and hashed; its methods run on a worker thread."""

    def __init__(self, tmp_dir: Path, max_bytes: int):
        self.path = tmp_dir / f"{uuid.uuid4().hex}.part"
        self.max_bytes = max_bytes
        self.size = 0
        self.hash = hashlib.sha256()
        self.lock = threading.Lock()  # an abort waits for a write in flight
        self.file: BinaryIO | None = None
        self.closed = False

    def write(self, chunks: list[bytes]) -> None:
        with self.lock:
            if self.closed:
                return
            file = self._opened()
            for chunk in chunks:
                self.hash.update(chunk)
                file.write(chunk)

    def _opened(self) -> BinaryIO:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.file = os.fdopen(fd, "wb")
        return self.file

    def finish(self, final_for: _FinalPath, expected: str | None) -> StoredBlob:
        with self.lock:
            file = self._opened()  # an empty upload has not opened it yet
            file.flush()
            os.fsync(file.fileno())
            file.close()
            self.closed = True
            digest = self.hash.hexdigest()
            if expected is not None and digest != expected:
                self.path.unlink(missing_ok=True)
                raise OutputHashMismatch(expected=expected, actual=digest)
            final = final_for(digest)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if final.exists():
                # The same content, stored already (or by a racing upload): one file is enough.
                self.path.unlink(missing_ok=True)
            else:
                os.replace(self.path, final)
                _fsync_dir(final.parent)
            return StoredBlob(digest, self.size, final)

    def abort(self) -> None:
        with self.lock:
            self.closed = True
            if self.file is not None:
                self.file.close()
            self.path.unlink(missing_ok=True)


class _FinalPath(Protocol):
    def __call__(self, sha256: str) -> Path: ...


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


async def _chunks(source: ByteSource) -> AsyncIterator[bytes]:
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            yield chunk
        return
    while chunk := await asyncio.to_thread(source.read, READ_CHUNK):
        yield chunk


class LocalOutputStore:
    """Outputs on the local disk under ``root``: ``sha256/ab/<sha256>``, ``tmp/*.part``."""

    def __init__(
        self, root: Path | str | None = None, *, max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    ):
        if max_bytes <= 0:
            raise ValueError("the output size cap must be positive")
        self.root = Path(root).expanduser() if root is not None else default_outputs_root()
        self.max_bytes = max_bytes

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def path(self, sha256: str) -> Path:
        """Where blob ``sha256`` is (or would be) stored."""
        digest = _check_sha256(sha256)
        return self.root / "sha256" / digest[:2] / digest

    async def put_stream(
        self,
        source: ByteSource,
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> StoredBlob:
        """Store ``source`` under its sha256; ``(sha256, size, path)``.

        ``OutputHashMismatch`` when it is not ``expected_sha256``, ``OutputTooLarge``
        past ``max_bytes`` (default: the store's cap); either way nothing is kept, nor
        when the upload breaks off. The disk work runs on worker threads.
        """
        expected = _check_sha256(expected_sha256) if expected_sha256 is not None else None
        limit = self.max_bytes if max_bytes is None else max_bytes
        part = _PartFile(self.tmp_dir, limit)
        batch: list[bytes] = []
        batched = 0
        try:
            async for chunk in _chunks(source):
                if not chunk:
                    continue
                part.size += len(chunk)
                if part.size > limit:
                    raise OutputTooLarge(limit)
                batch.append(bytes(chunk))
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    await asyncio.to_thread(part.write, batch)
                    batch, batched = [], 0

            def last_batch_and_finish() -> StoredBlob:
                part.write(batch)
                return part.finish(self.path, expected)

            return await asyncio.to_thread(last_batch_and_finish)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(part.abort))
            raise

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path(sha256).is_file)

    def open(self, sha256: str) -> BinaryIO:
        """The blob, opened for reading (read it off the event loop); ``OutputNotFound``."""
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise OutputNotFound(sha256) from None

    async def iter_bytes(
        self, sha256: str, *, chunk_size: int = READ_CHUNK
    ) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self.open, sha256)
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    def remove_stale_parts(self, older_than_s: float = 3600.0, *, now: float | None = None) -> int:
        """Delete ``.part`` files left by uploads a crash cut short; how many went.

        Their age is their modification time's, against ``now`` (default: the wall clock,
        the clock file times are on).
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        try:
            entries = list(self.tmp_dir.glob("*.part"))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

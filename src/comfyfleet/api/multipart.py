"""A streaming reader of ``multipart/form-data`` request bodies (RFC 7578), for ``POST /api/jobs``.

A file part is handed on chunk by chunk (to the output store, which hashes it and caps
its size), so that an uploaded image is never held in memory whole. Starlette's own form
parser needs the python-multipart package, which comfyfleet does not depend on; this one
reads the few things a job submission sends: each part's field name, file name and
content type, and its bytes.

    reader = MultipartReader(request.stream(), boundary_of(content_type))
    async for part in reader.parts():
        if part.filename is None:
            text = await part.read(limit=1 << 20)
        else:
            await outputs.put_stream(part.chunks())

Each part is read before the next one begins; one left unread is skipped.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

from comfyfleet.errors import ComfyfleetError

__all__ = ["MultipartError", "MultipartReader", "Part", "PartTooLarge", "boundary_of"]

MAX_HEADER_BYTES: Final = 16 * 1024
"""The most a part's header block may hold: names and types, never content."""

MAX_PARTS: Final = 1000
"""More parts than a job could use: a body with more is refused rather than read on."""

_CRLF: Final = b"\r\n"
_TRANSPORT_PADDING: Final = b" \t"


class MultipartError(ComfyfleetError):
    """The body is not well-formed ``multipart/form-data``; the API answers 400."""


class PartTooLarge(MultipartError):
    """A part read into memory (``Part.read``) is longer than allowed."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        super().__init__(
            f"form field {name!r} is larger than {limit} bytes; send large content as a file "
            "part, or make it smaller"
        )


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; ``MultipartError`` otherwise."""
    message = email.parser.HeaderParser(policy=email.policy.HTTP).parsestr(
        f"Content-Type: {content_type}\r\n\r\n"
    )
    if message.get_content_type() != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {content_type.split(';')[0]!r}")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise MultipartError(
            "the multipart/form-data content type has no boundary (of 1 to 70 characters)"
        )
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("a multipart boundary is ASCII text") from None


class Part:
    """One part: its field ``name``, ``filename`` (None for a plain field), ``content_type``."""

    def __init__(
        self, reader: MultipartReader, name: str, filename: str | None, content_type: str | None
    ):
        self.name = name
        self.filename = filename
        self.content_type = content_type
        self._reader = reader
        self._started = False
        self._done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The part's bytes, as they arrive; iterable once."""
        if self._started:
            raise RuntimeError(f"form field {self.name!r} is being read or was read already")
        self._started = True
        async for chunk in self._reader._body(self.name):
            yield chunk
        self._done = True

    async def read(self, *, limit: int) -> bytes:
        """The whole part, at most ``limit`` bytes (``PartTooLarge`` past it)."""
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise PartTooLarge(self.name, limit)
        return bytes(data)

    async def _skip(self) -> None:
        if not self._started:
            async for _ in self.chunks():
                pass
        elif not self._done:
            raise RuntimeError(f"form field {self.name!r} was not read to its end")


class MultipartReader:
    """Reads the parts of one body from ``stream`` (``request.stream()``), in order."""

    def __init__(
        self,
        stream: AsyncIterable[bytes],
        boundary: bytes,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_parts: int = MAX_PARTS,
    ):
        self._stream = aiter(stream)
        # Every delimiter but the first follows a CRLF; one put in front makes the first
        # look the same, and the preamble before it is skipped as any part's tail would be.
        self._delimiter = _CRLF + b"--" + boundary
        self._buffer = bytearray(_CRLF)
        self._eof = False
        self._max_header_bytes = max_header_bytes
        self._max_parts = max_parts

    async def parts(self) -> AsyncIterator[Part]:
        """Each part in turn; the body must end with its closing delimiter."""
        await self._skip_preamble()
        count = 0
        while await self._part_follows():
            count += 1
            if count > self._max_parts:
                raise MultipartError(f"the body has more than {self._max_parts} parts")
            part = await self._headers()
            yield part
            await part._skip()

    async def _fill(self) -> bool:
        while not self._eof:
            chunk = await anext(self._stream, None)
            if chunk is None:
                self._eof = True
            elif chunk:
                self._buffer += chunk
                return True
        return False

    async def _skip_preamble(self) -> None:
        keep = len(self._delimiter) - 1
        while (found := self._buffer.find(self._delimiter)) < 0:
            if len(self._buffer) > keep:
                del self._buffer[:-keep]
            if not await self._fill():
                raise MultipartError(
                    "the body holds no part: its multipart boundary never appears in it"
                )
        del self._buffer[: found + len(self._delimiter)]

    async def _part_follows(self) -> bool:
        """After a delimiter: False at the closing one (``--``), True before a part."""
        while True:
            if self._buffer[:2] == b"--":
                return False
            rest = self._buffer.lstrip(_TRANSPORT_PADDING)
            if rest.startswith(_CRLF):
                del self._buffer[: len(self._buffer) - len(rest) + len(_CRLF)]
                return True
            if len(rest) >= len(_CRLF) or len(self._buffer) > 1024:
                raise MultipartError("a multipart boundary line is followed by stray characters")
            if not await self._fill():
                raise MultipartError(
                    "the body ends without its closing boundary (it was cut short?)"
                )

    async def _headers(self) -> Part:
        if self._buffer.startswith(_CRLF):
            raise MultipartError("a part has no Content-Disposition header (RFC 7578 needs one)")
        while (end := self._buffer.find(_CRLF + _CRLF)) < 0:
            if len(self._buffer) > self._max_header_bytes:
                raise MultipartError(f"a part's headers exceed {self._max_header_bytes} bytes")
            if not await self._fill():
                raise MultipartError("the body ends inside a part's headers")
        if end > self._max_header_bytes:
            raise MultipartError(f"a part's headers exceed {self._max_header_bytes} bytes")
        # Browsers send a non-ASCII file name as raw UTF-8 in the quoted string.
        block = bytes(self._buffer[: end + 4]).decode("utf-8", "replace")
        del self._buffer[: end + 4]
        message = email.parser.HeaderParser(policy=email.policy.HTTP).parsestr(block)
        if message.get_content_disposition() != "form-data":
            raise MultipartError("each part needs Content-Disposition: form-data; name=...")
        name = message.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise MultipartError("a part's Content-Disposition has no field name")
        filename = message.get_filename()
        content_type = message.get("content-type")
        return Part(
            self,
            name,
            filename if isinstance(filename, str) else None,
            str(content_type) if content_type is not None else None,
        )

    async def _body(self, name: str) -> AsyncIterator[bytes]:
        # The delimiter may straddle two chunks: hold back one byte less than its length.
        keep = len(self._delimiter) - 1
        while True:
            found = self._buffer.find(self._delimiter)
            if found >= 0:
                if found:
                    yield bytes(self._buffer[:found])
                del self._buffer[: found + len(self._delimiter)]
                return
            if len(self._buffer) > keep:
                chunk = bytes(self._buffer[:-keep])
                del self._buffer[:-keep]
                yield chunk
            if not await self._fill():
                raise MultipartError(
                    f"the body ends inside form field {name!r} (no boundary after it): "
                    "the upload was cut short"
                )

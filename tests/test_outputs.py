"""The output store: content-addressed by sha256, verified while streaming, capped in size.

An output is kept only when its bytes have the sha256 announced and fit under the cap;
otherwise nothing is left behind, not even a ``.part`` file.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from comfyfleet.outputs import (
    LocalOutputStore,
    OutputHashMismatch,
    OutputNotFound,
    OutputStore,
    OutputStoreError,
    OutputTooLarge,
    default_outputs_root,
)

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # spans several write batches
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


def leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def outputs(tmp_path: Path) -> LocalOutputStore:
    return LocalOutputStore(tmp_path / "outputs", max_bytes=8 * 1024 * 1024)


async def test_an_output_is_stored_under_its_verified_sha256(outputs: LocalOutputStore) -> None:
    blob = await outputs.put_stream(chunks(PAYLOAD), expected_sha256=PAYLOAD_SHA.upper())
    sha256, size, path = blob
    assert (sha256, size) == (PAYLOAD_SHA, len(PAYLOAD))
    assert path == outputs.root / "sha256" / PAYLOAD_SHA[:2] / PAYLOAD_SHA
    assert path is not None and path.read_bytes() == PAYLOAD
    assert leftovers(outputs.root) == [path]  # no .part left
    assert await outputs.exists(PAYLOAD_SHA)
    with outputs.open(PAYLOAD_SHA) as handle:
        assert handle.read() == PAYLOAD
    read = b"".join([chunk async for chunk in outputs.iter_bytes(PAYLOAD_SHA, chunk_size=1000)])
    assert read == PAYLOAD


async def test_an_output_with_no_announced_hash_is_stored_under_the_one_computed(
    outputs: LocalOutputStore,
) -> None:
    blob = await outputs.put_stream(chunks(b"hello"))
    assert blob.sha256 == hashlib.sha256(b"hello").hexdigest() and blob.size == 5
    empty = await outputs.put_stream(chunks(b""))
    assert empty.sha256 == hashlib.sha256(b"").hexdigest() and empty.size == 0
    assert empty.path is not None and empty.path.read_bytes() == b""


async def test_a_file_can_be_the_source(outputs: LocalOutputStore, tmp_path: Path) -> None:
    source = tmp_path / "clip.mp4"
    source.write_bytes(PAYLOAD)
    with source.open("rb") as handle:
        blob = await outputs.put_stream(handle, expected_sha256=PAYLOAD_SHA)
    assert blob.sha256 == PAYLOAD_SHA
    blob = await outputs.put_stream(io.BytesIO(b"text output"))
    assert blob.path is not None and blob.path.read_bytes() == b"text output"


async def test_a_hash_mismatch_leaves_nothing(outputs: LocalOutputStore) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(OutputHashMismatch) as caught:
        await outputs.put_stream(chunks(PAYLOAD), expected_sha256=wrong)
    assert (caught.value.expected, caught.value.actual) == (wrong, PAYLOAD_SHA)
    assert leftovers(outputs.root) == []
    assert not await outputs.exists(PAYLOAD_SHA)
    assert not await outputs.exists(wrong)


async def test_the_size_cap_is_enforced_and_leaves_nothing(outputs: LocalOutputStore) -> None:
    with pytest.raises(OutputTooLarge, match="nothing was kept"):
        await outputs.put_stream(chunks(PAYLOAD), max_bytes=len(PAYLOAD) - 1)
    assert leftovers(outputs.root) == []
    with pytest.raises(OutputTooLarge):
        await outputs.put_stream(chunks(PAYLOAD + PAYLOAD + PAYLOAD))  # the store's own cap
    assert leftovers(outputs.root) == []
    exact = await outputs.put_stream(chunks(PAYLOAD), max_bytes=len(PAYLOAD))
    assert exact.size == len(PAYLOAD)


async def test_a_broken_off_upload_leaves_nothing(outputs: LocalOutputStore) -> None:
    async def breaks() -> AsyncIterator[bytes]:
        yield PAYLOAD[: 2 * 1024 * 1024]
        yield PAYLOAD[2 * 1024 * 1024 : 2 * 1024 * 1024 + 10]
        raise ConnectionResetError("agent went away")

    with pytest.raises(ConnectionResetError):
        await outputs.put_stream(breaks(), expected_sha256=PAYLOAD_SHA)
    assert leftovers(outputs.root) == []


async def test_a_cancelled_upload_leaves_nothing(outputs: LocalOutputStore) -> None:
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield PAYLOAD[: 2 * 1024 * 1024]
        started.set()
        await asyncio.sleep(3600)
        yield b""

    task = asyncio.create_task(outputs.put_stream(slow()))
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(outputs.root) == []


async def test_concurrent_uploads_of_the_same_content_end_in_one_file(
    outputs: LocalOutputStore,
) -> None:
    blobs = await asyncio.gather(
        *(
            outputs.put_stream(chunks(PAYLOAD, 100_000), expected_sha256=PAYLOAD_SHA)
            for _ in range(8)
        )
    )
    assert {tuple(blob) for blob in blobs} == {
        (PAYLOAD_SHA, len(PAYLOAD), outputs.path(PAYLOAD_SHA))
    }
    assert leftovers(outputs.root) == [outputs.path(PAYLOAD_SHA)]
    assert outputs.path(PAYLOAD_SHA).read_bytes() == PAYLOAD


async def test_a_missing_blob_is_named(outputs: LocalOutputStore) -> None:
    missing = "0" * 64
    assert not await outputs.exists(missing)
    with pytest.raises(OutputNotFound, match=missing):
        outputs.open(missing)
    with pytest.raises(OutputNotFound):
        [chunk async for chunk in outputs.iter_bytes(missing)]
    with pytest.raises(OutputStoreError, match="not a sha256"):
        outputs.path("../../etc/passwd")


def test_stale_part_files_are_swept(outputs: LocalOutputStore) -> None:
    outputs.tmp_dir.mkdir(parents=True)
    old = outputs.tmp_dir / "old.part"
    new = outputs.tmp_dir / "new.part"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (1_000.0, 1_000.0))
    assert outputs.remove_stale_parts(older_than_s=3600) == 1
    assert leftovers(outputs.root) == [new]


def test_outputs_live_under_the_data_directory_unless_told_otherwise(tmp_path: Path) -> None:
    env = {"COMFYFLEET_DATA_DIR": str(tmp_path / "data")}
    assert default_outputs_root(env) == tmp_path / "data" / "outputs"
    assert LocalOutputStore("~/elsewhere").root == Path("~/elsewhere").expanduser()
    with pytest.raises(ValueError, match="cap"):
        LocalOutputStore(tmp_path, max_bytes=0)


def test_the_local_store_is_an_output_store(outputs: LocalOutputStore) -> None:
    store: OutputStore = outputs  # checked by mypy; an S3 store would sit here too
    assert store is outputs

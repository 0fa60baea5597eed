"""The download engine against the file simulator, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from comfyfleet.agent.downloads import (
    Downloader,
    DownloadItem,
    DownloadOptions,
    ProgressChannel,
    ProgressEvent,
    _Intervals,
    download,
    redact_url,
)
from comfyfleet.clock import ManualClock
from comfyfleet.errors import (
    DownloadDomainNotAllowed,
    DownloadHTTPError,
    DownloadTimeout,
    HashMismatch,
    InsufficientDiskSpace,
)
from comfyfleet.sim.files import Fault, FileServer, RunningFileServer

MB = 1_000_000
MiB = 1 << 20

# Fast enough for tests: retries back off for milliseconds, not seconds.
FAST = DownloadOptions(backoff_base_s=0.01, backoff_cap_s=0.05, min_piece_size=256 * 1024)


@pytest.fixture
def fs() -> Iterator[RunningFileServer]:
    with RunningFileServer(FileServer()) as running:
        yield running


def item_for(fs: RunningFileServer, name: str, dest: Path, **kw: object) -> DownloadItem:
    f = fs.server.get_file(name)
    return DownloadItem(url=fs.file_url(name), dest=dest / name, sha256=f.sha256, **kw)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], within_s: float = 20) -> None:
    """Poll ``condition`` (state another thread changes) every 10 ms."""
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- parallelism, summary, progress ------------------------------------------


async def test_four_files_download_at_once_and_each_throttled_file_over_several_ranges(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = [fs.server.add_file(f"m{i}.bin", 2 * MiB, rate_bps=2 * MB) for i in range(5)]
    items = [item_for(fs, f.name, tmp_path, size=f.size) for f in files]

    summary = await download(items, FAST)

    assert summary.ok, summary.lines()
    for f in files:
        assert (tmp_path / f.name).read_bytes() == f.data
        assert not (tmp_path / f"{f.name}.part").exists()
        assert not (tmp_path / f"{f.name}.part.state").exists()
    stats = fs.server.stats()
    assert stats.peak_files_in_flight >= 4
    assert stats.peak_files_in_flight <= 4  # the default: 4 files at once
    for f in files:
        assert stats.file(f.name).peak_ranged_in_flight >= 2
        assert len(stats.file(f.name).range_requests) >= 2
    assert len(summary.succeeded) == 5 and not summary.failed
    assert summary.bytes_downloaded == 5 * 2 * MiB
    assert summary.mb_per_s > 0
    assert summary.lines()[0].startswith("5 succeeded, 0 failed, 10485760 bytes in ")


async def test_per_host_limit_caps_connections_to_that_host(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = [fs.server.add_file(f"c{i}.bin", 1 * MiB, rate_bps=4 * MB) for i in range(3)]
    options = DownloadOptions(min_piece_size=256 * 1024, host_limits={"127.0.0.1": 2})

    summary = await download([item_for(fs, f.name, tmp_path) for f in files], options)

    assert summary.ok, summary.lines()
    assert fs.server.stats().peak_in_flight <= 2


async def test_progress_reports_bytes_per_file_and_overall(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = [fs.server.add_file(f"p{i}.bin", 1 * MiB, rate_bps=1 * MB) for i in range(2)]
    events: list[ProgressEvent] = []
    options = DownloadOptions(progress_interval_s=0.05, min_piece_size=256 * 1024)

    summary = await Downloader(options, progress=events.append).run(
        [item_for(fs, f.name, tmp_path, size=f.size) for f in files]
    )

    assert summary.ok
    await asyncio.sleep(0.1)  # the consumer thread may still hold the last events
    assert any(e.kind == "progress" and 0 < e.done < e.total for e in events if e.total)
    finals = [e for e in events if e.kind == "downloaded"]
    assert sorted(e.dest.name for e in finals) == ["p0.bin", "p1.bin"]
    assert all(e.done == e.total == 1 * MiB for e in finals)
    assert all(e.overall_total == 2 * MiB for e in events)
    assert max(e.overall_done for e in events) == 2 * MiB


async def test_a_blocking_progress_consumer_does_not_slow_the_download(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = [fs.server.add_file(f"b{i}.bin", 1 * MiB, rate_bps=4 * MB) for i in range(4)]
    seen: list[ProgressEvent] = []

    def stuck_consumer(event: ProgressEvent) -> None:
        seen.append(event)
        time.sleep(10)  # a full pipe, a hung terminal: the seeds' `| tee`

    options = DownloadOptions(progress_interval_s=0.01, min_piece_size=256 * 1024)
    t0 = time.monotonic()
    summary = await Downloader(options, progress=stuck_consumer).run(
        [item_for(fs, f.name, tmp_path) for f in files]
    )
    elapsed = time.monotonic() - t0

    assert summary.ok
    assert len(seen) == 1  # the consumer got one event and never came back
    assert elapsed < 3.0  # 1 MiB at 4 x 4 MB/s per file: about 0.1 s of transfer


def test_progress_channel_is_bounded_and_drops_the_oldest() -> None:
    gate = __import__("threading").Event()
    got: list[int] = []

    def consumer(event: ProgressEvent) -> None:
        gate.wait(5)
        got.append(event.done)

    channel = ProgressChannel(consumer, maxlen=3)
    for i in range(10):
        channel.publish(ProgressEvent("progress", Path("x"), i, 10, i, 10))
    time.sleep(0.05)
    gate.set()
    channel.close(timeout=2)
    assert channel.dropped >= 6
    assert got[-3:] == [7, 8, 9]  # the newest survive


# -- integrity ----------------------------------------------------------------


async def test_wrong_bytes_are_retried_then_reported_with_both_hashes_and_the_good_file_kept(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("w.bin", 1 * MiB)
    good = b"the good file that was here before"
    (tmp_path / "w.bin").write_bytes(good)
    expected = sha(b"what the manifest promised")
    item = DownloadItem(url=fs.file_url("w.bin"), dest=tmp_path / "w.bin", sha256=expected)

    summary = await download([item], FAST)

    [result] = summary.failed
    assert isinstance(result.error, HashMismatch)
    assert result.error.expected == expected
    assert result.error.actual == f.sha256
    assert expected in str(result.reason) and f.sha256 in str(result.reason)
    assert fs.server.stats().file("w.bin").bytes_sent >= 2 * f.size  # retried once, in full
    assert (tmp_path / "w.bin").read_bytes() == good
    assert not (tmp_path / "w.bin.part").exists()


async def test_corrupted_bytes_once_are_downloaded_again_and_then_verified(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("c.bin", 2 * MiB)
    fs.server.inject("c.bin", Fault("corrupt", after_bytes=1000))

    summary = await download([item_for(fs, "c.bin", tmp_path)], FAST)

    [result] = summary.succeeded
    assert result.attempts == 2
    assert (tmp_path / "c.bin").read_bytes() == f.data


async def test_a_good_file_in_place_is_not_downloaded_again(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("g.bin", 1 * MiB)
    (tmp_path / "g.bin").write_bytes(f.data)

    summary = await download([item_for(fs, "g.bin", tmp_path)], FAST)

    assert [r.status for r in summary.results] == ["present"]
    assert fs.server.stats().file("g.bin").requests == 0


async def test_a_server_without_ranges_is_read_in_one_stream(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("n.bin", 2 * MiB, ranges=False)

    summary = await download([item_for(fs, "n.bin", tmp_path)], FAST)

    assert summary.ok, summary.lines()
    assert (tmp_path / "n.bin").read_bytes() == f.data
    assert fs.server.stats().file("n.bin").range_requests == []


async def test_an_unknown_size_is_learned_from_the_server(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("u.bin", 1_234_567)
    summary = await download([DownloadItem(fs.file_url("u.bin"), tmp_path / "u.bin")], FAST)
    [result] = summary.succeeded
    assert result.size == f.size and result.sha256 == f.sha256


# -- resume ---------------------------------------------------------------------

CHILD = """
import asyncio, sys
from pathlib import Path
from comfyfleet.agent.downloads import DownloadItem, DownloadOptions, download
url, dest, digest = sys.argv[1:4]
options = DownloadOptions(checkpoint_interval_s=0.05)
summary = asyncio.run(download([DownloadItem(url, Path(dest), sha256=digest)], options))
sys.exit(0 if summary.ok else 1)
"""


async def test_resume_after_kill_9_at_half_way_sends_less_than_60_percent_again(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    size = 8 * MiB
    f = fs.server.add_file("k.bin", size, rate_bps=0.5 * MiB)  # 4 x 0.5 MiB/s: about 4 s
    dest = tmp_path / "k.bin"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, fs.file_url("k.bin"), str(dest), f.sha256
    )
    try:
        await until(lambda: fs.server.stats().file("k.bin").bytes_sent >= size // 2)
        assert child.returncode is None, "the download ended before it was killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        await asyncio.wait_for(child.wait(), 10)
    first = fs.server.stats().file("k.bin").bytes_sent
    assert first < 0.6 * size
    assert (tmp_path / "k.bin.part.state").exists()

    f.rate_bps = None
    summary = await download([DownloadItem(fs.file_url("k.bin"), dest, sha256=f.sha256)], FAST)

    [result] = summary.succeeded
    again = fs.server.stats().file("k.bin").bytes_sent - first
    assert again < 0.6 * size, f"{again} of {size} bytes sent again"
    assert result.resumed_from > 0.4 * size
    assert dest.read_bytes() == f.data


async def test_a_sidecar_for_other_content_is_not_trusted(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("s.bin", 1 * MiB)
    dest = tmp_path / "s.bin"
    (tmp_path / "s.bin.part").write_bytes(b"\0" * f.size)
    (tmp_path / "s.bin.part.state").write_text(
        '{"version": 1, "identity": "http://elsewhere/s.bin", "size": 1048576,'
        ' "etag": null, "sha256": null, "done": [[0, 1048576]]}'
    )
    summary = await download([DownloadItem(fs.file_url("s.bin"), dest)], FAST)
    assert summary.ok and summary.results[0].resumed_from == 0
    assert dest.read_bytes() == f.data


def test_intervals_merge_and_report_gaps() -> None:
    iv = _Intervals([[10, 20], [0, 5]])
    iv.add(5, 10)
    iv.add(30, 40)
    assert iv.spans() == [[0, 20], [30, 40]]
    assert iv.prefix() == 20 and iv.total() == 30
    assert list(iv.gaps(50)) == [(20, 30), (40, 50)]


# -- faults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault("drop", after_bytes=300_000),
        Fault("status", status=503, retry_after=0.01),
        Fault("status", status=500),
        Fault("status", status=429, retry_after=0),
        Fault("status", status=408),
    ],
    ids=["drop-mid-file", "503", "500", "429", "408"],
)
async def test_transient_faults_are_retried(
    fs: RunningFileServer, tmp_path: Path, fault: Fault
) -> None:
    f = fs.server.add_file("t.bin", 2 * MiB)
    fs.server.inject("t.bin", fault, count=2)

    summary = await download([item_for(fs, "t.bin", tmp_path)], FAST)

    assert summary.ok, summary.lines()
    assert (tmp_path / "t.bin").read_bytes() == f.data


async def test_a_fault_that_does_not_go_away_fails_after_the_retries(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_file("e.bin", 1 * MiB)
    fs.server.inject("e.bin", Fault("status", status=502), count=100)
    options = DownloadOptions(backoff_base_s=0.001, backoff_cap_s=0.01, retries=3)

    [result] = (await download([item_for(fs, "e.bin", tmp_path)], options)).failed

    assert isinstance(result.error, DownloadHTTPError) and result.error.status == 502
    assert "after 3 retries" in str(result.reason)
    assert fs.server.stats().file("e.bin").requests == 4


@pytest.mark.parametrize("status", [401, 403, 404, 410])
async def test_refusals_are_resolved_once_then_reported(
    fs: RunningFileServer, tmp_path: Path, status: int
) -> None:
    fs.server.add_file("r.bin", 1 * MiB)
    fs.server.inject("r.bin", Fault("status", status=status), count=100)

    [result] = (await download([item_for(fs, "r.bin", tmp_path)], FAST)).failed

    assert isinstance(result.error, DownloadHTTPError) and result.error.status == status
    assert fs.server.stats().file("r.bin").requests == 2  # first try, one re-resolve


async def test_a_403_calls_the_resolver_for_a_fresh_url(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("x.bin", 1 * MiB)
    calls: list[int] = []

    async def resolve() -> tuple[str, dict[str, str]]:
        calls.append(1)
        return fs.file_url("x.bin"), {}

    stale = f"{fs.cdn_url}/cdn/x.bin?expires=1&sig=stale"
    item = DownloadItem(stale, tmp_path / "x.bin", sha256=f.sha256, resolve=resolve)

    summary = await download([item], FAST)

    assert summary.ok, summary.lines()
    assert calls == [1]


async def test_an_expired_signed_url_is_resolved_again_mid_file(tmp_path: Path) -> None:
    clock = ManualClock()
    server = FileServer(signed_url_ttl_s=60, clock=clock)
    with RunningFileServer(server) as fs:
        f = server.add_file("hf.bin", 4 * MiB, rate_bps=4 * MiB)
        options = DownloadOptions(piece_size=256 * 1024, backoff_base_s=0.01)
        task = asyncio.ensure_future(
            download([DownloadItem(fs.resolve_url("hf.bin"), tmp_path / "hf.bin")], options)
        )
        await until(lambda: server.stats().file("hf.bin").bytes_sent >= 1 * MiB)
        clock.advance(120)  # every signature issued so far has expired
        summary = await task

    [result] = summary.succeeded
    assert result.sha256 == f.sha256  # checked against X-Linked-Etag
    stats = server.stats().file("hf.bin")
    assert stats.statuses[403] >= 1
    assert stats.by_route["resolve"] >= 2


async def test_auth_goes_to_its_own_host_only_and_is_never_logged(
    fs: RunningFileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs.server.add_file("gated.bin", 1 * MiB, token="hf_secret")
    fs.server.inject("gated.bin", Fault("status", status=503, route="cdn"))
    item = DownloadItem(
        fs.resolve_url("gated.bin") + "?token=hf_secret",
        tmp_path / "gated.bin",
        headers={"Authorization": "Bearer hf_secret"},
    )
    caplog.set_level(logging.DEBUG)

    summary = await download([item], FAST)

    assert summary.ok, summary.lines()
    seen = fs.server.stats().authorization_seen
    assert seen and {route for route, _, _ in seen} == {"resolve"}
    assert "hf_secret" not in caplog.text
    assert "hf_secret" not in repr(item)
    assert "hf_secret" not in summary.results[0].url


async def test_allow_url_is_applied_to_every_redirect(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_file("a.bin", 1000)

    def allow(url: str) -> bool:
        return url.startswith(fs.url)

    ok_item = DownloadItem(fs.server.redirect_url(fs.file_url("a.bin")), tmp_path / "a.bin")
    bad_item = DownloadItem(
        fs.server.redirect_url("http://elsewhere.invalid/a.bin"), tmp_path / "b.bin"
    )
    options = DownloadOptions(allow_url=allow)

    summary = await download([ok_item, bad_item], options)

    assert [r.status for r in summary.results] == ["downloaded", "failed"]
    err = summary.results[1].error
    assert isinstance(err, DownloadDomainNotAllowed)
    assert str(err) == "Download domain not allowed: elsewhere.invalid"


# -- time: stalls and deadlines ----------------------------------------------------


async def test_a_stall_is_detected_and_the_download_continues(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("st.bin", 2 * MiB)
    fs.server.inject("st.bin", Fault("stall", after_bytes=100_000, stall_s=60))
    options = DownloadOptions(
        stall_window_s=0.3, stall_min_bps=1 * MB, watchdog_tick_s=0.05, backoff_base_s=0.01
    )
    t0 = time.monotonic()

    summary = await download([item_for(fs, "st.bin", tmp_path)], options)

    assert summary.ok, summary.lines()
    assert summary.results[0].attempts == 2
    assert time.monotonic() - t0 < 5
    assert (tmp_path / "st.bin").read_bytes() == f.data


async def test_a_download_that_stays_stalled_fails_on_the_manual_clock(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_file("sf.bin", 1 * MiB)
    fs.server.inject("sf.bin", Fault("stall", after_bytes=1000, stall_s=60), count=1000)

    [result] = (
        await download([item_for(fs, "sf.bin", tmp_path)], DownloadOptions(), clock=ManualClock())
    ).failed

    assert "stalled: less than 256 KiB/s over 30 s" in str(result.reason)


async def test_the_deadline_ends_a_download_that_never_finishes(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_file("d.bin", 1 * MiB)
    fs.server.inject("d.bin", Fault("stall", after_bytes=1000, stall_s=60), count=10)
    clock = ManualClock()
    start = clock.now()
    options = DownloadOptions(stall_min_bps=0)  # only the 900 s deadline can end it

    [result] = (await download([item_for(fs, "d.bin", tmp_path)], options, clock=clock)).failed

    assert isinstance(result.error, DownloadTimeout)
    assert "deadline of 900 s exceeded" in str(result.reason)
    assert 900 <= clock.now() - start < 902


# -- disk ---------------------------------------------------------------------------


async def test_a_batch_that_does_not_fit_on_disk_is_refused_before_any_request(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = [fs.server.add_file(f"big{i}.bin", 1 * MiB) for i in range(3)]
    items = [item_for(fs, f.name, tmp_path, size=f.size) for f in files]

    with pytest.raises(InsufficientDiskSpace) as info:
        await Downloader(FAST, disk_free=lambda _: 1 * MiB).run(items)

    assert info.value.missing == 2 * MiB
    assert f"free {2 * MiB} more bytes" in str(info.value)
    assert fs.server.stats().bytes_sent == 0


def test_redact_url_drops_credentials_and_query() -> None:
    assert (
        redact_url("https://user:pw@civitai.com:8443/api/download/1?token=abc#x")
        == "https://civitai.com:8443/api/download/1"
    )

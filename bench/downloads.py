"""Our download engine against aria2c, on the same nginx, files and connection budget.

nginx (Debian ``nginx-light``) serves 4 generated files of 1 GiB on 127.0.0.1; aria2c
(Debian ``aria2``) fetches them with ``-j4 -x4 -s4 -k1M --file-allocation=falloc``,
and ``comfyfleet.agent.downloads`` with the same budget (4 files x 4 connections),
its time including the sha256 check and the fsyncs. Median of 3 alternating runs:

- (a) unthrottled;
- (b) nginx ``limit_rate`` of 10 MiB/s per connection (a CDN's per-connection cap):
  16 connections make a ceiling of 160 MiB/s.

Ours runs in a subprocess, timed from its own start (interpreter included), and
reports its peak RSS. Sizes and counts can be lowered for a quick run:
``BENCH_DL_FILES``, ``BENCH_DL_SIZE_MIB``, ``BENCH_DL_RATE_MIB``, ``BENCH_DL_RUNS``,
and ``BENCH_DL_DIR`` picks the folder (default: a temporary one).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
ARIA2_FLAGS = ["-j4", "-x4", "-s4", "-k1M", "--file-allocation=falloc"]
FILES = int(os.environ.get("BENCH_DL_FILES", "4"))
SIZE = int(os.environ.get("BENCH_DL_SIZE_MIB", "1024")) * MiB
RATE_MIB = int(os.environ.get("BENCH_DL_RATE_MIB", "10"))
RUNS = int(os.environ.get("BENCH_DL_RUNS", "3"))
CONNECTIONS = 4


def find_tools() -> tuple[str, str]:
    aria2 = shutil.which("aria2c")
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    missing = [n for n, p in (("aria2c (package aria2)", aria2), ("nginx", nginx)) if not p]
    if missing:
        print(
            "bench/downloads.py needs " + " and ".join(missing) + ".\n"
            "On Debian or Ubuntu: sudo apt-get update && sudo apt-get install -y aria2 nginx-light",
            file=sys.stderr,
        )
        sys.exit(2)
    assert aria2 is not None and nginx is not None
    return aria2, nginx


def make_files(src: Path) -> list[tuple[str, str]]:
    """``FILES`` random files of ``SIZE`` bytes; returns ``(name, sha256)`` pairs."""
    out = []
    block = 8 * MiB
    for i in range(FILES):
        name = f"model{i}.bin"
        h = hashlib.sha256()
        with (src / name).open("wb") as f:
            left = SIZE
            while left:
                data = os.urandom(min(block, left))
                h.update(data)
                f.write(data)
                left -= len(data)
        os.chmod(src / name, 0o644)
        out.append((name, h.hexdigest()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_nginx(nginx: str, work: Path, src: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    prefix = work / "nginx"
    prefix.mkdir()
    temp = "\n".join(
        f"  {k}_temp_path {prefix}/{k};"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}
daemon off;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
{temp}
  server {{
    listen 127.0.0.1:{port};
    location /fast/ {{ alias {src}/; }}
    location /slow/ {{ alias {src}/; limit_rate {RATE_MIB}m; }}
  }}
}}
"""
    )
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise SystemExit(f"nginx exited: see {prefix}/error.log")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("nginx did not start")


def clean(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    os.sync()  # write back the last run's pages before timing the next


def run_aria2(aria2: str, urls: list[str], out: Path) -> float:
    clean(out)
    listing = out.parent / "aria2-input.txt"
    listing.write_text("".join(f"{u}\n" for u in urls))
    t0 = time.perf_counter()
    subprocess.run(
        [
            aria2,
            *ARIA2_FLAGS,
            "-d",
            str(out),
            "-i",
            str(listing),
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--console-log-level=warn",
            "--summary-interval=0",
            "-q",
        ],
        check=True,
    )
    elapsed = time.perf_counter() - t0
    for u in urls:
        if (out / u.rsplit("/", 1)[1]).stat().st_size != SIZE:
            raise SystemExit(f"aria2c left a short file for {u}")
    return elapsed


def run_ours(
    urls: list[str], hashes: list[str], out: Path, piece_size: int | None = None
) -> tuple[float, float, int]:
    """(wall time of the process, time inside the engine, peak RSS in bytes)."""
    clean(out)
    job = json.dumps({"urls": urls, "hashes": hashes, "out": str(out), "piece_size": piece_size})
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", job], check=True, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["ok"]:
        raise SystemExit(f"our download failed: {report['failures']}")
    return elapsed, report["engine_s"], report["peak_rss"]


def worker(job_json: str) -> None:
    from comfyfleet.agent.downloads import DownloadItem, DownloadOptions, download

    job = json.loads(job_json)
    out = Path(job["out"])
    items = [
        DownloadItem(url=u, dest=out / u.rsplit("/", 1)[1], sha256=h, size=SIZE)
        for u, h in zip(job["urls"], job["hashes"], strict=True)
    ]
    options = DownloadOptions(
        max_files=FILES,
        connections_per_file=CONNECTIONS,
        max_connections=FILES * CONNECTIONS,
        piece_size=job["piece_size"],
    )
    t0 = time.perf_counter()
    summary = asyncio.run(download(items, options))
    engine_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "ok": summary.ok,
                "failures": [r.reason for r in summary.failed],
                "engine_s": engine_s,
                "peak_rss": peak,
            }
        )
    )


def main() -> None:
    aria2, nginx = find_tools()
    base = os.environ.get("BENCH_DL_DIR")
    with tempfile.TemporaryDirectory(dir=base, prefix="bench-downloads-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        src, out = work / "src", work / "out"
        src.mkdir()
        os.chmod(src, 0o755)
        print(f"generating {FILES} x {SIZE // MiB} MiB under {work} ...", flush=True)
        files = make_files(src)
        proc, url = start_nginx(nginx, work, src)
        total = FILES * SIZE
        peak_rss = 0
        ratios: dict[str, float] = {}
        try:
            for case, path in (("unthrottled", "fast"), ("throttled", "slow")):
                urls = [f"{url}/{path}/{name}" for name, _ in files]
                hashes = [h for _, h in files]
                ours: list[float] = []
                engine: list[float] = []
                theirs: list[float] = []
                split: list[float] = []
                for _ in range(RUNS):
                    theirs.append(run_aria2(aria2, urls, out))
                    wall, inner, rss = run_ours(urls, hashes, out)
                    ours.append(wall)
                    engine.append(inner)
                    if case == "unthrottled":
                        peak_rss = max(peak_rss, rss)
                    else:
                        split.append(run_ours(urls, hashes, out, SIZE // CONNECTIONS)[0])
                o, a = statistics.median(ours), statistics.median(theirs)
                ratios[case] = o / a
                print(
                    f"{case}: ours {o:.2f} s ({total / o / 1e6:.0f} MB/s; engine alone "
                    f"{statistics.median(engine):.2f} s), aria2c {a:.2f} s "
                    f"({total / a / 1e6:.0f} MB/s); runs ours {[round(x, 2) for x in ours]}, "
                    f"aria2c {[round(x, 2) for x in theirs]}",
                    flush=True,
                )
                if case == "throttled":
                    # nginx's limit_rate is per request and lets each request start with
                    # one second's worth of bytes, so many Range requests beat the
                    # per-connection cap. This run makes one request per connection,
                    # as aria2c's split does, to show the ratio without that help.
                    s = statistics.median(split)
                    print(
                        f"throttled, one request per connection: ours {s:.2f} s, "
                        f"ratio {s / a:.2f}; runs {[round(x, 2) for x in split]}"
                    )
                    ceiling = FILES * CONNECTIONS * RATE_MIB * MiB
                    share = total / o / ceiling
                    print(
                        f"bench downloads-throttled-ceiling: {share * 100:.0f}% of "
                        f"{ceiling / MiB:.0f} MiB/s (target >= 90%)"
                    )
        finally:
            proc.terminate()
            proc.wait(10)
        print(f"bench downloads-peak-rss: {peak_rss / 1e6:.0f} MB (target < 200 MB)")
        print(f"bench downloads-unthrottled: {ratios['unthrottled']:.2f} ratio (target <= 1.0)")
        print(f"bench downloads-throttled: {ratios['throttled']:.2f} ratio (target <= 1.0)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()

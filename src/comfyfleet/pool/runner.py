"""The reconcile loop: hold the database lease, take a pass every few seconds, stop cleanly.

Every ``serve`` process runs a ``ReconcilerLoop``; the lease makes one of them the
reconciler at a time, and the others wait to take over when it stops renewing
(a crash, a stall). Time comes from the reconciler's injectable clock, so a test
drives the loop with a ``ManualClock`` or a ``ScaledClock``.

``main`` is ``python -m comfyfleet.pool.reconciler``: one pass (``--once``) or the
loop (``--loop``, until SIGTERM or SIGINT), configured from the environment:
``DATABASE_URL`` (the store), ``VAST_URL`` and ``VAST_API_KEY`` (the provider),
``COMFYFLEET_CONFIG`` (the fleet file), ``COMFYFLEET_FLEET_ID``, ``COMFYFLEET_URL``
(what instances dial home to) and the options below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from comfyfleet.envvars import env_value
from comfyfleet.errors import ComfyfleetError
from comfyfleet.pool.planner import PlannerSettings
from comfyfleet.pool.reconciler import PassReport, Reconciler, ReconcilerSettings

__all__ = ["DEFAULT_CONTROL_URL", "DEFAULT_FLEET_ID", "ReconcilerLoop", "main"]

log = logging.getLogger("comfyfleet.pool")

DEFAULT_FLEET_ID: Final = "main"
DEFAULT_CONTROL_URL: Final = "http://127.0.0.1:8700/api"


class ReconcilerLoop:
    """Runs ``reconciler`` until ``stop``: a pass every ``interval_s`` while it leads.

    The lease is renewed every third of its TTL whatever the interval, so a long
    interval never lets it lapse; a follower tries to take it as often. ``wake()`` on
    the reconciler (an admin's prewarm) brings the next pass forward. A pass that
    fails is logged and the loop goes on; on stop the lease is released, so that
    another process takes over at once.
    """

    def __init__(self, reconciler: Reconciler, *, interval_s: float | None = None) -> None:
        self.reconciler = reconciler
        self.interval_s = interval_s or reconciler.settings.interval_s
        self.passes = 0
        self.failures = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Loop until ``stop`` (or ``self.stop()``) is set, then release the lease."""
        rec = self.reconciler
        clock = rec.clock
        renew_every = rec.settings.lease_ttl_s / 3
        next_pass = clock.now()
        stopping = [self._stop] + ([stop] if stop is not None else [])
        try:
            while not any(event.is_set() for event in stopping):
                now = clock.now()
                if now >= next_pass:
                    report = await self._tick()
                    next_pass = now + self.interval_s
                    if report is not None:
                        self.passes += 1
                else:
                    await self._hold()
                wait = max(0.0, min(next_pass - clock.now(), renew_every))
                if await self._sleep(wait, stopping):
                    next_pass = clock.now()  # woken: pass now
        finally:
            with contextlib.suppress(Exception):
                await rec.release_lease()

    async def _tick(self) -> PassReport | None:
        try:
            return await self.reconciler.tick()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failures += 1
            log.exception("reconcile pass failed; the next one tries again")
            return None

    async def _hold(self) -> None:
        try:
            await self.reconciler.hold_lease()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not renew the reconciler lease")

    async def _sleep(self, seconds: float, stopping: Sequence[asyncio.Event]) -> bool:
        """Sleep ``seconds`` of the clock; True when woken early by ``wake``."""
        rec = self.reconciler
        sleeper = asyncio.ensure_future(rec.clock.sleep(seconds))
        waker = asyncio.ensure_future(rec.woken())
        stoppers = [asyncio.ensure_future(event.wait()) for event in stopping]
        try:
            done, _ = await asyncio.wait(
                [sleeper, waker, *stoppers], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (sleeper, waker, *stoppers):
                task.cancel()
            await asyncio.gather(sleeper, waker, *stoppers, return_exceptions=True)
        return waker in done and sleeper not in done


# ---------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfyfleet.pool.reconciler",
        description="Reconcile the warm pools of a fleet file with the provider and the store.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="take one pass and exit")
    mode.add_argument("--loop", action="store_true", help="run until SIGTERM (the default)")
    parser.add_argument("--config", type=Path, help="the fleet file (default: COMFYFLEET_CONFIG)")
    parser.add_argument("--fleet-id", help=f"default: COMFYFLEET_FLEET_ID or {DEFAULT_FLEET_ID}")
    parser.add_argument(
        "--control-url", help=f"COMFYFLEET_URL for instances (default {DEFAULT_CONTROL_URL})"
    )
    parser.add_argument("--interval", type=float, help="seconds between passes (default 10)")
    parser.add_argument("--lease-ttl", type=float, help="seconds a lease lasts (default 30)")
    parser.add_argument(
        "--requested-grace",
        type=float,
        help="seconds a rental waits for its contract before it is abandoned (default 300)",
    )
    parser.add_argument("--adopt", action="store_true", help="adopt orphans, not destroy them")
    parser.add_argument("--holder", help="this process's name in the lease")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _env_float(name: str) -> float | None:
    value = env_value(None, name)
    return float(value) if value is not None else None


def _settings(args: argparse.Namespace) -> ReconcilerSettings:
    from comfyfleet.pool.policy import DEFAULT_POLICY_SETTINGS

    planner = PlannerSettings()
    grace = args.requested_grace or _env_float("COMFYFLEET_REQUESTED_GRACE_S")
    if grace is not None:
        planner = PlannerSettings(
            destroy_alert_seconds=planner.destroy_alert_seconds, requested_grace_seconds=grace
        )
    interval = args.interval or _env_float("COMFYFLEET_RECONCILE_INTERVAL_S")
    ttl = args.lease_ttl or _env_float("COMFYFLEET_LEASE_TTL_S")
    settings = ReconcilerSettings(
        fleet_id=args.fleet_id or env_value(None, "COMFYFLEET_FLEET_ID") or DEFAULT_FLEET_ID,
        control_url=args.control_url or env_value(None, "COMFYFLEET_URL") or DEFAULT_CONTROL_URL,
        adopt=bool(args.adopt),
        policy=DEFAULT_POLICY_SETTINGS,
        planner=planner,
    )
    if interval:
        settings = dataclasses.replace(settings, interval_s=interval)
    if ttl:
        settings = dataclasses.replace(settings, lease_ttl_s=ttl)
    return settings


async def _main(args: argparse.Namespace) -> int:
    from comfyfleet.config import find_fleet_file
    from comfyfleet.profiles import load_fleet
    from comfyfleet.providers.vast import VastClient
    from comfyfleet.store.db import Store

    settings = _settings(args)
    fleet = load_fleet(find_fleet_file(args.config))
    store = Store.open()
    try:
        async with VastClient.from_env() as vast:
            reconciler = Reconciler(store, vast, fleet.profiles, settings, holder=args.holder)
            if args.once:
                report = await reconciler.tick()
                await reconciler.release_lease()
                if report is None:
                    print("another process holds the reconciler lease: no pass taken")
                    return 3
                print(_summary(report))
                return 1 if report.errors else 0
            loop = ReconcilerLoop(reconciler)
            stop = asyncio.Event()
            running = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                running.add_signal_handler(signum, stop.set)
            log.info("reconciler %s: loop started", reconciler.holder)
            await loop.run(stop)
            log.info("reconciler %s: stopped after %d passes", reconciler.holder, loop.passes)
            return 0
    finally:
        store.close()


def _summary(report: PassReport) -> str:
    kinds: dict[str, int] = {}
    for action in report.actions:
        kinds[type(action).__name__] = kinds.get(type(action).__name__, 0) + 1
    done = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing to do"
    lines = [
        f"pass in epoch {report.epoch}: {report.listed} contracts listed, {report.rows} rows; "
        f"{done}; {report.timings.get('pass_ms', 0.0):.0f} ms"
    ]
    lines += [f"renting stopped: {b.message}" for b in report.brakes.brakes]
    lines += [f"error: {e}" for e in report.errors]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return asyncio.run(_main(args))
    except ComfyfleetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The one clock of comfyfleet, injectable so tests run fast without sleeping.

Code that needs the time or needs to wait takes a ``Clock``. Production uses
``SystemClock``; tests and the simulator use ``ManualClock`` (advanced by hand)
or a ``ScaledClock`` (real time sped up by a factor).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch, as ``time.time()``."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ScaledClock:
    """Real time multiplied by ``speed`` from the moment it was made.

    ``speed=60`` makes a minute of simulated time pass in one real second.
    """

    def __init__(self, speed: float = 1.0, start: float | None = None):
        if speed <= 0:
            raise ValueError("clock speed must be positive")
        self.speed = speed
        self._real0 = time.time()
        self._sim0 = self._real0 if start is None else start

    def now(self) -> float:
        return self._sim0 + (time.time() - self._real0) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)


class ManualClock:
    """A clock that moves only when ``advance`` is called. Thread-safe."""

    def __init__(self, start: float = 1_700_000_000.0):
        self._t = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds

    async def sleep(self, seconds: float) -> None:
        # Sleeping on a manual clock advances it: the caller "waits" instantly.
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

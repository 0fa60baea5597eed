"""Wake-ups between the routes of one control-plane process.

A submit wakes the agents waiting for a job of that profile; an agent's report wakes the
users following that job. Each waiter re-reads the store when woken: a signal says "look
again", never what changed, so a missed or spurious one costs a read, not a job. Several
replicas do not see each other's signals; their waiters also re-read on a short period.
All methods are called on the app's event loop.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Hashable, Iterable

__all__ = ["JobSignals", "job_key", "profile_key"]


def profile_key(profile: str) -> tuple[str, str]:
    """The key an agent waits on for queued jobs of ``profile``."""
    return ("profile", profile)


def job_key(job_id: str) -> tuple[str, str]:
    """The key a follower of ``job_id`` waits on (state, progress, outputs)."""
    return ("job", job_id)


class JobSignals:
    """``await wait(keys, seconds)`` until one of ``keys`` is ``notify``-ed or time runs out."""

    def __init__(self) -> None:
        self._waiters: defaultdict[Hashable, set[asyncio.Future[None]]] = defaultdict(set)

    def notify(self, *keys: Hashable) -> None:
        """Wake every waiter of any of ``keys``."""
        for key in keys:
            for future in self._waiters.pop(key, ()):
                if not future.done():
                    future.set_result(None)

    async def wait(self, keys: Iterable[Hashable], seconds: float) -> bool:
        """Wait until one of ``keys`` is notified (True) or ``seconds`` pass (False)."""
        if seconds <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = list(keys)
        for key in keys:
            self._waiters[key].add(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), seconds)
            return True
        except TimeoutError:
            return False
        finally:
            for key in keys:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiters[key]

    def waiting(self, key: Hashable) -> int:
        """How many wait on ``key`` now."""
        return len(self._waiters.get(key, ()))

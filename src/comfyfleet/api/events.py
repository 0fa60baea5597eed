"""What the agents report, kept for ``monitor``: a bounded buffer in memory, and a log file.

Every stage, progress and log event an agent sends gets a sequence number of its
instance (1, 2, ...) and goes into that instance's buffer, where
``GET /api/instances/{id}/events?after=N`` reads it. The buffer keeps the newest
``per_instance`` events, and the buffers of the ``instances`` instances that
reported last; what falls out is counted, so a reader learns how many it missed.
A reader may also ``wait`` for the next event of an instance (the long-poll of
``?wait=S``): ``append`` wakes it at once, from whatever thread or loop appends.

Each event is also appended, as it arrives, to
``<data dir>/logs/provision_<id>_<timestamp>.log`` (seed 000's ``logs/``): one file
per instance, found again after a restart of the control plane. Progress lines are
thinned to one per ``progress_every_s`` seconds of the agent's time (and the last,
when a file or the whole download completes); stages and log lines are all
written. The writes happen on a worker thread, in arrival order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from comfyfleet.store.instances import scrub

__all__ = ["EventBuffer", "ProvisionLogs", "RecordedEvent", "format_line"]

LOG_DIR_NAME: Final = "logs"


@dataclass(frozen=True)
class RecordedEvent:
    """An agent event as received, with its instance's sequence number."""

    seq: int
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, **self.data}


@dataclass(eq=False)
class _Waiter:
    """A reader waiting on its own event loop for an instance's next event."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is self.loop:
                self.event.set()
            else:
                self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # its loop has closed: nobody is waiting any more
            pass


@dataclass
class _Instance:
    events: deque[RecordedEvent]
    last_seq: int = 0
    #: Events that fell out of the buffer (the oldest ones) so far.
    evicted: int = 0


class EventBuffer:
    """Per-instance ring buffers of agent events, bounded twice (events, instances)."""

    def __init__(self, *, per_instance: int = 2000, instances: int = 512) -> None:
        self.per_instance = per_instance
        self.max_instances = instances
        self._by_instance: OrderedDict[int, _Instance] = OrderedDict()
        self._waiters: dict[int, set[_Waiter]] = {}
        self._lock = threading.Lock()

    def append(self, instance_id: int, events: list[dict[str, Any]]) -> list[RecordedEvent]:
        """Number and keep ``events``; returns them as recorded."""
        with self._lock:
            entry = self._by_instance.get(instance_id)
            if entry is None:
                entry = self._by_instance[instance_id] = _Instance(deque(maxlen=self.per_instance))
                while len(self._by_instance) > self.max_instances:
                    self._by_instance.popitem(last=False)
            else:
                self._by_instance.move_to_end(instance_id)
            recorded = []
            for data in events:
                entry.last_seq += 1
                if len(entry.events) == entry.events.maxlen:
                    entry.evicted += 1
                event = RecordedEvent(entry.last_seq, data)
                entry.events.append(event)
                recorded.append(event)
            waiters = self._waiters.pop(instance_id, set()) if recorded else set()
        for waiter in waiters:
            waiter.wake()
        return recorded

    def last_seq(self, instance_id: int) -> int:
        """The instance's newest sequence number (0: none since the control plane started)."""
        with self._lock:
            entry = self._by_instance.get(instance_id)
            return 0 if entry is None else entry.last_seq

    async def wait(self, instance_id: int, after: int, seconds: float) -> bool:
        """Wait up to ``seconds`` for an event of the instance after ``after``.

        True as soon as there is one (at once when there already is), False on timeout.
        """
        waiter = _Waiter(asyncio.get_running_loop())
        with self._lock:
            entry = self._by_instance.get(instance_id)
            if entry is not None and entry.last_seq > after:
                return True
            self._waiters.setdefault(instance_id, set()).add(waiter)
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await waiter.event.wait()
        except TimeoutError:
            pass
        finally:
            with self._lock:
                waiting = self._waiters.get(instance_id)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self._waiters[instance_id]
        return self.last_seq(instance_id) > after

    def since(
        self, instance_id: int, after: int = 0, *, limit: int = 1000
    ) -> tuple[list[RecordedEvent], int, int]:
        """The events after ``after`` (at most ``limit``, oldest first), the newest sequence
        number, and how many events after ``after`` are no longer in the buffer."""
        with self._lock:
            entry = self._by_instance.get(instance_id)
            if entry is None:
                return [], 0, 0
            kept = [e for e in entry.events if e.seq > after]
            first_kept = entry.events[0].seq if entry.events else entry.last_seq + 1
            missed = max(0, first_kept - max(after, 0) - 1)
            return kept[:limit], entry.last_seq, missed


def format_line(data: dict[str, Any]) -> str:
    """One event as a line of the provision log (without the newline)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(data.get("at") or 0.0)))
    kind = data.get("kind")
    if kind == "stage":
        reason = data.get("reason")
        return f"{stamp} STAGE {data.get('stage')}" + (f": {reason}" if reason else "")
    if kind == "progress":
        total = data.get("total")
        text = f"{stamp} PROGRESS {_mb(data.get('done'))}"
        text += f" / {_mb(total)}" if total else ""
        text += f" at {float(data.get('bytes_per_s') or 0.0) / 1e6:.1f} MB/s"
        if data.get("file"):
            file_total = data.get("file_total")
            text += f"; {data['file']} {_mb(data.get('file_done'))}"
            text += f" / {_mb(file_total)}" if file_total else ""
        return text
    level = str(data.get("level") or "info").upper()
    return f"{stamp} {level} {data.get('line', '')}"


def _mb(value: Any) -> str:
    return f"{int(value or 0) / 1e6:.1f} MB"


@dataclass
class _LogFile:
    path: Path
    last_progress_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ProvisionLogs:
    """``logs/provision_<id>_<timestamp>.log`` per instance, appended to as events arrive.

    ``now`` gives the timestamp of a new file (the control plane's clock). Lines are
    scrubbed of anything that looks like a credential before they are written.
    """

    def __init__(self, data_dir: Path, *, progress_every_s: float = 5.0) -> None:
        self.directory = data_dir / LOG_DIR_NAME
        self.progress_every_s = progress_every_s
        self._files: dict[int, _LogFile] = {}

    def path_for(self, instance_id: int, now: float) -> Path:
        """The instance's log file: the newest one there is, else a new name stamped ``now``."""
        entry = self._files.get(instance_id)
        if entry is None:
            entry = self._files[instance_id] = _LogFile(self._find_or_name(instance_id, now))
        return entry.path

    def existing_path(self, instance_id: int) -> Path | None:
        """The instance's log file if there is one on disk yet (blocking: run it on a thread)."""
        entry = self._files.get(instance_id)
        if entry is not None:
            return entry.path if entry.path.exists() else None
        found = sorted(self.directory.glob(f"provision_{instance_id}_*.log"))
        return found[-1] if found else None

    def _find_or_name(self, instance_id: int, now: float) -> Path:
        existing = sorted(self.directory.glob(f"provision_{instance_id}_*.log"))
        if existing:
            return existing[-1]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        return self.directory / f"provision_{instance_id}_{stamp}.log"

    async def write(self, instance_id: int, events: list[dict[str, Any]], now: float) -> Path:
        """Append ``events`` to the instance's file (on a worker thread); returns its path."""
        path = self.path_for(instance_id, now)
        entry = self._files[instance_id]
        lines = []
        for data in events:
            if data.get("kind") == "progress" and not self._progress_due(entry, data):
                continue
            lines.append(scrub(format_line(data)).replace("\n", " ") + "\n")
        if lines:
            async with entry.lock:  # one batch after the other, in order
                await asyncio.to_thread(_append, path, "".join(lines))
        return path

    def _progress_due(self, entry: _LogFile, data: dict[str, Any]) -> bool:
        at = float(data.get("at") or 0.0)
        file_total, total = data.get("file_total"), data.get("total")
        finished = (file_total is not None and data.get("file_done") == file_total) or (
            total is not None and data.get("done") == total
        )
        if finished or at - entry.last_progress_at >= self.progress_every_s:
            entry.last_progress_at = at
            return True
        return False


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()

"""How the agent says what it is doing: one reporter interface for stage, progress and logs.

Provisioning, ComfyUI supervision and (later) the job runner report through a
``Reporter``. The CLI renders it in the terminal; the control-plane issue sends
the same events over HTTP. Reporters must never block the caller: a slow
consumer loses progress events, never a download (the seeds' ``tee`` bug).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, get_args

Stage = Literal[
    "booting", "provisioning", "downloading", "starting_app", "warming", "ready", "failed"
]
"""The instance states the agent itself reports (``comfyfleet.lifecycle``'s names, from the
container's start to ``ready``, and ``failed``); ``tests/test_lifecycle.py`` checks them."""
STAGES: tuple[Stage, ...] = get_args(Stage)
Level = Literal["info", "warning", "error"]

ERROR_LOG_NAME = "provision_errors.log"


@dataclass(frozen=True)
class Progress:
    """Bytes done and total, overall and for the file named (``None``: the overall figure)."""

    done: int
    total: int | None
    file: str | None = None
    file_done: int = 0
    file_total: int | None = None
    bytes_per_s: float = 0.0


class Reporter(Protocol):
    """Where the agent's stage, progress and log lines go."""

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        """Enter ``stage``; ``reason`` says why (required in spirit for ``failed``)."""

    def progress(self, progress: Progress) -> None:
        """Download progress: must return at once."""

    def log(self, line: str, level: Level = "info") -> None:
        """One human-readable line."""


@dataclass
class Event:
    kind: Literal["stage", "progress", "log"]
    at: float
    stage: Stage | None = None
    reason: str | None = None
    progress: Progress | None = None
    line: str | None = None
    level: Level = "info"


class NullReporter:
    """Drops every event (the default where a caller gives no reporter)."""

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def log(self, line: str, level: Level = "info") -> None:
        pass


@dataclass
class RecordingReporter:
    """Keeps every event in memory (tests, and the summary at the end of a run)."""

    events: list[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        with self._lock:
            self.events.append(Event("stage", time.time(), stage=stage, reason=reason))

    def progress(self, progress: Progress) -> None:
        with self._lock:
            self.events.append(Event("progress", time.time(), progress=progress))

    def log(self, line: str, level: Level = "info") -> None:
        with self._lock:
            self.events.append(Event("log", time.time(), line=line, level=level))

    @property
    def stages(self) -> list[Stage]:
        return [e.stage for e in self.events if e.kind == "stage" and e.stage is not None]

    @property
    def lines(self) -> list[str]:
        return [e.line for e in self.events if e.kind == "log" and e.line is not None]


class FanOut:
    """Sends every event to several reporters; one that raises does not stop the others."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def _each(self, call: Callable[[Reporter], None]) -> None:
        for r in self.reporters:
            try:
                call(r)
            except Exception:
                continue

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        self._each(lambda r: r.stage(stage, reason))

    def progress(self, progress: Progress) -> None:
        self._each(lambda r: r.progress(progress))

    def log(self, line: str, level: Level = "info") -> None:
        self._each(lambda r: r.log(line, level))


class ErrorLog:
    """``provision_errors.log`` in the workspace: one timestamped line per failure (seed 003).

    Lines look like ``2026-11-23T14:12:30Z DOWNLOAD FAILED models/vae/x.safetensors: reason``.
    """

    def __init__(self, workspace: Path) -> None:
        self.path = workspace / ERROR_LOG_NAME
        self._lock = threading.Lock()

    def write(self, kind: str, subject: str, reason: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"{stamp} {kind} {subject}: {reason}\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()

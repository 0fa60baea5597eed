"""What every route of one app shares: the store, the settings, the clock, the pool, metrics,
the output store and the job wake-ups."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from comfyfleet.api.control import PoolControl
from comfyfleet.api.events import EventBuffer, ProvisionLogs
from comfyfleet.api.metrics import PoolMetrics
from comfyfleet.api.settings import ApiSettings
from comfyfleet.api.wheel import AgentWheel
from comfyfleet.clock import Clock
from comfyfleet.outputs import LocalOutputStore
from comfyfleet.scheduler.signals import JobSignals
from comfyfleet.store.db import Store

__all__ = ["ApiContext", "context"]


@dataclass
class ApiContext:
    store: Store
    settings: ApiSettings
    clock: Clock
    pool: PoolControl | None
    metrics: PoolMetrics
    events: EventBuffer
    logs: ProvisionLogs
    wheel: AgentWheel
    #: When this app was made: heartbeat clocks start no earlier (no death spiral).
    started_at: float
    #: Job inputs and outputs, content-addressed (``settings.outputs_root()``).
    outputs: LocalOutputStore
    #: In-process wake-ups: a submit wakes the waiting agents, a report the followers.
    signals: JobSignals


def context(request: Request) -> ApiContext:
    """The app's context (a FastAPI dependency)."""
    ctx: ApiContext = request.app.state.ctx
    return ctx

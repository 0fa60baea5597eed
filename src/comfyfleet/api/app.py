"""The control plane's FastAPI application: agent, admin, jobs, metrics and health routes.

``create_app(store, settings, clock=..., pool=...)`` builds it over a migrated store;
the caller owns the store (and closes it). ``pool`` is the warm pool's
``PoolControl`` (None: the admin actions answer 503). ``metrics`` is the
``PoolMetrics`` the pool counts its rentals in; by default the app makes its own,
found at ``app.state.metrics``. ``background`` runs beside the server for its
lifetime (``comfyfleet serve`` passes the warm pool's reconcile loops): it is started
with the app and given an event that is set when the app shuts down. The webhook
deliverer (``api/webhooks.py``) runs beside it the same way, always.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from comfyfleet import __version__
from comfyfleet.api import admin, agent, agent_jobs, jobs, webhooks
from comfyfleet.api.context import ApiContext
from comfyfleet.api.control import PoolControl
from comfyfleet.api.events import EventBuffer, ProvisionLogs
from comfyfleet.api.metrics import PoolMetrics, StoreCollector
from comfyfleet.api.settings import ApiSettings
from comfyfleet.api.wheel import AgentWheel
from comfyfleet.clock import Clock
from comfyfleet.outputs import LocalOutputStore
from comfyfleet.scheduler.signals import JobSignals
from comfyfleet.store.db import Store

__all__ = ["Background", "create_app"]

log = logging.getLogger("comfyfleet.api")

#: Work that runs as long as the app: given the event set at shutdown.
Background = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def create_app(
    store: Store,
    settings: ApiSettings,
    *,
    clock: Clock,
    pool: PoolControl | None,
    metrics: PoolMetrics | None = None,
    wheel: AgentWheel | None = None,
    background: Background | None = None,
) -> FastAPI:
    """The control plane's app; see the module. ``wheel`` replaces the agent-wheel source."""
    metrics = metrics if metrics is not None else PoolMetrics()
    started_at = clock.now()
    metrics.registry.register(
        StoreCollector(
            store,
            clock.now,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            started_at=started_at,
        )
    )
    ctx = ApiContext(
        store=store,
        settings=settings,
        clock=clock,
        pool=pool,
        metrics=metrics,
        events=EventBuffer(
            per_instance=settings.events_per_instance, instances=settings.instances_in_memory
        ),
        logs=ProvisionLogs(settings.data_dir),
        wheel=wheel
        if wheel is not None
        else AgentWheel(path=settings.agent_wheel, build_dir=settings.data_dir / "agent-wheel"),
        started_at=started_at,
        outputs=LocalOutputStore(settings.outputs_root(), max_bytes=settings.max_output_bytes),
        signals=JobSignals(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        # Webhook deliveries are rows in the store: every replica sends the due ones.
        tasks = [
            asyncio.create_task(
                webhooks.run_webhook_loop(
                    store, clock, stop, allow_loopback=settings.webhook_allow_loopback
                ),
                name="comfyfleet-webhooks",
            )
        ]
        if background is not None:
            tasks.append(asyncio.create_task(background(stop), name="comfyfleet-background"))
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                try:
                    await asyncio.wait_for(task, 30)
                except Exception:
                    log.exception("%s did not stop cleanly", task.get_name())

    app = FastAPI(
        lifespan=lifespan,
        title="comfyfleet control plane",
        version=__version__,
        summary="Agents dial home here; admins drive the warm pool; Prometheus scrapes /metrics.",
    )
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.include_router(agent.router)
    app.include_router(agent_jobs.router)
    app.include_router(admin.router)
    app.include_router(jobs.router)

    @app.get("/api/health", tags=["health"])
    async def health() -> dict[str, object]:
        return {"ok": True, "version": __version__, "store": store.dialect}

    @app.get("/metrics", tags=["metrics"], response_class=Response)
    async def prometheus_metrics() -> Response:
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)

    return app

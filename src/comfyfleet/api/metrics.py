"""Prometheus metrics of the control plane, served at ``/metrics``.

Each app has its own ``CollectorRegistry`` (two apps in one process, as in tests,
never mix their numbers). Two kinds of metric live in it:

- counted as things happen, through ``PoolMetrics``: prewarm attempts, successes
  and failures by reason (the pool calls ``prewarm_attempt`` and friends),
  heartbeats declared lost (the pool), the time from rental to ready and the
  agents' events (the API);
- read from the store at each scrape, through ``StoreCollector``: instances by
  state, the $/h burn of the live instances, and the instances whose heartbeat is
  overdue right now.

The reconciler gets the app's ``PoolMetrics`` from ``create_app(metrics=...)`` (it
builds one and hands it to both) or from ``app.state.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, or_, select

from comfyfleet.lifecycle import LIVE_STATES, InstanceState
from comfyfleet.store.db import Store
from comfyfleet.store.models import InstanceRow

__all__ = [
    "HEARTBEATING_STATES",
    "TIME_TO_READY_BUCKETS",
    "PoolMetrics",
    "StoreCollector",
]

#: Seconds from the rental's record to ``ready``: image pulls and model downloads take minutes.
TIME_TO_READY_BUCKETS: Final = (30, 60, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600, 7200)

#: States in which a registered agent sends heartbeats.
HEARTBEATING_STATES: Final = LIVE_STATES - {
    InstanceState.REQUESTED,
    InstanceState.CREATING,
    InstanceState.DESTROYING,
}


class PoolMetrics:
    """The counters and the histogram of one control plane, in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._prewarm_attempts = Counter(
            "comfyfleet_prewarm_attempts",
            "Rentals started to fill the warm pool (min_ready, replacements, admin prewarms).",
            ["profile"],
            registry=self.registry,
        )
        self._prewarm_successes = Counter(
            "comfyfleet_prewarm_successes",
            "Warm-pool rentals that reached ready.",
            ["profile"],
            registry=self.registry,
        )
        self._prewarm_failures = Counter(
            "comfyfleet_prewarm_failures",
            "Warm-pool rentals that failed before ready, by the failure policy's reason code.",
            ["profile", "reason"],
            registry=self.registry,
        )
        self._heartbeats_lost = Counter(
            "comfyfleet_heartbeats_lost",
            "Instances failed because their agent's heartbeats stopped.",
            ["profile"],
            registry=self.registry,
        )
        self._agent_events = Counter(
            "comfyfleet_agent_events",
            "Events the agents reported, by kind (stage, progress, log).",
            ["kind"],
            registry=self.registry,
        )
        self._time_to_ready = Histogram(
            "comfyfleet_time_to_ready_seconds",
            "Seconds from the rental's record (requested) to the agent's ready report.",
            ["profile"],
            buckets=TIME_TO_READY_BUCKETS,
            registry=self.registry,
        )

    def prewarm_attempt(self, profile: str) -> None:
        """A warm-pool rental was recorded (before the provider is called)."""
        self._prewarm_attempts.labels(profile=profile).inc()

    def prewarm_success(self, profile: str) -> None:
        """A warm-pool rental reached ready."""
        self._prewarm_successes.labels(profile=profile).inc()

    def prewarm_failure(self, profile: str, reason: str) -> None:
        """A warm-pool rental failed; ``reason`` is a code (``pool.policy``'s), never free text."""
        self._prewarm_failures.labels(profile=profile, reason=reason).inc()

    def heartbeat_lost(self, profile: str) -> None:
        """An instance was failed for lost heartbeats."""
        self._heartbeats_lost.labels(profile=profile).inc()

    def agent_events(self, kind: str, count: int = 1) -> None:
        self._agent_events.labels(kind=kind).inc(count)

    def time_to_ready(self, profile: str, seconds: float) -> None:
        self._time_to_ready.labels(profile=profile).observe(max(0.0, seconds))


class StoreCollector(Collector):
    """The gauges read from the store at each scrape (``generate_latest`` calls ``collect``).

    Runs two small queries; ``/metrics`` calls it on a worker thread.
    """

    def __init__(
        self,
        store: Store,
        now: Callable[[], float],
        *,
        heartbeat_interval_s: float,
        started_at: float | None = None,
    ) -> None:
        self.store = store
        self.now = now
        self.heartbeat_interval_s = heartbeat_interval_s
        #: Heartbeat clocks start no earlier than the control plane: silence from before
        #: it started is not counted (no death spiral after an outage).
        self.started_at = now() if started_at is None else started_at

    def describe(self) -> Iterator[Metric]:
        # Described without a query: registering the collector must not touch the store.
        yield GaugeMetricFamily("comfyfleet_instances", "", labels=["state"])
        yield GaugeMetricFamily("comfyfleet_burn_dollars_per_hour", "")
        yield GaugeMetricFamily("comfyfleet_instances_missing_heartbeats", "")

    def collect(self) -> Iterator[Metric]:
        now = self.now()
        # One missed beat, with half an interval of slack for the network.
        silent_since = now - 1.5 * self.heartbeat_interval_s
        counting = silent_since > self.started_at
        live = sorted(LIVE_STATES)
        with self.store.transaction() as session:
            by_state = dict(
                session.execute(
                    select(InstanceRow.state, func.count(InstanceRow.id)).group_by(
                        InstanceRow.state
                    )
                ).all()
            )
            burn = session.execute(
                select(func.coalesce(func.sum(InstanceRow.dph_total), 0.0)).where(
                    InstanceRow.state.in_(live)
                )
            ).scalar_one()
            missing = session.execute(
                select(func.count(InstanceRow.id)).where(
                    InstanceRow.state.in_(sorted(HEARTBEATING_STATES)),
                    InstanceRow.registered_at.is_not(None),
                    or_(
                        InstanceRow.last_heartbeat_at.is_(None),
                        InstanceRow.last_heartbeat_at < silent_since,
                    ),
                )
            ).scalar_one()
        instances = GaugeMetricFamily(
            "comfyfleet_instances", "Instances in the store, by lifecycle state.", labels=["state"]
        )
        for state in InstanceState:
            instances.add_metric([state.value], float(by_state.get(state, 0)))
        yield instances
        yield GaugeMetricFamily(
            "comfyfleet_burn_dollars_per_hour",
            "The $/h of every live instance (requested through destroying), at its dph_total.",
            value=float(burn or 0.0),
        )
        yield GaugeMetricFamily(
            "comfyfleet_instances_missing_heartbeats",
            "Registered instances whose agent has missed at least one heartbeat right now.",
            value=float(missing if counting else 0),
        )

"""The reconciler: the thin loop around the pure planner that keeps each warm pool in line.

One pass (``Reconciler.reconcile_once``), taken only by the holder of the database
lease ``reconciler``:

0. **Sweep the jobs**, in one transaction: jobs past their timeout fail
   (``fail_timed_out_jobs``), jobs whose lease ran out are queued again
   (``expire_leases``), and a job reserved to an instance that is gone (an OnStart
   job) fails with the reason.
   The agents re-read the queue every second: a requeued job needs no other wake-up.
1. **Read the provider's listing first, then the store.** A row is committed before
   its contract is created, so every contract of the listing has its row in the later
   read and a rental in flight is never taken for an orphan.
2. **Record what was observed**: the provider's ``actual_status`` (and since when),
   ``status_msg``, address, ports and price on each row; ``creating`` → ``booting``
   once the container runs; ``destroying`` → ``failed`` (a failure) or ``destroyed``
   once the listing no longer has the contract, the only confirmation of a destroy.
3. **Judge and plan**: ``policy.assess`` for each instance, ``policy.fleet_brakes`` for
   the fleet, ``planner.plan`` for the actions, with the queue's depth per profile
   (jobs reserved to no instance) and each OnStart instance's job state. When the
   plan wants to rent, the account's credit is read and the offers ranked
   (blocklisted machines left out), and the plan is made again with the credit brake
   and the real prices.
4. **Act**, each action recorded in the store before it is taken and in a transaction
   that checks the lease's epoch (``require_current_epoch``): a process that stalled
   past its lease and woke up cannot act on what it saw before.

A rental: the row is recorded in ``requested`` with its unique label
``cf-<fleet>-<id>``, its slot and its token; the provider is called with the label, the
instance's environment and the onstart script (``comfyfleet.agent.bootstrap``); the
contract id is recorded and the row moves to ``creating``. A create whose answer is
lost leaves the row in ``requested``: the next pass finds the label in the listing and
adopts the contract, or abandons the row once ``requested_grace_seconds`` have passed
with no such contract. A failure: ``destroying`` with the reason, the machine on the
blocklist, the destroy sent; ``failed`` when the listing confirms it; only then is the
slot free for the replacement, so no two paid instances ever hold one slot.

Jobs follow their instance: in the transaction that moves an instance to ``destroying``
(or ends it), its placed and running jobs are queued again (``requeue_jobs_of_instance``)
and a job reserved to it fails (``its OnStart instance N failed: <reason>``). A busy
instance is never destroyed by the pool: it is drained (``draining``, no new job) and
destroyed once its last job has ended or timed out; an admin's terminate is at once.

An OnStart rental (``rent_for_job``) records the instance (``requested``, no slot) and
its job (reserved to it) in one transaction; the pool destroys the instance once that
job has ended, whoever is watching, and never blocklists the machine for it.

Alerts are raised once per key while their condition holds (``alerts()``), and the
brakes that stop renting are kept with their reasons (``brakes``) for the pool view.
The admin API drives the pool through ``prewarm``, ``reprovision``, ``terminate`` and
``rent_for_job`` (``comfyfleet.api.control.PoolControl``). ``comfyfleet.pool.runner``
runs the loop; ``python -m comfyfleet.pool.reconciler --once|--loop`` runs it from the
environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeGuard, TypeVar

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from comfyfleet.agent.bootstrap import (
    DEFAULT_WORKSPACE,
    check_control_url,
    instance_env,
    onstart_script,
)
from comfyfleet.api.control import (
    OnStartJob,
    OnStartRental,
    PoolActionRefused,
    PoolControl,
    UnknownProfile,
)
from comfyfleet.clock import Clock, SystemClock
from comfyfleet.errors import (
    AuthError,
    IllegalTransition,
    InsufficientCredit,
    LeaseLost,
    OfferUnavailable,
    ProviderError,
    RateLimited,
    SlotTaken,
    StaleInstanceState,
    UnknownInstance,
)
from comfyfleet.labels import parse_label
from comfyfleet.lifecycle import LIVE_STATES, TERMINAL_STATES, InstanceState, JobState
from comfyfleet.market import RENT_CANDIDATES, rank_for
from comfyfleet.offers import RankedOffer, Ranking
from comfyfleet.pool.planner import (
    DEFAULT_PLANNER_SETTINGS,
    Abandon,
    Action,
    Adopt,
    Alert,
    Destroy,
    DestroyOrphan,
    Drain,
    ObservedInstance,
    PlannerSettings,
    ProviderContract,
    Rent,
    Replace,
    ScaleDown,
    plan,
)
from comfyfleet.pool.policy import (
    DEFAULT_POLICY_SETTINGS,
    HEARTBEAT_LOST,
    Brake,
    Brakes,
    InstanceFacts,
    PolicySettings,
    RentalRecord,
    Verdict,
    assess,
    fleet_brakes,
)
from comfyfleet.profiles import Profile
from comfyfleet.providers.base import CreateRequest, Instance, Provider
from comfyfleet.store.blocklist import DEFAULT_BLOCK_TTL_S, block_machine, blocked_machine_ids
from comfyfleet.store.db import Store
from comfyfleet.store.instances import (
    create_instance,
    get_instance,
    live_usage_by_profile,
    transition,
)
from comfyfleet.store.jobs import (
    active_jobs_of_instance,
    expire_leases,
    fail_jobs_pinned_to_ended_instances,
    fail_pinned_jobs,
    fail_timed_out_jobs,
    new_job_id,
    requeue_jobs_of_instance,
    submit_job,
    unpinned_queued_counts,
)
from comfyfleet.store.leases import (
    RECONCILER_LEASE,
    Lease,
    acquire_lease,
    release_lease,
    renew_lease,
    require_current_epoch,
)
from comfyfleet.store.models import InstanceRow, JobRow
from comfyfleet.store.tokens import issue_token

__all__ = [
    "ABANDONED",
    "ACTOR",
    "GONE_STATUS",
    "PassReport",
    "PoolMetricsLike",
    "RaisedAlert",
    "Reconciler",
    "ReconcilerSettings",
    "default_holder",
    "lease_name_for",
]

log = logging.getLogger("comfyfleet.pool")

T = TypeVar("T")
K = TypeVar("K", int, str)

#: The ``actor`` of the audit rows the reconciler writes.
ACTOR: Final = "reconciler"
#: What a row's ``actual_status`` becomes when the provider no longer lists its contract:
#: one of the failure policy's bad statuses, so a contract lost at the provider fails
#: after ``bad_status_seconds`` like any container that will not come up.
GONE_STATUS: Final = "unknown"
GONE_MESSAGE: Final = "the provider no longer lists this contract"
#: The failure code counted for a rental abandoned before any contract existed.
ABANDONED: Final = "rental_abandoned"
_EPS: Final = 1e-9
# A rental the provider refused outright (nothing was created): the row is abandoned
# at once. Anything else (no answer, a 5xx) may have created it: the row waits.
_CLIENT_ERROR: Final = range(400, 500)
_RENTALS_FOR_BRAKES: Final = 50
_S = InstanceState


def lease_name_for(provider: str) -> str:
    """The lease of the reconciler of ``provider``'s profiles: one leader per provider.

    Vast's keeps the plain name the first stores were written with."""
    return RECONCILER_LEASE if provider == "vast" else f"{RECONCILER_LEASE}:{provider}"


def default_holder() -> str:
    """A lease holder name unique to this process: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class PoolMetricsLike(Protocol):
    """Where the reconciler counts rentals (``comfyfleet.api.metrics.PoolMetrics`` is one)."""

    def prewarm_attempt(self, profile: str) -> None: ...

    def prewarm_success(self, profile: str) -> None: ...

    def prewarm_failure(self, profile: str, reason: str) -> None: ...

    def heartbeat_lost(self, profile: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ReconcilerSettings:
    """How the reconciler runs; times in seconds of its clock.

    ``fleet_id`` names the fleet (the labels' ``cf-<fleet>-`` prefix; the orphan sweep
    touches nothing else). ``control_url`` is the ``COMFYFLEET_URL`` instances dial
    home to (ending in ``/api``). ``adopt``: adopt orphans instead of destroying them.
    ``lease_ttl_s``: how long a lease lasts unrenewed (a stalled leader is replaced
    after it). ``interval_s``: the time between passes of the loop.
    ``destroy_retry_s``: how often a destroy the listing has not confirmed is sent
    again. ``provider_timeout_s``: the most one provider call may take.
    ``jobs_per_instance``: how many jobs one instance runs at once (the API's
    ``max_jobs_per_instance``), for the instances the queue's depth asks for.
    """

    fleet_id: str
    control_url: str
    provider_name: str = "vast"
    adopt: bool = False
    workspace: str = DEFAULT_WORKSPACE
    lease_ttl_s: float = 30.0
    interval_s: float = 10.0
    block_ttl_s: float = DEFAULT_BLOCK_TTL_S
    destroy_retry_s: float = 30.0
    provider_timeout_s: float = 120.0
    check_credit: bool = True
    jobs_per_instance: int = 1
    #: The lease this reconciler holds; one per provider (``lease_name_for``).
    lease_name: str = RECONCILER_LEASE
    policy: PolicySettings = DEFAULT_POLICY_SETTINGS
    planner: PlannerSettings = DEFAULT_PLANNER_SETTINGS

    def __post_init__(self) -> None:
        object.__setattr__(self, "control_url", check_control_url(self.control_url))
        for name in ("lease_ttl_s", "interval_s", "block_ttl_s", "provider_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)}")
        if self.jobs_per_instance < 1:
            raise ValueError(f"expected jobs_per_instance >= 1, got {self.jobs_per_instance}")


@dataclass(slots=True)
class RaisedAlert:
    """An alert that holds: raised at ``first_seen``, still true at ``last_seen``."""

    key: str
    message: str
    first_seen: float
    last_seen: float
    instance_id: int | None = None
    profile: str | None = None
    passes: int = 1


@dataclass(frozen=True, slots=True)
class PassReport:
    """What one pass saw and did. ``actions``: the plan it took; ``rented``: the rows it
    recorded for new rentals; ``confirmed``: the destroys the listing confirmed;
    ``errors``: actions that failed (retried by a later pass); ``timings``: ms by phase.
    ``queued``: the jobs waiting per profile (reserved to no instance);
    ``requeued_jobs`` and ``ended_jobs``: the jobs the pass queued again and ended
    (timeouts, spent attempts, OnStart jobs whose instance went)."""

    at: float
    epoch: int
    listed: int
    rows: int
    actions: tuple[Action, ...]
    rented: tuple[int, ...]
    confirmed: tuple[int, ...]
    brakes: Brakes
    errors: tuple[str, ...]
    timings: Mapping[str, float]
    queued: Mapping[str, int] = field(default_factory=dict)
    requeued_jobs: tuple[str, ...] = ()
    ended_jobs: tuple[str, ...] = ()


@dataclass(slots=True)
class _Row:
    """One row of the store as a pass sees it (a plain copy: the pass edits it freely)."""

    id: int
    profile: str
    slot: int | None
    label: str
    state: InstanceState
    state_since: float
    contract_id: int | None
    offer_id: int | None
    machine_id: int | None
    dph_total: float | None
    actual_status: str | None
    actual_status_since: float | None
    status_msg: str | None
    public_ip: str | None
    ports: dict[str, Any] | None
    ssh_host: str | None
    ssh_port: int | None
    failure_reason: str | None
    registered_at: float | None
    last_heartbeat_at: float | None
    progress: dict[str, Any] | None
    ready_at: float | None
    created_at: float
    onstart_job_id: str | None
    running_jobs: int = 0
    last_job_end: float | None = None
    onstart_job_state: JobState | None = None


_ROW_COLUMNS: Final = (
    InstanceRow.id,
    InstanceRow.profile,
    InstanceRow.slot,
    InstanceRow.label,
    InstanceRow.state,
    InstanceRow.stage_entered_at,
    InstanceRow.provider_contract_id,
    InstanceRow.offer_id,
    InstanceRow.machine_id,
    InstanceRow.dph_total,
    InstanceRow.actual_status,
    InstanceRow.actual_status_since,
    InstanceRow.status_msg,
    InstanceRow.public_ip,
    InstanceRow.ports,
    InstanceRow.ssh_host,
    InstanceRow.ssh_port,
    InstanceRow.failure_reason,
    InstanceRow.registered_at,
    InstanceRow.last_heartbeat_at,
    InstanceRow.progress,
    InstanceRow.ready_at,
    InstanceRow.created_at,
    InstanceRow.onstart_job_id,
)


@dataclass(slots=True)
class _Snapshot:
    rows: list[_Row]
    rentals: list[RentalRecord]
    blocked: set[int]
    queued: dict[str, int]


@dataclass(slots=True)
class _Listing:
    """The provider's listing, indexed."""

    instances: list[Instance]
    by_id: dict[int, Instance]
    by_label: dict[str, list[Instance]]
    contracts: list[ProviderContract]

    @classmethod
    def of(cls, instances: list[Instance]) -> _Listing:
        by_label: dict[str, list[Instance]] = {}
        contracts = []
        for inst in instances:
            if inst.label:
                by_label.setdefault(inst.label, []).append(inst)
            contracts.append(
                ProviderContract(
                    inst.id,
                    inst.label,
                    inst.dph_total or 0.0,
                    _server_type(inst),
                    inst.actual_status,
                )
            )
        return cls(instances, {i.id: i for i in instances}, by_label, contracts)

    def find(self, row: _Row) -> Instance | None:
        """The contract of ``row``: by its id, or by its label while it has none."""
        if row.contract_id is not None:
            return self.by_id.get(row.contract_id)
        found = self.by_label.get(row.label)
        return min(found, key=lambda i: i.id) if found else None


def _server_type(inst: Instance) -> str | None:
    for pair in inst.extra_env:
        if len(pair) == 2 and pair[0] == "SERVER_TYPE":
            return pair[1]
    return None


@dataclass(slots=True)
class _PassState:
    """What one pass carries between its steps."""

    now: float
    epoch: int
    listing: _Listing
    rows: dict[int, _Row]
    blocked: set[int]
    queued: dict[str, int] = field(default_factory=dict)
    rankings: dict[str, Ranking] = field(default_factory=dict)
    used_offers: set[int] = field(default_factory=set)
    rented: list[int] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    requeued_jobs: list[str] = field(default_factory=list)
    ended_jobs: list[str] = field(default_factory=list)

    def jobs_moved(self, moved: _JobMoves) -> None:
        self.requeued_jobs.extend(moved.requeued)
        self.ended_jobs.extend(moved.ended)


@dataclass(frozen=True, slots=True)
class _JobMoves:
    """The jobs one transaction queued again and ended."""

    requeued: tuple[str, ...] = ()
    ended: tuple[str, ...] = ()

    def __add__(self, other: _JobMoves) -> _JobMoves:
        return _JobMoves(self.requeued + other.requeued, self.ended + other.ended)


class Reconciler:
    """Keeps the warm pools of ``profiles`` (name → ``Profile``) in line, one pass at a time.

    ``store`` and ``provider`` are the world; ``clock`` the one time source (tests
    share a ``ManualClock`` with the simulator). ``holder`` names this process in the
    lease. ``metrics`` counts rentals; ``on_alert`` hears each alert once when raised.
    Implements ``comfyfleet.api.control.PoolControl``.
    """

    def __init__(
        self,
        store: Store,
        provider: Provider,
        profiles: Mapping[str, Profile],
        settings: ReconcilerSettings,
        *,
        clock: Clock | None = None,
        holder: str | None = None,
        metrics: PoolMetricsLike | None = None,
        on_alert: Callable[[RaisedAlert], None] | None = None,
    ) -> None:
        self.store = store
        self.provider = provider
        self.profiles = dict(profiles)
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.holder = holder or default_holder()
        self.metrics = metrics
        self.on_alert = on_alert
        # Heartbeat and status clocks start no earlier than this (no death spiral).
        self.started_at = self.clock.now()
        self.brakes = Brakes()
        self.last_report: PassReport | None = None
        self._lease: Lease | None = None
        self._alerts: dict[str, RaisedAlert] = {}
        self._orphan_destroys: dict[int, float] = {}
        self._destroys_sent: dict[int, float] = {}
        self._rental_dph: dict[str, float] = {}
        # A rental the provider refused for lack of credit: the brake it sets, and the
        # credit then (renting resumes once a check sees more).
        self._credit_refusal: Brake | None = None
        self._credit_refused_at = float("inf")
        self._credit_seen: float | None = None
        self._brakes_cleared_at = float("-inf")
        self._download_marks: dict[int, tuple[int, float]] = {}
        self._counted_ready: set[int] = set()
        self._pass_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        for name, profile in self.profiles.items():
            dropped = sorted(k for k in profile.env if not k.startswith("-"))
            if dropped:
                log.warning(
                    "profile %s: env variables %s are not given to instances (their "
                    "environment holds only the agent's five variables; the agent fetches "
                    "secrets from the control plane)",
                    name,
                    ", ".join(dropped),
                )

    # ------------------------------------------------------------------ the lease

    @property
    def lease(self) -> Lease | None:
        """The lease as last held (it may have expired since; ``is_leader`` checks)."""
        return self._lease

    @property
    def is_leader(self) -> bool:
        return self._lease is not None and self._lease.expires_at > self.clock.now()

    async def hold_lease(self) -> Lease | None:
        """Take or extend the reconciler lease; None while another process holds it."""
        now = self.clock.now()
        ttl = self.settings.lease_ttl_s

        def work(session: Session) -> Lease | None:
            return acquire_lease(session, self.settings.lease_name, self.holder, now=now, ttl=ttl)

        lease = await self.store.run(work)
        if lease is not None and (self._lease is None or self._lease.epoch != lease.epoch):
            log.info("reconciler %s leads in epoch %d", self.holder, lease.epoch)
        elif lease is None and self._lease is not None:
            log.warning("reconciler %s lost the lease", self.holder)
        self._lease = lease
        return lease

    async def release_lease(self) -> bool:
        """Give the lease up so that another process takes over at once."""
        lease, self._lease = self._lease, None
        if lease is None:
            return False

        def work(session: Session) -> bool:
            return release_lease(session, lease)

        return await self.store.run(work)

    async def _current_lease(self) -> Lease:
        """The lease, renewed when half of it is spent; ``LeaseLost`` if it is gone."""
        lease = self._lease
        if lease is None:
            raise LeaseLost(self.settings.lease_name, 0)
        now = self.clock.now()
        ttl = self.settings.lease_ttl_s
        if now < lease.expires_at - ttl / 2:
            return lease

        def work(session: Session) -> Lease | None:
            return renew_lease(session, lease, now=now, ttl=ttl)

        renewed = await self.store.run(work)
        if renewed is None:
            self._lease = None
            raise LeaseLost(self.settings.lease_name, lease.epoch)
        self._lease = renewed
        return renewed

    async def _act(self, work: Callable[[Session, float], T]) -> T:
        """``work(session, now)`` in one transaction that first checks the lease's epoch."""
        lease = await self._current_lease()
        now = self.clock.now()

        def guarded(session: Session) -> T:
            require_current_epoch(session, self.settings.lease_name, lease.epoch, now=now)
            return work(session, now)

        try:
            return await self.store.run(guarded)
        except LeaseLost:
            self._lease = None
            raise

    # ------------------------------------------------------------------ passes

    async def tick(self) -> PassReport | None:
        """Hold the lease and, while this process leads, take one pass; None otherwise."""
        async with self._pass_lock:
            if await self.hold_lease() is None:
                return None
            try:
                return await self._reconcile()
            except LeaseLost as error:
                log.warning("pass stopped: %s", error)
                return None

    async def reconcile_once(self) -> PassReport:
        """One pass; the lease must be held (``hold_lease``), else ``LeaseLost``."""
        async with self._pass_lock:
            return await self._reconcile()

    def wake(self) -> None:
        """Ask the loop (``comfyfleet.pool.runner``) for a pass now."""
        self._wake.set()

    async def woken(self) -> None:
        """Return once ``wake`` was called (and forget the call)."""
        await self._wake.wait()
        self._wake.clear()

    async def _reconcile(self) -> PassReport:
        lease = await self._current_lease()
        timings: dict[str, float] = {}
        started = time.perf_counter()

        # 0. The jobs' sweeps, first: the rows read next count the jobs they leave.
        swept, sweep_errors = await self._sweep_jobs()
        timings["jobs_ms"] = _ms(started)

        # 1. The provider's listing first, then the store (see the module's docstring).
        mark = time.perf_counter()
        listing = _Listing.of(await self._provider(self.provider.list_instances()))
        timings["listing_ms"] = _ms(mark)
        mark = time.perf_counter()
        label_ids = {
            i
            for inst in listing.instances
            if (i := parse_label(inst.label, self.settings.fleet_id)) is not None
        }
        now = self.clock.now()
        snapshot = await self.store.run(lambda s: self._read(s, label_ids, now))
        timings["store_read_ms"] = _ms(mark)
        state = _PassState(
            now=now,
            epoch=lease.epoch,
            listing=listing,
            rows={r.id: r for r in snapshot.rows},
            blocked=snapshot.blocked,
            queued=snapshot.queued,
            errors=sweep_errors,
        )
        state.jobs_moved(swept)

        # 2. What was observed.
        mark = time.perf_counter()
        await self._observe(state)
        timings["observe_ms"] = _ms(mark)

        # 3. Judge and plan.
        mark = time.perf_counter()
        observed, facts = self._judge(state)
        base = fleet_brakes(facts, now, self.settings.policy, rentals=snapshot.rentals)
        actions = self._plan(state, observed, base)
        pending = self._pending_rentals(state)
        wanted = {a.profile for a in actions if isinstance(a, Rent)} | {r.profile for r in pending}
        brakes = self._with_kept_brakes(base)
        if wanted and not base.stop_renting:
            timings["plan_ms"] = _ms(mark)
            mark = time.perf_counter()
            brakes = await self._price_and_credit(state, wanted, facts, snapshot.rentals)
            timings["offers_ms"] = _ms(mark)
            mark = time.perf_counter()
            actions = self._plan(state, observed, brakes)
        timings["plan_ms"] = timings.get("plan_ms", 0.0) + _ms(mark)
        self.brakes = brakes

        # 4. Act.
        mark = time.perf_counter()
        for action in actions:
            await self._take(action, state)
        if not brakes.stop_renting:
            for row in pending:
                await self._guarded(state, f"rent pending {row.id}", self._rent_pending(row, state))
        self._count_ready(state)
        timings["act_ms"] = _ms(mark)
        self._raise_alerts(state)
        timings["pass_ms"] = _ms(started)
        report = PassReport(
            at=now,
            epoch=lease.epoch,
            listed=len(listing.instances),
            rows=len(snapshot.rows),
            actions=tuple(actions),
            rented=tuple(state.rented),
            confirmed=tuple(state.confirmed),
            brakes=brakes,
            errors=tuple(state.errors),
            timings=timings,
            queued=dict(state.queued),
            requeued_jobs=tuple(state.requeued_jobs),
            ended_jobs=tuple(state.ended_jobs),
        )
        self.last_report = report
        return report

    async def _sweep_jobs(self) -> tuple[_JobMoves, list[str]]:
        """Queue again the jobs whose lease ran out, fail those past their timeout and
        those reserved to an instance that is gone: one transaction, under the lease.

        A failure is reported and left to the next pass; a lost lease stops the pass.
        """

        def work(session: Session, now: float) -> _JobMoves:
            # Timeouts first: a job past both its timeout and its lease has timed out,
            # and is not queued again for another attempt.
            timed_out = fail_timed_out_jobs(session, now)
            moved = _moves(expire_leases(session, now))
            stranded = fail_jobs_pinned_to_ended_instances(session, now)
            return (
                _JobMoves(ended=tuple(j.id for j in timed_out))
                + moved
                + _JobMoves(ended=tuple(j.id for j in stranded))
            )

        try:
            moved = await self._act(work)
        except LeaseLost:
            raise
        except Exception as error:  # the pool must go on even when the jobs cannot
            log.exception("the jobs' sweep failed")
            return _JobMoves(), [f"sweep the jobs: {type(error).__name__}: {error}"]
        if moved.requeued or moved.ended:
            log.info(
                "jobs' sweep: queued again %s; ended %s",
                ", ".join(moved.requeued) or "none",
                ", ".join(moved.ended) or "none",
            )
        return moved, []

    # ------------------------------------------------------------------ reading

    def _read(self, session: Session, label_ids: set[int], now: float) -> _Snapshot:
        fleet = self.settings.fleet_id
        provider = self.settings.provider_name
        query = select(*_ROW_COLUMNS).where(
            InstanceRow.fleet_id == fleet,
            InstanceRow.provider == provider,
            InstanceRow.state.in_(sorted(LIVE_STATES)),
        )
        rows = [_Row(*values) for values in session.execute(query)]
        known = {r.id for r in rows}
        # Ended rows matter only when the listing shows their label (listed after destroy).
        ended_ids = sorted(label_ids - known)
        for chunk in _chunks(ended_ids, 500):
            query = select(*_ROW_COLUMNS).where(
                InstanceRow.fleet_id == fleet,
                InstanceRow.provider == provider,
                InstanceRow.id.in_(chunk),
            )
            rows.extend(_Row(*values) for values in session.execute(query))

        by_id = {r.id: r for r in rows if r.state in LIVE_STATES}
        onstart = {r.onstart_job_id: r for r in by_id.values() if r.onstart_job_id is not None}
        for chunk_ids in _chunks(sorted(onstart), 500):
            query_jobs = select(JobRow.id, JobRow.state).where(JobRow.id.in_(chunk_ids))
            for job_id, job_state in session.execute(query_jobs):
                onstart[job_id].onstart_job_state = job_state
        if by_id:
            busy = case((JobRow.state.in_([JobState.PLACED, JobState.RUNNING]), 1), else_=0)
            for chunk in _chunks(sorted(by_id), 500):
                jobs = (
                    select(JobRow.instance_id, func.sum(busy), func.max(JobRow.finished_at))
                    .where(JobRow.instance_id.in_(chunk))
                    .group_by(JobRow.instance_id)
                )
                for instance_id, running, last_end in session.execute(jobs):
                    row = by_id[instance_id]
                    row.running_jobs = int(running or 0)
                    row.last_job_end = last_end

        rentals_query = (
            select(InstanceRow.created_at, InstanceRow.registered_at, InstanceRow.state)
            .where(
                InstanceRow.fleet_id == fleet,
                InstanceRow.provider == provider,
                InstanceRow.provider_contract_id.is_not(None),
                InstanceRow.created_at > self._brakes_cleared_at,
            )
            .order_by(InstanceRow.created_at.desc(), InstanceRow.id.desc())
            .limit(_RENTALS_FOR_BRAKES)
        )
        rentals = [
            RentalRecord(created, registered is not None, st in TERMINAL_STATES)
            for created, registered, st in session.execute(rentals_query)
        ]
        blocked = blocked_machine_ids(session, now, provider=self.settings.provider_name)
        queued = {
            name: count
            for name, count in unpinned_queued_counts(session).items()
            if name in self.profiles
        }
        return _Snapshot(rows, rentals, blocked, queued)

    # ------------------------------------------------------------------ observing

    async def _observe(self, state: _PassState) -> None:
        """Record the provider's words on each row; move ``creating`` rows whose container
        runs to ``booting``; confirm the destroys the listing no longer shows."""
        now = state.now
        updates: list[dict[str, Any]] = []
        booted: list[int] = []
        confirm: list[_Row] = []
        resend: list[int] = []
        for row in state.rows.values():
            if row.state in TERMINAL_STATES or row.state is _S.REQUESTED:
                continue
            inst = state.listing.find(row)
            if row.state is _S.DESTROYING:
                if inst is None:
                    confirm.append(row)
                else:
                    asked = self._destroys_sent.get(inst.id)
                    if asked is None or now - asked >= self.settings.destroy_retry_s:
                        resend.append(inst.id)
                continue
            if row.contract_id is None:
                continue
            changes = _observed_changes(row, inst, now)
            if changes:
                updates.append({"id": row.id, **changes})
            if row.state is _S.CREATING and row.actual_status == "running":
                booted.append(row.id)

        if updates or booted or confirm:

            def work(
                session: Session, at: float
            ) -> tuple[list[tuple[int, InstanceState]], _JobMoves]:
                if updates:
                    session.execute(update(InstanceRow), updates)
                moved: list[tuple[int, InstanceState]] = []
                jobs = _JobMoves()
                for instance_id in booted:
                    if _move(
                        session,
                        instance_id,
                        _S.BOOTING,
                        expected=_S.CREATING,
                        reason="the provider reports the container running",
                        now=at,
                    ):
                        moved.append((instance_id, _S.BOOTING))
                for row in confirm:
                    ended = _S.FAILED if row.failure_reason else _S.DESTROYED
                    reason = "the provider confirmed the destroy: the contract is no longer listed"
                    if row.failure_reason:
                        reason += f" (failed: {row.failure_reason})"
                        self._block_once(session, row, state.blocked, at)
                    if _move(session, row.id, ended, expected=_S.DESTROYING, reason=reason, now=at):
                        moved.append((row.id, ended))
                        # Freed when it entered destroying, unless someone else moved it.
                        jobs += _free_jobs(
                            session,
                            row.id,
                            row.failure_reason or "destroyed",
                            failed=bool(row.failure_reason),
                            now=at,
                        )
                return moved, jobs

            confirmed, jobs = await self._act(work)
            state.jobs_moved(jobs)
            for instance_id, new_state in confirmed:
                row = state.rows[instance_id]
                row.state = new_state
                row.state_since = now
                if new_state in TERMINAL_STATES:
                    state.confirmed.append(instance_id)
                    if row.contract_id is not None:
                        self._destroys_sent.pop(row.contract_id, None)
                    log.info("instance %d %s: destroy confirmed", instance_id, new_state)
        for contract_id in resend:
            await self._destroy(contract_id, state)
        # Orphan destroys the listing no longer shows are confirmed.
        for contract_id in list(self._orphan_destroys):
            if contract_id not in state.listing.by_id:
                del self._orphan_destroys[contract_id]
                self._destroys_sent.pop(contract_id, None)

    def _block_once(self, session: Session, row: _Row, blocked: set[int], now: float) -> None:
        """Blocklist the machine of a failed row unless it is blocked already (a failure
        the API recorded: the reconciler's own ``Replace`` blocks at once)."""
        if row.machine_id is None or row.machine_id in blocked:
            return
        block_machine(
            session,
            row.machine_id,
            provider=self.settings.provider_name,
            reason=f"instance {row.id} failed: {row.failure_reason}",
            now=now,
            ttl=self.settings.block_ttl_s,
            instance_id=row.id,
        )
        blocked.add(row.machine_id)

    # ------------------------------------------------------------------ judging and planning

    def _judge(self, state: _PassState) -> tuple[list[ObservedInstance], list[InstanceFacts]]:
        now = state.now
        policy = self.settings.policy
        observed: list[ObservedInstance] = []
        facts: list[InstanceFacts] = []
        live_ids: set[int] = set()
        for row in state.rows.values():
            verdict = Verdict()
            if row.state in LIVE_STATES:
                live_ids.add(row.id)
                fact = self._facts(row, state)
                facts.append(fact)
                verdict = assess(fact, now, policy)
            idle_since = None
            if row.state is _S.READY:
                idle_since = max(row.state_since, row.last_job_end or row.state_since)
            observed.append(
                ObservedInstance(
                    id=row.id,
                    profile=row.profile,
                    slot=row.slot,
                    state=row.state.value,
                    state_since=row.state_since,
                    dph_total=row.dph_total or 0.0,
                    contract_id=row.contract_id,
                    machine_id=row.machine_id,
                    verdict=verdict,
                    idle_since=idle_since,
                    running_jobs=row.running_jobs,
                    onstart_job=row.onstart_job_id,
                    onstart_job_state=(
                        row.onstart_job_state.value if row.onstart_job_state is not None else None
                    ),
                )
            )
        for gone in set(self._download_marks) - live_ids:
            del self._download_marks[gone]
        return observed, facts

    def _facts(self, row: _Row, state: _PassState) -> InstanceFacts:
        inst = state.listing.find(row) if row.contract_id is not None else None
        profile = self.profiles.get(row.profile)
        done, progress_at = self._download_progress(row, state.now)
        judged = row.state not in (_S.DESTROYING, *TERMINAL_STATES)
        return InstanceFacts(
            state=row.state.value,
            state_since=row.state_since,
            control_plane_started_at=self.started_at,
            actual_status=row.actual_status,
            actual_status_since=row.actual_status_since,
            status_msg=row.status_msg,
            running_since=row.actual_status_since if row.actual_status == "running" else None,
            direct_port_start=inst.direct_port_start if inst is not None else None,
            require_direct_ports=profile.require_direct_ports if profile is not None else False,
            registered_at=row.registered_at,
            last_heartbeat=row.last_heartbeat_at,
            download_bytes=done,
            download_progress_at=progress_at,
            agent_failure=row.failure_reason if judged else None,
        )

    def _download_progress(self, row: _Row, now: float) -> tuple[int, float | None]:
        """Bytes downloaded (the agent's last progress report) and when that number last
        grew: the API's ``advanced_at`` when it keeps one, else as this process saw it."""
        progress = row.progress or {}
        raw = progress.get("done")
        done = int(raw) if _is_number(raw) else 0
        advanced = progress.get("advanced_at")
        if _is_number(advanced):
            return done, float(advanced)
        mark = self._download_marks.get(row.id)
        if mark is None or done > mark[0]:
            mark = (done, now if mark is not None or done > 0 else row.state_since)
            self._download_marks[row.id] = mark
        return done, mark[1]

    def _with_kept_brakes(self, brakes: Brakes) -> Brakes:
        """``brakes`` with the credit refusal, which holds until a credit check sees more."""
        refusal = self._credit_refusal
        if refusal is None or any(b.code == refusal.code for b in brakes.brakes):
            return brakes
        return Brakes((*brakes.brakes, refusal), brakes.hold_heartbeat_failures)

    def _plan(
        self, state: _PassState, observed: list[ObservedInstance], brakes: Brakes
    ) -> list[Action]:
        return plan(
            {name: p.pool for name, p in self.profiles.items()},
            observed,
            state.now,
            fleet_id=self.settings.fleet_id,
            contracts=state.listing.contracts,
            rental_dph=self._rental_dph,
            brakes=brakes,
            adopt=self.settings.adopt,
            orphan_destroys=self._orphan_destroys,
            settings=self.settings.planner,
            queued=state.queued,
            jobs_per_instance=self.settings.jobs_per_instance,
        )

    def _pending_rentals(self, state: _PassState) -> list[_Row]:
        """``requested`` rows no rental was attempted for yet (recorded by ``prewarm``,
        possibly in another process): no offer chosen, no contract, none listed."""
        return sorted(
            (
                r
                for r in state.rows.values()
                if r.state is _S.REQUESTED
                and r.offer_id is None
                and r.contract_id is None
                and r.profile in self.profiles
                and r.label not in state.listing.by_label
            ),
            key=lambda r: r.id,
        )

    async def _price_and_credit(
        self,
        state: _PassState,
        profiles: Collection[str],
        facts: Sequence[InstanceFacts],
        rentals: Sequence[RentalRecord],
    ) -> Brakes:
        """Read the credit, then rank the offers of the profiles that rent (the planner's
        price estimates come from them): the brakes with the credit checked against what
        the cheapest next rental needs to reach ready."""
        credit: float | None = None
        if self.settings.check_credit:
            try:
                credit = (await self._provider(self.provider.current_user())).credit
            except (ProviderError, TimeoutError) as error:
                state.errors.append(f"read the account's credit: {error}")
        self._credit_seen = credit
        if credit is not None and credit > self._credit_refused_at + _EPS:
            self._credit_refusal = None  # credit was added since the refusal

        cheapest: float | None = None
        for name in sorted(profiles) if credit is None or credit > 0 else ():
            profile = self.profiles.get(name)
            if profile is None:
                continue
            try:
                ranking = await self._provider(
                    rank_for(self.provider, profile, blocked_machines=frozenset(state.blocked))
                )
            except (ProviderError, TimeoutError) as error:
                state.errors.append(f"search offers for {name}: {error}")
                continue
            state.rankings[name] = ranking
            best = ranking.best
            if best is None:
                self._rental_dph.pop(name, None)
                continue
            self._rental_dph[name] = best.offer.dph_total
            cost = best.estimate.dollars_to_ready
            cheapest = cost if cheapest is None else min(cheapest, cost)

        brakes = fleet_brakes(
            facts,
            state.now,
            self.settings.policy,
            rentals=rentals,
            credit=credit,
            next_rental_cost=cheapest or 0.0,
        )
        return self._with_kept_brakes(brakes)

    # ------------------------------------------------------------------ acting

    async def _guarded(self, state: _PassState, what: str, step: Awaitable[None]) -> None:
        """Run one action; a failure is reported and left to a later pass, a lost lease
        stops the pass."""
        try:
            await step
        except LeaseLost:
            raise
        except (ProviderError, TimeoutError, OSError) as error:
            log.warning("%s: %s", what, error)
            state.errors.append(f"{what}: {error}")
        except Exception as error:  # one bad action must not stop the others
            log.exception("%s failed", what)
            state.errors.append(f"{what}: {type(error).__name__}: {error}")

    async def _take(self, action: Action, state: _PassState) -> None:
        if isinstance(action, Alert):
            state.alerts.append(action)
        elif isinstance(action, Rent):
            await self._guarded(
                state, f"rent {action.profile}/{action.slot}", self._rent(action, state)
            )
        elif isinstance(action, Adopt):
            await self._guarded(
                state, f"adopt contract {action.contract_id}", self._adopt(action, state)
            )
        elif isinstance(action, Replace):
            reason = f"{action.reason}: {action.message}"
            await self._guarded(
                state,
                f"replace instance {action.instance_id}",
                self._destroy_row(
                    action.instance_id, action.contract_id, state, reason, failed=action
                ),
            )
        elif isinstance(action, ScaleDown):
            reason = f"idle for {action.idle_seconds:.0f} s, above min_ready: scaled down"
            await self._guarded(
                state,
                f"scale down instance {action.instance_id}",
                self._destroy_row(action.instance_id, action.contract_id, state, reason),
            )
        elif isinstance(action, Destroy):
            reason = f"{action.reason}: {action.message}"
            await self._guarded(
                state,
                f"destroy instance {action.instance_id}",
                self._destroy_row(action.instance_id, action.contract_id, state, reason),
            )
        elif isinstance(action, Drain):
            await self._guarded(
                state, f"drain instance {action.instance_id}", self._drain(action, state)
            )
        elif isinstance(action, DestroyOrphan):
            await self._guarded(
                state, f"destroy contract {action.contract_id}", self._destroy_orphan(action, state)
            )
        elif isinstance(action, Abandon):
            await self._guarded(
                state, f"abandon instance {action.instance_id}", self._abandon(action, state)
            )

    # ---- renting

    async def _rent(self, action: Rent, state: _PassState) -> None:
        profile = self.profiles[action.profile]
        if action.profile not in state.rankings:
            return  # its offer search failed: reported, tried again next pass
        candidates = self._candidates(action.profile, action.max_dph, state)
        if not candidates:
            self._no_offer(action.profile, action.max_dph, state)
            return
        first = candidates[0].offer
        reason = f"pool {action.profile}: renting slot {action.slot} to keep min_ready"
        waiting = state.queued.get(action.profile, 0)
        if waiting:
            reason = (
                f"pool {action.profile}: renting slot {action.slot} for {waiting} waiting "
                f"job(s) (min_ready {profile.pool.min_ready})"
            )

        def record(session: Session, now: float) -> tuple[int, str, str] | None:
            try:
                row = create_instance(
                    session,
                    fleet_id=self.settings.fleet_id,
                    profile=action.profile,
                    slot=action.slot,
                    provider=self.settings.provider_name,
                    now=now,
                    actor=ACTOR,
                    reason=reason,
                    offer_id=first.id,
                    machine_id=first.machine_id,
                    host_id=first.host_id,
                    gpu_name=first.gpu_name,
                    dph_total=first.dph_total,
                )
            except SlotTaken:
                return None
            return row.id, row.label, issue_token(session, row)

        recorded = await self._act(record)
        if recorded is None:
            log.info("slot %s/%d was taken meanwhile", action.profile, action.slot)
            return
        instance_id, label, token = recorded
        state.rented.append(instance_id)
        if self.metrics is not None:
            self.metrics.prewarm_attempt(action.profile)
        await self._create(instance_id, label, token, action.profile, profile, candidates, state)

    async def _rent_pending(self, row: _Row, state: _PassState) -> None:
        """Rent for a ``requested`` row recorded without an offer (``prewarm``)."""
        profile = self.profiles[row.profile]
        cap = profile.pool.max_hourly_spend
        max_dph = None
        if cap is not None:
            spent = sum(
                r.dph_total or 0.0
                for r in state.rows.values()
                if r.profile == row.profile and r.state in LIVE_STATES and r.id != row.id
            )
            max_dph = cap - spent
        if row.profile not in state.rankings:
            blocked = frozenset(state.blocked)
            state.rankings[row.profile] = await self._provider(
                rank_for(self.provider, profile, blocked_machines=blocked)
            )
        candidates = self._candidates(row.profile, max_dph, state)
        if not candidates:
            self._no_offer(row.profile, max_dph, state)
            return
        first = candidates[0].offer

        def claim(session: Session, now: float) -> str | None:
            locked = get_instance(session, row.id, lock=True)
            if locked.state is not _S.REQUESTED or locked.offer_id is not None:
                return None  # another pass took it
            _set_offer(locked, first)
            return issue_token(session, locked)

        token = await self._act(claim)
        if token is None:
            return
        row.offer_id, row.dph_total = first.id, first.dph_total
        state.rented.append(row.id)
        await self._create(row.id, row.label, token, row.profile, profile, candidates, state)

    def _candidates(
        self, profile: str, max_dph: float | None, state: _PassState
    ) -> list[RankedOffer]:
        ranking = state.rankings.get(profile)
        if ranking is None:
            return []
        out = []
        for ranked in ranking.accepted:
            offer = ranked.offer
            if offer.id in state.used_offers or offer.machine_id in state.blocked:
                continue
            if max_dph is not None and offer.dph_total > max_dph + _EPS:
                continue
            out.append(ranked)
            if len(out) == RENT_CANDIDATES:
                break
        return out

    def _no_offer(self, profile: str, max_dph: float | None, state: _PassState) -> None:
        limit = f" at most ${max_dph:.3f}/h (the spend cap)" if max_dph is not None else ""
        state.alerts.append(
            Alert(
                f"no_offer:{profile}",
                f"no offer passes profile {profile}{limit} outside the blocklist; renting "
                f"waits (run `comfyfleet offers --profile {profile} --explain`)",
                profile=profile,
            )
        )

    async def _create(
        self,
        instance_id: int,
        label: str,
        token: str,
        name: str,
        profile: Profile,
        candidates: list[RankedOffer],
        state: _PassState,
    ) -> None:
        """Call the provider for a recorded row; record the contract, or leave the row for
        the next pass to adopt (answer lost) or abandon it (refused)."""
        env = {k: v for k, v in profile.env.items() if k.startswith("-")}  # docker options
        env.update(
            instance_env(
                control_url=self.settings.control_url,
                token=token,
                instance_id=instance_id,
                profile=name,
                workspace=self.settings.workspace,
            )
        )
        request = CreateRequest(
            image=profile.image,
            disk_gb=profile.disk_gb,
            label=label,
            env=env,
            onstart=onstart_script(),
            runtype=profile.runtype,
        )
        # A process that stalled since the record must not rent: check the epoch again.
        await self._act(lambda _s, _now: None)
        refused: list[str] = []
        for ranked in candidates:
            offer = ranked.offer
            state.used_offers.add(offer.id)
            try:
                contract_id = await self._provider(self.provider.create_instance(offer.id, request))
            except OfferUnavailable as error:
                refused.append(f"offer {offer.id}: {error}")
                continue
            except InsufficientCredit as error:
                self._credit_refused(error, state)
                await self._abandon_row(
                    instance_id, f"the provider refused the rental: {error}", state
                )
                return
            except AuthError as error:
                await self._abandon_row(
                    instance_id, f"the provider refused the rental: {error}", state
                )
                raise
            except RateLimited as error:
                # A 429 refuses before doing anything, but an earlier attempt of the same
                # call may have been lost: wait for the label like any lost answer.
                self._answer_lost(instance_id, label, error, state)
                return
            except ProviderError as error:
                if error.status in _CLIENT_ERROR and error.status != 429:
                    await self._abandon_row(
                        instance_id, f"the provider refused the rental: {error}", state
                    )
                    raise
                self._answer_lost(instance_id, label, error, state)
                return
            except (TimeoutError, OSError) as error:
                self._answer_lost(instance_id, label, error, state)
                return
            await self._record_contract(instance_id, contract_id, ranked, state)
            return
        await self._abandon_row(
            instance_id,
            f"the {len(refused)} best offers were taken: " + "; ".join(refused),
            state,
        )

    def _answer_lost(
        self, instance_id: int, label: str, error: BaseException, state: _PassState
    ) -> None:
        what = str(error) or type(error).__name__
        log.warning(
            "rental of instance %d got no answer (%s): the next pass adopts %s if it shows "
            "up, or abandons the row",
            instance_id,
            what,
            label,
        )
        state.errors.append(f"create {label}: answer lost: {what}")

    def _credit_refused(self, error: ProviderError, state: _PassState) -> None:
        seen = self._credit_seen
        self._credit_refused_at = float("inf") if seen is None else seen
        self._credit_refusal = Brake(
            "credit_low",
            f"the provider refused a rental for lack of credit ({error.message})"
            + (f" with ${seen:.2f} on the account" if seen is not None else "")
            + "; add credit to rent again",
        )
        self.brakes = self._with_kept_brakes(self.brakes)
        state.errors.append(f"rent: {error}")

    async def _record_contract(
        self, instance_id: int, contract_id: int, ranked: RankedOffer, state: _PassState
    ) -> None:
        offer = ranked.offer
        reason = (
            f"contract {contract_id} on offer {offer.id} (machine {offer.machine_id}, "
            f"{offer.gpu_name}, ${offer.dph_total:.3f}/h)"
        )

        def work(session: Session, now: float) -> str:
            row = get_instance(session, instance_id, lock=True)
            if row.state in TERMINAL_STATES:
                return "orphan"  # abandoned meanwhile: the contract must go
            if row.provider_contract_id is None:
                row.provider_contract_id = contract_id
            elif row.provider_contract_id != contract_id:
                return "orphan"
            _set_offer(row, offer)
            if row.state is _S.REQUESTED:
                transition(session, row, _S.CREATING, reason=reason, actor=ACTOR, now=now)
                return "created"
            return "destroy" if row.state is _S.DESTROYING else "created"

        outcome = await self._act(work)
        if outcome == "created":
            log.info("instance %d rented: %s", instance_id, reason)
            row = state.rows.get(instance_id)
            if row is not None:
                row.contract_id = contract_id
            return
        log.warning("instance %d: contract %d is not wanted any more", instance_id, contract_id)
        await self._destroy(contract_id, state, force=True)

    # ---- adopting

    async def _adopt(self, action: Adopt, state: _PassState) -> None:
        inst = state.listing.by_id.get(action.contract_id)
        if action.new:
            await self._adopt_orphan(action, inst)
            return
        reason = (
            f"adopted contract {action.contract_id} labelled {inst.label if inst else '?'}: "
            "the create call's answer was lost"
        )

        def work(session: Session, now: float) -> bool:
            row = get_instance(session, action.instance_id, lock=True)
            if row.provider_contract_id is not None or row.state in TERMINAL_STATES:
                return False
            row.provider_contract_id = action.contract_id
            if inst is not None:
                if inst.dph_total is not None:
                    row.dph_total = inst.dph_total
                if inst.machine_id:
                    row.machine_id = inst.machine_id
            if row.state is _S.REQUESTED:
                transition(session, row, _S.CREATING, reason=reason, actor=ACTOR, now=now)
            return True

        if await self._act(work):
            log.info("instance %d: %s", action.instance_id, reason)
            row = state.rows.get(action.instance_id)
            if row is not None:
                row.contract_id = action.contract_id

    async def _adopt_orphan(self, action: Adopt, inst: Instance | None) -> None:
        """Record a row for a contract of this fleet the store does not know (``adopt``).

        The row takes the id its label names, so that label and row agree.
        """
        label = inst.label if inst is not None and inst.label else ""
        reason = f"adopted orphan contract {action.contract_id} labelled {label}"

        def work(session: Session, now: float) -> bool:
            if session.get(InstanceRow, action.instance_id) is not None:
                return False
            try:
                row = create_instance(
                    session,
                    fleet_id=self.settings.fleet_id,
                    profile=action.profile,
                    slot=action.slot,
                    provider=self.settings.provider_name,
                    now=now,
                    actor=ACTOR,
                    reason=reason,
                    machine_id=inst.machine_id if inst is not None and inst.machine_id else None,
                    host_id=inst.host_id if inst is not None and inst.host_id else None,
                    gpu_name=inst.gpu_name if inst is not None else None,
                    dph_total=action.dph_total,
                    instance_id=action.instance_id,
                    contract_id=action.contract_id,
                )
            except (SlotTaken, IntegrityError):
                return False  # its slot or its contract was taken meanwhile
            transition(session, row, _S.CREATING, reason=reason, actor=ACTOR, now=now)
            return True

        if await self._act(work):
            log.info("instance %d: %s", action.instance_id, reason)

    # ---- destroying

    async def _destroy_row(
        self,
        instance_id: int,
        contract_id: int | None,
        state: _PassState,
        reason: str,
        *,
        failed: Replace | None = None,
    ) -> None:
        """Record ``destroying`` (a failure: with its reason and the machine blocklisted),
        then send the destroy; the listing confirms it in a later pass."""
        seen = state.rows.get(instance_id)
        expected = seen.state if seen is not None else None

        def work(session: Session, now: float) -> tuple[int | None, float | None, _JobMoves] | None:
            row = get_instance(session, instance_id, lock=True)
            if row.state in (_S.DESTROYING, *TERMINAL_STATES):
                return None
            if row.provider_contract_id is None and contract_id is not None:
                row.provider_contract_id = contract_id
            try:
                transition(
                    session,
                    row,
                    _S.DESTROYING,
                    reason=reason,
                    actor=ACTOR,
                    now=now,
                    expected_from=expected,
                    failure_reason=reason if failed is not None else None,
                )
            except StaleInstanceState:
                return None  # someone moved it: judged again next pass
            if failed is not None and failed.machine_id is not None:
                block_machine(
                    session,
                    failed.machine_id,
                    provider=self.settings.provider_name,
                    reason=f"instance {instance_id} failed: {reason}",
                    now=now,
                    ttl=self.settings.block_ttl_s,
                    instance_id=instance_id,
                )
            jobs = _free_jobs(session, instance_id, reason, failed=failed is not None, now=now)
            return row.provider_contract_id, row.ready_at, jobs

        done = await self._act(work)
        if done is None:
            return
        contract, ready_at, jobs = done
        state.jobs_moved(jobs)
        if seen is not None:
            seen.state = _S.DESTROYING
            seen.contract_id = contract
        if failed is not None:
            log.warning("instance %d failed (%s): %s", instance_id, failed.reason, failed.message)
            if failed.machine_id is not None:
                state.blocked.add(failed.machine_id)
            if self.metrics is not None:
                if ready_at is None:
                    self.metrics.prewarm_failure(failed.profile, failed.reason)
                if failed.reason == HEARTBEAT_LOST:
                    self.metrics.heartbeat_lost(failed.profile)
        else:
            log.info("instance %d: %s", instance_id, reason)
        if contract is not None:
            await self._destroy(contract, state, force=True)

    async def _drain(self, action: Drain, state: _PassState) -> None:
        """``draining``: the instance takes no new job; the planner destroys it once its last
        job has ended (or timed out)."""
        seen = state.rows.get(action.instance_id)
        reason = f"{action.reason}: {action.message}"

        def work(session: Session, now: float) -> bool:
            row = get_instance(session, action.instance_id, lock=True)
            # A busy instance whose job ended meanwhile (ready) drains too: it is not wanted.
            if row.state not in (_S.BUSY, _S.READY):
                return False
            transition(session, row, _S.DRAINING, reason=reason, actor=ACTOR, now=now)
            return True

        if await self._act(work):
            log.info("instance %d draining: %s", action.instance_id, reason)
            if seen is not None:
                seen.state = _S.DRAINING

    async def _destroy_orphan(self, action: DestroyOrphan, state: _PassState) -> None:
        # No row stands for it: the record is this process's list of orphan destroys
        # (the planner stops asking while it is there) and the log line.
        log.warning(
            "destroying contract %d (%s): %s", action.contract_id, action.label, action.message
        )
        self._orphan_destroys[action.contract_id] = state.now
        await self._destroy(action.contract_id, state, force=True)

    async def _destroy(self, contract_id: int, state: _PassState, *, force: bool = False) -> None:
        """Send the destroy (idempotent at the provider); at most every ``destroy_retry_s``."""
        now = self.clock.now()
        asked = self._destroys_sent.get(contract_id)
        if not force and asked is not None and now - asked < self.settings.destroy_retry_s:
            return
        self._destroys_sent[contract_id] = now
        try:
            await self._provider(self.provider.destroy_instance(contract_id))
        except (ProviderError, TimeoutError, OSError) as error:
            log.warning("destroy contract %d: %s (sent again later)", contract_id, error)
            state.errors.append(f"destroy contract {contract_id}: {error}")

    async def _abandon(self, action: Abandon, state: _PassState) -> None:
        if await self._abandon_row(action.instance_id, action.message, state):
            row = state.rows.get(action.instance_id)
            if row is not None:
                row.state = _S.DESTROYED

    async def _abandon_row(
        self, instance_id: int, reason: str, state: _PassState | None = None
    ) -> bool:
        """``requested`` → ``destroyed``: nothing was created, the slot is free. A job
        reserved to it (OnStart) fails with the reason: nothing will run it."""

        def work(session: Session, now: float) -> tuple[str, _JobMoves] | None:
            moved = _move(
                session, instance_id, _S.DESTROYED, expected=_S.REQUESTED, reason=reason, now=now
            )
            if not moved:
                return None
            jobs = _free_jobs(session, instance_id, reason, failed=True, now=now)
            return get_instance(session, instance_id).profile, jobs

        done = await self._act(work)
        if done is None:
            return False
        profile, jobs = done
        if state is not None:
            state.jobs_moved(jobs)
        log.info("instance %d abandoned: %s", instance_id, reason)
        if self.metrics is not None:
            self.metrics.prewarm_failure(profile, ABANDONED)
        return True

    # ------------------------------------------------------------------ bookkeeping

    def _count_ready(self, state: _PassState) -> None:
        if self.metrics is None:
            return
        live: set[int] = set()
        for row in state.rows.values():
            if row.state not in (_S.READY, _S.BUSY) or row.ready_at is None:
                continue
            live.add(row.id)
            if row.id not in self._counted_ready and row.ready_at >= self.started_at:
                self.metrics.prewarm_success(row.profile)
            self._counted_ready.add(row.id)
        self._counted_ready &= live

    def _raise_alerts(self, state: _PassState) -> None:
        """De-duplicate: an alert is announced when raised, kept while it holds, and
        dropped (with a log line) when a pass no longer raises it."""
        now = state.now
        seen: set[str] = set()
        for alert in state.alerts:
            if alert.key in seen:
                continue
            seen.add(alert.key)
            known = self._alerts.get(alert.key)
            if known is not None:
                known.last_seen = now
                known.message = alert.message
                known.passes += 1
                continue
            raised = RaisedAlert(
                alert.key, alert.message, now, now, alert.instance_id, alert.profile
            )
            self._alerts[alert.key] = raised
            log.warning("alert %s: %s", alert.key, alert.message)
            if self.on_alert is not None:
                self.on_alert(raised)
        for key in list(self._alerts):
            if key not in seen:
                log.info("alert %s cleared", key)
                del self._alerts[key]

    def alerts(self) -> list[RaisedAlert]:
        """The alerts that hold, oldest first."""
        return sorted(self._alerts.values(), key=lambda a: (a.first_seen, a.key))

    def clear_brakes(self) -> None:
        """An operator's word that the cause is fixed: rentals before now no longer count
        towards the never-registered brake, and a credit refusal is forgotten."""
        self._brakes_cleared_at = self.clock.now()
        self._credit_refusal = None
        self._credit_refused_at = float("inf")

    def status(self) -> dict[str, Any]:
        """The reconciler as the pool view shows it: who leads, why renting stopped, alerts."""
        lease = self._lease
        report = self.last_report
        return {
            "holder": self.holder,
            "leader": self.is_leader,
            "epoch": lease.epoch if lease is not None else None,
            "last_pass_at": report.at if report is not None else None,
            "renting_stopped": self.brakes.stop_renting,
            "brakes": [{"code": b.code, "message": b.message} for b in self.brakes.brakes],
            "alerts": [
                {
                    "key": a.key,
                    "message": a.message,
                    "since": a.first_seen,
                    "instance_id": a.instance_id,
                    "profile": a.profile,
                }
                for a in self.alerts()
            ],
        }

    async def _provider(self, call: Awaitable[T]) -> T:
        return await asyncio.wait_for(call, self.settings.provider_timeout_s)

    # ------------------------------------------------------------------ PoolControl

    def _room(self, session: Session, profile: str) -> int:
        """How many more instances of ``profile`` the caps allow now (``PoolActionRefused``
        when none): what every row not terminal uses, and the expected price of one more."""
        policy = self.profiles[profile].pool
        estimate = self._rental_dph.get(profile)
        usage = live_usage_by_profile(session).get(profile)
        used, spend = (usage.count, usage.dph_total) if usage is not None else (0, 0.0)
        room = policy.max_instances - used
        cap = policy.max_hourly_spend
        if cap is not None:
            if spend >= cap - _EPS:
                room = 0
            elif estimate:
                room = min(room, int((cap - spend + _EPS) // estimate))
        if room <= 0:
            raise PoolActionRefused(
                f"profile {profile} is at its caps: {used} of max_instances "
                f"{policy.max_instances}"
                + (f", ${spend:.2f}/h of max_hourly_spend ${cap}/h" if cap is not None else "")
            )
        return room

    def _may_rent(self, profile: str, count: int) -> None:
        if profile not in self.profiles:
            raise UnknownProfile(profile, list(self.profiles))
        if count < 1:
            raise PoolActionRefused(f"expected a count of at least 1, got {count}")
        if self.brakes.stop_renting:
            why = "; ".join(b.message for b in self.brakes.brakes)
            raise PoolActionRefused(f"renting is stopped: {why}")

    async def prewarm(self, profile: str, count: int, *, actor: str) -> list[int]:
        """Record ``count`` more rentals of ``profile`` now (state ``requested``, beyond
        ``min_ready``), within ``max_instances`` and the spend cap; the leader rents them
        at once (``wake``). Once ready they stay until idle past the profile's TTL."""
        self._may_rent(profile, count)
        fleet = self.settings.fleet_id
        provider = self.settings.provider_name
        now = self.clock.now()

        def work(session: Session) -> list[int]:
            wanted = min(count, self._room(session, profile))
            taken = set(
                session.execute(
                    select(InstanceRow.slot).where(
                        InstanceRow.profile == profile,
                        InstanceRow.state.in_(sorted(LIVE_STATES)),
                        InstanceRow.slot.is_not(None),
                    )
                ).scalars()
            )
            ids: list[int] = []
            slot = 0
            while len(ids) < wanted:
                if slot not in taken:
                    try:
                        row = create_instance(
                            session,
                            fleet_id=fleet,
                            profile=profile,
                            slot=slot,
                            provider=provider,
                            now=now,
                            actor=actor,
                            reason=f"prewarm requested by {actor}",
                        )
                    except SlotTaken:
                        pass
                    else:
                        ids.append(row.id)
                slot += 1
            return ids

        ids = await self.store.run(work)
        if self.metrics is not None:
            for _ in ids:
                self.metrics.prewarm_attempt(profile)
        log.info("prewarm of %s by %s: recorded instances %s", profile, actor, ids)
        self.wake()
        return ids

    async def rent_for_job(self, profile: str, job: OnStartJob, *, actor: str) -> OnStartRental:
        """Record an OnStart rental: a ``requested`` row of ``profile`` in no slot, and
        ``job`` queued, reserved to it, in one transaction (no warm instance can take the
        job meanwhile). The leader rents it at once (``wake``) and destroys it once the
        job has ended. Within the caps, like ``prewarm``."""
        self._may_rent(profile, 1)
        fleet = self.settings.fleet_id
        provider = self.settings.provider_name
        now = self.clock.now()

        def work(session: Session) -> OnStartRental:
            self._room(session, profile)
            job_id = new_job_id(now)
            row = create_instance(
                session,
                fleet_id=fleet,
                profile=profile,
                slot=None,
                provider=provider,
                now=now,
                actor=actor,
                reason=f"OnStart rental for job {job_id}, requested by {actor}",
            )
            row.onstart_job_id = job_id
            # One attempt: its agent asks for it once, so a job queued again would wait
            # for nobody while the instance bills.
            submit_job(
                session,
                profile=profile,
                request=job.request,
                now=now,
                max_attempts=1,
                timeout_s=job.timeout_s,
                job_id=job_id,
                pinned_instance_id=row.id,
            )
            return OnStartRental(row.id, job_id)

        rental = await self.store.run(work)
        if self.metrics is not None:
            self.metrics.prewarm_attempt(profile)
        log.info(
            "OnStart rental of %s by %s: instance %d for job %s",
            profile,
            actor,
            rental.instance_id,
            rental.job_id,
        )
        self.wake()
        return rental

    async def reprovision(
        self, *, instance_id: int | None = None, profile: str | None = None, actor: str
    ) -> list[int]:
        """Replace one instance, or every live pool instance of ``profile``: an idle one is
        destroyed now, a busy one drained (destroyed once its jobs have ended); the pool
        rents fresh ones once the provider confirms the destroys. OnStart instances are
        left to their job (an instance id of one is refused: terminate it instead)."""
        if (instance_id is None) == (profile is None):
            raise PoolActionRefused("name exactly one of an instance id and a profile")
        if profile is not None and profile not in self.profiles:
            raise UnknownProfile(profile, list(self.profiles))
        reason = f"reprovision requested by {actor}"
        if instance_id is not None:
            going = await self._terminate(instance_id, reason, actor, drain=True)
            return [instance_id] if going else []
        fleet = self.settings.fleet_id

        def work(session: Session) -> list[int]:
            query = select(InstanceRow.id).where(
                InstanceRow.fleet_id == fleet,
                InstanceRow.profile == profile,
                InstanceRow.onstart_job_id.is_(None),
                InstanceRow.state.in_(sorted(LIVE_STATES - {_S.DESTROYING})),
            )
            return list(session.execute(query.order_by(InstanceRow.id)).scalars())

        return [
            i
            for i in await self.store.run(work)
            if await self._terminate(i, reason, actor, drain=True)
        ]

    async def terminate(self, instance_id: int, *, reason: str, actor: str) -> None:
        """Destroy ``instance_id``: ``destroying`` with ``reason`` now, busy or not (its jobs
        are queued again; an OnStart job fails), the destroy sent; the listing confirms
        it. Safe to repeat; an instance that has ended is left alone."""
        await self._terminate(instance_id, reason, actor)

    async def _terminate(
        self, instance_id: int, reason: str, actor: str, *, drain: bool = False
    ) -> bool:
        """Whether the instance is on its way out. ``drain``: one that runs a job drains
        instead (``draining``; the planner destroys it once its jobs have ended). No epoch
        check: an admin's destroy is safe from any process (its slot stays held until the
        listing confirms it)."""
        fleet = self.settings.fleet_id
        now = self.clock.now()

        def work(session: Session) -> tuple[bool, int | None]:
            row = get_instance(session, instance_id, lock=True)
            if row.fleet_id != fleet or row.provider != self.settings.provider_name:
                raise UnknownInstance(instance_id)
            if row.state in TERMINAL_STATES:
                return False, None
            if drain and row.onstart_job_id is not None:
                raise PoolActionRefused(
                    f"instance {instance_id} was rented for OnStart job {row.onstart_job_id} "
                    "and is destroyed once that job has ended; terminate it to stop it now"
                )
            if drain and row.state is _S.DRAINING:
                return True, None  # waiting for its jobs already
            if (
                drain
                and row.state in (_S.READY, _S.BUSY)
                and active_jobs_of_instance(session, instance_id)
            ):
                transition(session, row, _S.DRAINING, reason=reason, actor=actor, now=now)
                return True, None
            if row.state is not _S.DESTROYING:
                transition(session, row, _S.DESTROYING, reason=reason, actor=actor, now=now)
                _free_jobs(session, instance_id, reason, failed=False, now=now)
            return True, row.provider_contract_id

        going, contract_id = await self.store.run(work)
        if contract_id is not None:
            try:
                self._destroys_sent[contract_id] = now
                await self._provider(self.provider.destroy_instance(contract_id))
            except (ProviderError, TimeoutError, OSError) as error:
                log.warning("destroy contract %d: %s (the pool sends it again)", contract_id, error)
        if going:
            self.wake()
        return going


# ---------------------------------------------------------------- helpers


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def _chunks(items: Sequence[K], size: int) -> list[Sequence[K]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _moves(jobs: Sequence[JobRow]) -> _JobMoves:
    """Jobs whose attempt ended without a result: those queued again, and those ended."""
    return _JobMoves(
        requeued=tuple(j.id for j in jobs if j.state is JobState.QUEUED),
        ended=tuple(j.id for j in jobs if j.state is not JobState.QUEUED),
    )


def _free_jobs(
    session: Session, instance_id: int, reason: str, *, failed: bool, now: float
) -> _JobMoves:
    """The instance is going: its OnStart job fails (no other instance may run it), and its
    other placed and running jobs are queued again, in the caller's transaction."""
    what = "failed" if failed else "was destroyed"
    ended = fail_pinned_jobs(
        session, instance_id, f"its OnStart instance {instance_id} {what}: {reason}", now
    )
    requeued = requeue_jobs_of_instance(
        session, instance_id, f"its instance {instance_id} {what}: {reason}", now
    )
    return _JobMoves(ended=tuple(j.id for j in ended)) + _moves(requeued)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _set_offer(row: InstanceRow, offer: Any) -> None:
    row.offer_id = offer.id
    row.machine_id = offer.machine_id or None
    row.host_id = offer.host_id or None
    row.gpu_name = offer.gpu_name or None
    row.dph_total = offer.dph_total


def _move(
    session: Session,
    instance_id: int,
    to_state: InstanceState,
    *,
    expected: InstanceState,
    reason: str,
    now: float,
) -> bool:
    """``transition`` as a compare-and-set: False when someone moved the row first."""
    try:
        with session.begin_nested():
            transition(
                session,
                instance_id,
                to_state,
                reason=reason,
                actor=ACTOR,
                now=now,
                expected_from=expected,
            )
    except (StaleInstanceState, IllegalTransition, UnknownInstance):
        return False
    return True


def _observed_changes(row: _Row, inst: Instance | None, now: float) -> dict[str, Any]:
    """The columns of ``row`` the listing changes (applied to ``row`` too)."""
    changes: dict[str, Any] = {}
    status: str | None
    msg: str | None
    if inst is None:
        status, msg = GONE_STATUS, GONE_MESSAGE
    else:
        status, msg = inst.actual_status, inst.status_msg
    if status != row.actual_status:
        changes["actual_status"] = row.actual_status = status
        changes["actual_status_since"] = row.actual_status_since = now
    elif row.actual_status is not None and row.actual_status_since is None:
        changes["actual_status_since"] = row.actual_status_since = now
    if msg != row.status_msg:
        changes["status_msg"] = row.status_msg = msg
    if inst is None:
        return changes
    ports = dict(inst.ports) if inst.ports else None
    for column, value in (
        ("public_ip", inst.public_ipaddr),
        ("ports", ports),
        ("ssh_host", inst.ssh_host),
        ("ssh_port", inst.ssh_port),
    ):
        if value != getattr(row, column):
            changes[column] = value
            setattr(row, column, value)
    if inst.dph_total is not None and (
        row.dph_total is None or abs(inst.dph_total - row.dph_total) > _EPS
    ):
        changes["dph_total"] = row.dph_total = inst.dph_total
    if row.machine_id is None and inst.machine_id:
        changes["machine_id"] = row.machine_id = inst.machine_id
    return changes


if TYPE_CHECKING:

    def _is_pool_control(reconciler: Reconciler) -> PoolControl:
        """mypy proves here that ``Reconciler`` implements the admin API's ``PoolControl``."""
        return reconciler


if __name__ == "__main__":
    import sys

    from comfyfleet.pool.runner import main

    sys.exit(main())

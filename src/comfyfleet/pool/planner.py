"""The reconcile planner: what to rent, adopt and destroy so each pool matches its policy.

``plan(desired, observed, now, ...)`` compares each profile's pool policy with the
instances the store knows and the contracts the provider lists, and returns the
actions that close the difference. It is a pure function: the reconcile loop reads
the world, calls it, records each action in the store and then takes it.

What it guarantees, pass after pass:

* **Caps.** A profile's caps count every instance that is not terminal (from
  ``requested`` through ``destroying``) at its ``dph_total``; ``destroyed`` and
  ``failed`` rows (a failed instance is ``destroying`` until the provider confirms,
  then ``failed``) bill nothing, hold no slot and count against no cap.
  A ``Rent`` or an ``Adopt`` never takes the count past ``max_instances`` nor the
  sum past ``max_hourly_spend``; each ``Rent`` carries ``max_dph``, the most the
  offer may cost for the cap to hold whatever the market does.
* **One paid instance per slot.** Each rental is for a (profile, slot) pair, the
  lowest free slot first. A slot is free only once its instance is terminal (the
  provider confirmed the destroy), so a failed instance is replaced only after its
  destroy is confirmed. A destroy unconfirmed after 10 minutes raises an
  ``Alert`` (every pass, until it is confirmed) and keeps its slot blocked.
* **Warm pool.** Instances on their way to ``ready`` or ``ready`` count towards
  ``min_ready`` (``busy`` and ``draining`` ones do not); the planner rents to reach
  it, and destroys ``ready`` instances idle for longer than ``idle_ttl_seconds``
  down to it.
* **Queue depth.** Jobs waiting for a profile (``queued``: those reserved to no
  instance) want instances too: the pool keeps ``max(min_ready, jobs not covered by
  the spare capacity of busy instances)`` on their way to ready or ready, within the
  caps, and scales none of its idle instances down while jobs of its profile wait.
* **Busy instances finish their jobs.** Nothing the planner destroys holds a job: a
  busy instance over a cap, or of a profile that left the fleet, is ``Drain``-ed (it
  takes no new job) and destroyed once its last job has ended (``drained``).
* **OnStart instances** (rented for one job, ``onstart_job``) hold no slot, count
  towards the caps but never towards ``min_ready``, are never scaled down or cut,
  and are destroyed once their job has ended (``onstart_done``, ``onstart_failed``),
  or when ready for ``onstart_claim_seconds`` without their agent taking it
  (``onstart_unclaimed``).
* **Nothing bills without a record.** A contract labelled ``cf-<fleet id>-<instance
  id>`` that the store does not know is destroyed, or adopted with ``adopt=True``
  (within the caps; the rest are destroyed). A ``requested`` row whose label shows
  up is adopted, not destroyed; one whose label has not shown up
  ``requested_grace_seconds`` later never reached the provider and is abandoned.
  Contracts without this fleet's prefix are never touched.
* **Idempotence.** Planning again on the state the actions lead to yields no new
  action but the same ``Alert``s (they are level-triggered; the loop de-duplicates
  them by ``key``).

The loop must read the provider's listing *before* the store: a row is committed
before its contract is created, so a contract in the listing always has its row in
the later read, and a rental in flight is never mistaken for an orphan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

from comfyfleet.labels import make_label, parse_label
from comfyfleet.lifecycle import BOOT_STAGES, TERMINAL_STATES, InstanceState
from comfyfleet.pool.policy import HEARTBEAT_LOST, OK, STATES, Brakes, State, Verdict

__all__ = [
    "DEFAULT_PLANNER_SETTINGS",
    "TERMINAL",
    "Abandon",
    "Action",
    "Adopt",
    "Alert",
    "Destroy",
    "DestroyOrphan",
    "Drain",
    "ObservedInstance",
    "PlannerSettings",
    "PoolPolicyLike",
    "ProviderContract",
    "Rent",
    "Replace",
    "ScaleDown",
    "changes_state",
    "make_label",
    "parse_label",
    "plan",
]

# Float slack for comparing sums of $/h against a cap.
_EPS: Final = 1e-9
_RANK: Final = {state: i for i, state in enumerate(STATES)}
# Nothing bills for these rows: they hold no slot and count against no cap.
TERMINAL: Final = TERMINAL_STATES
# Instances that can be destroyed to get back under a cap: not busy, not on their way
# out (``requested`` and the boot stages through ``ready``).
_CUTTABLE: Final = frozenset({InstanceState.REQUESTED, *BOOT_STAGES})
# An OnStart job in one of these has ended: its instance has nothing left to do.
_JOB_ENDED: Final = frozenset({"succeeded", "failed", "cancelled"})


class PoolPolicyLike(Protocol):
    """A profile's pool policy (``comfyfleet.profiles.PoolPolicy`` is one)."""

    @property
    def min_ready(self) -> int: ...

    @property
    def max_instances(self) -> int: ...

    @property
    def max_hourly_spend(self) -> float | None: ...

    @property
    def idle_ttl_seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ObservedInstance:
    """One row of the store, as the planner needs it.

    ``id``: the instance id, the number its label ends with. ``slot``: the pool
    slot the instance holds (``None``: none). ``dph_total``: its $/h (the offer's
    price for a row not yet created). ``contract_id``: the provider's id, once
    known. ``verdict``: the failure policy's verdict
    (``comfyfleet.pool.policy.assess``); ignored for a ``requested`` row.
    ``idle_since``: when a ``ready`` instance last became idle (default: when it
    entered ``ready``). ``running_jobs``: jobs placed or running on it. Terminal rows
    (``destroyed``, ``failed``) may be included: only their labels matter.
    ``onstart_job``: the job an OnStart instance was rented for (None: a pool
    instance), and ``onstart_job_state`` that job's state (None: no such job).
    """

    id: int
    profile: str
    slot: int | None
    state: State
    state_since: float
    dph_total: float = 0.0
    contract_id: int | None = None
    machine_id: int | None = None
    verdict: Verdict = OK
    idle_since: float | None = None
    running_jobs: int = 0
    onstart_job: str | None = None
    onstart_job_state: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderContract:
    """One contract of the provider's listing. ``profile``: the profile it was rented
    for, when the provider shows it (the ``SERVER_TYPE`` of its environment)."""

    id: int
    label: str | None
    dph_total: float = 0.0
    profile: str | None = None
    actual_status: str | None = None


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    """Seconds after which the planner stops waiting."""

    # A destroy the provider has not confirmed by then raises an alert.
    destroy_alert_seconds: float = 600.0
    # A ``requested`` row whose contract has not shown up by then never reached the provider.
    requested_grace_seconds: float = 300.0
    # An OnStart instance ready this long with its job still queued: its agent will not
    # take it (the agent asks once, at ready), and the instance would bill for nothing.
    onstart_claim_seconds: float = 600.0


DEFAULT_PLANNER_SETTINGS: Final = PlannerSettings()


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Rent:
    """Rent an instance for ``profile`` in ``slot``: record a ``requested`` row, then
    create the contract, at an offer costing at most ``max_dph`` $/h (``None``: no cap)."""

    profile: str
    slot: int
    max_dph: float | None = None


@dataclass(frozen=True, slots=True)
class Adopt:
    """Take contract ``contract_id`` into the pool as instance ``instance_id``.

    ``new``: no row exists yet (an orphan, with ``adopt=True``): record one in
    ``slot``. Otherwise the row exists (a ``requested`` row whose contract showed up,
    its create call's answer lost): record the contract id on it.
    """

    instance_id: int
    contract_id: int
    profile: str
    slot: int | None
    dph_total: float
    new: bool


@dataclass(frozen=True, slots=True)
class Replace:
    """The instance failed: destroy it, blocklist ``machine_id`` and keep ``reason``.
    Its slot is rented again once the provider confirms the destroy."""

    instance_id: int
    contract_id: int | None
    profile: str
    slot: int | None
    machine_id: int | None
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ScaleDown:
    """A ``ready`` instance idle past its profile's TTL, above ``min_ready``: destroy it."""

    instance_id: int
    contract_id: int | None
    profile: str
    slot: int | None
    idle_seconds: float


@dataclass(frozen=True, slots=True)
class Destroy:
    """Destroy a healthy instance that is not wanted: ``reason`` is ``profile_removed``,
    ``drained``, ``over_max_instances``, ``over_spend_cap``, or, for an OnStart instance,
    ``onstart_done`` (its job succeeded), ``onstart_failed`` (it failed or was
    cancelled) or ``onstart_unclaimed`` (its agent never took it). None blocklists the
    machine."""

    instance_id: int
    contract_id: int | None
    profile: str
    slot: int | None
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Drain:
    """A busy instance that is not wanted (``reason``: ``over_max_instances``,
    ``over_spend_cap``, ``profile_removed``): ``draining`` now, so that it takes no new
    job; destroyed (``drained``) once its last job has ended or timed out."""

    instance_id: int
    profile: str
    slot: int | None
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class DestroyOrphan:
    """Destroy a contract of this fleet that no row accounts for; the loop keeps it in
    ``orphan_destroys`` until the provider confirms. ``reason``: ``orphan``,
    ``orphan_over_capacity``, ``duplicate_contract`` or ``listed_after_destroy``."""

    contract_id: int
    label: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Abandon:
    """A ``requested`` row whose contract never showed up: mark it ``destroyed``
    (nothing was created, nothing bills), which frees its slot."""

    instance_id: int
    profile: str
    slot: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Alert:
    """Something a person must look at. Raised every pass while it holds; ``key``
    names it for de-duplication."""

    key: str
    message: str
    instance_id: int | None = None
    profile: str | None = None


Action: TypeAlias = (
    Rent | Adopt | Replace | ScaleDown | Destroy | Drain | DestroyOrphan | Abandon | Alert
)


def changes_state(action: Action) -> bool:
    """Whether taking the action changes the world (every action but ``Alert``)."""
    return not isinstance(action, Alert)


# ---------------------------------------------------------------- planning


def plan(
    desired: Mapping[str, PoolPolicyLike],
    observed: Sequence[ObservedInstance],
    now: float,
    *,
    fleet_id: str,
    contracts: Sequence[ProviderContract] = (),
    rental_dph: Mapping[str, float] | None = None,
    brakes: Brakes | None = None,
    adopt: bool = False,
    orphan_destroys: Mapping[int, float] | None = None,
    settings: PlannerSettings = DEFAULT_PLANNER_SETTINGS,
    queued: Mapping[str, int] | None = None,
    jobs_per_instance: int = 1,
) -> list[Action]:
    """The actions that bring the pools of ``desired`` (profile name -> pool policy) in
    line with ``observed`` (the store's rows; ``destroyed`` ones may be included) and
    ``contracts`` (the provider's listing) at time ``now``.

    ``rental_dph``: the $/h a new rental of each profile is expected to cost (the
    best offer's ``dph_total``); a profile with a spend cap and no estimate rents one
    instance per pass, bounded by what is left under the cap. ``brakes``: from
    ``comfyfleet.pool.policy.fleet_brakes``; while they stop renting, no ``Rent`` is
    planned and an ``Alert`` says why. ``adopt``: adopt orphans instead of destroying
    them. ``orphan_destroys``: contract id -> when its ``DestroyOrphan`` was taken,
    for those the provider still lists. ``queued``: per profile, the jobs waiting in
    the queue that no instance is reserved for (OnStart jobs left out: their instance is
    rented for them). ``jobs_per_instance``: how many jobs one instance runs at once.

    Destroys (and drains) come first in the list, then adoptions, rents and alerts.
    """
    if jobs_per_instance < 1:
        raise ValueError(f"expected jobs_per_instance >= 1, got {jobs_per_instance}")
    planner = _Planner(
        desired=desired,
        now=now,
        fleet_id=fleet_id,
        rental_dph=rental_dph or {},
        brakes=brakes or Brakes(),
        adopt=adopt,
        orphan_destroys=orphan_destroys or {},
        settings=settings,
        queued=queued or {},
        jobs_per_instance=jobs_per_instance,
    )
    return planner.run(observed, contracts)


@dataclass(slots=True)
class _Pool:
    """One profile's running totals while its actions are decided."""

    count: int = 0  # every row not destroyed: what the caps count
    spend: float = 0.0
    slots: set[int] = field(default_factory=set)
    live_count: int = 0  # the rows that stay (not being destroyed): what a cut can lower
    live_spend: float = 0.0
    toward_ready: int = 0  # counts towards min_ready
    ready: int = 0
    # Jobs the busy instances that stay can still take (with several jobs per instance).
    spare: int = 0
    # Healthy instances a cut may destroy, with their contract id.
    cuttable: list[tuple[ObservedInstance, int]] = field(default_factory=list)
    # Busy instances a cut drains instead (their jobs run to the end).
    drainable: list[ObservedInstance] = field(default_factory=list)
    idle: list[tuple[float, ObservedInstance, int | None]] = field(default_factory=list)
    # Rows whose contract showed up in the listing: adopted unless a cut destroys them.
    claimed: list[tuple[ObservedInstance, int]] = field(default_factory=list)

    def hold(self, row: ObservedInstance) -> None:
        self.count += 1
        self.spend += row.dph_total
        if row.slot is not None:
            self.slots.add(row.slot)

    def keep(self, dph_total: float) -> None:
        self.live_count += 1
        self.live_spend += dph_total

    def next_slot(self) -> int:
        slot = 0
        while slot in self.slots:
            slot += 1
        self.slots.add(slot)
        return slot

    def over(self, policy: PoolPolicyLike) -> str | None:
        """Which cap the instances that stay exceed, if any."""
        if self.live_count > policy.max_instances:
            return "over_max_instances"
        cap = policy.max_hourly_spend
        if cap is not None and self.live_spend > cap + _EPS:
            return "over_spend_cap"
        return None

    def fits(self, policy: PoolPolicyLike, dph_total: float) -> bool:
        """Whether one more instance at ``dph_total`` stays within both caps."""
        if self.count + 1 > policy.max_instances:
            return False
        cap = policy.max_hourly_spend
        return cap is None or self.spend + dph_total <= cap + _EPS


@dataclass(slots=True)
class _Planner:
    desired: Mapping[str, PoolPolicyLike]
    now: float
    fleet_id: str
    rental_dph: Mapping[str, float]
    brakes: Brakes
    adopt: bool
    orphan_destroys: Mapping[int, float]
    settings: PlannerSettings
    queued: Mapping[str, int]
    jobs_per_instance: int
    destroys: list[Action] = field(default_factory=list)
    adopts: list[Action] = field(default_factory=list)
    rents: list[Action] = field(default_factory=list)
    alerts: list[Action] = field(default_factory=list)
    # Row id -> the contract carrying its label, for rows with no contract id yet.
    claims: dict[int, ProviderContract] = field(default_factory=dict)
    # Profile -> the orphans to adopt (with ``adopt``).
    orphans: dict[str, list[tuple[ProviderContract, int]]] = field(default_factory=dict)
    braked: bool = False

    def run(
        self, observed: Sequence[ObservedInstance], contracts: Sequence[ProviderContract]
    ) -> list[Action]:
        rows_by_id: dict[int, ObservedInstance] = {}
        known_contracts: set[int] = set()
        groups: dict[str, list[ObservedInstance]] = {}
        for row in observed:
            rows_by_id[row.id] = row
            if row.state in TERMINAL:
                continue
            if row.contract_id is not None:
                known_contracts.add(row.contract_id)
            groups.setdefault(row.profile, []).append(row)

        self.sweep(contracts, rows_by_id, known_contracts)
        for name in sorted(groups.keys() | self.desired.keys()):
            self.profile(name, groups.get(name, []))

        if self.braked:
            for brake in self.brakes.brakes:
                self.alerts.append(Alert(f"renting_stopped:{brake.code}", brake.message))
        return [*self.destroys, *self.adopts, *self.rents, *self.alerts]

    # ---- the orphan sweep

    def sweep(
        self,
        contracts: Sequence[ProviderContract],
        rows_by_id: Mapping[int, ObservedInstance],
        known_contracts: set[int],
    ) -> None:
        """This fleet's contracts that no row names by contract id: claimed by their row,
        adopted, or destroyed."""
        for contract in sorted(contracts, key=lambda c: c.id):
            if contract.id in known_contracts:
                continue
            instance_id = parse_label(contract.label, self.fleet_id)
            if instance_id is None or contract.label is None:
                continue  # not this fleet's: never touched
            label = contract.label
            asked = self.orphan_destroys.get(contract.id)
            if asked is not None:
                waited = self.now - asked
                if waited > self.settings.destroy_alert_seconds:
                    self.alerts.append(
                        Alert(
                            f"destroy_unconfirmed:contract:{contract.id}",
                            f"contract {contract.id} ({label}) is still listed {waited:.0f} s "
                            "after it was destroyed as an orphan; check it in the provider's "
                            "console",
                        )
                    )
                continue
            row = rows_by_id.get(instance_id)
            if row is None:
                if self.adopt and contract.profile is not None and contract.profile in self.desired:
                    self.orphans.setdefault(contract.profile, []).append((contract, instance_id))
                    continue
                why = (
                    f"its profile {contract.profile!r} is not in the fleet"
                    if self.adopt
                    else "the store has no record of it"
                )
                self.destroys.append(
                    DestroyOrphan(contract.id, label, "orphan", f"orphan contract: {why}")
                )
            elif row.state in TERMINAL:
                self.destroys.append(
                    DestroyOrphan(
                        contract.id,
                        label,
                        "listed_after_destroy",
                        f"instance {row.id} was recorded {row.state}, yet its contract is listed",
                    )
                )
            elif row.contract_id is None and row.state != "destroying":
                if instance_id in self.claims:
                    self.destroys.append(_duplicate(contract, label, row))
                else:
                    self.claims[instance_id] = contract
            elif row.contract_id is not None:
                self.destroys.append(_duplicate(contract, label, row))
            # A destroying row with no contract id: its destroy finds the contract by label.

    # ---- one profile

    def profile(self, name: str, rows: list[ObservedInstance]) -> None:
        policy = self.desired.get(name)
        pool = _Pool()
        rows.sort(key=lambda r: (-1 if r.slot is None else r.slot, r.id))
        for row in rows:
            self.row(name, policy, row, pool)
        if policy is None:
            return
        gone = self.cut_to_caps(policy, pool)
        gone |= self.scale_down(name, policy, pool, gone)
        for row, contract_id in pool.claimed:
            if row.id not in gone:
                self.adopts.append(
                    Adopt(row.id, contract_id, name, row.slot, row.dph_total, new=False)
                )
        self.adopt_orphans(name, policy, pool)
        self.rent(name, policy, pool)

    def row(
        self, name: str, policy: PoolPolicyLike | None, row: ObservedInstance, pool: _Pool
    ) -> None:
        state = row.state
        contract_id = row.contract_id
        claim = None
        if contract_id is None and state != "destroying":
            claim = self.claims.get(row.id)
            if claim is not None:
                contract_id = claim.id

        onstart = row.onstart_job is not None
        if state == "requested" and contract_id is None:
            waited = self.now - row.state_since
            if waited > self.settings.requested_grace_seconds:
                self.destroys.append(
                    Abandon(
                        row.id,
                        name,
                        row.slot,
                        f"no contract labelled for instance {row.id} appeared {waited:.0f} s "
                        "after it was requested: the rental never reached the provider",
                    )
                )
                return
            if onstart and _onstart_ended(row):
                # Its job ended (cancelled) before anything was rented: rent nothing.
                self.destroys.append(
                    Abandon(row.id, name, row.slot, f"{_onstart_what(row)} before it was rented")
                )
                return
            pool.hold(row)
            pool.keep(row.dph_total)
            if not onstart:
                pool.toward_ready += 1
            return

        pool.hold(row)
        if state == "destroying":
            waited = self.now - row.state_since
            if waited > self.settings.destroy_alert_seconds:
                self.alerts.append(
                    Alert(
                        f"destroy_unconfirmed:{row.id}",
                        f"the provider has not confirmed the destroy of instance {row.id} "
                        f"(contract {row.contract_id}) after {waited:.0f} s; its slot stays "
                        "blocked until it does",
                        instance_id=row.id,
                        profile=name,
                    )
                )
            return

        failure = _failure(row)
        # While the brakes hold heartbeat failures, a silent agent is kept, not replaced.
        held = (
            self.brakes.hold_heartbeat_failures
            and failure is not None
            and failure.reason == HEARTBEAT_LOST
        )
        if failure is not None and not held:
            self.destroys.append(
                Replace(
                    row.id,
                    contract_id,
                    name,
                    row.slot,
                    row.machine_id,
                    failure.reason or "failed",
                    failure.message,
                )
            )
            return

        if onstart:
            end = self.onstart_end(row, contract_id)
            if end is not None:
                self.destroys.append(end)
                return
            # Its job is still to run: it stays, counted in the caps, and is never given
            # to min_ready, the idle scale-down or a cut (its job would be lost).
            pool.keep(row.dph_total)
            if claim is not None:
                pool.claimed.append((row, claim.id))
            return

        busy = state == "busy" or (state == "draining" and row.running_jobs > 0)
        if state == "draining":
            if not busy:
                self.destroys.append(
                    _destroy(row, contract_id, "drained", "its last job finished while draining")
                )
            # On its way out: counted in the caps until destroyed, not among those that stay.
            return
        if policy is None:
            if busy:
                self.destroys.append(
                    Drain(
                        row.id,
                        name,
                        row.slot,
                        "profile_removed",
                        f"profile {name} left the fleet; it finishes its jobs first",
                    )
                )
            else:
                self.destroys.append(
                    _destroy(row, contract_id, "profile_removed", f"profile {name} left the fleet")
                )
            return

        pool.keep(row.dph_total)
        if claim is not None:
            pool.claimed.append((row, claim.id))
        if busy and failure is None:
            pool.drainable.append(row)
            pool.spare += max(0, self.jobs_per_instance - row.running_jobs)
        if failure is not None or busy:
            return  # counted in the caps, not towards min_ready
        pool.toward_ready += 1
        if state == "ready":
            pool.ready += 1
            idle_for = self.now - (row.state_since if row.idle_since is None else row.idle_since)
            if idle_for > policy.idle_ttl_seconds:
                pool.idle.append((idle_for, row, contract_id))
        if state in _CUTTABLE and contract_id is not None:
            pool.cuttable.append((row, contract_id))

    def cut_to_caps(self, policy: PoolPolicyLike, pool: _Pool) -> set[int]:
        """Destroy healthy instances while those that stay exceed a cap (the caps were
        lowered, or prices rose): the least advanced first, then the highest slot; then
        drain busy ones, the highest slot first (their jobs run to the end)."""
        cut: set[int] = set()
        if pool.over(policy) is None:
            return cut
        order = sorted(pool.cuttable, key=lambda c: (_RANK[c[0].state], -_slot(c[0]), c[0].id))
        for row, contract_id in order:
            reason = pool.over(policy)
            if reason is None:
                break
            self.destroys.append(
                _destroy(row, contract_id, reason, f"the pool is over its {_limit(policy, reason)}")
            )
            cut.add(row.id)
            pool.live_count -= 1
            pool.live_spend -= row.dph_total
            pool.toward_ready -= 1
            if row.state == "ready":
                pool.ready -= 1
        for row in sorted(pool.drainable, key=lambda r: (-_slot(r), r.id)):
            reason = pool.over(policy)
            if reason is None:
                break
            self.destroys.append(
                Drain(
                    row.id,
                    row.profile,
                    row.slot,
                    reason,
                    f"the pool is over its {_limit(policy, reason)}; it finishes its jobs first",
                )
            )
            cut.add(row.id)
            pool.live_count -= 1
            pool.live_spend -= row.dph_total
            pool.spare -= max(0, self.jobs_per_instance - row.running_jobs)
        return cut

    def onstart_end(self, row: ObservedInstance, contract_id: int | None) -> Destroy | None:
        """The destroy of an OnStart instance that has nothing left to do, if it has not."""
        if _onstart_ended(row):
            reason = "onstart_done" if row.onstart_job_state == "succeeded" else "onstart_failed"
            return _destroy(row, contract_id, reason, _onstart_what(row))
        if row.state == "ready" and row.onstart_job_state == "queued":
            waited = self.now - (row.state_since if row.idle_since is None else row.idle_since)
            if waited > self.settings.onstart_claim_seconds:
                return _destroy(
                    row,
                    contract_id,
                    "onstart_unclaimed",
                    f"ready for {waited:.0f} s and its agent has not taken its OnStart job "
                    f"{row.onstart_job}",
                )
        return None

    def wanted(self, name: str, policy: PoolPolicyLike, pool: _Pool) -> int:
        """How many instances the profile wants on their way to ready or ready: its
        ``min_ready``, or as many as the waiting jobs that its busy instances cannot
        take need, whichever is more."""
        uncovered = max(0, self.queued.get(name, 0) - max(0, pool.spare))
        per = self.jobs_per_instance
        return max(policy.min_ready, -(-uncovered // per))

    def scale_down(self, name: str, policy: PoolPolicyLike, pool: _Pool, cut: set[int]) -> set[int]:
        """Idle ``ready`` instances past the TTL, down to ``min_ready`` ready ones: the
        highest slots first. None while jobs of the profile wait: an idle instance is
        about to take one."""
        scaled: set[int] = set()
        surplus = pool.ready - policy.min_ready
        if surplus <= 0 or self.queued.get(name, 0) > 0:
            return scaled
        idle = sorted(
            (item for item in pool.idle if item[1].id not in cut),
            key=lambda item: (-_slot(item[1]), item[1].id),
        )
        for idle_for, row, contract_id in idle[:surplus]:
            self.destroys.append(
                ScaleDown(row.id, contract_id, row.profile, row.slot, round(idle_for, 3))
            )
            scaled.add(row.id)
            pool.toward_ready -= 1
            pool.ready -= 1
        return scaled

    def adopt_orphans(self, name: str, policy: PoolPolicyLike, pool: _Pool) -> None:
        for contract, instance_id in self.orphans.get(name, ()):
            label = contract.label or ""
            if not pool.fits(policy, contract.dph_total):
                self.destroys.append(
                    DestroyOrphan(
                        contract.id,
                        label,
                        "orphan_over_capacity",
                        f"orphan contract of profile {name}: adopting it would exceed the caps",
                    )
                )
                continue
            slot = pool.next_slot()
            self.adopts.append(
                Adopt(instance_id, contract.id, name, slot, contract.dph_total, new=True)
            )
            pool.count += 1
            pool.spend += contract.dph_total
            pool.keep(contract.dph_total)
            pool.toward_ready += 1

    def rent(self, name: str, policy: PoolPolicyLike, pool: _Pool) -> None:
        deficit = self.wanted(name, policy, pool) - pool.toward_ready
        if deficit <= 0:
            return
        if self.brakes.stop_renting:
            self.braked = True
            return
        estimate = self.rental_dph.get(name)
        cap = policy.max_hourly_spend
        headroom = None if cap is None else cap - pool.spend
        slots: list[int] = []
        while deficit > 0 and pool.count + 1 <= policy.max_instances:
            if cap is not None:
                if estimate is None:
                    # Price unknown: one rental, which may take what is left under the cap.
                    if slots or pool.spend >= cap - _EPS:
                        break
                elif pool.spend + estimate > cap + _EPS:
                    break
            slots.append(pool.next_slot())
            pool.count += 1
            pool.spend += estimate or 0.0
            deficit -= 1
        for i, slot in enumerate(slots):
            max_dph: float | None = None
            if headroom is not None:
                # Every rental but the last is held to the estimate; the last may take the
                # rest of the headroom: the sum stays under the cap whatever is rented.
                if i < len(slots) - 1:
                    max_dph = estimate
                else:
                    max_dph = headroom - (len(slots) - 1) * (estimate or 0.0)
            self.rents.append(Rent(name, slot, max_dph))


def _slot(row: ObservedInstance) -> int:
    return -1 if row.slot is None else row.slot


def _limit(policy: PoolPolicyLike, reason: str) -> str:
    if reason == "over_max_instances":
        return f"max_instances ({policy.max_instances})"
    return f"max_hourly_spend (${policy.max_hourly_spend}/h)"


def _onstart_ended(row: ObservedInstance) -> bool:
    """Whether the OnStart job of ``row`` has ended (or is gone from the store)."""
    return row.onstart_job is not None and (
        row.onstart_job_state is None or row.onstart_job_state in _JOB_ENDED
    )


def _onstart_what(row: ObservedInstance) -> str:
    job = f"its OnStart job {row.onstart_job}"
    if row.onstart_job_state is None:
        return f"{job} is gone from the store"
    return f"{job} {row.onstart_job_state}"


def _failure(row: ObservedInstance) -> Verdict | None:
    """The policy's verdict when it says the row failed (a ``requested`` row has nothing
    to judge yet)."""
    if row.state == "requested" or not row.verdict.failed:
        return None
    return row.verdict


def _destroy(row: ObservedInstance, contract_id: int | None, reason: str, why: str) -> Destroy:
    return Destroy(row.id, contract_id, row.profile, row.slot, reason, why)


def _duplicate(contract: ProviderContract, label: str, row: ObservedInstance) -> DestroyOrphan:
    return DestroyOrphan(
        contract.id,
        label,
        "duplicate_contract",
        f"a second contract for instance {row.id}, which already has one",
    )

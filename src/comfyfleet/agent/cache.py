"""The agent's bounded cache of dynamic dependencies: what to evict, decided before a download.

Decisions are pure functions over plain data, so they are tested without a disk or a
server: ``plan_space`` says which entries to evict (least recently used first, in
batches) so that a new item of N bytes fits both bounds of the ``DynamicPolicy``,

- the cap: dynamic bytes installed + dynamic bytes reserved by downloads in flight + N
  <= ``max_dynamic_bytes``;
- the floor: free disk - bytes downloads in flight still have to write - N
  >= ``min_free_bytes``;

or refuses with a reason that names the bytes needed, the bytes that could be freed and
the pins that hold the rest. Space is reserved *before* a download starts, so the cap is
never overshot (the seed's agent evicted after the fact, and overshot). Static entries
and entries pinned by a job are never victims.

``DependencyCache`` keeps that state for the agent's loop (which deletes the files and
downloads); it does no I/O either. Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from comfyfleet.envvars import env_value
from comfyfleet.errors import ConfigError
from comfyfleet.sizes import format_size, parse_size

__all__ = [
    "DEFAULT_EVICTION_BATCH_MAX",
    "DEFAULT_PIN_TTL_SECONDS",
    "CacheEntry",
    "DependencyCache",
    "DynamicPolicy",
    "Pin",
    "RefusalCause",
    "Reservation",
    "SpacePlan",
    "SpaceRefusal",
    "plan_space",
    "policy_from_env",
]

DEFAULT_EVICTION_BATCH_MAX: Final = 20  # the seed's default
DEFAULT_PIN_TTL_SECONDS: Final = 1800.0  # the seed's default

# A refusal lists this many pinned dependencies, then says how many more there are.
_PINS_SHOWN: Final = 5

_TRUE: Final = frozenset({"1", "true", "yes", "y", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "n", "off"})
_NO_CAP: Final = frozenset({"none", "unlimited"})

RefusalCause = Literal["too_large", "eviction_disabled", "no_room"]


@dataclass(frozen=True, slots=True)
class DynamicPolicy:
    """How a server type's dynamic dependencies share the disk (the profile's ``dynamic``).

    ``max_dynamic_bytes`` ``None`` means no cap (only ``min_free_bytes`` bounds the
    cache). With ``enabled`` false nothing is ever evicted: a download that does not fit
    the bounds is refused. ``eviction_batch_max`` caps how many files go at once;
    ``pin_ttl_seconds`` is how long a job's pin holds when nobody removes it.
    """

    enabled: bool = False
    min_free_bytes: int = 0
    max_dynamic_bytes: int | None = None
    eviction_batch_max: int = DEFAULT_EVICTION_BATCH_MAX
    pin_ttl_seconds: float = DEFAULT_PIN_TTL_SECONDS

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes cannot be negative, got {self.min_free_bytes}")
        if self.max_dynamic_bytes is not None and self.max_dynamic_bytes < 0:
            raise ValueError(
                f"max_dynamic_bytes cannot be negative, got {self.max_dynamic_bytes} "
                "(None means no cap)"
            )
        if self.eviction_batch_max < 1:
            raise ValueError(
                f"eviction_batch_max must be at least 1, got {self.eviction_batch_max}"
            )
        if not self.pin_ttl_seconds > 0:
            raise ValueError(f"pin_ttl_seconds must be positive, got {self.pin_ttl_seconds}")


def policy_from_env(base: DynamicPolicy, env: Mapping[str, str]) -> DynamicPolicy:
    """``base`` (the profile's policy, from registration) with the seed's overrides in ``env``.

    ``DM_DYNAMIC_EVICTION_ENABLED`` (1/true/yes/on or 0/false/no/off),
    ``DM_DYNAMIC_MIN_FREE_BYTES`` and ``DM_DYNAMIC_MAX_BYTES`` (sizes such as ``10GB``;
    for the cap, ``0``, ``none`` or ``unlimited`` mean no cap, as 0 did in the seed),
    ``DM_EVICTION_BATCH_MAX`` (a whole number >= 1) and ``DM_PIN_TTL_SECONDS`` (seconds
    > 0; 1800 unless the profile or this says otherwise). Blank variables are unset. A
    value that cannot be read raises a ``ConfigError`` naming the variable.
    """
    enabled = base.enabled
    if (raw := env_value(env, "DM_DYNAMIC_EVICTION_ENABLED")) is not None:
        if raw.lower() not in _TRUE | _FALSE:
            raise ConfigError(
                f"{raw!r} is not a yes or no: write 1 (or true) to enable eviction, 0 (or false) "
                "to disable it",
                source="DM_DYNAMIC_EVICTION_ENABLED",
            )
        enabled = raw.lower() in _TRUE
    min_free_bytes = base.min_free_bytes
    if (raw := env_value(env, "DM_DYNAMIC_MIN_FREE_BYTES")) is not None:
        min_free_bytes = _env_size("DM_DYNAMIC_MIN_FREE_BYTES", raw)
    max_dynamic_bytes = base.max_dynamic_bytes
    if (raw := env_value(env, "DM_DYNAMIC_MAX_BYTES")) is not None:
        no_cap = raw.lower() in _NO_CAP
        max_dynamic_bytes = None if no_cap else _env_size("DM_DYNAMIC_MAX_BYTES", raw) or None
    eviction_batch_max = base.eviction_batch_max
    if (raw := env_value(env, "DM_EVICTION_BATCH_MAX")) is not None:
        try:
            eviction_batch_max = int(raw)
        except ValueError:
            eviction_batch_max = 0
        if eviction_batch_max < 1:
            raise ConfigError(
                f"{raw!r} is not a number of files: write a whole number of at least 1, e.g. 20",
                source="DM_EVICTION_BATCH_MAX",
            )
    pin_ttl_seconds = base.pin_ttl_seconds
    if (raw := env_value(env, "DM_PIN_TTL_SECONDS")) is not None:
        try:
            pin_ttl_seconds = float(raw)
        except ValueError:
            pin_ttl_seconds = 0.0
        if not 0 < pin_ttl_seconds < float("inf"):
            raise ConfigError(
                f"{raw!r} is not a number of seconds: write a positive number, e.g. 1800",
                source="DM_PIN_TTL_SECONDS",
            )
    return DynamicPolicy(
        enabled=enabled,
        min_free_bytes=min_free_bytes,
        max_dynamic_bytes=max_dynamic_bytes,
        eviction_batch_max=eviction_batch_max,
        pin_ttl_seconds=pin_ttl_seconds,
    )


def _env_size(name: str, raw: str) -> int:
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise ConfigError(str(exc), source=name) from None


@dataclass(frozen=True, slots=True)
class Pin:
    """Job ``job_id`` needs the dependency; taken (or last renewed) at ``taken_at``."""

    job_id: str
    taken_at: float

    def holds(self, now: float, ttl: float) -> bool:
        """Whether the pin still holds at ``now``: it lapses ``ttl`` seconds after it was taken."""
        return now - self.taken_at < ttl


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A dependency on this instance's disk: ``size`` bytes, last used at ``last_used``."""

    dep_id: str
    size: int
    last_used: float
    static: bool = False
    pins: tuple[Pin, ...] = ()

    def live_pins(self, now: float, ttl: float) -> tuple[Pin, ...]:
        return tuple(pin for pin in self.pins if pin.holds(now, ttl))


@dataclass(frozen=True, slots=True)
class SpacePlan:
    """Room for ``size`` bytes: evict ``batches`` in order (each at most ``eviction_batch_max``).

    ``free_after`` is the free disk once the victims are gone and this download and those
    in flight are written; ``dynamic_after`` the dynamic bytes then (this download
    included when it is dynamic); ``cap_left`` what the cap still allows (``None``: no cap).
    """

    size: int
    batches: tuple[tuple[CacheEntry, ...], ...]
    freed_bytes: int
    free_after: int
    dynamic_after: int
    cap_left: int | None

    @property
    def victims(self) -> tuple[CacheEntry, ...]:
        """Every entry to evict, least recently used first."""
        return tuple(entry for batch in self.batches for entry in batch)

    @property
    def victim_ids(self) -> list[str]:
        return [entry.dep_id for entry in self.victims]


@dataclass(frozen=True, slots=True)
class SpaceRefusal:
    """No room for ``size`` bytes; ``reason`` says why in a line a person can act on.

    ``cause``: ``too_large`` (bigger than the whole cap: retrying never helps),
    ``eviction_disabled`` (the policy forbids evicting), or ``no_room`` (what could go
    is not enough; ``pins`` names the pinned dependencies and their jobs, which may free
    room when those jobs end). ``needed_bytes`` is what would have to be freed.
    """

    size: int
    cause: RefusalCause
    needed_bytes: int
    freeable_bytes: int
    pinned_bytes: int
    pins: dict[str, tuple[str, ...]]
    reason: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """Space set aside for a download in flight of ``size`` bytes.

    ``allocated`` is how much of it is already taken from the free disk (the download
    engine preallocates its ``.part`` file), so free disk is not counted twice; 0 counts
    it all, which errs on the side of keeping ``min_free_bytes``. ``plan`` is the
    eviction made for it, when the reservation came from ``DependencyCache.reserve``.
    """

    dep_id: str
    size: int
    static: bool = False
    allocated: int = 0
    plan: SpacePlan | None = field(default=None, compare=False)

    @property
    def pending_disk_bytes(self) -> int:
        """Bytes this download still has to take from the free disk."""
        return max(0, self.size - self.allocated)


def plan_space(
    size: int,
    entries: Iterable[CacheEntry],
    *,
    free_bytes: int,
    policy: DynamicPolicy,
    now: float,
    reservations: Iterable[Reservation] = (),
    static: bool = False,
) -> SpacePlan | SpaceRefusal:
    """What to evict so that a new item of ``size`` bytes fits, or why it cannot.

    ``entries`` are what is on disk (static and dynamic), ``free_bytes`` the free disk
    measured now, ``reservations`` the downloads in flight. A dynamic item must fit the
    cap and the floor, a ``static`` one only the floor (statics are outside the cap, but
    dynamic entries may still make disk room for them). ``size=0`` gives the evictions
    that bring an over-full cache (a lowered cap, a restart) back within its bounds.

    Victims are unpinned dynamic entries, least recently used first (ties by id), and
    no more than needed: the plan stops at the first victim that makes the item fit,
    mid-batch if so; batches only cap how many files go at once, so that the agent
    deletes, records and reports in bounded steps.
    """
    if size < 0:
        raise ValueError(f"size cannot be negative, got {size}")
    if free_bytes < 0:
        raise ValueError(f"free_bytes cannot be negative, got {free_bytes}")
    ttl = policy.pin_ttl_seconds
    dynamic = [entry for entry in entries if not entry.static]
    in_flight = list(reservations)
    dynamic_bytes = sum(entry.size for entry in dynamic)
    reserved_dynamic = sum(r.size for r in in_flight if not r.static)
    pending_disk = sum(r.pending_disk_bytes for r in in_flight)
    cap = policy.max_dynamic_bytes

    candidates = sorted(
        (entry for entry in dynamic if not entry.live_pins(now, ttl)),
        key=lambda entry: (entry.last_used, entry.dep_id),
    )
    pinned = sorted(
        (entry for entry in dynamic if entry.live_pins(now, ttl)),
        key=lambda entry: (-entry.size, entry.dep_id),
    )
    freeable = sum(entry.size for entry in candidates)
    pinned_bytes = sum(entry.size for entry in pinned)
    pins = {
        entry.dep_id: tuple(sorted({pin.job_id for pin in entry.live_pins(now, ttl)}))
        for entry in pinned
    }

    def refuse(cause: RefusalCause, need: int, reason: str) -> SpaceRefusal:
        return SpaceRefusal(
            size=size,
            cause=cause,
            needed_bytes=need,
            freeable_bytes=freeable,
            pinned_bytes=pinned_bytes,
            pins=pins,
            reason=reason,
        )

    if not static and cap is not None and size > cap:
        return refuse(
            "too_large",
            size - cap,
            f"needs {format_size(size)}, more than the whole dynamic cache may hold "
            f"({format_size(cap)}, max_dynamic_bytes): raise the cap or make it a static "
            "dependency",
        )

    cap_need = 0 if static or cap is None else dynamic_bytes + reserved_dynamic + size - cap
    disk_need = policy.min_free_bytes + pending_disk + size - free_bytes
    need = max(0, cap_need, disk_need)

    victims: list[CacheEntry] = []
    freed = 0
    if policy.enabled:
        for entry in candidates:
            if freed >= need:
                break
            victims.append(entry)
            freed += entry.size

    if freed >= need:
        step = policy.eviction_batch_max
        dynamic_after = dynamic_bytes - freed + reserved_dynamic + (0 if static else size)
        return SpacePlan(
            size=size,
            batches=tuple(tuple(victims[i : i + step]) for i in range(0, len(victims), step)),
            freed_bytes=freed,
            free_after=free_bytes + freed - pending_disk - size,
            dynamic_after=dynamic_after,
            cap_left=None if cap is None else cap - dynamic_after,
        )

    bounds = []
    if cap_need > 0:
        bounds.append(
            f"dynamic cache {format_size(dynamic_bytes + reserved_dynamic)} "
            f"of its {format_size(cap or 0)} cap"
        )
    if disk_need > 0:
        bounds.append(
            f"{format_size(free_bytes)} free disk, "
            f"{format_size(policy.min_free_bytes)} to be kept free"
        )
    head = f"needs {format_size(need)} freed for {format_size(size)} ({'; '.join(bounds)})"
    if not policy.enabled:
        return refuse(
            "eviction_disabled",
            need,
            f"{head} and dynamic eviction is disabled ({format_size(freeable)} could be "
            "freed): enable the profile's dynamic policy or set DM_DYNAMIC_EVICTION_ENABLED=1",
        )
    clauses = [f"{head}, {format_size(freeable)} can be freed"]
    if pinned:
        clauses.append(f"{format_size(pinned_bytes)} held by pins: {_pins_text(pins)}")
    in_flight_bytes = max(reserved_dynamic if cap_need > 0 else 0, pending_disk)
    if in_flight_bytes:
        clauses.append(f"{format_size(in_flight_bytes)} reserved by downloads in flight")
    if disk_need > freeable + pinned_bytes + pending_disk:
        clauses.append("the rest of the disk holds static dependencies and other files")
    return refuse("no_room", need, "; ".join(clauses))


def _pins_text(pins: Mapping[str, Sequence[str]]) -> str:
    shown = []
    for dep_id, jobs in list(pins.items())[:_PINS_SHOWN]:
        word = "job" if len(jobs) == 1 else "jobs"
        shown.append(f"{dep_id} ({word} {', '.join(jobs)})")
    if len(pins) > _PINS_SHOWN:
        shown.append(f"and {len(pins) - _PINS_SHOWN} more")
    return ", ".join(shown)


class DependencyCache:
    """The agent's view of its dependencies on disk, over ``plan_space``; no I/O.

    The agent's loop asks ``reserve`` before each download: the victims leave the
    cache's accounting at once (so a second reservation never counts the same bytes),
    the loop deletes their files batch by batch *before* the download starts, then
    ``commit`` s the reservation when the download is installed or ``release`` s it when
    it fails. If a victim's file cannot be deleted, ``add`` it back and ``release``.

    Pins are kept apart from entries, so a queued job can pin a dependency that is not
    on disk yet; pinning again renews a pin. Every method is deterministic given its
    ``now``. Not thread-safe: the agent calls it from its one asyncio loop, never from
    a worker thread.
    """

    def __init__(self, policy: DynamicPolicy, entries: Iterable[CacheEntry] = ()) -> None:
        self.policy = policy
        self._entries: dict[str, CacheEntry] = {}
        self._pins: dict[str, dict[str, float]] = {}
        self._reservations: dict[str, Reservation] = {}
        for entry in entries:
            self._entries[entry.dep_id] = dataclasses.replace(entry, pins=())
            for pin in entry.pins:
                self._pins.setdefault(entry.dep_id, {})[pin.job_id] = pin.taken_at

    # -- what is there --------------------------------------------------------

    def entry(self, dep_id: str) -> CacheEntry | None:
        """The installed entry ``dep_id`` with its pins, or ``None``."""
        entry = self._entries.get(dep_id)
        return None if entry is None else self._with_pins(entry)

    def entries(self) -> list[CacheEntry]:
        """Every installed entry with its pins, by id (what the state file keeps)."""
        return [self._with_pins(self._entries[dep_id]) for dep_id in sorted(self._entries)]

    def static_ids(self) -> list[str]:
        return sorted(dep_id for dep_id, entry in self._entries.items() if entry.static)

    def dynamic_ids(self) -> list[str]:
        return sorted(dep_id for dep_id, entry in self._entries.items() if not entry.static)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the installed dynamic entries: what the cap bounds (the seed's
        ``dynamicBytesUsed``), downloads in flight not included."""
        return sum(entry.size for entry in self._entries.values() if not entry.static)

    @property
    def static_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values() if entry.static)

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by dynamic downloads in flight (they count against the cap)."""
        return sum(r.size for r in self._reservations.values() if not r.static)

    def reservations(self) -> list[Reservation]:
        return [self._reservations[dep_id] for dep_id in sorted(self._reservations)]

    def pins(self, now: float) -> dict[str, tuple[str, ...]]:
        """Dependency id -> the jobs whose pins hold at ``now``, installed or not."""
        ttl = self.policy.pin_ttl_seconds
        live = {
            dep_id: tuple(sorted(job for job, taken in jobs.items() if now - taken < ttl))
            for dep_id, jobs in sorted(self._pins.items())
        }
        return {dep_id: jobs for dep_id, jobs in live.items() if jobs}

    # -- changes --------------------------------------------------------------

    def add(self, dep_id: str, size: int, *, now: float, static: bool = False) -> CacheEntry:
        """Record a dependency found on disk (the restart's reconciliation, a static
        install): no space check, since it is there already. Replaces an entry of the
        same id; ``plan_space(0, ...)`` says what to evict if it leaves the cache over its
        bounds."""
        if size < 0:
            raise ValueError(f"{dep_id}: size cannot be negative, got {size}")
        if dep_id in self._reservations:
            raise ValueError(f"{dep_id} is being downloaded: commit or release it first")
        self._entries[dep_id] = CacheEntry(dep_id, size, last_used=now, static=static)
        return self._with_pins(self._entries[dep_id])

    def touch(self, dep_id: str, *, now: float) -> bool:
        """Mark ``dep_id`` used at ``now`` (least recently used goes first); ``False``
        when it is not installed."""
        entry = self._entries.get(dep_id)
        if entry is None:
            return False
        self._entries[dep_id] = dataclasses.replace(entry, last_used=now)
        return True

    def pin(self, dep_id: str, job_id: str, *, now: float) -> None:
        """Job ``job_id`` needs ``dep_id`` until it ends or ``pin_ttl_seconds`` pass;
        pinning again renews the pin."""
        self._pins.setdefault(dep_id, {})[job_id] = now

    def unpin(self, dep_id: str, job_id: str) -> bool:
        """Drop one pin; ``False`` when there was none."""
        jobs = self._pins.get(dep_id)
        if jobs is None or job_id not in jobs:
            return False
        del jobs[job_id]
        if not jobs:
            del self._pins[dep_id]
        return True

    def unpin_job(self, job_id: str) -> list[str]:
        """Drop every pin of a job that ended; the ids it pinned."""
        dropped = sorted(dep_id for dep_id, jobs in self._pins.items() if job_id in jobs)
        for dep_id in dropped:
            self.unpin(dep_id, job_id)
        return dropped

    def expire_pins(self, now: float) -> None:
        """Forget the pins that have lapsed (they no longer hold either way)."""
        ttl = self.policy.pin_ttl_seconds
        for dep_id in list(self._pins):
            jobs = {job: taken for job, taken in self._pins[dep_id].items() if now - taken < ttl}
            if jobs:
                self._pins[dep_id] = jobs
            else:
                del self._pins[dep_id]

    def reserve(
        self, dep_id: str, size: int, *, free_bytes: int, now: float, static: bool = False
    ) -> Reservation | SpaceRefusal:
        """Set aside room for downloading ``dep_id`` (``size`` bytes), evicting if needed.

        ``free_bytes`` is the free disk measured now. On success the plan's victims are
        out of the cache already; delete their files (``reservation.plan.batches``)
        before the download starts.
        """
        if dep_id in self._entries:
            raise ValueError(f"{dep_id} is installed already: touch it instead")
        if dep_id in self._reservations:
            raise ValueError(f"{dep_id} is being downloaded already")
        self.expire_pins(now)
        decision = plan_space(
            size,
            self.entries(),
            free_bytes=free_bytes,
            policy=self.policy,
            now=now,
            reservations=self._reservations.values(),
            static=static,
        )
        if isinstance(decision, SpaceRefusal):
            return decision
        for victim in decision.victims:
            del self._entries[victim.dep_id]
        reservation = Reservation(dep_id, size, static=static, plan=decision)
        self._reservations[dep_id] = reservation
        return reservation

    def set_allocated(self, dep_id: str, allocated: int) -> None:
        """The download of ``dep_id`` has taken ``allocated`` bytes of disk so far (its
        preallocated ``.part``), which free disk measured from now on already lacks."""
        reservation = self._reservations[dep_id]
        if not 0 <= allocated <= reservation.size:
            raise ValueError(
                f"{dep_id}: allocated must be between 0 and {reservation.size}, got {allocated}"
            )
        self._reservations[dep_id] = dataclasses.replace(reservation, allocated=allocated)

    def commit(self, reservation: Reservation, *, now: float) -> CacheEntry:
        """The download is installed: its reservation becomes an entry used at ``now``."""
        held = self._reservations.pop(reservation.dep_id, None)
        if held is None:
            raise KeyError(f"{reservation.dep_id} has no reservation to commit")
        entry = CacheEntry(held.dep_id, held.size, last_used=now, static=held.static)
        self._entries[entry.dep_id] = entry
        return self._with_pins(entry)

    def release(self, reservation: Reservation) -> bool:
        """The download failed or was cancelled: give its room back (its victims stay
        evicted). ``False`` when it was released already."""
        return self._reservations.pop(reservation.dep_id, None) is not None

    def evict(self, dep_ids: Iterable[str], *, now: float) -> list[CacheEntry]:
        """Remove these entries outside a reservation (an operator's purge, a return to
        a lowered cap); their files are the caller's to delete. All or nothing: a static,
        pinned or unknown id raises ``ValueError`` and nothing is removed."""
        ids = list(dict.fromkeys(dep_ids))
        live = self.pins(now)
        for dep_id in ids:
            entry = self._entries.get(dep_id)
            if entry is None:
                raise ValueError(f"{dep_id} is not installed")
            if entry.static:
                raise ValueError(f"{dep_id} is a static dependency: statics are never evicted")
            if dep_id in live:
                raise ValueError(f"{dep_id} is pinned by {_pins_text({dep_id: live[dep_id]})}")
        return [self._with_pins(self._entries.pop(dep_id)) for dep_id in ids]

    def forget(self, dep_id: str) -> CacheEntry | None:
        """Drop an entry whose file is gone from disk, whatever it is."""
        entry = self._entries.pop(dep_id, None)
        return None if entry is None else self._with_pins(entry)

    def _with_pins(self, entry: CacheEntry) -> CacheEntry:
        jobs = self._pins.get(entry.dep_id)
        if not jobs:
            return entry
        pins = tuple(Pin(job, taken) for job, taken in sorted(jobs.items()))
        return dataclasses.replace(entry, pins=pins)

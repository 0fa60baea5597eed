"""The failure policy: whether one instance has failed, and when the fleet must stop renting.

``assess`` judges one instance and ``fleet_brakes`` the fleet as a whole. Both are
pure functions over what was observed (``InstanceFacts``, ``RentalRecord``), the
time and the settings (``PolicySettings``): no I/O and no clock of their own. The
reconcile loop gathers the facts from the store and the provider, calls ``assess``
for each instance and ``fleet_brakes`` once per pass, and hands the results to
``comfyfleet.pool.planner.plan``.

Defaults (each one a field of ``PolicySettings``):

======================================  ===============================================
rule                                    default
======================================  ===============================================
``no space left on device`` in          fail at once (``no_space``)
``status_msg``
``actual_status`` load_failed, exited,  more than 120 s (``load_failed``,
offline or unknown                      ``provider_exited``, ...)
agent registration                      within 600 s of ``running``
                                        (``agent_never_registered``)
heartbeats                              3 missed at 30 s: more than 90 s of silence
                                        (``heartbeat_lost``)
downloads                               no progress for more than 300 s
                                        (``download_stalled``)
ComfyUI crash loop                      3 crashes within 600 s (``comfy_crash_loop``)
warm-up                                 a failed warm-up fails (``warmup_failed``)
direct ports unmapped                   only with ``require_direct_ports``: at the
                                        registration deadline (``ports_unmapped``)
stage deadlines                         ``DEFAULT_STAGE_DEADLINES``
                                        (``stage_deadline:<stage>``)
======================================  ===============================================

No death spiral: every clock that measures how long something has lasted (a bad
provider status, the wait for registration, silence from the agent, a stalled
download, a stage) starts no earlier than the control plane itself. What the
control plane was not running to see is not held against an instance, so a
restart after an outage does not fail the whole fleet at once. Every limit is
"more than": a condition that has lasted exactly the limit has not failed yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

from comfyfleet.lifecycle import (
    INSTANCE_STATE_NAMES,
    LIVE_STATES,
    TERMINAL_STATES,
    InstanceState,
    InstanceStateName,
)

__all__ = [
    "AGENT_FAILED",
    "AGENT_NEVER_REGISTERED",
    "BAD_PROVIDER_STATUSES",
    "COMFY_CRASH_LOOP",
    "DEFAULT_POLICY_SETTINGS",
    "DEFAULT_STAGE_DEADLINES",
    "DOWNLOAD_STALLED",
    "HEARTBEAT_LOST",
    "LOAD_FAILED",
    "NO_SPACE",
    "OK",
    "PORTS_UNMAPPED",
    "STAGE_DEADLINE",
    "STATES",
    "WARMUP_FAILED",
    "Brake",
    "Brakes",
    "InstanceFacts",
    "PolicySettings",
    "RentalRecord",
    "State",
    "Verdict",
    "assess",
    "fleet_brakes",
    "heartbeat_silence",
    "ports_mapped",
]

State: TypeAlias = InstanceStateName
"""The lifecycle of an instance (``comfyfleet.lifecycle``), in order; ``failed`` can follow
any state before ``destroyed``."""
STATES: Final[tuple[State, ...]] = INSTANCE_STATE_NAMES

# States the policy has nothing to judge in: the destroy is decided already.
_NOT_JUDGED: Final = frozenset({InstanceState.DESTROYING, *TERMINAL_STATES})
# States in which an agent that has registered is expected to send heartbeats: from
# the container's start (``booting``) through ``draining``.
_HEARTBEATING: Final = LIVE_STATES - {
    InstanceState.REQUESTED,
    InstanceState.CREATING,
    InstanceState.DESTROYING,
}

# ---- reason codes (machine-readable; metrics count failures by them)
NO_SPACE: Final = "no_space"
AGENT_FAILED: Final = "agent_failed"
WARMUP_FAILED: Final = "warmup_failed"
LOAD_FAILED: Final = "load_failed"
COMFY_CRASH_LOOP: Final = "comfy_crash_loop"
AGENT_NEVER_REGISTERED: Final = "agent_never_registered"
PORTS_UNMAPPED: Final = "ports_unmapped"
HEARTBEAT_LOST: Final = "heartbeat_lost"
DOWNLOAD_STALLED: Final = "download_stalled"
STAGE_DEADLINE: Final = "stage_deadline"  # the code is "stage_deadline:<stage>"

# Vast's actual_status values that mean the container is not coming up (seed 002).
BAD_PROVIDER_STATUSES: Final = frozenset({"load_failed", "exited", "offline", "unknown"})

# How long each stage may last. ``requested`` is the planner's (a row whose rental
# never reached the provider), ``ready`` and ``busy`` have none (jobs have their own
# timeouts), ``destroying`` raises an alert in the planner instead of failing.
DEFAULT_STAGE_DEADLINES: Final[Mapping[str, float]] = MappingProxyType(
    {
        # Pull and extract an ~8 GB (compressed) image: minutes on a typical host.
        "creating": 1200.0,
        # Container up -> agent registered; the 600 s registration rule usually fires first.
        "booting": 900.0,
        # Custom nodes at pinned commits and their pip installs.
        "provisioning": 1800.0,
        # Hundreds of GB on a slow host; a stall fails far sooner.
        "downloading": 10800.0,
        "starting_app": 600.0,
        # The first run loads the models onto the GPU.
        "warming": 900.0,
        # The job being finished when the instance was told to drain.
        "draining": 3600.0,
    }
)

_NO_SPACE_TEXT: Final = "no space left on device"
_QUOTE_MAX: Final = 240


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The limits of the failure policy and of the fleet brakes (seconds, counts)."""

    bad_status_seconds: float = 120.0
    bad_statuses: frozenset[str] = BAD_PROVIDER_STATUSES
    register_seconds: float = 600.0
    heartbeat_interval_seconds: float = 30.0
    missed_heartbeats: int = 3
    download_stall_seconds: float = 300.0
    crash_loop_count: int = 3
    crash_loop_window_seconds: float = 600.0
    stage_deadlines: Mapping[str, float] = field(default_factory=lambda: DEFAULT_STAGE_DEADLINES)
    # Brakes: renting stops when more than half the heartbeating instances (and at
    # least this many) are silent at once ...
    mass_heartbeat_min: int = 2
    # ... or when this many rentals in a row ended without their agent registering.
    never_registered_streak: int = 3

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stage_deadlines) - set(STATES))
        if unknown:
            raise ValueError(f"unknown stage in stage_deadlines: {', '.join(unknown)}")
        for stage, seconds in self.stage_deadlines.items():
            if not seconds > 0:
                raise ValueError(f"expected a deadline > 0 s for stage {stage}, got {seconds}")
        for name in (
            "bad_status_seconds",
            "register_seconds",
            "heartbeat_interval_seconds",
            "download_stall_seconds",
            "crash_loop_window_seconds",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)}")
        for name in ("missed_heartbeats", "crash_loop_count", "never_registered_streak"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        # A frozen, read-only copy: the caller's dict cannot change the settings later.
        object.__setattr__(self, "stage_deadlines", MappingProxyType(dict(self.stage_deadlines)))

    @property
    def heartbeat_timeout_seconds(self) -> float:
        """Silence longer than this is a lost agent."""
        return self.heartbeat_interval_seconds * self.missed_heartbeats


DEFAULT_POLICY_SETTINGS: Final = PolicySettings()


@dataclass(frozen=True, slots=True)
class InstanceFacts:
    """What is known about one instance; times are epoch seconds, ``None`` for never.

    ``state``/``state_since``: the lifecycle state in the store and when it was
    entered. ``actual_status``/``actual_status_since``/``status_msg``: the provider's
    words and since when the control plane has seen that status unchanged.
    ``running_since``: when the provider first reported ``running``.
    ``direct_port_start``: -1 (or ``None``) while the provider has mapped no ports.
    ``registered_at``/``last_heartbeat``: the agent's registration and last heartbeat.
    ``download_bytes``/``download_progress_at``: bytes downloaded so far and when that
    number last grew. ``comfy_crashes``: when ComfyUI crashes were reported.
    ``warmup_ok``: the warm-up run's result (``None``: not run yet), ``warmup_error``
    its error. ``agent_failure``: the reason the agent gave when it reported
    ``failed``. ``control_plane_started_at``: when this control plane started.
    """

    state: State
    state_since: float
    control_plane_started_at: float
    actual_status: str | None = None
    actual_status_since: float | None = None
    status_msg: str | None = None
    running_since: float | None = None
    direct_port_start: int | None = None
    require_direct_ports: bool = False
    registered_at: float | None = None
    last_heartbeat: float | None = None
    download_bytes: int = 0
    download_progress_at: float | None = None
    comfy_crashes: tuple[float, ...] = ()
    warmup_ok: bool | None = None
    warmup_error: str | None = None
    agent_failure: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """``failed`` with a machine-readable ``reason`` and a ``message`` for people; or ok."""

    failed: bool = False
    reason: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    @classmethod
    def fail(cls, reason: str, message: str) -> Verdict:
        return cls(True, reason, message)


OK: Final = Verdict()


def ports_mapped(direct_port_start: int | None) -> bool:
    """Whether the provider has mapped direct ports (Vast says -1 while it has not)."""
    return direct_port_start is not None and direct_port_start > 0


def assess(
    facts: InstanceFacts, now: float, settings: PolicySettings = DEFAULT_POLICY_SETTINGS
) -> Verdict:
    """Whether the instance described by ``facts`` has failed at time ``now``, and why.

    The rules are tried from the most specific cause to the most general, so the
    reason names the root cause when several rules fire at once (a full disk also
    stops the agent from registering).
    """
    if facts.state in _NOT_JUDGED:
        return OK
    started = facts.control_plane_started_at

    def lasted(since: float | None) -> float:
        # The time since ``since``, counted from the control plane's start at the earliest.
        return now - (started if since is None else max(since, started))

    status_msg = facts.status_msg or ""
    if _NO_SPACE_TEXT in status_msg.lower():
        return Verdict.fail(
            NO_SPACE,
            f"the host ran out of disk: the provider says {_quote(status_msg)}; "
            "a larger disk_gb in the profile may help if it happens again",
        )
    if facts.agent_failure:
        return Verdict.fail(AGENT_FAILED, f"the agent reported a failure: {facts.agent_failure}")
    if facts.warmup_ok is False:
        detail = f": {facts.warmup_error}" if facts.warmup_error else ""
        return Verdict.fail(WARMUP_FAILED, f"the warm-up workflow failed{detail}")

    status = (facts.actual_status or "").lower()
    if status in settings.bad_statuses:
        held = lasted(facts.actual_status_since)
        if held > settings.bad_status_seconds:
            code = LOAD_FAILED if status == "load_failed" else f"provider_{status}"
            return Verdict.fail(
                code,
                f"the provider has reported actual_status {status!r} for {held:.0f} s "
                f"(limit {settings.bad_status_seconds:.0f} s){_provider_says(status_msg)}",
            )

    window_start = now - settings.crash_loop_window_seconds
    crashes = sum(1 for t in facts.comfy_crashes if window_start < t <= now)
    if crashes >= settings.crash_loop_count:
        return Verdict.fail(
            COMFY_CRASH_LOOP,
            f"ComfyUI crashed {crashes} times in {settings.crash_loop_window_seconds:.0f} s",
        )

    if facts.running_since is not None:
        booted = lasted(facts.running_since)
        if booted > settings.register_seconds:
            if facts.registered_at is None:
                return Verdict.fail(
                    AGENT_NEVER_REGISTERED,
                    f"the agent has not registered {booted:.0f} s after the instance started "
                    f"running (limit {settings.register_seconds:.0f} s)"
                    f"{_provider_says(status_msg)}",
                )
            if facts.require_direct_ports and not ports_mapped(facts.direct_port_start):
                return Verdict.fail(
                    PORTS_UNMAPPED,
                    f"the provider has mapped no direct ports {booted:.0f} s after the "
                    "instance started running, and the profile sets require_direct_ports",
                )

    silence = heartbeat_silence(facts, now)
    if silence is not None and silence > settings.heartbeat_timeout_seconds:
        return Verdict.fail(
            HEARTBEAT_LOST,
            f"no heartbeat from the agent for {silence:.0f} s "
            f"({settings.missed_heartbeats} missed at {settings.heartbeat_interval_seconds:.0f} s)",
        )

    if facts.state == "downloading":
        stalled = lasted(
            facts.state_since
            if facts.download_progress_at is None
            else max(facts.download_progress_at, facts.state_since)
        )
        if stalled > settings.download_stall_seconds:
            return Verdict.fail(
                DOWNLOAD_STALLED,
                f"downloads made no progress for {stalled:.0f} s "
                f"(limit {settings.download_stall_seconds:.0f} s) "
                f"at {facts.download_bytes / 1e9:.2f} GB",
            )

    deadline = settings.stage_deadlines.get(facts.state)
    if deadline is not None:
        spent = lasted(facts.state_since)
        if spent > deadline:
            return Verdict.fail(
                f"{STAGE_DEADLINE}:{facts.state}",
                f"the {facts.state} stage has lasted {spent:.0f} s "
                f"(deadline {deadline:.0f} s){_provider_says(status_msg)}",
            )
    return OK


def heartbeat_silence(facts: InstanceFacts, now: float) -> float | None:
    """Seconds without word from a registered agent (from the control plane's start at
    the earliest); ``None`` when no heartbeat is expected."""
    if facts.registered_at is None or facts.state not in _HEARTBEATING:
        return None
    last = facts.registered_at
    if facts.last_heartbeat is not None:
        last = max(last, facts.last_heartbeat)
    return now - max(last, facts.control_plane_started_at)


def _quote(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _QUOTE_MAX:
        # The cause is at the end of a containerd error ("...: no space left on device").
        text = "..." + text[-(_QUOTE_MAX - 3) :]
    return f'"{text}"'


def _provider_says(status_msg: str) -> str:
    return f"; the provider says {_quote(status_msg)}" if status_msg.strip() else ""


# ---------------------------------------------------------------- fleet brakes


@dataclass(frozen=True, slots=True)
class RentalRecord:
    """One past rental, for the never-registered brake: when it was rented, whether
    its agent ever registered, and whether it is over (destroyed or failed)."""

    rented_at: float
    registered: bool
    ended: bool


@dataclass(frozen=True, slots=True)
class Brake:
    """Why renting stopped: a machine-readable ``code`` and a message for people."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Brakes:
    """The fleet-wide decision: renting stops while any brake holds.

    ``hold_heartbeat_failures``: so many agents went silent at once that the
    control plane's own network is the likely cause; instances that failed only
    for ``heartbeat_lost`` are kept rather than destroyed.
    """

    brakes: tuple[Brake, ...] = ()
    hold_heartbeat_failures: bool = False

    @property
    def stop_renting(self) -> bool:
        return bool(self.brakes)


def fleet_brakes(
    facts: Sequence[InstanceFacts],
    now: float,
    settings: PolicySettings = DEFAULT_POLICY_SETTINGS,
    *,
    rentals: Sequence[RentalRecord] = (),
    credit: float | None = None,
    next_rental_cost: float = 0.0,
) -> Brakes:
    """When renting must stop, and why.

    ``facts``: every instance not yet destroyed. ``rentals``: the rentals since an
    operator last cleared the brakes (the never-registered brake holds until then).
    ``credit``: the account's current credit in $ (``None``: not known, no check);
    ``next_rental_cost``: the $ the next rental needs (its expected cost to ready).
    """
    brakes: list[Brake] = []
    hold = False

    expected = silent = 0
    timeout = settings.heartbeat_timeout_seconds
    for f in facts:
        silence = heartbeat_silence(f, now)
        if silence is None:
            continue
        expected += 1
        if silence > timeout:
            silent += 1
    if silent >= settings.mass_heartbeat_min and 2 * silent > expected:
        hold = True
        brakes.append(
            Brake(
                "heartbeat_mass_loss",
                f"{silent} of {expected} instances stopped sending heartbeats at once; the "
                "control plane's own network is the likely cause, so renting stops and "
                "they are not replaced until heartbeats return",
            )
        )

    streak = 0
    for r in sorted(rentals, key=lambda r: r.rented_at, reverse=True):
        if r.registered:
            break
        if r.ended:
            streak += 1
    if streak >= settings.never_registered_streak:
        brakes.append(
            Brake(
                "never_registered",
                f"the last {streak} rentals ended without their agent registering; check "
                "the image, the onstart script and that instances can reach COMFYFLEET_URL, "
                "then clear the brake",
            )
        )

    if credit is not None and (credit <= 0 or credit < next_rental_cost):
        brakes.append(
            Brake(
                "credit_low",
                f"the account has ${credit:.2f} of credit and the next rental needs "
                f"${next_rental_cost:.2f}; add credit to rent again",
            )
        )
    return Brakes(tuple(brakes), hold)

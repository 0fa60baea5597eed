"""The admin API's handle on the warm pool: what prewarm, reprovision, terminate and an
OnStart rental call.

The HTTP layer (``api/admin.py``) checks the admin key and the request, then calls a
``PoolControl``; the reconciler (``pool/``) implements it, recording each action in
the store before it acts (ARCHITECTURE.md, principle 2). ``create_app(pool=None)``
runs without one: those three endpoints then answer 503 and say why.

A ``PoolControl`` raises ``PoolActionError`` subclasses for what the caller should
hear about (an unknown profile: 404; an action the pool refuses now, such as a cap
or a brake: 409, with the reason), and ``comfyfleet.errors.UnknownInstance`` for an
instance the store does not know (404). Any other exception is a 500.

An OnStart rental (``rent_for_job``) is an instance rented for one job: the job and the
instance are recorded together, the job reserved to the instance, so that no warm
instance can take it meanwhile and the instance never takes another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from comfyfleet.errors import ComfyfleetError

__all__ = [
    "OnStartJob",
    "OnStartRental",
    "PoolActionError",
    "PoolActionRefused",
    "PoolControl",
    "UnknownProfile",
]


class PoolActionError(ComfyfleetError):
    """An admin action the pool did not take; ``status`` is the HTTP status to answer."""

    status: int = 409


class UnknownProfile(PoolActionError):
    """No profile of that name in the fleet file the control plane runs with."""

    status = 404

    def __init__(self, profile: str, known: list[str] | None = None):
        self.profile = profile
        names = ", ".join(sorted(known or [])) or "none"
        super().__init__(f"no profile {profile!r} in the fleet file (profiles: {names})")


class PoolActionRefused(PoolActionError):
    """The pool will not do it now: ``max_instances``, the spend cap, a brake; says which."""

    status = 409


@dataclass(frozen=True)
class OnStartJob:
    """The job an OnStart instance is rented for, as ``store.jobs.submit_job`` records it.

    ``request`` is the job as its agent will run it (the final workflow, the names and
    hashes of its inputs, already in the output store); ``timeout_s`` counts from its
    placement. It gets one attempt: its agent asks for it once, so a job queued again
    would wait for nobody.
    """

    request: dict[str, Any]
    timeout_s: float | None = None


@dataclass(frozen=True)
class OnStartRental:
    """An OnStart rental as recorded: the instance (``requested``) and its job (``queued``)."""

    instance_id: int
    job_id: str


@runtime_checkable
class PoolControl(Protocol):
    """What the admin endpoints ask of the pool. Every method is safe to retry.

    ``actor`` names who asked (``"admin"`` for the admin API); it goes into the audit
    rows of whatever the pool does.
    """

    async def prewarm(self, profile: str, count: int, *, actor: str) -> list[int]:
        """Rent ``count`` more instances of ``profile`` now, beyond ``min_ready``, within caps.

        Returns the ids of the instances recorded (state ``requested``), possibly
        fewer than ``count`` (``PoolActionRefused`` when none can be rented). The
        implementation counts each rental in ``api.metrics.PoolMetrics``
        (``prewarm_attempt``, then ``prewarm_success`` at ready or
        ``prewarm_failure`` with the reason).
        """
        ...

    async def reprovision(
        self, *, instance_id: int | None, profile: str | None, actor: str
    ) -> list[int]:
        """Replace one instance (``instance_id``) or every live instance of ``profile``.

        Exactly one of the two is given. Each is destroyed and a fresh rental takes
        its slot; returns the ids of the instances being replaced.
        """
        ...

    async def terminate(self, instance_id: int, *, reason: str, actor: str) -> None:
        """Destroy ``instance_id`` (it goes to ``destroying`` with ``reason``), not replaced
        unless the pool falls below ``min_ready``. Its jobs are queued again at once (an
        OnStart job fails: no other instance may run it)."""
        ...

    async def rent_for_job(self, profile: str, job: OnStartJob, *, actor: str) -> OnStartRental:
        """Rent one instance of ``profile`` for ``job`` (OnStart), within the caps.

        The instance holds no pool slot and counts towards no ``min_ready``; the job is
        reserved to it, and it is destroyed once the job has ended (whether or not anyone
        follows it). ``PoolActionRefused`` at the caps or while renting is stopped.
        """
        ...

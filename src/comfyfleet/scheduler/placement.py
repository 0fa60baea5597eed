"""Where a job that needs dependencies runs: the instance that can start it soonest.

The feature no other tool has: jobs go where their models already are. A job that names
dependencies (or whose workflow's loader nodes name catalog entries) is reserved to one
instance of its profile, chosen here, before any agent asks for it:

1. a ready (idle) instance that already holds every dependency wins at once;
2. otherwise, the instance whose estimated start is soonest: the time to download what
   it is missing (the bytes not already installed nor on their way there, at the
   fleet's download rate) plus the time for the jobs already waiting on it to run.
   With equal queues that is the instance missing the fewest bytes; a busy instance
   that holds everything is preferred to an idle one that would download gigabytes, but
   not when a queue of jobs already waits on it; ties go to the fewest missing bytes,
   then to the idle instance, then to the lowest id.

The missing items are then queued on the chosen instance, and the job starts there once
its heartbeat shows them installed (``dispatch``). A pure function over plain values,
as ``choose_job`` is: no store, no clock; ``bench/placement.py`` times it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_BYTES_PER_SECOND",
    "DEFAULT_SECONDS_PER_JOB",
    "InstanceCache",
    "PlacementChoice",
    "choose_instance",
]

#: The download rate placement assumes when the fleet has measured none: 100 MB/s,
#: what a Vast.ai machine with a gigabit link sustains from Hugging Face.
DEFAULT_BYTES_PER_SECOND: Final = 100e6
#: How long a job is assumed to keep its instance when its profile has no history.
DEFAULT_SECONDS_PER_JOB: Final = 20.0


@dataclass(frozen=True, slots=True)
class InstanceCache:
    """An instance as placement sees it: what it holds and what already waits on it."""

    instance_id: int
    #: Ready (no job on it) rather than busy.
    idle: bool
    #: Dependency ids installed there, static and dynamic (its last heartbeat).
    installed: frozenset[str]
    #: Dependency ids queued or downloading there (for other jobs, or prefetch).
    incoming: frozenset[str] = frozenset()
    #: Jobs placed, running or reserved there that have not ended.
    waiting_jobs: int = 0


@dataclass(frozen=True, slots=True)
class PlacementChoice:
    """The instance a job is reserved to, and what must be queued there first."""

    instance_id: int
    #: Dependencies not installed there, in the job's order (queued ones included: the
    #: job waits for them too).
    missing: tuple[str, ...]
    #: The bytes of ``missing`` not already on their way there.
    download_bytes: int
    #: The estimated seconds before the job can start there.
    estimated_start_s: float

    @property
    def ready_now(self) -> bool:
        """Every dependency is installed there."""
        return not self.missing


def choose_instance(
    needs: Iterable[str],
    sizes: Mapping[str, int],
    instances: Sequence[InstanceCache],
    *,
    bytes_per_second: float = DEFAULT_BYTES_PER_SECOND,
    seconds_per_job: float = DEFAULT_SECONDS_PER_JOB,
) -> PlacementChoice | None:
    """The instance a job needing ``needs`` (dependency ids) should be reserved to.

    ``sizes`` gives each dependency's bytes (an id it lacks counts as 0 bytes: the
    catalog is the caller's to check); ``instances`` are the candidates, all of the
    job's profile and able to take jobs. None when there is no candidate.
    """
    if bytes_per_second <= 0 or seconds_per_job < 0:
        raise ValueError("bytes_per_second must be positive and seconds_per_job not negative")
    wanted = tuple(dict.fromkeys(needs))  # the job's order, each once
    best: PlacementChoice | None = None
    best_key: tuple[float, int, int, int] | None = None
    for instance in instances:
        installed = instance.installed
        missing = tuple(dep for dep in wanted if dep not in installed)
        if not missing and instance.idle:
            # Everything is there and nothing runs: nothing can start sooner.
            return PlacementChoice(instance.instance_id, (), 0, 0.0)
        incoming = instance.incoming
        download = sum(sizes.get(dep, 0) for dep in missing if dep not in incoming)
        start = download / bytes_per_second + instance.waiting_jobs * seconds_per_job
        key = (start, download, 0 if instance.idle else 1, instance.instance_id)
        if best_key is None or key < best_key:
            best_key = key
            best = PlacementChoice(instance.instance_id, missing, download, start)
    return best

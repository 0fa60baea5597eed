"""The agent's job loop: take jobs from the control plane and run them on the local ComfyUI.

Once ComfyUI is ready, ``JobWorker.run(stop)`` keeps ``slots`` loops going; each one
long-polls ``GET /agent/jobs/next`` (docs/agent-protocol.md, "Jobs (the agent's side)"),
fetches the job's inputs (all at once, each hashed as it streams to disk), and hands the
job to ``agent.jobs.run_job`` with an ``HttpJobSink`` that reports progress, uploads the
outputs and sends FINISH under the job's lease. A renewal task keeps the lease alive
while the job runs. The lease is the control plane's word on who owns the job:

- a ``cancel_requested`` answer (to a progress report or a renewal) sets the job's cancel
  event, and ``run_job`` interrupts ComfyUI and reports ``cancelled``;
- a 409 (``stale_lease``, ``ended``) or a 404 on any call about the job raises
  ``LeaseLost``: the worker cancels ``run_job`` at once, which stops the prompt in
  ComfyUI and reports nothing more, and goes back to polling;
- ``stop`` (SIGTERM) ends the polling and cancels the running jobs, which are reported
  ``cancelled`` with no cancel request: the control plane queues them again.

With ``onstart_job_id`` (an OnStart instance) the worker runs that job alone and returns.
Nothing sleeps between the answer to ``next`` and the prompt being posted: a job with no
inputs reaches ComfyUI in the time of the local calls themselves.

``JobsClient`` is the HTTP side: every call carries the instance token, every call about
a job its lease, and the calls that are safe to repeat under a lease are retried with
backoff on connection errors, 429 and 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, TypeVar
from urllib.parse import quote

import httpx

from comfyfleet import __version__
from comfyfleet.agent.bootstrap import SHA256_HEADER
from comfyfleet.agent.comfy import ComfyClient
from comfyfleet.agent.jobs import (
    JobOutcome,
    JobOutput,
    JobProgress,
    JobSpec,
    file_chunks,
    run_job,
)
from comfyfleet.agent.remote import AgentAuthError, ControlPlaneUnavailable
from comfyfleet.agent.report import Level, Reporter
from comfyfleet.clock import Clock, SystemClock
from comfyfleet.envvars import env_value
from comfyfleet.errors import ComfyError, ComfyfleetError, ConfigError

__all__ = [
    "DEFAULT_POLL_WAIT_S",
    "JOBS_PER_INSTANCE_ENV",
    "LEASE_HEADER",
    "AgentJob",
    "HttpJobSink",
    "JobCallRefused",
    "JobInput",
    "JobWorker",
    "JobsClient",
    "LeaseLost",
    "LeaseStatus",
    "UploadedOutput",
    "jobs_per_instance",
]

log = logging.getLogger(__name__)

LEASE_HEADER: Final = "X-Comfyfleet-Lease"
JOBS_PER_INSTANCE_ENV: Final = "COMFYFLEET_JOBS_PER_INSTANCE"
DEFAULT_POLL_WAIT_S: Final = 20.0
#: How long a stopping worker waits for its running jobs to be interrupted and reported.
DEFAULT_STOP_GRACE_S: Final = 10.0
_RETRY_FIRST_S: Final = 0.25
_RETRY_CAP_S: Final = 5.0
# After a failed ``next``, polling resumes after this much at most (the control plane is
# down or refusing: no point hammering it).
_POLL_BACKOFF_CAP_S: Final = 30.0
# The shortest renewal period taken from the control plane: a zero would spin.
_MIN_RENEW_EVERY_S: Final = 0.2
_CHUNK: Final = 1 << 20
# How many finished and abandoned job ids a worker remembers (for tests and diagnosis).
_KEEP: Final = 1000
# A 404 about one input, not the job: the job is still this agent's, to report failed.
_MISSING_INPUT_CODES: Final = frozenset({"unknown_input", "input_missing"})

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class LeaseLost(ComfyfleetError):
    """The control plane no longer lets this agent report on the job (409, or 404).

    ``code`` is the control plane's: ``stale_lease`` (the job went to another attempt),
    ``ended`` (it has ended), or ``unknown`` (404). ``after_retry``: the refusal came to a
    call that was sent again after its first try got no answer, so the first try may
    have done the work (a FINISH answered ``ended`` is then this agent's own).
    """

    def __init__(self, job_id: str, code: str, detail: str, *, after_retry: bool = False):
        self.job_id = job_id
        self.code = code
        self.after_retry = after_retry
        super().__init__(f"job {job_id} is no longer this agent's ({code}): {detail}")


class JobCallRefused(ComfyfleetError):
    """The control plane refused a job call as invalid (a 4xx other than 401, 404, 409)."""

    def __init__(self, message: str, status: int):
        self.status = status
        super().__init__(message)


class _Retry(Exception):
    """A try that may go better the next time: an error status, or a corrupt body."""


# --------------------------------------------------------------------------- the wire


@dataclass(frozen=True)
class JobInput:
    """One input file a job names: fetched from the control plane, checked by its sha256."""

    name: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class AgentJob:
    """A job as ``next`` hands it out (JOB in docs/agent-protocol.md).

    ``received_at`` is when the answer arrived (``time.monotonic()``): the job's
    remaining timeout counts from there, and the dispatch latency is measured from it.
    """

    job_id: str
    lease_id: str
    workflow: Mapping[str, Any]
    inputs: tuple[JobInput, ...] = ()
    attempt: int = 1
    lease_ttl_s: float = 60.0
    renew_every_s: float = 20.0
    timeout_s: float | None = None
    received_at: float = dataclasses.field(default=0.0, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, received_at: float = 0.0) -> AgentJob:
        """Parse JOB; ``JobCallRefused`` names what is missing or wrong."""
        try:
            job_id, lease_id = data["job_id"], data["lease_id"]
            workflow = data["workflow"]
            if not isinstance(job_id, str) or not isinstance(lease_id, str):
                raise TypeError("job_id and lease_id must be strings")
            if not isinstance(workflow, Mapping):
                raise TypeError("workflow must be an object")
            inputs = tuple(
                JobInput(
                    name=str(item["name"]),
                    sha256=str(item["sha256"]).lower(),
                    size=int(item["size"]) if item.get("size") is not None else None,
                )
                for item in data.get("inputs") or ()
            )
            ttl = float(data.get("lease_ttl_s") or 60.0)
            renew = float(data.get("renew_every_s") or ttl / 3)
            timeout = data.get("timeout_s")
            return cls(
                job_id=job_id,
                lease_id=lease_id,
                workflow=workflow,
                inputs=inputs,
                attempt=int(data.get("attempt") or 1),
                lease_ttl_s=ttl,
                renew_every_s=max(_MIN_RENEW_EVERY_S, renew),
                timeout_s=float(timeout) if timeout is not None else None,
                received_at=received_at,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise JobCallRefused(
                f"the control plane handed out a job this agent cannot read: {error!r}", 200
            ) from None


@dataclass(frozen=True)
class LeaseStatus:
    """The answer to ``progress`` and ``renew``."""

    cancel_requested: bool
    lease_expires_at: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LeaseStatus:
        expires = data.get("lease_expires_at")
        return cls(
            cancel_requested=bool(data.get("cancel_requested")),
            lease_expires_at=float(expires) if isinstance(expires, int | float) else None,
        )


@dataclass(frozen=True)
class UploadedOutput:
    """The control plane's receipt for an uploaded output (the name as it stored it)."""

    name: str
    sha256: str
    size: int


def jobs_per_instance(env: Mapping[str, str] | None = None) -> int:
    """``COMFYFLEET_JOBS_PER_INSTANCE`` (default 1): how many jobs the agent runs at once."""
    raw = env_value(env, JOBS_PER_INSTANCE_ENV)
    if raw is None:
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise ConfigError("expected a whole number from 1 to 64", source=JOBS_PER_INSTANCE_ENV)
    return int(raw)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _outcome_body(
    lease_id: str, outcome: JobOutcome, outputs: Sequence[JobOutput]
) -> dict[str, Any]:
    return {
        "lease_id": lease_id,
        "status": outcome.status,
        "reason": outcome.reason,
        "error": outcome.error,
        "retryable": outcome.retryable,
        "prompt_id": outcome.prompt_id,
        "node_id": outcome.node_id,
        "node_type": outcome.node_type,
        "duration_s": outcome.duration_s,
        "outputs": [dataclasses.asdict(output) for output in outputs],
    }


def _detail_and_code(response: httpx.Response) -> tuple[str, str | None]:
    try:
        data = response.json()
    except ValueError:
        return response.reason_phrase, None
    if not isinstance(data, dict):
        return response.reason_phrase, None
    detail, code = data.get("detail"), data.get("code")
    if isinstance(detail, dict):  # an HTTPException whose detail is the whole body
        code = code or detail.get("code")
        detail = detail.get("detail") or detail.get("message")
    return (str(detail) if detail else response.reason_phrase), (str(code) if code else None)


# --------------------------------------------------------------------------- the client


class JobsClient:
    """The agent's job calls to the control plane at ``base_url`` (ending in ``/api``).

    Every call is retried on connection errors, 429 and 5xx (``attempts`` tries, the
    pause doubling from 0.25 s to 5 s; then ``ControlPlaneUnavailable``): each is safe to
    repeat under the lease. 401 raises ``AgentAuthError``; a 409 or 404 on a job,
    ``LeaseLost``; another 4xx, ``JobCallRefused``.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        instance_id: int,
        *,
        timeout_s: float = 30.0,
        attempts: int = 5,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.clock: Clock = clock or SystemClock()
        self._token = token
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> JobsClient:
        self._http()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url + "/",
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "User-Agent": f"comfyfleet-agent/{__version__}",
                },
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                transport=self._transport,
            )
        return self._client

    # -- the calls

    async def next(self, wait_s: float = DEFAULT_POLL_WAIT_S) -> AgentJob | None:
        """``GET /agent/jobs/next``: a job placed on this instance under a new lease, or
        None when ``wait_s`` seconds (0 to 30) passed with nothing to run."""
        wait_s = min(30.0, max(0.0, wait_s))
        params = {"instance_id": str(self.instance_id), "wait": f"{wait_s:g}"}
        # The answer may take the whole wait: the read timeout starts after it.
        timeout = httpx.Timeout(self.timeout_s + wait_s, connect=min(self.timeout_s, 10.0))

        async def once() -> httpx.Response:
            return await self._http().get("agent/jobs/next", params=params, timeout=timeout)

        response = await self._retrying("GET agent/jobs/next", once, job_id=None)
        received_at = time.monotonic()
        job = response.json().get("job")
        if job is None:
            return None
        if not isinstance(job, Mapping):
            raise JobCallRefused(
                "the control plane answered `next` with a job that is not an object", 200
            )
        return AgentJob.from_json(job, received_at=received_at)

    async def fetch_input(self, job: AgentJob, name: str, dest: Path) -> int:
        """Stream input ``name`` of ``job`` to ``dest``, hashed as it arrives; its size.

        A body whose sha256 (or size) is not the one the job names is fetched again, and
        after ``attempts`` tries fails with ``ControlPlaneUnavailable``; nothing is left at
        ``dest`` then.
        """
        found = next((item for item in job.inputs if item.name == name), None)
        if found is None:
            raise ValueError(f"job {job.job_id} has no input {name!r}")
        if not _plain_name(name):
            raise ConfigError(
                f"input file name {name!r} must be a plain file name (no folders)",
                source=f"job {job.job_id}",
            )
        path = f"agent/jobs/{quote(job.job_id, safe='')}/inputs/{quote(name, safe='')}"
        part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")

        async def once() -> int:
            async with self._http().stream(
                "GET", path, headers={LEASE_HEADER: job.lease_id}
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    if _retryable_status(response.status_code):
                        detail = _detail_and_code(response)[0]
                        raise _Retry(f"HTTP {response.status_code}: {detail}")
                    self._raise_for(response, f"GET {path}", job.job_id, retried)
                announced = response.headers.get(SHA256_HEADER, "").strip().lower()
                digest = hashlib.sha256()
                size = 0
                handle: BinaryIO = await asyncio.to_thread(part.open, "wb")
                try:
                    async for chunk in response.aiter_bytes(_CHUNK):
                        size += len(chunk)
                        await asyncio.to_thread(_hash_and_write, digest, handle, chunk)
                finally:
                    await asyncio.to_thread(handle.close)
            got = digest.hexdigest()
            if got != found.sha256 or (announced and announced != got):
                raise _Retry(f"it arrived with sha256 {got}, not {found.sha256}")
            if found.size is not None and size != found.size:
                raise _Retry(f"it arrived with {size} bytes, not {found.size}")
            await asyncio.to_thread(os.replace, part, dest)
            return size

        delay, retried = _RETRY_FIRST_S, False
        try:
            for attempt in range(1, self.attempts + 1):
                try:
                    return await once()
                except httpx.TransportError as error:
                    problem = f"{type(error).__name__}: {error}"
                except _Retry as error:
                    problem = str(error)
                if attempt == self.attempts:
                    raise ControlPlaneUnavailable(
                        f"could not fetch input {name!r} of job {job.job_id} from "
                        f"{self.base_url} after {self.attempts} attempts: {problem}"
                    )
                retried = True
                log.debug("fetching input %r again in %.2f s: %s", name, delay, problem)
                await self.clock.sleep(delay)
                delay = min(delay * 2, _RETRY_CAP_S)
            raise AssertionError("unreachable")
        finally:
            await asyncio.to_thread(part.unlink, missing_ok=True)

    async def progress(
        self, job_id: str, lease_id: str, progress: JobProgress, *, attempts: int = 3
    ) -> LeaseStatus:
        """``POST /agent/jobs/{job}/progress`` (it renews the lease too)."""
        body = {"lease_id": lease_id, "progress": dataclasses.asdict(progress)}
        data = await self._post(f"{_job_path(job_id)}/progress", body, job_id, attempts)
        return LeaseStatus.from_json(data)

    async def renew(self, job_id: str, lease_id: str) -> LeaseStatus:
        """``POST /agent/jobs/{job}/renew``."""
        data = await self._post(f"{_job_path(job_id)}/renew", {"lease_id": lease_id}, job_id)
        return LeaseStatus.from_json(data)

    async def upload_output(
        self, job_id: str, lease_id: str, name: str, path: Path, sha256: str, size: int
    ) -> UploadedOutput:
        """``PUT /agent/jobs/{job}/outputs/{name}``: the file streamed from ``path``."""
        url = f"{_job_path(job_id)}/outputs/{quote(name, safe='')}"
        headers = {
            LEASE_HEADER: lease_id,
            SHA256_HEADER: sha256,
            "Content-Type": "application/octet-stream",
            # Known up front: the control plane can refuse an output over its cap at once.
            "Content-Length": str(size),
        }

        async def once() -> httpx.Response:
            return await self._http().put(url, content=file_chunks(path), headers=headers)

        response = await self._retrying(f"PUT {url}", once, job_id=job_id)
        data = response.json()
        return UploadedOutput(
            name=str(data.get("name") or name),
            sha256=str(data.get("sha256") or sha256),
            size=int(data.get("size") if data.get("size") is not None else size),
        )

    async def finish(
        self,
        job_id: str,
        lease_id: str,
        outcome: JobOutcome,
        outputs: Sequence[JobOutput] | None = None,
        *,
        attempts: int = 8,
    ) -> str:
        """``POST /agent/jobs/{job}/finish`` (FINISH); the state the job ended in.

        ``outputs`` are the ones uploaded under this lease (default: the outcome's).
        A retried FINISH answered ``ended`` was the first try's, delivered: the job's end
        as reported is returned then.
        """
        body = _outcome_body(lease_id, outcome, outcome.outputs if outputs is None else outputs)
        try:
            data = await self._post(f"{_job_path(job_id)}/finish", body, job_id, attempts)
        except LeaseLost as lost:
            if lost.after_retry and lost.code == "ended":
                return outcome.status
            raise
        return str(data.get("state") or outcome.status)

    # -- plumbing

    async def _post(
        self, path: str, body: Mapping[str, Any], job_id: str, attempts: int | None = None
    ) -> dict[str, Any]:
        async def once() -> httpx.Response:
            return await self._http().post(path, json=body)

        response = await self._retrying(f"POST {path}", once, job_id=job_id, attempts=attempts)
        data = response.json()
        return data if isinstance(data, dict) else {}

    async def _retrying(
        self,
        what: str,
        once: Callable[[], Awaitable[httpx.Response]],
        *,
        job_id: str | None,
        attempts: int | None = None,
    ) -> httpx.Response:
        attempts = attempts or self.attempts
        delay, retried = _RETRY_FIRST_S, False
        for attempt in range(1, attempts + 1):
            try:
                response = await once()
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if not _retryable_status(response.status_code):
                    self._raise_for(response, what, job_id, retried)
                    return response
                problem = f"HTTP {response.status_code}: {_detail_and_code(response)[0]}"
            if attempt == attempts:
                raise ControlPlaneUnavailable(
                    f"the control plane at {self.base_url} did not answer {what} after "
                    f"{attempts} attempts: {problem}"
                )
            retried = True
            log.debug("%s failed, trying again in %.2f s: %s", what, delay, problem)
            await self.clock.sleep(delay)
            delay = min(delay * 2, _RETRY_CAP_S)
        raise AssertionError("unreachable")

    def _raise_for(
        self, response: httpx.Response, what: str, job_id: str | None, retried: bool
    ) -> None:
        status = response.status_code
        if status < 400:
            return
        detail, code = _detail_and_code(response)
        if status == 401:
            raise AgentAuthError(
                f"the control plane refused this instance's token ({detail}); "
                "the instance is being destroyed, or COMFYFLEET_TOKEN is not its token"
            )
        if job_id is not None and status == 409:
            raise LeaseLost(job_id, code or "stale_lease", detail, after_retry=retried)
        if job_id is not None and status == 404 and code not in _MISSING_INPUT_CODES:
            raise LeaseLost(job_id, code or "unknown", detail, after_retry=retried)
        raise JobCallRefused(f"the control plane refused {what}: HTTP {status}: {detail}", status)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _job_path(job_id: str) -> str:
    return f"agent/jobs/{quote(job_id, safe='')}"


def _hash_and_write(digest: Any, handle: BinaryIO, chunk: bytes) -> None:
    digest.update(chunk)
    handle.write(chunk)


# --------------------------------------------------------------------------- the sink


class HttpJobSink:
    """``agent.jobs.JobSink`` over ``JobsClient``, for one job under one lease.

    Keeps the outputs uploaded (as the control plane named them) for FINISH. A
    ``cancel_requested`` answer sets ``cancel``. Once the control plane has refused the
    lease (``LeaseLost``) or the token, ``lost`` holds the refusal, ``lost_event`` is
    set, and every later call raises it without sending anything.
    """

    def __init__(self, client: JobsClient, cancel: asyncio.Event) -> None:
        self.client = client
        self.cancel = cancel
        self.uploaded: list[JobOutput] = []
        self.lost: ComfyfleetError | None = None
        self.lost_event = asyncio.Event()
        self.cancel_requested = False
        #: The state FINISH ended the job in, once it was accepted.
        self.ended_as: str | None = None

    def note(self, status: LeaseStatus) -> None:
        """Take in an answer about the lease: a requested cancel sets ``cancel``."""
        if status.cancel_requested and not self.cancel_requested:
            self.cancel_requested = True
            self.cancel.set()

    def lose(self, error: ComfyfleetError) -> None:
        if self.lost is None:
            self.lost = error
            self.lost_event.set()

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (LeaseLost, AgentAuthError) as error:
            self.lose(error)
            raise

    def _check(self) -> None:
        if self.lost is not None:
            raise self.lost

    async def progress(self, job_id: str, lease_id: str, event: JobProgress) -> None:
        self._check()
        self.note(await self._call(self.client.progress(job_id, lease_id, event)))

    async def output(self, job_id: str, lease_id: str, output: JobOutput, path: Path) -> None:
        self._check()
        receipt = await self._call(
            self.client.upload_output(
                job_id, lease_id, output.name, path, output.sha256, output.size
            )
        )
        self.uploaded.append(dataclasses.replace(output, name=receipt.name))

    async def finished(self, job_id: str, lease_id: str, result: JobOutcome) -> None:
        self._check()
        self.ended_as = await self._call(
            self.client.finish(job_id, lease_id, result, self.uploaded)
        )


# --------------------------------------------------------------------------- the worker


class _Stopped(Exception):
    pass


class JobWorker:
    """Runs the control plane's jobs on the ComfyUI behind ``comfy``; see the module.

    ``workdir`` holds each job's inputs and temporary files while it runs (what a crash
    left there is removed at start). ``reporter`` gets one line per job start and end.
    ``stop_grace_s`` bounds how long ``run`` waits, once ``stop`` is set, for running
    jobs to be interrupted and reported ``cancelled``; past it they are abandoned
    (ComfyUI still interrupted) to the lease. ``onstart_attempts`` is how many times the
    OnStart job is asked for before giving up (the instance's ``ready`` may not have
    reached the control plane yet when the first ``next`` does).
    """

    def __init__(
        self,
        client: JobsClient,
        comfy: ComfyClient,
        *,
        slots: int = 1,
        workdir: Path,
        reporter: Reporter | None = None,
        onstart_job_id: str | None = None,
        poll_wait_s: float = DEFAULT_POLL_WAIT_S,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        onstart_attempts: int = 12,
        clock: Clock | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        self.client = client
        self.comfy = comfy
        self.slots = slots
        self.workdir = workdir
        self.reporter = reporter
        self.onstart_job_id = onstart_job_id
        self.poll_wait_s = poll_wait_s
        self.stop_grace_s = stop_grace_s
        self.onstart_attempts = onstart_attempts
        self.clock: Clock = clock or comfy.clock
        #: The latest jobs run to a report the control plane accepted, by the state they
        #: ended in (the last ``_KEEP``: an agent may run for months).
        self.ended: dict[str, str] = {}
        #: The latest jobs given up because the control plane took them back.
        self.abandoned: deque[str] = deque(maxlen=_KEEP)

    async def run(self, stop: asyncio.Event) -> None:
        """Take and run jobs until ``stop`` is set (or, OnStart, the one job has ended).

        Raises ``AgentAuthError`` when the control plane refuses the token (the instance
        is being destroyed): the running jobs are abandoned first.
        """
        await asyncio.to_thread(_empty_folder, self.workdir)
        with contextlib.suppress(ComfyError):
            # Opens the connection the first prompt is posted on, off the dispatch path.
            await self.comfy.system_stats()
        if self.onstart_job_id is not None:
            await self._run_onstart(self.onstart_job_id, stop)
            return
        loops = [
            asyncio.create_task(self._slot(stop), name=f"comfyfleet-jobs-{n}")
            for n in range(self.slots)
        ]
        try:
            await asyncio.gather(*loops)
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.wait(loops)

    # -- polling

    async def _slot(self, stop: asyncio.Event) -> None:
        delay = _RETRY_FIRST_S
        while not stop.is_set():
            try:
                job = await _until(self.client.next(self.poll_wait_s), stop)
            except _Stopped:
                return
            except AgentAuthError:
                raise
            except ComfyfleetError as error:
                log.warning("asking the control plane for a job failed: %s", error)
                with contextlib.suppress(_Stopped):
                    await _until(self.clock.sleep(delay), stop)
                delay = min(delay * 2, _POLL_BACKOFF_CAP_S)
                continue
            delay = _RETRY_FIRST_S
            if job is not None:
                await self._run_one(job, stop)

    async def _run_onstart(self, job_id: str, stop: asyncio.Event) -> None:
        delay = _RETRY_FIRST_S
        for attempt in range(1, self.onstart_attempts + 1):
            if stop.is_set():
                return
            try:
                job = await _until(self.client.next(0.0), stop)
            except _Stopped:
                return
            except AgentAuthError:
                raise
            except ComfyfleetError as error:
                log.warning("asking for the OnStart job %s failed: %s", job_id, error)
                job = None
            if job is not None:
                await self._run_one(job, stop)
                if job.job_id == job_id:
                    return
                continue  # placed on this instance all the same: it ran; ask again
            if attempt < self.onstart_attempts:
                with contextlib.suppress(_Stopped):
                    await _until(self.clock.sleep(delay), stop)
                delay = min(delay * 2, _RETRY_CAP_S)
        self._say(
            f"the control plane did not hand out the OnStart job {job_id} after "
            f"{self.onstart_attempts} requests; no other job is taken",
            "warning",
        )

    # -- one job

    async def _run_one(self, job: AgentJob, stop: asyncio.Event) -> None:
        cancel = asyncio.Event()
        if stop.is_set():
            cancel.set()  # handed out as the agent stops: give it back at once
        sink = HttpJobSink(self.client, cancel)
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", job.job_id)[:64]
        folder = self.workdir / f"job-{safe_id}-{job.attempt}-{uuid.uuid4().hex[:6]}"
        inputs = f", {len(job.inputs)} input(s)" if job.inputs else ""
        work = asyncio.create_task(self._prepare_and_run(job, sink, cancel, folder))
        # After the job's first step (it is on its way to ComfyUI by then): a console
        # line can take longer to print than the dispatch itself.
        asyncio.get_running_loop().call_soon(
            self._say, f"job {job.job_id}: started (attempt {job.attempt}{inputs})"
        )
        renewer = asyncio.create_task(self._renew(job, sink))
        try:
            await self._follow(job, work, sink, cancel, stop)
        finally:
            renewer.cancel()
            if not work.done():
                work.cancel()
            await asyncio.wait({renewer, work})
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
        self._ended(job, work, sink)
        if isinstance(sink.lost, AgentAuthError):
            raise sink.lost

    async def _follow(
        self,
        job: AgentJob,
        work: asyncio.Task[JobOutcome | None],
        sink: HttpJobSink,
        cancel: asyncio.Event,
        stop: asyncio.Event,
    ) -> None:
        """Wait for the job's end; cancel it when the lease is lost or the grace after
        ``stop`` has passed."""
        lost = asyncio.create_task(sink.lost_event.wait())
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {work, lost, stopping}, return_when=asyncio.FIRST_COMPLETED
            )
            if work not in done and lost not in done:
                cancel.set()  # stopping: run_job interrupts ComfyUI and reports cancelled
                await asyncio.wait(
                    {work, lost}, timeout=self.stop_grace_s, return_when=asyncio.FIRST_COMPLETED
                )
            if not work.done():
                work.cancel()  # run_job stops the prompt and reports nothing
                await asyncio.wait({work})
        finally:
            lost.cancel()
            stopping.cancel()

    async def _prepare_and_run(
        self, job: AgentJob, sink: HttpJobSink, cancel: asyncio.Event, folder: Path
    ) -> JobOutcome | None:
        """Fetch the inputs, then ``run_job``; None when the control plane took the job
        back meanwhile."""
        try:
            paths = await self._fetch_inputs(job, folder) if not cancel.is_set() else {}
        except (LeaseLost, AgentAuthError) as error:
            sink.lose(error)
            return None
        except ComfyfleetError as error:
            # A transfer that kept failing may go through from another instance; a bad name
            # or an input the control plane no longer has will not.
            retryable = isinstance(error, ControlPlaneUnavailable)
            outcome = JobOutcome(
                status="failed",
                reason=f"could not fetch the job's inputs: {error}",
                error="input",
                retryable=retryable,
                duration_s=max(0.0, time.monotonic() - job.received_at),
            )
            await sink.finished(job.job_id, job.lease_id, outcome)
            return outcome
        spec = JobSpec(
            job_id=job.job_id,
            lease_id=job.lease_id,
            workflow=job.workflow,
            inputs=paths,
            timeout_s=self._time_left(job),
        )
        return await run_job(self.comfy, spec, sink, cancel=cancel, workdir=folder)

    async def _fetch_inputs(self, job: AgentJob, folder: Path) -> dict[str, bytes | Path]:
        if not job.inputs:
            return {}
        into = folder / "inputs"
        await asyncio.to_thread(into.mkdir, parents=True, exist_ok=True)
        paths: dict[str, bytes | Path] = {item.name: into / item.name for item in job.inputs}
        fetches = [
            asyncio.create_task(self.client.fetch_input(job, item.name, into / item.name))
            for item in job.inputs
        ]
        try:
            await asyncio.gather(*fetches)
        finally:
            for fetch in fetches:
                fetch.cancel()
            await asyncio.wait(fetches)
        return paths

    def _time_left(self, job: AgentJob) -> float | None:
        if job.timeout_s is None:
            return None
        spent = time.monotonic() - job.received_at if job.received_at else 0.0
        # Past it already (slow inputs): run_job times it out at once.
        return max(1e-3, job.timeout_s - spent)

    async def _renew(self, job: AgentJob, sink: HttpJobSink) -> None:
        while sink.lost is None:
            await self.clock.sleep(job.renew_every_s)
            try:
                status = await self.client.renew(job.job_id, job.lease_id)
            except (LeaseLost, AgentAuthError) as error:
                sink.lose(error)
                return
            except ComfyfleetError as error:
                # The lease outlives a few missed renewals; the next one may get through.
                log.warning("renewing the lease of job %s failed: %s", job.job_id, error)
                continue
            sink.note(status)

    def _ended(
        self, job: AgentJob, work: asyncio.Task[JobOutcome | None], sink: HttpJobSink
    ) -> None:
        error = None if work.cancelled() else work.exception()
        outcome = None if work.cancelled() or error is not None else work.result()
        lost = sink.lost or (error if isinstance(error, LeaseLost | AgentAuthError) else None)
        if lost is not None:
            self.abandoned.append(job.job_id)
            self._say(
                f"job {job.job_id}: abandoned, the control plane took it back: {lost}", "warning"
            )
        elif outcome is not None and sink.ended_as is not None:
            self.ended[job.job_id] = sink.ended_as
            while len(self.ended) > _KEEP:
                del self.ended[next(iter(self.ended))]
            line = f"job {job.job_id}: {outcome.status} in {outcome.duration_s:.1f} s"
            if outcome.reason:
                line += f": {outcome.reason.splitlines()[0]}"
            if sink.ended_as == "queued":
                line += " (the control plane queued it again)"
            self._say(line, "info" if outcome.status == "succeeded" else "warning")
        elif error is not None:
            self._say(f"job {job.job_id}: not reported: {error}", "error")
        else:
            self._say(
                f"job {job.job_id}: not reported (the agent stopped); its lease runs out",
                "warning",
            )

    def _say(self, line: str, level: Level = "info") -> None:
        log.log(logging.INFO if level == "info" else logging.WARNING, "%s", line)
        if self.reporter is not None:
            self.reporter.log(line, level)


async def _until(call: Awaitable[T], stop: asyncio.Event) -> T:
    """``call``'s result, or ``_Stopped`` (with ``call`` cancelled) once ``stop`` is set.

    An answer that arrives with the stop is still returned: a job handed out is run
    (and, stopping, reported ``cancelled`` at once), never dropped on the floor.
    """
    task = asyncio.ensure_future(call)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _Stopped


def _empty_folder(folder: Path) -> None:
    """Make ``folder`` and remove the job folders an earlier run left in it."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.glob("job-*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)

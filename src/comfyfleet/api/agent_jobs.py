"""The agent's job routes (docs/agent-protocol.md, "Jobs (the agent's side)").

``next`` places a job on the calling instance under a new lease (``scheduler.dispatch``)
or long-polls for one; ``progress`` and ``renew`` extend the lease and say whether a
cancel was requested; ``PUT outputs`` streams a file into the content-addressed output
store, checked against its announced sha256; ``finish`` records the outputs and the
job's end in one transaction; ``inputs`` streams a file the job was submitted with.

Every call carries the instance's token (401 otherwise, as the other agent routes),
and every call about a job its lease: the job's row is locked and the lease checked in
the transaction that does the work. A lease that is no longer the job's answers 409
``{"detail", "code": "stale_lease"}``, a job that has ended 409 ``code: "ended"``, a job
that is not on the token's instance (or none at all) 404. After each change the job's
followers are woken (``job_key``); a job queued again wakes the agents of its profile.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet.api.auth import agent_token, instance_for_token, token_opens
from comfyfleet.api.context import ApiContext, context
from comfyfleet.api.wheel import SHA256_HEADER
from comfyfleet.errors import StoreError, UnknownInstance
from comfyfleet.lifecycle import TOKEN_REVOKED_STATES, JobState
from comfyfleet.outputs import OutputHashMismatch, OutputStoreError, OutputTooLarge
from comfyfleet.scheduler.dispatch import Placement, instance_key, take_next_job
from comfyfleet.scheduler.signals import job_key, profile_key
from comfyfleet.store.instances import get_instance
from comfyfleet.store.jobs import (
    InvalidOutputName,
    JobAlreadyEnded,
    JobConflict,
    OutputNameTaken,
    StaleJobLease,
    UnknownJob,
    complete_job,
    fail_job,
    finish_cancelled,
    held_job,
    record_output,
    report_on_lease,
    safe_output_name,
)
from comfyfleet.store.models import InstanceRow, JobRow
from comfyfleet.store.tokens import hash_token

__all__ = [
    "LEASE_HEADER",
    "FinishAnswer",
    "FinishRequest",
    "JobTicket",
    "LeaseAnswer",
    "NextAnswer",
    "OutputReceipt",
    "ProgressRequest",
    "RenewRequest",
    "router",
]

log = logging.getLogger(__name__)

LEASE_HEADER: Final = "X-Comfyfleet-Lease"
MAX_WAIT_S: Final = 30.0
#: How often a waiting ``next`` reads the queue again without a wake-up: jobs submitted
#: through another replica, an instance that became ready, signals that were missed.
REREAD_S: Final = 1.0
#: The least time between two heartbeats ``next`` writes for an agent.
HEARTBEAT_EVERY_S: Final = 1.0
_MAX_TEXT: Final = 1000


# ------------------------------------------------------------------ refusals


class _Refused(Exception):
    """A refusal this module words itself (an output not uploaded, an unknown input)."""

    def __init__(self, status_code: int, code: str, detail: str):
        self.status_code = status_code
        self.code = code
        self.detail = detail
        super().__init__(detail)


def _refusal(error: Exception) -> JSONResponse | None:
    """The answer to a refusal from the store or the output store; None for anything else."""
    found: tuple[int, str] | None
    if isinstance(error, _Refused):
        found = (error.status_code, error.code)
    elif isinstance(error, StaleJobLease):
        found = (status.HTTP_409_CONFLICT, "stale_lease")
    elif isinstance(error, JobAlreadyEnded):
        found = (status.HTTP_409_CONFLICT, "ended")
    elif isinstance(error, UnknownJob):
        found = (status.HTTP_404_NOT_FOUND, "unknown_job")
    elif isinstance(error, OutputNameTaken):
        found = (status.HTTP_422_UNPROCESSABLE_CONTENT, "output_name_taken")
    elif isinstance(error, JobConflict):
        found = (status.HTTP_409_CONFLICT, "conflict")
    elif isinstance(error, InvalidOutputName):
        found = (status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_name")
    elif isinstance(error, OutputTooLarge):
        found = (status.HTTP_413_CONTENT_TOO_LARGE, "too_large")
    elif isinstance(error, OutputHashMismatch):
        found = (status.HTTP_422_UNPROCESSABLE_CONTENT, "sha256_mismatch")
    elif isinstance(error, OutputStoreError) or type(error) is StoreError:
        # The store refuses a bad value (an output's kind, sha256, size) with a plain
        # StoreError; its subclasses (unavailable, an illegal move) are faults, not the agent's.
        found = (status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid")
    else:
        found = None
    if found is None:
        return None
    return JSONResponse({"detail": str(error), "code": found[1]}, status_code=found[0])


class _JobRoute(APIRoute):
    """A route whose store refusals answer ``{"detail", "code"}`` at the top level, as the
    protocol has them (an ``HTTPException`` would nest them under ``detail``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def refusing(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                answer = _refusal(error)
                if answer is None:
                    raise
                return answer

        return refusing


router = APIRouter(prefix="/api/agent/jobs", tags=["agent"], route_class=_JobRoute)


# FastAPI runs a plain ``def`` dependency on a worker thread: these two run on the loop,
# which spares every call two thread hops (the calls are on the path of each job).
async def _context(request: Request) -> ApiContext:
    return context(request)


async def _agent_token(request: Request) -> str:
    return agent_token(request)


Ctx = Annotated[ApiContext, Depends(_context)]
Token = Annotated[str, Depends(_agent_token)]
Lease = Annotated[str, Header(alias=LEASE_HEADER, min_length=1, max_length=64)]


# ------------------------------------------------------------------ who calls


def _token_fits(row: InstanceRow, token: str) -> bool:
    stored = row.agent_token_hash
    if stored is None or row.state in TOKEN_REVOKED_STATES:
        return False
    return hmac.compare_digest(stored.encode(), hash_token(token).encode())


def _opened_instance(session: Session, instance_id: int, token: str) -> InstanceRow:
    """Instance ``instance_id``, locked, if ``token`` is its live token; else the 401 of
    the other agent routes. One query where ``token_opens`` and a lock would take two."""
    try:
        row = get_instance(session, instance_id, lock=True)
    except UnknownInstance:
        pass
    else:
        if _token_fits(row, token):
            return row
    token_opens(session, instance_id, token)  # refuses it, with the routes' one wording
    return get_instance(session, instance_id, lock=True)


def _token_instance(session: Session, token: str) -> int:
    """The live instance whose token ``token`` is, in one query; else the 401 of
    ``instance_for_token`` (which also words it)."""
    found = session.execute(
        select(InstanceRow.id).where(
            InstanceRow.agent_token_hash == hash_token(token),
            InstanceRow.state.not_in(sorted(TOKEN_REVOKED_STATES)),
        )
    ).scalar_one_or_none()
    return int(found) if found is not None else instance_for_token(session, token)


def _on_instance(session: Session, job_id: str, lease_id: str, token: str) -> JobRow:
    """The job, locked, held under ``lease_id`` by the token's instance (401, 409, 404)."""
    instance_id = _token_instance(session, token)
    job = held_job(session, job_id, lease_id)
    if job.instance_id != instance_id:
        raise UnknownJob(job_id)
    return job


# ------------------------------------------------------------------ bodies


class _AgentBody(BaseModel):
    # A newer agent may send more than this control plane knows.
    model_config = ConfigDict(extra="ignore")


def _cut(value: str | None) -> str | None:
    if value is None or len(value) <= _MAX_TEXT:
        return value
    return value[: _MAX_TEXT - 1] + "…"


class JobInputRef(BaseModel):
    name: str
    sha256: str
    size: int | None = None


class JobTicket(BaseModel):
    """JOB: a job placed on the instance under ``lease_id``."""

    job_id: str
    lease_id: str
    attempt: int
    lease_ttl_s: float
    renew_every_s: float
    timeout_s: float | None
    workflow: dict[str, Any]
    inputs: list[JobInputRef]


class NextAnswer(BaseModel):
    job: JobTicket | None


class JobProgressBody(_AgentBody):
    """PROGRESS: ``agent.jobs.JobProgress`` as JSON; long texts are cut, not refused."""

    state: str | None = Field(default=None, max_length=32)
    percent: float = 0.0
    queue_position: int | None = None
    node_id: str | None = None
    node_type: str | None = None
    node_title: str | None = None
    value: float | None = None
    max: float | None = None
    prompt_id: str | None = Field(default=None, max_length=64)

    @field_validator("node_id", "node_type", "node_title")
    @classmethod
    def _short(cls, value: str | None) -> str | None:
        return _cut(value)


class ProgressRequest(_AgentBody):
    lease_id: str = Field(min_length=1, max_length=64)
    progress: JobProgressBody


class RenewRequest(_AgentBody):
    lease_id: str = Field(min_length=1, max_length=64)


class LeaseAnswer(BaseModel):
    cancel_requested: bool
    lease_expires_at: float | None


class OutputReceipt(BaseModel):
    name: str
    sha256: str
    size: int


class FinishOutput(_AgentBody):
    name: str = Field(min_length=1, max_length=1024)
    kind: str = Field(default="file", max_length=32)
    node_id: str | None = None
    sha256: str = Field(min_length=64, max_length=64)
    size: int = Field(ge=0)
    content_type: str | None = None
    temporary: bool = False

    @field_validator("node_id", "content_type")
    @classmethod
    def _short(cls, value: str | None) -> str | None:
        return _cut(value)


class FinishRequest(_AgentBody):
    """FINISH: how the job ended (``agent.jobs.JobOutcome``) and its uploaded outputs.

    Its texts are cut, never refused: a refused FINISH would lose the job's end.
    """

    lease_id: str = Field(min_length=1, max_length=64)
    status: Literal["succeeded", "failed", "cancelled", "timed_out"]
    reason: str | None = None
    error: str | None = None
    retryable: bool = False
    prompt_id: str | None = None
    node_id: str | None = None
    node_type: str | None = None
    duration_s: float | None = None
    outputs: list[FinishOutput] = Field(default_factory=list, max_length=10_000)

    @field_validator("reason", "error", "prompt_id", "node_id", "node_type")
    @classmethod
    def _short(cls, value: str | None) -> str | None:
        return _cut(value)


class FinishAnswer(BaseModel):
    job_id: str
    #: The job's state after the report: ``queued`` when it will be tried again.
    state: str


# ------------------------------------------------------------------ next


def _ticket(placement: Placement, lease_ttl_s: float) -> JobTicket:
    return JobTicket(
        job_id=placement.job_id,
        lease_id=placement.lease_id,
        attempt=placement.attempt,
        lease_ttl_s=lease_ttl_s,
        renew_every_s=lease_ttl_s / 3,
        timeout_s=placement.timeout_s,
        workflow=placement.workflow,
        inputs=[JobInputRef.model_validate(item) for item in placement.inputs],
    )


@router.get("/next", response_model=NextAnswer)
async def next_job(
    request: Request,
    ctx: Ctx,
    token: Token,
    instance_id: int,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0,
) -> NextAnswer:
    """Place the next job on the instance under a new lease; with none for it, wait up to
    ``wait`` seconds: a submit (or a free slot) wakes the call at once, and the queue is
    read again every second."""
    deadline = time.monotonic() + wait
    ttl = ctx.settings.job_lease_ttl_s
    cap = ctx.settings.max_jobs_per_instance
    first = True
    while True:
        now = ctx.clock.now()

        def work(
            session: Session, now: float = now, first: bool = first
        ) -> tuple[str, Placement | None]:
            row = _opened_instance(session, instance_id, token)
            # The agent's call is a sign of life (a re-read is not); written at most once
            # a second, so that a busy agent's calls do not each cost an update.
            seen = row.last_heartbeat_at
            if first and (seen is None or now - seen >= HEARTBEAT_EVERY_S):
                row.last_heartbeat_at = now
            placed = take_next_job(session, row, now, lease_ttl_s=ttl, max_jobs_per_instance=cap)
            return row.profile, placed

        profile, placement = await ctx.store.run(work, share_commit=True)
        first = False
        if placement is not None:
            ctx.signals.notify(job_key(placement.job_id))
            return NextAnswer(job=_ticket(placement, ttl))
        left = deadline - time.monotonic()
        if left <= 0:
            return NextAnswer(job=None)
        await ctx.signals.wait(
            [profile_key(profile), instance_key(instance_id)], min(REREAD_S, left)
        )
        # A job placed for an agent that has gone would sit out its lease: do not place it.
        if await request.is_disconnected():
            return NextAnswer(job=None)


# ------------------------------------------------------------------ the job's inputs


@router.get("/{job_id}/inputs/{name:path}", response_class=StreamingResponse)
async def job_input(
    job_id: str, name: str, ctx: Ctx, token: Token, lease: Lease
) -> StreamingResponse:
    """The input ``name`` of the job, streamed; its sha256 in ``X-Comfyfleet-Sha256``."""

    def work(session: Session) -> str:
        job = _on_instance(session, job_id, lease, token)
        for item in job.request.get("inputs") or []:
            if isinstance(item, dict) and item.get("name") == name and item.get("sha256"):
                return str(item["sha256"]).lower()
        raise _Refused(404, "unknown_input", f"job {job_id} has no input named {name!r}")

    sha256 = await ctx.store.run(work, share_commit=True)
    try:
        size = await asyncio.to_thread(lambda: ctx.outputs.path(sha256).stat().st_size)
    except FileNotFoundError:
        log.error("input %r of job %s (sha256 %s) is not in the output store", name, job_id, sha256)
        raise _Refused(
            404, "input_missing", f"input {name!r} of job {job_id} is not stored any more"
        ) from None
    return StreamingResponse(
        ctx.outputs.iter_bytes(sha256),
        media_type="application/octet-stream",
        headers={SHA256_HEADER: sha256, "Content-Length": str(size)},
    )


# ------------------------------------------------------------------ progress and renewals


async def _report(
    ctx: ApiContext, job_id: str, lease_id: str, token: str, progress: dict[str, Any] | None
) -> LeaseAnswer:
    now = ctx.clock.now()
    ttl = ctx.settings.job_lease_ttl_s

    def work(session: Session) -> LeaseAnswer:
        instance_id = _token_instance(session, token)
        job = report_on_lease(session, job_id, lease_id, now, lease_ttl_s=ttl, progress=progress)
        # Checked after the change, which the refusal rolls back: the lease check came first,
        # so an agent whose job went elsewhere is told ``stale_lease``.
        if job.instance_id != instance_id:
            raise UnknownJob(job_id)
        return LeaseAnswer(
            cancel_requested=job.cancel_requested_at is not None,
            lease_expires_at=job.lease_expires_at,
        )

    answer = await ctx.store.run(work, share_commit=True)
    if progress is not None:
        ctx.signals.notify(job_key(job_id))
    return answer


@router.post("/{job_id}/progress", response_model=LeaseAnswer)
async def job_progress(job_id: str, body: ProgressRequest, ctx: Ctx, token: Token) -> LeaseAnswer:
    """Keep the agent's progress and extend the lease; a ``prompt_id`` makes the job
    ``running``. ``cancel_requested`` tells the agent to interrupt it."""
    return await _report(ctx, job_id, body.lease_id, token, body.progress.model_dump())


@router.post("/{job_id}/renew", response_model=LeaseAnswer)
async def job_renew(job_id: str, body: RenewRequest, ctx: Ctx, token: Token) -> LeaseAnswer:
    """Extend the lease by ``job_lease_ttl_s`` from now."""
    return await _report(ctx, job_id, body.lease_id, token, None)


# ------------------------------------------------------------------ outputs


@router.put(
    "/{job_id}/outputs/{name:path}",
    status_code=status.HTTP_201_CREATED,
    response_model=OutputReceipt,
)
async def job_output(
    job_id: str,
    name: str,
    request: Request,
    ctx: Ctx,
    token: Token,
    lease: Lease,
    sha256: Annotated[str, Header(alias=SHA256_HEADER, min_length=1, max_length=128)],
) -> OutputReceipt:
    """Stream the body into the output store, hashed as it arrives: kept only when its
    sha256 is the header's (422 otherwise), refused past the size cap (413)."""
    await ctx.store.run(
        lambda session: _on_instance(session, job_id, lease, token), share_commit=True
    )
    base = safe_output_name(name)
    cap = ctx.settings.max_output_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise OutputTooLarge(cap)  # known before a byte is read
    blob = await ctx.outputs.put_stream(request.stream(), expected_sha256=sha256, max_bytes=cap)
    return OutputReceipt(name=base, sha256=blob.sha256, size=blob.size)


# ------------------------------------------------------------------ the end


def _failure(body: FinishRequest) -> str:
    """The job's error as people read it: the agent's code, its reason, the node."""
    text = body.reason or f"the agent reported {body.status.replace('_', ' ')}"
    if body.error and not text.startswith(body.error):
        text = f"{body.error}: {text}"
    if body.node_id:
        text += f" (node {body.node_id}" + (f", {body.node_type})" if body.node_type else ")")
    return text


async def _missing_outputs(ctx: ApiContext, outputs: list[FinishOutput]) -> list[str]:
    """The outputs FINISH names that the output store does not hold at their size."""

    def check() -> list[str]:
        missing = []
        for output in outputs:
            try:
                stored = ctx.outputs.path(output.sha256).stat().st_size
            except (FileNotFoundError, OutputStoreError):
                stored = None
            if stored != output.size:
                missing.append(output.name)
        return missing

    return await asyncio.to_thread(check) if outputs else []


def _succeed(session: Session, job_id: str, body: FinishRequest, now: float) -> JobRow:
    """Record the outputs FINISH names, then the job's success with its result."""
    outputs = []
    for output in body.outputs:
        row = record_output(
            session,
            job_id,
            body.lease_id,
            output.name,
            output.sha256,
            output.size,
            output.kind,
            now=now,
            content_type=output.content_type,
        )
        outputs.append(
            {
                "name": row.name,
                "kind": row.kind,
                "node_id": output.node_id,
                "sha256": row.sha256,
                "size": row.size,
                "content_type": row.content_type,
                "temporary": output.temporary,
            }
        )
    result = {"prompt_id": body.prompt_id, "duration_s": body.duration_s, "outputs": outputs}
    return complete_job(session, job_id, body.lease_id, result, now)


@router.post("/{job_id}/finish", response_model=FinishAnswer)
async def job_finish(job_id: str, body: FinishRequest, ctx: Ctx, token: Token) -> FinishAnswer:
    """Record how the job ended, with its outputs, in one transaction."""
    now = ctx.clock.now()
    lease = body.lease_id
    # Read before the transaction, told only once the token and the lease are checked.
    missing = await _missing_outputs(ctx, body.outputs) if body.status == "succeeded" else []

    def work(session: Session) -> tuple[JobRow, int | None]:
        if body.status == "succeeded" and not missing:
            # The hot path: the lease is checked as the outputs are recorded and the job
            # completed; whose instance it is on, after (the refusal rolls it all back).
            caller = _token_instance(session, token)
            job = _succeed(session, job_id, body, now)
            if job.instance_id != caller:
                raise UnknownJob(job_id)
            return job, caller
        job = _on_instance(session, job_id, lease, token)
        instance_id = job.instance_id  # before a retry takes the job off it
        if body.status == "succeeded":
            raise _Refused(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "output_missing",
                f"outputs not uploaded under this lease: {', '.join(missing[:20])}; "
                "PUT each one before FINISH",
            )
        if body.status == "cancelled" and job.cancel_requested_at is not None:
            job = finish_cancelled(session, job_id, lease, now)
        elif body.status == "cancelled":
            # Cancelled without a request: the agent is stopping, not the job failing.
            job = fail_job(
                session, job_id, lease, _failure(body) + " (the agent stopped)", now, retry=True
            )
        elif body.status == "timed_out":
            job = fail_job(session, job_id, lease, "timed out: " + _failure(body), now)
        else:
            job = fail_job(session, job_id, lease, _failure(body), now, retry=body.retryable)
        return job, instance_id

    job, instance_id = await ctx.store.run(work, share_commit=True)
    ctx.signals.notify(job_key(job_id))
    if instance_id is not None:
        ctx.signals.notify(instance_key(instance_id))  # a slot is free on it
    if job.state is JobState.QUEUED:
        ctx.signals.notify(profile_key(job.profile))
    return FinishAnswer(job_id=job_id, state=job.state.value)

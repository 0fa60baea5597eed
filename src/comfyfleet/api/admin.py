"""The admin API: the pool's status, prewarm, reprovision, terminate, OnStart rentals, and
an instance's events and provision log.

Every route needs the admin key (``api/auth.py``). The actions go to the
``PoolControl`` the app was made with (``api/control.py``); without one they
answer 503. The views never show a secret: the store holds none in clear, and the
reasons and messages in it are scrubbed when written.

An OnStart rental (``POST /api/admin/pool/onstart``) takes its job as ``POST /api/jobs``
takes one in JSON, and checks and parameterizes it with the jobs API's own code
(``api/jobs.py``), so that it runs as a submitted job would; the pool then records the
instance and the job together (``PoolControl.rent_for_job``).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet.api.auth import check_admin_key
from comfyfleet.api.context import ApiContext, context
from comfyfleet.api.control import OnStartJob, PoolActionError, PoolControl
from comfyfleet.api.jobs import (
    MAX_INPUTS,
    SubmitParams,
    _decode_base64,
    _input_name,
    _prepare,
    _Submission,
)
from comfyfleet.api.models import (
    EventsPage,
    InstanceView,
    OnStartAnswer,
    OnStartJobBody,
    OnStartRequest,
    PoolView,
    PrewarmRequest,
    ReprovisionRequest,
    TerminateRequest,
)
from comfyfleet.errors import UnknownInstance
from comfyfleet.lifecycle import LIVE_STATES, TERMINAL_STATES, InstanceState
from comfyfleet.outputs import OutputTooLarge
from comfyfleet.store.instances import get_instance, live_instances
from comfyfleet.store.models import InstanceRow
from comfyfleet.workflow import WorkflowError

__all__ = ["ADMIN_ACTOR", "instance_view", "router"]

ADMIN_ACTOR = "admin"


def require_admin(request: Request) -> None:
    check_admin_key(request, context(request).settings.admin_api_key)


router = APIRouter(prefix="/api", tags=["admin"], dependencies=[Depends(require_admin)])

Ctx = Annotated[ApiContext, Depends(context)]


def instance_view(row: InstanceRow, now: float) -> InstanceView:
    """What the admin API shows of an instance."""
    end = row.ended_at if row.ended_at is not None else now
    estimated = row.cost_so_far <= 0 and row.dph_total is not None
    cost = (row.dph_total or 0.0) * max(0.0, end - row.created_at) / 3600 if estimated else 0.0
    heartbeat = row.last_heartbeat_at
    return InstanceView(
        id=row.id,
        label=row.label,
        profile=row.profile,
        slot=row.slot,
        state=row.state.value,
        provider=row.provider,
        provider_contract_id=row.provider_contract_id,
        machine_id=row.machine_id,
        gpu_name=row.gpu_name,
        dph_total=row.dph_total,
        actual_status=row.actual_status,
        status_msg=row.status_msg,
        public_ip=row.public_ip,
        ports=row.ports,
        ssh_host=row.ssh_host,
        ssh_port=row.ssh_port,
        cost_so_far=round(cost if estimated else row.cost_so_far, 6),
        cost_estimated=estimated,
        failure_reason=row.failure_reason,
        progress=row.progress,
        registered_at=row.registered_at,
        last_heartbeat_at=heartbeat,
        heartbeat_age_s=None if heartbeat is None else max(0.0, now - heartbeat),
        stage_entered_at=row.stage_entered_at,
        created_at=row.created_at,
        ready_at=row.ready_at,
        ended_at=row.ended_at,
    )


@router.get("/admin/pool")
async def pool_status(
    ctx: Ctx,
    include_ended: Annotated[
        bool, Query(description="Also list destroyed and failed instances (the newest 200).")
    ] = False,
) -> PoolView:
    """Every live instance (``requested`` through ``destroying``), oldest first."""
    now = ctx.clock.now()

    def read(session: Session) -> list[InstanceView]:
        rows = live_instances(session)
        if include_ended:
            ended = session.execute(
                select(InstanceRow)
                .where(InstanceRow.state.in_(sorted(TERMINAL_STATES)))
                .order_by(InstanceRow.id.desc())
                .limit(200)
            ).scalars()
            rows = sorted([*rows, *ended], key=lambda row: row.id)
        return [instance_view(row, now) for row in rows]

    views = await ctx.store.run(read)
    burn = sum(v.dph_total or 0.0 for v in views if v.state in {s.value for s in LIVE_STATES})
    return PoolView(
        at=now,
        pool_control=ctx.pool is not None,
        burn_dollars_per_hour=round(burn, 6),
        instances=views,
    )


def _pool(ctx: ApiContext) -> PoolControl:
    if ctx.pool is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="no pool runs in this control plane: start `comfyfleet serve` with the pool "
            "(a fleet file with profiles) to prewarm, reprovision or terminate",
        )
    return ctx.pool


def _refused(error: PoolActionError | UnknownInstance) -> HTTPException:
    code = status.HTTP_404_NOT_FOUND if isinstance(error, UnknownInstance) else error.status
    return HTTPException(code, detail=str(error))


@router.post("/admin/pool/prewarm")
async def prewarm(body: PrewarmRequest, ctx: Ctx) -> dict[str, Any]:
    """Rent ``count`` more instances of ``profile`` now; answers the ids recorded."""
    pool = _pool(ctx)
    try:
        ids = await pool.prewarm(body.profile, body.count, actor=ADMIN_ACTOR)
    except PoolActionError as error:
        raise _refused(error) from None
    return {"profile": body.profile, "requested": body.count, "instance_ids": ids}


@router.post("/admin/pool/reprovision")
async def reprovision(body: ReprovisionRequest, ctx: Ctx) -> dict[str, Any]:
    """Replace one instance, or every live instance of a profile, with fresh ones."""
    pool = _pool(ctx)
    try:
        ids = await pool.reprovision(
            instance_id=body.instance_id, profile=body.profile, actor=ADMIN_ACTOR
        )
    except (PoolActionError, UnknownInstance) as error:
        raise _refused(error) from None
    return {"instance_ids": ids}


@router.post("/admin/pool/onstart", status_code=status.HTTP_201_CREATED)
async def onstart(body: OnStartRequest, ctx: Ctx) -> OnStartAnswer:
    """Rent one instance of ``profile`` for ``job`` (OnStart): the job is reserved to it,
    and the pool destroys it once the job has ended. Follow the instance
    (``/api/instances/{id}/events``), then the job (``/api/jobs/{id}``)."""
    pool = _pool(ctx)
    request = await _onstart_request(body.job, ctx)
    try:
        rental = await pool.rent_for_job(
            body.profile, OnStartJob(request, timeout_s=body.job.timeout_s), actor=ADMIN_ACTOR
        )
    except PoolActionError as error:
        raise _refused(error) from None
    return OnStartAnswer(profile=body.profile, instance_id=rental.instance_id, job_id=rental.job_id)


async def _onstart_request(job: OnStartJobBody, ctx: ApiContext) -> dict[str, Any]:
    """The job's request as ``POST /api/jobs`` makes it: inputs stored, then the workflow
    checked and its parameters applied by the jobs API's own code (422 with the reason)."""
    params = SubmitParams(
        prompt=job.prompt,
        images=None if job.images is None else [image.model_dump() for image in job.images],
        overrides=job.overrides,
        randomize_seeds=job.randomize_seeds,
        timeout_s=job.timeout_s,
        max_attempts=1,
    )
    submission = _Submission(workflow=job.workflow, params=params)
    if len(job.inputs) > MAX_INPUTS:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"a job takes at most {MAX_INPUTS} inputs"
        )
    for given, text in job.inputs.items():
        name = _input_name(given)
        data = _decode_base64(given, text)
        try:
            blob = await ctx.outputs.put_stream(
                io.BytesIO(data), max_bytes=ctx.settings.max_output_bytes
            )
        except OutputTooLarge as error:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=str(error)) from None
        submission.add_input(name, blob.sha256, blob.size)
    try:
        return await asyncio.to_thread(_prepare, submission)
    except WorkflowError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(error)) from None


@router.post("/admin/instances/{instance_id}/terminate")
async def terminate(
    instance_id: int,
    ctx: Ctx,
    body: Annotated[TerminateRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Destroy an instance; answers its state once the pool has taken the order."""
    pool = _pool(ctx)
    reason = (body or TerminateRequest()).reason
    try:
        await pool.terminate(instance_id, reason=reason, actor=ADMIN_ACTOR)
        state = await ctx.store.run(lambda session: get_instance(session, instance_id).state)
    except (PoolActionError, UnknownInstance) as error:
        raise _refused(error) from None
    return {"instance_id": instance_id, "state": state.value}


#: The longest a reader may ask ``GET /instances/{id}/events`` to hold its answer.
MAX_EVENTS_WAIT_S = 30.0
#: How often a held request re-reads the instance's row: the reconciler moves it without
#: an agent event (to destroying, to failed), and the reader must hear of that too.
EVENTS_STATE_POLL_S = 0.5


@router.get("/instances/{instance_id}/events")
async def instance_events(
    instance_id: int,
    ctx: Ctx,
    after: Annotated[int, Query(ge=0, description="The last sequence number already seen.")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_EVENTS_WAIT_S,
            description="Long-poll: with no event after ``after`` yet, hold the answer up to "
            "this many seconds for the next event or a change of the instance's state.",
        ),
    ] = 0.0,
    state: Annotated[
        InstanceState | None,
        Query(
            description="With ``wait``: the state the reader last saw; an instance no longer "
            "in it is answered at once."
        ),
    ] = None,
) -> EventsPage:
    """The instance's state and the stage, progress and log events after ``after``.

    With ``wait``, an instance that has nothing new and has not ended (and is still in
    ``state``, when given) is answered as soon as its agent reports again or its state
    changes, else after ``wait`` seconds.
    An ``after`` beyond the newest sequence number (the control plane restarted and
    numbers began again) is answered at once, with the events there are.
    """
    row = await _state_of(ctx, instance_id)
    newest = ctx.events.last_seq(instance_id)
    if after > newest:
        after = 0  # a cursor from before a restart: the numbers began again
    elif (
        wait > 0
        and after == newest
        and row[0] not in TERMINAL_STATES
        and (state is None or state is row[0])
    ):
        await _hold(ctx, instance_id, after, wait, row)
    events, last, missed = ctx.events.since(instance_id, after, limit=limit)
    # Read after the events: the store commits a stage before the buffer gets its event,
    # so the state is never older than the events answered with it.
    found = await ctx.store.run(lambda session: get_instance(session, instance_id))
    log_file = await asyncio.to_thread(ctx.logs.existing_path, instance_id)
    return EventsPage(
        instance_id=instance_id,
        state=found.state.value,
        failure_reason=found.failure_reason,
        progress=found.progress,
        last=last,
        missed=missed,
        events=[event.as_json() for event in events],
        log_file=None if log_file is None else str(log_file),
    )


@router.get(
    "/instances/{instance_id}/log",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "The provision log."}},
)
async def provision_log(instance_id: int, ctx: Ctx) -> Response:
    """The instance's provision log as text: every stage and log line its agent reported
    (progress thinned), as kept on the control plane's machine (``log_file`` of the
    events); 404 until the agent has reported something."""
    await _state_of(ctx, instance_id)
    path = await asyncio.to_thread(ctx.logs.existing_path, instance_id)
    # Read whole, not streamed: the file may grow while it is sent (the agent reports on).
    content = None if path is None else await asyncio.to_thread(_read_or_none, path)
    if path is None or content is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"instance {instance_id} has no provision log yet: its agent has reported "
            "nothing to this control plane",
        )
    return Response(
        content,
        media_type="text/plain; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{path.name}"'},
    )


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


_RowState = tuple[InstanceState, str | None]


async def _state_of(ctx: ApiContext, instance_id: int) -> _RowState:
    def read(session: Session) -> _RowState:
        row = get_instance(session, instance_id)
        return row.state, row.failure_reason

    try:
        return await ctx.store.run(read)
    except UnknownInstance as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(error)) from None


async def _hold(
    ctx: ApiContext, instance_id: int, after: int, wait: float, seen: _RowState
) -> None:
    """Return at the instance's next event, a change of its row, or after ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (remaining := deadline - loop.time()) > 0:
        if await ctx.events.wait(instance_id, after, min(EVENTS_STATE_POLL_S, remaining)):
            return
        if await _state_of(ctx, instance_id) != seen:
            return

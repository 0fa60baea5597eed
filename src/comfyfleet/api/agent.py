"""The agent's routes (docs/agent-protocol.md): wheel, register, secrets, heartbeat, events.

Every call carries the instance's own token (``Authorization: Bearer``), checked in
the same transaction as the work it allows. The store's row is the truth the
reconciler reads: registration and heartbeats set ``registered_at`` and
``last_heartbeat_at``, a stage event moves the instance along the lifecycle (with
an audit row), the last progress event is kept in ``progress``, and a ``failed``
report sets ``failure_reason`` to the agent's reason code: the failure policy then
fails the instance, and the pool destroys it (the control plane's API never calls
a provider). Every event also goes to the instance's buffer (``monitor``) and to
its provision log file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from comfyfleet.api.auth import agent_token, instance_for_token, token_opens
from comfyfleet.api.context import ApiContext, context
from comfyfleet.api.models import (
    EventBatch,
    HeartbeatRequest,
    ProgressEvent,
    RegisterAnswer,
    RegisterRequest,
    StageEvent,
)
from comfyfleet.api.settings import AgentProfile
from comfyfleet.api.wheel import SHA256_HEADER
from comfyfleet.errors import ComfyfleetError
from comfyfleet.lifecycle import InstanceState, can_transition
from comfyfleet.scheduler.dispatch import instance_key
from comfyfleet.store.instances import get_instance, scrub, transition
from comfyfleet.store.models import InstanceRow

__all__ = ["AGENT_ACTOR", "router"]

log = logging.getLogger(__name__)

AGENT_ACTOR = "agent"

router = APIRouter(prefix="/api/agent", tags=["agent"])

Ctx = Annotated[ApiContext, Depends(context)]
Token = Annotated[str, Depends(agent_token)]


@router.get("/wheel", response_class=FileResponse)
async def wheel(ctx: Ctx, token: Token) -> FileResponse:
    """The agent wheel to install; its sha256 in ``X-Comfyfleet-Sha256``."""
    await ctx.store.run(lambda session: instance_for_token(session, token))
    try:
        found = await ctx.wheel.get()
    except ComfyfleetError as error:
        log.error("the agent wheel is not available: %s", error)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(error)) from None
    return FileResponse(
        found.path,
        media_type="application/octet-stream",
        filename=found.filename,
        headers={SHA256_HEADER: found.sha256},
    )


@router.post("/register")
async def register(body: RegisterRequest, ctx: Ctx, token: Token) -> RegisterAnswer:
    """Record the agent's registration; answer with the manifest and how to run ComfyUI."""
    now = ctx.clock.now()

    def work(session: Session) -> tuple[str, str, str | None]:
        token_opens(session, body.instance_id, token)
        row = get_instance(session, body.instance_id, lock=True)
        if row.registered_at is None:
            row.registered_at = now
        row.last_heartbeat_at = now
        if row.state is InstanceState.CREATING:
            transition(
                session,
                row,
                InstanceState.BOOTING,
                reason=f"the agent registered from {body.hostname or 'its host'}",
                actor=AGENT_ACTOR,
                now=now,
            )
        return row.profile, row.state.value, row.onstart_job_id

    profile, state, onstart_job_id = await ctx.store.run(work)
    line = (
        f"agent {body.agent_version or '?'} registered from {body.hostname or '?'} "
        f"(workspace {body.workspace or '?'}); instance is {state}"
    )
    await _keep(ctx, body.instance_id, [_note(now, line)], now)
    spec = ctx.settings.profiles.get(profile, AgentProfile())
    return RegisterAnswer(
        heartbeat_interval_s=ctx.settings.heartbeat_interval_s,
        manifest=spec.manifest,
        comfy=spec.comfy,
        onstart_job_id=onstart_job_id,
    )


@router.get("/secrets")
async def secrets(ctx: Ctx, token: Token, response: Response) -> dict[str, str]:
    """The source tokens and Dropbox links configured on the control plane; never logged."""
    await ctx.store.run(lambda session: instance_for_token(session, token))
    response.headers["Cache-Control"] = "no-store"
    return ctx.settings.agent_secrets()


@router.post("/heartbeat")
async def heartbeat(body: HeartbeatRequest, ctx: Ctx, token: Token) -> dict[str, bool]:
    now = ctx.clock.now()

    def work(session: Session) -> None:
        token_opens(session, body.instance_id, token)
        row = get_instance(session, body.instance_id, lock=True)
        row.last_heartbeat_at = now

    await ctx.store.run(work, share_commit=True)
    return {"ok": True}


@dataclass
class _Applied:
    profile: str
    created_at: float
    #: Lines that say what the control plane did not do with a report (a stage it ignored).
    notes: list[dict[str, Any]] = field(default_factory=list)
    became_ready: bool = False


@router.post("/events")
async def events(body: EventBatch, ctx: Ctx, token: Token) -> dict[str, int]:
    """Apply a batch: stages move the instance, the last progress is kept, all are recorded."""
    now = ctx.clock.now()
    applied = await ctx.store.run(lambda session: _apply(session, body, token, now))
    kept = [event.model_dump(mode="json") for event in body.events]
    await _keep(ctx, body.instance_id, kept + applied.notes, now)
    for kind in ("stage", "progress", "log"):
        count = sum(1 for event in body.events if event.kind == kind)
        if count:
            ctx.metrics.agent_events(kind, count)
    if applied.became_ready:
        ctx.metrics.time_to_ready(applied.profile, now - applied.created_at)
        # An agent already waiting in ``next`` is handed its first job now, not a second later.
        ctx.signals.notify(instance_key(body.instance_id))
    return {"accepted": len(body.events)}


def _apply(session: Session, batch: EventBatch, token: str, now: float) -> _Applied:
    token_opens(session, batch.instance_id, token)
    row = get_instance(session, batch.instance_id, lock=True)
    row.last_heartbeat_at = now  # every call of the agent is a sign of life
    applied = _Applied(profile=row.profile, created_at=row.created_at)
    last_progress: ProgressEvent | None = None
    for event in batch.events:
        if isinstance(event, ProgressEvent):
            last_progress = event
        elif isinstance(event, StageEvent):
            _apply_stage(session, row, event, now, applied)
    if last_progress is not None:
        _keep_progress(row, last_progress, now)
    return applied


def _apply_stage(
    session: Session, row: InstanceRow, event: StageEvent, now: float, applied: _Applied
) -> None:
    if event.stage == "failed":
        # The pool fails it (the policy's ``agent_failure``) and destroys it: a row with a
        # provider contract reaches ``failed`` only through ``destroying``.
        row.failure_reason = scrub(event.reason or "agent_failed")
        row.updated_at = now
        return
    target = InstanceState(event.stage)
    if row.state is target:
        return  # a batch sent again after a lost answer
    if not can_transition(row.state, target):
        applied.notes.append(
            _note(
                now,
                f"stage {target} not applied: instance {row.id} is {row.state}",
                level="warning",
            )
        )
        return
    reason = f"the agent reported {target}" + (f": {event.reason}" if event.reason else "")
    transition(session, row, target, reason=reason, actor=AGENT_ACTOR, now=now)
    if target is InstanceState.READY:
        applied.became_ready = True


def _keep_progress(row: InstanceRow, event: ProgressEvent, now: float) -> None:
    before = row.progress or {}
    grew = event.done > int(before.get("done") or 0)
    row.progress = {
        "done": event.done,
        "total": event.total,
        "file": event.file,
        "file_done": event.file_done,
        "file_total": event.file_total,
        "bytes_per_s": event.bytes_per_s,
        "at": now,
        "agent_at": event.at,
        # When ``done`` last grew: the failure policy's stalled-download clock.
        "advanced_at": now if grew or "advanced_at" not in before else before["advanced_at"],
    }


def _note(at: float, line: str, *, level: str = "info") -> dict[str, Any]:
    return {"kind": "log", "at": at, "line": f"[control plane] {line}", "level": level}


async def _keep(
    ctx: ApiContext, instance_id: int, events: list[dict[str, Any]], now: float
) -> None:
    if not events:
        return
    ctx.events.append(instance_id, events)
    try:
        await ctx.logs.write(instance_id, events, now)
    except OSError as error:
        # The events are in the store and the buffer: a full disk must not fail the agent.
        log.warning("cannot write the provision log of instance %s: %s", instance_id, error)

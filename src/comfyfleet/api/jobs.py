"""The jobs API, the user's side: submit a workflow, follow it, fetch its outputs, cancel it.

docs/agent-protocol.md, "Jobs (the user's side)", is the contract. Every route takes a
user's API key (``Authorization: Bearer cf_...``, made by ``comfyfleet keys create``),
which sees only the jobs it submitted (another's answer 404, as a job that does not
exist), or the admin key, which sees every job. A key is read from the headers only,
never from the URL, and no answer or log line ever carries one.

A submission is checked whole before anything is queued: the workflow is ComfyUI's API
format, the profile is one the control plane serves, every ``set`` names a node and an
input the workflow has, the webhook URL is https to a public address. The job stored
holds the final workflow (prompt, images, overrides and seeds applied), so the agent
runs exactly what was checked here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet.api.auth import ADMIN_HEADERS, bearer_token, check_admin_key
from comfyfleet.api.context import ApiContext, context
from comfyfleet.api.multipart import MultipartError, MultipartReader, PartTooLarge, boundary_of
from comfyfleet.api.webhooks import WebhookRefused, check_webhook_url
from comfyfleet.errors import StoreError
from comfyfleet.lifecycle import JOB_TERMINAL_STATES, JobState
from comfyfleet.outputs import OutputTooLarge
from comfyfleet.scheduler.signals import job_key, profile_key
from comfyfleet.store.apikeys import KEY_PREFIX, verify_key
from comfyfleet.store.jobs import (
    DEFAULT_MAX_ATTEMPTS,
    InvalidOutputName,
    JobConflict,
    UnknownJob,
    UnknownOutput,
    get_job,
    get_output,
    job_view,
    jobs_for_key,
    request_cancel,
    safe_output_name,
    submit_job,
)
from comfyfleet.store.models import JobRow
from comfyfleet.workflow import (
    LOAD_IMAGE,
    Override,
    Workflow,
    WorkflowError,
    apply_parameters,
    load_api_workflow,
    node_label,
)

__all__ = [
    "EVENTS_POLL_S",
    "KEEPALIVE_S",
    "MAX_INPUTS",
    "MAX_JSON_BODY_BYTES",
    "MAX_WORKFLOW_BYTES",
    "Caller",
    "ImageTarget",
    "JobList",
    "JobView",
    "SubmitParams",
    "caller",
    "router",
]

MAX_WORKFLOW_BYTES: Final = 16 * 1024 * 1024
"""The largest workflow (or params) text accepted: far above any real graph."""
MAX_JSON_BODY_BYTES: Final = 64 * 1024 * 1024
"""A JSON submission carries its inputs inline (base64): large ones go as multipart."""
MAX_INPUTS: Final = 64
#: How often a follower of ``/events`` re-reads the job without a wake-up: another
#: replica's changes send no signal to this one.
EVENTS_POLL_S: Final = 1.0
#: How often an idle event stream sends a comment line, so proxies keep it open.
KEEPALIVE_S: Final = 15.0
# Query parameters a key must never come in: URLs end up in logs and browser histories.
_URL_KEY_PARAMS: Final = ("key", "api_key", "apikey", "token", "access_token")
_KEY_HELP: Final = (
    "send Authorization: Bearer cf_... with a key made by `comfyfleet keys create NAME` "
    "(or the admin key in x-admin-key)"
)
_INT32: Final = 2**31 - 1


# ------------------------------------------------------------------ bodies


class ImageTarget(BaseModel):
    """Which LoadImage node takes which uploaded input."""

    model_config = ConfigDict(extra="forbid")

    node: str | None = Field(
        default=None, description="The node's id, title or class_type; null: the only LoadImage."
    )
    name: str = Field(min_length=1, max_length=255, description="The input's file name.")


class SubmitParams(BaseModel):
    """A job's parameters: the multipart ``params`` field, or the JSON body beside
    ``workflow`` and ``inputs``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    profile: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="The profile to run on; optional when the control plane serves one.",
    )
    prompt: str | None = Field(default=None, description="The positive prompt's text.")
    images: list[ImageTarget] | None = Field(
        default=None,
        description="The LoadImage node each input goes to; with one input and none given, "
        "the workflow's only LoadImage.",
    )
    overrides: list[str] = Field(
        default_factory=list,
        alias="set",
        description='NODE.INPUT=VALUE overrides, e.g. ["3.seed=42", "KSampler.steps=30"].',
    )
    randomize_seeds: bool = Field(
        default=True, description="Draw every seed no override set at random."
    )
    priority: int = Field(default=0, ge=-_INT32, le=_INT32, description="Higher runs first.")
    timeout_s: float | None = Field(default=None, gt=0, description="Per attempt, in seconds.")
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=100)
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2048)
    webhook_secret: str | None = Field(default=None, min_length=16, max_length=128)


class JsonSubmission(SubmitParams):
    """``POST /api/jobs`` as JSON: the workflow, the inputs in base64, and the parameters."""

    workflow: dict[str, Any] | str
    inputs: dict[str, str] = Field(
        default_factory=dict, description="File name to its bytes in base64."
    )


class JobOutputView(BaseModel):
    name: str
    sha256: str
    size: int
    kind: str
    content_type: str


class JobTiming(BaseModel):
    queued_s: float | None
    running_s: float | None


class JobView(BaseModel):
    """A job as its submitter sees it (``store.jobs.job_view``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    profile: str
    state: JobState
    priority: int
    queue_position: int | None
    attempts: int
    max_attempts: int
    timeout_s: float | None
    cancel_requested: bool
    progress: dict[str, Any] | None
    error: str | None
    result: dict[str, Any] | None
    instance_id: int | None
    created_at: float
    placed_at: float | None
    started_at: float | None
    finished_at: float | None
    timing: JobTiming
    cost: float | None
    webhook_url: str | None
    outputs: list[JobOutputView]


class SubmittedJob(JobView):
    #: Present when the control plane made the secret: it is shown this once.
    webhook_secret: str | None = None


class JobList(BaseModel):
    jobs: list[JobView]


# ------------------------------------------------------------------ who is calling


@dataclass(frozen=True)
class Caller:
    """The key behind a call: a user's key (``key_id``), or the admin key (``key_id`` None)."""

    key_id: int | None

    @property
    def is_admin(self) -> bool:
        return self.key_id is None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def _is_admin_key(presented: str, ctx: ApiContext) -> bool:
    expected = ctx.settings.admin_api_key
    if expected is None:
        return False
    # As digests, compared in constant time: not even the key's length leaks.
    return hmac.compare_digest(
        hashlib.sha256(presented.encode("utf-8")).digest(),
        hashlib.sha256(expected.get_secret_value().encode("utf-8")).digest(),
    )


async def caller(request: Request) -> Caller:
    """The caller's key (a FastAPI dependency); 401 saying how to send one otherwise."""
    ctx = context(request)
    if any(name in request.query_params for name in _URL_KEY_PARAMS):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="API keys go in the Authorization header, never in the URL (URLs are "
            f"logged): {_KEY_HELP}. Revoke a key that was sent in a URL "
            "(`comfyfleet keys revoke ID`) and make a new one.",
        )
    if any(request.headers.get(header) for header in ADMIN_HEADERS if header != "authorization"):
        check_admin_key(request, ctx.settings.admin_api_key)
        return Caller(None)
    token = bearer_token(request)
    if token is None:
        raise _unauthorized(f"missing API key: {_KEY_HELP}")
    if token.startswith(KEY_PREFIX):
        now = ctx.clock.now()

        def check(session: Session) -> int | None:
            row = verify_key(session, token, now=now)
            return None if row is None else row.id

        key_id = await ctx.store.run(check, share_commit=True)
        if key_id is not None:
            return Caller(key_id)
    elif _is_admin_key(token, ctx):
        return Caller(None)
    raise _unauthorized(
        "the API key is not valid: it is wrong or was revoked; `comfyfleet keys list` shows "
        f"the keys there are. {_KEY_HELP[0].upper()}{_KEY_HELP[1:]}"
    )


Ctx = Annotated[ApiContext, Depends(context)]
Who = Annotated[Caller, Depends(caller)]

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


def _not_found_or_conflict(error: StoreError) -> HTTPException:
    if isinstance(error, UnknownJob | UnknownOutput):
        return HTTPException(status.HTTP_404_NOT_FOUND, detail=str(error))
    if isinstance(error, JobConflict):
        return HTTPException(status.HTTP_409_CONFLICT, detail=str(error))
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(error))


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


def _readable(error: ValidationError, where: str) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        problems.append(f"{location}: {item['msg']}" if location else item["msg"])
    return f"{where}: " + "; ".join(problems)


# ------------------------------------------------------------------ submitting


@dataclass(frozen=True)
class _Input:
    name: str
    sha256: str
    size: int


@dataclass
class _Submission:
    workflow: Mapping[str, Any] | str | bytes | None = None
    params: SubmitParams = field(default_factory=SubmitParams)
    inputs: list[_Input] = field(default_factory=list)

    def add_input(self, name: str, sha256: str, size: int) -> None:
        if any(existing.name == name for existing in self.inputs):
            raise _unprocessable(
                f"two inputs are named {name!r} (inputs are stored by base name); rename one"
            )
        if len(self.inputs) >= MAX_INPUTS:
            raise _unprocessable(f"a job takes at most {MAX_INPUTS} inputs")
        self.inputs.append(_Input(name, sha256, size))


def _input_name(name: str) -> str:
    try:
        return safe_output_name(name)
    except InvalidOutputName as error:
        raise _unprocessable(f"input file name {name[:100]!r}: {error}") from None


def _too_large(error: OutputTooLarge | PartTooLarge) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=str(error))


async def _read_multipart(request: Request, ctx: ApiContext, content_type: str) -> _Submission:
    submission = _Submission()
    params: bytes | None = None
    try:
        reader = MultipartReader(request.stream(), boundary_of(content_type))
        async for part in reader.parts():
            if part.name == "workflow":
                if submission.workflow is not None:
                    raise _unprocessable("the form has two workflow fields; send one")
                submission.workflow = await part.read(limit=MAX_WORKFLOW_BYTES)
            elif part.name == "params":
                if params is not None:
                    raise _unprocessable("the form has two params fields; send one JSON object")
                params = await part.read(limit=MAX_WORKFLOW_BYTES)
            elif part.name == "input":
                if part.filename is None:
                    raise _unprocessable(
                        "an input must be a file part with a file name (it is stored, and "
                        "uploaded to ComfyUI, under that name)"
                    )
                name = _input_name(part.filename)
                blob = await ctx.outputs.put_stream(
                    part.chunks(), max_bytes=ctx.settings.max_output_bytes
                )
                submission.add_input(name, blob.sha256, blob.size)
            else:
                raise _unprocessable(
                    f"unknown form field {part.name[:64]!r}: the fields are workflow (a file or "
                    "text), input (files, repeatable) and params (JSON text)"
                )
    except PartTooLarge as error:
        raise _too_large(error) from None
    except OutputTooLarge as error:
        raise _too_large(error) from None
    except MultipartError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(error)) from None
    if params is not None:
        try:
            decoded = json.loads(params)
        except (ValueError, UnicodeDecodeError) as error:
            raise _unprocessable(f"params is not JSON: {error}") from None
        if not isinstance(decoded, dict):
            raise _unprocessable('params must be a JSON object, such as {"prompt": "..."}')
        try:
            submission.params = SubmitParams.model_validate(decoded)
        except ValidationError as error:
            raise _unprocessable(_readable(error, "params")) from None
    return submission


async def _read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                detail=f"a JSON submission is at most {limit} bytes; send large inputs as "
                "multipart/form-data (input file parts) instead of base64",
            )
    return bytes(body)


def _decode_base64(name: str, text: str) -> bytes:
    # A data URL (``data:image/png;base64,...``) is accepted as what a browser gives.
    if text.startswith("data:") and ";base64," in text[:200]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _unprocessable(f"inputs[{name[:100]!r}] is not base64") from None


async def _read_json(request: Request, ctx: ApiContext) -> _Submission:
    body = await _read_body(request, MAX_JSON_BODY_BYTES)
    try:
        decoded = await asyncio.to_thread(json.loads, body)
    except (ValueError, UnicodeDecodeError) as error:
        raise _unprocessable(f"the body is not JSON: {error}") from None
    if not isinstance(decoded, dict):
        raise _unprocessable('the body must be a JSON object: {"workflow": {...}, ...}')
    if "workflow" not in decoded:
        raise _unprocessable('the body has no "workflow": give the API-format workflow JSON')
    try:
        parsed = JsonSubmission.model_validate(decoded)
    except ValidationError as error:
        raise _unprocessable(_readable(error, "body")) from None
    submission = _Submission(
        workflow=parsed.workflow,
        params=SubmitParams.model_validate(parsed.model_dump(exclude={"workflow", "inputs"})),
    )
    if len(parsed.inputs) > MAX_INPUTS:
        raise _unprocessable(f"a job takes at most {MAX_INPUTS} inputs")
    limit = ctx.settings.max_output_bytes
    for given, text in parsed.inputs.items():
        name = _input_name(given)
        data = _decode_base64(given, text)
        try:
            blob = await ctx.outputs.put_stream(io.BytesIO(data), max_bytes=limit)
        except OutputTooLarge as error:
            raise _too_large(error) from None
        submission.add_input(name, blob.sha256, blob.size)
    return submission


def _profile(params: SubmitParams, ctx: ApiContext) -> str:
    served = sorted(ctx.settings.profiles)
    listed = ", ".join(served) if served else "none (start `comfyfleet serve` with a fleet file)"
    if params.profile is None:
        if len(served) == 1:
            return served[0]
        raise _unprocessable(f"say which profile runs the job (params.profile): {listed}")
    if params.profile not in served:
        raise _unprocessable(
            f"unknown profile {params.profile!r}: this control plane serves {listed}"
        )
    return params.profile


def _images(
    workflow: Workflow, params: SubmitParams, inputs: list[_Input]
) -> list[tuple[str | None, str]]:
    names = [item.name for item in inputs]
    if params.images is None:
        if len(inputs) != 1:
            return []
        loaders = sorted(i for i, node in workflow.items() if node["class_type"] == LOAD_IMAGE)
        if len(loaders) > 1:
            labels = ", ".join(node_label(workflow, i) for i in loaders)
            raise _unprocessable(
                f"the workflow has {len(loaders)} LoadImage nodes ({labels}); say which takes "
                f'{names[0]}: "images": [{{"node": "{loaders[0]}", "name": "{names[0]}"}}]'
            )
        # No LoadImage: the input is uploaded under its name for whatever node reads it.
        return [(None, names[0])] if loaders else []
    targets = []
    for index, image in enumerate(params.images):
        name = _input_name(image.name)
        if name not in names:
            sent = ", ".join(names) or "none"
            raise _unprocessable(
                f"images[{index}].name {image.name!r} is not one of the inputs sent: {sent}"
            )
        targets.append((image.node, name))
    return targets


def _prepare(submission: _Submission) -> dict[str, Any]:
    """The job's request: the final workflow, its inputs, its parameters (runs off the loop)."""
    params = submission.params
    if submission.workflow is None:
        raise WorkflowError("no workflow was sent: give the API-format JSON as the workflow field")
    workflow = load_api_workflow(submission.workflow, name="workflow")
    overrides = [Override.parse(text) for text in params.overrides]
    images = _images(workflow, params, submission.inputs)
    prepared = apply_parameters(
        workflow,
        prompt=params.prompt,
        images=images,
        overrides=overrides,
        randomize=params.randomize_seeds,
    )
    return {
        "workflow": prepared.workflow,
        "inputs": [
            {"name": item.name, "sha256": item.sha256, "size": item.size}
            for item in submission.inputs
        ],
        "params": {
            "prompt": params.prompt,
            "images": [{"node": node, "name": name} for node, name in images],
            "set": list(params.overrides),
            "randomize_seeds": params.randomize_seeds,
            "seeds": [
                {"node_id": seed.node_id, "input": seed.input, "seed": seed.seed}
                for seed in prepared.seeds
            ],
        },
    }


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` put in place: in the OpenAPI document a
    ``#/$defs/...`` reference would point at the document's root, where there are none."""
    definitions = schema.pop("$defs", {})

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            reference = value.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                return resolve(definitions[reference.removeprefix("#/$defs/")])
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item) for item in value]
        return value

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_SUBMIT_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["workflow"],
                    "properties": {
                        "workflow": {
                            "type": "string",
                            "format": "binary",
                            "description": "The API-format workflow JSON (a file or text).",
                        },
                        "input": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Input files, stored under their file names.",
                        },
                        "params": {
                            "type": "string",
                            "description": "SubmitParams as JSON text.",
                        },
                    },
                }
            },
            "application/json": {
                "schema": _inlined(JsonSubmission.model_json_schema(by_alias=True))
            },
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SubmittedJob,
    response_model_exclude_unset=True,
    openapi_extra=_SUBMIT_BODY,
)
async def submit(request: Request, ctx: Ctx, who: Who) -> SubmittedJob:
    """Queue a job: multipart (``workflow``, ``input`` files, ``params`` JSON) or JSON
    (``workflow``, ``inputs`` in base64, the parameters beside them)."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        submission = await _read_multipart(request, ctx, content_type)
    elif media == "application/json" or media.endswith("+json"):
        submission = await _read_json(request, ctx)
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="send the job as multipart/form-data (workflow, input, params) or as "
            "application/json (workflow, inputs, and the parameters)",
        )
    params = submission.params
    profile = _profile(params, ctx)
    if params.webhook_url is not None:
        try:
            await check_webhook_url(
                params.webhook_url, allow_loopback=ctx.settings.webhook_allow_loopback
            )
        except WebhookRefused as error:
            raise _unprocessable(str(error)) from None
    try:
        job_request = await asyncio.to_thread(_prepare, submission)
    except WorkflowError as error:
        raise _unprocessable(str(error)) from None
    now = ctx.clock.now()

    def record(session: Session) -> tuple[dict[str, Any], str | None]:
        row = submit_job(
            session,
            profile=profile,
            request=job_request,
            now=now,
            priority=params.priority,
            max_attempts=params.max_attempts,
            timeout_s=params.timeout_s,
            owner_key_id=who.key_id,
            webhook_url=params.webhook_url,
            webhook_secret=params.webhook_secret,
        )
        made = row.webhook_secret if params.webhook_secret is None else None
        return job_view(session, row, now=now), made

    try:
        view, secret = await ctx.store.run(record, share_commit=True)
    except StoreError as error:
        raise _unprocessable(str(error)) from None
    # The agents waiting for a job of this profile take it now, not at their next poll.
    ctx.signals.notify(profile_key(profile))
    answer = SubmittedJob.model_validate(view)
    if secret is not None:
        answer.webhook_secret = secret
    return answer


# ------------------------------------------------------------------ reading and cancelling


def _all_jobs(session: Session, states: list[JobState] | None, limit: int) -> list[JobRow]:
    query = select(JobRow)
    if states:
        query = query.where(JobRow.state.in_(sorted(states)))
    query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
    return list(session.execute(query).scalars())


@router.get("")
async def list_jobs(
    ctx: Ctx,
    who: Who,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in this state (repeatable).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """The caller's jobs (every job, for the admin key), newest first."""
    now = ctx.clock.now()

    def read(session: Session) -> list[dict[str, Any]]:
        if who.key_id is None:
            rows = _all_jobs(session, state, limit)
        else:
            rows = jobs_for_key(session, who.key_id, states=state or None, limit=limit)
        return [job_view(session, row, now=now) for row in rows]

    views = await ctx.store.run(read, share_commit=True)
    return JobList(jobs=[JobView.model_validate(view) for view in views])


async def _view(ctx: ApiContext, who: Caller, job_id: str) -> dict[str, Any]:
    now = ctx.clock.now()

    def read(session: Session) -> dict[str, Any]:
        row = get_job(session, job_id, key_id=who.key_id, with_request=False)
        return job_view(session, row, now=now)

    try:
        return await ctx.store.run(read, share_commit=True)
    except StoreError as error:
        raise _not_found_or_conflict(error) from None


@router.get("/{job_id}")
async def get_one(job_id: str, ctx: Ctx, who: Who) -> JobView:
    """One job: state, queue position, progress, timing, cost, outputs."""
    return JobView.model_validate(await _view(ctx, who, job_id))


def _disposition(name: str) -> str:
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\;' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


@router.get(
    "/{job_id}/outputs/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file."}},
)
async def get_output_file(job_id: str, name: str, ctx: Ctx, who: Who) -> StreamingResponse:
    """The output ``name`` of the job, as stored; its sha256 in ``X-Comfyfleet-Sha256``."""
    try:
        row = await ctx.store.run(
            lambda session: get_output(session, job_id, name, key_id=who.key_id),
            share_commit=True,
        )
    except StoreError as error:
        raise _not_found_or_conflict(error) from None
    if not await ctx.outputs.exists(row.sha256):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"job {job_id}'s output {row.name!r} is recorded but its file is missing "
            "from the output store (was the outputs folder moved or cleaned?)",
        )
    return StreamingResponse(
        ctx.outputs.iter_bytes(row.sha256),
        media_type=row.content_type,
        headers={
            "Content-Length": str(row.size),
            "X-Comfyfleet-Sha256": row.sha256,
            "Content-Disposition": _disposition(row.name),
            # An HTML or SVG output is a download, never a page run from the API's origin.
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
        },
    )


@router.delete("/{job_id}", status_code=status.HTTP_202_ACCEPTED)
async def cancel(job_id: str, ctx: Ctx, who: Who) -> JobView:
    """Cancel the job: a queued one at once; a placed or running one is marked for its
    agent to interrupt. 409 for a job that has already succeeded or failed."""
    now = ctx.clock.now()

    def work(session: Session) -> dict[str, Any]:
        row = request_cancel(session, job_id, now, key_id=who.key_id)
        return job_view(session, row, now=now)

    try:
        view = await ctx.store.run(work, share_commit=True)
    except StoreError as error:
        raise _not_found_or_conflict(error) from None
    ctx.signals.notify(job_key(job_id))
    return JobView.model_validate(view)


def _changed_part(view: Mapping[str, Any]) -> str:
    # Timing and cost of a job that runs move with the clock: not a change worth an event.
    return json.dumps({k: v for k, v in view.items() if k not in ("timing", "cost")})


async def _follow(ctx: ApiContext, who: Caller, job_id: str) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    keepalive_at = loop.time() + KEEPALIVE_S
    last: str | None = None
    while True:
        view = await _view(ctx, who, job_id)
        seen = _changed_part(view)
        if seen != last:
            last = seen
            yield f"event: job\ndata: {json.dumps(view, separators=(',', ':'))}\n\n"
            keepalive_at = loop.time() + KEEPALIVE_S
        if JobState(view["state"]) in JOB_TERMINAL_STATES:
            return
        wait = min(EVENTS_POLL_S, max(keepalive_at - loop.time(), 0.0))
        await ctx.signals.wait([job_key(job_id)], wait)
        if loop.time() >= keepalive_at:
            yield ": keep-alive\n\n"
            keepalive_at = loop.time() + KEEPALIVE_S


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}},
)
async def follow(job_id: str, ctx: Ctx, who: Who) -> StreamingResponse:
    """Server-sent events: ``event: job`` with the job's view now and at each change,
    until the view of its end."""
    await _view(ctx, who, job_id)  # a 404 now, before the stream begins
    return StreamingResponse(
        _follow(ctx, who, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

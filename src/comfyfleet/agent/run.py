"""The agent's whole run on an instance: boot, provision the workspace, then bring ComfyUI up.

``run_agent(manifest, workspace)`` reports ``booting``, provisions the workspace
(``provisioning``, ``downloading``: see ``agent/provision.py``) and, when the
provision succeeded (strict mode, the default: no critical item missing), starts
ComfyUI through ``ComfySupervisor`` (or adopts the one a previous agent left
running, or attaches to the image's own at ``attach_url``): ``starting_app``,
``warming`` when the manifest names a warm-up workflow, then ``ready``. ComfyUI
runs in the manifest's ComfyUI folder with the manifest's ``comfyui.args``, and is
ready only once ``/object_info`` lists every node type that the workspace's
API-format workflows use (UI-format files are left out: their node lists hold
frontend-only nodes).

It returns an ``AgentResult``. At ``ready`` the supervisor is still running in
the background: the caller keeps it (``await result.supervisor.wait()``), stops it
or detaches from it. Any failure ends in the stage ``failed`` with a reason code
(``provision_failed``, ``comfy_crash_loop``, ``warmup_failed``,
``comfy_missing_nodes``...; see ``FAILURE_REASONS``), a timestamped line in the
workspace's ``provision_errors.log``, and a result whose ``reason`` and
``message`` say what went wrong; a ComfyUI this run started is stopped by then. A
cancelled run stops the ComfyUI it started too.

Each failure's stage is reported once: the provisioner reports its own ``failed``
(after per-item ``DOWNLOAD FAILED`` / ``VALIDATION FAILED`` lines in the error
log), and the supervisor its own (with a ``COMFYUI FAILED`` line). Every other
failure, and a failed provision, gets an ``AGENT FAILED REASON: MESSAGE`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from comfyfleet.agent.comfy import (
    CRASH_LOOP,
    GPU_MEMORY_BUSY,
    MISSING_NODES,
    NOT_READY,
    PORT_BUSY,
    START_FAILED,
    WARMUP_FAILED,
    ComfyOptions,
    ComfySupervisor,
    load_workflow,
    nodes_used_by,
)
from comfyfleet.agent.provision import ProvisionOptions, ProvisionSummary, provision
from comfyfleet.agent.report import ErrorLog, Level, Progress, Reporter, Stage
from comfyfleet.agent.sources import SourceResolver
from comfyfleet.clock import Clock, SystemClock
from comfyfleet.errors import ComfyFailed, ComfyfleetError, ConfigError, ProvisionFailed
from comfyfleet.manifest import Manifest, WorkspaceLayout

__all__ = [
    "AGENT_ERROR",
    "CONFIG_INVALID",
    "FAILURE_REASONS",
    "PROVISION_FAILED",
    "WORKFLOW_INVALID",
    "AgentFailed",
    "AgentResult",
    "comfy_options_for",
    "run_agent",
]

#: A critical item is missing after the provision (strict mode), or the provision stopped.
PROVISION_FAILED: Final = "provision_failed"
#: The ComfyUI options do not hold together (empty command, a bad attach URL...).
CONFIG_INVALID: Final = "agent_config_invalid"
#: A workflow of the workspace cannot be read, so its node types are unknown.
WORKFLOW_INVALID: Final = "workflow_invalid"
#: Anything else that stopped the run (a bug, the disk): the message says what.
AGENT_ERROR: Final = "agent_error"

FAILURE_REASONS: Final = (
    PROVISION_FAILED,
    CONFIG_INVALID,
    WORKFLOW_INVALID,
    AGENT_ERROR,
    CRASH_LOOP,
    WARMUP_FAILED,
    MISSING_NODES,
    GPU_MEMORY_BUSY,
    NOT_READY,
    PORT_BUSY,
    START_FAILED,
)

AGENT_FAILED: Final = "AGENT FAILED"


class AgentFailed(ComfyfleetError):
    """The agent's run ended in ``failed``; ``reason`` is the code the instance reports."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


@dataclass
class AgentResult:
    """How a run ended: ``ready`` (``ok``; ``supervisor`` keeps ComfyUI up) or ``failed``."""

    ok: bool
    #: The failure code (``None`` when ready).
    reason: str | None
    #: What went wrong, for a human (``None`` when ready).
    message: str | None
    #: The provision's outcome; ``None`` when it stopped before a summary.
    summary: ProvisionSummary | None
    #: Supervising ComfyUI in the background when ``ok``; stopped after a failure.
    supervisor: ComfySupervisor | None
    #: ComfyUI's URL when ready.
    url: str | None
    elapsed_s: float

    @property
    def comfy_pid(self) -> int | None:
        """ComfyUI's pid while the supervisor has one (never in attach mode)."""
        return None if self.supervisor is None else self.supervisor.pid

    def raise_for_failure(self) -> None:
        """Raise ``AgentFailed`` when the run failed."""
        if not self.ok:
            raise AgentFailed(self.reason or AGENT_ERROR, self.message or "the agent failed")


class _Tracker:
    """Passes every event on and remembers the last stage (was ``failed`` reported?)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.last: Stage | None = None

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        self.last = stage
        self.reporter.stage(stage, reason)

    def progress(self, progress: Progress) -> None:
        self.reporter.progress(progress)

    def log(self, line: str, level: Level = "info") -> None:
        self.reporter.log(line, level)


class _NullReporter:
    def stage(self, stage: Stage, reason: str | None = None) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def log(self, line: str, level: Level = "info") -> None:
        pass


class _Failure(Exception):
    """Ends the run in ``failed``. ``reported``: the stage ``failed`` already went out;
    ``logged``: the error log already has this failure's line."""

    def __init__(
        self, reason: str, message: str, *, reported: bool = False, logged: bool = False
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.reported = reported
        self.logged = logged


def comfy_options_for(
    manifest: Manifest,
    workspace: Path,
    overrides: Mapping[str, Any] | None = None,
) -> ComfyOptions:
    """The ``ComfyOptions`` for ``manifest``'s workspace, then ``overrides``.

    ComfyUI runs in the manifest's ComfyUI folder with its ``comfyui.args``, by
    default as ``PYTHON main.py`` (``PYTHON``: the manifest's ``comfyui.python``,
    else ``python``). ``overrides`` replace any field, except ``extra_args``, which
    are added after the manifest's; a ``command`` given as one string is split as a
    shell would. Raises ``ConfigError`` for options that do not hold together. The
    workflows' node types and the warm-up are added once the workspace holds them.
    """
    extra = dict(overrides or {})
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(ComfyOptions)})
    if unknown:
        raise ConfigError(f"unknown ComfyUI options: {', '.join(unknown)}", field="comfy")
    extra_args = (*manifest.comfyui.args, *tuple(extra.pop("extra_args", ())))
    command = extra.pop("command", (manifest.comfyui.python or "python", "main.py"))
    if isinstance(command, str):
        try:
            command = shlex.split(command)
        except ValueError as error:
            raise ConfigError(f"cannot split {command!r}: {error}", field="comfy.command") from None
    fields: dict[str, Any] = {"comfy_dir": manifest.layout(workspace).comfy, **extra}
    return ComfyOptions(command=tuple(command), extra_args=extra_args, **fields)


async def run_agent(
    manifest: Manifest,
    workspace: Path,
    *,
    reporter: Reporter | None = None,
    resolver: SourceResolver | None = None,
    provision_options: ProvisionOptions | None = None,
    comfy_options_overrides: Mapping[str, Any] | None = None,
    clock: Clock | None = None,
) -> AgentResult:
    """Boot, provision ``workspace`` from ``manifest``, then bring ComfyUI up; see the module.

    ``resolver`` (default: one from the environment) resolves the model sources;
    ``comfy_options_overrides`` change ``ComfyOptions`` fields (``command``, ``port``,
    ``attach_url``, ``ready_timeout_s``...; ``extra_args`` add to the manifest's).
    Failures are in the result, not raised (``AgentResult.raise_for_failure``).
    """
    clock = clock or SystemClock()
    tracker = _Tracker(reporter or _NullReporter())
    layout = manifest.layout(workspace)
    options = provision_options or ProvisionOptions()
    started = time.monotonic()
    summary: ProvisionSummary | None = None
    supervisor: ComfySupervisor | None = None
    try:
        tracker.stage("booting")
        # Checked before the download: a bad command or attach URL fails in a second.
        try:
            comfy = comfy_options_for(manifest, workspace, comfy_options_overrides)
        except ConfigError as error:
            raise _Failure(CONFIG_INVALID, str(error)) from error
        tracker.log(f"workspace {workspace}, ComfyUI in {layout.relative(layout.comfy)}")
        tracker.log(_plan(comfy))

        try:
            summary = await provision(
                manifest,
                workspace,
                resolver=resolver,
                reporter=tracker,
                options=options,
                clock=clock,
            )
            summary.raise_for_missing()
        except ProvisionFailed as error:
            message = f"{error}; ComfyUI was not started"
            raise _Failure(PROVISION_FAILED, message, reported=tracker.last == "failed") from error
        except ComfyfleetError as error:
            # The provisioner has reported ``failed`` already (a manifest the workspace refuses...).
            message = f"provision failed: {error}"
            raise _Failure(PROVISION_FAILED, message, reported=tracker.last == "failed") from error
        if summary.missing_critical:
            names = ", ".join(i.name for i in summary.missing_critical)
            tracker.log(f"not strict: starting ComfyUI without {names}", "warning")

        comfy = await _with_workflows(comfy, manifest, layout)
        supervisor = ComfySupervisor(workspace, comfy, reporter=tracker, clock=clock)
        try:
            await supervisor.start()
        except ComfyfleetError as error:
            # The supervisor reports its own failures and logs them as ``COMFYUI FAILED``.
            failed = isinstance(error, ComfyFailed)
            reason = error.reason if isinstance(error, ComfyFailed) else AGENT_ERROR
            raise _Failure(
                reason, str(error), reported=tracker.last == "failed", logged=failed
            ) from error
        return AgentResult(
            ok=True,
            reason=None,
            message=None,
            summary=summary,
            supervisor=supervisor,
            url=supervisor.url,
            elapsed_s=time.monotonic() - started,
        )
    except _Failure as failure:
        await _stop(supervisor)
        await _fail(tracker, layout, failure)
        return AgentResult(
            ok=False,
            reason=failure.reason,
            message=failure.message,
            summary=summary,
            supervisor=supervisor,
            url=None,
            elapsed_s=time.monotonic() - started,
        )
    except Exception as error:
        # Not a failure the run knows: still ``failed``, logged, and nothing left running.
        await _stop(supervisor)
        message = f"{type(error).__name__}: {error}"
        reported = tracker.last == "failed"  # the provisioner reports its own crashes
        await _fail(tracker, layout, _Failure(AGENT_ERROR, message, reported=reported))
        raise
    except BaseException:
        # Cancelled (Ctrl-C, SIGTERM, a caller's timeout): the ComfyUI this run started goes too.
        await asyncio.shield(_stop(supervisor))
        raise


def _plan(comfy: ComfyOptions) -> str:
    if comfy.attach_url is not None:
        return f"ComfyUI: attach to {comfy.attach_url} (the image starts it)"
    command = " ".join(comfy.command)
    return f"ComfyUI: adopt the one running, or start `{command}` on port {comfy.port}"


async def _with_workflows(
    comfy: ComfyOptions, manifest: Manifest, layout: WorkspaceLayout
) -> ComfyOptions:
    """The options with the node types the workspace's workflows use and the warm-up."""
    paths = []
    for workflow in manifest.workflows:
        if workflow.file_name is not None:
            path = layout.workflows / workflow.file_name
            if path.is_file():
                paths.append(path)
    try:
        required = await asyncio.to_thread(nodes_used_by, paths, skip_ui_format=True)
    except ConfigError as error:
        raise _Failure(WORKFLOW_INVALID, str(error)) from error
    warmup: dict[str, Any] | None = None
    if manifest.warmup is not None and manifest.warmup.file_name is not None:
        path = layout.workflows / manifest.warmup.file_name
        if not path.is_file():
            message = f"the warm-up workflow {layout.relative(path)} is missing"
            raise _Failure(WARMUP_FAILED, message)
        try:
            warmup = await asyncio.to_thread(load_workflow, path)
        except ConfigError as error:
            raise _Failure(WARMUP_FAILED, str(error)) from error
    try:
        return dataclasses.replace(
            comfy, required_nodes=comfy.required_nodes | required, warmup_workflow=warmup
        )
    except ConfigError as error:  # a UI-format warm-up cannot be queued
        raise _Failure(WARMUP_FAILED, str(error)) from error


async def _stop(supervisor: ComfySupervisor | None) -> None:
    if supervisor is not None:
        with contextlib.suppress(Exception):
            await supervisor.stop()


async def _fail(tracker: _Tracker, layout: WorkspaceLayout, failure: _Failure) -> None:
    one_line = " | ".join(line.strip() for line in failure.message.splitlines() if line.strip())
    if not failure.reported:
        # Whoever reported ``failed`` already said why, in the lines before it.
        tracker.stage("failed", failure.reason)
        tracker.log(f"{AGENT_FAILED} ({failure.reason}): {one_line}", "error")
    if failure.logged:
        return
    with contextlib.suppress(OSError):
        await asyncio.to_thread(ErrorLog(layout.root).write, AGENT_FAILED, failure.reason, one_line)

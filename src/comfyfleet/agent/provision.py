"""Provision a ComfyUI workspace from its manifest: custom nodes, pip packages, models, validation.

``provision(manifest, workspace)`` does, in order:

1. **Check** the workspace (no destination may lead out of ``models/`` through a
   symlink) and **resolve** every model's first usable source (size, sha256 and
   file name from Hugging Face headers, Civitai's API...). Two models that land on
   the same file are refused here, before anything is installed or downloaded.
2. **Install** the custom nodes (git clone at the pinned commit, idempotent) and
   then their ``requirements.txt`` and the manifest's extra pip packages, with
   ComfyUI's Python; this runs while the models download.
3. **Download** the models (and workflows and config files that come from a URL,
   and the files of a Dropbox workspace folder, ``ProvisionOptions.links``) through
   the download engine, several at once. A file already in place with the expected
   size and sha256 is read once and left alone. A model whose source fails for good
   moves on to its next source, in a further batch.
4. **Validate** by reading the disk again (size and sha256 of every file, the
   commit of every node): the download's own report is not trusted.

Every failure writes a timestamped ``DOWNLOAD FAILED`` / ``VALIDATION FAILED``
(or ``INSTALL FAILED``) line to ``provision_errors.log`` in the workspace, and the
stage (``provisioning``, ``downloading``, ``failed``), progress and log lines go
through the ``Reporter``. In strict mode (the default) a missing critical item
makes the provision fail; ``ProvisionSummary.raise_for_missing`` raises
``ProvisionFailed`` naming each one.

``check_manifest`` is the dry run behind ``comfyfleet manifest check``: it
resolves every source and adds up what a provision would download.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from comfyfleet.agent.downloads import (
    BatchSummary,
    Downloader,
    DownloadItem,
    FileResult,
    ProgressEvent,
    redact_url,
)
from comfyfleet.agent.nodes import (
    CommandFailed,
    NodeResult,
    checkout,
    has_requirements,
    head_commit,
    pip_install,
)
from comfyfleet.agent.report import ErrorLog, Level, NullReporter, Progress, Reporter
from comfyfleet.agent.sources import (
    DropboxLink,
    ResolvedSource,
    SourceResolver,
    SourceSettings,
    workspace_path,
)
from comfyfleet.clock import Clock, SystemClock
from comfyfleet.errors import (
    ComfyfleetError,
    InsufficientDiskSpace,
    ProvisionFailed,
)
from comfyfleet.manifest import (
    ConfigFile,
    Manifest,
    Workflow,
    WorkspaceLayout,
    check_workspace,
)
from comfyfleet.yamlconfig import dotted

__all__ = [
    "ItemResult",
    "ManifestCheck",
    "ModelCheck",
    "ProvisionOptions",
    "ProvisionSummary",
    "Provisioner",
    "SourceAttempt",
    "SourceCheck",
    "check_manifest",
    "provision",
    "show_source",
]

log = logging.getLogger(__name__)

ItemKind = Literal["model", "workflow", "config", "transfer", "node", "pip"]
ItemStatus = Literal["downloaded", "present", "installed", "written", "failed"]

DOWNLOAD_FAILED = "DOWNLOAD FAILED"
VALIDATION_FAILED = "VALIDATION FAILED"
INSTALL_FAILED = "INSTALL FAILED"


@dataclass(frozen=True)
class ProvisionOptions:
    """How a provision runs. ``download_overrides`` go to ``SourceResolver.download_options``."""

    strict: bool = True
    #: Files downloading at once (the engine's ``max_files``).
    concurrency: int = 4
    download_overrides: Mapping[str, Any] = field(default_factory=dict)
    git_timeout_s: float = 900.0
    pip_timeout_s: float = 3600.0
    #: Git clones at once.
    node_concurrency: int = 4
    #: Sources resolved at once (API calls, not bytes).
    resolve_concurrency: int = 8
    #: Threads hashing files during validation.
    hash_workers: int = 4
    #: The interpreter that installs requirements; default: the manifest's, else the agent's.
    python: str | None = None
    #: A Dropbox workspace folder mapped onto the workspace (``PROVISION_DROPBOX_LINKS_B64``).
    links: Sequence[DropboxLink] = ()
    #: Whether the linked files that the manifest does not name are critical.
    links_critical: bool = True


def show_source(source: str) -> str:
    """A source as it may be logged: URLs lose their query strings (tokens, link keys),
    ``civitai://ID?...`` its ``token``."""
    if source.startswith(("http://", "https://")):
        return redact_url(source)
    parts = urlsplit(source)
    if parts.query:
        kept = [(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "token"]
        return urlunsplit(parts._replace(query=urlencode(kept)))
    return source


@dataclass(frozen=True)
class SourceAttempt:
    """One source that failed for an item, and why."""

    source: str
    reason: str


@dataclass
class ItemResult:
    """What became of one thing the manifest asks for, after validation."""

    kind: ItemKind
    #: What it is, as a user reads it: ``ComfyUI/models/vae/x.safetensors``, ``custom_nodes/Foo``.
    name: str
    critical: bool
    status: ItemStatus
    reason: str | None = None
    path: Path | None = None
    #: The source that delivered it (shown without query string).
    source: str | None = None
    size: int | None = None
    #: The sha256 read back from disk, when one was expected; ``None``: size checked only.
    sha256: str | None = None
    bytes_downloaded: int = 0
    failed_sources: list[SourceAttempt] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "critical": self.critical,
            "status": self.status,
            "ok": self.ok,
            "reason": self.reason,
            "path": None if self.path is None else str(self.path),
            "source": self.source,
            "size": self.size,
            "sha256": self.sha256,
            "bytes_downloaded": self.bytes_downloaded,
            "failed_sources": [
                {"source": a.source, "reason": a.reason} for a in self.failed_sources
            ],
        }


@dataclass
class ProvisionSummary:
    """The outcome of a provision: every item after validation, bytes and throughput."""

    items: list[ItemResult]
    elapsed_s: float
    download_elapsed_s: float
    strict: bool
    error_log: Path

    @property
    def succeeded(self) -> list[ItemResult]:
        return [i for i in self.items if i.ok]

    @property
    def failed(self) -> list[ItemResult]:
        return [i for i in self.items if not i.ok]

    @property
    def missing_critical(self) -> list[ItemResult]:
        return [i for i in self.failed if i.critical]

    @property
    def ok(self) -> bool:
        """False when a strict provision left a critical item missing."""
        return not (self.strict and self.missing_critical)

    @property
    def bytes_downloaded(self) -> int:
        return sum(i.bytes_downloaded for i in self.items)

    @property
    def mb_per_s(self) -> float:
        t = self.download_elapsed_s
        return self.bytes_downloaded / 1e6 / t if t > 0 else 0.0

    def lines(self) -> list[str]:
        """A human summary: one line for the whole, one per failure."""
        out = [
            f"{len(self.succeeded)} succeeded, {len(self.failed)} failed "
            f"({len(self.missing_critical)} critical), {self.bytes_downloaded} bytes downloaded "
            f"in {self.download_elapsed_s:.1f} s ({self.mb_per_s:.1f} MB/s), "
            f"{self.elapsed_s:.1f} s in all"
        ]
        for item in self.failed:
            tag = "critical" if item.critical else "non-critical"
            out.append(f"FAILED ({tag}) {item.name}: {item.reason}")
        return out

    def raise_for_missing(self) -> None:
        """Raise ``ProvisionFailed`` naming every missing critical item (strict mode only)."""
        if not self.ok:
            raise ProvisionFailed([f"{i.name}: {i.reason}" for i in self.missing_critical])

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "strict": self.strict,
            "succeeded": len(self.succeeded),
            "failed": len(self.failed),
            "missing_critical": [i.name for i in self.missing_critical],
            "bytes_downloaded": self.bytes_downloaded,
            "elapsed_s": round(self.elapsed_s, 3),
            "download_elapsed_s": round(self.download_elapsed_s, 3),
            "mb_per_s": round(self.mb_per_s, 3),
            "error_log": str(self.error_log),
            "items": [i.to_json() for i in self.items],
        }


# ---------------------------------------------------------------- files to download


@dataclass
class _FileTask:
    """A file that comes from one or several sources: a model, a workflow, a config file.

    ``sha256`` and ``size`` are what the file must be: the manifest's, else what the
    first source that published them said (``*_from`` tells which), so a fallback
    source must deliver the same bytes, and validation knows what to check.
    """

    kind: ItemKind
    #: Where the entry is in the manifest, for errors (``["models", 3]``).
    entry: list[str | int]
    folder: Path
    name: str | None
    sources: deque[str]
    sha256: str | None
    size: int | None
    critical: bool
    sha256_from: str = "the manifest"
    size_from: str = "the manifest"
    failed_sources: list[SourceAttempt] = field(default_factory=list)
    resolved: ResolvedSource | None = None
    source: str | None = None
    result: FileResult | None = None
    bytes_downloaded: int = 0
    #: A passing read of the disk made this run before downloading (validation reuses it).
    checked: _DiskCheck | None = None

    @property
    def path(self) -> Path | None:
        return None if self.name is None else self.folder / self.name

    @property
    def result_ok(self) -> bool:
        """Whether the file is in place (downloaded, or found there)."""
        return self.result is not None and self.result.ok

    def learn(self, resolved: ResolvedSource, shown: str) -> None:
        """Take the source's sha256 and size where nothing pinned them yet."""
        if self.sha256 is None and resolved.sha256:
            self.sha256, self.sha256_from = resolved.sha256.lower(), shown
        if self.size is None and resolved.size is not None:
            self.size, self.size_from = resolved.size, shown

    @property
    def expected_sha256(self) -> str | None:
        if self.sha256 is not None:
            return self.sha256
        if self.result_ok:
            assert self.result is not None
            return self.result.expected_sha256  # learnt by the engine (X-Linked-Etag)
        return None

    @property
    def expected_size(self) -> int | None:
        if self.size is not None:
            return self.size
        if self.result_ok:
            assert self.result is not None
            return self.result.size  # the server's Content-Range or Content-Length
        return None


def _file_tasks(manifest: Manifest, layout: WorkspaceLayout) -> list[_FileTask]:
    tasks = [
        _FileTask(
            kind="model",
            entry=["models", i],
            folder=layout.models / m.dest,
            name=m.known_name,
            sources=deque(m.all_sources),
            sha256=m.sha256,
            size=m.size,
            critical=m.critical,
        )
        for i, m in enumerate(manifest.models)
    ]
    for i, wf in enumerate(manifest.workflows):
        if wf.source is not None:
            tasks.append(
                _FileTask(
                    kind="workflow",
                    entry=["workflows", i],
                    folder=layout.workflows,
                    name=wf.file_name,
                    sources=deque([wf.source]),
                    sha256=wf.sha256,
                    size=None,
                    critical=wf.critical,
                )
            )
    for i, cf in enumerate(manifest.config_files):
        if cf.source is not None:
            target = layout.comfy / cf.path
            tasks.append(
                _FileTask(
                    kind="config",
                    entry=["config_files", i],
                    folder=target.parent,
                    name=target.name,
                    sources=deque([cf.source]),
                    sha256=cf.sha256,
                    size=None,
                    critical=cf.critical,
                )
            )
    return tasks


def _check_targets(manifest: Manifest, layout: WorkspaceLayout, tasks: Sequence[_FileTask]) -> None:
    """Refuse two items on one file, and names (learnt from sources) that escape their folder."""
    seen: dict[Path, _FileTask] = {}
    for task in tasks:
        path = task.path
        if path is None:
            continue
        if path in seen:
            other = seen[path]
            raise manifest.error(
                task.entry,
                f"same target as {dotted(other.entry)}: {layout.relative(path)}; "
                "set name: on one of them",
            )
        seen[path] = task
        base = {"model": layout.models, "transfer": layout.root}.get(task.kind, layout.comfy)
        if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(base)):
            raise manifest.error(
                task.entry,
                f"{layout.relative(path)} leads out of {layout.relative(base)} through a symlink",
            )


def _bad_name(name: str | None) -> str | None:
    if not name:
        return "the source gives no file name; set name: in the manifest"
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        return f"the source's file name {name!r} is not a plain file name; set name:"
    return None


# ---------------------------------------------------------------- progress


class _Board:
    """Turns the engine's events (from its progress thread) into the Reporter's ``Progress``.

    Overall figures cover every batch: the total is the sum of the expected sizes
    of the files still to fetch; a file found in place leaves the total.
    """

    def __init__(self, reporter: Reporter, label: Callable[[Path], str]) -> None:
        self._reporter = reporter
        self._label = label
        self._lock = threading.Lock()
        self._done: dict[Path, int] = {}
        self._total: dict[Path, int] = {}
        self._moved = 0
        self._samples: deque[tuple[float, int]] = deque()

    def expect(self, dest: Path, size: int | None) -> None:
        with self._lock:
            if size is not None:
                self._total[dest] = size
            self._done.setdefault(dest, 0)

    def on_event(self, ev: ProgressEvent) -> None:
        with self._lock:
            if ev.kind in ("present", "failed"):
                # Out of the overall figures: in place already, or to come in a later
                # batch from another source (which counts it again).
                self._done.pop(ev.dest, None)
                self._total.pop(ev.dest, None)
            else:
                before = self._done.get(ev.dest, 0)
                self._moved += max(0, ev.done - before)
                self._done[ev.dest] = ev.done
                if ev.total is not None:
                    self._total[ev.dest] = ev.total
            now = time.monotonic()
            self._samples.append((now, self._moved))
            while len(self._samples) > 2 and self._samples[1][0] < now - 5.0:
                self._samples.popleft()
            t0, b0 = self._samples[0]
            rate = (self._moved - b0) / (now - t0) if now - t0 > 0.2 else 0.0
            done = sum(self._done.values())
            total = sum(self._total.values())
            file_total = ev.total
            file_done = ev.done
            if ev.kind in ("downloaded", "present", "failed"):
                file_total = file_done  # a file's last event: its bar is finished
        self._reporter.progress(
            Progress(
                done=done,
                total=total,
                file=self._label(ev.dest),
                file_done=file_done,
                file_total=file_total,
                bytes_per_s=rate,
            )
        )


# ---------------------------------------------------------------- the provisioner


class Provisioner:
    """Provisions one workspace; ``run()`` returns the ``ProvisionSummary``."""

    def __init__(
        self,
        manifest: Manifest,
        workspace: Path,
        *,
        resolver: SourceResolver | None = None,
        reporter: Reporter | None = None,
        options: ProvisionOptions | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.manifest = manifest
        self.layout = manifest.layout(workspace)
        self.options = options or ProvisionOptions()
        self.reporter: Reporter = reporter or NullReporter()
        self.clock: Clock = clock or SystemClock()
        self.error_log = ErrorLog(self.layout.root)
        self._resolver = resolver
        self._python = self.options.python or manifest.comfyui.python or sys.executable
        self._pool: ThreadPoolExecutor | None = None

    # -- helpers ------------------------------------------------------------

    def _say(self, line: str, level: Level = "info") -> None:
        getattr(log, "info" if level == "info" else level)("%s", line)
        self.reporter.log(line, level)

    def _label(self, path: Path) -> str:
        return self.layout.relative(path)

    def _task_label(self, task: _FileTask) -> str:
        if task.path is not None:
            return self._label(task.path)
        # No source gave a file name: name the entry by its folder and first source.
        first = task.failed_sources[0].source if task.failed_sources else None
        first = first or (show_source(task.sources[0]) if task.sources else "?")
        return f"{self._label(task.folder)}/? ({first})"

    def _source_failed(self, task: _FileTask, source: str, reason: str) -> None:
        shown = show_source(source)
        task.failed_sources.append(SourceAttempt(shown, reason))
        label = self._task_label(task)
        self.error_log.write(DOWNLOAD_FAILED, label, _about(shown, reason))
        more = "; trying the next source" if task.sources else ""
        self._say(f"{DOWNLOAD_FAILED} {label}: {_about(shown, reason)}{more}", "warning")

    # -- the run ------------------------------------------------------------

    async def run(self) -> ProvisionSummary:
        t0 = time.monotonic()
        self.reporter.stage("provisioning")
        self._pool = ThreadPoolExecutor(self.options.hash_workers, thread_name_prefix="hash")
        try:
            return await self._run(t0)
        except Exception as exc:
            self.reporter.stage("failed", f"provision_failed: {exc}")
            raise
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _check(self, path: Path, size: int | None, sha256: str | None) -> _DiskCheck:
        """Size and sha256 of ``path`` read from disk, in the hashing threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _check_file, path, size, sha256)

    async def _run(self, t0: float) -> ProvisionSummary:
        manifest, layout = self.manifest, self.layout
        check_workspace(manifest, layout.root)
        tasks = _file_tasks(manifest, layout)
        links = list(self.options.links)
        resolver = self._resolver
        own_resolver = resolver is None and bool(tasks or links)
        if resolver is None and (tasks or links):
            resolver = SourceResolver(SourceSettings.from_env())
        try:
            if resolver is not None:
                await self._resolve_round(resolver, tasks)
                if links:
                    tasks += self._place_links(links, tasks)
                    await self._resolve_round(resolver, tasks)
                _check_targets(manifest, layout, tasks)
            local = await self._write_local_files()
            nodes = asyncio.ensure_future(self._nodes_and_pip())
            t_dl = time.monotonic()
            try:
                if resolver is not None and tasks:
                    self.reporter.stage("downloading")
                    await self._download(resolver, tasks)
            except BaseException:
                nodes.cancel()
                with contextlib.suppress(BaseException):
                    await nodes
                raise
            download_elapsed = time.monotonic() - t_dl if tasks else 0.0
            node_results, pip_results = await nodes
        finally:
            if own_resolver and resolver is not None:
                await resolver.aclose()
        items = await self._validate(tasks, local, node_results, pip_results)
        summary = ProvisionSummary(
            items=items,
            elapsed_s=time.monotonic() - t0,
            download_elapsed_s=download_elapsed,
            strict=self.options.strict,
            error_log=self.error_log.path,
        )
        lines = summary.lines()
        self._say(lines[0])
        for line in lines[1:]:
            self._say(line, "warning")
        if not summary.ok:
            names = ", ".join(i.name for i in summary.missing_critical)
            self.reporter.stage("failed", f"provision_failed: critical items missing: {names}")
        return summary

    def _place_links(
        self, links: Sequence[DropboxLink], tasks: Sequence[_FileTask]
    ) -> list[_FileTask]:
        """Map a Dropbox workspace folder onto the workspace.

        A link to a file the manifest already names becomes that item's last source
        (the seeds' "Dropbox as fallback"); a link inside a custom node's folder is
        left out (git owns that folder); every other link is a file of its own.
        """
        by_path = {t.path: t for t in tasks if t.path is not None}
        node_dirs = [self.layout.node_path(n) for n in self.manifest.custom_nodes]
        extra: list[_FileTask] = []
        skipped = 0
        for i, link in enumerate(links):
            dest = workspace_path(self.layout.root, link.path)
            task = by_path.get(dest)
            if task is not None:
                task.sources.append(link.url)
                continue
            if any(dest.is_relative_to(d) for d in node_dirs):
                skipped += 1
                continue
            extra.append(
                _FileTask(
                    kind="transfer",
                    entry=["links", i],
                    folder=dest.parent,
                    name=dest.name,
                    sources=deque([link.url]),
                    sha256=None,
                    size=link.size,
                    critical=self.options.links_critical,
                )
            )
        if skipped:
            self._say(
                f"left out {skipped} Dropbox file{'s' if skipped != 1 else ''} inside custom "
                "nodes' folders: the nodes come from git at their pinned commits",
                "warning",
            )
        return extra

    # -- sources ------------------------------------------------------------

    async def _resolve_round(self, resolver: SourceResolver, tasks: Sequence[_FileTask]) -> None:
        """Give every task without a usable source its next source that resolves."""
        sem = asyncio.Semaphore(self.options.resolve_concurrency)

        async def one(task: _FileTask) -> None:
            async with sem:
                await self._resolve_next(resolver, task)

        await asyncio.gather(
            *(one(t) for t in tasks if not t.result_ok and t.resolved is None and t.sources)
        )

    async def _resolve_next(self, resolver: SourceResolver, task: _FileTask) -> None:
        while task.sources:
            source = task.sources.popleft()
            try:
                resolved = await resolver.resolve(source)
            except ComfyfleetError as exc:
                self._source_failed(task, source, str(exc))
                continue
            except Exception as exc:  # one broken source must not end the provision
                log.debug("resolving %s", show_source(source), exc_info=True)
                self._source_failed(task, source, f"{type(exc).__name__}: {exc}")
                continue
            problem = _disagreement(task, resolved)
            if problem is None:
                task.learn(resolved, show_source(source))
            if problem is None and task.name is None:
                problem = _bad_name(resolved.filename)
                if problem is None:
                    task.name = resolved.filename
            if problem is not None:
                self._source_failed(task, source, problem)
                continue
            task.resolved, task.source = resolved, source
            return

    # -- downloads ----------------------------------------------------------

    async def _download(self, resolver: SourceResolver, tasks: Sequence[_FileTask]) -> None:
        """Batches until every file is in place or out of sources.

        Each batch holds every file's current source; a file whose source failed for
        good gets its next one resolved and goes in the next batch.
        """
        board = _Board(self.reporter, self._label)
        await self._keep_what_is_there(tasks)
        while True:
            await self._resolve_round(resolver, tasks)
            _check_targets(self.manifest, self.layout, tasks)
            pending: list[_FileTask] = []
            items: list[DownloadItem] = []
            for t in tasks:
                if t.resolved is None or t.result_ok:
                    continue
                assert t.path is not None and t.source is not None
                try:
                    item = resolver.download_item(t.resolved, t.path, sha256=t.sha256, size=t.size)
                except ComfyfleetError as exc:
                    t.resolved = None
                    self._source_failed(t, t.source, str(exc))
                    continue
                pending.append(t)
                items.append(item)
                board.expect(t.path, item.size)
            if not items:
                if any(t.resolved is None and t.sources and not t.result_ok for t in tasks):
                    continue  # sources failed while making items: resolve the next ones
                return
            # After resolving: Civitai's storage hosts, learnt then, get its connection limit.
            overrides: dict[str, Any] = {"max_files": self.options.concurrency}
            overrides.update(self.options.download_overrides)
            options = resolver.download_options(**overrides)
            self._say(
                f"downloading {len(items)} file{'s' if len(items) != 1 else ''}, "
                f"{options.max_files} at once"
            )
            engine = Downloader(options, clock=self.clock, progress=board.on_event)
            try:
                batch = await engine.run(items)
            except InsufficientDiskSpace as exc:
                for t in pending:
                    assert t.source is not None
                    t.sources.clear()
                    t.resolved = None
                    self._source_failed(t, t.source, str(exc))
                return
            self._after_batch(pending, batch)

    async def _keep_what_is_there(self, tasks: Sequence[_FileTask]) -> None:
        """Files already in place with the expected size and sha256 skip the engine.

        Their bytes are read once, here, and validation takes this reading: a
        re-provision of a full workspace hashes each file once, not twice.
        """

        async def one(task: _FileTask) -> None:
            assert task.path is not None and task.source is not None
            disk = await self._check(task.path, task.size, task.sha256)
            if not disk.ok:
                return
            task.checked = disk
            task.result = FileResult(
                dest=task.path,
                url=show_source(task.source),
                status="present",
                size=disk.size,
                sha256=disk.sha256,
                expected_sha256=task.sha256,
            )
            self._say(f"already in place: {self._task_label(task)}")

        await asyncio.gather(
            *(
                one(t)
                for t in tasks
                if t.resolved is not None
                and t.path is not None
                and t.sha256 is not None
                and t.size is not None
                and not t.result_ok
            )
        )

    def _after_batch(self, pending: Sequence[_FileTask], batch: BatchSummary) -> None:
        for task, result in zip(pending, batch.results, strict=True):
            task.bytes_downloaded += result.bytes_downloaded
            task.result = result
            if result.ok:
                verb = "already in place" if result.status == "present" else "downloaded"
                self._say(f"{verb}: {self._task_label(task)}")
                continue
            assert task.source is not None
            task.resolved = None
            self._source_failed(task, task.source, result.reason or "failed")

    # -- local files --------------------------------------------------------

    async def _write_local_files(self) -> list[_LocalFile]:
        """Workflows and config files given inline or next to the manifest, written in place."""
        entries: list[tuple[ItemKind, Path, Workflow | ConfigFile]] = []
        for wf in self.manifest.workflows:
            if wf.source is None:
                assert wf.file_name is not None
                entries.append(("workflow", self.layout.workflows / wf.file_name, wf))
        for cf in self.manifest.config_files:
            if cf.source is None:
                entries.append(("config", self.layout.comfy / cf.path, cf))
        out: list[_LocalFile] = []
        for kind, path, entry in entries:
            local = _LocalFile(kind, self._label(path), path, b"", entry.critical)
            out.append(local)
            if entry.content is not None:
                local.data = entry.content.encode("utf-8")
            else:
                assert entry.file is not None
                source = self.manifest.local_file(entry.file)
                try:
                    local.data = await asyncio.to_thread(source.read_bytes)
                except OSError as exc:
                    local.problem = f"cannot read {source}: {exc.strerror or exc}"
                    continue
            actual = hashlib.sha256(local.data).hexdigest()
            if entry.sha256 is not None and actual != entry.sha256:
                # A file that is not what the manifest pins is not written at all.
                local.problem = f"sha256 mismatch: expected {entry.sha256}, got {actual}"
                continue
            await asyncio.to_thread(_write_if_changed, path, local.data)
        return out

    # -- nodes and pip ------------------------------------------------------

    async def _nodes_and_pip(
        self,
    ) -> tuple[list[tuple[NodeResult, str | None]], dict[str, str | None]]:
        """Checkout every node, then one pip install for all requirements and packages.

        Returns each node's result with its requirements' failure (or ``None``), and
        each extra package's failure (or ``None``).
        """
        nodes = self.manifest.custom_nodes
        sem = asyncio.Semaphore(self.options.node_concurrency)

        async def one(i: int) -> NodeResult:
            node = nodes[i]
            async with sem:
                self._say(f"custom node {node.folder}: checking out {node.commit[:12]}")
                result = await checkout(
                    node, self.layout.node_path(node), timeout_s=self.options.git_timeout_s
                )
            if result.ok:
                self._say(f"custom node {node.folder}: {result.status} at {node.commit[:12]}")
            else:
                label = self._label(result.path)
                self.error_log.write(INSTALL_FAILED, label, result.reason or "failed")
                self._say(f"{INSTALL_FAILED} {label}: {result.reason}", "error")
            return result

        results = list(await asyncio.gather(*(one(i) for i in range(len(nodes)))))
        jobs: list[tuple[str, list[Path], list[str]]] = []
        for r in results:
            req = has_requirements(r.path) if r.ok and r.node.requirements else None
            if req is not None:
                jobs.append((self._label(r.path), [req], []))
        jobs += [(f"pip {pkg}", [], [pkg]) for pkg in self.manifest.pip]
        failures = await self._pip(jobs)
        node_out = [(r, failures.get(self._label(r.path))) for r in results]
        pip_out = {pkg: failures.get(f"pip {pkg}") for pkg in self.manifest.pip}
        return node_out, pip_out

    async def _pip(
        self, jobs: Sequence[tuple[str, list[Path], list[str]]]
    ) -> dict[str, str | None]:
        """One pip run for everything; if it fails, one per job, to say which failed."""
        if not jobs:
            return {}
        args = list(self.manifest.pip_args)
        timeout = self.options.pip_timeout_s
        what = ", ".join(key for key, _, _ in jobs)
        self._say(f"pip install with {self._python}: {what}")
        try:
            await pip_install(
                self._python,
                requirements=[r for _, reqs, _ in jobs for r in reqs],
                packages=[p for _, _, pkgs in jobs for p in pkgs],
                args=args,
                timeout_s=timeout,
            )
            self._say("pip install: done")
            return {key: None for key, _, _ in jobs}
        except CommandFailed as exc:
            if len(jobs) == 1:
                self.error_log.write(INSTALL_FAILED, jobs[0][0], str(exc))
                self._say(f"{INSTALL_FAILED} {jobs[0][0]}: {exc}", "error")
                return {jobs[0][0]: str(exc)}
            self._say("pip install of everything failed; installing one at a time", "warning")
        out: dict[str, str | None] = {}
        for key, reqs, pkgs in jobs:
            try:
                await pip_install(
                    self._python, requirements=reqs, packages=pkgs, args=args, timeout_s=timeout
                )
                out[key] = None
            except CommandFailed as exc:
                out[key] = str(exc)
                self.error_log.write(INSTALL_FAILED, key, str(exc))
                self._say(f"{INSTALL_FAILED} {key}: {exc}", "error")
        return out

    # -- validation ---------------------------------------------------------

    async def _validate(
        self,
        tasks: Sequence[_FileTask],
        local: Sequence[_LocalFile],
        nodes: Sequence[tuple[NodeResult, str | None]],
        pip: Mapping[str, str | None],
    ) -> list[ItemResult]:
        """Read the disk again: every file's size and sha256, every node's commit."""
        items: list[ItemResult] = []

        async def again(task: _FileTask) -> _DiskCheck:
            if task.checked is not None:
                return task.checked  # read this run, before the downloads
            if task.path is None:
                return _DiskCheck(ok=False, exists=False, reason="missing: no source resolved")
            return await self._check(task.path, task.expected_size, task.expected_sha256)

        checks = await asyncio.gather(*(again(t) for t in tasks))
        for task, disk in zip(tasks, checks, strict=True):
            items.append(self._file_item(task, disk))
        local_checks = await asyncio.gather(
            *(self._check(f.path, len(f.data), hashlib.sha256(f.data).hexdigest()) for f in local)
        )
        for f, disk in zip(local, local_checks, strict=True):
            reason = f.problem or (None if disk.ok else disk.reason)
            items.append(
                ItemResult(
                    kind=f.kind,
                    name=f.name,
                    critical=f.critical,
                    status="failed" if reason else "written",
                    reason=reason,
                    path=f.path,
                    size=disk.size,
                    sha256=disk.sha256,
                )
            )
        for result, pip_failure in nodes:
            items.append(await self._node_item(result, pip_failure))
        for pkg, failure in pip.items():
            items.append(
                ItemResult(
                    kind="pip",
                    name=f"pip {pkg}",
                    critical=True,
                    status="failed" if failure else "installed",
                    reason=failure,
                )
            )
        for item in items:
            if not item.ok:
                self.error_log.write(VALIDATION_FAILED, item.name, item.reason or "failed")
        return items

    def _file_item(self, task: _FileTask, disk: _DiskCheck) -> ItemResult:
        name = self._task_label(task)
        if disk.ok:
            assert task.result is not None or disk.exists
            status: ItemStatus = (
                "downloaded"
                if task.result is not None and task.result.status == "downloaded"
                else "present"
            )
            return ItemResult(
                kind=task.kind,
                name=name,
                critical=task.critical,
                status=status,
                path=task.path,
                source=None if task.source is None else show_source(task.source),
                size=disk.size,
                sha256=disk.sha256,
                bytes_downloaded=task.bytes_downloaded,
                failed_sources=list(task.failed_sources),
            )
        failures = "; ".join(_about(a.source, a.reason) for a in task.failed_sources)
        if not task.failed_sources:
            reason = disk.reason
        elif disk.exists:
            reason = f"the file in place was kept ({disk.reason}); {failures}"
        else:
            reason = f"missing: {failures}"
        return ItemResult(
            kind=task.kind,
            name=name,
            critical=task.critical,
            status="failed",
            reason=reason,
            path=task.path,
            size=disk.size,
            bytes_downloaded=task.bytes_downloaded,
            failed_sources=list(task.failed_sources),
        )

    async def _node_item(self, result: NodeResult, pip_failure: str | None) -> ItemResult:
        node = result.node
        name = self._label(result.path)
        head = await head_commit(result.path)
        reason: str | None = None
        if not result.ok:
            reason = result.reason
        elif not result.path.is_dir():
            reason = f"{name} is missing"
        elif head != node.commit:
            reason = f"at commit {head or 'none'}, expected {node.commit}"
        elif pip_failure is not None:
            reason = f"requirements: {pip_failure}"
        return ItemResult(
            kind="node",
            name=name,
            critical=node.critical,
            status="failed" if reason else "installed",
            reason=reason,
            path=result.path,
            source=node.git,
            sha256=None,
        )


async def provision(
    manifest: Manifest,
    workspace: Path,
    *,
    resolver: SourceResolver | None = None,
    reporter: Reporter | None = None,
    options: ProvisionOptions | None = None,
    clock: Clock | None = None,
) -> ProvisionSummary:
    """Provision ``workspace`` from ``manifest``; see the module's documentation.

    Raises ``ManifestError`` (nothing installed or downloaded) for what the manifest
    gets wrong about this workspace; every other failure is in the summary.
    """
    return await Provisioner(
        manifest, workspace, resolver=resolver, reporter=reporter, options=options, clock=clock
    ).run()


def _about(source: str, reason: str) -> str:
    """``SOURCE: REASON``, unless the reason already starts with the source."""
    return reason if reason.startswith(source) else f"{source}: {reason}"


def _disagreement(task: _FileTask, resolved: ResolvedSource) -> str | None:
    """Why a source cannot deliver the bytes this file must be, or ``None``."""
    if task.sha256 is not None and resolved.sha256 and resolved.sha256.lower() != task.sha256:
        return (
            f"the source's sha256 is {resolved.sha256.lower()}, expected {task.sha256} "
            f"(from {task.sha256_from})"
        )
    if task.size is not None and resolved.size is not None and resolved.size != task.size:
        return (
            f"the source's size is {resolved.size} bytes, expected {task.size} "
            f"(from {task.size_from})"
        )
    return None


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class _LocalFile:
    """A workflow or config file from the manifest's own folder (or inline)."""

    kind: ItemKind
    name: str
    path: Path
    data: bytes
    critical: bool
    #: Why it was not written (unreadable, or not the bytes the manifest pins).
    problem: str | None = None


@dataclass(frozen=True)
class _DiskCheck:
    ok: bool
    exists: bool
    reason: str | None = None
    size: int | None = None
    sha256: str | None = None


def _check_file(path: Path, size: int | None, sha256: str | None) -> _DiskCheck:
    """Size and sha256 of ``path`` as read from disk now."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return _DiskCheck(ok=False, exists=False, reason="missing")
    except OSError as exc:
        return _DiskCheck(ok=False, exists=False, reason=f"cannot read: {exc.strerror or exc}")
    if not path.is_file():
        return _DiskCheck(ok=False, exists=True, reason="not a regular file")
    if size is not None and st.st_size != size:
        return _DiskCheck(
            ok=False,
            exists=True,
            reason=f"size {st.st_size} bytes, expected {size}",
            size=st.st_size,
        )
    if sha256 is None:
        return _DiskCheck(ok=True, exists=True, size=st.st_size)
    digest = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    actual = digest.hexdigest()
    if actual != sha256.lower():
        return _DiskCheck(
            ok=False,
            exists=True,
            reason=f"sha256 mismatch: expected {sha256.lower()}, got {actual}",
            size=st.st_size,
            sha256=actual,
        )
    return _DiskCheck(ok=True, exists=True, size=st.st_size, sha256=actual)


# ---------------------------------------------------------------- manifest check


@dataclass(frozen=True)
class SourceCheck:
    """One source of a model, resolved (or not)."""

    source: str
    ok: bool
    reason: str | None = None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None


@dataclass
class ModelCheck:
    """A model as a provision would see it: target, size and sha256, and where they come from."""

    index: int
    target: str | None
    critical: bool
    size: int | None
    sha256: str | None
    size_from: Literal["manifest", "source"] | None
    sha256_from: Literal["manifest", "source"] | None
    sources: list[SourceCheck]
    present: bool = False

    @property
    def ok(self) -> bool:
        return self.present or any(s.ok for s in self.sources)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "target": self.target,
            "critical": self.critical,
            "size": self.size,
            "sha256": self.sha256,
            "size_from": self.size_from,
            "sha256_from": self.sha256_from,
            "present": self.present,
            "ok": self.ok,
            "sources": [
                {
                    "source": s.source,
                    "ok": s.ok,
                    "reason": s.reason,
                    "filename": s.filename,
                    "size": s.size,
                    "sha256": s.sha256,
                }
                for s in self.sources
            ],
        }


@dataclass
class ManifestCheck:
    """What ``comfyfleet manifest check`` prints: models, and the bytes to download."""

    models: list[ModelCheck]
    custom_nodes: int
    resolved: bool

    @property
    def total_bytes(self) -> int:
        """Bytes of the models whose size is known."""
        return sum(m.size or 0 for m in self.models)

    @property
    def to_download_bytes(self) -> int:
        """Bytes not already in the workspace (every model when no workspace was given)."""
        return sum(m.size or 0 for m in self.models if not m.present)

    @property
    def unknown_sizes(self) -> list[ModelCheck]:
        return [m for m in self.models if m.size is None]

    @property
    def unresolvable(self) -> list[ModelCheck]:
        """Models that no source could resolve (only when sources were resolved)."""
        return [m for m in self.models if self.resolved and not m.ok]

    @property
    def ok(self) -> bool:
        """False when a critical model has no source that resolves."""
        return not any(m.critical for m in self.unresolvable)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "resolved": self.resolved,
            "custom_nodes": self.custom_nodes,
            "models": [m.to_json() for m in self.models],
            "total_bytes": self.total_bytes,
            "to_download_bytes": self.to_download_bytes,
            "unknown_sizes": [m.target for m in self.unknown_sizes],
            "unresolvable": [m.target for m in self.unresolvable],
        }


async def check_manifest(
    manifest: Manifest,
    *,
    resolver: SourceResolver | None = None,
    workspace: Path | None = None,
    resolve: bool = True,
    concurrency: int = 8,
) -> ManifestCheck:
    """Resolve every source of every model (metadata only) and add up the bytes.

    Sizes and hashes the manifest leaves out come from the first source that
    resolves. With ``workspace``, files already there at the right size count as
    present (and the symlink checks run). Raises ``ManifestError`` for two models
    whose sources give the same file name in one folder.
    """
    layout = manifest.layout(workspace if workspace is not None else Path("."))
    if workspace is not None:
        check_workspace(manifest, workspace)
    own = resolver is None and resolve and bool(manifest.models)
    if own:
        resolver = SourceResolver(SourceSettings.from_env())
    sem = asyncio.Semaphore(concurrency)

    async def one(source: str) -> SourceCheck:
        shown = show_source(source)
        if not resolve:
            return SourceCheck(shown, ok=False, reason="not resolved")
        assert resolver is not None
        async with sem:
            try:
                r = await resolver.resolve(source)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ComfyfleetError) else repr(exc)
                return SourceCheck(shown, ok=False, reason=reason)
        sha = r.sha256.lower() if r.sha256 else None
        return SourceCheck(shown, ok=True, filename=r.filename, size=r.size, sha256=sha)

    try:
        per_model = await asyncio.gather(
            *(asyncio.gather(*(one(s) for s in m.all_sources)) for m in manifest.models)
        )
    finally:
        if own and resolver is not None:
            await resolver.aclose()
    checks: list[ModelCheck] = []
    targets: dict[str, int] = {}
    for i, (model, sources) in enumerate(zip(manifest.models, per_model, strict=True)):
        good = [s for s in sources if s.ok]
        name = model.known_name or next((s.filename for s in good if s.filename), None)
        target = None if name is None else layout.relative(layout.model_path(model, name))
        if target is not None:
            if target in targets:
                raise manifest.error(
                    ["models", i],
                    f"same target as models[{targets[target]}]: {target}; set name: on one of them",
                )
            targets[target] = i
        src_size = next((s.size for s in good if s.size is not None), None)
        src_sha = next((s.sha256 for s in good if s.sha256), None)
        size = model.size if model.size is not None else src_size
        sha = model.sha256 or src_sha
        present = False
        if workspace is not None and name is not None and size is not None:
            path = layout.model_path(model, name)
            present = path.is_file() and path.stat().st_size == size
        checks.append(
            ModelCheck(
                index=i,
                target=target,
                critical=model.critical,
                size=size,
                sha256=sha,
                size_from=(
                    "manifest" if model.size is not None else "source" if size is not None else None
                ),
                sha256_from="manifest" if model.sha256 else "source" if sha else None,
                sources=list(sources),
                present=present,
            )
        )
    return ManifestCheck(models=checks, custom_nodes=len(manifest.custom_nodes), resolved=resolve)

"""Custom nodes on disk: git checkouts at pinned commits, and pip installs into ComfyUI's Python.

``checkout`` clones a node into ``custom_nodes/NAME`` (through a temporary folder
renamed into place, so a half-done clone never looks installed) and checks out
the pinned commit; a node already at that commit is left alone without touching
the network. ``pip_install`` runs ``PYTHON -m pip install`` as a child process.
Both run git and pip with prompts disabled and a deadline, so a private
repository or a stuck index fails with a reason instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from comfyfleet.manifest import CustomNode

__all__ = [
    "CommandFailed",
    "NodeResult",
    "checkout",
    "has_requirements",
    "head_commit",
    "pip_install",
    "run_command",
]

NodeStatus = Literal["cloned", "updated", "present", "failed"]

#: Never ask for credentials: a prompt nobody answers would hang the provision.
_GIT_ENV: Mapping[str, str] = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    "GCM_INTERACTIVE": "never",
}
_TAIL_LINES = 12


class CommandFailed(Exception):
    """A child process failed or ran past its deadline; the message ends with its output's tail."""


@dataclass
class NodeResult:
    """What ``checkout`` did to one node; ``head`` is the commit checked out (or ``None``)."""

    node: CustomNode
    path: Path
    status: NodeStatus
    reason: str | None = None
    head: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def _tail(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-_TAIL_LINES:])


async def run_command(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``args``; return its output (stdout and stderr), or raise ``CommandFailed``."""
    full_env = {**os.environ, **(env or {})}
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=cwd,
            env=full_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot run {args[0]}: {exc.strerror or exc}") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise CommandFailed(f"{' '.join(args[:3])} ran past its {timeout_s:g} s deadline") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(args[:3])} exited with {proc.returncode}: {_tail(text)}")
    return text


async def _git(*args: str, cwd: Path | None = None, timeout_s: float) -> str:
    env = dict(_GIT_ENV)
    if cwd is not None:
        # Never let git discover a repository above the node's folder (a workspace
        # that sits inside another checkout would answer with that one's HEAD).
        env["GIT_CEILING_DIRECTORIES"] = str(cwd.parent)
    return await run_command(["git", *args], cwd=cwd, timeout_s=timeout_s, env=env)


async def head_commit(path: Path, *, timeout_s: float = 60.0) -> str | None:
    """The commit checked out in ``path``, or ``None`` when it is not a git checkout."""
    if not (path / ".git").exists():
        return None
    try:
        out = await _git("rev-parse", "HEAD", cwd=path, timeout_s=timeout_s)
    except CommandFailed:
        return None
    return out.strip().lower() or None


async def _has_commit(path: Path, commit: str, timeout_s: float) -> bool:
    try:
        await _git("cat-file", "-e", f"{commit}^{{commit}}", cwd=path, timeout_s=timeout_s)
    except CommandFailed:
        return False
    return True


async def _fetch_commit(path: Path, node: CustomNode, timeout_s: float) -> None:
    """Make ``node.commit`` present in ``path``: the usual refs first, then the commit itself."""
    if await _has_commit(path, node.commit, timeout_s):
        return
    with contextlib.suppress(CommandFailed):
        await _git("fetch", "--quiet", "--tags", node.git, cwd=path, timeout_s=timeout_s)
    if await _has_commit(path, node.commit, timeout_s):
        return
    # Not on a branch or tag: ask for the object itself (GitHub serves reachable ids).
    with contextlib.suppress(CommandFailed):
        await _git("fetch", "--quiet", node.git, node.commit, cwd=path, timeout_s=timeout_s)
    if not await _has_commit(path, node.commit, timeout_s):
        raise CommandFailed(f"commit {node.commit} not found in {node.git}")


async def _checkout_commit(path: Path, node: CustomNode, timeout_s: float) -> None:
    await _fetch_commit(path, node, timeout_s)
    await _git("checkout", "--quiet", "--detach", node.commit, cwd=path, timeout_s=timeout_s)
    if (path / ".gitmodules").exists():
        await _git(
            "submodule", "update", "--init", "--recursive", "--quiet", cwd=path, timeout_s=timeout_s
        )


async def checkout(node: CustomNode, path: Path, *, timeout_s: float = 900.0) -> NodeResult:
    """Put ``node`` at its pinned commit in ``path``; never raises, the result says why not.

    A folder that is not a git checkout is left untouched (and reported), so a
    hand-installed node is never deleted.
    """
    try:
        found = _what_is_at(path)
        if found != "nothing":
            if found != "git":
                return NodeResult(
                    node,
                    path,
                    "failed",
                    f"{path} exists and is not a git checkout; move it away or remove "
                    "the node from the manifest",
                )
            if await head_commit(path) == node.commit:
                return NodeResult(node, path, "present", head=node.commit)
            await _checkout_commit(path, node, timeout_s)
            status: NodeStatus = "updated"
        else:
            await _clone(node, path, timeout_s)
            status = "cloned"
    except CommandFailed as exc:
        return NodeResult(node, path, "failed", str(exc), head=await head_commit(path))
    except OSError as exc:
        return NodeResult(node, path, "failed", f"{path}: {exc.strerror or exc}")
    head = await head_commit(path)
    if head != node.commit:
        return NodeResult(
            node, path, "failed", f"at commit {head}, expected {node.commit}", head=head
        )
    return NodeResult(node, path, status, head=head)


def _what_is_at(path: Path) -> Literal["nothing", "git", "other"]:
    if not (path.exists() or path.is_symlink()):
        return "nothing"
    return "git" if (path / ".git").exists() else "other"


async def _clone(node: CustomNode, path: Path, timeout_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.clone-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-clone
    tmp = path.parent / f".{path.name}.clone-{secrets.token_hex(4)}"
    try:
        await _git("clone", "--quiet", "--no-checkout", node.git, str(tmp), timeout_s=timeout_s)
        await _checkout_commit(tmp, node, timeout_s)
        tmp.rename(path)
    finally:
        if tmp.exists():
            await asyncio.to_thread(shutil.rmtree, tmp, True)


def has_requirements(path: Path) -> Path | None:
    """The node's ``requirements.txt`` when it names anything to install, else ``None``."""
    req = path / "requirements.txt"
    try:
        text = req.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return req
    return None


async def pip_install(
    python: str,
    *,
    requirements: Sequence[Path] = (),
    packages: Sequence[str] = (),
    args: Sequence[str] = (),
    timeout_s: float = 3600.0,
) -> None:
    """``PYTHON -m pip install [args] -r ... packages...``; raises ``CommandFailed``."""
    if not requirements and not packages:
        return
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args]
    for req in requirements:
        cmd += ["-r", str(req)]
    cmd += list(packages)
    await run_command(cmd, timeout_s=timeout_s, env={"PIP_NO_INPUT": "1"})

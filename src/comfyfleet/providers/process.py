"""Local "instance" processes: an onstart script run as a process tree this process owns.

The Vast.ai simulator (``sim/vast.py`` with ``run_onstart``) and the ``local`` provider
(``providers/local.py``) both run an instance's onstart script on this machine;
``LocalProcesses`` is the one place that starts such a script, tells whether it still
runs, and kills it with everything it started.

Each script runs as ``bash -c SCRIPT`` in a session of its own (so in its own process
group), in the instance's workspace, with its standard output and error appended to a
log file. Its environment is built from scratch: ``PATH``, ``HOME``, ``LANG`` and
``TMPDIR`` of this process (``base_env``), then the instance's variables. Nothing else
of this process's environment is inherited: ``VAST_API_KEY``, ``ADMIN_API_KEY`` and the
like stay here, as they would on a rented machine.

Killing the group is not enough: the agent starts ComfyUI in a session of its own (so
that ComfyUI outlives an agent restart). Every script therefore runs with a mark, the
variable ``COMFYFLEET_PROCESS_MARK`` set to a random value, which its children inherit.
``stop`` sends SIGTERM to the script's group, to every descendant (by parent pid) and to
every process that carries the mark (read from ``/proc/PID/environ``), then SIGKILL to
whatever is left after the grace period. Without ``/proc`` (not Linux) only the group
is signalled.

Stdlib only: importable without the server's dependencies.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "BASE_ENV_VARS",
    "MARK_VAR",
    "LocalProcesses",
    "base_env",
    "exit_text",
    "free_loopback_port",
    "instance_env_here",
    "read_tail",
]

#: The variable that marks every process a script started (its value is per script).
MARK_VAR: Final = "COMFYFLEET_PROCESS_MARK"
#: The only variables of this process's environment a script inherits.
BASE_ENV_VARS: Final = ("PATH", "HOME", "LANG", "TMPDIR")
_DEFAULT_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
_POLL_S: Final = 0.05
# After SIGKILL, how long to wait for the tree to be gone before giving up on it.
_KILL_WAIT_S: Final = 3.0
_TAIL_MAX_BYTES: Final = 1 << 20


def base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every script starts from: ``BASE_ENV_VARS`` of ``environ`` only.

    ``PATH`` and ``LANG`` get defaults when unset; ``PYTHONUNBUFFERED=1`` makes the
    agent's output reach the log as it is printed.
    """
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in BASE_ENV_VARS if environ.get(name)}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (instances on one machine share its ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def instance_env_here(
    asked: Mapping[str, str],
    host_env: Mapping[str, str],
    *,
    agent_python: str,
    workspace: Path,
    who: str,
) -> tuple[dict[str, str], str]:
    """The environment of an instance's onstart run on this machine, and a line saying so.

    The instance's own variables (``asked``), then ``host_env``, then the interpreter the
    agent runs with (``COMFYFLEET_AGENT_PYTHON``: no wheel to install) and ``WORKSPACE``
    moved to ``workspace``; a free ``COMFY_PORT`` unless one is set, since several
    instances share this machine's loopback. ``who`` names the instance in the line.
    """
    from comfyfleet.agent.bootstrap import AGENT_PYTHON_VAR

    env = {
        **asked,
        **host_env,
        AGENT_PYTHON_VAR: agent_python,
        "WORKSPACE": str(workspace),
    }
    if "COMFY_PORT" not in env:
        env["COMFY_PORT"] = str(free_loopback_port())
    wanted = asked.get("WORKSPACE")
    note = (
        f"{who}: WORKSPACE is {workspace} on this machine"
        + (f" (the instance asked for {wanted})" if wanted else "")
        + f"; COMFY_PORT {env['COMFY_PORT']}"
    )
    return env, note


def exit_text(code: int) -> str:
    """How a script ended, in words: ``exited with code 3`` or ``killed by SIGTERM``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"


def read_tail(path: Path, lines: int | None = None, *, max_bytes: int = _TAIL_MAX_BYTES) -> str:
    """The last ``lines`` lines of ``path`` (all of them when None), at most ``max_bytes``.

    A missing file reads as empty; undecodable bytes are replaced.
    """
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return ""
    if start > 0:
        # Cut at a line boundary: the first line read is likely a part of one.
        data = data[data.find(b"\n") + 1 :]
    text = data.decode("utf-8", "replace")
    if lines is None:
        return text
    if lines <= 0:
        return ""
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)


@dataclass
class _Record:
    key: int
    proc: subprocess.Popen[bytes]
    mark: str
    workspace: Path
    log_path: Path
    stopper: threading.Thread | None = field(default=None, repr=False)


class LocalProcesses:
    """The scripts this process runs for local instances, by key (a contract id).

    Thread-safe: the simulator's HTTP handlers, its watcher thread and the local
    provider's worker threads call it concurrently. A key keeps its record (exit code,
    log) after ``stop`` until ``forget``; a new ``start`` on the key replaces it once
    the previous script is gone.
    """

    def __init__(self, *, environ: Mapping[str, str] | None = None):
        self._base = base_env(environ)
        self._lock = threading.Lock()
        self._records: dict[int, _Record] = {}

    # ------------------------------------------------------------ starting

    def start(
        self,
        key: int,
        script: str,
        env: Mapping[str, str],
        workspace: Path,
        log_path: Path,
        *,
        note: str | None = None,
    ) -> int:
        """Run ``bash -c script`` for ``key``; returns its pid.

        It runs in a new session, in ``workspace`` (created if missing), with
        ``base_env()`` plus ``env``, its output appended to ``log_path`` after a header
        line (and ``note``, when given). Raises ``RuntimeError`` while the key's
        previous script still runs, ``OSError`` when it cannot be started.
        """
        with self._lock:
            old = self._records.get(key)
            if old is not None and old.proc.poll() is None:
                raise RuntimeError(
                    f"the script of {key} still runs (pid {old.proc.pid}): stop it first"
                )
            workspace.mkdir(parents=True, exist_ok=True)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            mark = secrets.token_hex(16)
            full_env = {**self._base, **env, MARK_VAR: mark}
            bash = shutil.which("bash", path=full_env.get("PATH")) or "/bin/bash"
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with log_path.open("ab") as log:
                log.write(f"=== {stamp} comfyfleet runs the onstart in {workspace}\n".encode())
                if note:
                    log.write(f"=== {note}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    [bash, "-c", script],
                    cwd=workspace,
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    start_new_session=True,
                )
            self._records[key] = _Record(key, proc, mark, workspace, log_path)
            return proc.pid

    # ------------------------------------------------------------ looking

    def _get(self, key: int) -> _Record | None:
        with self._lock:
            return self._records.get(key)

    def keys(self) -> list[int]:
        """Every key with a record (running or not), in order."""
        with self._lock:
            return sorted(self._records)

    def is_running(self, key: int) -> bool:
        """Whether the key's script (the session leader) is alive."""
        record = self._get(key)
        return record is not None and record.proc.poll() is None

    def exit_code(self, key: int) -> int | None:
        """The script's exit status (negative: killed by that signal); None while it runs
        or when the key is unknown."""
        record = self._get(key)
        return None if record is None else record.proc.poll()

    def pid(self, key: int) -> int | None:
        record = self._get(key)
        return None if record is None else record.proc.pid

    def log_tail(self, key: int, lines: int | None = 200) -> str:
        """The end of the key's log ("" when unknown)."""
        record = self._get(key)
        return "" if record is None else read_tail(record.log_path, lines)

    def members(self, key: int) -> set[int]:
        """The live processes of the key's tree: descendants and marked processes."""
        record = self._get(key)
        return set() if record is None else _members(record)

    # ------------------------------------------------------------ stopping

    def stop(self, key: int, grace_s: float = 5.0, *, wait: bool = True) -> int | None:
        """Kill the key's script and everything it started; returns its exit status.

        SIGTERM goes at once to the group, the descendants and the marked processes;
        whatever is left after ``grace_s`` gets SIGKILL, and the script is reaped.
        With ``wait=False`` only the SIGTERM happens in the caller's thread (the rest
        in a background thread) and None is returned. Unknown keys return None.
        """
        record = self._get(key)
        if record is None:
            return None
        with self._lock:
            stopper = record.stopper
            if stopper is None or not stopper.is_alive():
                signalled = _signal_tree(record, signal.SIGTERM)
                stopper = threading.Thread(
                    target=_finish,
                    args=(record, grace_s, signalled),
                    name=f"stop-local-process-{key}",
                    daemon=True,
                )
                record.stopper = stopper
                stopper.start()
        if not wait:
            return None
        stopper.join()
        return record.proc.poll()

    def forget(self, key: int) -> None:
        """Drop the key's record; its script must have been stopped first."""
        with self._lock:
            self._records.pop(key, None)

    def stop_all(self, grace_s: float = 5.0) -> None:
        """Stop every script at once and wait until all of them are gone."""
        for key in self.keys():
            self.stop(key, grace_s, wait=False)
        with self._lock:
            stoppers = [r.stopper for r in self._records.values() if r.stopper is not None]
        for stopper in stoppers:
            stopper.join()


# ---------------------------------------------------------------- the tree


def _process_table() -> dict[int, tuple[int, str]]:
    """``pid -> (ppid, state)`` of every process, from ``/proc``; empty without it."""
    table: dict[int, tuple[int, str]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces and parentheses.
        rest = raw[raw.rfind(b")") + 2 :].split()
        if len(rest) < 2:
            continue
        table[int(name)] = (int(rest[1]), rest[0].decode("ascii", "replace"))
    return table


def _carries(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:  # gone, or another user's
        return False
    return needle in data and needle in data.split(b"\0")


def _members(record: _Record) -> set[int]:
    table = _process_table()
    if not table:
        return set()
    me = os.getpid()
    needle = f"{MARK_VAR}={record.mark}".encode()
    alive = {pid for pid, (_, state) in table.items() if state != "Z" and pid != me}
    roots = {pid for pid in alive if _carries(pid, needle)}
    if record.proc.returncode is None and record.proc.pid in alive:
        roots.add(record.proc.pid)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found & alive


def _signal_tree(record: _Record, sig: signal.Signals, members: set[int] | None = None) -> set[int]:
    """Signal the script's group (while the script is not reaped) and ``members``
    (default: all of them now); returns the members signalled."""
    if members is None:
        members = _members(record)
    if record.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.proc.pid, sig)
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return members


def _finish(record: _Record, grace_s: float, signalled: set[int]) -> None:
    """Wait up to ``grace_s`` for the tree to go (SIGTERM to processes it starts
    meanwhile), SIGKILL what is left, reap the script."""
    deadline = time.monotonic() + max(0.0, grace_s)
    while True:
        record.proc.poll()
        members = _members(record)
        if record.proc.returncode is not None and not members:
            break
        if time.monotonic() >= deadline:
            kill_until = time.monotonic() + _KILL_WAIT_S
            while time.monotonic() < kill_until:
                _signal_tree(record, signal.SIGKILL, members)
                time.sleep(_POLL_S / 2)
                record.proc.poll()
                members = _members(record)
                if record.proc.returncode is not None and not members:
                    break
            break
        new = members - signalled
        if new:
            # A supervisor restarted something after the SIGTERM: it goes too.
            _signal_tree(record, signal.SIGTERM, new)
            signalled |= new
        time.sleep(_POLL_S)
    with contextlib.suppress(subprocess.TimeoutExpired):
        record.proc.wait(timeout=_KILL_WAIT_S)

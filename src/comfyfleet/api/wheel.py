"""The agent wheel the control plane serves at ``GET /api/agent/wheel``.

The instance installs the agent from the control plane itself, so the agent is
always the control plane's own version. The wheel is a configured file
(``COMFYFLEET_AGENT_WHEEL``) or is built once from the source tree this comfyfleet
runs from (``pip wheel --no-deps --no-build-isolation``, about a second), into
``<data dir>/agent-wheel/``. Its sha256 goes out in the ``X-Comfyfleet-Sha256``
header, which the onstart script (``comfyfleet.agent.bootstrap.onstart_script``,
re-exported here) checks before the install.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import comfyfleet
from comfyfleet.agent.bootstrap import SHA256_HEADER, onstart_script
from comfyfleet.errors import ConfigError

__all__ = ["SHA256_HEADER", "AgentWheel", "WheelFile", "onstart_script", "source_tree"]

_BUILD_TIMEOUT_S: Final = 300.0


@dataclass(frozen=True)
class WheelFile:
    path: Path
    sha256: str

    @property
    def filename(self) -> str:
        return self.path.name


def source_tree() -> Path | None:
    """The project folder this comfyfleet runs from (a checkout), or None (an installed wheel)."""
    root = Path(comfyfleet.__file__).resolve().parent.parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "src").is_dir() else None


class AgentWheel:
    """Locates or builds the agent wheel once; ``get`` is safe to call concurrently."""

    def __init__(self, *, path: Path | None, build_dir: Path, source: Path | None = None):
        self.configured = path
        self.build_dir = build_dir
        self.source = source if source is not None else source_tree()
        self._found: WheelFile | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> WheelFile:
        """The wheel and its sha256; raises ``ConfigError`` saying what to do when there is none."""
        if self._found is not None:
            return self._found
        async with self._lock:
            if self._found is None:
                self._found = await asyncio.to_thread(self._locate)
            return self._found

    def _locate(self) -> WheelFile:
        path = self.configured if self.configured is not None else self._build()
        if not path.is_file() or path.suffix != ".whl":
            raise ConfigError(
                "expected a .whl file (the agent wheel the instances install)",
                source=f"COMFYFLEET_AGENT_WHEEL={path}",
            )
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return WheelFile(path, digest.hexdigest())

    def _build(self) -> Path:
        if self.source is None:
            raise ConfigError(
                "this comfyfleet is installed without its source tree, so it cannot build the "
                "agent wheel: build one (pip wheel --no-deps comfyfleet) and set "
                "COMFYFLEET_AGENT_WHEEL to its path"
            )
        self.build_dir.mkdir(parents=True, exist_ok=True)
        for old in self.build_dir.glob("comfyfleet-*.whl"):
            old.unlink()
        command = [
            sys.executable,
            *("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"),
            *("-w", str(self.build_dir), str(self.source)),
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ConfigError(f"cannot build the agent wheel: {error}") from error
        built = sorted(self.build_dir.glob("comfyfleet-*.whl"))
        if done.returncode != 0 or not built:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise ConfigError(
                f"cannot build the agent wheel from {self.source}: {detail[0]}; "
                "or set COMFYFLEET_AGENT_WHEEL to a prebuilt one"
            )
        return built[-1]

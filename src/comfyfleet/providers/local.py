"""The ``local`` provider: "rent" this machine; an instance is its onstart run as a process.

Bring your own GPU: ``LocalProvider`` speaks the ``Provider`` protocol, so the pool rents,
watches and destroys local instances as it does Vast.ai contracts. It offers ``slots``
offers (default 1), all on this machine (its GPU as ``nvidia-smi`` names it, else
``local``); renting one runs the request's onstart (``comfyfleet.agent.bootstrap``'s
script) through ``LocalProcesses`` in ``<root>/<contract id>``, with
``COMFYFLEET_AGENT_PYTHON`` set to this interpreter so that the agent runs from this
installation instead of being downloaded. Destroying kills the script and everything it
started (ComfyUI included) and removes the workspace.

An instance is ``running`` while its script runs and ``exited`` once it ended
(``status_msg`` says how), until it is destroyed. Contract ids come from a counter kept
in ``root``, so they never repeat across restarts. Instances live as long as this
object: leaving ``async with`` (or ``aclose``) stops them all, and a later provider on the
same root does not know them.

``LocalProvider.from_env()`` reads ``COMFYFLEET_LOCAL_ROOT`` (default
``<data dir>/local-instances``), ``COMFYFLEET_LOCAL_SLOTS``, ``COMFYFLEET_LOCAL_DPH`` and
``COMFYFLEET_LOCAL_WORKSPACE`` (one fixed workspace, never removed: the folder of a
ComfyUI already installed here, which a profile's ``comfy_url`` attaches to).
"""

from __future__ import annotations

import asyncio
import fcntl
import getpass
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from comfyfleet.envvars import env_value
from comfyfleet.errors import ConfigError, InstanceNotFound, OfferUnavailable, ProviderError
from comfyfleet.providers.base import CreateRequest, Instance, Offer, Provider, UserInfo
from comfyfleet.providers.process import (
    LocalProcesses,
    exit_text,
    instance_env_here,
    read_tail,
)

__all__ = [
    "LOCAL_CREDIT",
    "LocalGpu",
    "LocalProvider",
    "detect_gpu",
    "parse_gpu_query",
]

#: What ``current_user`` reports: a local instance costs nothing to run, so the pool's
#: credit brake (which stops renting when credit runs low) must never hold it back.
LOCAL_CREDIT: Final = 1_000_000.0
#: The link speed offers advertise (Mb/s). The models are downloaded by this machine's
#: own link, whatever it is; the number only shapes the cost model's time estimate,
#: and with one machine there is nothing to rank it against.
LOCAL_INET_MBPS: Final = 10_000.0
FIRST_CONTRACT_ID: Final = 1
_COUNTER_FILE: Final = "next-contract-id"
_LOCK_FILE: Final = ".lock"
_NVIDIA_SMI_TIMEOUT_S: Final = 10.0
_CUDA_VERSION = re.compile(r"CUDA Version:\s*([0-9]+(?:\.[0-9]+)?)")


# ---------------------------------------------------------------- this machine


@dataclass(frozen=True)
class LocalGpu:
    """This machine's GPUs as offers show them: ``memory_mb`` per GPU (MiB, as Vast's
    ``gpu_ram``), ``cuda`` the driver's highest CUDA version (0: unknown)."""

    name: str = "local"
    count: int = 1
    memory_mb: float = 0.0
    cuda: float = 0.0
    driver: str | None = None


def parse_gpu_query(text: str) -> LocalGpu | None:
    """The GPUs of ``nvidia-smi --query-gpu=name,memory.total,driver_version
    --format=csv,noheader`` output (one line per GPU); None when it lists none.

    The name and memory are those of the first GPU (a rig holds one model); the
    driver column may be missing.
    """
    rows = [[cell.strip() for cell in line.split(",")] for line in text.splitlines()]
    rows = [row for row in rows if row and row[0]]
    if not rows:
        return None
    first = rows[0]
    memory = 0.0
    if len(first) > 1:
        match = re.match(r"([0-9.]+)", first[1])
        memory = float(match.group(1)) if match else 0.0
    driver = first[2] if len(first) > 2 and first[2] else None
    return LocalGpu(name=first[0], count=len(rows), memory_mb=memory, driver=driver)


def detect_gpu() -> LocalGpu:
    """This machine's GPUs from ``nvidia-smi``; ``LocalGpu()`` ("local") without one."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return LocalGpu()
    query = [
        binary,
        "--query-gpu=name,memory.total,driver_version",
        "--format=csv,noheader",
    ]
    try:
        listed = subprocess.run(
            query, capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=True
        )
        gpu = parse_gpu_query(listed.stdout)
        if gpu is None:
            return LocalGpu()
        summary = subprocess.run(
            [binary], capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return LocalGpu()
    match = _CUDA_VERSION.search(summary.stdout)
    if match:
        gpu = LocalGpu(gpu.name, gpu.count, gpu.memory_mb, float(match.group(1)), gpu.driver)
    return gpu


def _machine_id() -> int:
    """A number fixed for this host (from ``/etc/machine-id``, else the host name)."""
    try:
        seed = Path("/etc/machine-id").read_text().strip()
    except OSError:
        seed = ""
    seed = seed or socket.gethostname()
    return 1_000_000 + int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) % 9_000_000


def _free_disk_gb(path: Path) -> float:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free / 1e9
    except OSError:
        return 0.0


def _cpu_ram_mb() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 1e6
    except (ValueError, OSError, AttributeError):
        return 0.0


def _next_contract_id(root: Path) -> int:
    """The next contract id: from the counter in ``root``, under a file lock (several
    processes may share a root), and past every id whose folder or log is there."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / _LOCK_FILE).open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter = root / _COUNTER_FILE
        try:
            stored = int(counter.read_text().strip())
        except (OSError, ValueError):
            stored = FIRST_CONTRACT_ID
        stems = (entry.name.split(".", 1)[0] for entry in root.iterdir())
        used = [int(stem) for stem in stems if stem.isdigit()]
        contract = max([stored, *(u + 1 for u in used)])
        tmp = counter.with_name(_COUNTER_FILE + ".tmp")
        tmp.write_text(f"{contract + 1}\n")
        tmp.replace(counter)
        return contract


# ---------------------------------------------------------------- the provider


@dataclass
class _LocalInstance:
    id: int
    slot: int
    request: CreateRequest
    workspace: Path
    log_path: Path
    created_at: float
    gpu: LocalGpu


class LocalProvider:
    """The ``Provider`` for this machine. Use it as an async context manager::

        async with LocalProvider.from_env() as local:
            offers = await local.search_offers({}, allocated_storage_gb=40)

    ``slots``: how many instances may run at once (each one offer). ``dph_total``: the
    price offers and instances show ($/h; nothing is billed). ``agent_python``: the
    interpreter the onstart runs the agent with (default this one). ``host_env``:
    variables every instance's process gets on top of the request's (mirrors, tokens
    of this machine). ``gpu``: what to advertise instead of asking ``nvidia-smi``.
    ``stop_grace_s``: SIGTERM to SIGKILL at destroy. ``keep_workspaces``: leave a
    destroyed instance's folder in place. ``workspace``: the one folder every instance
    provisions (the ComfyUI already installed on this box, which the profile's
    ``comfy_url`` attaches to): one slot only, and never removed. ``environ``: where
    ``PATH``/``HOME``/``LANG``/``TMPDIR`` of the processes come from (default
    ``os.environ``; nothing else of it is passed on).
    """

    def __init__(
        self,
        root: Path,
        *,
        slots: int = 1,
        dph_total: float = 0.0,
        agent_python: str | None = None,
        host_env: Mapping[str, str] | None = None,
        gpu: LocalGpu | None = None,
        machine_id: int | None = None,
        stop_grace_s: float = 5.0,
        keep_workspaces: bool = False,
        workspace: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ):
        if slots < 1:
            raise ConfigError("the local provider needs at least 1 slot", field="slots")
        if workspace is not None and slots != 1:
            raise ConfigError(
                "one fixed workspace holds one instance at a time: expected 1 slot",
                field="slots",
            )
        if dph_total < 0:
            raise ConfigError("a price cannot be negative", field="dph_total")
        self.root = Path(root).expanduser().resolve()
        self.slots = int(slots)
        self.dph_total = float(dph_total)
        self.agent_python = agent_python or sys.executable
        self.host_env = dict(host_env or {})
        self.machine_id = _machine_id() if machine_id is None else int(machine_id)
        self.stop_grace_s = stop_grace_s
        self.workspace = Path(workspace).expanduser().resolve() if workspace else None
        self.keep_workspaces = keep_workspaces or self.workspace is not None
        self._gpu = gpu
        self._processes = LocalProcesses(environ=environ)
        self._instances: dict[int, _LocalInstance] = {}
        self._reserved: set[int] = set()  # slots being rented right now
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kw: Any) -> LocalProvider:
        """A provider configured from ``COMFYFLEET_LOCAL_ROOT``, ``COMFYFLEET_LOCAL_SLOTS``,
        ``COMFYFLEET_LOCAL_WORKSPACE`` and ``COMFYFLEET_LOCAL_DPH``; keyword arguments win."""
        env = os.environ if env is None else env
        root = kw.pop("root", None) or env_value(env, "COMFYFLEET_LOCAL_ROOT")
        if root is None:
            from comfyfleet.store.db import data_dir

            root = data_dir(env) / "local-instances"
        if "slots" not in kw and (raw := env_value(env, "COMFYFLEET_LOCAL_SLOTS")):
            kw["slots"] = _parse(raw, int, "COMFYFLEET_LOCAL_SLOTS", "a whole number")
        if "workspace" not in kw and (raw := env_value(env, "COMFYFLEET_LOCAL_WORKSPACE")):
            kw["workspace"] = Path(raw)
        if "dph_total" not in kw and (raw := env_value(env, "COMFYFLEET_LOCAL_DPH")):
            kw["dph_total"] = _parse(raw, float, "COMFYFLEET_LOCAL_DPH", "a price in $/h")
        return cls(Path(root), **kw)

    def __repr__(self) -> str:
        return f"LocalProvider(root={str(self.root)!r}, slots={self.slots})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every instance's processes (workspaces stay); no rental after this."""
        self._closed = True
        await asyncio.to_thread(self._processes.stop_all, self.stop_grace_s)

    # ------------------------------------------------------------ offers

    async def gpu(self) -> LocalGpu:
        """This machine's GPUs (asked of ``nvidia-smi`` once)."""
        if self._gpu is None:
            self._gpu = await asyncio.to_thread(detect_gpu)
        return self._gpu

    async def search_offers(
        self, query: dict[str, Any], *, allocated_storage_gb: float, limit: int | None = None
    ) -> list[Offer]:
        """This machine's free slots, one offer each (``id`` = the slot, 1..``slots``).

        ``query`` is not applied: there is only this machine, and the ranking checks a
        profile's requirements against what it really is (``comfyfleet.offers.rank``).
        """
        gpu = await self.gpu()
        free_gb = await asyncio.to_thread(_free_disk_gb, self.root)
        with self._lock:
            taken = self._taken_slots()
        offers = [
            self._offer(slot, gpu, free_gb)
            for slot in range(1, self.slots + 1)
            if slot not in taken
        ]
        return offers if limit is None else offers[: max(0, limit)]

    def _taken_slots(self) -> set[int]:
        return {inst.slot for inst in self._instances.values()} | self._reserved

    def _offer(self, slot: int, gpu: LocalGpu, free_gb: float) -> Offer:
        return Offer(
            id=slot,
            machine_id=self.machine_id,
            host_id=self.machine_id,
            num_gpus=gpu.count,
            gpu_name=gpu.name,
            gpu_ram=gpu.memory_mb,
            gpu_total_ram=gpu.memory_mb * gpu.count,
            cuda_max_good=gpu.cuda,
            driver_version=gpu.driver,
            cpu_cores_effective=float(os.cpu_count() or 1),
            cpu_ram=_cpu_ram_mb(),
            disk_space=round(free_gb, 1),
            inet_up=LOCAL_INET_MBPS,
            inet_down=LOCAL_INET_MBPS,
            direct_port_count=0,
            dph_base=self.dph_total,
            dph_total=self.dph_total,
            reliability=1.0,
            verification="verified",
            rentable=True,
            rented=False,
        )

    # ------------------------------------------------------------ instances

    async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
        """Run ``request.onstart`` in a new workspace for slot ``offer_id``; the contract id.

        ``OfferUnavailable`` when the slot does not exist or is taken, ``ProviderError``
        when the request has no onstart (there is no image to run here) or the script
        cannot be started.
        """
        if self._closed:
            raise ProviderError("the local provider is closed", code="closed")
        if not 1 <= offer_id <= self.slots:
            raise OfferUnavailable(
                f"no offer {offer_id} on this machine: its offers are 1..{self.slots}",
                status=404,
                code="no_such_ask",
            )
        if not (request.onstart or "").strip():
            raise ProviderError(
                "a local instance runs its request's onstart, and this request has none",
                status=400,
                code="invalid_args",
            )
        with self._lock:
            if offer_id in self._taken_slots():
                raise OfferUnavailable(
                    f"offer {offer_id} is taken: slot {offer_id} of this machine holds an "
                    "instance until it is destroyed",
                    status=404,
                    code="no_such_ask",
                )
            self._reserved.add(offer_id)
        try:
            gpu = await self.gpu()
            contract, workspace, log_path = await asyncio.to_thread(self._spawn, request)
            with self._lock:
                self._instances[contract] = _LocalInstance(
                    contract, offer_id, request, workspace, log_path, time.time(), gpu
                )
        finally:
            with self._lock:
                self._reserved.discard(offer_id)
        return contract

    def _spawn(self, request: CreateRequest) -> tuple[int, Path, Path]:
        contract = _next_contract_id(self.root)
        workspace = self.workspace or self.root / str(contract)
        log_path = self.root / f"{contract}.log"
        env, note = instance_env_here(
            request.env,
            self.host_env,
            agent_python=self.agent_python,
            workspace=workspace,
            who=f"local instance {contract}",
        )
        try:
            self._processes.start(
                contract, request.onstart or "", env, workspace, log_path, note=note
            )
        except OSError as error:
            raise ProviderError(
                f"cannot start local instance {contract} in {workspace}: {error.strerror or error}",
                code="start_failed",
            ) from error
        return contract, workspace, log_path

    def _known(self, instance_id: int) -> _LocalInstance:
        with self._lock:
            inst = self._instances.get(int(instance_id))
        if inst is None:
            raise InstanceNotFound(
                f"instance {instance_id} not found on this machine (destroyed, or never "
                "created by this provider)",
                status=404,
                code="no_such_instance",
            )
        return inst

    async def get_instance(self, instance_id: int) -> Instance:
        """One instance; ``InstanceNotFound`` once destroyed (or never created here)."""
        return self._instance(self._known(instance_id))

    async def list_instances(self) -> list[Instance]:
        """Every instance not destroyed, running or exited, by id."""
        with self._lock:
            known = sorted(self._instances.values(), key=lambda inst: inst.id)
        return [self._instance(inst) for inst in known]

    def _instance(self, inst: _LocalInstance) -> Instance:
        code = self._processes.exit_code(inst.id)
        pid = self._processes.pid(inst.id)
        now = time.time()
        if code is None:
            status, message = "running", f"onstart running as pid {pid}"
        else:
            status, message = "exited", f"onstart {exit_text(code)}"
        request = inst.request
        return Instance(
            id=inst.id,
            machine_id=self.machine_id,
            host_id=self.machine_id,
            actual_status=status,
            intended_status="running",
            cur_state="running",
            next_state="running",
            status_msg=message,
            label=request.label,
            image_uuid=request.image,
            image_runtype=request.runtype,
            onstart=request.onstart,
            extra_env=[[key, value] for key, value in request.env.items()],
            public_ipaddr="127.0.0.1",
            direct_port_count=0,
            num_gpus=inst.gpu.count,
            gpu_name=inst.gpu.name,
            gpu_ram=inst.gpu.memory_mb,
            disk_space=request.disk_gb,
            inet_up=LOCAL_INET_MBPS,
            inet_down=LOCAL_INET_MBPS,
            inet_down_cost=0.0,
            dph_base=self.dph_total,
            dph_total=self.dph_total,
            reliability2=1.0,
            start_date=inst.created_at,
            uptime_mins=round((now - inst.created_at) / 60.0, 3) if code is None else 0.0,
            workspace=str(inst.workspace),
        )

    async def destroy_instance(self, instance_id: int) -> None:
        """Kill the instance's processes (ComfyUI too), forget it, remove its workspace.

        Idempotent, as ``VastClient.destroy_instance``: an unknown id is already gone.
        The log (``<root>/<id>.log``) stays for a post-mortem.
        """
        with self._lock:
            inst = self._instances.pop(int(instance_id), None)
        if inst is None:
            return
        await asyncio.to_thread(self._processes.stop, inst.id, self.stop_grace_s)
        self._processes.forget(inst.id)
        if not self.keep_workspaces:
            await asyncio.to_thread(shutil.rmtree, inst.workspace, True)

    async def instance_logs(self, instance_id: int, *, tail: int | None = None) -> str:
        """The instance's onstart output (the agent's console), its last ``tail`` lines."""
        inst = self._known(instance_id)
        return await asyncio.to_thread(read_tail, inst.log_path, tail)

    # ------------------------------------------------------------ account

    async def current_user(self) -> UserInfo:
        """This machine's user, with ``LOCAL_CREDIT``: local has no bill to pay."""
        try:
            name = getpass.getuser()
        except (OSError, KeyError):  # no name in the environment nor the password database
            name = "local"
        return UserInfo(
            id=os.getuid(),
            username=name,
            credit=LOCAL_CREDIT,
            balance=LOCAL_CREDIT,
        )


def _parse(raw: str, kind: type[int] | type[float], name: str, what: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"expected {what}, got {raw!r}", source=name) from None


if TYPE_CHECKING:

    def _is_a_provider(provider: LocalProvider) -> Provider:
        """mypy proves here that ``LocalProvider`` satisfies ``base.Provider``."""
        return provider

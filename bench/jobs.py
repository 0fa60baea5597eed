"""Jobs through the control plane: dispatch latency and throughput (issue 5).

The control plane is the production app (``create_app`` over a SQLite store in a
temporary folder), served by uvicorn in its own process, as ``comfyfleet serve`` serves
it, without a reconcile loop: the instances are recorded in the store before it starts
(ready ones for parts 1 and 2), so that nothing but jobs and agents runs. Every job is
the same 0-second workflow (an empty image, saved), made distinct by a ``set`` override
of its file name prefix. Three measurements:

1. **Throughput** (target): 20 protocol-level fake agents in this process, one per
   instance, do the agent's full exchange for each job (``next`` long-poll: placed
   under a lease; a progress report with the prompt id: running; a 64 KiB output
   streamed with its sha256; ``finish`` with the output: succeeded), every transition
   committed by the control plane. ``BENCH_JOBS`` jobs (default 1000) are submitted
   through ``POST /api/jobs`` first; the figure is the jobs finished per second from the
   first ``next`` to the last ``finish``. Target: at least 100 jobs/s.
2. **Dispatch latency** (target): one warm instance whose agent is the real job worker
   (``agent/worker.py``) on a real ComfyUI simulator (``sim/comfy.py``), both in this
   process. ``BENCH_JOBS_LATENCY_RUNS`` jobs (default 200) are submitted one at a time
   through ``POST /api/jobs``; each one's latency runs from just before its submit request is
   sent to the ``execution_start`` ComfyUI records for its prompt (the prompt posted and
   taken up). Target: p50 under 50 ms; p99 printed.
3. **Real agent processes** (printed, no target): the exchange done by
   ``BENCH_JOBS_AGENTS`` (default 20; 0 skips this part) real ``comfyfleet agent
   connect`` processes, started here with the environment an instance's onstart gives
   them (no Vast simulator, no pool: the instances are recorded created). Each registers,
   provisions an empty manifest, starts its own ComfyUI simulator process, reports its
   instance ready, and runs jobs with the production worker (its outputs are the
   simulator's PNGs, a few hundred bytes). Once all are ready, ``BENCH_JOBS_AGENT_JOBS``
   jobs (default 200) are submitted at once; printed: the jobs finished per second from
   the first placed to the last finished, the median per job from placed to succeeded
   and from submitted to succeeded, and the CPU per job. On a 2-core machine this is
   20 agents and 20 simulators sharing the cores with the control plane: the figure is
   bound by CPU, not by waiting.

The baseline printed beside the throughput is the same loop with no control plane
work in it: the fake agents hitting ``/api/health`` four times per "job", what HTTP
over loopback alone allows from this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Final

import aiohttp
import httpx

from comfyfleet.providers.process import free_loopback_port

JOBS: Final = int(os.environ.get("BENCH_JOBS", "1000"))
AGENTS: Final = 20
LATENCY_RUNS: Final = int(os.environ.get("BENCH_JOBS_LATENCY_RUNS", "200"))
REAL_AGENTS: Final = int(os.environ.get("BENCH_JOBS_AGENTS", "20"))
AGENT_JOBS: Final = int(os.environ.get("BENCH_JOBS_AGENT_JOBS", "200"))
TARGET_JOBS_PER_S: Final = 100.0
TARGET_P50_MS: Final = 50.0
ADMIN_KEY: Final = "bench-admin-" + "k" * 32
PROFILE: Final = "bench"
OUTPUT: Final = os.urandom(64 * 1024)
OUTPUT_SHA256: Final = hashlib.sha256(OUTPUT).hexdigest()

COMFY: Final = [sys.executable, "-m", "comfyfleet.sim.comfy"]

# A workflow that takes 0 s on the ComfyUI simulator: an empty image, saved. It has no
# sampler, so a job is made distinct by a ``set`` override of its filename prefix.
WORKFLOW: Final[dict[str, Any]] = {
    "5": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
    },
    "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "bench"}},
}


# ---------------------------------------------------------------- the control plane


def serve_main(database_url: str, port: int, data_dir: str) -> None:
    """``bench/jobs.py --serve``: the control plane's app, as ``serve`` runs it."""
    import uvicorn
    from pydantic import SecretStr

    from comfyfleet.api.app import create_app
    from comfyfleet.api.server import uvicorn_config
    from comfyfleet.api.settings import AgentProfile, ApiSettings, ComfySpec
    from comfyfleet.clock import SystemClock
    from comfyfleet.store import Store

    store = Store.open(database_url)
    settings = ApiSettings(
        admin_api_key=SecretStr(ADMIN_KEY),
        data_dir=Path(data_dir),
        # What a real agent (part 3) is told at registration: nothing to provision, and
        # the ComfyUI simulator as its ComfyUI.
        profiles={PROFILE: AgentProfile(manifest={"version": 1}, comfy=ComfySpec(command=COMFY))},
    )
    app = create_app(store, settings, clock=SystemClock(), pool=None)
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port)).run()


class ControlPlane:
    """The app in a subprocess over a fresh SQLite store with ``instances`` instances:
    ready ones (``ready``), or ones just created, for real agents to register and ready."""

    def __init__(self, root: Path, instances: int, *, ready: bool = True) -> None:
        from comfyfleet.store import Store, migrate

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.database_url = f"sqlite:///{root / 'bench.db'}"
        migrate(self.database_url)
        self.store = Store.open(self.database_url)
        self.tokens = self._instances(instances, ready=ready)
        self.user_key = self._user_key()
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def _instances(self, count: int, *, ready: bool) -> list[tuple[int, str]]:
        from comfyfleet.store import InstanceState, create_instance, issue_token, transition

        now = time.time()
        states = (
            InstanceState.CREATING,
            InstanceState.BOOTING,
            InstanceState.PROVISIONING,
            InstanceState.STARTING_APP,
            InstanceState.READY,
        )

        def work(session: Any) -> list[tuple[int, str]]:
            made = []
            for slot in range(count):
                row = create_instance(
                    session,
                    fleet_id="bench",
                    profile=PROFILE,
                    slot=slot,
                    provider="vast",
                    now=now,
                    actor="bench",
                    dph_total=0.4,
                )
                for state in states if ready else states[:1]:
                    transition(session, row, state, reason="bench", actor="bench", now=now)
                made.append((row.id, issue_token(session, row)))
            return made

        return self.store.run_sync(work)

    def _user_key(self) -> str:
        from comfyfleet.store.apikeys import create_key

        return self.store.run_sync(lambda session: create_key(session, "bench", now=time.time()))[1]

    def __enter__(self) -> ControlPlane:
        with (self.root / "serve.log").open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    self.database_url,
                    str(self.port),
                    str(self.root / "data"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                # Stopped by __exit__ after the agents, not by a Ctrl-C before them.
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/api/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise SystemExit("bench jobs: the control plane did not start; see serve.log")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
        self.store.close()

    def cpu_seconds(self) -> float:
        """The CPU time the control plane's process has used (Linux)."""
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def log_tail(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")[-4000:]


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used, 0 when it is gone (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def submit(
    http: httpx.AsyncClient, key: str, overrides: list[str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"workflow": WORKFLOW, "profile": PROFILE}
    if overrides:
        body["set"] = overrides
    response = await http.post("/api/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
    if response.status_code != 201:
        raise SystemExit(f"bench jobs: submit answered {response.status_code}: {response.text}")
    return dict(response.json())


# ---------------------------------------------------------------- 1. throughput


def _finish_body(lease: str, prompt_id: str) -> dict[str, Any]:
    return {
        "lease_id": lease,
        "status": "succeeded",
        "prompt_id": prompt_id,
        "duration_s": 0.0,
        "outputs": [
            {
                "name": "bench.png",
                "kind": "images",
                "node_id": "9",
                "sha256": OUTPUT_SHA256,
                "size": len(OUTPUT),
                "content_type": "image/png",
                "temporary": False,
            }
        ],
    }


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    *,
    expect: int = 200,
    **options: Any,
) -> Any:
    async with http.request(method, path, **options) as response:
        if response.status != expect:
            body = await response.text()
            raise SystemExit(f"bench jobs: {method} {path} answered {response.status}: {body}")
        return await response.json()


async def fake_agent(
    http: aiohttp.ClientSession, instance_id: int, token: str, done: list[float], total: int
) -> None:
    """The agent's exchange for each job it gets, until ``total`` jobs are done."""
    auth = {"Authorization": f"Bearer {token}"}
    while len(done) < total:
        answer = await _call(
            http,
            "GET",
            "/api/agent/jobs/next",
            params={"instance_id": instance_id, "wait": 1},
            headers=auth,
        )
        job = answer["job"]
        if job is None:
            continue
        job_id, lease = job["job_id"], job["lease_id"]
        base = f"/api/agent/jobs/{job_id}"
        prompt_id = str(uuid.uuid4())
        progress = {"state": "queued", "percent": 0.0, "prompt_id": prompt_id}
        await _call(
            http,
            "POST",
            base + "/progress",
            json={"lease_id": lease, "progress": progress},
            headers=auth,
        )
        await _call(
            http,
            "PUT",
            base + "/outputs/bench.png",
            expect=201,
            data=OUTPUT,
            headers={**auth, "X-Comfyfleet-Lease": lease, "X-Comfyfleet-Sha256": OUTPUT_SHA256},
        )
        ended = await _call(
            http, "POST", base + "/finish", json=_finish_body(lease, prompt_id), headers=auth
        )
        if ended["state"] != "succeeded":
            raise SystemExit(f"bench jobs: job {job_id} ended {ended['state']}")
        done.append(time.monotonic())


async def baseline_agent(http: aiohttp.ClientSession, done: list[float], total: int) -> None:
    """The loop with no control plane work in it: four calls of ``/api/health`` a "job"."""
    while len(done) < total:
        for _ in range(4):
            await _call(http, "GET", "/api/health")
        done.append(time.monotonic())


async def throughput(plane: ControlPlane) -> tuple[float, float]:
    """(jobs/s through the control plane, loops/s of the HTTP-alone baseline)."""
    connector = aiohttp.TCPConnector(limit=AGENTS * 2)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(plane.url, connector=connector, timeout=timeout) as http:
        baseline_done: list[float] = []
        started = time.monotonic()
        await asyncio.gather(*(baseline_agent(http, baseline_done, JOBS) for _ in range(AGENTS)))
        baseline = len(baseline_done) / (max(baseline_done) - started)

        submitted = time.monotonic()
        async with httpx.AsyncClient(base_url=plane.url, timeout=60) as users:
            for start in range(0, JOBS, 50):
                await asyncio.gather(
                    *(submit(users, plane.user_key) for _ in range(min(50, JOBS - start)))
                )
        print(
            f"submitted {JOBS} jobs through POST /api/jobs in {time.monotonic() - submitted:.1f} s",
            flush=True,
        )
        done: list[float] = []
        cpu_before = plane.cpu_seconds(), time.process_time()
        started = time.monotonic()
        await asyncio.gather(
            *(
                fake_agent(http, instance_id, token, done, JOBS)
                for instance_id, token in plane.tokens
            )
        )
        rate = len(done) / (max(done) - started)
        server_cpu = plane.cpu_seconds() - cpu_before[0]
        agents_cpu = time.process_time() - cpu_before[1]
    print(
        f"CPU per job: control plane {server_cpu / len(done) * 1000:.2f} ms, "
        f"fake agents {agents_cpu / len(done) * 1000:.2f} ms",
        flush=True,
    )
    return rate, baseline


# ---------------------------------------------------------------- 2. dispatch latency


async def dispatch_latency(plane: ControlPlane, root: Path) -> list[float]:
    from comfyfleet.agent.comfy import ComfyClient
    from comfyfleet.agent.worker import JobsClient, JobWorker
    from comfyfleet.clock import SystemClock
    from comfyfleet.sim.comfy import ComfySimConfig, RunningComfySim

    instance_id, token = plane.tokens[0]
    latencies: list[float] = []
    with RunningComfySim(ComfySimConfig(base_directory=root / "comfy")) as comfy:
        stop = asyncio.Event()
        async with (
            JobsClient(plane.url + "/api", token, instance_id) as jobs,
            ComfyClient(comfy.url, clock=SystemClock()) as client,
            httpx.AsyncClient(base_url=plane.url, timeout=30) as http,
        ):
            worker = JobWorker(jobs, client, workdir=root / "work")
            running = asyncio.create_task(worker.run(stop))
            await asyncio.sleep(0.5)  # the worker's first long-poll is waiting
            for run in range(LATENCY_RUNS):
                sent = time.time()
                view = await submit(http, plane.user_key, [f"9.filename_prefix=bench-{run}"])
                ended = await _ended(http, plane.user_key, view["id"])
                prompt_id = (ended.get("result") or {}).get("prompt_id")
                if ended["state"] != "succeeded" or not prompt_id:
                    raise SystemExit(f"bench jobs: job {view['id']} ended {ended['state']}")
                history = (await client.history(prompt_id)).get(prompt_id, {})
                start_ms = next(
                    m[1]["timestamp"]
                    for m in history["status"]["messages"]
                    if m[0] == "execution_start"
                )
                latencies.append(start_ms / 1000.0 - sent)
            stop.set()
            await running
    return latencies


async def _ended(http: httpx.AsyncClient, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = (
            await http.get(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
        ).json()
        if view["state"] in ("succeeded", "failed", "cancelled"):
            return dict(view)
        await asyncio.sleep(0.005)
    raise SystemExit(f"bench jobs: job {job_id} did not end within 30 s")


def percentile(values: list[float], q: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, round(q * (len(ranked) - 1))))]


# ---------------------------------------------------------------- 3. real agent processes


class RealAgents:
    """A ``comfyfleet agent connect`` process for each instance of ``plane``, with the
    environment an instance's onstart gives it; each starts its own ComfyUI simulator.
    On the way out every agent is stopped (SIGTERM, SIGKILL after 30 s), then any ComfyUI
    simulator a killed agent left behind (it runs in its own session)."""

    def __init__(self, plane: ControlPlane, root: Path) -> None:
        self.plane = plane
        self.root = root
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> RealAgents:
        command = [str(Path(sys.executable).with_name("comfyfleet")), "agent", "connect"]
        ports: set[int] = set()
        try:
            for instance_id, token in self.plane.tokens:
                workspace = self.root / f"instance-{instance_id}"
                (workspace / "ComfyUI").mkdir(parents=True)  # where the simulator runs
                port = free_loopback_port()
                while port in ports or port == self.plane.port:
                    port = free_loopback_port()
                ports.add(port)
                env = {
                    **os.environ,
                    "COMFYFLEET_URL": self.plane.url + "/api",
                    "COMFYFLEET_TOKEN": token,
                    "DM_INSTANCE_ID": str(instance_id),
                    "SERVER_TYPE": PROFILE,
                    "WORKSPACE": str(workspace),
                    "COMFY_PORT": str(port),
                }
                with (workspace / "agent.log").open("wb") as log:
                    self.processes.append(
                        subprocess.Popen(
                            command,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,  # stopped by __exit__, not by a Ctrl-C
                        )
                    )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in self.comfy_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def comfy_pids(self) -> list[int]:
        """The ComfyUI simulators the agents started and that still run (their pid files)."""
        pids = []
        for pid_file in self.root.glob("instance-*/comfyui.pid"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pid = int(json.loads(pid_file.read_text())["pid"])
                if b"comfyfleet.sim.comfy" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return pids

    def cpu_seconds(self) -> float:
        """The CPU time the agents and their ComfyUI simulators have used (Linux)."""
        pids = [process.pid for process in self.processes] + self.comfy_pids()
        return sum(cpu_seconds(pid) for pid in pids)

    def check_running(self) -> None:
        for process, (instance_id, _) in zip(self.processes, self.plane.tokens, strict=True):
            if process.poll() is not None:
                log = self.root / f"instance-{instance_id}" / "agent.log"
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(
                    f"bench jobs: the agent of instance {instance_id} exited "
                    f"{process.returncode}:\n{tail}"
                )

    def wait_ready(self, within_s: float) -> float:
        """Seconds until every instance is ready, reported so by its agent."""
        from sqlalchemy import func, select

        from comfyfleet.store import InstanceRow, InstanceState

        started = time.monotonic()
        query = select(func.count()).where(InstanceRow.state == InstanceState.READY)
        while (self.plane.store.run_sync(lambda session: session.scalar(query)) or 0) < len(
            self.processes
        ):
            self.check_running()
            if time.monotonic() - started > within_s:
                raise SystemExit(f"bench jobs: the agents were not all ready within {within_s} s")
            time.sleep(0.1)
        return time.monotonic() - started


def ended_jobs(plane: ControlPlane) -> list[tuple[str, float, float | None, float | None]]:
    """(state, created_at, placed_at, finished_at) of every job that has ended."""
    from sqlalchemy import select

    from comfyfleet.store import JOB_TERMINAL_STATES, JobRow

    query = select(JobRow.state, JobRow.created_at, JobRow.placed_at, JobRow.finished_at).where(
        JobRow.state.in_(JOB_TERMINAL_STATES)
    )
    rows = plane.store.run_sync(lambda session: session.execute(query).all())
    return [(str(state), created, placed, finished) for state, created, placed, finished in rows]


async def submit_all(plane: ControlPlane, count: int) -> None:
    async with httpx.AsyncClient(base_url=plane.url, timeout=60) as users:
        for start in range(0, count, 50):
            await asyncio.gather(
                *(
                    submit(users, plane.user_key, [f"9.filename_prefix=agents-{n}"])
                    for n in range(start, min(start + 50, count))
                )
            )


def real_agents(root: Path) -> str:
    """The line that says what the real agents did."""
    with (
        ControlPlane(root, REAL_AGENTS, ready=False) as plane,
        RealAgents(plane, root / "instances") as agents,
    ):
        try:
            ready_s = agents.wait_ready(120)
            print(
                f"{REAL_AGENTS} real agents registered and ready in {ready_s:.1f} s",
                flush=True,
            )
            cpu_before = plane.cpu_seconds(), agents.cpu_seconds()
            asyncio.run(submit_all(plane, AGENT_JOBS))
            deadline = time.monotonic() + 120
            while len(ended := ended_jobs(plane)) < AGENT_JOBS:
                agents.check_running()
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"bench jobs: {len(ended)} of {AGENT_JOBS} jobs ended in 120 s"
                    )
                time.sleep(0.1)
            server_cpu = plane.cpu_seconds() - cpu_before[0]
            agents_cpu = agents.cpu_seconds() - cpu_before[1]
        except (httpx.HTTPError, SystemExit):
            print(plane.log_tail(), file=sys.stderr)
            raise
    failed = [state for state, *_ in ended if state != "succeeded"]
    if failed:
        raise SystemExit(f"bench jobs: {len(failed)} of the real agents' jobs did not succeed")
    placed = [p for _, _, p, _ in ended if p is not None]
    finished = [f for _, _, _, f in ended if f is not None]
    rate = len(ended) / (max(finished) - min(placed))
    in_agent = statistics.median(f - p for _, _, p, f in ended if p is not None and f is not None)
    overall = statistics.median(f - c for _, c, _, f in ended if f is not None)
    return (
        f"real agents: {rate:.0f} jobs/s with {REAL_AGENTS} `comfyfleet agent connect` "
        f"processes, each on its own ComfyUI simulator ({len(ended)} jobs submitted at once); "
        f"median per job {in_agent * 1000:.0f} ms placed → succeeded, "
        f"{overall * 1000:.0f} ms submitted → succeeded; CPU per job: control plane "
        f"{server_cpu / len(ended) * 1000:.2f} ms, agents and ComfyUI "
        f"{agents_cpu / len(ended) * 1000:.2f} ms (no target)"
    )


# ---------------------------------------------------------------- main


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        root = Path(tmp)
        with ControlPlane(root / "throughput", AGENTS) as plane:
            try:
                rate, baseline = asyncio.run(throughput(plane))
            except (httpx.HTTPError, SystemExit):
                print(plane.log_tail(), file=sys.stderr)
                raise
        print(
            f"throughput: {rate:.0f} jobs/s with {AGENTS} fake agents, every transition "
            f"committed (baseline, HTTP alone: {baseline:.0f} loops/s)",
            flush=True,
        )
        with ControlPlane(root / "latency", 1) as plane:
            try:
                latencies = asyncio.run(dispatch_latency(plane, root / "latency"))
            except (httpx.HTTPError, SystemExit):
                print(plane.log_tail(), file=sys.stderr)
                raise
        p50 = percentile(latencies, 0.5) * 1000
        p99 = percentile(latencies, 0.99) * 1000
        print(
            f"dispatch: submit → prompt taken up by ComfyUI: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"mean {statistics.fmean(latencies) * 1000:.1f} ms over {len(latencies)} jobs "
            "submitted one at a time",
            flush=True,
        )
        if REAL_AGENTS > 0:
            print(real_agents(root / "agents"), flush=True)
    print(f"bench jobs-dispatch: {p50:.1f} ms p50 (target < {TARGET_P50_MS:g})")
    print(f"bench jobs-throughput: {rate:.0f} jobs/s (target >= {TARGET_JOBS_PER_S:g})")
    return 0 if rate >= TARGET_JOBS_PER_S and p50 < TARGET_P50_MS else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        sys.exit(0)
    # A SIGTERM unwinds like a Ctrl-C, so that every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench jobs: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)

"""Jobs end to end on the simulators: submit, place, run, collect; and every way a job ends.

Nothing is a double. ``running_fleet`` (tests/test_pool_e2e.py) builds the control plane
as ``comfyfleet serve`` does over the Vast simulator, whose instances run the real agent
(``comfyfleet agent connect``) with ``sim/comfy.py`` as their ComfyUI. A user submits
with a key of their own (``comfyfleet keys create``, made here through the store) over
HTTP, with ``ControlClient`` and with the ``comfyfleet run`` and ``comfyfleet up
--onstart-job`` commands as subprocesses; the agents take the jobs, run them on their
ComfyUI, upload what it wrote and report the end. What a user would check is checked:
each job's end and attempts, its trail, and its outputs as the API serves them, byte for
byte against the files the simulated ComfyUI wrote in its instance's workspace.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy.orm import Session

from comfyfleet.control_client import ControlClient
from comfyfleet.store import Store, create_key, job_trail
from comfyfleet.store.instances import audit_trail
from tests.conftest import BIN, run_cli
from tests.test_pool_e2e import ADMIN_KEY, COMFY, Fleet, S, running_fleet

#: Generous: the agents boot on a loaded 2-core machine.
JOBS_WITHIN = 120.0
ENDED = ("succeeded", "failed", "cancelled")


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


# img2img on the checkpoint the manifest downloads: the input image is encoded, sampled
# (the simulator's stand-in KSampler: ``--step-seconds`` per step) and saved.
IMG2IMG: dict[str, Any] = {
    "1": node("LoadImage", image="placeholder.png"),
    "2": node("CheckpointLoaderSimple", ckpt_name="base.safetensors"),
    "3": node("CLIPTextEncode", text="a cat", clip=["2", 1]),
    "4": node("CLIPTextEncode", text="blurry", clip=["2", 1]),
    "5": node("VAEEncode", pixels=["1", 0], vae=["2", 2]),
    "6": node(
        "KSampler",
        seed=1,
        steps=2,
        cfg=1.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=0.5,
        model=["2", 0],
        positive=["3", 0],
        negative=["4", 0],
        latent_image=["5", 0],
    ),
    "7": node("VAEDecode", samples=["6", 0], vae=["2", 2]),
    "8": node("SaveImage", images=["7", 0], filename_prefix="out"),
}


# ------------------------------------------------------------------ helpers


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """The input image of the jobs: ``in.png``."""
    path = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (200, 40, 90)).save(path, format="PNG")
    return path


def user_key(store: Store, name: str = "alice") -> str:
    """A user's key, as ``comfyfleet keys create`` makes it."""

    def work(session: Session) -> str:
        _, key = create_key(session, name, now=time.time())
        return key

    return store.run_sync(work)


class User:
    """A user of the jobs API with their own key."""

    def __init__(self, fleet: Fleet, key: str) -> None:
        self.fleet = fleet
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}

    def client(self) -> ControlClient:
        return ControlClient(self.fleet.server.url, admin_key=None, api_key=self.key)

    def submit(self, workflow: dict[str, Any], inputs: list[Path], **params: Any) -> str:
        """``POST /api/jobs`` as multipart (``ControlClient.submit_job``); the job's id."""

        async def go() -> dict[str, Any]:
            async with self.client() as control:
                return await control.submit_job(workflow, inputs, params)

        view = asyncio.run(go())
        assert view["state"] == "queued", view
        return str(view["id"])

    def submit_json(self, workflow: dict[str, Any], inputs: list[Path], **params: Any) -> str:
        """``POST /api/jobs`` as JSON, the inputs in base64; the job's id."""
        encoded = {path.name: base64.b64encode(path.read_bytes()).decode() for path in inputs}
        answer = httpx.post(
            self.fleet.server.url + "/api/jobs",
            headers=self.headers,
            json={"workflow": workflow, "inputs": encoded, **params},
            timeout=60,
        )
        assert answer.status_code == 201, answer.text
        assert answer.json()["state"] == "queued", answer.text
        return str(answer.json()["id"])

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.fleet.server.url + path, headers=self.headers, timeout=30)

    def job(self, job_id: str) -> dict[str, Any]:
        answer = self.get(f"/api/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        view: dict[str, Any] = answer.json()
        return view

    def jobs(self) -> dict[str, dict[str, Any]]:
        answer = self.get("/api/jobs?limit=500")
        assert answer.status_code == 200, answer.text
        return {view["id"]: view for view in answer.json()["jobs"]}

    def wait_job(
        self, job_id: str, *states: str, timeout: float = JOBS_WITHIN, **fields: Any
    ) -> dict[str, Any]:
        """The job's view once it is in one of ``states`` (and, with a ``progress`` key
        given, its progress has it at least at that value)."""

        def reached() -> dict[str, Any] | None:
            view = self.job(job_id)
            if view["state"] not in states:
                return None
            for name, least in fields.items():
                progress = view.get("progress") or {}
                if (progress.get(name) or 0) < least:
                    return None
            return view

        return self.fleet.wait(f"job {job_id} to reach {', '.join(states)}", reached, timeout)

    def output(self, job_id: str, name: str) -> tuple[bytes, str]:
        """An output's bytes as the API serves it, and the sha256 it announces."""
        answer = self.get(f"/api/jobs/{job_id}/outputs/{name}")
        assert answer.status_code == 200, answer.text
        return answer.content, answer.headers["X-Comfyfleet-Sha256"]


@contextmanager
def jobs_fleet(store: Store, tmp_path: Path, **options: Any) -> Iterator[Fleet]:
    """``running_fleet``, whose agents are stopped first on the way out, while the control
    plane still answers them: an agent's long poll (``next?wait=20``) left open would hold
    the server's shutdown for its whole grace period."""
    with running_fleet(store, tmp_path, **options) as fleet:
        try:
            yield fleet
        finally:
            processes = fleet.sim.sim.processes
            if processes is not None:
                processes.stop_all(5.0)


def workspace(fleet: Fleet, instance_id: int) -> Path:
    contract = fleet.row(instance_id).provider_contract_id
    assert contract is not None
    return fleet.sim.sim.workspace_root / str(contract)


def engine_outputs(fleet: Fleet, instance_id: int) -> Path:
    """Where the instance's ComfyUI (the simulator) saves what a workflow outputs."""
    return workspace(fleet, instance_id) / "ComfyUI" / "output"


def comfy_url(fleet: Fleet, instance_id: int) -> str:
    """The instance's ComfyUI, as its agent reported it in the provision log."""
    (log,) = (fleet.data_dir / "logs").glob(f"provision_{instance_id}_*.log")
    found = re.search(r"ComfyUI is ready at (http://[^\s,]+)", log.read_text())
    assert found, log.read_text()
    return found.group(1)


def trail(fleet: Fleet, job_id: str) -> list[tuple[str, int, str]]:
    """The job's moves: (state, attempt, reason)."""
    rows = fleet.store.run_sync(lambda s: job_trail(s, job_id))
    return [(r.to_state.value, r.attempt, r.reason) for r in rows]


def assert_outputs_are_the_engines(
    user: User, view: dict[str, Any], engine_dir: Path, prefix: str
) -> None:
    """Every output of the job is served byte for byte as the engine wrote it, with the
    sha256 announced in the view and the answer's header."""
    assert view["outputs"], view
    for output in view["outputs"]:
        assert output["name"].startswith(prefix), output
        served, announced = user.output(view["id"], output["name"])
        written = (engine_dir / output["name"]).read_bytes()
        assert served == written
        digest = hashlib.sha256(written).hexdigest()
        assert announced == output["sha256"] == digest
        assert output["size"] == len(written)
        assert output["content_type"] == "image/png"


def ready_instances(fleet: Fleet, count: int) -> list[int]:
    def ready() -> list[int] | None:
        found = [r.id for r in fleet.rows() if r.state is S.READY]
        return found if len(found) >= count else None

    return fleet.wait(f"{count} ready instance(s)", ready)


# ------------------------------------------------------------------ 50 jobs, 3 instances


def test_fifty_jobs_run_once_each_across_three_instances_with_the_engines_outputs(
    store: Store, tmp_path: Path, image: Path, clean_env: dict[str, str]
) -> None:
    workflow_file = tmp_path / "img2img.json"
    workflow_file.write_text(json.dumps(IMG2IMG))
    with jobs_fleet(store, tmp_path, min_ready=3, max_instances=3) as fleet:
        user = User(fleet, user_key(store))
        instances = ready_instances(fleet, 3)

        # One job through the command a user types, the 49 others over the API: as
        # multipart (what the command sends) and as JSON, in turn.
        out = tmp_path / "cli-out"
        env = {**clean_env, "COMFYFLEET_SERVER": fleet.server.url, "COMFYFLEET_API_KEY": user.key}
        cli = subprocess.Popen(
            [
                str(BIN / "comfyfleet"),
                "run",
                str(workflow_file),
                "--image",
                str(image),
                "--prompt",
                "a lighthouse at dusk",
                "--set",
                "KSampler.steps=3",
                "--set",
                "8.filename_prefix=cli",
                "--out",
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            submitted = {
                (user.submit if n % 2 else user.submit_json)(
                    IMG2IMG,
                    [image],
                    prompt=f"job {n}",
                    set=[f"SaveImage.filename_prefix=job{n:02d}"],
                ): f"job{n:02d}_"
                for n in range(49)
            }
            stdout, stderr = cli.communicate(timeout=JOBS_WITHIN)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        assert cli.returncode == 0, stdout + stderr
        found = re.search(r"submitted job (\S+)", stdout)
        assert found, stdout
        submitted[found.group(1)] = "cli_"
        assert len(submitted) == 50

        def all_ended() -> dict[str, dict[str, Any]] | None:
            views = user.jobs()
            ended = [v for v in views.values() if v["state"] in ENDED]
            return views if len(ended) == len(submitted) else None

        views = fleet.wait("the 50 jobs to end", all_ended, JOBS_WITHIN)
        assert set(views) == set(submitted)
        assert {v["state"] for v in views.values()} == {"succeeded"}, [
            (v["id"], v["state"], v["error"]) for v in views.values() if v["error"]
        ]

        # Each ran once: one placement, one start, one success.
        for job_id in submitted:
            assert views[job_id]["attempts"] == 1
            assert [state for state, _, _ in trail(fleet, job_id)] == [
                "queued",
                "placed",
                "running",
                "succeeded",
            ]
        # The three instances all ran jobs, one at a time each (the default cap).
        by_instance: dict[int, list[dict[str, Any]]] = {}
        for view in views.values():
            by_instance.setdefault(view["instance_id"], []).append(view)
        assert sorted(by_instance) == sorted(instances)
        for ran in by_instance.values():
            ran.sort(key=lambda v: v["placed_at"])
            for before, after in itertools.pairwise(ran):
                assert after["placed_at"] >= before["finished_at"], (before, after)

        # Outputs are the engine's bytes, from the instance that ran the job; no other
        # ComfyUI ran it (each job saves under a prefix of its own).
        for job_id, prefix in submitted.items():
            view = views[job_id]
            assert [o["name"] for o in view["outputs"]] == [f"{prefix}00001_.png"]
            assert_outputs_are_the_engines(
                user, view, engine_outputs(fleet, view["instance_id"]), prefix
            )
            made = [
                (instance_id, path.name)
                for instance_id in instances
                for path in engine_outputs(fleet, instance_id).glob(f"{prefix}*")
            ]
            assert made == [(view["instance_id"], f"{prefix}00001_.png")]

        # The command saved the same bytes in --out.
        cli_job = views[found.group(1)]
        (saved,) = sorted(out.iterdir())
        assert saved.name == "cli_00001_.png"
        assert saved.read_bytes() == user.output(cli_job["id"], saved.name)[0]
        assert f"job {cli_job['id']} succeeded" in stdout


# ------------------------------------------------------------------ faults
#
# The 50 jobs above and the instance that dies (where row locks decide who holds the
# job) run on SQLite and PostgreSQL; the tests after them on SQLite only: what they add
# is the agent's and the reconciler's behaviour, with no SQL of its own (the store's moves
# they make are tested on both databases in test_jobs_store.py), and a fleet per database
# would add a minute to this file.


def slow(steps: int, prefix: str) -> list[str]:
    """``set`` overrides for a long sampling (``steps`` steps of ``--step-seconds``)."""
    return [f"KSampler.steps={steps}", f"SaveImage.filename_prefix={prefix}"]


def kill_instance(fleet: Fleet, instance_id: int) -> None:
    """The instance dies: every process of its onstart (the agent, its ComfyUI) is
    SIGKILLed at once, with no chance to report anything."""
    contract = fleet.row(instance_id).provider_contract_id
    assert contract is not None
    processes = fleet.sim.sim.processes
    assert processes is not None
    members = processes.members(contract)
    assert len(members) >= 2, members  # the agent and its ComfyUI at least
    for pid in members:
        os.kill(pid, signal.SIGKILL)


def test_a_job_whose_instance_dies_mid_job_completes_elsewhere_exactly_once(
    store: Store, tmp_path: Path, image: Path
) -> None:
    comfy = [*COMFY, "--step-seconds", "0.1"]
    with jobs_fleet(
        store, tmp_path, min_ready=2, max_instances=2, comfy=comfy, api={"job_lease_ttl_s": 3.0}
    ) as fleet:
        user = User(fleet, user_key(store))
        first, second = ready_instances(fleet, 2)
        job_id = user.submit(IMG2IMG, [image], set=slow(40, "survivor"))
        running = user.wait_job(job_id, "running", value=3)
        victim = running["instance_id"]
        survivor = second if victim == first else first
        kill_instance(fleet, victim)
        # Its lease (3 s without a renewal) or the pool's heartbeat rule (3 missed at 1 s),
        # whichever sees the death first, puts the job back in the queue, attempt counted.

        done = user.wait_job(job_id, *ENDED)
        assert done["state"] == "succeeded", done
        assert (done["attempts"], done["instance_id"]) == (2, survivor)
        moves = trail(fleet, job_id)
        assert [(state, attempt) for state, attempt, _ in moves] == [
            ("queued", 0),
            ("placed", 1),
            ("running", 1),
            ("queued", 1),
            ("placed", 2),
            ("running", 2),
            ("succeeded", 2),
        ]
        assert f"placed on instance {victim}" in moves[1][2]
        assert moves[3][2].startswith("queued again after attempt 1 of 3"), moves[3]
        assert f"placed on instance {survivor}" in moves[4][2]

        # Its outputs are the surviving attempt's, made once; the dead one made none.
        (output,) = done["outputs"]
        assert output["name"] == "survivor_00001_.png"
        assert_outputs_are_the_engines(user, done, engine_outputs(fleet, survivor), "survivor")
        made = sorted(p.name for p in engine_outputs(fleet, survivor).glob("survivor*"))
        assert made == ["survivor_00001_.png"]
        assert not list(engine_outputs(fleet, victim).glob("survivor*"))
        # The dead instance is failed for it, as the pool's heartbeat rule says.
        dead = fleet.wait_state(victim, S.FAILED, S.DESTROYED)
        assert dead.state is S.FAILED and (dead.failure_reason or "").startswith(
            "heartbeat_lost"
        ), dead.failure_reason


def comfy_history(fleet: Fleet, instance_id: int, prompt_id: str) -> dict[str, Any] | None:
    """What the instance's ComfyUI recorded of a prompt once it ended (``GET /history``)."""
    answer = httpx.get(f"{comfy_url(fleet, instance_id)}/history/{prompt_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    entry: dict[str, Any] | None = answer.json().get(prompt_id)
    return entry


def interrupted(fleet: Fleet, instance_id: int, prompt_id: str) -> dict[str, Any] | None:
    """ComfyUI's record of the prompt, if it says the prompt was interrupted."""
    entry = comfy_history(fleet, instance_id, prompt_id)
    if entry is None:
        return None
    events = [event for event, _ in entry["status"]["messages"]]
    stopped = entry["status"]["status_str"] == "error" and "execution_interrupted" in events
    return entry if stopped else None


def test_a_cancelled_job_is_interrupted_and_its_instance_takes_the_next_job(
    sqlite_store: Store, tmp_path: Path, image: Path
) -> None:
    store = sqlite_store
    comfy = [*COMFY, "--step-seconds", "0.1"]
    with jobs_fleet(store, tmp_path, min_ready=1, max_instances=1, comfy=comfy) as fleet:
        user = User(fleet, user_key(store))
        (instance_id,) = ready_instances(fleet, 1)
        # 200 steps: 20 s, unless it is interrupted.
        job_id = user.submit(IMG2IMG, [image], set=slow(200, "cancelled"))
        running = user.wait_job(job_id, "running", value=2)
        prompt_id = running["progress"]["prompt_id"]
        assert prompt_id

        async def cancel() -> dict[str, Any]:
            async with user.client() as control:
                return await control.cancel_job(job_id)

        asked = asyncio.run(cancel())
        assert asked["cancel_requested"] is True and asked["state"] == "running", asked
        ended = user.wait_job(job_id, *ENDED, timeout=15)
        assert ended["state"] == "cancelled", ended
        assert ended["error"] == "cancelled at the user's request"
        assert ended["outputs"] == []
        assert ended["finished_at"] - ended["started_at"] < 15  # well before its 20 s
        assert [state for state, _, _ in trail(fleet, job_id)] == [
            "queued",
            "placed",
            "running",
            "running",  # the cancel request, for the agent to act on
            "cancelled",
        ]
        # ComfyUI was interrupted mid-sampling: no image was saved.
        assert interrupted(fleet, instance_id, prompt_id), comfy_history(
            fleet, instance_id, prompt_id
        )
        assert not list(engine_outputs(fleet, instance_id).glob("cancelled*"))

        # The instance is free again and runs the next job.
        next_id = user.submit(IMG2IMG, [image], set=slow(2, "after"))
        after = user.wait_job(next_id, *ENDED, timeout=30)
        assert (after["state"], after["instance_id"]) == ("succeeded", instance_id), after
        assert_outputs_are_the_engines(user, after, engine_outputs(fleet, instance_id), "after")


def test_a_job_past_its_timeout_is_interrupted_and_failed_with_the_reason(
    sqlite_store: Store, tmp_path: Path, image: Path
) -> None:
    store = sqlite_store
    comfy = [*COMFY, "--step-seconds", "0.1"]
    with jobs_fleet(store, tmp_path, min_ready=1, max_instances=1, comfy=comfy) as fleet:
        user = User(fleet, user_key(store))
        (instance_id,) = ready_instances(fleet, 1)
        # 200 steps: 20 s, with a timeout of 2 s.
        job_id = user.submit(IMG2IMG, [image], set=slow(200, "late"), timeout_s=2)
        ended = user.wait_job(job_id, *ENDED, timeout=30)
        assert ended["state"] == "failed", ended
        # Whichever sees the deadline first, the agent or the control plane's sweep.
        assert re.match(r"timed out: .*past its timeout of [\d.]+ s", ended["error"]), ended
        assert ended["attempts"] == 1 and ended["outputs"] == []
        assert ended["finished_at"] - ended["placed_at"] < 15
        assert [state for state, _, _ in trail(fleet, job_id)] == [
            "queued",
            "placed",
            "running",
            "failed",
        ]
        # ComfyUI had the prompt running, and was interrupted: by the agent at its own
        # deadline, or by the agent refused on its next report after the sweep's.
        prompt_id = ended["progress"]["prompt_id"]
        fleet.wait(
            "ComfyUI to record the interrupt",
            lambda: interrupted(fleet, instance_id, prompt_id),
            15,
        )
        assert not list(engine_outputs(fleet, instance_id).glob("late*"))
        next_id = user.submit(IMG2IMG, [image], set=slow(2, "after"))
        after = user.wait_job(next_id, *ENDED, timeout=30)
        assert (after["state"], after["instance_id"]) == ("succeeded", instance_id), after


def test_a_job_survives_its_websocket_dropping_again_and_again(
    sqlite_store: Store, tmp_path: Path, image: Path
) -> None:
    store = sqlite_store
    comfy = [*COMFY, "--step-seconds", "0.2", "--drop-websockets-every", "0.5"]
    with jobs_fleet(store, tmp_path, min_ready=1, max_instances=1, comfy=comfy) as fleet:
        user = User(fleet, user_key(store))
        (instance_id,) = ready_instances(fleet, 1)
        log = workspace(fleet, instance_id) / "comfyui.log"
        drops_before = log.read_text().count("[sim] dropped")
        # 15 steps of 0.2 s: 3 s of sampling, a drop every 0.5 s.
        job_id = user.submit(IMG2IMG, [image], set=slow(15, "flaky"))
        done = user.wait_job(job_id, *ENDED, timeout=60)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 1
        assert log.read_text().count("[sim] dropped") - drops_before >= 3
        assert_outputs_are_the_engines(user, done, engine_outputs(fleet, instance_id), "flaky")


# ------------------------------------------------------------------ OnStart


def test_up_onstart_job_runs_the_job_collects_its_outputs_and_the_instance_goes(
    sqlite_store: Store, tmp_path: Path, image: Path, clean_env: dict[str, str]
) -> None:
    store = sqlite_store
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "flow.json").write_text(json.dumps(IMG2IMG))
    (job_dir / "job.json").write_text(
        json.dumps(
            {
                "workflow": "flow.json",
                "inputs": {"in.png": str(image)},
                "prompt": "a red fox",
                "set": ["KSampler.steps=3", "SaveImage.filename_prefix=onstart"],
                "timeout_s": 120,
            }
        )
    )
    collected = tmp_path / "collected"
    with jobs_fleet(store, tmp_path, min_ready=0, max_instances=1) as fleet:
        env = {**clean_env, "COMFYFLEET_SERVER": fleet.server.url, "ADMIN_API_KEY": ADMIN_KEY}
        result = run_cli(
            "up",
            "sdxl",
            "--onstart-job",
            str(job_dir / "job.json"),
            "--collect",
            str(collected),
            "--destroy-after",
            "--timeout",
            "120",
            env=env,
            timeout=JOBS_WITHIN,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        (row,) = fleet.rows()  # the only instance: the job's own
        job_id = row.onstart_job_id
        assert job_id is not None
        assert f"job {job_id} succeeded on instance {row.id}" in result.stdout

        admin = User(fleet, ADMIN_KEY)
        view = admin.job(job_id)
        assert (view["state"], view["attempts"], view["instance_id"]) == ("succeeded", 1, row.id)
        assert sorted(p.name for p in collected.iterdir()) == [
            "onstart_00001_.png",
            f"provision_{row.id}.log",
        ]
        written = (engine_outputs(fleet, row.id) / "onstart_00001_.png").read_bytes()
        assert (collected / "onstart_00001_.png").read_bytes() == written
        assert_outputs_are_the_engines(admin, view, engine_outputs(fleet, row.id), "onstart")
        assert "STAGE ready" in (collected / f"provision_{row.id}.log").read_text()

        # The pool destroys it once its job has ended, and says why.
        gone = fleet.wait_state(row.id, S.DESTROYED, S.FAILED, timeout=30)
        assert gone.state is S.DESTROYED
        moves = store.run_sync(lambda s: audit_trail(s, row.id))
        (destroying,) = [m for m in moves if m.to_state == "destroying"]
        assert destroying.reason.startswith("onstart_done"), destroying.reason
        fleet.wait("the instance's agent to stop", lambda: not fleet.agent_pids() or None, 15)

"""OnStart rentals: an instance rented for one job, destroyed once that job has ended.

The reconciler runs against the Vast simulator and a real store, as in
``tests/test_reconciler.py`` (whose fixtures and helpers these tests share); the agent
does not run here, so what it would do (register, report ready, run the job, upload
its outputs) is written through the API or the store, and the tests say so. The last
tests drive the admin route and ``comfyfleet up --onstart-job`` against a served
control plane whose pool is that reconciler.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from comfyfleet.api import AgentProfile, ApiSettings, ComfySpec, RunningServer, create_app
from comfyfleet.api.control import OnStartJob, PoolActionRefused
from comfyfleet.clock import ManualClock
from comfyfleet.commands.fleet import load_onstart_job
from comfyfleet.errors import ConfigError
from comfyfleet.lifecycle import JobState
from comfyfleet.pool.planner import Abandon, Destroy, Replace
from comfyfleet.pool.reconciler import Reconciler
from comfyfleet.sim.vast import RunningSim
from comfyfleet.store import InstanceState, Store, active_blocks, transition
from comfyfleet.store.jobs import (
    complete_job,
    fail_job,
    get_job,
    job_trail,
    place_job,
    record_output,
    request_cancel,
)
from comfyfleet.store.models import JobRow
from tests.conftest import BIN, REPO
from tests.test_reconciler import (
    RUNNING_AFTER,
    T0,
    contracts,
    live,
    profile,
    reconciler,
    register_and_report_ready_as_the_api_would,
    rows,
    sim_config,
    tick,
    trail,
)

S = InstanceState
ADMIN_KEY = "admin-key-for-the-onstart-tests"
WORKFLOWS = REPO / "examples" / "workflows"
JOB = OnStartJob({"workflow": {"9": {"class_type": "SaveImage", "inputs": {}}}}, timeout_s=120)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=T0)


@pytest.fixture
def sim(clock: ManualClock) -> Iterator[RunningSim]:
    with RunningSim(sim_config(), clock=clock) as running:
        yield running


def job_row(store: Store, job_id: str) -> JobRow:
    with store.transaction() as session:
        return get_job(session, job_id)


def kinds_and_reasons(actions: Any) -> list[tuple[str, str | None]]:
    return [(type(a).__name__, getattr(a, "reason", None)) for a in actions]


async def rented_and_ready(rec: Reconciler, store: Store, clock: ManualClock) -> tuple[int, str]:
    """An OnStart rental, rented by a pass and reported ready as the API would."""
    rental = await rec.rent_for_job("sdxl", JOB, actor="admin")
    await tick(rec)
    clock.advance(RUNNING_AFTER + 1)
    await tick(rec)
    register_and_report_ready_as_the_api_would(store, clock, rental.instance_id)
    return rental.instance_id, rental.job_id


# ------------------------------------------------------------------ the rental


async def test_an_onstart_rental_records_the_instance_and_its_reserved_job_together(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=1, max_instances=3)}
    async with reconciler(store, sim, clock, fleet) as rec:
        rental = await rec.rent_for_job("sdxl", JOB, actor="admin")
        (row,) = live(store)
        assert (row.id, row.state, row.slot) == (rental.instance_id, S.REQUESTED, None)
        assert row.onstart_job_id == rental.job_id
        assert trail(store, row.id)[0][2] == (
            f"OnStart rental for job {rental.job_id}, requested by admin"
        )
        job = job_row(store, rental.job_id)
        assert (job.state, job.pinned_instance_id) == (JobState.QUEUED, row.id)
        assert (job.max_attempts, job.timeout_s, job.request) == (1, 120, JOB.request)

        # The pass rents it, and rents the pool's min_ready beside it: an OnStart instance
        # is no warm instance, and its job is not in the queue the pool rents for.
        report = await tick(rec)
        assert report.queued == {}
        assert sorted(report.rented) == sorted([row.id, row.id + 1])
        onstart, warm = live(store)
        assert (onstart.state, onstart.slot) == (S.CREATING, None)
        assert (warm.slot, warm.onstart_job_id) == (0, None)
        assert len(contracts(sim, clock)) == 2


async def test_an_onstart_rental_counts_in_the_caps_and_is_refused_beyond_them(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=1, max_instances=1)}
    async with reconciler(store, sim, clock, fleet) as rec:
        await tick(rec)
        with pytest.raises(PoolActionRefused, match="at its caps: 1 of max_instances 1"):
            await rec.rent_for_job("sdxl", JOB, actor="admin")
        with store.transaction() as session:
            assert session.query(JobRow).count() == 0  # no job without its instance


# ------------------------------------------------------------------ its end


async def test_the_pool_destroys_an_onstart_instance_once_its_job_succeeded_and_blocks_nothing(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=1)}
    async with reconciler(store, sim, clock, fleet) as rec:
        instance_id, job_id = await rented_and_ready(rec, store, clock)
        # Its agent takes its job (as the dispatcher places it) and runs it: it stays.
        with store.transaction() as session:
            lease = place_job(session, job_id, instance_id, clock.now())
        assert not (await tick(rec)).actions
        assert live(store)[0].state is S.BUSY

        with store.transaction() as session:
            complete_job(session, job_id, lease, {"outputs": []}, clock.now())
        report = await tick(rec)
        assert kinds_and_reasons(report.actions) == [("Destroy", "onstart_done")]
        assert live(store)[0].state is S.DESTROYING
        assert contracts(sim, clock) == []
        with store.transaction() as session:
            assert active_blocks(session, clock.now()) == []

        await tick(rec)
        assert [r.state for r in rows(store)] == [S.DESTROYED]  # and nothing rented after it


async def test_a_job_that_fails_or_times_out_ends_its_onstart_instance_too(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=2)}
    async with reconciler(store, sim, clock, fleet) as rec:
        failing, failing_job = await rented_and_ready(rec, store, clock)
        slow, slow_job = await rented_and_ready(rec, store, clock)
        with store.transaction() as session:
            lease = place_job(session, failing_job, failing, clock.now())
            place_job(session, slow_job, slow, clock.now())
            fail_job(session, failing_job, lease, "KSampler: out of memory", clock.now())
        report = await tick(rec)
        assert [(a.instance_id, a.reason) for a in report.actions if isinstance(a, Destroy)] == [
            (failing, "onstart_failed")
        ]

        # Past its timeout: the pass's sweep fails the job and the same pass ends it.
        clock.advance(121)
        register_and_report_ready_as_the_api_would(store, clock, slow)
        report = await tick(rec)
        assert report.ended_jobs == (slow_job,)
        assert [(a.instance_id, a.reason) for a in report.actions if isinstance(a, Destroy)] == [
            (slow, "onstart_failed")
        ]
        assert job_row(store, slow_job).error == "timed out: it ran past its timeout of 120 s"


async def test_a_reserved_job_fails_with_the_reason_when_its_onstart_instance_fails(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    sim.sim.set_faults({"next_instances": ["no_space"]})
    fleet = {"sdxl": profile(min_ready=0, max_instances=1)}
    async with reconciler(store, sim, clock, fleet) as rec:
        rental = await rec.rent_for_job("sdxl", JOB, actor="admin")
        await tick(rec)
        clock.advance(16)  # loading, with containerd's "no space left on device"
        report = await tick(rec)
        assert [type(a) for a in report.actions] == [Replace]
        assert report.ended_jobs == (rental.job_id,)
        job = job_row(store, rental.job_id)
        assert job.state is JobState.FAILED
        assert (job.error or "").startswith(
            f"its OnStart instance {rental.instance_id} failed: no_space:"
        )
        await tick(rec)
        assert [r.state for r in rows(store)] == [S.FAILED]  # no slot: nothing replaces it


async def test_a_reserved_job_fails_when_its_instance_is_ended_behind_the_pools_back(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=1)}
    async with reconciler(store, sim, clock, fleet) as rec:
        instance_id, job_id = await rented_and_ready(rec, store, clock)
        with store.transaction() as session:  # another process moved it, freeing nothing
            transition(
                session,
                instance_id,
                S.DESTROYING,
                reason="operator, by hand",
                actor="someone",
                now=clock.now(),
                failure_reason="disk_gone",
            )
        report = await tick(rec)
        assert report.ended_jobs == (job_id,)
        assert (
            job_row(store, job_id).error == f"its OnStart instance {instance_id} failed: disk_gone"
        )


async def test_a_terminated_onstart_instance_fails_its_job_and_reprovision_leaves_it_alone(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=2)}
    async with reconciler(store, sim, clock, fleet) as rec:
        instance_id, job_id = await rented_and_ready(rec, store, clock)
        with pytest.raises(PoolActionRefused, match="terminate it to stop it now"):
            await rec.reprovision(instance_id=instance_id, actor="admin")
        assert await rec.reprovision(profile="sdxl", actor="admin") == []
        assert live(store)[0].state is S.READY

        await rec.terminate(instance_id, reason="operator: not needed", actor="admin")
        assert live(store)[0].state is S.DESTROYING
        job = job_row(store, job_id)
        assert job.state is JobState.FAILED
        assert job.error == (
            f"its OnStart instance {instance_id} was destroyed: operator: not needed"
        )


async def test_an_onstart_rental_whose_job_is_cancelled_before_it_is_made_is_abandoned(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=1)}
    async with reconciler(store, sim, clock, fleet) as rec:
        rental = await rec.rent_for_job("sdxl", JOB, actor="admin")
        with store.transaction() as session:
            request_cancel(session, rental.job_id, clock.now())
        report = await tick(rec)
        assert [type(a) for a in report.actions] == [Abandon]
        assert report.rented == ()
        assert [r.state for r in rows(store)] == [S.DESTROYED]
        assert contracts(sim, clock) == []


async def test_an_onstart_instance_whose_agent_never_takes_its_job_is_destroyed(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=1)}
    async with reconciler(store, sim, clock, fleet) as rec:
        instance_id, job_id = await rented_and_ready(rec, store, clock)
        for _ in range(8):  # ten minutes and more, its agent beating but never asking
            clock.advance(85)
            register_and_report_ready_as_the_api_would(store, clock, instance_id)
            report = await tick(rec)
        assert kinds_and_reasons(report.actions) == [("Destroy", "onstart_unclaimed")]
        job = job_row(store, job_id)
        assert job.state is JobState.FAILED
        assert f"its OnStart instance {instance_id} was destroyed: onstart_unclaimed" in (
            job.error or ""
        )


# ------------------------------------------------------------------ over HTTP


def api_settings(tmp_path: Path) -> ApiSettings:
    return ApiSettings(
        admin_api_key=SecretStr(ADMIN_KEY),
        data_dir=tmp_path / "data",
        profiles={"sdxl": AgentProfile(manifest={"models": []}, comfy=ComfySpec())},
    )


@pytest.fixture
def job_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "job"
    folder.mkdir()
    shutil.copy(WORKFLOWS / "txt2img.json", folder / "flow.json")
    yield folder


async def test_the_admin_route_checks_the_job_as_the_jobs_api_does_before_renting(
    store: Store, sim: RunningSim, clock: ManualClock, tmp_path: Path
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=1)}
    workflow = json.loads((WORKFLOWS / "txt2img.json").read_text())
    async with reconciler(store, sim, clock, fleet) as rec:
        app = create_app(store, api_settings(tmp_path), clock=clock, pool=rec)
        transport = httpx.ASGITransport(app=app)
        headers = {"x-admin-key": ADMIN_KEY}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://cp", headers=headers
        ) as http:
            refused = await http.post(
                "/api/admin/pool/onstart",
                json={"profile": "sdxl", "job": {"workflow": workflow, "set": ["99.seed=1"]}},
            )
            assert refused.status_code == 422 and "99" in refused.json()["detail"]
            assert rows(store) == []  # nothing rented for a job that cannot run

            answer = await http.post(
                "/api/admin/pool/onstart",
                json={
                    "profile": "sdxl",
                    "job": {
                        "workflow": workflow,
                        "inputs": {"note.txt": base64.b64encode(b"hello").decode()},
                        "prompt": "a red fox",
                        "set": ["3.steps=4"],
                        "timeout_s": 300,
                    },
                },
            )
            assert answer.status_code == 201, answer.text
            body = answer.json()
            job = job_row(store, body["job_id"])
            assert (job.pinned_instance_id, job.timeout_s) == (body["instance_id"], 300)
            final = job.request["workflow"]
            assert final["6"]["inputs"]["text"] == "a red fox"
            assert final["3"]["inputs"]["steps"] == 4
            assert [i["name"] for i in job.request["inputs"]] == ["note.txt"]

            unknown = await http.post(
                "/api/admin/pool/onstart", json={"profile": "nope", "job": {"workflow": workflow}}
            )
            assert unknown.status_code == 404
            full = await http.post(
                "/api/admin/pool/onstart", json={"profile": "sdxl", "job": {"workflow": workflow}}
            )
            assert full.status_code == 409 and "caps" in full.json()["detail"]

            assert (await http.get(f"/api/instances/{body['instance_id']}/log")).status_code == 404
            assert (await http.get("/api/instances/4242/log")).status_code == 404


async def test_up_onstart_job_follows_the_instance_then_the_job_and_collects_its_outputs_and_log(
    sqlite_store: Store,
    sim: RunningSim,
    clock: ManualClock,
    tmp_path: Path,
    clean_env: dict[str, str],
    job_dir: Path,
) -> None:
    store = sqlite_store
    code, text, row = await up_onstart(store, sim, clock, tmp_path, clean_env, job_dir, "ok")
    assert code == 0, text
    assert f"rented instance {row.id} of profile sdxl for OnStart job" in text
    assert f"job {row.onstart_job_id} succeeded on instance {row.id}" in text
    out = tmp_path / "collected"
    assert (out / "fox.png").read_bytes() == b"\x89PNG a fox"
    assert "registered from onstart-host" in (out / f"provision_{row.id}.log").read_text()
    job = job_row(store, row.onstart_job_id or "")
    assert job.request["workflow"]["6"]["inputs"]["text"] == "a red fox"
    assert job.request["workflow"]["3"]["inputs"]["steps"] == 4
    # The pool ends the instance whether the command is there or not.
    assert row.state is S.DESTROYING
    with store.transaction() as session:
        assert job_trail(session, job.id)[-1].to_state is JobState.SUCCEEDED


async def test_up_onstart_job_exits_1_when_the_job_fails_and_still_collects_the_log(
    sqlite_store: Store,
    sim: RunningSim,
    clock: ManualClock,
    tmp_path: Path,
    clean_env: dict[str, str],
    job_dir: Path,
) -> None:
    code, text, row = await up_onstart(
        sqlite_store, sim, clock, tmp_path, clean_env, job_dir, "KSampler: out of memory"
    )
    assert code == 1, text
    assert f"job {row.onstart_job_id} failed: KSampler: out of memory" in text
    out = tmp_path / "collected"
    assert sorted(p.name for p in out.iterdir()) == [f"provision_{row.id}.log"]
    assert row.state is S.DESTROYING


async def up_onstart(
    store: Store,
    sim: RunningSim,
    clock: ManualClock,
    tmp_path: Path,
    clean_env: dict[str, str],
    job_dir: Path,
    outcome: str,
) -> tuple[int | None, str, Any]:
    """``comfyfleet up sdxl --onstart-job ... --collect`` against a served control plane
    whose pool is the reconciler, the test playing the passes and the agent; the job ends
    ``outcome`` ("ok", else the failure's error). The exit status, the output, the row."""
    (job_dir / "job.json").write_text(
        json.dumps(
            {"workflow": "flow.json", "prompt": "a red fox", "set": "3.steps=4", "timeout_s": 300}
        )
    )
    fleet = {"sdxl": profile(min_ready=0, max_instances=1)}
    async with reconciler(store, sim, clock, fleet) as rec:
        app = create_app(store, api_settings(tmp_path), clock=clock, pool=rec)
        with RunningServer(app) as server:
            env = {**clean_env, "COMFYFLEET_SERVER": server.url, "ADMIN_API_KEY": ADMIN_KEY}
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "comfyfleet"),
                "up",
                "sdxl",
                "--onstart-job",
                str(job_dir / "job.json"),
                "--collect",
                str(tmp_path / "collected"),
                "--destroy-after",
                "--timeout",
                "120",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await _play_the_pool_and_the_agent(rec, store, sim, clock, server.url, app, outcome)
                stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    (row,) = rows(store)
    return proc.returncode, stdout.decode() + stderr.decode(), row


async def _play_the_pool_and_the_agent(
    rec: Reconciler,
    store: Store,
    sim: RunningSim,
    clock: ManualClock,
    url: str,
    app: Any,
    outcome: str,
) -> None:
    """The passes that rent the instance; its agent's registration and ready report over
    the API; its job placed, its output uploaded and its end reported as the agent's calls
    write them; the pass that destroys it."""
    for _ in range(3000):
        if live(store):
            break
        await asyncio.sleep(0.01)
    (row,) = live(store)
    await tick(rec)
    clock.advance(RUNNING_AFTER + 1)
    await tick(rec)
    (contract,) = contracts(sim, clock)
    token = contract.env["COMFYFLEET_TOKEN"]
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}
    ) as agent:
        registered = await agent.post(
            "/api/agent/register", json={"instance_id": row.id, "hostname": "onstart-host"}
        )
        assert registered.json()["onstart_job_id"] == row.onstart_job_id
        ready = {"kind": "stage", "at": clock.now(), "stage": "ready", "reason": None}
        answer = await agent.post(
            "/api/agent/events", json={"instance_id": row.id, "events": [ready]}
        )
        assert answer.status_code == 200, answer.text
    job_id = row.onstart_job_id or ""
    blob = await app.state.ctx.outputs.put_stream(io.BytesIO(b"\x89PNG a fox"), max_bytes=1 << 20)
    with store.transaction() as session:
        lease = place_job(session, job_id, row.id, clock.now())
        if outcome == "ok":
            record_output(
                session, job_id, lease, "fox.png", blob.sha256, blob.size, "image", now=clock.now()
            )
            complete_job(session, job_id, lease, {"outputs": ["fox.png"]}, clock.now())
        else:
            fail_job(session, job_id, lease, outcome, clock.now())
    report = await tick(rec)
    reason = "onstart_done" if outcome == "ok" else "onstart_failed"
    assert kinds_and_reasons(report.actions) == [("Destroy", reason)]


# ------------------------------------------------------------------ JOB.json


def test_a_job_file_names_its_files_relative_to_its_own_folder(job_dir: Path) -> None:
    (job_dir / "photos").mkdir()
    (job_dir / "photos" / "a.png").write_bytes(b"png-a")
    (job_dir / "job.json").write_text(
        json.dumps(
            {
                "workflow": "flow.json",
                "inputs": {"in.png": "photos/a.png"},
                "set": "3.steps=4",
                "timeout_s": 60,
            }
        )
    )
    body = load_onstart_job(job_dir / "job.json")
    assert body["workflow"]["3"]["class_type"] == "KSampler"
    assert body["inputs"] == {"in.png": base64.b64encode(b"png-a").decode()}
    assert (body["set"], body["timeout_s"]) == (["3.steps=4"], 60)

    (job_dir / "job.json").write_text(json.dumps({"workflow": {}, "inputs": ["photos/a.png"]}))
    with pytest.raises(ConfigError, match="workflow"):
        load_onstart_job(job_dir / "job.json")
    workflow = json.loads((job_dir / "flow.json").read_text())
    (job_dir / "job.json").write_text(
        json.dumps({"workflow": workflow, "inputs": ["photos/a.png"]})
    )
    assert list(load_onstart_job(job_dir / "job.json")["inputs"]) == ["a.png"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "not JSON"),
        ('["flow.json"]', "expected a JSON object"),
        ('{"workflow": "flow.json", "profile": "sdxl"}', "unknown key(s) profile"),
        ('{"prompt": "x"}', "workflow"),
        ('{"workflow": "missing.json"}', "cannot read the workflow"),
        ('{"workflow": "flow.json", "inputs": {"a.png": "nope.png"}}', "cannot read"),
        ('{"workflow": "flow.json", "inputs": ["x/a.png", "y/a.png"]}', "two inputs"),
    ],
)
def test_a_bad_job_file_is_one_line_naming_the_file(job_dir: Path, content: str, says: str) -> None:
    for folder in ("x", "y"):
        (job_dir / folder).mkdir()
        (job_dir / folder / "a.png").write_bytes(b"png")
    (job_dir / "job.json").write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_onstart_job(job_dir / "job.json")
    assert says in str(caught.value)

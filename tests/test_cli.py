"""The command line as a user meets it: real subprocesses against the simulator."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import BIN, EXAMPLE_FLEET, REPO, run_cli

KEY = "test-key-123"


def sim_env(clean_env: dict[str, str], sim: Any) -> dict[str, str]:
    return {**clean_env, "VAST_URL": sim.url, "VAST_API_KEY": KEY}


def test_offers_json_is_ranked_by_expected_dollars(
    clean_env: dict[str, str], vast_sim: Any
) -> None:
    env = sim_env(clean_env, vast_sim)
    result = run_cli(
        "offers",
        "--profile",
        "default",
        "-c",
        str(EXAMPLE_FLEET),
        "--json",
        "--limit",
        "15",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    rows = data["offers"]
    assert 0 < len(rows) <= 15
    dollars = [r["expected_dollars"] for r in rows]
    assert dollars == sorted(dollars)
    for r in rows:
        assert r["vram_gb"] >= 16
        assert r["dph_total"] <= 3.0
        assert r["reliability"] >= 0.95


def test_offers_table_shows_the_cost_model_columns(
    clean_env: dict[str, str], vast_sim: Any
) -> None:
    env = sim_env(clean_env, vast_sim)
    result = run_cli("offers", "--profile", "default", "-c", str(EXAMPLE_FLEET), env=env)
    assert result.returncode == 0, result.stderr
    for column in (
        "$/h",
        "min to ready",
        "$ to ready",
        "GPU",
        "VRAM GB",
        "inet down Mb/s",
        "reliability",
        "location",
        "direct ports",
    ):
        assert column in result.stdout


def test_offers_explain_lists_rejections_with_reasons(
    clean_env: dict[str, str], vast_sim: Any
) -> None:
    env = sim_env(clean_env, vast_sim)
    result = run_cli(
        "offers", "--profile", "default", "-c", str(EXAMPLE_FLEET), "--json", "--explain", env=env
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rejected"], "a broad search of a varied catalog must reject something"
    for rejection in data["rejected"]:
        assert rejection["reasons"] and all(isinstance(r, str) and r for r in rejection["reasons"])


def test_rent_list_logs_destroy_round_trip(clean_env: dict[str, str], vast_sim: Any) -> None:
    env = sim_env(clean_env, vast_sim)
    rented = run_cli("rent", "--profile", "default", "-c", str(EXAMPLE_FLEET), "--json", env=env)
    assert rented.returncode == 0, rented.stderr
    instance = json.loads(rented.stdout)["instance"]
    instance_id = instance["id"]
    assert instance["label"].startswith("comfyfleet-default-")

    listed = run_cli("instances", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert instance_id in [i["id"] for i in json.loads(listed.stdout)]

    logs = run_cli("logs", str(instance_id), env=env)
    assert logs.returncode == 0, logs.stderr

    destroyed = run_cli("destroy", str(instance_id), env=env)
    assert destroyed.returncode == 0, destroyed.stderr
    listed = run_cli("instances", "--json", env=env)
    assert instance_id not in [i["id"] for i in json.loads(listed.stdout)]


def test_missing_api_key_says_where_to_put_one(clean_env: dict[str, str], vast_sim: Any) -> None:
    env = {**clean_env, "VAST_URL": vast_sim.url}
    result = run_cli("instances", env=env)
    assert result.returncode != 0
    assert "VAST_API_KEY" in result.stderr
    assert "vast_api_key" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_key_file_of_the_official_cli_is_used(clean_env: dict[str, str], vast_sim: Any) -> None:
    key_file = Path(clean_env["XDG_CONFIG_HOME"]) / "vastai" / "vast_api_key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(KEY + "\n")
    env = {**clean_env, "VAST_URL": vast_sim.url}
    result = run_cli("instances", "--json", env=env)
    assert result.returncode == 0, result.stderr


def test_refused_key_is_reported_without_printing_it(
    clean_env: dict[str, str], vast_sim: Any
) -> None:
    wrong = "wrong-key-that-must-not-leak"
    env = {**clean_env, "VAST_URL": vast_sim.url, "VAST_API_KEY": wrong}
    result = run_cli("-v", "instances", env=env)
    assert result.returncode == 1
    assert "refused" in result.stderr.lower()
    assert wrong not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("profiles:\n  default:\n    max_price: cheap\n", "max_price"),
        ("profiles: [\n", None),
        ("profiles:\n  default:\n    no_such_setting: 1\n", "no_such_setting"),
    ],
)
def test_malformed_fleet_file_gets_one_line_and_status_2(
    clean_env: dict[str, str], tmp_path: Path, content: str, field: str | None
) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(content)
    env = {**clean_env, "VAST_API_KEY": KEY, "VAST_URL": "http://127.0.0.1:9"}
    result = run_cli("offers", "--profile", "default", "-c", str(bad), env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0]
    if field:
        assert field in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_profile_names_the_known_ones(clean_env: dict[str, str]) -> None:
    env = {**clean_env, "VAST_API_KEY": KEY, "VAST_URL": "http://127.0.0.1:9"}
    result = run_cli("offers", "--profile", "nope", "-c", str(EXAMPLE_FLEET), env=env)
    assert result.returncode == 2
    assert "default" in result.stderr


def test_sim_vast_prints_its_url_and_serves(clean_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [str(BIN / "comfyfleet"), "sim", "vast", "--port", "0", "--seed", "3", "--offers", "50"],
        env=clean_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        env = {**clean_env, "VAST_URL": match.group(0), "VAST_API_KEY": "anything"}
        result = run_cli(
            "offers",
            "--profile",
            "default",
            "-c",
            str(EXAMPLE_FLEET),
            "--json",
            "--explain",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        # Every rentable marketplace offer is either ranked or rejected with a reason.
        base = {"rentable": {"eq": True}, "rented": {"eq": False}, "external": {"eq": False}}
        listed = httpx.post(
            f"{match.group(0)}/api/v0/bundles/",
            headers={"Authorization": "Bearer anything"},
            json={**base, "limit": 1000},
        ).json()["offers"]
        assert 0 < len(listed) <= 50
        assert data["accepted"] + len(data["rejected"]) == len(listed)
        assert all(r["reasons"] for r in data["rejected"])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


def test_demo_runs_the_whole_flow(clean_env: dict[str, str], tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    # Run where a user would (``make demo`` in their clone): the image lands in ./demo-output.
    result = run_cli(
        "demo",
        "--config",
        str(EXAMPLE_FLEET),
        env={**clean_env, "TMPDIR": str(temp)},
        cwd=tmp_path,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    finished = re.search(r"demo finished in ([\d.]+) s", out)
    assert finished and float(finished.group(1)) < 60, out
    assert re.search(r"\d+ offers pass, \d+ rejected", out)
    # A forced failure: the first host runs out of disk; destroyed, blocklisted, replaced.
    assert "instance 1 failed: no_space: the host ran out of disk" in out
    assert re.search(r"Machines on the blocklist for 24 h: \[\d+\]", out)
    replaced = out.split("4. Instance 2: rented in its place", 1)[1].split("5. A prewarm", 1)[0]
    stages = re.findall(r"stage (\w+)", replaced)
    assert stages == [
        "creating",
        "booting",
        "provisioning",
        "downloading",
        "starting_app",
        "warming",
        "ready",
    ], replaced
    assert "download 31.5 MB / 31.5 MB (100%)" in replaced
    assert "instance 2 is ready" in replaced
    prewarmed = out.split("5. A prewarm through the admin API", 1)[1]
    assert "POST /api/admin/pool/prewarm" in prewarmed and "instance 3 is ready" in prewarmed
    # A job through the whole system: a user key, then `comfyfleet run` itself, whose
    # image is saved in ./demo-output and checked against what the control plane announced.
    job = out.split("6. A job through the whole system", 1)[1].split("7. Everything destroyed")[0]
    assert "made as `comfyfleet keys create demo` makes it: API key 1, cf_" in job
    assert "$ comfyfleet run demo-output/txt2img_api.json --prompt " in job
    submitted = re.search(r"submitted job (\S+) \(profile default, queued \(position 1\)\)", job)
    assert submitted, job
    job_id = submitted.group(1)
    assert re.search(r"KSampler \(node 6\): (step \d+/20, )?\d+% overall", job), job
    assert f"job {job_id} succeeded" in job
    assert f"GET /api/jobs/{job_id} → succeeded: attempt 1 of " in job
    assert "its trail: queued → placed → running → succeeded" in job
    saved = re.search(
        r"Saved (demo-output/\S+\.png): PNG, 768x512 pixels, ([\d,]+) bytes, "
        r"sha256 ([0-9a-f]{64}) \(the sha256 the control plane announced\)",
        job,
    )
    assert saved, job
    image = tmp_path / saved.group(1)
    assert sorted(p.name for p in (tmp_path / "demo-output").glob("*.png")) == [image.name]
    data = image.read_bytes()
    assert hashlib.sha256(data).hexdigest() == saved.group(3)
    assert len(data) == int(saved.group(2).replace(",", ""))
    with Image.open(image) as png:
        assert (png.format, png.size) == ("PNG", (768, 512))
    # Everything destroyed, the dollars spent.
    assert "0 instance(s) still rented" in out
    assert re.search(r"Credit \$50\.00 → \$49\.\d+: \$0\.0*[1-9]\d* spent", out), out
    # Nothing left running (agents, ComfyUI simulators) nor on disk.
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(temp).encode() in (proc / "environ").read_bytes():
                leftovers.append(proc.name)
        except OSError:
            continue
    assert leftovers == []
    assert list(temp.iterdir()) == []


def test_help_teaches_the_commands(clean_env: dict[str, str]) -> None:
    result = run_cli("--help", env=clean_env)
    assert result.returncode == 0
    for command in ("offers", "instances", "destroy", "logs", "sim", "demo"):
        assert command in result.stdout

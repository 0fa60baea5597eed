"""Provisioning a workspace from a manifest, against the file-server simulator over loopback.

Models come from the simulator's Hugging Face, Civitai and Dropbox routes through
the production resolvers; custom nodes from git repositories made in ``tmp_path``;
pip installs go into a throwaway virtual environment, offline (``--no-index``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import textwrap
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pip
import pytest
import yaml

from comfyfleet.agent.nodes import checkout, head_commit
from comfyfleet.agent.provision import ProvisionOptions, check_manifest, provision
from comfyfleet.agent.report import ERROR_LOG_NAME, RecordingReporter
from comfyfleet.agent.sources import (
    LINKS_ENV_VAR,
    DropboxLink,
    SourceResolver,
    SourceSettings,
    encode_links_env,
    format_links_file,
)
from comfyfleet.errors import ManifestError, ProvisionFailed
from comfyfleet.manifest import Manifest, parse_manifest
from comfyfleet.sim.files import Fault, FileServer, RunningFileServer, SimFile, generate_content
from tests.conftest import run_cli

MiB = 1 << 20
CIVITAI_TOKEN = "civitai-test-token"
# Retries back off for milliseconds, not seconds.
FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "min_piece_size": 256 * 1024}
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DOWNLOAD|VALIDATION|INSTALL) FAILED ")


@pytest.fixture
def fs() -> Iterator[RunningFileServer]:
    with RunningFileServer(FileServer()) as running:
        running.server.civitai_tokens.add(CIVITAI_TOKEN)
        yield running


def source_env(fs: RunningFileServer) -> dict[str, str]:
    return {**fs.env(), "CIVITAI_TOKEN": CIVITAI_TOKEN}


def resolver_for(fs: RunningFileServer) -> SourceResolver:
    return SourceResolver(SourceSettings.from_env(source_env(fs)))


def opts(**kw: object) -> ProvisionOptions:
    return ProvisionOptions(download_overrides=FAST, **kw)  # type: ignore[arg-type]


def manifest_of(text: str, base_dir: Path | None = None) -> Manifest:
    return parse_manifest(textwrap.dedent(text), source="manifest.yaml", base_dir=base_dir)


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_log_lines(workspace: Path) -> list[str]:
    path = workspace / ERROR_LOG_NAME
    return path.read_text().splitlines() if path.exists() else []


# -- git repositories and wheels, made locally -------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def node_repo(root: Path, name: str, versions: list[dict[str, str]]) -> tuple[str, list[str]]:
    """A repository with one commit per version (files by path); its URL and commits."""
    repo = root / "remotes" / name
    repo.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repo)
    commits = []
    for files in versions:
        for rel, text in files.items():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_text(text)
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", f"version {len(commits) + 1}", cwd=repo)
        commits.append(git("rev-parse", "HEAD", cwd=repo))
    return f"file://{repo}", commits


def wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A pure-Python wheel written by hand: pip installs it with no index and no build."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {name!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{path},sha256={b64},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


def throwaway_python(root: Path) -> Path:
    """A virtual environment of its own (ComfyUI's Python), with this pip importable."""
    env_dir = root / "comfy-venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    shim = root / "pip-shim"
    shim.mkdir()
    (shim / "pip").symlink_to(Path(pip.__file__).parent)
    (site / "_pip_shim.pth").write_text(f"{shim}\n")
    return env_dir / "bin" / "python"


def imports(python: Path, module: str) -> bool:
    done = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False)
    return done.returncode == 0


# -- the seeds' workspace, scaled down ----------------------------------------------


def seed_models(fs: RunningFileServer) -> dict[str, SimFile]:
    """The seeds' kinds of models on the simulator's hosts, a few MiB each."""
    srv = fs.server
    wan = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
    files = {
        "sdxl": srv.add_hf_file(
            "stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", 3 * MiB
        ),
        "pony": srv.add_civitai_file(
            290640, "ponyDiffusionV6XL_v6StartWithThisOne.safetensors", 3 * MiB
        ),
        "mm_sdxl": srv.add_hf_file("guoyww/animatediff", "mm_sdxl_v10_beta.ckpt", 2 * MiB),
        "mm_v15": srv.add_hf_file("guoyww/animatediff", "mm_sd_v15_v2.ckpt", 3 * MiB // 2),
        # Not on Hugging Face: the Dropbox copy is the one that arrives.
        "wan_t2v": srv.add_dropbox_file(
            "/Workspace/ComfyUI/models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors",
            2 * MiB,
        ),
        "umt5": srv.add_hf_file(
            wan, "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", 4 * MiB
        ),
        "wan_vae": srv.add_hf_file(wan, "split_files/vae/wan_2.1_vae.safetensors", MiB),
        "clip_vision": srv.add_hf_file(
            wan, "split_files/clip_vision/clip_vision_h.safetensors", MiB
        ),
        "clip_l": srv.add_hf_file("comfyanonymous/flux_text_encoders", "clip_l.safetensors", MiB),
        "lora": srv.add_civitai_file(135867, "add-detail-xl.safetensors", MiB // 2),
    }
    srv.add_hf_repo("black-forest-labs/FLUX.1-dev", gated=True)
    files["flux"] = srv.add_hf_file("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", MiB)
    files["flux_ae"] = srv.add_hf_file("black-forest-labs/FLUX.1-dev", "ae.safetensors", MiB // 2)
    return files


def seed_manifest(
    fs: RunningFileServer, files: dict[str, SimFile], nodes: list[dict[str, str]]
) -> Manifest:
    wan_link = fs.server.share_dropbox_path(
        "/Workspace/ComfyUI/models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"
    )
    wan = "hf://Comfy-Org/Wan_2.1_ComfyUI_repackaged/split_files"
    optional = {"critical": False}
    models: list[dict[str, object]] = [
        {
            "source": "hf://stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors",
            "dest": "checkpoints",
        },
        {
            "source": "civitai://290640",
            "dest": "checkpoints",
            "name": "ponyDiffusionV6XL.safetensors",
        },
        {
            "source": "hf://guoyww/animatediff/mm_sdxl_v10_beta.ckpt",
            "dest": "animatediff_models",
            **optional,
        },
        {
            "source": "hf://guoyww/animatediff/mm_sd_v15_v2.ckpt",
            "dest": "animatediff_models",
            **optional,
        },
        {
            "sources": [f"{wan}/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors", wan_link],
            "dest": "diffusion_models",
        },
        {
            "source": f"{wan}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
            "dest": "text_encoders",
        },
        {
            "source": f"{wan}/vae/wan_2.1_vae.safetensors",
            "dest": "vae",
            "sha256": files["wan_vae"].sha256,
            "size": files["wan_vae"].size,
        },
        {
            "source": f"{wan}/clip_vision/clip_vision_h.safetensors",
            "dest": "clip_vision",
            **optional,
        },
        {
            "source": "hf://black-forest-labs/FLUX.1-dev/flux1-dev.safetensors",
            "dest": "unet",
            **optional,
        },
        {
            "source": "hf://black-forest-labs/FLUX.1-dev/ae.safetensors",
            "dest": "vae",
            "name": "flux_ae.safetensors",
            **optional,
        },
        {
            "source": "hf://comfyanonymous/flux_text_encoders/clip_l.safetensors",
            "dest": "clip",
            **optional,
        },
        {"source": "civitai://135867", "dest": "loras", **optional},
    ]
    return parse_manifest(yaml.safe_dump({"custom_nodes": nodes, "models": models}))


async def test_a_twelve_model_workspace_provisions_in_parallel_verified_with_fallback_and_nodes(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = seed_models(fs)
    ad_url, ad_commits = node_repo(
        tmp_path,
        "ComfyUI-AnimateDiff-Evolved",
        [
            {"__init__.py": "VERSION = 1\n", "requirements.txt": "# nothing to install\n"},
            {"__init__.py": "VERSION = 2\n"},
        ],
    )
    vhs_url, vhs_commits = node_repo(
        tmp_path, "ComfyUI-VideoHelperSuite", [{"__init__.py": "VHS = True\n"}]
    )
    nodes = [{"git": ad_url, "commit": ad_commits[0]}, {"git": vhs_url, "commit": vhs_commits[0]}]
    manifest = seed_manifest(fs, files, nodes)
    assert len(manifest.models) == 12
    workspace = tmp_path / "workspace"
    # Throttled per connection, as CDNs are: files overlap in time, each over several ranges.
    fs.server.per_connection_bps = 2e6
    reporter = RecordingReporter()

    summary = await provision(
        manifest, workspace, resolver=resolver_for(fs), reporter=reporter, options=opts()
    )

    # The two gated FLUX files fail (no HF_TOKEN), and they are not critical.
    assert summary.ok, summary.lines()
    failed = {i.name: i for i in summary.failed}
    assert set(failed) == {
        "ComfyUI/models/unet/flux1-dev.safetensors",
        "ComfyUI/models/vae/flux_ae.safetensors",
    }
    for item in failed.values():
        assert not item.critical
        assert "Missing HF_TOKEN" in (item.reason or "") and "gated" in (item.reason or "")
    # Every other model is on disk with the right bytes.
    models = workspace / "ComfyUI" / "models"
    expected = {
        "checkpoints/sd_xl_base_1.0.safetensors": files["sdxl"],
        "checkpoints/ponyDiffusionV6XL.safetensors": files["pony"],
        "animatediff_models/mm_sdxl_v10_beta.ckpt": files["mm_sdxl"],
        "animatediff_models/mm_sd_v15_v2.ckpt": files["mm_v15"],
        "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors": files["wan_t2v"],
        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors": files["umt5"],
        "vae/wan_2.1_vae.safetensors": files["wan_vae"],
        "clip_vision/clip_vision_h.safetensors": files["clip_vision"],
        "clip/clip_l.safetensors": files["clip_l"],
        "loras/add-detail-xl.safetensors": files["lora"],  # the name Civitai gives
    }
    for rel, sim in expected.items():
        assert sha_of(models / rel) == sim.sha256, rel
    assert not (models / "unet" / "flux1-dev.safetensors").exists()
    assert not list(models.rglob("*.part*"))
    # Validation read every file back: the sha256 in the summary is the one on disk.
    by_name = {i.name: i for i in summary.items}
    for rel, sim in expected.items():
        item = by_name[f"ComfyUI/models/{rel}"]
        assert item.status == "downloaded" and item.size == sim.size
        if item.sha256 is not None:
            assert item.sha256 == sim.sha256
    assert by_name["ComfyUI/models/vae/wan_2.1_vae.safetensors"].sha256 == files["wan_vae"].sha256
    # The Wan model fell back from Hugging Face (not there) to Dropbox.
    wan_item = by_name["ComfyUI/models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"]
    assert wan_item.source is not None and "/scl/fi/" in wan_item.source
    assert "rlkey" not in wan_item.source  # link keys stay out of summaries and logs
    assert [a.source.split("://")[0] for a in wan_item.failed_sources] == ["hf"]
    # Summary: bytes and throughput.
    assert summary.bytes_downloaded == sum(f.size for f in expected.values())
    assert summary.mb_per_s > 0
    assert len(summary.succeeded) == 10 + 2
    assert summary.lines()[0].startswith("12 succeeded, 2 failed (0 critical)")
    # The file server saw at least 4 files in flight at once.
    assert fs.server.stats().peak_files_in_flight >= 4
    # Nodes: at the pinned (older) commit, not at the branch's head.
    ad_dir = workspace / "ComfyUI" / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved"
    assert await head_commit(ad_dir) == ad_commits[0]
    assert (ad_dir / "__init__.py").read_text() == "VERSION = 1\n"
    assert by_name["ComfyUI/custom_nodes/ComfyUI-VideoHelperSuite"].status == "installed"
    # Stages and progress went through the reporter.
    assert reporter.stages == ["provisioning", "downloading"]
    progress = [e.progress for e in reporter.events if e.progress is not None]
    assert progress and max(p.done for p in progress) == summary.bytes_downloaded
    assert max(p.total or 0 for p in progress) == summary.bytes_downloaded
    assert {p.file for p in progress} >= {f"ComfyUI/models/{rel}" for rel in expected}
    # The error log: one timestamped line per failed source, one per failed validation.
    lines = error_log_lines(workspace)
    assert all(STAMPED.match(line) for line in lines), lines
    downloads = [ln for ln in lines if " DOWNLOAD FAILED " in ln]
    validations = [ln for ln in lines if " VALIDATION FAILED " in ln]
    assert len(downloads) == 3
    assert any("diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors: hf://" in ln for ln in downloads)
    assert sorted(ln.split(" VALIDATION FAILED ")[1].split(":")[0] for ln in validations) == [
        "ComfyUI/models/unet/flux1-dev.safetensors",
        "ComfyUI/models/vae/flux_ae.safetensors",
    ]

    # A second run finds everything in place: nothing downloaded, nothing cloned.
    fs.server.reset_stats()
    again = await provision(manifest, workspace, resolver=resolver_for(fs), options=opts())
    assert again.bytes_downloaded == 0
    assert {i.status for i in again.succeeded} == {"present", "installed"}
    # Only metadata: Civitai's exact sizes are read with a one-byte Range request.
    assert all(f.bytes_sent <= 1 for f in fs.server.stats().files.values())


async def test_a_model_falls_back_to_its_next_source_when_one_fails_during_the_download(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    data = generate_content("vae", 2 * MiB, 7)
    hf = fs.server.add_hf_file("acme/vae", "vae.safetensors", data=data)
    fs.server.add_dropbox_file("/Models/vae.safetensors", data=data)
    link = fs.server.share_dropbox_path("/Models/vae.safetensors")
    # Hugging Face's CDN sends wrong bytes on every request: the hash never matches.
    fs.server.inject(hf.name, Fault("corrupt", after_bytes=1000), count=100)
    manifest = manifest_of(
        f"""
        models:
          - sources: [hf://acme/vae/vae.safetensors, "{link}"]
            dest: vae
        """
    )
    summary = await provision(manifest, tmp_path / "ws", resolver=resolver_for(fs), options=opts())

    assert summary.ok and not summary.failed
    (item,) = summary.items
    assert item.source is not None and "/scl/fi/" in item.source
    assert item.sha256 == hashlib.sha256(data).hexdigest()
    assert "sha256 mismatch" in item.failed_sources[0].reason
    assert sha_of(tmp_path / "ws/ComfyUI/models/vae/vae.safetensors") == item.sha256
    (line,) = error_log_lines(tmp_path / "ws")
    assert "DOWNLOAD FAILED ComfyUI/models/vae/vae.safetensors: hf://acme/vae" in line
    assert "sha256 mismatch" in line


async def test_a_good_file_in_place_is_never_overwritten_by_bad_bytes(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    good = fs.server.add_hf_file("acme/ckpt", "model.safetensors", 2 * MiB)
    manifest = manifest_of(
        f"""
        models:
          - source: hf://acme/ckpt/model.safetensors
            dest: checkpoints
            sha256: {good.sha256}
        """
    )
    ws = tmp_path / "ws"
    first = await provision(manifest, ws, resolver=resolver_for(fs), options=opts())
    assert first.ok
    path = ws / "ComfyUI/models/checkpoints/model.safetensors"
    before = path.stat()

    # Now the host serves corrupt bytes: the good file stays, byte for byte.
    fs.server.inject(good.name, Fault("corrupt", after_bytes=10), count=100)
    fs.server.reset_stats()
    second = await provision(manifest, ws, resolver=resolver_for(fs), options=opts())
    assert second.ok
    assert second.items[0].status == "present" and second.items[0].sha256 == good.sha256
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert fs.server.stats().bytes_sent == 0


async def test_bad_bytes_never_replace_the_file_in_place_and_the_model_fails_with_both_hashes(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    new = fs.server.add_hf_file("acme/ckpt", "model.safetensors", MiB)
    fs.server.inject(new.name, Fault("corrupt", after_bytes=100), count=100)
    ws = tmp_path / "ws"
    path = ws / "ComfyUI/models/checkpoints/model.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"an older model that the user may still want")
    manifest = manifest_of(
        """
        models:
          - source: hf://acme/ckpt/model.safetensors
            dest: checkpoints
        """
    )
    summary = await provision(manifest, ws, resolver=resolver_for(fs), options=opts())

    assert not summary.ok
    (item,) = summary.missing_critical
    assert (item.reason or "").startswith("the file in place was kept (size 43 bytes, expected")
    assert f"sha256 mismatch: expected {new.sha256}, got " in (item.reason or "")
    assert path.read_bytes() == b"an older model that the user may still want"
    assert not list(path.parent.glob("*.part*"))
    with pytest.raises(ProvisionFailed, match=r"model\.safetensors"):
        summary.raise_for_missing()
    kinds = [ln.split("Z ", 1)[1].split(" ComfyUI/")[0] for ln in error_log_lines(ws)]
    assert kinds == ["DOWNLOAD FAILED", "VALIDATION FAILED"]


async def test_a_source_that_disagrees_with_the_pinned_sha256_is_skipped_before_any_byte(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_hf_file("acme/x", "x.safetensors", MiB)
    right = fs.server.add_file("x-mirror.safetensors", MiB, seed=3)
    manifest = manifest_of(
        f"""
        models:
          - sources: [hf://acme/x/x.safetensors, "{fs.file_url(right.name)}"]
            dest: loras
            name: x.safetensors
            sha256: {right.sha256}
        """
    )
    summary = await provision(manifest, tmp_path / "ws", resolver=resolver_for(fs), options=opts())
    assert summary.ok
    (item,) = summary.items
    assert item.sha256 == right.sha256 and item.source == fs.file_url(right.name)
    assert "the source's sha256 is" in item.failed_sources[0].reason
    assert fs.server.stats().file("hf/acme/x/x.safetensors").bytes_sent == 0


# -- nothing is downloaded on bad input ------------------------------------------------


async def test_a_symlink_out_of_models_stops_the_provision_before_anything_happens(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_hf_file("acme/x", "x.safetensors", MiB)
    url, commits = node_repo(tmp_path, "Node", [{"__init__.py": ""}])
    manifest = manifest_of(
        f"""
        custom_nodes:
          - git: {url}
            commit: {commits[0]}
        models:
          - source: hf://acme/x/x.safetensors
            dest: loras
        """
    )
    ws = tmp_path / "ws"
    (ws / "ComfyUI/models").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (ws / "ComfyUI/models/loras").symlink_to(outside)
    reporter = RecordingReporter()

    with pytest.raises(ManifestError, match=r"models\[0\]\.dest: .*through a symlink"):
        await provision(manifest, ws, resolver=resolver_for(fs), reporter=reporter)

    assert fs.server.stats().files == {}
    assert list(outside.iterdir()) == []
    assert not (ws / "ComfyUI/custom_nodes").exists()
    assert reporter.stages == ["provisioning", "failed"]


async def test_two_models_that_resolve_to_one_file_are_refused_before_any_download(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_civitai_file(11, "same.safetensors", MiB)
    fs.server.add_civitai_file(12, "same.safetensors", MiB, seed=1)
    manifest = manifest_of(
        """
        models:
          - source: civitai://11
            dest: loras
          - source: civitai://12
            dest: loras
        """
    )
    with pytest.raises(ManifestError) as info:
        await provision(manifest, tmp_path / "ws", resolver=resolver_for(fs), options=opts())
    assert info.value.field == "models[1]"
    assert "same target as models[0]: ComfyUI/models/loras/same.safetensors" in str(info.value)
    assert "(line 5)" in str(info.value)
    # Civitai's API and a one-byte size probe, and nothing more.
    assert all(f.bytes_sent <= 1 for f in fs.server.stats().files.values())
    assert not (tmp_path / "ws/ComfyUI/models/loras").exists()


async def test_a_file_name_learnt_from_the_source_may_not_lead_out_through_a_symlink(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_civitai_file(21, "detail.safetensors", MiB)
    manifest = manifest_of("models:\n  - source: civitai://21\n    dest: loras\n")
    loras = tmp_path / "ws/ComfyUI/models/loras"
    loras.mkdir(parents=True)
    (loras / "detail.safetensors").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(ManifestError, match="leads out of ComfyUI/models through a symlink"):
        await provision(manifest, tmp_path / "ws", resolver=resolver_for(fs), options=opts())
    assert not (tmp_path / "elsewhere.bin").exists()


# -- custom nodes ------------------------------------------------------------------------


async def test_a_node_is_checked_out_at_its_pin_idempotently_and_moved_when_the_pin_moves(
    tmp_path: Path,
) -> None:
    url, commits = node_repo(tmp_path, "Thing", [{"a.py": "1\n"}, {"a.py": "2\n"}, {"a.py": "3\n"}])
    m = manifest_of(f"custom_nodes:\n  - git: {url}\n    commit: {commits[1]}\n")
    dest = tmp_path / "custom_nodes" / "Thing"

    first = await checkout(m.custom_nodes[0], dest)
    assert (first.status, first.head) == ("cloned", commits[1])
    assert (dest / "a.py").read_text() == "2\n"
    assert not list(dest.parent.glob(".Thing.clone-*"))

    # Already there: nothing to fetch, so it works with the remote gone.
    remote = url.removeprefix("file://")
    os.rename(remote, remote + "-moved")
    again = await checkout(m.custom_nodes[0], dest)
    assert (again.status, again.head) == ("present", commits[1])
    os.rename(remote + "-moved", remote)

    moved = manifest_of(f"custom_nodes:\n  - git: {url}\n    commit: {commits[0]}\n")
    older = await checkout(moved.custom_nodes[0], dest)
    assert (older.status, older.head) == ("updated", commits[0])
    assert (dest / "a.py").read_text() == "1\n"


async def test_a_commit_that_is_on_no_branch_is_fetched_by_id(tmp_path: Path) -> None:
    url, commits = node_repo(tmp_path, "Thing", [{"a.py": "1\n"}, {"a.py": "2\n"}])
    repo = Path(url.removeprefix("file://"))
    git("reset", "-q", "--hard", commits[0], cwd=repo)  # commits[1] is now on no branch
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=repo)
    m = manifest_of(f"custom_nodes:\n  - git: {url}\n    commit: {commits[1]}\n")
    result = await checkout(m.custom_nodes[0], tmp_path / "nodes" / "Thing")
    assert (result.status, result.head) == ("cloned", commits[1])


async def test_a_missing_commit_and_a_foreign_folder_fail_with_reasons_and_touch_nothing(
    tmp_path: Path,
) -> None:
    url, _ = node_repo(tmp_path, "Thing", [{"a.py": "1\n"}])
    ghost = "f" * 40
    m = manifest_of(f"custom_nodes:\n  - git: {url}\n    commit: '{ghost}'\n")
    dest = tmp_path / "nodes" / "Thing"
    result = await checkout(m.custom_nodes[0], dest)
    assert result.status == "failed" and f"commit {ghost} not found" in (result.reason or "")
    assert not dest.exists() and not list(dest.parent.glob(".Thing.clone-*"))

    dest.mkdir(parents=True)
    (dest / "mine.py").write_text("hand-installed\n")
    result = await checkout(m.custom_nodes[0], dest)
    assert result.status == "failed" and "is not a git checkout" in (result.reason or "")
    assert (dest / "mine.py").read_text() == "hand-installed\n"


async def test_critical_nodes_are_validated_like_critical_models(tmp_path: Path) -> None:
    good_url, good = node_repo(tmp_path, "Good", [{"a.py": ""}])
    bad_url, _ = node_repo(tmp_path, "Bad", [{"a.py": ""}])
    optional_url, _ = node_repo(tmp_path, "Optional", [{"a.py": ""}])
    manifest = manifest_of(
        f"""
        custom_nodes:
          - git: {good_url}
            commit: {good[0]}
          - git: {bad_url}
            commit: '{"e" * 40}'
          - git: {optional_url}
            commit: '{"d" * 40}'
            critical: false
        """
    )
    ws = tmp_path / "ws"
    summary = await provision(manifest, ws)
    assert not summary.ok
    assert [i.name for i in summary.missing_critical] == ["ComfyUI/custom_nodes/Bad"]
    assert [i.name for i in summary.failed] == [
        "ComfyUI/custom_nodes/Bad",
        "ComfyUI/custom_nodes/Optional",
    ]
    lines = error_log_lines(ws)
    assert any("INSTALL FAILED ComfyUI/custom_nodes/Bad: " in ln for ln in lines)
    assert any("VALIDATION FAILED ComfyUI/custom_nodes/Bad: " in ln for ln in lines)
    # In place but moved by hand to another commit: validation reads the disk again.
    good_dir = ws / "ComfyUI/custom_nodes/Good"
    (good_dir / "b.py").write_text("")
    git("add", "-A", cwd=good_dir)
    git("commit", "-q", "-m", "local change", cwd=good_dir)
    lenient = await provision(
        manifest_of(f"custom_nodes:\n  - git: {good_url}\n    commit: {good[0]}\n"),
        ws,
        options=ProvisionOptions(strict=False),
    )
    (item,) = lenient.items
    assert item.status == "installed" and await head_commit(good_dir) == good[0]


async def test_requirements_and_extra_packages_install_into_comfyuis_python(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    wheel(wheels, "nodereq")
    wheel(wheels, "sageattention_stub")
    python = throwaway_python(tmp_path)
    url, commits = node_repo(tmp_path, "Node", [{"requirements.txt": "nodereq\n"}])
    manifest = manifest_of(
        f"""
        comfyui:
          python: {python}
        custom_nodes:
          - git: {url}
            commit: {commits[0]}
        pip: [sageattention_stub]
        pip_args: [--no-index, --find-links, {wheels}]
        """
    )
    summary = await provision(manifest, tmp_path / "ws")
    assert summary.ok and not summary.failed, summary.lines()
    assert {i.kind: i.status for i in summary.items} == {"node": "installed", "pip": "installed"}
    assert imports(python, "nodereq") and imports(python, "sageattention_stub")


async def test_a_failing_requirement_is_pinned_on_its_node_and_the_rest_still_installs(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    wheel(wheels, "fine")
    python = throwaway_python(tmp_path)
    ok_url, ok = node_repo(tmp_path, "Fine", [{"requirements.txt": "fine\n"}])
    bad_url, bad = node_repo(tmp_path, "Broken", [{"requirements.txt": "no-such-package\n"}])
    manifest = manifest_of(
        f"""
        comfyui:
          python: {python}
        custom_nodes:
          - git: {ok_url}
            commit: {ok[0]}
          - git: {bad_url}
            commit: {bad[0]}
            critical: false
        pip_args: [--no-index, --find-links, {wheels}]
        """
    )
    summary = await provision(manifest, tmp_path / "ws")
    assert summary.ok  # the broken node is not critical
    (failed,) = summary.failed
    assert failed.name == "ComfyUI/custom_nodes/Broken"
    assert "requirements:" in (failed.reason or "") and "no-such-package" in (failed.reason or "")
    assert imports(python, "fine")


# -- local workflows and config files, the Dropbox workspace folder ------------------------


async def test_workflows_and_config_files_are_written_and_validated(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "txt2img.json").write_text('{"1": {"class_type": "SaveImage"}}')
    manifest = manifest_of(
        """
        workflows:
          - file: flows/txt2img.json
        config_files:
          - path: user/default/comfy.settings.json
            content: '{"Comfy.PreviewFormat": "webp"}'
        warmup_workflow: txt2img.json
        """,
        base_dir=tmp_path,
    )
    ws = tmp_path / "ws"
    summary = await provision(manifest, ws)
    assert summary.ok and [i.status for i in summary.items] == ["written", "written"]
    comfy = ws / "ComfyUI"
    assert json.loads((comfy / "user/default/workflows/txt2img.json").read_text()) == {
        "1": {"class_type": "SaveImage"}
    }
    assert (comfy / "user/default/comfy.settings.json").read_text().startswith('{"Comfy')


async def test_a_local_workflow_that_is_not_what_the_manifest_pins_is_not_written(
    tmp_path: Path,
) -> None:
    (tmp_path / "flow.json").write_text("{}")
    manifest = manifest_of(
        f"workflows:\n  - file: flow.json\n    sha256: {'ab' * 32}\n", base_dir=tmp_path
    )
    summary = await provision(manifest, tmp_path / "ws")
    assert not summary.ok
    (item,) = summary.missing_critical
    assert item.reason == (
        f"sha256 mismatch: expected {'ab' * 32}, got {hashlib.sha256(b'{}').hexdigest()}"
    )
    assert not (tmp_path / "ws/ComfyUI/user/default/workflows/flow.json").exists()


async def test_a_dropbox_workspace_folder_is_mapped_onto_the_workspace_and_backs_up_models(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    srv = fs.server
    data = generate_content("lora", MiB, 1)
    srv.add_hf_file("acme/loras", "style.safetensors", data=data)
    srv.inject("hf/acme/loras/style.safetensors", Fault("status", status=500, route="cdn"), 100)
    srv.add_dropbox_file("/WS/ComfyUI/models/loras/style.safetensors", data=data)
    srv.add_dropbox_file("/WS/ComfyUI/models/upscale_models/4x.pth", MiB // 4)
    srv.add_dropbox_file("/WS/ComfyUI/custom_nodes/Node/__init__.py", 100)
    links = [
        DropboxLink(path=PurePosixPath(p), url=srv.share_dropbox_path(f"/WS/{p}"))
        for p in (
            "ComfyUI/models/loras/style.safetensors",
            "ComfyUI/models/upscale_models/4x.pth",
            "ComfyUI/custom_nodes/Node/__init__.py",
        )
    ]
    url, commits = node_repo(tmp_path, "Node", [{"__init__.py": "from git\n"}])
    manifest = manifest_of(
        f"""
        custom_nodes:
          - git: {url}
            commit: {commits[0]}
        models:
          - source: hf://acme/loras/style.safetensors
            dest: loras
        """
    )
    ws = tmp_path / "ws"
    options = ProvisionOptions(links=links, download_overrides={**FAST, "retries": 1})
    summary = await provision(manifest, ws, resolver=resolver_for(fs), options=options)
    assert summary.ok, summary.lines()
    by_name = {i.name: i for i in summary.items}
    style = by_name["ComfyUI/models/loras/style.safetensors"]
    assert style.kind == "model" and "/scl/fi/" in (style.source or "")
    assert by_name["ComfyUI/models/upscale_models/4x.pth"].kind == "transfer"
    assert (ws / "ComfyUI/custom_nodes/Node/__init__.py").read_text() == "from git\n"
    assert "ComfyUI/custom_nodes/Node/__init__.py" not in by_name


# -- manifest check: sizes and hashes from the sources ------------------------------------


async def test_manifest_check_resolves_sizes_and_hashes_and_adds_up_the_total(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    a = fs.server.add_hf_file("acme/a", "a.safetensors", 3 * MiB)
    b = fs.server.add_civitai_file(77, "b.safetensors", 2 * MiB)
    manifest = manifest_of(
        """
        models:
          - source: hf://acme/a/a.safetensors
            dest: vae
          - source: civitai://77
            dest: loras
          - source: hf://acme/missing/gone.safetensors
            dest: vae
            critical: false
        """
    )
    result = await check_manifest(manifest, resolver=resolver_for(fs))
    first, second, third = result.models
    assert (first.size, first.sha256, first.size_from) == (a.size, a.sha256, "source")
    assert (second.target, second.sha256) == ("ComfyUI/models/loras/b.safetensors", b.sha256)
    assert second.size == b.size
    assert not third.ok and result.ok  # not critical
    assert result.total_bytes == a.size + b.size
    # Metadata only (Civitai's exact size is read with a one-byte Range request).
    assert all(f.bytes_sent <= 1 for f in fs.server.stats().files.values())


def test_manifest_check_cli_prints_the_resolved_total_and_fails_on_a_critical_gap(
    fs: RunningFileServer, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    a = fs.server.add_hf_file("acme/a", "a.safetensors", 3 * MiB)
    path = tmp_path / "manifest.yaml"
    path.write_text("models:\n  - source: hf://acme/a/a.safetensors\n    dest: vae\n")
    env = {**clean_env, **source_env(fs)}
    result = run_cli("manifest", "check", str(path), "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total_bytes"] == a.size and data["models"][0]["sha256"] == a.sha256
    table = run_cli("manifest", "check", str(path), env=env)
    assert f"total to download: 3.15 MB ({a.size} bytes) for 1 models" in table.stdout

    path.write_text("models:\n  - source: hf://acme/nope/x.safetensors\n    dest: vae\n")
    gap = run_cli("manifest", "check", str(path), env=env)
    assert gap.returncode == 1
    assert "critical models cannot be resolved: ComfyUI/models/vae/x.safetensors" in gap.stderr


# -- the CLI: exit status for critical and non-critical failures ----------------------------


def provision_cli(
    fs: RunningFileServer, env: dict[str, str], manifest: Path, ws: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "agent",
        "provision",
        "--manifest",
        str(manifest),
        "--workspace",
        str(ws),
        *extra,
        env={**env, **source_env(fs)},
        timeout=120,
    )


def test_cli_exits_1_naming_a_missing_critical_model_and_0_with_no_strict(
    fs: RunningFileServer, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    ok = fs.server.add_hf_file("acme/base", "base.safetensors", MiB)
    fs.server.add_hf_repo("black-forest-labs/FLUX.1-dev", gated=True)
    fs.server.add_hf_file("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", MiB)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        textwrap.dedent(
            """
            models:
              - source: hf://acme/base/base.safetensors
                dest: checkpoints
              - source: hf://black-forest-labs/FLUX.1-dev/flux1-dev.safetensors
                dest: unet
            """
        )
    )
    ws = tmp_path / "ws"
    strict = provision_cli(fs, clean_env, manifest, ws)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "Traceback" not in strict.stderr
    assert (
        "error: provision failed: 1 critical item missing: "
        "ComfyUI/models/unet/flux1-dev.safetensors: missing: " in strict.stderr
    )
    assert "Missing HF_TOKEN" in strict.stderr
    assert "stage failed: provision_failed" in strict.stderr
    assert sha_of(ws / "ComfyUI/models/checkpoints/base.safetensors") == ok.sha256
    assert any("VALIDATION FAILED ComfyUI/models/unet" in ln for ln in error_log_lines(ws))

    lenient = provision_cli(fs, clean_env, manifest, ws, "--no-strict", "--json")
    assert lenient.returncode == 0, lenient.stderr
    data = json.loads(lenient.stdout)
    assert data["ok"] is True and data["strict"] is False
    assert data["missing_critical"] == ["ComfyUI/models/unet/flux1-dev.safetensors"]
    assert data["bytes_downloaded"] == 0  # base.safetensors was already there


def test_cli_exits_0_and_lists_a_non_critical_failure_in_the_summary(
    fs: RunningFileServer, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    ok = fs.server.add_civitai_file(290640, "pony.safetensors", MiB)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        textwrap.dedent(
            """
            models:
              - source: civitai://290640
                dest: checkpoints
              - source: civitai://999
                dest: loras
                name: gone.safetensors
                critical: false
            """
        )
    )
    ws = tmp_path / "ws"
    result = provision_cli(fs, clean_env, manifest, ws, "--concurrency", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 succeeded" not in result.stdout
    assert "1 succeeded, 1 failed (0 critical)" in result.stdout
    assert "ComfyUI/models/loras/gone.safetensors" in result.stdout
    assert f"errors logged to {ws / ERROR_LOG_NAME}" in result.stdout
    assert sha_of(ws / "ComfyUI/models/checkpoints/pony.safetensors") == ok.sha256


def test_cli_refuses_an_invalid_manifest_with_exit_2_and_downloads_nothing(
    fs: RunningFileServer, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("models:\n  - source: hf://a/b/c\n    dest: ../../etc\n")
    result = provision_cli(fs, clean_env, manifest, tmp_path / "ws")
    assert result.returncode == 2
    assert "models[0].dest" in result.stderr and "escapes it (line 3)" in result.stderr
    assert not (tmp_path / "ws").exists()
    assert fs.server.stats().files == {}


def test_cli_maps_the_dropbox_workspace_folder_from_the_environment_onto_the_workspace(
    fs: RunningFileServer, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    upscaler = fs.server.add_dropbox_file("/WS/ComfyUI/models/upscale_models/4x.pth", MiB)
    links = [
        DropboxLink(
            path=PurePosixPath("ComfyUI/models/upscale_models/4x.pth"),
            url=fs.server.share_dropbox_path("/WS/ComfyUI/models/upscale_models/4x.pth"),
            size=upscaler.size,
        )
    ]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("models: []\n")
    env = {**clean_env, LINKS_ENV_VAR: encode_links_env(format_links_file(links, folder="/WS"))}
    ws = tmp_path / "ws"
    result = provision_cli(fs, env, manifest, ws, "--json")
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(result.stdout)["items"]
    assert (item["kind"], item["name"], item["status"]) == (
        "transfer",
        "ComfyUI/models/upscale_models/4x.pth",
        "downloaded",
    )
    assert sha_of(ws / "ComfyUI/models/upscale_models/4x.pth") == upscaler.sha256

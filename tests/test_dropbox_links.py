"""``comfyfleet dropbox links`` and the links file: a Dropbox folder onto a workspace tree.

The official ``dropbox`` SDK talks to ``sim/files.py`` over loopback (the SDK's
``https://api.dropboxapi.com`` rewritten to the simulator); the CLI runs as a real
subprocess, and the links it writes are downloaded into a workspace by the agent's
resolver and engine.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
import requests

from comfyfleet.agent.downloads import download
from comfyfleet.agent.sources import (
    LINKS_ENV_VAR,
    DropboxLink,
    SourceResolver,
    SourceSettings,
    decode_links_env,
    dropbox_workspace_items,
    encode_links_env,
    format_links_file,
    parse_links_file,
    workspace_path,
)
from comfyfleet.clock import ManualClock
from comfyfleet.dropbox import check_scopes, dropbox_client, list_files, shared_link
from comfyfleet.errors import DownloadDomainNotAllowed, DropboxError, DropboxLinksError
from comfyfleet.sim.files import FileServer, RunningFileServer
from tests.conftest import run_cli

MiB = 1 << 20

#: A finished workspace in Dropbox: what the seeds call "full Dropbox workspace transfer".
TREE = {
    "/Workspace/models/checkpoints/juggernautXL.safetensors": 3 * MiB,
    "/Workspace/models/loras/detail tweaker.safetensors": 700_000,
    "/Workspace/models/vae/ae.safetensors": 1 * MiB,
    "/Workspace/custom_nodes/my-node/__init__.py": 1_200,
    "/Workspace/workflows/portrait.json": 4_000,
}


@pytest.fixture
def fs() -> Iterator[RunningFileServer]:
    server = FileServer(dropbox_page_size=2)  # small pages: list_folder/continue is used
    with RunningFileServer(server) as running:
        server.add_dropbox_token("sl.full")
        for path, size in TREE.items():
            server.add_dropbox_file(path, size)
        server.add_dropbox_file("/Elsewhere/not-shared.bin", 100)
        yield running


def cli_env(fs: RunningFileServer, clean_env: dict[str, str], token: str | None) -> dict[str, str]:
    env = {**clean_env, **fs.env()}
    env.pop("DROPBOX_TOKEN", None)
    if token is not None:
        env["DROPBOX_TOKEN"] = token
    return env


# -- the links file -------------------------------------------------------------------


def test_a_links_file_round_trips_through_its_base64_environment_form() -> None:
    links = [
        DropboxLink(
            PurePosixPath("models/loras/a b.safetensors"),
            "https://www.dropbox.com/scl/fi/x1/a%20b.safetensors?rlkey=k1&dl=1",
            size=123,
            content_hash="ab" * 32,
        ),
        DropboxLink(PurePosixPath("workflows/w.json"), "https://www.dropbox.com/s/x2/w.json?dl=1"),
    ]
    text = format_links_file(links, folder="/Workspace")
    b64 = encode_links_env(text)

    assert parse_links_file(text) == links
    assert decode_links_env(b64) == links
    assert decode_links_env(b64[:40] + "\n" + b64[40:]) == links  # wrapped by a shell
    urlsafe = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    assert decode_links_env(urlsafe) == links
    assert text.startswith("# comfyfleet dropbox links v1\n# Dropbox folder: /Workspace\n")


def test_a_bare_url_line_lands_at_the_top_of_the_workspace_under_the_links_name() -> None:
    [link] = parse_links_file("https://www.dropbox.com/scl/fi/x/my%20model.safetensors?rlkey=k\n")
    assert link.path == PurePosixPath("my model.safetensors") and link.size is None


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("../outside.bin\thttps://www.dropbox.com/s/x/a", "escapes the workspace"),
        ("models/../../etc/passwd\thttps://www.dropbox.com/s/x/a", "escapes the workspace"),
        ("/etc/cron.d/x\thttps://www.dropbox.com/s/x/a", "is absolute"),
        ("C:/Windows/x\thttps://www.dropbox.com/s/x/a", "is absolute"),
        ("models\\x.bin\thttps://www.dropbox.com/s/x/a", "use '/' separators"),
        ("a.bin\tftp://www.dropbox.com/s/x/a", "expected an http(s) link"),
        ("a.bin\thttps://www.dropbox.com/s/x/a\tbig", "expected a size in bytes"),
        ("a.bin\thttps://www.dropbox.com/s/x/a\t1\tnot-a-hash", "expected a Dropbox content hash"),
    ],
)
def test_a_links_file_that_would_write_outside_the_workspace_is_refused(
    line: str, words: str
) -> None:
    text = f"# header\n\n{line}\n"
    with pytest.raises(DropboxLinksError) as info:
        parse_links_file(text, source="links.txt")
    assert str(info.value).startswith("links.txt: line 3: ")
    assert words in str(info.value)


def test_two_links_to_one_path_are_refused() -> None:
    text = "a.bin\thttps://www.dropbox.com/s/1/a\na.bin\thttps://www.dropbox.com/s/2/a\n"
    with pytest.raises(DropboxLinksError, match=r"line 2: a.bin is already linked on line 1"):
        parse_links_file(text)


def test_garbage_in_the_environment_variable_is_named() -> None:
    with pytest.raises(DropboxLinksError) as info:
        decode_links_env("@@@ not base64 @@@")
    assert str(info.value).startswith(f"{LINKS_ENV_VAR}: is not the base64 of a links file")


def test_a_symlink_in_the_workspace_cannot_lead_a_link_outside(tmp_path: Path) -> None:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    (workspace / "models").mkdir(parents=True)
    outside.mkdir()
    (workspace / "models" / "loras").symlink_to(outside)

    assert workspace_path(workspace, PurePosixPath("models/vae/a.bin")) == (
        workspace / "models/vae/a.bin"
    )
    with pytest.raises(DropboxLinksError, match="leads outside the workspace"):
        workspace_path(workspace, PurePosixPath("models/loras/evil.safetensors"))


# -- the SDK against the simulator -------------------------------------------------------


def sdk(fs: RunningFileServer, token: str = "sl.full"):  # type: ignore[no-untyped-def]
    return dropbox_client(token, SourceSettings.from_env(fs.env()))


def test_the_folder_is_listed_recursively_across_pages(fs: RunningFileServer) -> None:
    with sdk(fs) as dbx:
        files = list_files(dbx, "/workspace/")  # case and a trailing slash do not matter

    assert [str(f.relative) for f in files] == sorted(p.removeprefix("/Workspace/") for p in TREE)
    assert all(f.size == TREE[f.path_display] for f in files)
    calls = fs.server.stats().file("dropbox-api/files/list_folder/continue").requests
    assert calls >= 4  # 5 files and 8 folders, 2 entries a page


def test_an_existing_shared_link_is_reused_even_when_dropbox_omits_its_metadata(
    fs: RunningFileServer,
) -> None:
    path = "/Workspace/models/vae/ae.safetensors"
    first = fs.server.share_dropbox_path(path)
    with sdk(fs) as dbx:
        assert shared_link(dbx, path) == first  # 409 shared_link_already_exists + metadata
        fs.server.dropbox_omit_existing_link_metadata = True
        assert shared_link(dbx, path) == first  # 409 without it: list_shared_links
    assert fs.server.stats().file("dropbox-api/sharing/list_shared_links").requests == 1
    assert len(fs.server.dropbox_shared_links()) == 1


def test_missing_scopes_are_all_named_without_changing_anything(fs: RunningFileServer) -> None:
    fs.server.add_dropbox_token("sl.readonly", {"files.metadata.read", "files.content.read"})
    fs.server.add_dropbox_token("sl.sharing", {"sharing.read", "sharing.write"})

    with sdk(fs, "sl.readonly") as dbx:
        assert check_scopes(dbx, "/Workspace") == ["sharing.read", "sharing.write"]
    with sdk(fs, "sl.sharing") as dbx:
        assert check_scopes(dbx, "/Workspace") == ["files.metadata.read"]
    with sdk(fs) as dbx:
        assert check_scopes(dbx, "/Workspace") == []
    assert fs.server.dropbox_shared_links() == []  # the write probe shared nothing


def test_a_temporary_link_works_for_four_hours_then_is_gone(tmp_path: Path) -> None:
    clock = ManualClock()
    server = FileServer(clock=clock)
    with RunningFileServer(server) as fs:
        server.add_dropbox_token("sl.full")
        f = server.add_dropbox_file("/W/a.bin", 1000)
        with sdk(fs) as dbx:
            result = dbx.files_get_temporary_link("/W/a.bin")
            assert result.metadata.content_hash == server.dropbox_entry("/W/a.bin").content_hash
            ok = requests.get(result.link, timeout=10)
            clock.advance(4 * 3600 + 1)
            gone = requests.get(result.link, timeout=10)
    assert ok.status_code == 200 and ok.content == f.data
    assert "attachment" in ok.headers["Content-Disposition"]
    assert gone.status_code == 410


def test_a_dropbox_api_failure_is_a_dropbox_error_with_the_reason(fs: RunningFileServer) -> None:
    with sdk(fs) as dbx, pytest.raises(DropboxError, match=r"Dropbox folder /Nope not found"):
        list_files(dbx, "/Nope")
    with sdk(fs) as dbx, pytest.raises(DropboxError, match=r"is a file, not a folder"):
        list_files(dbx, "/Workspace/workflows/portrait.json")


# -- the command, as a user runs it -------------------------------------------------------


def test_dropbox_links_writes_the_links_file_and_its_base64_form(
    fs: RunningFileServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    reused = fs.server.share_dropbox_path("/Workspace/workflows/portrait.json")
    out = tmp_path / "data" / "dropbox_links.txt"

    r = run_cli(
        "dropbox", "links", "/Workspace", "--out", str(out), env=cli_env(fs, clean_env, "sl.full")
    )

    assert r.returncode == 0, r.stderr
    assert "Shared 5 files (4.90 MB) from /Workspace." in r.stdout
    assert f'export {LINKS_ENV_VAR}="$(cat {out}.b64)"' in r.stdout
    links = parse_links_file(out.read_text())
    assert {str(k.path) for k in links} == {p.removeprefix("/Workspace/") for p in TREE}
    assert decode_links_env((tmp_path / "data" / "dropbox_links.txt.b64").read_text()) == links
    by_path = {str(k.path): k for k in links}
    assert by_path["workflows/portrait.json"].url == reused.replace("dl=0", "dl=1")
    assert all(k.url.endswith("&dl=1") and "rlkey=" in k.url for k in links)
    for path, size in TREE.items():
        link = by_path[path.removeprefix("/Workspace/")]
        assert link.size == size
        assert link.content_hash == fs.server.dropbox_entry(path).content_hash
    assert len(fs.server.dropbox_shared_links()) == 5  # the file outside was not shared


def test_dropbox_links_takes_the_folder_from_dropbox_folder_and_a_workspace_prefix(
    fs: RunningFileServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**cli_env(fs, clean_env, "sl.full"), "DROPBOX_FOLDER": "/Workspace/models/loras"}
    out = tmp_path / "links.txt"

    r = run_cli("dropbox", "links", "--out", str(out), "--prefix", "models/loras", env=env)

    assert r.returncode == 0, r.stderr
    [link] = parse_links_file(out.read_text())
    assert link.path == PurePosixPath("models/loras/detail tweaker.safetensors")


def test_dropbox_links_without_a_token_says_so(
    fs: RunningFileServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    r = run_cli(
        "dropbox",
        "links",
        "/Workspace",
        "--out",
        str(tmp_path / "l.txt"),
        env=cli_env(fs, clean_env, None),
    )

    assert r.returncode == 1
    assert r.stderr.startswith("error: missing DROPBOX_TOKEN: create an app at")
    assert "files.metadata.read, sharing.read, sharing.write" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "l.txt").exists()


@pytest.mark.parametrize(
    ("scopes", "named"),
    [
        ({"files.metadata.read"}, "lacks the scopes sharing.read, sharing.write (sharing.read"),
        (
            {"sharing.read", "sharing.write"},
            "lacks the scope files.metadata.read (files.metadata.read to list the folder)",
        ),
    ],
)
def test_dropbox_links_names_the_scopes_the_token_lacks(
    fs: RunningFileServer, clean_env: dict[str, str], tmp_path: Path, scopes: set[str], named: str
) -> None:
    fs.server.add_dropbox_token("sl.partial", scopes)

    r = run_cli(
        "dropbox",
        "links",
        "/Workspace",
        "--out",
        str(tmp_path / "l.txt"),
        env=cli_env(fs, clean_env, "sl.partial"),
    )

    assert r.returncode == 1
    assert named in r.stderr
    assert "Permissions tab" in r.stderr and "Traceback" not in r.stderr
    assert fs.server.dropbox_shared_links() == []
    assert not (tmp_path / "l.txt").exists()


@pytest.mark.parametrize(
    ("token", "folder", "words"),
    [
        ("sl.revoked", "/Workspace", "Dropbox refused DROPBOX_TOKEN (invalid_access_token)"),
        ("sl.full", "/Nope", "Dropbox folder /Nope not found"),
    ],
)
def test_dropbox_links_explains_a_bad_token_or_folder(
    fs: RunningFileServer,
    clean_env: dict[str, str],
    tmp_path: Path,
    token: str,
    folder: str,
    words: str,
) -> None:
    r = run_cli(
        "dropbox",
        "links",
        folder,
        "--out",
        str(tmp_path / "l.txt"),
        env=cli_env(fs, clean_env, token),
    )
    assert r.returncode == 1
    assert words in r.stderr and "Traceback" not in r.stderr


# -- the whole transfer ------------------------------------------------------------------


async def test_a_dropbox_workspace_folder_is_rebuilt_on_an_instance_from_the_environment(
    fs: RunningFileServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "dropbox_links.txt"
    r = run_cli(
        "dropbox", "links", "/Workspace", "--out", str(out), env=cli_env(fs, clean_env, "sl.full")
    )
    assert r.returncode == 0, r.stderr
    # On the instance: the links arrive in the environment variable, nothing else.
    b64 = await asyncio.to_thread(Path(f"{out}.b64").read_text)
    for path in TREE:  # a CDN's pace, so that the files visibly overlap
        fs.server.get_file(f"dropbox{path}").rate_bps = 4_000_000
    instance_env = {**fs.env(), LINKS_ENV_VAR: b64}
    links = decode_links_env(instance_env[LINKS_ENV_VAR])
    resolver = SourceResolver(SourceSettings.from_env(instance_env))
    workspace = tmp_path / "workspace"

    items = await dropbox_workspace_items(resolver, links, workspace)
    summary = await download(items, resolver.download_options(backoff_base_s=0.01))

    assert summary.ok, summary.lines()
    rebuilt = {
        "/Workspace/" + p.relative_to(workspace).as_posix(): p.read_bytes()
        for p in workspace.rglob("*")
        if p.is_file()
    }
    assert rebuilt == {p: fs.server.get_file(f"dropbox{p}").data for p in TREE}
    assert fs.server.stats().peak_files_in_flight >= 4  # several files at once
    again = await download(
        await dropbox_workspace_items(resolver, links, workspace), resolver.download_options()
    )
    assert [x.status for x in again.results] == ["present"] * len(TREE)


async def test_links_outside_the_allowlist_are_refused_on_the_instance(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    text = "models/x.bin\thttps://files.evil.example/x.bin\n"
    resolver = SourceResolver(SourceSettings.from_env(fs.env()))

    with pytest.raises(
        DownloadDomainNotAllowed, match=r"Download domain not allowed: files\.evil\.example"
    ):
        await dropbox_workspace_items(resolver, parse_links_file(text), tmp_path)
    assert not os.listdir(tmp_path)

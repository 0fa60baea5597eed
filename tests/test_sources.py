"""The download sources (hf://, civitai://, Dropbox links, URLs) against the simulator.

Every test talks to ``sim/files.py`` over loopback: Hugging Face on 127.0.0.1, its
CDN on 127.0.0.2, Civitai's storage on 127.0.0.3, Dropbox's content host on
127.0.0.4, Civitai on 127.0.0.5 and Dropbox on 127.0.0.6, so every redirect crosses
to another host name, as it does for real.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.agent.downloads import download
from comfyfleet.agent.sources import (
    DEFAULT_ALLOWED_DOMAINS,
    ResolvedSource,
    SourceResolver,
    SourceSettings,
    dropbox_direct_url,
)
from comfyfleet.clock import ManualClock
from comfyfleet.errors import (
    ConfigError,
    DownloadDomainNotAllowed,
    GatedRepo,
    InvalidSource,
    MissingToken,
    PlainHTTPNotAllowed,
    SourceAuthError,
    SourceMismatch,
    SourceNotFound,
    SourceRateLimited,
)
from comfyfleet.sim.files import Fault, FileServer, RunningFileServer

MB = 1_000_000
MiB = 1 << 20
FAST: dict[str, Any] = {
    "backoff_base_s": 0.01,
    "backoff_cap_s": 0.05,
    "min_piece_size": 256 * 1024,
}


@pytest.fixture
def fs() -> Iterator[RunningFileServer]:
    with RunningFileServer(FileServer()) as running:
        yield running


def host(url: str) -> str:
    return url.split("://", 1)[1].split(":", 1)[0]


def resolver_for(
    fs: RunningFileServer, clock: ManualClock | None = None, **env: str
) -> SourceResolver:
    """A resolver pointed at the simulator, as the environment would point it."""
    settings = SourceSettings.from_env({**fs.env(), **env})
    return SourceResolver(settings, clock=clock or ManualClock())


async def until(condition: Callable[[], bool], within_s: float = 20) -> None:
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# -- settings and the allowlist ---------------------------------------------------


def test_the_default_allowlist_names_the_model_hosts_and_their_cdns_and_nothing_else() -> None:
    r = SourceResolver(SourceSettings.from_env({}))

    for url in [
        "https://huggingface.co/org/repo/resolve/main/x.safetensors",
        "https://cdn-lfs-us-1.huggingface.co/repos/ab/cd/sha?X-Amz-Expires=3600",
        "https://cas-bridge.xethub.hf.co/xet-bridge-us/abc",
        "https://civitai.com/api/download/models/1",
        "https://civitai-delivery-worker-prod.abc.r2.cloudflarestorage.com/x",
        "https://www.dropbox.com/scl/fi/abc/x?rlkey=k&dl=1",
        "https://uc4f2.dl.dropboxusercontent.com/cd/0/get/abc/file",
        "https://api.dropboxapi.com/2/files/list_folder",
    ]:
        assert r.allow_url(url), url
    for url in [
        "https://evil.example/x",
        "https://huggingface.co.evil.example/x",
        "https://nothuggingface.co/x",
        "http://huggingface.co/x",  # plain http, even to an allowed host
        "ftp://huggingface.co/x",
        "https:///nohost",
    ]:
        assert not r.allow_url(url), url
    assert set(DEFAULT_ALLOWED_DOMAINS) <= set(r.settings.allowed_domains)


def test_settings_from_env_read_tokens_endpoints_and_the_seeds_allowlist() -> None:
    env = {
        "HUGGINGFACE_HUB_TOKEN": "hf_from_seed_name",
        "CIVITAI_TOKEN": " civ_key ",
        "HF_ENDPOINT": "http://mirror.local:8080/",
        "DM_ALLOWED_DOMAINS": "huggingface.co, *.example.org,https://Files.Example.NET/x",
        "DM_ALLOWED_HTTP_HOSTS": "cache.lan",
    }
    settings = SourceSettings.from_env(env)

    assert settings.hf_token == "hf_from_seed_name"
    assert SourceSettings.from_env({**env, "HF_TOKEN": "hf_wins"}).hf_token == "hf_wins"
    assert settings.civitai_token == "civ_key"
    assert settings.hf_endpoint == "http://mirror.local:8080"
    # DM_ALLOWED_DOMAINS replaces the default list; configured endpoints are always in.
    assert "civitai.com" in settings.allowed_domains  # the Civitai endpoint
    assert "dropboxusercontent.com" not in settings.allowed_domains
    assert {"huggingface.co", "example.org", "files.example.net"} <= set(settings.allowed_domains)
    # An http:// endpoint is a mirror: its host may be reached over plain http.
    assert settings.allowed_http_hosts == ("cache.lan", "mirror.local")
    r = SourceResolver(settings)
    assert r.allow_url("http://mirror.local:8080/x") and r.allow_url("http://cache.lan/x")
    assert not r.allow_url("http://huggingface.co/x")
    assert r.allow_url("https://a.b.example.org/x")
    assert "hf_from_seed_name" not in repr(settings) and "civ_key" not in repr(settings)


def test_an_endpoint_that_is_not_a_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as info:
        SourceSettings.from_env({"CIVITAI_BASE_URL": "civitai.com"})
    assert str(info.value).startswith("CIVITAI_BASE_URL: expected an http(s) URL")


async def test_a_source_on_a_host_outside_the_allowlist_is_refused_with_the_seeds_words(
    fs: RunningFileServer,
) -> None:
    r = resolver_for(fs)
    with pytest.raises(DownloadDomainNotAllowed) as info:
        await r.resolve("https://downloads.evil.example/model.safetensors?token=x")
    assert str(info.value) == "Download domain not allowed: downloads.evil.example"


async def test_plain_http_is_allowed_only_to_hosts_named_as_mirrors(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_file("mirror.bin", 300_000)
    https_only = SourceResolver(SourceSettings(allowed_domains=("127.0.0.1",)))
    with pytest.raises(PlainHTTPNotAllowed) as info:
        await https_only.resolve(fs.file_url("mirror.bin"))
    assert str(info.value).startswith("Download domain not allowed: 127.0.0.1 (plain http://")

    mirror = SourceResolver(SourceSettings(allowed_http_hosts=("127.0.0.1",)))
    resolved = await mirror.resolve(fs.file_url("mirror.bin"))
    assert (resolved.kind, resolved.filename, resolved.headers) == ("url", "mirror.bin", {})
    item = mirror.download_item(resolved, tmp_path / "mirror.bin", sha256=f.sha256)
    summary = await download([item], mirror.download_options(**FAST))
    assert summary.ok, summary.lines()
    assert (tmp_path / "mirror.bin").read_bytes() == f.data


async def test_the_allowlist_is_applied_to_every_redirect_the_engine_follows(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_file("r.bin", 1000)
    r = resolver_for(fs)
    # An allowed host that redirects to one the allowlist does not name.
    hop = fs.server.redirect_url(f"http://127.0.0.9:{fs.url.rsplit(':', 1)[1]}/files/r.bin")
    resolved = await r.resolve(hop)  # the first URL is fine
    good = await r.resolve(fs.server.redirect_url(fs.file_url("r.bin")))

    summary = await download(
        [
            r.download_item(resolved, tmp_path / "bad.bin"),
            r.download_item(good, tmp_path / "r.bin"),
        ],
        r.download_options(**FAST),
    )

    bad, ok = summary.results
    assert ok.status == "downloaded"
    assert isinstance(bad.error, DownloadDomainNotAllowed)
    assert str(bad.error) == "Download domain not allowed: 127.0.0.9"
    assert not (tmp_path / "bad.bin").exists()


async def test_a_hugging_face_redirect_to_a_cdn_outside_the_allowlist_is_refused(
    fs: RunningFileServer,
) -> None:
    fs.server.add_hf_file("org/model", "m.safetensors", 1000)
    allowed = ",".join(h for h in fs.hosts if h != "127.0.0.2")  # not the CDN
    r = resolver_for(fs, DM_ALLOWED_DOMAINS=allowed, DM_ALLOWED_HTTP_HOSTS=allowed)

    with pytest.raises(DownloadDomainNotAllowed) as info:
        await r.resolve("hf://org/model/m.safetensors")

    assert str(info.value) == "Download domain not allowed: 127.0.0.2"
    assert fs.server.stats().file("hf/org/model/m.safetensors").bytes_sent == 0


async def test_unknown_schemes_are_refused_with_the_forms_that_work(fs: RunningFileServer) -> None:
    r = resolver_for(fs)
    with pytest.raises(InvalidSource, match=r"use hf://, civitai://, https://"):
        await r.resolve("s3://bucket/model.safetensors")
    with pytest.raises(InvalidSource, match=r"expected hf://OWNER/REPO/PATH"):
        await r.resolve("hf://only-owner/repo")
    with pytest.raises(InvalidSource, match=r"expected civitai://MODEL_VERSION_ID"):
        await r.resolve("civitai://not-a-number")


# -- Hugging Face --------------------------------------------------------------------


async def test_hf_source_is_resolved_by_one_head_to_the_signed_cdn_url_with_sha256_and_size(
    fs: RunningFileServer,
) -> None:
    f = fs.server.add_hf_file("org/model", "unet/flux1-dev.safetensors", 3 * MiB)
    commit = fs.server.hf_repo("org/model").revisions["main"]
    r = resolver_for(fs, HF_TOKEN="hf_not_needed_here")
    fs.server.hf_tokens.add("hf_not_needed_here")

    resolved = await r.resolve("hf://org/model/unet/flux1-dev.safetensors")

    assert resolved.kind == "hf"
    assert host(resolved.url) == "127.0.0.2" and "/blobs/" in resolved.url
    assert resolved.headers == {}  # the token stays on the Hub
    assert resolved.sha256 == f.sha256  # X-Linked-Etag
    assert resolved.size == 3 * MiB  # X-Linked-Size
    assert resolved.filename == "flux1-dev.safetensors"
    assert resolved.identity == f"hf:org/model@{commit}/unet/flux1-dev.safetensors"
    stats = fs.server.stats().file(f.name)
    assert stats.by_route == {"hf": 1} and stats.bytes_sent == 0  # a HEAD, no redirect followed


async def test_hf_revisions_and_dataset_repos(fs: RunningFileServer) -> None:
    commit = "a" * 40
    fs.server.add_hf_repo(
        "org/data", repo_type="dataset", revisions={"main": "b" * 40, "v1.0": commit}
    )
    f = fs.server.add_hf_file("org/data", "train/part-0.parquet", 5000, repo_type="dataset")
    r = resolver_for(fs)

    by_tag = await r.resolve("hf://datasets/org/data/train/part-0.parquet@v1.0")
    by_commit = await r.resolve(f"hf://datasets/org/data/train/part-0.parquet@{commit}")

    assert (
        by_tag.identity
        == by_commit.identity
        == f"hf:datasets/org/data@{commit}/train/part-0.parquet"
    )
    assert by_tag.sha256 == f.sha256
    with pytest.raises(SourceNotFound) as info:
        await r.resolve("hf://datasets/org/data/train/part-0.parquet@v9")
    assert "has no revision 'v9'" in str(info.value)


async def test_a_small_git_file_is_served_by_the_hub_itself_with_the_token(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.add_hf_repo("org/private", private=True, authorized={"hf_member"})
    fs.server.hf_tokens.add("hf_member")
    f = fs.server.add_hf_file("org/private", "config.json", 700, lfs=False)
    r = resolver_for(fs, HF_TOKEN="hf_member")

    resolved = await r.resolve("hf://org/private/config.json")
    summary = await download(
        [r.download_item(resolved, tmp_path / "config.json")], r.download_options(**FAST)
    )

    assert resolved.url.startswith(fs.url + "/org/private/resolve/main/")
    assert resolved.headers == {"Authorization": "Bearer hf_member"}
    assert resolved.sha256 is None  # the ETag of a git file is its blob sha1
    assert resolved.size == 700
    assert summary.ok, summary.lines()
    assert (tmp_path / "config.json").read_bytes() == f.data


async def test_a_gated_repo_without_a_token_says_missing_hf_token_and_to_accept_the_licence(
    fs: RunningFileServer,
) -> None:
    fs.server.add_hf_repo("black-forest-labs/FLUX.1-dev", gated=True)
    fs.server.add_hf_file("black-forest-labs/FLUX.1-dev", "ae.safetensors", 1000)

    with pytest.raises(MissingToken) as info:
        await resolver_for(fs).resolve("hf://black-forest-labs/FLUX.1-dev/ae.safetensors")

    err = info.value
    assert err.variable == "HF_TOKEN" and err.status == 401
    assert str(err).startswith(
        "Missing HF_TOKEN: hf://black-forest-labs/FLUX.1-dev/ae.safetensors is in the gated "
        "repository black-forest-labs/FLUX.1-dev: accept its licence at "
        f"{fs.url}/black-forest-labs/FLUX.1-dev"
    )
    assert "You must have access to it and be authenticated" in str(err)


async def test_a_gated_repo_whose_licence_the_account_has_not_accepted_is_explained(
    fs: RunningFileServer,
) -> None:
    fs.server.add_hf_repo("org/gated", gated=True, authorized={"hf_approved"})
    fs.server.hf_tokens.update({"hf_approved", "hf_pending"})
    fs.server.add_hf_file("org/gated", "w.safetensors", 1000)

    with pytest.raises(GatedRepo) as info:
        await resolver_for(fs, HF_TOKEN="hf_pending").resolve("hf://org/gated/w.safetensors")

    assert info.value.status == 403
    assert "accept its licence at" in str(info.value)
    assert "you are not in the authorized list" in str(info.value)
    approved = await resolver_for(fs, HF_TOKEN="hf_approved").resolve(
        "hf://org/gated/w.safetensors"
    )
    assert approved.size == 1000


async def test_hf_refusals_each_say_what_is_wrong(fs: RunningFileServer) -> None:
    fs.server.add_hf_repo("org/secret", private=True)
    fs.server.add_hf_file("org/public", "a.bin", 10)
    fs.server.hf_tokens.add("hf_valid")

    with pytest.raises(
        SourceAuthError, match=r"Hugging Face refused HF_TOKEN \(Invalid credentials"
    ):
        await resolver_for(fs, HF_TOKEN="hf_revoked").resolve("hf://org/public/a.bin")
    with pytest.raises(SourceNotFound, match=r"not found, or it is private: then export HF_TOKEN"):
        await resolver_for(fs).resolve("hf://org/secret/a.bin")
    with pytest.raises(SourceNotFound, match=r"not found, or HF_TOKEN has no access to it"):
        await resolver_for(fs, HF_TOKEN="hf_valid").resolve("hf://org/secret/a.bin")
    with pytest.raises(
        SourceNotFound, match=r"no file 'b.bin' in Hugging Face repository org/public"
    ):
        await resolver_for(fs).resolve("hf://org/public/b.bin")


async def test_hf_rate_limits_are_waited_out_as_the_ratelimit_header_says_then_explained(
    fs: RunningFileServer,
) -> None:
    f = fs.server.add_hf_file("org/model", "m.bin", 100)
    clock = ManualClock()
    start = clock.now()
    fs.server.inject(f.name, Fault("status", status=429, retry_after=7, route="hf"))

    resolved = await resolver_for(fs, clock).resolve("hf://org/model/m.bin")

    assert resolved.sha256 == f.sha256
    assert clock.now() - start >= 7  # waited the t= of "RateLimit: resolvers;r=0;t=7"
    fs.server.inject(f.name, Fault("status", status=429, retry_after=1, route="hf"), count=10)
    with pytest.raises(SourceRateLimited) as info:
        await resolver_for(fs).resolve("hf://org/model/m.bin")
    assert "Hugging Face is rate limiting this machine (HTTP 429)" in str(info.value)
    assert info.value.retry_after == 1


async def test_a_pasted_hugging_face_url_is_resolved_as_an_hf_source(fs: RunningFileServer) -> None:
    f = fs.server.add_hf_file("org/model", "vae/ae.safetensors", 2000)

    resolved = await resolver_for(fs).resolve(f"{fs.url}/org/model/resolve/main/vae/ae.safetensors")

    assert resolved.kind == "hf" and resolved.sha256 == f.sha256 and resolved.size == 2000


# -- Civitai ---------------------------------------------------------------------------


async def test_civitai_gives_name_sha256_exact_size_and_a_storage_url_without_the_token(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_civitai_file(128713, "juggernautXL_v9.safetensors", 1_234_567)
    fs.server.civitai_tokens.add("civ_secret")
    r = resolver_for(fs, CIVITAI_TOKEN="civ_secret")

    resolved = await r.resolve("civitai://128713")
    summary = await download(
        [r.download_item(resolved, tmp_path / resolved.filename)], r.download_options(**FAST)
    )

    assert resolved.kind == "civitai"
    assert resolved.filename == "juggernautXL_v9.safetensors"
    assert resolved.sha256 == f.sha256  # the API's upper-case SHA256, lower-cased
    assert resolved.size == 1_234_567  # exact, from the storage host, not sizeKB
    assert host(resolved.url) == "127.0.0.3"
    assert "civ_secret" not in resolved.url and resolved.headers == {}
    assert summary.ok, summary.lines()
    assert (tmp_path / "juggernautXL_v9.safetensors").read_bytes() == f.data
    seen = fs.server.stats().authorization_hosts
    assert seen and {h for h, _ in seen} == {"127.0.0.5"}  # the token went to Civitai only


async def test_civitai_metadata_only_does_not_call_the_download_endpoint(
    fs: RunningFileServer,
) -> None:
    f = fs.server.add_civitai_file(31, "m.safetensors", 10_000)
    fs.server.civitai_tokens.add("civ")

    resolved = await resolver_for(fs, CIVITAI_TOKEN="civ").resolve(
        "civitai://31", metadata_only=True
    )

    assert (resolved.filename, resolved.sha256, resolved.size) == ("m.safetensors", f.sha256, None)
    assert resolved.approx_size == 10_000
    assert resolved.url.startswith(f"{fs.civitai_url}/api/download/models/31?fileId=")
    assert resolved.headers == {"Authorization": "Bearer civ"}
    assert fs.server.stats().file(f.name).requests == 0  # no download counted


async def test_civitai_without_a_token_says_missing_civitai_token(fs: RunningFileServer) -> None:
    fs.server.add_civitai_file(42, "lora.safetensors", 100)

    with pytest.raises(MissingToken) as info:
        await resolver_for(fs).resolve("civitai://42")

    assert info.value.variable == "CIVITAI_TOKEN" and info.value.status == 401
    assert str(info.value) == (
        'Missing CIVITAI_TOKEN: civitai://42: Civitai says "The creator of this asset requires '
        f'you to be logged in to download it". Create an API key at {fs.civitai_url}/user/account '
        "and export CIVITAI_TOKEN."
    )


async def test_a_public_civitai_model_needs_no_token(fs: RunningFileServer) -> None:
    fs.server.add_civitai_file(7, "free.safetensors", 100)
    fs.server.civitai_version(7).require_auth = False

    assert (await resolver_for(fs).resolve("civitai://7")).size == 100


@pytest.mark.parametrize(
    ("setup", "error", "words"),
    [
        ("bad_token", SourceAuthError, "Civitai refused CIVITAI_TOKEN (401: The creator of this"),
        ("early_access", SourceAuthError, "the model is in Early Access until 2026-12-31"),
        ("forbidden", SourceAuthError, "(403 Forbidden): this IP address or account is blocked"),
        (
            "rate_limited",
            SourceRateLimited,
            "Civitai is limiting downloads from this account (429)",
        ),
        ("archived", SourceNotFound, "Civitai archived this model (Model archived"),
        ("no_version", SourceNotFound, "Civitai has no such model version (No model version"),
        ("file_gone", SourceNotFound, "Civitai has no file to download (File not found)"),
    ],
)
async def test_civitai_refusals_are_explained(
    fs: RunningFileServer, setup: str, error: type[Exception], words: str
) -> None:
    f = fs.server.add_civitai_file(500, "m.safetensors", 100)
    version = fs.server.civitai_version(500)
    fs.server.civitai_tokens.add("civ_ok")
    token = "civ_ok"
    source = "civitai://500"
    if setup == "bad_token":
        token = "civ_revoked"
    elif setup == "early_access":
        version.early_access = True
    elif setup == "forbidden":
        fs.server.inject(f.name, Fault("status", status=403, route="civitai"))
    elif setup == "rate_limited":
        fs.server.inject(f.name, Fault("status", status=429, route="civitai"), count=10)
    elif setup == "archived":
        version.archived = True
    elif setup == "no_version":
        source = "civitai://999"
    elif setup == "file_gone":
        fs.server.inject(f.name, Fault("status", status=404, route="civitai"))

    with pytest.raises(error) as info:
        await resolver_for(fs, CIVITAI_TOKEN=token).resolve(source)

    assert words in str(info.value)


async def test_civitai_file_selection_by_type_or_file_id(fs: RunningFileServer) -> None:
    model = fs.server.add_civitai_file(9, "model.safetensors", 300)
    vae = fs.server.add_civitai_file(9, "vae.safetensors", 200, file_type="VAE")
    fs.server.civitai_tokens.add("civ")
    r = resolver_for(fs, CIVITAI_TOKEN="civ")
    vae_id = fs.server.civitai_version(9).files[1].id

    primary = await r.resolve("civitai://9")
    by_type = await r.resolve("civitai://9?type=VAE")
    by_id = await r.resolve(f"civitai://9?fileId={vae_id}")

    assert (primary.filename, primary.sha256) == ("model.safetensors", model.sha256)
    assert (by_type.filename, by_type.sha256) == ("vae.safetensors", vae.sha256)
    assert by_id.identity == by_type.identity == f"civitai:9/{vae_id}:{vae.sha256}"
    with pytest.raises(SourceNotFound, match="has no file matching type=Pruned"):
        await r.resolve("civitai://9?type=Pruned")


async def test_civitai_downloads_use_at_most_two_connections_per_host(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    fs.server.civitai_tokens.add("civ")
    civ = [
        fs.server.add_civitai_file(600 + i, f"c{i}.safetensors", 1 * MiB, rate_bps=2 * MB)
        for i in range(3)
    ]
    hf = fs.server.add_hf_file("org/model", "h.safetensors", 1 * MiB, rate_bps=2 * MB)
    r = resolver_for(fs, CIVITAI_TOKEN="civ")
    sources = [f"civitai://{600 + i}" for i in range(3)] + ["hf://org/model/h.safetensors"]
    resolved = [await r.resolve(s) for s in sources]
    options = r.download_options(**FAST)

    summary = await download([r.download_item(x, tmp_path / x.filename) for x in resolved], options)

    assert summary.ok, summary.lines()
    assert options.host_limits == {"127.0.0.3": 2, "127.0.0.5": 2}
    peaks = fs.server.stats().peak_in_flight_by_host
    assert peaks["127.0.0.3"] == 2  # three Civitai files, two connections between them
    assert peaks["127.0.0.2"] >= 3  # the Hugging Face CDN is not limited
    for f in [*civ, hf]:
        assert (tmp_path / f.name.rsplit("/", 1)[1]).read_bytes() == f.data


# -- Dropbox links ---------------------------------------------------------------------


def test_a_dropbox_shared_link_becomes_a_direct_download_that_keeps_its_rlkey() -> None:
    assert (
        dropbox_direct_url("https://www.dropbox.com/scl/fi/abc123/model.safetensors?rlkey=k9&dl=0")
        == "https://www.dropbox.com/scl/fi/abc123/model.safetensors?rlkey=k9&dl=1"
    )
    assert (
        dropbox_direct_url("https://www.dropbox.com/s/abc123/model.safetensors")
        == "https://www.dropbox.com/s/abc123/model.safetensors?dl=1"
    )
    direct = "https://dl.dropboxusercontent.com/scl/fi/abc/m.bin?rlkey=k"
    assert dropbox_direct_url(direct) == direct
    with pytest.raises(InvalidSource, match="folder link, which downloads as a zip"):
        dropbox_direct_url("https://www.dropbox.com/scl/fo/abc/Models?rlkey=k&dl=0")


async def test_a_dropbox_link_downloads_the_file_not_its_preview_page(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_dropbox_file("/Models/lora.safetensors", 900_000)
    link = fs.server.share_dropbox_path("/Models/lora.safetensors")
    assert link.endswith("&dl=0")
    r = resolver_for(fs)

    resolved = await r.resolve(link)
    summary = await download(
        [r.download_item(resolved, tmp_path / resolved.filename, size=f.size)],
        r.download_options(**FAST),
    )

    assert resolved.kind == "dropbox" and resolved.url.endswith("&dl=1")
    assert "rlkey=" in resolved.url and resolved.identity.startswith("dropbox:/scl/fi/")
    assert summary.ok, summary.lines()
    assert (tmp_path / "lora.safetensors").read_bytes() == f.data
    assert fs.server.stats().peak_in_flight_by_host.get("127.0.0.4", 0) >= 1  # content host


# -- auth, expiry, integrity ---------------------------------------------------------------


async def test_auth_headers_never_reach_a_host_they_do_not_belong_to(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    srv = fs.server
    srv.hf_tokens.add("hf_tok")
    srv.civitai_tokens.add("civ_tok")
    srv.add_hf_repo("org/gated", gated=True, authorized={"hf_tok"})
    srv.add_hf_file("org/gated", "big.safetensors", 2 * MiB)
    srv.add_hf_file("org/gated", "small.json", 500, lfs=False)
    srv.add_civitai_file(77, "c.safetensors", 1 * MiB)
    srv.add_dropbox_file("/W/d.bin", 1 * MiB)
    r = resolver_for(fs, HF_TOKEN="hf_tok", CIVITAI_TOKEN="civ_tok")
    sources = [
        "hf://org/gated/big.safetensors",
        "hf://org/gated/small.json",
        "civitai://77",
        srv.share_dropbox_path("/W/d.bin"),
    ]
    resolved = [await r.resolve(s) for s in sources]
    # A Hub URL that redirects elsewhere: the engine must drop the token on the way.
    small = resolved[1]
    hop = ResolvedSource(
        url=srv.redirect_url(resolved[0].url),
        headers={"Authorization": "Bearer hf_tok"},
        filename="hop.safetensors",
        sha256=resolved[0].sha256,
        size=resolved[0].size,
        identity="hop",
    )
    items = [
        r.download_item(x, tmp_path / f"{i}-{x.filename}") for i, x in enumerate([*resolved, hop])
    ]

    summary = await download(items, r.download_options(**FAST))

    assert summary.ok, summary.lines()
    assert small.headers == {"Authorization": "Bearer hf_tok"}
    by_host: dict[str, set[str]] = {}
    for h, value in srv.stats().authorization_hosts:
        by_host.setdefault(h, set()).add(value)
    assert by_host == {"127.0.0.1": {"Bearer hf_tok"}, "127.0.0.5": {"Bearer civ_tok"}}


@pytest.mark.parametrize("kind", ["hf", "civitai", "dropbox"])
async def test_a_signed_url_that_expires_mid_download_is_resolved_again(
    tmp_path: Path, kind: str
) -> None:
    clock = ManualClock()
    server = FileServer(signed_url_ttl_s=60, clock=clock)
    with RunningFileServer(server) as fs:
        server.civitai_tokens.add("civ")
        if kind == "hf":
            f = server.add_hf_file("org/m", "x.bin", 4 * MiB, rate_bps=4 * MiB)
            source, front = "hf://org/m/x.bin", "hf"
        elif kind == "civitai":
            f = server.add_civitai_file(5, "x.bin", 4 * MiB, rate_bps=4 * MiB)
            source, front = "civitai://5", "civitai"
        else:
            f = server.add_dropbox_file("/W/x.bin", 4 * MiB, rate_bps=4 * MiB)
            source, front = server.share_dropbox_path("/W/x.bin"), "dropbox"
        r = resolver_for(fs, CIVITAI_TOKEN="civ")
        resolved = await r.resolve(source)
        options = r.download_options(piece_size=256 * 1024, backoff_base_s=0.01)
        task = asyncio.ensure_future(
            download([r.download_item(resolved, tmp_path / "x.bin", size=f.size)], options)
        )
        await until(lambda: server.stats().file(f.name).bytes_sent >= 1 * MiB)
        clock.advance(120)  # every signature issued so far has expired
        summary = await task

    [result] = summary.succeeded
    assert (tmp_path / "x.bin").read_bytes() == f.data
    stats = server.stats().file(f.name)
    expired = 410 if kind == "dropbox" else 403  # Dropbox content links go 410 Gone
    assert stats.statuses[expired] >= 1
    assert stats.by_route[front] >= 2  # the source was asked again
    assert result.resumed_from == 0 and result.bytes_downloaded < 2 * f.size


async def test_a_manifest_sha256_the_source_contradicts_is_refused_before_downloading(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    f = fs.server.add_hf_file("org/model", "m.bin", 1000)
    r = resolver_for(fs)
    resolved = await r.resolve("hf://org/model/m.bin")
    pinned = hashlib.sha256(b"the file the manifest was written for").hexdigest()

    with pytest.raises(SourceMismatch) as info:
        r.download_item(resolved, tmp_path / "m.bin", sha256=pinned)
    with pytest.raises(SourceMismatch, match="the source's size is 1000 bytes, expected 999"):
        r.download_item(resolved, tmp_path / "m.bin", size=999)

    assert f"the source's sha256 is {f.sha256}, expected {pinned}" in str(info.value)
    item = r.download_item(resolved, tmp_path / "m.bin", sha256=f.sha256.upper())
    assert item.sha256 == f.sha256 and item.identity == resolved.identity


async def test_a_source_whose_content_changed_is_not_resumed_into_the_old_file(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    server = FileServer(signed_url_ttl_s=60, clock=clock)
    with RunningFileServer(server) as fs:
        server.add_hf_file("org/m", "x.bin", 2 * MiB, rate_bps=2 * MiB)
        r = resolver_for(fs)
        resolved = await r.resolve("hf://org/m/x.bin")
        task = asyncio.ensure_future(
            download(
                [r.download_item(resolved, tmp_path / "x.bin")],
                r.download_options(piece_size=256 * 1024, backoff_base_s=0.01),
            )
        )
        await until(lambda: server.stats().file("hf/org/m/x.bin").bytes_sent >= 256 * 1024)
        server.add_hf_file("org/m", "x.bin", 2 * MiB, seed=1)  # a new upload, same name
        clock.advance(120)
        summary = await task

    [result] = summary.failed
    assert isinstance(result.error, SourceMismatch)
    assert "the content changed while downloading" in str(result.reason)
    assert not (tmp_path / "x.bin").exists()

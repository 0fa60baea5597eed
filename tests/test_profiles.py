"""Fleet files: the example mirrors the seeds, defaults merge, and every mistake is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfyfleet.errors import ConfigError
from comfyfleet.profiles import GB, PoolPolicy, Profile, load_fleet, parse_fleet
from tests.conftest import EXAMPLE_FLEET

# --- the example fleet ------------------------------------------------------------------------


def test_example_fleet_default_profile_mirrors_the_seeds() -> None:
    fleet = load_fleet(EXAMPLE_FLEET)
    default = fleet.get("default")
    assert default.name == "default"
    assert default.min_vram_gb >= 16
    assert default.min_cuda >= 12
    assert default.disk_gb == 250  # seed 002: 120 and 150 GB ran out of space
    assert default.max_price is not None and default.max_price <= 3.0
    assert default.min_reliability >= 0.95
    assert {"CN", "VN"} <= set(default.exclude_regions)
    assert default.exclude_gpu_names  # small cards are excluded whatever their VRAM
    assert "RTX 3060" in default.exclude_gpu_names
    assert default.min_direct_ports >= 1  # seed 002 proxied ComfyUI through a direct port
    assert default.verified_only
    assert default.num_gpus == 1
    assert default.download_bytes == 50 * GB
    assert default.use_seconds == 600  # seed 001's "10-minute cost"
    assert default.pool.min_ready == 1  # the seeds' warm pool kept one instance ready


def test_example_fleet_flux_profile_overrides_some_defaults_and_keeps_the_rest() -> None:
    fleet = load_fleet(EXAMPLE_FLEET)
    flux, default = fleet.get("flux"), fleet.get("default")
    assert (flux.min_vram_gb, flux.max_price, flux.download_bytes) == (24, 2.0, 80 * GB)
    assert flux.exclude_regions == default.exclude_regions
    assert flux.disk_gb == default.disk_gb
    # pool is merged key by key: the profile's min_ready, the defaults' other keys.
    assert flux.pool.min_ready == 0
    assert flux.pool.max_instances == default.pool.max_instances == 2
    assert flux.pool.max_hourly_spend == default.pool.max_hourly_spend == 6.0
    assert fleet.source == str(EXAMPLE_FLEET)


def test_unknown_profile_is_an_error_that_names_the_known_ones() -> None:
    fleet = load_fleet(EXAMPLE_FLEET)
    with pytest.raises(ConfigError) as caught:
        fleet.get("sdxl")
    message = str(caught.value)
    assert "no profile named 'sdxl'" in message
    assert "default, flux" in message
    assert message.startswith(str(EXAMPLE_FLEET))


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_are_merged_and_a_profile_value_wins() -> None:
    fleet = parse_fleet(
        "defaults:\n"
        "  max_price: 1.5\n"
        "  min_reliability: 0.99\n"
        "  env: {A: one, B: two}\n"
        "profiles:\n"
        "  cheap: {}\n"
        "  dear:\n"
        "    max_price: 4\n"
        "    env: {B: zwei, C: drei}\n"
    )
    cheap, dear = fleet.get("cheap"), fleet.get("dear")
    assert (cheap.max_price, cheap.min_reliability) == (1.5, 0.99)
    assert (dear.max_price, dear.min_reliability) == (4.0, 0.99)
    assert cheap.env == {"A": "one", "B": "two"}
    assert dear.env == {"A": "one", "B": "zwei", "C": "drei"}


def test_a_profile_with_an_empty_body_takes_every_default() -> None:
    fleet = parse_fleet("defaults:\n  disk_gb: 300\nprofiles:\n  a:\n  b: {}\n")
    assert fleet.get("a").disk_gb == fleet.get("b").disk_gb == 300
    assert [p.name for p in fleet.profiles.values()] == ["a", "b"]


def test_an_empty_defaults_block_means_no_defaults() -> None:
    fleet = parse_fleet("defaults:\n  # max_price: 2\nprofiles:\n  a: {}\n")
    assert fleet.get("a") == Profile(name="a")


def test_defaults_do_not_change_the_profiles_of_other_files() -> None:
    parse_fleet("defaults:\n  max_price: 0.5\nprofiles:\n  a: {}\n")
    assert parse_fleet("profiles:\n  a: {}\n").get("a").max_price == 3.0


def test_profile_without_a_fleet_file_has_the_seed_defaults() -> None:
    profile = Profile()
    assert profile.min_vram_gb == 16
    assert profile.min_cuda == 12
    assert profile.disk_gb == 250
    assert profile.max_price == 3.0
    assert profile.min_reliability == 0.95
    assert profile.use_seconds == 600
    assert profile.download_bytes == 0
    assert profile.pool == PoolPolicy()


# --- friendly values --------------------------------------------------------------------------


def test_gpu_names_take_underscores_and_a_single_name() -> None:
    profile = parse_fleet(
        "profiles:\n  a:\n    gpu_names: RTX_4090\n    exclude_gpu_names: [' H100_SXM ']\n"
    ).get("a")
    assert profile.gpu_names == ["RTX 4090"]
    assert profile.exclude_gpu_names == ["H100 SXM"]


def test_regions_are_country_codes_in_capitals() -> None:
    profile = parse_fleet("profiles:\n  a:\n    regions: [us, ' de']\n").get("a")
    assert profile.regions == ["US", "DE"]
    profile = parse_fleet("profiles:\n  a:\n    exclude_regions: cn\n").get("a")
    assert profile.exclude_regions == ["CN"]


def test_env_values_are_kept_as_the_user_wrote_them() -> None:
    profile = parse_fleet(
        "profiles:\n  a:\n    env: {PORT: 8188, DEBUG: true, RATIO: 0.5, NAME: x}\n"
    ).get("a")
    assert profile.env == {"PORT": "8188", "DEBUG": "true", "RATIO": "0.5", "NAME": "x"}


def test_manifest_size_in_bytes_or_gigabytes() -> None:
    assert Profile(manifest_gb=1.5).download_bytes == 1_500_000_000
    assert Profile(manifest_bytes=123).download_bytes == 123
    assert Profile(manifest_gb=0).download_bytes == 0


# --- mistakes: one line naming the file, the field and what was expected ----------------------


def config_error(text: str, source: str = "fleet.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_fleet(text, source=source)
    error = caught.value
    assert "\n" not in str(error)
    return error


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        (
            "profiles:\n  default:\n    min_vram: 16\n",
            "profiles.default.min_vram",
            "unknown field 'min_vram'; did you mean 'min_vram_gb'? (line 3)",
        ),
        (
            "defaults:\n  max_prise: 2\nprofiles:\n  a: {}\n",
            "defaults.max_prise",
            "unknown field 'max_prise'; did you mean 'max_price'? (line 2)",
        ),
        (
            "profiles:\n  a:\n    pool:\n      min_readyy: 1\n",
            "profiles.a.pool.min_readyy",
            "unknown field 'min_readyy'; did you mean 'min_ready'? (line 4)",
        ),
        (
            "defaults:\n  pool:\n    spend: 1\nprofiles:\n  a: {}\n",
            "defaults.pool.spend",
            "unknown field 'spend'; expected one of: min_ready, max_instances, "
            "max_hourly_spend, idle_ttl_seconds (line 3)",
        ),
        (
            "profiles:\n  pool:\n    min_vram: 16\n",
            "profiles.pool.min_vram",
            "unknown field 'min_vram'; did you mean 'min_vram_gb'? (line 3)",
        ),
        (
            "profiles:\n  a: {}\ncolour: blue\n",
            "colour",
            "unknown field 'colour'; expected one of: defaults, profiles (line 3)",
        ),
        (
            "profile:\n  a: {}\n",
            "profile",
            "unknown field 'profile'; did you mean 'profiles'? (line 1)",
        ),
    ],
)
def test_unknown_keys_are_rejected_with_the_field_and_the_line(
    text: str, field: str, expected: str
) -> None:
    error = config_error(text)
    assert error.source == "fleet.yaml"
    assert error.field == field
    assert str(error) == f"fleet.yaml: {field}: {expected}"


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("max_price: cheap", "max_price", "expected a number, got 'cheap' (line 4)"),
        ("max_price: -1", "max_price", "expected a number >= 0, got -1 (line 4)"),
        ("max_price: .inf", "max_price", "expected a finite number, got inf (line 4)"),
        ("min_reliability: 1.5", "min_reliability", "expected a number <= 1, got 1.5 (line 4)"),
        ("disk_gb: 4", "disk_gb", "expected a number >= 8, got 4 (line 4)"),
        ("num_gpus: 0", "num_gpus", "expected a number >= 1, got 0 (line 4)"),
        ("min_direct_ports: 1.5", "min_direct_ports", "expected a whole number, got 1.5 (line 4)"),
        ("verified_only: maybe", "verified_only", "expected true or false, got 'maybe' (line 4)"),
        ("image: ''", "image", "expected a non-empty string, got '' (line 4)"),
        ("env: [1]", "env", "expected a mapping, got a list (line 4)"),
        (
            "regions: [USA]",
            "regions",
            "expected 2-letter country codes (e.g. US, DE), got 'USA' (line 4)",
        ),
        (
            "manifest_gb: 2000000.0",
            "manifest_gb",
            "expected a number <= 1000000, got 2000000 (line 4)",
        ),
    ],
)
def test_bad_values_say_what_was_expected(text: str, field: str, expected: str) -> None:
    error = config_error(f"# a fleet\nprofiles:\n  sdxl:\n    {text}\n")
    assert str(error) == f"fleet.yaml: profiles.sdxl.{field}: {expected}"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (
            "profiles:\n  a:\n    manifest_gb: 1\n    manifest_bytes: 5\n",
            "profiles.a",
            "expected manifest_gb or manifest_bytes, not both",
        ),
        (
            "profiles:\n  a:\n    gpu_names: [RTX 4090]\n    exclude_gpu_names: [rtx_4090]\n",
            "profiles.a",
            "expected a GPU in gpu_names or exclude_gpu_names, not both",
        ),
        (
            "profiles:\n  a:\n    regions: [US]\n    exclude_regions: [us]\n",
            "profiles.a",
            "expected a region in regions or exclude_regions, not both",
        ),
        (
            "profiles:\n  a:\n    pool:\n      min_ready: 3\n      max_instances: 1\n",
            "profiles.a.pool",
            "expected min_ready (3) <= max_instances (1)",
        ),
        (
            "profiles:\n  a:\n    name: b\n",
            "profiles.a.name",
            "a profile's name is its key; expected 'a' or no name",
        ),
        (
            "defaults:\n  name: x\nprofiles:\n  a: {}\n",
            "defaults.name",
            "a profile's name is its key; expected no name in defaults",
        ),
        (
            "defaults:\n  disk_gb: 2\nprofiles:\n  a: {}\n",
            "defaults.disk_gb",
            "expected a number >= 8, got 2",
        ),
        ("profiles: {}\n", "profiles", "expected at least 1 entry, got none"),
        ("defaults: {}\n", "profiles", "expected a value: the field is required"),
        ("profiles:\n  a: [1]\n", "profiles.a", "expected a mapping, got a list"),
    ],
)
def test_inconsistent_profiles_are_rejected_with_the_reason(
    text: str, field: str, reason: str
) -> None:
    error = config_error(text)
    assert error.field == field
    assert reason in error.reason
    assert "(line " in error.reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "fleet.yaml: the file is empty; expected a 'profiles:' mapping"),
        (
            "- a\n- b\n",
            "fleet.yaml: expected a mapping with a 'profiles:' key at the top, got a list",
        ),
        ("profiles: [\n", "fleet.yaml: invalid YAML at line 2, column 1:"),
    ],
)
def test_a_file_that_is_not_a_fleet_says_so(text: str, message: str) -> None:
    error = config_error(text)
    assert str(error).startswith(message)
    assert error.field is None


def test_load_fleet_names_the_file_it_could_not_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as caught:
        load_fleet(tmp_path / "missing.yaml")
    assert caught.value.source == str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a file, found a directory"):
        load_fleet(tmp_path)


def test_load_fleet_reports_the_file_path_and_line_of_a_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "defaults:\n  max_price: 2\n\nprofiles:\n  default: {}\n  flux:\n    min_vram_gb: lots\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_fleet(path)
    assert str(caught.value) == (
        f"{path}: profiles.flux.min_vram_gb: expected a number, got 'lots' (line 7)"
    )

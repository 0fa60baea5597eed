"""Profiles: what an instance must be, what it will run, and what it is expected to cost.

A fleet file (``fleet.yaml``) names one or more profiles. A profile holds

* the **offer requirements** that ``comfyfleet.offers`` turns into a Vast search
  and checks offer by offer (GPU names, VRAM, CUDA, disk, price, reliability,
  internet speed, direct ports, verified hosts, regions, GPU count);
* the **cost assumptions** of the ranking: how many bytes of models must be
  downloaded (``manifest_gb`` or ``manifest_bytes``, a number until the manifest
  exists), how long the image takes to boot and how long the instance is used;
* **what to run**: the image, its environment, ``onstart`` and ``runtype``;
* the **pool policy** (read by the pool in later issues).

A top-level ``defaults:`` block is merged into every profile (mappings such as
``env`` and ``pool`` are merged key by key; a profile's own value wins). Every
model forbids unknown fields, so a typo is an error, not a silently ignored
setting. ``load_fleet`` turns every problem into one ``ConfigError`` line that
names the file, the dotted field and what was expected, with the YAML line::

    fleet.yaml: profiles.sdxl.max_price: expected a number >= 0, got -1 (line 7)

Units follow Vast's conventions so that the search and the local check agree:
VRAM in GB means ``gpu_ram`` (MB) >= GB x 1000, as the official CLI converts it;
internet speeds in Mb/s; prices in $/h of ``dph_total`` (storage at ``disk_gb``
included); GB of downloads are 10^9 bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from comfyfleet.errors import ConfigError
from comfyfleet.yamlconfig import YamlErrors, kind

__all__ = [
    "DEFAULT_BOOT_SECONDS",
    "DEFAULT_IMAGE",
    "DEFAULT_RUNTYPE",
    "DEFAULT_USE_SECONDS",
    "GB",
    "Fleet",
    "PoolPolicy",
    "Profile",
    "load_fleet",
    "parse_fleet",
]

GB: Final = 1_000_000_000
# The Vast ComfyUI template's image; the tag is resolved server-side for the host's CUDA.
DEFAULT_IMAGE: Final = "vastai/comfyui:@vastai-automatic-tag"
# What the official CLI sends for `--ssh --direct` (the `direc` spelling is Vast's).
DEFAULT_RUNTYPE: Final = "ssh_direc ssh_proxy"
# Create -> running container for the ~8 GB (compressed) ComfyUI image: scheduling,
# pull, extraction (~18 GB) and start take a few minutes on a typical host.
DEFAULT_BOOT_SECONDS: Final = 300.0
# Seed 001 ranks offers by "total 10-minute cost (compute + download)".
DEFAULT_USE_SECONDS: Final = 600.0
# Seed 002: 120 GB and 150 GB disks ran out of space extracting the image; 250 GB worked.
DEFAULT_DISK_GB: Final = 250.0
# Vast's create endpoint refuses less (spec: minimum 8 GB).
MIN_DISK_GB: Final = 8.0
# A petabyte of models: far beyond any manifest, and small enough that the cost
# model's arithmetic (bytes x 8 as a float) cannot overflow.
MAX_MANIFEST_GB: Final = 1_000_000

_COUNTRY: Final = re.compile(r"^[A-Z]{2}$")
# A profile's name is its key in the file, never a field to suggest.
_YAML: Final = YamlErrors(ConfigError, width=40, hidden=("name",))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolPolicy(_Strict):
    """How many instances of a profile the pool keeps (``comfyfleet.pool.planner``).

    The pool keeps ``min_ready`` instances ready or on their way, more while jobs wait
    in the profile's queue (one per waiting job the busy instances cannot take), never
    more than ``max_instances`` nor ``max_hourly_spend``; an idle instance above
    ``min_ready`` goes after ``idle_ttl_seconds``, never while jobs wait. OnStart
    instances count towards the caps only.
    """

    min_ready: int = Field(default=0, ge=0, description="Instances kept ready at all times.")
    max_instances: int = Field(
        default=1, ge=0, description="Never more instances than this, for queued jobs too."
    )
    max_hourly_spend: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Cap on the sum of $/h; None: none."
    )
    idle_ttl_seconds: float = Field(
        default=900.0, ge=0, allow_inf_nan=False, description="Destroy an idle extra after this."
    )

    @model_validator(mode="after")
    def _min_within_max(self) -> PoolPolicy:
        if self.min_ready > self.max_instances:
            raise ValueError(
                f"expected min_ready ({self.min_ready}) <= max_instances ({self.max_instances})"
            )
        return self


def _as_list(value: Any) -> Any:
    """A single string where a list is expected is a one-item list."""
    return [value] if isinstance(value, str) else value


class Profile(_Strict):
    """One named kind of instance: requirements, cost assumptions, what to run, pool policy.

    ``name`` is the profile's key in the fleet file (set by ``Fleet``).
    """

    name: str = "default"

    # ---- offer requirements
    gpu_names: list[str] = Field(
        default_factory=list, description="Only these GPU models (Vast names, e.g. 'RTX 4090')."
    )
    exclude_gpu_names: list[str] = Field(default_factory=list, description="Never these GPUs.")
    min_vram_gb: float = Field(default=16.0, ge=0, allow_inf_nan=False, description="Per GPU.")
    min_cuda: float = Field(
        default=12.0, ge=0, allow_inf_nan=False, description="Minimum cuda_max_good."
    )
    disk_gb: float = Field(
        default=DEFAULT_DISK_GB,
        ge=MIN_DISK_GB,
        allow_inf_nan=False,
        description="Disk to rent: the search's allocated_storage and the create call's disk.",
    )
    max_price: float | None = Field(
        default=3.0, ge=0, allow_inf_nan=False, description="Cap on dph_total, $/h; None: none."
    )
    min_reliability: float = Field(default=0.95, ge=0, le=1, allow_inf_nan=False)
    min_inet_down_mbps: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    min_inet_up_mbps: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    min_direct_ports: int = Field(default=0, ge=0)
    verified_only: bool = True
    regions: list[str] = Field(
        default_factory=list, description="Only hosts in these countries (2-letter codes)."
    )
    exclude_regions: list[str] = Field(default_factory=list)
    num_gpus: int = Field(default=1, ge=1, description="GPUs per instance (exactly).")

    # ---- cost assumptions
    manifest_gb: float | None = Field(default=None, ge=0, le=MAX_MANIFEST_GB, allow_inf_nan=False)
    manifest_bytes: int | None = Field(default=None, ge=0, le=MAX_MANIFEST_GB * GB)
    boot_seconds: float = Field(default=DEFAULT_BOOT_SECONDS, ge=0, allow_inf_nan=False)
    use_seconds: float = Field(default=DEFAULT_USE_SECONDS, ge=0, allow_inf_nan=False)

    # ---- what to run
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=1024)
    env: dict[str, str] = Field(default_factory=dict)
    onstart: str | None = None
    runtype: str = Field(default=DEFAULT_RUNTYPE, min_length=1)

    # ---- where it runs, and what its agent provisions
    provider: Literal["vast", "local"] = Field(
        default="vast",
        description="vast: rent from the marketplace; local: run the agent on this machine.",
    )
    manifest: str | None = Field(
        default=None,
        min_length=1,
        description="The workspace manifest its agents provision (relative to the fleet file).",
    )
    comfy_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Attach to a ComfyUI already running at this URL instead of starting one.",
    )
    comfy_command: str | list[str] | None = Field(
        default=None,
        min_length=1,
        description="Start ComfyUI with this command (a string is split as a shell would) "
        "instead of the manifest's main.py.",
    )
    require_direct_ports: bool = Field(
        default=False,
        description="Fail an instance whose ports are not mapped by its boot deadline.",
    )

    pool: PoolPolicy = Field(default_factory=PoolPolicy)

    @field_validator("gpu_names", "exclude_gpu_names", mode="before")
    @classmethod
    def _gpu_names(cls, value: Any) -> Any:
        value = _as_list(value)
        if isinstance(value, list):
            # Vast's API spells GPU names with spaces; its CLI accepts underscores for them.
            return [v.replace("_", " ").strip() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("regions", "exclude_regions", mode="before")
    @classmethod
    def _regions(cls, value: Any) -> Any:
        value = _as_list(value)
        if isinstance(value, list):
            out = []
            for v in value:
                if isinstance(v, str):
                    code = v.strip().upper()
                    if not _COUNTRY.match(code):
                        raise ValueError(
                            f"expected 2-letter country codes (e.g. US, DE), got {v!r}"
                        )
                    v = code
                out.append(v)
            return out
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_values_as_text(cls, value: Any) -> Any:
        # YAML reads `PORT: 8188` as a number and `DEBUG: true` as a bool; the
        # environment is text, so write them back as the user typed them.
        if not isinstance(value, Mapping):
            return value
        out = {}
        for key, item in value.items():
            if isinstance(item, bool):
                item = "true" if item else "false"
            elif isinstance(item, int | float):
                item = str(item)
            out[key] = item
        return out

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.manifest_gb is not None and self.manifest_bytes is not None:
            raise ValueError("expected manifest_gb or manifest_bytes, not both")
        both = {n.casefold() for n in self.gpu_names} & {
            n.casefold() for n in self.exclude_gpu_names
        }
        if both:
            raise ValueError(
                f"expected a GPU in gpu_names or exclude_gpu_names, not both: {sorted(both)}"
            )
        both = set(self.regions) & set(self.exclude_regions)
        if both:
            raise ValueError(
                f"expected a region in regions or exclude_regions, not both: {sorted(both)}"
            )
        return self

    @property
    def download_bytes(self) -> int:
        """Bytes of models to download on a new instance (0 when the profile says none)."""
        if self.manifest_bytes is not None:
            return self.manifest_bytes
        if self.manifest_gb is not None:
            return round(self.manifest_gb * GB)
        return 0


class Fleet(_Strict):
    """A fleet file: named profiles, and the defaults merged into each of them."""

    defaults: dict[str, Any] = Field(default_factory=dict)
    profiles: dict[str, Profile] = Field(min_length=1)

    _source: str | None = PrivateAttr(default=None)

    @field_validator("defaults", mode="before")
    @classmethod
    def _empty_defaults(cls, value: Any) -> Any:
        # `defaults:` with every line commented out is YAML null: no defaults.
        return {} if value is None else value

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        defaults = data.get("defaults") or {}
        profiles = data.get("profiles")
        if not isinstance(defaults, Mapping) or not isinstance(profiles, Mapping):
            return data  # the field validation says what is wrong
        merged: dict[Any, Any] = {}
        for name, own in profiles.items():
            own = {} if own is None else own
            if isinstance(own, Mapping):
                # The key is the name: a profile cannot be called two things.
                own = {**_deep_merge(defaults, own), "name": str(name)}
            merged[name] = own
        return {**data, "profiles": merged}

    @property
    def source(self) -> str | None:
        """The file this fleet was loaded from, if any."""
        return self._source

    def manifest_path(self, profile: Profile) -> Path | None:
        """``profile.manifest`` as a path; relative to the fleet file's folder."""
        if profile.manifest is None:
            return None
        path = Path(profile.manifest).expanduser()
        if not path.is_absolute() and self._source is not None:
            path = Path(self._source).parent / path
        return path

    def get(self, name: str) -> Profile:
        """The profile called ``name``; a ``ConfigError`` naming the known ones otherwise."""
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise ConfigError(
                f"no profile named '{name}'; the known profiles are: {known}", source=self._source
            ) from None


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- loading


def load_fleet(path: Path) -> Fleet:
    """Read and validate a fleet file; every problem is one ``ConfigError`` line.

    The error's ``source`` is the file, its ``field`` the dotted path of the bad
    field (``profiles.sdxl.max_price``), and its message says what was expected.
    """
    return parse_fleet(_YAML.read(path), source=str(path))


def parse_fleet(text: str, *, source: str = "fleet.yaml") -> Fleet:
    """Validate a fleet file's text (``load_fleet`` without the file)."""
    data = _YAML.load(text, source)
    if data is None:
        raise ConfigError("the file is empty; expected a 'profiles:' mapping", source=source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping with a 'profiles:' key at the top, got {kind(data)}",
            source=source,
        )
    _check_names_and_defaults(data, text, source)
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as error:
        _YAML.invalid(error, Fleet, text, source)
    fleet._source = source
    return fleet


def _check_names_and_defaults(data: dict[str, Any], text: str, source: str) -> None:
    """What the merged validation cannot say precisely: bad defaults, a ``name:`` field."""
    defaults = data.get("defaults")
    if isinstance(defaults, Mapping):
        if "name" in defaults:
            raise _YAML.error(
                "a profile's name is its key; expected no name in defaults",
                ["defaults", "name"],
                text,
                source,
            )
        try:
            Profile.model_validate(defaults)
        except ValidationError as error:
            _YAML.invalid(error, Profile, text, source, prefix=["defaults"])
    profiles = data.get("profiles")
    if isinstance(profiles, Mapping):
        for key, own in profiles.items():
            if isinstance(own, Mapping) and "name" in own and own["name"] != key:
                raise _YAML.error(
                    f"a profile's name is its key; expected '{key}' or no name",
                    ["profiles", key, "name"],
                    text,
                    source,
                )

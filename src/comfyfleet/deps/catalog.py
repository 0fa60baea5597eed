"""The dependency catalog: every model and custom node a server type may need, and each
server type's dependency profile (what it keeps for good, how it caches the rest).

A catalog file (``examples/deps.yaml``) has ``entries`` (an ``id``, a ``kind``, a
``source`` in the manifest's grammar, a ``destination`` under ComfyUI's ``models/`` or
``custom_nodes/``, a ``size``, an optional ``sha256`` and the name of the ``token`` the
source needs) and ``profiles``, keyed by server type (the seed's ``SERVER_TYPE``, a
profile name of the fleet file): ``static.core`` and ``static.warm`` ids, which are never
evicted and are queued at registration with ``prefetch_on_boot``, and the ``dynamic``
policy of the bounded cache that holds everything else a job asks for.

These models are the one definition of a catalog: the store, the API, the agent's loop
and ``comfyfleet deps`` validate with them. ``parse_catalog`` turns every problem into
one ``ConfigError`` line with the dotted field and the YAML line (here cut in two)::

    deps.yaml: profiles.sdxl.static.core[1]: no catalog entry has the id 'sdxl-vea';
    did you mean 'sdxl-vae'? (line 31)

Pure: no store, no HTTP, no disk but reading the file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Final, Literal, NoReturn
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from comfyfleet.agent import cache
from comfyfleet.errors import ConfigError

# The manifest's value checks, reused so a source or a path means the same in both files.
from comfyfleet.manifest import (
    COMMIT_RE,
    CustomNode,
    Model,
    Sha256,
    Source,
    StrictModel,
    file_name,
    relative_path,
    source_filename,
)
from comfyfleet.sizes import GB, KB, MB, TB, GiB, KiB, MiB, TiB, parse_size
from comfyfleet.yamlconfig import EXPECTED, YamlErrors, dotted, kind, line_of

__all__ = [
    "KINDS",
    "TOKEN_NAMES",
    "CatalogEntry",
    "CatalogMerge",
    "DependencyCatalog",
    "DependencyKind",
    "DependencyProfile",
    "DynamicPolicy",
    "StaticDependencies",
    "load_catalog",
    "parse_catalog",
]

DependencyKind = Literal["model", "custom_node"]
KINDS: Final[tuple[DependencyKind, ...]] = ("model", "custom_node")

#: The secrets a source may need, by the name the agent finds them under.
TOKEN_NAMES: Final = ("HF_TOKEN", "CIVITAI_TOKEN")
# The token a source of each scheme is sent (https:// URLs may take either).
_SCHEME_TOKEN: Final = {"hf": "HF_TOKEN", "civitai": "CIVITAI_TOKEN"}

# An id goes into URLs and queue keys (the seed's dependencyQueues/{instance}/items/{depId}).
_ID: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# What a secret's name looks like (capitals, words joined by '_'); anything else written
# in token: is taken for a pasted value (hf_..., Civitai's 32 hex digits) and never shown.
_VARIABLE: Final = re.compile(r"^[A-Z][A-Z0-9]{0,15}(?:_[A-Z0-9]{1,16}){0,4}$")
# A conflict between entries or profiles, carried out of validation with its path.
_CONFLICT: Final = "catalog_conflict"
# A refusal lists this many known ids.
_IDS_SHOWN: Final = 12

# Its only Literal pydantic reports is ``version: 1`` (kind and token say their own).
_YAML: Final = YamlErrors(ConfigError, width=60, expected={**EXPECTED, "literal_error": "1"})
_show: Final = _YAML.show


# ---------------------------------------------------------------- value checks


def _size(value: Any) -> Any:
    if isinstance(value, str | int | float):
        return parse_size(value)
    return value  # the field's own type check says what is wrong


def _optional_cap(value: Any) -> Any:
    # As DM_DYNAMIC_MAX_BYTES: 0, none or unlimited mean no cap (0 did in the seed).
    if isinstance(value, str) and value.strip().lower() in ("none", "unlimited"):
        return None
    if value is None:
        return None
    size = _size(value)
    return None if size == 0 else size


#: Bytes, written as a number or as ``10GB`` / ``1.5GiB`` (``comfyfleet.sizes``).
Size = Annotated[int, BeforeValidator(_size), Field(ge=0)]


# ---------------------------------------------------------------- the models


class CatalogEntry(StrictModel):
    """A dependency: a model file under ``models/`` or a custom node under ``custom_nodes/``.

    ``size`` is what placement counts and the cache reserves before the download (it may
    be approximate, ``6.9GB``); ``sha256`` is what pins the content. A model's
    ``destination`` is its file under ``models/`` (``checkpoints/sdxl.safetensors``); a
    folder (``checkpoints/``) takes an hf:// source's own file name. A custom node's is its
    folder under ``custom_nodes/``, its ``source`` the git repository and ``commit`` the
    full commit id checked out, as in the manifest.
    """

    id: str = Field(description="A short slug, unique in the catalog (sdxl-base).")
    kind: DependencyKind = Field(description="model or custom_node.")
    source: Source = Field(description="hf://, civitai://, https:// (Dropbox links too)...")
    destination: str = Field(
        description="A model's file under models/ (checkpoints/x.safetensors), or a custom "
        "node's folder under custom_nodes/."
    )
    size: Size = Field(description="Bytes (6.9GB accepted); what placement and the cache count.")
    sha256: Sha256 | None = Field(default=None, description="Expected sha256 (64 hex digits).")
    token: Literal["HF_TOKEN", "CIVITAI_TOKEN"] | None = Field(
        default=None, description="The name of the secret the source needs, never its value."
    )
    commit: str | None = Field(
        default=None, description="A custom node's full commit id (40 hex digits)."
    )

    @model_validator(mode="before")
    @classmethod
    def _custom_node_size(cls, data: Any) -> Any:
        # A custom node's checkout is small and only git knows its size: 0 unless given.
        if isinstance(data, Mapping) and data.get("kind") == "custom_node" and "size" not in data:
            return {**data, "size": 0}
        return data

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> Any:
        if isinstance(value, str) and not _ID.match(value):
            raise ValueError(
                "expected a short id: lowercase letters, digits, '-', '_' or '.', starting with "
                f"a letter or a digit, at most 64 characters, got {_show(value)}"
            )
        return value

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        if value not in KINDS:
            raise ValueError(f"expected model or custom_node, got {_show(value)}")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str, info: ValidationInfo) -> str:
        scheme = urlsplit(value).scheme.lower()
        if info.data.get("kind") == "custom_node" and scheme not in ("https", "http"):
            raise ValueError(
                "expected a custom node's git repository (https://github.com/OWNER/REPO), "
                f"got {_show(value)}"
            )
        return value

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "custom_node":
            return file_name(value.strip().rstrip("/"), "a folder under custom_nodes/")
        path = relative_path(value, under="models/", what="a file")
        if path == ".":
            raise ValueError("expected a file under models/ such as checkpoints/model.safetensors")
        parts = PurePosixPath(path).parts
        if parts[0] == "models":
            raise ValueError(
                f"destination is under models/: write {_show(path[len('models/') :] or '?')}, "
                f"not {_show(value)}"
            )
        if len(parts) > 1 and not value.strip().endswith("/"):
            return path
        if len(parts) == 1 and "." in path:
            raise ValueError(
                f"expected a file in a folder of models/, such as checkpoints/{path}, "
                f"got {_show(value)}"
            )
        # A folder: the file keeps the name the source gives, when it says one.
        source = info.data.get("source")
        name = source_filename(source) if isinstance(source, str) else None
        if name is None:
            scheme = urlsplit(source).scheme if isinstance(source, str) else "this"
            raise ValueError(
                f"expected a file under models/ such as {path}/model.safetensors (a {scheme}:// "
                f"source does not say its file name), got {_show(value)}"
            )
        return f"{path}/{file_name(name)}"

    @field_validator("sha256")
    @classmethod
    def _no_sha_for_nodes(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kind") == "custom_node":
            raise ValueError("a custom node is pinned by its commit: expected no sha256")
        return value

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value in TOKEN_NAMES:
            if value is not None and info.data.get("kind") == "custom_node":
                raise ValueError(f"a custom node's git repository takes no token, got {value}")
            source = info.data.get("source")
            scheme = urlsplit(source).scheme.lower() if isinstance(source, str) else ""
            wanted = _SCHEME_TOKEN.get(scheme)
            if value is not None and wanted is not None and value != wanted:
                raise ValueError(f"{scheme}:// sources take {wanted}, not {value}")
            return value
        if not isinstance(value, str):
            raise ValueError(
                f"expected the name of a secret, HF_TOKEN or CIVITAI_TOKEN, got {kind(value)}"
            )
        name = value.strip()
        if name.upper() in TOKEN_NAMES:
            raise ValueError(f"expected {name.upper()}, in capitals as the variable is named")
        if _VARIABLE.match(name):
            raise ValueError(
                f"expected the name of a secret, HF_TOKEN or CIVITAI_TOKEN, got {_show(value)}"
            )
        # Never echo it: it is a secret, and now in a file.
        raise ValueError(
            "this looks like a token's value, not its name: write token: HF_TOKEN or "
            "token: CIVITAI_TOKEN (the name), set the value in the control plane's "
            "environment, and revoke the pasted token, which is now in this file"
        )

    @field_validator("commit")
    @classmethod
    def _commit(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.data.get("kind") == "model":
            raise ValueError("only a custom node has a commit; a model is pinned by its sha256")
        if not COMMIT_RE.match(value.strip()):
            raise ValueError(
                "expected a full commit id (40 hexadecimal characters; a branch, tag or "
                f"short id can move), got {_show(value)}"
            )
        return value.strip().lower()

    @model_validator(mode="after")
    def _consistent(self) -> CatalogEntry:
        if self.kind == "custom_node" and self.commit is None:
            raise ValueError(
                "a custom node is pinned: expected commit: the full commit id to check out "
                "(40 hex digits)"
            )
        return self

    @property
    def filename(self) -> str:
        """The model's file name (a custom node's folder name)."""
        return PurePosixPath(self.destination).name

    @property
    def folder(self) -> str | None:
        """The model's folder under ``models/`` (``loras``); ``None`` for a custom node."""
        return PurePosixPath(self.destination).parts[0] if self.kind == "model" else None

    @property
    def in_folder(self) -> str:
        """The model's path inside its folder, as a workflow names it (``sub/x.safetensors``)."""
        parts = PurePosixPath(self.destination).parts
        return "/".join(parts[1:]) if self.kind == "model" else self.destination

    @property
    def comfy_path(self) -> str:
        """Where it lives, relative to ComfyUI's folder (``models/loras/x.safetensors``)."""
        root = "models" if self.kind == "model" else "custom_nodes"
        return f"{root}/{self.destination}"

    def as_manifest_model(self) -> Model:
        """The manifest's model for this entry, for the provisioning engine.

        The size is left out: the catalog's may be approximate, and the manifest's is
        checked byte for byte; the sha256 pins the content.
        """
        if self.kind != "model":
            raise ValueError(f"{self.id} is a custom node, not a model")
        dest = str(PurePosixPath(self.destination).parent)
        return Model(source=self.source, dest=dest, name=self.filename, sha256=self.sha256)

    def as_custom_node(self) -> CustomNode:
        """The manifest's custom node for this entry, for the provisioning engine."""
        if self.kind != "custom_node" or self.commit is None:
            raise ValueError(f"{self.id} is a model, not a custom node")
        return CustomNode(git=self.source, commit=self.commit, name=self.destination)


class DynamicPolicy(StrictModel):
    """How a server type's dynamic dependencies share the disk (``comfyfleet.agent.cache``).

    ``max_dynamic_bytes`` null (or 0, ``none``, ``unlimited``, as in the seed) means no cap:
    only ``min_free_bytes`` bounds the cache. With ``enabled`` false nothing is evicted: a
    download that does not fit is refused. The agent's ``DM_DYNAMIC_*`` variables override it.
    """

    enabled: bool = Field(default=False, description="Evict least recently used entries.")
    min_free_bytes: Size = Field(default=0, description="Free disk kept (10GB accepted).")
    max_dynamic_bytes: Annotated[int | None, BeforeValidator(_optional_cap)] = Field(
        default=None, ge=0, description="Cap on the dynamic cache's bytes; null: no cap."
    )
    eviction_batch_max: int = Field(
        default=cache.DEFAULT_EVICTION_BATCH_MAX, ge=1, description="Files evicted at once."
    )
    pin_ttl_seconds: float = Field(
        default=cache.DEFAULT_PIN_TTL_SECONDS,
        gt=0,
        allow_inf_nan=False,
        description="How long a job's pin holds when nobody removes it.",
    )

    def as_cache_policy(self) -> cache.DynamicPolicy:
        """The agent cache's own (standard library) form of this policy."""
        return cache.DynamicPolicy(
            enabled=self.enabled,
            min_free_bytes=self.min_free_bytes,
            max_dynamic_bytes=self.max_dynamic_bytes,
            eviction_batch_max=self.eviction_batch_max,
            pin_ttl_seconds=self.pin_ttl_seconds,
        )


class StaticDependencies(StrictModel):
    """Dependencies a server type keeps for good: never evicted."""

    core: list[str] = Field(
        default_factory=list, description="What the server type cannot work without."
    )
    warm: list[str] = Field(default_factory=list, description="What it keeps ready besides.")


class DependencyProfile(StrictModel):
    """A server type's dependencies: its statics, whether to fetch them at boot, its cache."""

    static: StaticDependencies = Field(default_factory=StaticDependencies)
    prefetch_on_boot: bool = Field(
        default=True, description="Queue the static dependencies when the agent registers."
    )
    dynamic: DynamicPolicy = Field(default_factory=DynamicPolicy)

    @property
    def static_ids(self) -> tuple[str, ...]:
        """Every static id, core first."""
        return (*self.static.core, *self.static.warm)


class DependencyCatalog(StrictModel):
    """Catalog entries, and the dependency profile of each server type (by its name).

    A profile may only name ids of the catalog, an id is given once, and two entries never
    share a destination. Validation checks it; ``parse_catalog`` says where, with the line.
    """

    version: Literal[1] = 1
    entries: list[CatalogEntry] = Field(default_factory=list)
    profiles: dict[str, DependencyProfile] = Field(default_factory=dict)

    _source: str | None = PrivateAttr(default=None)
    _text: str = PrivateAttr(default="")

    @field_validator("entries", "profiles", mode="before")
    @classmethod
    def _empty(cls, value: Any, info: ValidationInfo) -> Any:
        # A key with every line under it commented out is YAML null: none.
        if value is None:
            return [] if info.field_name == "entries" else {}
        if info.field_name == "profiles" and isinstance(value, Mapping):
            return {name: {} if own is None else own for name, own in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> DependencyCatalog:
        context = info.context if isinstance(info.context, Mapping) else {}
        problem = _first_conflict(self, context.get("known_ids", ()))
        if problem is not None:
            path, reason, other = problem
            raise PydanticCustomError(
                _CONFLICT,
                "{where}: {reason}",
                {
                    "path": path,
                    "reason": reason.format(other=dotted(other)),
                    "where": dotted(path),
                    "template": reason,
                    "other": other,
                },
            )
        return self

    def __eq__(self, other: object) -> bool:
        # A catalog is its entries and profiles; the file it was read from is not part of it.
        if not isinstance(other, DependencyCatalog):
            return NotImplemented
        return (self.version, self.entries, self.profiles) == (
            other.version,
            other.entries,
            other.profiles,
        )

    __hash__ = None  # type: ignore[assignment]  # lists inside: never hashable

    @property
    def source(self) -> str | None:
        """The file this catalog was read from, if any."""
        return self._source

    @cached_property
    def by_id(self) -> Mapping[str, CatalogEntry]:
        """The entries by id."""
        return {entry.id: entry for entry in self.entries}

    @property
    def ids(self) -> tuple[str, ...]:
        """Every entry's id, in the catalog's order."""
        return tuple(entry.id for entry in self.entries)

    def entry(self, dep_id: str) -> CatalogEntry:
        """The entry ``dep_id``; a ``ConfigError`` with the closest ids otherwise."""
        try:
            return self.by_id[dep_id]
        except KeyError:
            raise ConfigError(_unknown_id(dep_id, self.ids), source=self._source) from None

    def profile(self, server_type: str) -> DependencyProfile:
        """The dependency profile of ``server_type``; a ``ConfigError`` naming the known ones."""
        try:
            return self.profiles[server_type]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(
                f"no dependency profile for server type {server_type!r}; the catalog has: {known}",
                source=self._source,
            ) from None

    def to_yaml(self) -> str:
        """The catalog as a YAML file that ``parse_catalog`` reads back equal."""
        entries = []
        for entry in self.entries:
            data = entry.model_dump(mode="json", exclude_none=True)
            if entry.kind == "custom_node" and entry.size == 0:
                del data["size"]
            else:
                data["size"] = _size_text(entry.size)
            entries.append(data)
        profiles = {}
        for name, profile in self.profiles.items():
            data = profile.model_dump(mode="json", exclude_none=True)
            dynamic = data["dynamic"]
            for key in ("min_free_bytes", "max_dynamic_bytes"):
                if key in dynamic:
                    dynamic[key] = _size_text(dynamic[key])
            if float(dynamic["pin_ttl_seconds"]).is_integer():
                dynamic["pin_ttl_seconds"] = int(dynamic["pin_ttl_seconds"])
            profiles[name] = data
        document = {"version": self.version, "entries": entries, "profiles": profiles}
        return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)

    def merge(self, imported: DependencyCatalog) -> CatalogMerge:
        """This catalog with ``imported`` laid over it, and what changed.

        An imported entry replaces the one with its id, in place, or is added at the end;
        an imported profile replaces the one of its server type whole. Nothing is removed.
        An imported entry whose destination is another entry's is a ``ConfigError`` on the
        imported file's line. Parse an import with ``known_ids=catalog.ids`` so that its
        profiles may name the ids already here.
        """
        incoming = imported.by_id
        entries = [incoming.get(entry.id, entry) for entry in self.entries]
        entries += [entry for entry in imported.entries if entry.id not in self.by_id]
        owners: dict[str, list[str]] = {}
        for entry in entries:
            owners.setdefault(_destination_key(entry), []).append(entry.id)
        for i, entry in enumerate(imported.entries):
            others = [owner for owner in owners[_destination_key(entry)] if owner != entry.id]
            if others:
                raise _YAML.error(
                    f"same destination as entry {others[0]!r}, already in the catalog: "
                    f"{entry.comfy_path}; give one of them another destination",
                    ["entries", i, "destination"],
                    imported._text,
                    imported._source or "import",
                )
        profiles = {**self.profiles, **imported.profiles}
        try:
            merged = DependencyCatalog(version=1, entries=entries, profiles=profiles)
        except ValidationError as error:
            _raise(error, "", imported._source or "import")
        merged._source = self._source
        return CatalogMerge(
            catalog=merged,
            added=tuple(e.id for e in imported.entries if e.id not in self.by_id),
            changed=tuple(
                e.id for e in imported.entries if e.id in self.by_id and self.by_id[e.id] != e
            ),
            unchanged=tuple(
                e.id for e in imported.entries if e.id in self.by_id and self.by_id[e.id] == e
            ),
            profiles_added=tuple(p for p in imported.profiles if p not in self.profiles),
            profiles_changed=tuple(
                p
                for p, own in imported.profiles.items()
                if p in self.profiles and self.profiles[p] != own
            ),
            profiles_unchanged=tuple(
                p
                for p, own in imported.profiles.items()
                if p in self.profiles and self.profiles[p] == own
            ),
        )


@dataclass(frozen=True)
class CatalogMerge:
    """An import laid over a catalog: the result, and the ids and server types it touched."""

    catalog: DependencyCatalog
    added: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    profiles_added: tuple[str, ...] = ()
    profiles_changed: tuple[str, ...] = ()
    profiles_unchanged: tuple[str, ...] = ()


class _Dumper(yaml.SafeDumper):
    """Block style, but a list of ids on one line: ``core: [sdxl-base, sdxl-vae]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(item, str | int | float) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


# ---------------------------------------------------------------- checks across entries


def _destination_key(entry: CatalogEntry) -> str:
    return entry.comfy_path


def _first_conflict(
    catalog: DependencyCatalog, known_ids: Iterable[str]
) -> tuple[list[str | int], str, list[str | int]] | None:
    """The first thing one entry or profile alone cannot tell: duplicates, unknown ids.

    Its path, its reason, and the path of the entry it clashes with, written ``{other}``
    in the reason (the file's line is added where there is a file).
    """
    ids: dict[str, int] = {}
    destinations: dict[str, int] = {}
    for i, entry in enumerate(catalog.entries):
        if entry.id in ids:
            return (
                ["entries", i, "id"],
                f"id {entry.id!r} is already the id of {{other}}; give each entry its own",
                ["entries", ids[entry.id]],
            )
        ids[entry.id] = i
        where = _destination_key(entry)
        if where in destinations:
            j = destinations[where]
            return (
                ["entries", i, "destination"],
                f"same destination as entry {_literal(catalog.entries[j].id)!r} at {{other}}: "
                f"{_literal(where)}; "
                "give one of them another destination",
                ["entries", j],
            )
        destinations[where] = i
    known = set(ids) | set(known_ids)
    for name, profile in catalog.profiles.items():
        seen: dict[str, list[str | int]] = {}
        for group in ("core", "warm"):
            listed: list[str] = getattr(profile.static, group)
            for k, dep_id in enumerate(listed):
                path: list[str | int] = ["profiles", name, "static", group, k]
                if dep_id not in known:
                    reason = _unknown_id(dep_id, list(ids) + sorted(set(known) - set(ids)))
                    return path, _literal(reason), []
                if dep_id in seen:
                    reason = f"{_literal(dep_id)!r} is listed twice: already {{other}}"
                    return path, reason, seen[dep_id]
                seen[dep_id] = path
    return None


def _literal(text: str) -> str:
    """``text`` inside a reason that is formatted with ``{other}``."""
    return text.replace("{", "{{").replace("}", "}}")


def _unknown_id(dep_id: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(dep_id, list(known), n=1)
    if close:
        return f"no catalog entry has the id {dep_id!r}; did you mean {close[0]!r}?"
    shown = ", ".join(list(known)[:_IDS_SHOWN]) or "none"
    more = f", ... ({len(known)} in all)" if len(known) > _IDS_SHOWN else ""
    return f"no catalog entry has the id {dep_id!r}; the catalog's ids are: {shown}{more}"


def _size_text(n: int) -> str | int:
    """``n`` as an exact size people read (``20GB``, ``1GiB``), or the bytes."""
    for unit, scale in (
        ("TB", TB),
        ("TiB", TiB),
        ("GB", GB),
        ("GiB", GiB),
        ("MB", MB),
        ("MiB", MiB),
        ("kB", KB),
        ("KiB", KiB),
    ):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return n


# ---------------------------------------------------------------- loading


def load_catalog(path: Path, *, known_ids: Collection[str] = ()) -> DependencyCatalog:
    """Read and validate a catalog file; every problem is one ``ConfigError`` line.

    ``known_ids``: ids its profiles may name besides its own (the catalog it is imported
    into).
    """
    return parse_catalog(_YAML.read(path), source=str(path), known_ids=known_ids)


def parse_catalog(
    text: str, *, source: str = "deps.yaml", known_ids: Collection[str] = ()
) -> DependencyCatalog:
    """Validate a catalog's text (``load_catalog`` without the file)."""
    data = _YAML.load(text, source)
    if data is None:
        raise ConfigError(
            "the file is empty; expected 'entries:' (the catalog) and 'profiles:' (server types)",
            source=source,
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping with 'entries:' and 'profiles:' at the top, got {kind(data)}",
            source=source,
        )
    try:
        catalog = DependencyCatalog.model_validate(data, context={"known_ids": known_ids})
    except ValidationError as error:
        _raise(error, text, source)
    catalog._source = source
    catalog._text = text
    return catalog


def _raise(error: ValidationError, text: str, source: str) -> NoReturn:
    first = error.errors(include_url=False)[0]
    if first["type"] == _CONFLICT:
        ctx = first.get("ctx") or {}
        other: list[str | int] = list(ctx["other"])
        path: list[str | int] = list(ctx["path"])
        line = line_of(text, other) if other and text else None
        shown = line is not None and line != line_of(text, path)
        where = dotted(other) + (f" (line {line})" if shown else "")
        reason = str(ctx["template"]).format(other=where)
        raise _YAML.error(reason, path, text, source) from None
    _YAML.invalid(error, DependencyCatalog, text, source)

"""The workspace manifest: what a ComfyUI workspace holds, in one YAML file.

A manifest names the custom nodes (git URL pinned to a commit, requirements
installed), the models (one or several sources tried in order, a folder under
``models/``, an optional file name, sha256, size, ``critical``), workflows,
config files, extra pip packages, ComfyUI's arguments and an optional warm-up
workflow. ``examples/manifest.yaml`` is a complete example.

Every model forbids unknown keys, so a typo is an error, not a silently ignored
setting. ``load_manifest`` turns each problem into one ``ManifestError`` line that
names the file, the dotted field and the YAML line, before anything is installed
or downloaded::

    manifest.yaml: models[2].dest: expected a folder under models/, got '../etc' (line 14)

What the file alone cannot tell is checked against a workspace by
``check_workspace`` (a symlink that leads a destination out of ``models/``), and
file names that only a source knows (``civitai://``) by the provisioner once the
sources are resolved; both raise the same kind of error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Final, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from comfyfleet.errors import ManifestError
from comfyfleet.yamlconfig import EXPECTED, YamlErrors, kind

__all__ = [
    "SOURCE_SCHEMES",
    "ComfyUI",
    "ConfigFile",
    "CustomNode",
    "Manifest",
    "Model",
    "Workflow",
    "WorkspaceLayout",
    "check_workspace",
    "load_manifest",
    "parse_manifest",
    "source_filename",
]

#: What a model's source may start with; Dropbox links are ``https://`` URLs.
SOURCE_SCHEMES: Final = ("hf", "civitai", "https", "http")

_HEX64: Final = re.compile(r"^[0-9a-fA-F]{64}$")
# A full object id (SHA-1, or SHA-256 repositories): a branch, tag or short id can move.
COMMIT_RE: Final = re.compile(r"^(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{64})$")
_SCP_GIT: Final = re.compile(r"^[\w.-]+@[\w.-]+:.+$")

# The manifest names the first error pydantic gives (not a misspelt key before
# the others), and its only Literal is ``version: 1``.
_YAML: Final = YamlErrors(
    ManifestError,
    width=60,
    expected={**EXPECTED, "literal_error": "1"},
    unknown_first=False,
)
_show: Final = _YAML.show


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ---------------------------------------------------------------- value checks


def _sha256(value: str) -> str:
    v = value.strip()
    if not _HEX64.match(v):
        raise ValueError(f"expected a sha256: 64 hexadecimal characters, got {_show(value)}")
    return v.lower()  # Civitai writes them upper-case


def relative_path(value: str, *, under: str, what: str) -> str:
    """A relative POSIX path that stays under ``under``, normalised (``a//b/./c`` -> ``a/b/c``)."""
    if not value.strip():
        raise ValueError(f"expected {what} under {under}, got an empty string")
    if "\\" in value or "\x00" in value:
        raise ValueError(f"expected {what} under {under} with '/' separators, got {_show(value)}")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValueError(f"expected {what} under {under}, got an absolute path {_show(value)}")
    if ".." in path.parts:
        raise ValueError(f"expected {what} under {under}, got {_show(value)}, which escapes it")
    return str(path)


def file_name(value: str, what: str = "a file name") -> str:
    if (
        not value
        or value != value.strip()
        or "/" in value
        or "\\" in value
        or "\x00" in value
        or value in (".", "..")
    ):
        raise ValueError(f"expected {what} without '/', got {_show(value)}")
    return value


def _check_source(value: str) -> str:
    """The syntax of a model source; whether its host is allowed is the sources layer's call."""
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme == "hf":
        segments = [s for s in parts.path.split("/") if s]
        if not parts.netloc or len(segments) < 2:
            raise ValueError(
                f"expected hf://OWNER/REPO/PATH/IN/REPO[@REVISION], got {_show(value)}"
            )
    elif scheme == "civitai":
        if not parts.netloc.isdigit() or parts.path.strip("/"):
            raise ValueError(f"expected civitai://MODEL_VERSION_ID (digits), got {_show(value)}")
    elif scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"expected a URL with a host, got {_show(value)}")
    else:
        raise ValueError(
            "expected a source starting with hf://, civitai://, https:// (Dropbox links "
            f"included) or http:// (a host the allowlist names), got {_show(value)}"
        )
    return value.strip()


def source_filename(source: str) -> str | None:
    """The file name a source gives without asking its server, or ``None``.

    Only ``hf://`` paths say it for sure; other sources (Civitai's
    ``Content-Disposition``, a URL's last segment) are known once resolved.
    """
    parts = urlsplit(source)
    if parts.scheme.lower() != "hf":
        return None
    path = parts.path
    if "@" in path:
        path = path.rsplit("@", 1)[0]
    name = unquote(path.rstrip("/").rsplit("/", 1)[-1])
    return name or None


def _check_git_url(value: str) -> str:
    v = value.strip()
    scheme = urlsplit(v).scheme.lower()
    if scheme in ("https", "http", "ssh", "git", "file") or _SCP_GIT.match(v) or v.startswith("/"):
        return v
    raise ValueError(
        "expected a git URL (https://..., ssh://..., git@host:path, file://... or an "
        f"absolute path), got {_show(value)}"
    )


def _git_name(url: str) -> str:
    tail = url.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return tail[:-4] if tail.endswith(".git") else tail


# ---------------------------------------------------------------- the models

# The checked kinds of value that several entries hold.
Source = Annotated[str, AfterValidator(_check_source)]
Sha256 = Annotated[str, AfterValidator(_sha256)]
FileName = Annotated[str, AfterValidator(file_name)]


class ComfyUI(StrictModel):
    """Where ComfyUI lives in the workspace, how it starts, which Python installs into it."""

    path: str = Field(
        default="ComfyUI",
        description="ComfyUI's folder, relative to the workspace ('.': the workspace itself).",
    )
    args: list[str] = Field(
        default_factory=list, description="Extra arguments for ComfyUI's main.py."
    )
    python: str | None = Field(
        default=None,
        description="The interpreter whose pip installs requirements (default: the agent's).",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value.strip() in (".", "./"):
            return "."
        return relative_path(value, under="the workspace", what="a folder")

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        for arg in value:
            if arg.split("=", 1)[0] in ("--listen", "--port"):
                raise ValueError(
                    f"{arg!r} is the agent's to set: ComfyUI listens on 127.0.0.1 only, "
                    "on the agent's port"
                )
        return value


class CustomNode(StrictModel):
    """A custom node: a git repository checked out at a pinned commit under ``custom_nodes/``."""

    git: str = Field(description="The repository's URL.")
    commit: str = Field(description="The full commit id to check out (40 hex digits).")
    name: str | None = Field(
        default=None, description="Folder under custom_nodes/ (default: the repository's name)."
    )
    critical: bool = Field(default=True, description="A strict provision fails without it.")
    requirements: bool = Field(
        default=True, description="pip install its requirements.txt when it has one."
    )

    @field_validator("git")
    @classmethod
    def _git(cls, value: str) -> str:
        return _check_git_url(value)

    @field_validator("commit")
    @classmethod
    def _commit(cls, value: str) -> str:
        if not COMMIT_RE.match(value.strip()):
            raise ValueError(
                "expected a full commit id (40 hexadecimal characters; a branch, tag or "
                f"short id can move), got {_show(value)}"
            )
        return value.strip().lower()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else file_name(value, "a folder name")

    @property
    def folder(self) -> str:
        """The folder under ``custom_nodes/``."""
        return self.name or _git_name(self.git)


class Model(StrictModel):
    """A model file: where it comes from and where it goes under ``models/``."""

    source: Source | None = Field(default=None, description="hf://, civitai://, https://...")
    sources: list[str] | None = Field(
        default=None, description="Several sources, tried in order (instead of source)."
    )
    dest: str = Field(description="Folder under models/, such as checkpoints or vae.")
    name: FileName | None = Field(
        default=None, description="File name (default: the source's own file name)."
    )
    sha256: Sha256 | None = Field(default=None, description="Expected sha256 (64 hex digits).")
    size: int | None = Field(default=None, ge=0, description="Expected size in bytes.")
    critical: bool = Field(default=True, description="A strict provision fails without it.")

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("expected at least one source")
        return [_check_source(v) for v in value]

    @field_validator("dest")
    @classmethod
    def _dest(cls, value: str) -> str:
        dest = relative_path(value, under="models/", what="a folder")
        if dest == ".":
            raise ValueError("expected a folder under models/ such as checkpoints, got '.'")
        if PurePosixPath(dest).parts[0] == "models":
            raise ValueError(
                f"dest is a folder under models/: write {_show(dest[len('models/') :] or '?')}, "
                f"not {_show(value)}"
            )
        return dest

    @model_validator(mode="after")
    def _one_source_key(self) -> Model:
        if (self.source is None) == (self.sources is None):
            raise ValueError("expected either source: URL or sources: [URL, ...], not both")
        return self

    @property
    def all_sources(self) -> list[str]:
        """The sources in the order they are tried."""
        return [self.source] if self.source is not None else list(self.sources or [])

    @property
    def known_name(self) -> str | None:
        """The target's file name when the manifest alone says it (``name``, or an hf:// path)."""
        if self.name is not None:
            return self.name
        for s in self.all_sources:
            name = source_filename(s)
            if name is not None:
                return name
        return None

    def target(self, name: str) -> str:
        """The target's path under ``models/``, for file ``name``."""
        return f"{self.dest}/{name}"


class Workflow(StrictModel):
    """A ComfyUI workflow (JSON), put in ComfyUI's ``user/default/workflows/``."""

    name: FileName | None = Field(
        default=None, description="File name (default: from file/source)."
    )
    file: str | None = Field(default=None, description="A file next to the manifest.")
    source: Source | None = Field(default=None, description="A URL to download it from.")
    content: str | None = Field(
        default=None, description="The workflow's JSON itself (with name: for its file name)."
    )
    sha256: Sha256 | None = None
    critical: bool = True

    @model_validator(mode="after")
    def _one_origin(self) -> Workflow:
        given = [k for k in ("file", "source", "content") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of file: PATH, source: URL or content: JSON")
        if self.name is None and self.file_name is None:
            raise ValueError("expected a name: the source does not end with a file name")
        return self

    @property
    def file_name(self) -> str | None:
        """The file name under ``workflows/``."""
        if self.name is not None:
            return self.name
        if self.file is not None:
            return PurePosixPath(self.file).name or None
        if self.source is None:
            return None  # inline content: its name: says it
        tail = unquote(urlsplit(self.source).path.rstrip("/").rsplit("/", 1)[-1])
        if "@" in tail and urlsplit(self.source).scheme == "hf":
            tail = tail.rsplit("@", 1)[0]
        return tail if "." in tail else None


class ConfigFile(StrictModel):
    """A config file written into ComfyUI's folder: inline ``content`` or a ``file``/``source``."""

    path: str = Field(description="Where, relative to ComfyUI's folder.")
    content: str | None = None
    file: str | None = None
    source: Source | None = None
    sha256: Sha256 | None = None
    critical: bool = True

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        path = relative_path(value, under="ComfyUI's folder", what="a file")
        if path == ".":
            raise ValueError("expected a file path, got '.'")
        return path

    @model_validator(mode="after")
    def _one_origin(self) -> ConfigFile:
        given = [k for k in ("content", "file", "source") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of content:, file: or source:")
        return self


class Manifest(StrictModel):
    """A workspace: custom nodes, models, workflows, config files, pip packages, ComfyUI."""

    version: Literal[1] = 1
    comfyui: ComfyUI = Field(default_factory=ComfyUI)
    custom_nodes: list[CustomNode] = Field(default_factory=list)
    models: list[Model] = Field(default_factory=list)
    workflows: list[Workflow] = Field(default_factory=list)
    config_files: list[ConfigFile] = Field(default_factory=list)
    pip: list[str] = Field(
        default_factory=list, description="Extra pip packages (SageAttention, Triton...)."
    )
    pip_args: list[str] = Field(
        default_factory=list,
        description="Extra arguments for every pip install (--extra-index-url, --no-index...).",
    )
    warmup_workflow: str | None = Field(
        default=None, description="The name of a workflow to run once before 'ready'."
    )

    _source: str = PrivateAttr(default="manifest.yaml")
    _text: str = PrivateAttr(default="")
    _base_dir: Path = PrivateAttr(default=Path("."))

    @property
    def source(self) -> str:
        """The file this manifest was read from (for error messages)."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """The folder ``file:`` entries are relative to: the manifest's own."""
        return self._base_dir

    def layout(self, workspace: Path) -> WorkspaceLayout:
        """Where everything goes in ``workspace``."""
        return WorkspaceLayout(root=workspace, comfy=workspace / self.comfyui.path)

    def local_file(self, relative: str) -> Path:
        """A ``file:`` entry as a path on this machine."""
        return self._base_dir / relative

    def error(self, path: list[str | int], reason: str) -> ManifestError:
        """A ``ManifestError`` for the entry at ``path`` (``["models", 3]``), with its line."""
        return _YAML.error(reason, path, self._text, self._source)

    def inlined(self) -> Manifest:
        """This manifest with its ``file:`` workflows and config files read in as ``content:``.

        What travels to an agent on another machine, which cannot read this one's files.
        A file that cannot be read is a ``ManifestError`` naming its entry.
        """

        def read(relative: str, where: list[str | int]) -> str:
            try:
                return self.local_file(relative).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise self.error(where, f"cannot read {relative}: {exc}") from None

        workflows = [
            w.model_copy(
                update={
                    "file": None,
                    "name": w.file_name,
                    "content": read(w.file, ["workflows", i, "file"]),
                }
            )
            if w.file is not None
            else w
            for i, w in enumerate(self.workflows)
        ]
        configs = [
            c.model_copy(
                update={"file": None, "content": read(c.file, ["config_files", i, "file"])}
            )
            if c.file is not None
            else c
            for i, c in enumerate(self.config_files)
        ]
        out = self.model_copy(update={"workflows": workflows, "config_files": configs})
        out._source, out._text, out._base_dir = self._source, self._text, self._base_dir
        return out

    @property
    def warmup(self) -> Workflow | None:
        """The warm-up workflow, if the manifest names one."""
        for w in self.workflows:
            if w.file_name == self.warmup_workflow:
                return w
        return None


@dataclass(frozen=True)
class WorkspaceLayout:
    """The folders of a workspace: ``root`` holds the error log, ``comfy`` is ComfyUI's."""

    root: Path
    comfy: Path

    @property
    def models(self) -> Path:
        return self.comfy / "models"

    @property
    def custom_nodes(self) -> Path:
        return self.comfy / "custom_nodes"

    @property
    def workflows(self) -> Path:
        return self.comfy / "user" / "default" / "workflows"

    def model_path(self, model: Model, name: str) -> Path:
        return self.models / model.dest / name

    def node_path(self, node: CustomNode) -> Path:
        return self.custom_nodes / node.folder

    def relative(self, path: Path) -> str:
        """``path`` as shown in logs: relative to the workspace root when inside it."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


# ---------------------------------------------------------------- loading


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file; every problem is one ``ManifestError`` line."""
    return parse_manifest(_YAML.read(path), source=str(path), base_dir=path.parent)


def parse_manifest(
    text: str, *, source: str = "manifest.yaml", base_dir: Path | None = None
) -> Manifest:
    """Validate a manifest's text; ``file:`` entries are relative to ``base_dir``."""
    data = _YAML.load(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ManifestError(
            f"expected a mapping (models:, custom_nodes:, ...) at the top, got {kind(data)}",
            source=source,
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        _YAML.invalid(error, Manifest, text, source)
    manifest._source = source
    manifest._text = text
    manifest._base_dir = base_dir if base_dir is not None else Path(".")
    _check_across_entries(manifest)
    return manifest


def _check_across_entries(m: Manifest) -> None:
    """What one entry alone cannot tell: duplicates, references, local files."""
    targets: dict[str, int] = {}
    for i, model in enumerate(m.models):
        name = model.known_name
        if name is None:
            continue
        target = model.target(name)
        if target in targets:
            raise m.error(
                ["models", i],
                f"same target as models[{targets[target]}]: models/{target}; "
                "give one of them another dest or name",
            )
        targets[target] = i
    folders: dict[str, int] = {}
    for i, node in enumerate(m.custom_nodes):
        if node.folder in folders:
            raise m.error(
                ["custom_nodes", i],
                f"same folder as custom_nodes[{folders[node.folder]}]: "
                f"custom_nodes/{node.folder}; set name: to tell them apart",
            )
        folders[node.folder] = i
    names: dict[str, int] = {}
    for i, wf in enumerate(m.workflows):
        name = wf.file_name
        assert name is not None
        if name in names:
            raise m.error(["workflows", i], f"same name as workflows[{names[name]}]: {name}")
        names[name] = i
        if wf.file is not None:
            _check_local_file(m, wf.file, ["workflows", i, "file"])
    paths: dict[str, int] = {}
    for i, cf in enumerate(m.config_files):
        if cf.path in paths:
            raise m.error(["config_files", i], f"same path as config_files[{paths[cf.path]}]")
        paths[cf.path] = i
        if cf.file is not None:
            _check_local_file(m, cf.file, ["config_files", i, "file"])
    if m.warmup_workflow is not None and m.warmup is None:
        known = ", ".join(n for n in names) or "none"
        raise m.error(
            ["warmup_workflow"],
            f"expected the name of a workflow listed under workflows: ({known}), "
            f"got {_show(m.warmup_workflow)}",
        )


def _check_local_file(m: Manifest, relative: str, path: list[str | int]) -> None:
    if not m.local_file(relative).is_file():
        raise m.error(path, f"no such file: {m.local_file(relative)}")


# ---------------------------------------------------------------- the workspace


def _escapes(path: Path, base: Path) -> bool:
    """Whether ``path`` (its existing part, symlinks followed) leads outside ``base``."""
    real_base = Path(os.path.realpath(base))
    real = Path(os.path.realpath(path))
    return not real.is_relative_to(real_base)


def check_workspace(manifest: Manifest, workspace: Path) -> None:
    """Refuse destinations that a symlink in ``workspace`` leads outside their folder.

    ``models/`` itself may be a symlink (to a larger disk, say): what counts is
    that every destination stays inside wherever it points.
    """
    layout = manifest.layout(workspace)
    if _escapes(layout.comfy, layout.root):
        raise manifest.error(
            ["comfyui", "path"],
            f"{layout.comfy} is a symlink that leads out of the workspace {layout.root}",
        )
    for i, model in enumerate(manifest.models):
        folder = layout.models / model.dest
        name = model.known_name
        target = folder / name if name is not None else folder
        if _escapes(target, layout.models):
            raise manifest.error(
                ["models", i, "dest"],
                f"models/{model.dest} leads out of models/ through a symlink "
                f"(to {os.path.realpath(target)}); remove the link or change dest",
            )
    for i, cf in enumerate(manifest.config_files):
        if _escapes(layout.comfy / cf.path, layout.comfy):
            raise manifest.error(
                ["config_files", i, "path"],
                f"{cf.path} leads out of ComfyUI's folder through a symlink",
            )
    for i, wf in enumerate(manifest.workflows):
        assert wf.file_name is not None
        if _escapes(layout.workflows / wf.file_name, layout.comfy):
            raise manifest.error(
                ["workflows", i], "the workflows folder leads out of ComfyUI's through a symlink"
            )

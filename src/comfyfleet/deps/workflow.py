"""A job's dependencies, derived from its workflow: the files its loader nodes name,
matched against the catalog.

A loader names its file by an input (``ckpt_name``, ``lora_name``, ``vae_name``,
``clip_name`` / ``clip_name1``..., ``unet_name``, ``control_net_name``) whose value is the
path inside its model folder, as ComfyUI lists it (``sub/x.safetensors``, with ``\\`` on
a Windows machine). A reference matches a catalog model whose destination, inside its
folder, is that path, or whose file name is that value. When several entries match, those
in the folders the input reads (``lora_name``: ``loras``) win, then an exact path over a
bare file name; what is still tied is reported as ambiguous, never guessed.

Pure: the workflow is data in ComfyUI's API format (``comfyfleet.workflow``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from comfyfleet.deps.catalog import CatalogEntry, DependencyCatalog
from comfyfleet.workflow import id_order, is_link, load_api_workflow, node_label

__all__ = [
    "LOADER_FOLDERS",
    "AmbiguousReference",
    "LoaderReference",
    "WorkflowDependencies",
    "dependencies_of",
    "is_loader_input",
    "loader_references",
]

#: The folders under ``models/`` each loader input reads, as ComfyUI's ``folder_paths``
#: maps them (``text_encoders`` also reads ``clip``, ``diffusion_models`` ``unet``,
#: ``controlnet`` ``t2i_adapter``); ``clip_name`` is also CLIPVisionLoader's.
LOADER_FOLDERS: Final[Mapping[str, frozenset[str]]] = {
    "ckpt_name": frozenset({"checkpoints"}),
    "lora_name": frozenset({"loras"}),
    "vae_name": frozenset({"vae"}),
    "clip_name": frozenset({"text_encoders", "clip", "clip_vision"}),
    "unet_name": frozenset({"diffusion_models", "unet"}),
    "control_net_name": frozenset({"controlnet", "t2i_adapter"}),
}
# DualCLIPLoader's clip_name1/clip_name2, TripleCLIPLoader's up to clip_name3, and more.
_NUMBERED_CLIP: Final = re.compile(r"^clip_name\d+$")


def is_loader_input(input_name: str) -> bool:
    """Whether an input of that name names a model file to load."""
    return input_name in LOADER_FOLDERS or bool(_NUMBERED_CLIP.match(input_name))


def _folders(input_name: str) -> frozenset[str]:
    return LOADER_FOLDERS.get(input_name) or LOADER_FOLDERS["clip_name"]


class LoaderReference(NamedTuple):
    """A loader input's literal value: node ``node_id`` (``class_type``) loads ``value``."""

    node_id: str
    class_type: str
    input_name: str
    value: str


@dataclass(frozen=True)
class AmbiguousReference:
    """A reference that several catalog entries match equally well (``candidates``: ids)."""

    reference: LoaderReference
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class WorkflowDependencies:
    """What a workflow needs from the catalog.

    ``matched``: the entry ids, in the order the workflow first names them, each once;
    ``resolved``: each matched reference with its entry's id; ``unmatched``: references no
    entry matches (a file the image ships, or one missing from the catalog);
    ``ambiguous``: references several entries match equally well.
    """

    matched: tuple[str, ...]
    resolved: tuple[tuple[LoaderReference, str], ...]
    unmatched: tuple[LoaderReference, ...]
    ambiguous: tuple[AmbiguousReference, ...]

    def describe(self, workflow: Mapping[str, Any] | None = None) -> list[str]:
        """One line per reference that did not resolve to one entry, for a person."""
        lines = []
        for ref in self.unmatched:
            lines.append(f"{_where(ref, workflow)}: no catalog entry for {ref.value!r}")
        for amb in self.ambiguous:
            ids = ", ".join(amb.candidates)
            lines.append(
                f"{_where(amb.reference, workflow)}: {amb.reference.value!r} matches several "
                f"catalog entries ({ids}); give the path inside its folder, or name the "
                "dependency the job needs"
            )
        return lines


def _where(ref: LoaderReference, workflow: Mapping[str, Any] | None) -> str:
    graph = workflow.get("prompt", workflow) if workflow is not None else None
    if isinstance(graph, Mapping) and isinstance(graph.get(ref.node_id), Mapping):
        label = node_label(graph, ref.node_id)
    else:
        label = f"node {ref.node_id} ({ref.class_type})"
    return f"{label} input {ref.input_name!r}"


def loader_references(workflow: Mapping[str, Any]) -> list[LoaderReference]:
    """Every loader input's literal value in an API-format workflow, in node order.

    ``workflow`` is the graph or a ``POST /prompt`` body; a UI-format workflow raises
    ``WorkflowError`` with how to export the API format. Links (``["4", 0]``), values that
    are not text and empty names are skipped.
    """
    graph = load_api_workflow(workflow)
    refs: list[LoaderReference] = []
    for node_id in sorted(graph, key=id_order):
        node = graph[node_id]
        for input_name, value in node["inputs"].items():
            if not is_loader_input(input_name) or is_link(value) or not isinstance(value, str):
                continue
            if value.strip():
                refs.append(LoaderReference(node_id, str(node["class_type"]), input_name, value))
    return refs


def dependencies_of(
    workflow: Mapping[str, Any], catalog: DependencyCatalog
) -> WorkflowDependencies:
    """The catalog entries a workflow's loaders name, and the references that name none
    (or several). See the module's docstring for how a reference matches."""
    by_path: dict[str, list[CatalogEntry]] = {}
    by_name: dict[str, list[CatalogEntry]] = {}
    for entry in catalog.entries:
        if entry.kind == "model":
            by_path.setdefault(entry.in_folder, []).append(entry)
            by_name.setdefault(entry.filename, []).append(entry)
    matched: dict[str, None] = {}
    resolved: list[tuple[LoaderReference, str]] = []
    unmatched: list[LoaderReference] = []
    ambiguous: list[AmbiguousReference] = []
    for ref in loader_references(workflow):
        found = _best(ref, by_path, by_name)
        if not found:
            unmatched.append(ref)
        elif len(found) > 1:
            ambiguous.append(AmbiguousReference(ref, tuple(e.id for e in found)))
        else:
            matched.setdefault(found[0].id)
            resolved.append((ref, found[0].id))
    return WorkflowDependencies(
        matched=tuple(matched),
        resolved=tuple(resolved),
        unmatched=tuple(unmatched),
        ambiguous=tuple(ambiguous),
    )


def _best(
    ref: LoaderReference,
    by_path: Mapping[str, Sequence[CatalogEntry]],
    by_name: Mapping[str, Sequence[CatalogEntry]],
) -> list[CatalogEntry]:
    """The entries ``ref`` matches best: in the input's folders first, then an exact path."""
    # ComfyUI lists subfolders with the machine's separator; a workflow made on Windows
    # says sub\\x.safetensors for the sub/x.safetensors of a Linux instance.
    value = "/".join(part for part in ref.value.strip().replace("\\", "/").split("/") if part)
    exact = list(by_path.get(value, ()))
    named = [e for e in by_name.get(value, ()) if e not in exact]
    folders = _folders(ref.input_name)
    for tier in (
        [e for e in exact if e.folder in folders],
        [e for e in named if e.folder in folders],
        exact,
        named,
    ):
        if tier:
            return tier
    return []

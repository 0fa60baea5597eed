"""Workflow parameters and outputs: the pure functions behind ``comfyfleet run``, the jobs
API and the agent's job runner.

A workflow is ComfyUI's API format, ``{"<id>": {"class_type", "inputs", "_meta"}}``, where
an input is a literal or a link ``["<source id>", <output index>]``. Here it is loaded and
checked (``load_api_workflow``), given its parameters (``--set NODE.INPUT=VALUE``,
``--prompt``, ``--image``, random seeds), and its history entry is turned into the list of
outputs to bring back (``collect_outputs``); ComfyUI's refusal of a workflow is made
readable (``describe_validation``). Every function returns a new workflow and leaves the
one it was given untouched; none does I/O except reading a workflow file.
"""

from __future__ import annotations

import copy
import difflib
import json
import random
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from comfyfleet.agent.comfy import (
    OutputFile,
    PromptResult,
    UploadedFile,
    describe_validation_error,
    is_ui_format,
    workflow_graph,
)
from comfyfleet.errors import ComfyValidationError, ConfigError

__all__ = [
    "SAMPLER_TYPES",
    "SEED_INPUTS",
    "SEED_MAX",
    "ImageArg",
    "Output",
    "OutputFile",
    "OutputText",
    "Override",
    "Prepared",
    "SeedChange",
    "TextTarget",
    "Workflow",
    "WorkflowError",
    "apply_overrides",
    "apply_parameters",
    "collect_outputs",
    "describe_validation",
    "find_prompt",
    "is_link",
    "load_api_workflow",
    "node_label",
    "parse_image_arg",
    "parse_value",
    "randomize_seeds",
    "resolve_node",
    "set_image",
    "set_prompt",
]

Workflow = dict[str, dict[str, Any]]

# KSampler's ``seed`` and KSamplerAdvanced's / RandomNoise's ``noise_seed`` are INT inputs
# with min 0 and max 0xffffffffffffffff (ComfyUI's nodes.py; the simulator declares the same).
SEED_INPUTS: Final = ("seed", "noise_seed")
SEED_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

SAMPLER_TYPES: Final = frozenset(
    {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
)
LOAD_IMAGE: Final = "LoadImage"

# Inputs that hold a text encoder's prompt: CLIPTextEncode ``text``, CLIPTextEncodeSDXL
# ``text_g``/``text_l``, CLIPTextEncodeSD3 ``clip_g``/``clip_l``/``t5xxl``, CLIPTextEncodeFlux
# ``clip_l``/``t5xxl``, CLIPTextEncodeHunyuanDiT ``bert``/``mt5xl``, TextEncodeQwenImageEdit
# ``prompt``. A text encoder also takes a ``clip`` link, which tells it from other nodes.
_TEXT_INPUTS: Final = (
    "text",
    "text_g",
    "text_l",
    "clip_g",
    "clip_l",
    "t5xxl",
    "bert",
    "mt5xl",
    "prompt",
)
# Where a string node (PrimitiveString, a "String Literal"...) keeps its text.
_STRING_INPUTS: Final = ("value", "string", "text", "prompt")
# Conditioning inputs followed back towards the text encoder, the main one first: through
# ConditioningCombine it is ``conditioning_1``, through ConditioningConcat/Average
# ``conditioning_to``; the others are tried only when the main one leads nowhere.
_CONDITIONING_INPUTS: Final = (
    "conditioning",
    "conditioning_1",
    "conditioning_to",
    "cond1",
    "positive",
    "conditioning_2",
    "conditioning_from",
    "cond2",
)
# Nodes whose conditioning output does not depend on the text behind them.
_TEXT_BARRIERS: Final = frozenset({"ConditioningZeroOut"})

_UI_FORMAT_HINT: Final = (
    "this is a UI-format workflow (the editor's save, with 'nodes' and 'links' lists); "
    "comfyfleet runs ComfyUI's API format. In ComfyUI, open the Workflow menu and choose "
    "'Export (API)'; older versions show a 'Save (API Format)' button once 'Enable Dev mode "
    "Options' is ticked in the settings (gear icon). Then use the exported file."
)
_LIST_VALUE_HINT: Final = (
    'a literal list must be wrapped as {"__value__": [...]}: ComfyUI reads every list '
    "input as a link [node_id, output_index]"
)


class WorkflowError(ConfigError):
    """A workflow, or a parameter given for it, is wrong; the message says what to do.

    ``source`` names the workflow file when there is one.
    """


# --------------------------------------------------------------------------- loading


def is_link(value: object) -> bool:
    """Whether an input value is a link ``["<node id>", <output index>]``."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def load_api_workflow(
    source: Mapping[str, Any] | str | bytes | Path, *, name: str | None = None
) -> Workflow:
    """A checked copy of an API-format workflow: a ``Path`` to a JSON file, JSON text
    (``str``/``bytes``), or data already parsed (the graph, or a ``POST /prompt`` body).

    Raises ``WorkflowError`` for a file that cannot be read, text that is not JSON, JSON
    that is not an object, a UI-format workflow (the message says how to export the API
    format), a node without ``class_type`` or with ``inputs`` that are not an object, and
    a link to a node the workflow does not have. Link ids are normalized to strings and a
    node without ``inputs`` gets ``{}``.
    """
    label = name or (str(source) if isinstance(source, Path) else "workflow")
    data: Any
    if isinstance(source, Path):
        try:
            data = _parse_json(source.read_bytes(), label)
        except OSError as error:
            raise WorkflowError(
                f"cannot read the workflow: {error.strerror or error}", source=label
            ) from error
    elif isinstance(source, str | bytes):
        data = _parse_json(source, label)
    else:
        data = source
    if not isinstance(data, Mapping):
        raise WorkflowError(
            f"a workflow must be a JSON object, not {_json_kind(data)}", source=label
        )
    prompt = data.get("prompt")
    graph = prompt if isinstance(prompt, Mapping) else data
    if is_ui_format(data) or is_ui_format(graph):
        raise WorkflowError(_UI_FORMAT_HINT, source=label)
    if not graph:
        raise WorkflowError("the workflow has no nodes", source=label)
    try:
        nodes = workflow_graph(data, name=label)
    except ConfigError as error:
        raise WorkflowError(error.reason, source=label) from error
    workflow: Workflow = {}
    for node_id, node in nodes.items():
        inputs = node.get("inputs", {})
        if not isinstance(inputs, Mapping):
            raise WorkflowError(
                f"node {node_id} ({node['class_type']}) has 'inputs' that are not an object",
                source=label,
            )
        workflow[node_id] = {**copy.deepcopy(node), "inputs": copy.deepcopy(dict(inputs))}
    for node_id, node in workflow.items():
        for input_name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][input_name] = _checked_link(workflow, node_id, input_name, value)
    return workflow


def _parse_json(text: str | bytes, label: str) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError as error:
        raise WorkflowError("the workflow is not UTF-8 text", source=label) from error
    except json.JSONDecodeError as error:
        raise WorkflowError(
            f"the workflow is not JSON: {error.msg} at line {error.lineno}, column {error.colno}",
            source=label,
        ) from error


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


def _checked_link(workflow: Workflow, node_id: str, input_name: str, value: list[Any]) -> Any:
    where = f"{node_label(workflow, node_id)} input {input_name!r}"
    if not is_link(value):
        raise WorkflowError(f"{where} is {json.dumps(value)}, not a link; {_LIST_VALUE_HINT}")
    target = str(value[0])
    if target not in workflow:
        raise WorkflowError(
            f"{where} links to node {target!r}, which is not in the workflow; "
            "export the workflow again, or fix the link"
        )
    return [target, value[1]]


# --------------------------------------------------------------------------- addressing


def node_label(workflow: Mapping[str, Mapping[str, Any]], node_id: str) -> str:
    """``node 3 (KSampler)``, with the node's title when it has one:
    ``node 6 (CLIPTextEncode, "Positive prompt")``."""
    node = workflow.get(node_id, {})
    class_type = node.get("class_type", "?")
    title = _title(node)
    shown = f'{class_type}, "{title}"' if title and title != class_type else class_type
    return f"node {node_id} ({shown})"


def _title(node: Mapping[str, Any]) -> str | None:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    return title if isinstance(title, str) else None


def id_order(node_id: str) -> tuple[int, int, str]:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _labels(workflow: Workflow, ids: Iterable[str]) -> str:
    return ", ".join(node_label(workflow, i).removeprefix("node ") for i in ids)


def resolve_node(workflow: Workflow, address: str) -> str:
    """The id of the node ``address`` names: its id (``"3"``, or ``"#3"`` as the editor
    shows it), its ``class_type`` (``"KSampler"``) or its title (``_meta.title``).

    Raises ``WorkflowError`` when the address matches several nodes (listing them with
    their titles) or none (suggesting close names).
    """
    address = address.strip()
    if address in workflow:
        return address
    if address.startswith("#") and address[1:] in workflow:
        return address[1:]
    matches = sorted(
        (
            node_id
            for node_id, node in workflow.items()
            if node.get("class_type") == address or _title(node) == address
        ),
        key=id_order,
    )
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise WorkflowError(
            f"{address!r} matches {len(matches)} nodes: {_labels(workflow, matches)}; "
            f"address one by its id (for example {matches[0]!r})"
        )
    names: dict[str, str] = {}
    for node_id, node in sorted(workflow.items(), key=lambda item: id_order(item[0])):
        for name in (node_id, node.get("class_type"), _title(node)):
            if isinstance(name, str):
                names.setdefault(name.lower(), name)
    close = [names[n] for n in difflib.get_close_matches(address.lower(), names, n=3)]
    if close:
        hint = "did you mean " + " or ".join(repr(name) for name in close) + "?"
    else:
        ids = sorted(workflow, key=id_order)
        hint = "its nodes: " + _labels(workflow, ids[:12]) + (", ..." if len(ids) > 12 else "")
    raise WorkflowError(
        f"no node {address!r} in the workflow (a node is named by id, class_type or title); " + hint
    )


# --------------------------------------------------------------------------- --set


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (``30``, ``7.5``, ``true``, ``null``,
    ``"quoted"``, ``["4", 0]``), else the text itself. ``NaN`` and ``Infinity`` stay text:
    they are not JSON that ComfyUI could read back."""

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


@dataclass(frozen=True)
class Override:
    """``--set NODE.INPUT=VALUE``: ``node`` is the address as written (id, class_type or
    title), ``value`` already parsed (``parse_value``)."""

    node: str
    input: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> Override:
        """Parse ``NODE.INPUT=VALUE``. The node is what comes before the last dot before
        the first ``=``, so titles may hold dots and spaces (``My v1.5 model.ckpt_name=x``);
        a title holding ``=`` is quoted: ``"a=b".steps=30``."""
        usage = f"--set {text!r}: expected NODE.INPUT=VALUE, for example KSampler.steps=30"
        if text[:1] in ("'", '"'):
            end = text.find(text[0], 1)
            if end < 0 or text[end + 1 : end + 2] != ".":
                raise WorkflowError(usage)
            node = text[1:end]
            input_name, sep, raw = text[end + 2 :].partition("=")
        else:
            left, sep, raw = text.partition("=")
            node, _, input_name = left.rpartition(".")
        node, input_name = node.strip(), input_name.strip()
        if not sep or not node or not input_name:
            raise WorkflowError(usage)
        return cls(node, input_name, parse_value(raw))

    def __str__(self) -> str:
        return f"{self.node}.{self.input}={json.dumps(self.value, ensure_ascii=False)}"


def apply_overrides(
    workflow: Workflow, overrides: Iterable[Override]
) -> tuple[Workflow, frozenset[tuple[str, str]]]:
    """The workflow with every override applied, in order (a later one wins), and the
    ``(node_id, input)`` pairs they set (``randomize_seeds`` leaves those alone).

    Raises ``WorkflowError`` for an address that matches no node or several, an input the
    node does not have (suggesting close names), a link replaced by a literal, a link to
    a missing node, and a bare list (neither a link nor ``{"__value__": [...]}``).
    """
    out = copy.deepcopy(workflow)
    fixed: set[tuple[str, str]] = set()
    for override in overrides:
        node_id = resolve_node(out, override.node)
        inputs = out[node_id]["inputs"]
        where = f"--set {override}: {node_label(out, node_id)}"
        if override.input not in inputs:
            raise WorkflowError(
                f"{where} has no input {override.input!r}; " + _inputs_hint(override.input, inputs)
            )
        current, value = inputs[override.input], override.value
        if isinstance(value, list):
            if not is_link(value):
                raise WorkflowError(f"{where} input {override.input!r}: {_LIST_VALUE_HINT}")
            value = _checked_link(out, node_id, override.input, value)
        elif is_link(current):
            raise WorkflowError(
                f"{where} input {override.input!r} is connected to node {current[0]} "
                f"output {current[1]}; it can only be set to another link "
                f'like ["{current[0]}", {current[1]}], or set the node it comes from'
            )
        inputs[override.input] = value
        fixed.add((node_id, override.input))
    return out, frozenset(fixed)


def _inputs_hint(name: str, inputs: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(inputs), n=3)
    listed = "its inputs: " + (", ".join(sorted(inputs)) or "none")
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "? " + listed
    return listed


# --------------------------------------------------------------------------- --prompt


@dataclass(frozen=True)
class TextTarget:
    """Where a prompt goes: the inputs of one node that hold its text (all of them get it:
    CLIPTextEncodeSDXL's ``text_g`` and ``text_l``)."""

    node_id: str
    inputs: tuple[str, ...]


def _text_target(workflow: Workflow, node_id: str) -> TextTarget | None:
    """The text inputs of a text encoder (a node with a ``clip`` link and prompt inputs),
    following a prompt that comes from a string node; ``None`` for any other node."""
    inputs = workflow[node_id]["inputs"]
    if not is_link(inputs.get("clip")):
        return None
    names = [name for name in _TEXT_INPUTS if name in inputs]
    literal = tuple(name for name in names if isinstance(inputs[name], str))
    if literal:
        return TextTarget(node_id, literal)
    linked = [inputs[name] for name in names if is_link(inputs[name])]
    if not linked:
        return None
    source = str(linked[0][0])
    source_inputs = workflow[source]["inputs"]
    strings = tuple(n for n in _STRING_INPUTS if isinstance(source_inputs.get(n), str))
    if strings:
        return TextTarget(source, strings[:1])
    raise WorkflowError(
        f"the prompt of {node_label(workflow, node_id)} comes from "
        f"{node_label(workflow, source)}, which holds no plain text; set it with "
        f"--set {source}.INPUT=..."
    )


def _is_sampler(node: Mapping[str, Any]) -> bool:
    inputs = node.get("inputs", {})
    if node.get("class_type") in SAMPLER_TYPES:
        return True
    # Custom samplers ("KSampler (Efficient)"...) take a latent and conditioning or a guider.
    return is_link(inputs.get("latent_image")) and (
        is_link(inputs.get("positive")) or is_link(inputs.get("guider"))
    )


def _conditioning_entry(
    workflow: Workflow, sampler_id: str, negative: bool
) -> tuple[str, int] | None:
    """The link a sampler takes its positive (negative) conditioning from, through its
    guider for SamplerCustomAdvanced (CFGGuider ``positive``, BasicGuider ``conditioning``)."""
    inputs = workflow[sampler_id]["inputs"]
    side = "negative" if negative else "positive"
    if is_link(inputs.get(side)):
        return str(inputs[side][0]), int(inputs[side][1])
    guider = inputs.get("guider")
    if is_link(guider):
        guider_inputs = workflow[str(guider[0])]["inputs"]
        names = ("negative",) if negative else ("positive", "conditioning", "cond1")
        for name in names:
            if is_link(guider_inputs.get(name)):
                return str(guider_inputs[name][0]), int(guider_inputs[name][1])
    return None


def _trace(
    workflow: Workflow, link: tuple[str, int], seen: set[str], stops: list[str]
) -> TextTarget | None:
    """Follow conditioning links back from ``link`` to the text encoder behind them."""
    node_id, slot = link
    if node_id in seen:
        return None
    seen.add(node_id)
    node = workflow[node_id]
    if node.get("class_type") in _TEXT_BARRIERS:
        stops.append(node_id)
        return None
    target = _text_target(workflow, node_id)
    if target is not None:
        return target
    inputs = node["inputs"]
    if is_link(inputs.get("positive")) and is_link(inputs.get("negative")):
        # ControlNetApplyAdvanced, InpaintModelConditioning...: outputs (positive, negative).
        names: tuple[str, ...] = ("negative",) if slot == 1 else ("positive",)
    else:
        names = _CONDITIONING_INPUTS
    followed = False
    for name in names:
        value = inputs.get(name)
        if is_link(value):
            followed = True
            found = _trace(workflow, (str(value[0]), int(value[1])), seen, stops)
            if found is not None:
                return found
    if not followed:
        stops.append(node_id)
    return None


def find_prompt(workflow: Workflow, *, negative: bool = False) -> TextTarget:
    """The text encoder that feeds the samplers' positive (``negative``) conditioning.

    Samplers are KSampler, KSamplerAdvanced, SamplerCustom and SamplerCustomAdvanced
    (through its guider). The conditioning is followed back through the nodes between
    (ConditioningCombine's first input, ControlNetApply, FluxGuidance...) to a node with a
    ``clip`` link and a ``text`` input (or ``text_g``/``text_l``, ``clip_l``/``t5xxl``...),
    or to the string node its text comes from. Raises ``WorkflowError`` when no sampler
    leads to one, or when several samplers lead to different ones (listing them).
    """
    side = "negative" if negative else "positive"
    samplers = sorted((i for i, n in workflow.items() if _is_sampler(n)), key=id_order)
    if not samplers:
        raise WorkflowError(
            "the workflow has no sampler (" + ", ".join(sorted(SAMPLER_TYPES)) + ") to take "
            f"a {side} prompt; set the text with --set NODE.text=..."
        )
    found: dict[TextTarget, list[str]] = {}
    stops: list[str] = []
    for sampler_id in samplers:
        entry = _conditioning_entry(workflow, sampler_id, negative)
        target = _trace(workflow, entry, set(), stops) if entry is not None else None
        if target is not None:
            found.setdefault(target, []).append(sampler_id)
    if not found:
        where = (
            f"; the conditioning stops at {_labels(workflow, dict.fromkeys(stops))}"
            if stops
            else ""
        )
        raise WorkflowError(
            f"no text encoder feeds the {side} input of {_labels(workflow, samplers)}{where}; "
            "set the text with --set NODE.text=..."
        )
    if len(found) > 1:
        lines = [
            f"{node_label(workflow, t.node_id)} feeds {_labels(workflow, s)} "
            f"(--set {t.node_id}.{t.inputs[0]}=...)"
            for t, s in found.items()
        ]
        raise WorkflowError(
            f"the samplers take their {side} prompt from different nodes: "
            + "; ".join(lines)
            + "; set each one with --set"
        )
    target = next(iter(found))
    if negative and target == _positive_or_none(workflow):
        raise WorkflowError(
            f"the negative conditioning comes from the positive prompt "
            f"({node_label(workflow, target.node_id)}); there is no negative prompt to set"
        )
    return target


def _positive_or_none(workflow: Workflow) -> TextTarget | None:
    try:
        return find_prompt(workflow)
    except WorkflowError:
        return None


def set_prompt(
    workflow: Workflow, text: str, *, node: str | None = None, negative: bool = False
) -> Workflow:
    """The workflow with its positive (``negative``) prompt set to ``text``.

    Without ``node`` the text encoder is found by ``find_prompt``; with it, ``node`` (an
    id, class_type or title) names the node whose text inputs take the text.
    """
    out = copy.deepcopy(workflow)
    if node is None:
        target = find_prompt(out, negative=negative)
    else:
        node_id = resolve_node(out, node)
        inputs = out[node_id]["inputs"]
        names = tuple(
            n
            for n in dict.fromkeys(_TEXT_INPUTS + _STRING_INPUTS)
            if isinstance(inputs.get(n), str)
        )
        if not names:
            raise WorkflowError(
                f"{node_label(out, node_id)} has no text input to take a prompt; "
                + _inputs_hint("text", inputs)
            )
        target = TextTarget(node_id, names)
    for name in target.inputs:
        out[target.node_id]["inputs"][name] = text
    return out


# --------------------------------------------------------------------------- --image


@dataclass(frozen=True)
class ImageArg:
    """``--image [NODE=]PATH``: the LoadImage node (id or title; ``None``: the only one)
    and the local file to upload."""

    node: str | None
    path: Path

    @classmethod
    def parse(cls, text: str) -> ImageArg:
        return parse_image_arg(text)


def parse_image_arg(text: str) -> ImageArg:
    """Parse ``--image PATH`` or ``--image NODE=PATH`` (``10=in.png``,
    ``"Reference image=in.png"``). A part before ``=`` that holds a path separator is part
    of the path, so a file whose name has ``=`` is given as ``./a=b.png``."""
    node, sep, path = text.partition("=")
    if not sep or "/" in node or "\\" in node:
        node, path = "", text
    elif not node.strip():
        raise WorkflowError(f"--image {text!r}: expected PATH or NODE=PATH")
    if not path:
        raise WorkflowError(f"--image {text!r}: expected PATH or NODE=PATH")
    return ImageArg(node.strip() or None, Path(path))


def set_image(
    workflow: Workflow, image: str | UploadedFile, *, node: str | None = None
) -> Workflow:
    """The workflow with an uploaded image wired into a LoadImage node's ``image`` input.

    ``image`` is the name ``/upload/image`` answered (an ``UploadedFile``, or its
    ``load_name``); a file uploaded as ``temp`` or ``output`` gets ComfyUI's annotation
    (``in.png [temp]``). Without ``node`` the workflow must have exactly one LoadImage; with
    several, ``node`` (id, title or class_type) names the one, or the error lists them.
    """
    out = copy.deepcopy(workflow)
    if isinstance(image, UploadedFile):
        name = image.load_name if image.type == "input" else f"{image.load_name} [{image.type}]"
    else:
        name = image
    if node is None:
        loaders = sorted(
            (i for i, n in out.items() if n.get("class_type") == LOAD_IMAGE), key=id_order
        )
        if not loaders:
            raise WorkflowError(
                "the workflow has no LoadImage node to take the image; add one, or name the "
                "node that takes it: --image NODE=PATH"
            )
        if len(loaders) > 1:
            raise WorkflowError(
                f"the workflow has {len(loaders)} LoadImage nodes: {_labels(out, loaders)}; "
                f"say which takes the image: --image {loaders[0]}=PATH (an id or a title)"
            )
        node_id = loaders[0]
    else:
        node_id = resolve_node(out, node)
    inputs = out[node_id]["inputs"]
    if "image" not in inputs:
        raise WorkflowError(
            f"{node_label(out, node_id)} has no 'image' input to take an uploaded image; "
            "name a LoadImage node"
        )
    if is_link(inputs["image"]):
        raise WorkflowError(
            f"{node_label(out, node_id)} takes its image from node {inputs['image'][0]}, not "
            "from a file; name a LoadImage node"
        )
    inputs["image"] = name
    return out


# --------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class SeedChange:
    """A seed ``randomize_seeds`` changed: ``node_id``'s ``input`` went from ``old`` to ``seed``."""

    node_id: str
    input: str
    old: int
    seed: int


def randomize_seeds(
    workflow: Workflow,
    rng: random.Random,
    fixed: Collection[tuple[str, str]] = (),
    *,
    object_info: Mapping[str, Any] | None = None,
) -> tuple[Workflow, list[SeedChange]]:
    """The workflow with a random value in every literal ``seed``/``noise_seed`` input not
    in ``fixed`` (the ``(node_id, input)`` pairs an override set), and what changed.

    Seeds are drawn from 0..0xffffffffffffffff, the range of KSampler's ``seed`` and
    RandomNoise's ``noise_seed``; with ``object_info`` (ComfyUI's ``/object_info``) each
    node's own declared min/max is used, for custom nodes with a narrower range. The API
    format does not keep the editor's "control after generate: fixed", hence ``fixed``.
    Linked seeds (from a seed node) are left alone.
    """
    out = copy.deepcopy(workflow)
    changes: list[SeedChange] = []
    for node_id in sorted(out, key=id_order):
        node = out[node_id]
        inputs = node["inputs"]
        for name in SEED_INPUTS:
            old = inputs.get(name)
            if not isinstance(old, int) or isinstance(old, bool) or (node_id, name) in fixed:
                continue
            low, high = _seed_range(object_info, str(node.get("class_type")), name)
            seed = rng.randint(low, high)
            inputs[name] = seed
            changes.append(SeedChange(node_id, name, old, seed))
    return out, changes


def _seed_range(
    object_info: Mapping[str, Any] | None, class_type: str, name: str
) -> tuple[int, int]:
    low, high = 0, SEED_MAX
    spec = _input_spec(object_info, class_type, name)
    options = spec[1] if spec is not None and len(spec) > 1 else None
    if isinstance(options, Mapping):
        if isinstance(options.get("min"), int):
            low = max(low, options["min"])
        if isinstance(options.get("max"), int):
            high = min(high, options["max"])
    return (low, high) if low <= high else (0, SEED_MAX)


def _input_spec(
    object_info: Mapping[str, Any] | None, class_type: str, name: str
) -> list[Any] | None:
    """``[type or choices, options]`` of one input in ``/object_info``, or ``None``."""
    info = object_info.get(class_type) if object_info else None
    groups = info.get("input") if isinstance(info, Mapping) else None
    if not isinstance(groups, Mapping):
        return None
    for group in ("required", "optional"):
        specs = groups.get(group)
        spec = specs.get(name) if isinstance(specs, Mapping) else None
        if isinstance(spec, list) and spec:
            return spec
    return None


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Prepared:
    """A workflow with its parameters applied: the seeds drawn, and the inputs the
    overrides set."""

    workflow: Workflow
    seeds: tuple[SeedChange, ...]
    fixed: frozenset[tuple[str, str]]


def apply_parameters(
    workflow: Workflow,
    *,
    prompt: str | None = None,
    images: Sequence[tuple[str | None, str | UploadedFile]] = (),
    overrides: Iterable[Override] = (),
    randomize: bool = True,
    rng: random.Random | None = None,
    object_info: Mapping[str, Any] | None = None,
) -> Prepared:
    """A job's parameters, in the one order the CLI, the API and the agent share: the
    prompt, then the uploaded images (``(node address or None, uploaded name)``), then the
    overrides (so ``--set 6.text=...`` wins over ``--prompt``), then random seeds for
    every seed no override set (``rng`` defaults to the system's entropy)."""
    out = workflow
    if prompt is not None:
        out = set_prompt(out, prompt)
    targets: set[str] = set()
    for node, image in images:
        out = set_image(out, image, node=node)
        node_id = resolve_node(out, node) if node is not None else _only_loader(out)
        if node_id in targets:
            raise WorkflowError(
                f"two images go to {node_label(out, node_id)}; give each --image its own node"
            )
        targets.add(node_id)
    out, fixed = apply_overrides(out, overrides)
    seeds: list[SeedChange] = []
    if randomize:
        out, seeds = randomize_seeds(
            out, rng or random.SystemRandom(), fixed, object_info=object_info
        )
    return Prepared(out, tuple(seeds), fixed)


def _only_loader(workflow: Workflow) -> str:
    return next(i for i, n in workflow.items() if n.get("class_type") == LOAD_IMAGE)


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class OutputText:
    """A text a node returned in its history outputs (PreviewAny's ``text``, a custom
    node's ``string``...): written to ``filename`` when outputs are saved."""

    node_id: str
    kind: str
    index: int
    text: str

    @property
    def filename(self) -> str:
        node = re.sub(r"[^A-Za-z0-9_-]", "_", self.node_id)
        kind = re.sub(r"[^A-Za-z0-9_-]", "_", self.kind)
        return f"node{node}_{kind}_{self.index + 1}.txt"


Output = OutputFile | OutputText


def collect_outputs(history_item: Mapping[str, Any]) -> list[Output]:
    """Every output of a history entry (``GET /history/{id}``, the entry or the
    ``{prompt_id: entry}`` answer), in node order: files of every kind (``images`` with
    animated WebP, VideoHelperSuite's ``gifs``, ``videos``, ``audio``, ``latents``,
    ``3d``...) as ``OutputFile`` for ``/view``, and strings (``text``, ``string``...) as
    ``OutputText``. A file listed twice is listed once. ``type == "temp"`` marks
    previews (PreviewImage), which are outputs too.
    """
    item: Any = history_item
    if "outputs" not in item and len(item) == 1:
        item = next(iter(item.values()))
    outputs = item.get("outputs") if isinstance(item, Mapping) else None
    if not isinstance(outputs, Mapping):
        return []
    files = PromptResult(prompt_id="", outputs=dict(outputs), messages=[]).files()
    by_node: dict[str, list[Output]] = {str(node_id): [] for node_id in outputs}
    seen: set[tuple[str, str, str]] = set()
    for file in files:
        key = (file.type, file.subfolder, file.filename)
        if key not in seen:
            seen.add(key)
            by_node[file.node_id].append(file)
    for node_id, kinds in outputs.items():
        if not isinstance(kinds, Mapping):
            continue
        for kind, entries in kinds.items():
            if not isinstance(entries, list):
                continue
            strings = [entry for entry in entries if isinstance(entry, str)]
            by_node[str(node_id)].extend(
                OutputText(str(node_id), str(kind), index, text)
                for index, text in enumerate(strings)
            )
    return [output for found in by_node.values() for output in found]


# --------------------------------------------------------------------------- validation

_ERROR_MESSAGES: Final = {
    "prompt_outputs_failed_validation": "Prompt outputs failed validation",
    "invalid_prompt": "invalid prompt",
    "prompt_no_outputs": "Prompt has no outputs",
    "no_prompt": "No prompt provided",
}
_CHOICES_SHOWN: Final = 20


def describe_validation(
    body: Mapping[str, Any] | ComfyValidationError,
    *,
    workflow: Workflow | None = None,
    object_info: Mapping[str, Any] | None = None,
) -> list[str]:
    """Readable lines from ComfyUI's answer to ``POST /prompt`` (the 400 body, a 200 body
    whose ``node_errors`` name dropped parts, or the ``ComfyValidationError`` the agent's
    client raised): a summary, then one line per error, such as
    ``node 3 (KSampler) input 'steps': 0 is below the minimum 1``.

    ``workflow`` adds node titles; ``object_info`` (``/object_info`` or
    ``/object_info/{class}``) lists the allowed values ComfyUI leaves out of a long
    ``Value not in list`` and suggests the closest ones.
    """
    if isinstance(body, ComfyValidationError):
        if not body.node_errors:
            return [line.strip() for line in str(body).splitlines() if line.strip()]
        message = _ERROR_MESSAGES.get(body.error_type, body.error_type)
        body = {
            "error": {"type": body.error_type, "message": message},
            "node_errors": body.node_errors,
        }
    node_errors = body.get("node_errors")
    node_errors = node_errors if isinstance(node_errors, Mapping) else {}
    if not node_errors:
        return [line.strip() for line in describe_validation_error(body).splitlines()]
    error = body.get("error")
    if isinstance(error, Mapping):
        head = f"ComfyUI refused the workflow: {error.get('message') or error.get('type')}"
    elif error:
        head = f"ComfyUI refused the workflow: {error}"
    else:
        head = "ComfyUI queued the workflow without the parts that failed validation:"
    lines = [head]
    for node_id in sorted(node_errors, key=lambda i: id_order(str(i))):
        entry = node_errors[node_id]
        if not isinstance(entry, Mapping):
            continue
        class_type = str(entry.get("class_type") or "?")
        if workflow is not None and str(node_id) in workflow:
            label = node_label(workflow, str(node_id))
        else:
            label = f"node {node_id} ({class_type})"
        errors = entry.get("errors")
        for item in errors if isinstance(errors, list) else []:
            if isinstance(item, Mapping):
                lines.append(_describe_node_error(label, class_type, item, object_info))
    return lines


def _describe_node_error(
    label: str, class_type: str, item: Mapping[str, Any], object_info: Mapping[str, Any] | None
) -> str:
    extra = item.get("extra_info")
    extra = extra if isinstance(extra, Mapping) else {}
    input_name = extra.get("input_name")
    where = f"{label} input {input_name!r}" if isinstance(input_name, str) else label
    details = str(item.get("details") or "")
    message = str(item.get("message") or item.get("type") or "error")
    config = extra.get("input_config")
    if not isinstance(config, list) and isinstance(input_name, str):
        # ComfyUI leaves long lists (scanned model files) out of its answer.
        config = _input_spec(object_info, class_type, input_name)
    expected = config[0] if isinstance(config, list) and config else None
    options = config[1] if isinstance(config, list) and len(config) > 1 else None
    options = options if isinstance(options, Mapping) else {}
    received = _show(extra.get("received_value"))
    text: str | None = None
    match item.get("type"):
        case "value_not_in_list":
            text = _not_in_list(extra.get("received_value"), expected, details)
        case "value_smaller_than_min" if "min" in options:
            text = f"{received} is below the minimum {options['min']}"
        case "value_bigger_than_max" if "max" in options:
            text = f"{received} is above the maximum {options['max']}"
        case "invalid_input_type" if expected is not None:
            why = extra.get("exception_message")
            text = f"{received} is not a valid {expected}" + (f" ({why})" if why else "")
        case "required_input_missing":
            kind = f" ({expected})" if isinstance(expected, str) else ""
            text = f"a required input{kind} is missing: connect it or give it a value"
        case "return_type_mismatch" if is_link(extra.get("linked_node")):
            source = extra["linked_node"]
            text = (
                f"is linked to node {source[0]} output {source[1]}, which gives "
                f"{extra.get('received_type')}; expected {expected}"
            )
        case "bad_linked_input":
            text = f"{received} is not a link [node_id, output_index]; {_LIST_VALUE_HINT}"
        case "custom_validation_failed" if details.startswith(f"{input_name} - "):
            # LoadImage: "image - Invalid image file: x.png".
            text = details[len(f"{input_name} - ") :]
        case "exception_during_validation" if extra.get("exception_type") == "KeyError":
            text = f"links to node {details}, which is not in the workflow"
    if text is None:
        text = f"{message}: {details}" if details else message
    return f"{where}: {text}"


def _show(value: object) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value, default=str)


def _not_in_list(received: object, expected: object, details: str) -> str:
    text = f"{_show(received)} is not an allowed value"
    if not isinstance(expected, list):
        length = re.search(r"\(list of length (\d+)\)", details)
        size = f" {length.group(1)}" if length else ""
        return f"{text}; expected one of the{size} values /object_info lists for it"
    choices = [str(choice) for choice in expected]
    close = difflib.get_close_matches(str(received), choices, n=3, cutoff=0.5)
    if close:
        text += " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
    shown = ", ".join(choices[:_CHOICES_SHOWN])
    more = f", ... ({len(choices)} in all)" if len(choices) > _CHOICES_SHOWN else ""
    return f"{text}; expected one of: {shown}{more}"

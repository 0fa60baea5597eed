"""A ComfyUI-compatible server for tests: ComfyUI 0.3.64's HTTP and WebSocket API, real nodes.

Built from ``shared/reference/comfyui-api.md`` on aiohttp, as ComfyUI itself is. It serves
``/system_stats`` (with VRAM figures), ``/object_info``, ``/prompt`` (ComfyUI's validation,
with its error shapes), ``/queue``, ``/history``, ``/view``, ``/upload/image``,
``/interrupt``, ``/free``, ``/features``, ``/models`` and ``/ws`` (the real message order,
``progress_state`` included, and binary preview frames of type 1 or, after a client's
``feature_flags``, type 4). Every route also answers under ``/api``. Prompts run one at a
time from a priority queue, with ComfyUI's "classic" cache (an identical prompt runs nothing
and reports the previous files), interrupts that take effect within one progress step, and
an in-memory history. The nodes (``sim/comfy_nodes.py``) really load, transform and save
images with Pillow; the model nodes list the workspace's ``models/`` folders and the
stand-in ``KSampler`` draws a deterministic picture.

As a process it starts like ComfyUI::

    python -m comfyfleet.sim.comfy --listen 127.0.0.1 --port 0 --base-directory DIR

and prints ``To see the GUI go to: http://127.0.0.1:PORT`` on stdout when it listens.
Fault options for supervision tests: ``--startup-delay S``, ``--crash-after S``,
``--fail-start``, ``--vram-used-fraction F``, ``--missing-nodes A,B``. ComfyUI's own
performance flags (``--use-sage-attention``, ``--lowvram``, ``--fast``...) are accepted and
ignored, so a supervisor can pass a profile's real command line. ``RunningComfySim`` runs
the same server in a background thread for in-process tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import heapq
import io
import itertools
import json
import logging
import mimetypes
import os
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from aiohttp import WSCloseCode, WSMsgType, web
from PIL import Image

from comfyfleet.sim.background import BackgroundApp, bind_loopback
from comfyfleet.sim.comfy_nodes import (
    MODEL_FOLDERS,
    ExecContext,
    ExtraModelPath,
    Folders,
    Interrupted,
    Node,
    NodeResult,
    NodeSettings,
    Preview,
    format_value,
    full_type_name,
    load_extra_model_paths,
    node_registry,
)

log = logging.getLogger("comfyfleet.sim.comfy")

COMFYUI_VERSION = "0.3.64"
GiB = 1 << 30
MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_FORCE_DOWNLOAD_TYPES = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}


@dataclass(frozen=True)
class ComfySimConfig:
    """How one simulated ComfyUI behaves. The CLI flags map onto these fields."""

    base_directory: Path
    input_directory: Path | None = None
    output_directory: Path | None = None
    temp_directory: Path | None = None
    user_directory: Path | None = None
    vram_total_bytes: int = 24 * GiB
    vram_used_fraction: float = 0.1
    gpu_name: str = "NVIDIA GeForce RTX 4090"
    cpu: bool = False  # --cpu: one "cpu" device whose "VRAM" is the RAM, as ComfyUI reports
    missing_nodes: frozenset[str] = frozenset()
    step_seconds: float = 0.0  # stand-in KSampler: seconds per sampling step
    preview_method: str = "none"
    cache: Literal["classic", "none"] = "classic"
    max_upload_size_mb: float = 100.0
    enable_cors_header: str | None = None
    disable_metadata: bool = False
    extra_model_paths: tuple[ExtraModelPath, ...] = ()
    argv: tuple[str, ...] = ()

    def folders(self) -> Folders:
        return Folders.create(
            self.base_directory,
            input=self.input_directory,
            output=self.output_directory,
            temp=self.temp_directory,
            user=self.user_directory,
            extra_model_paths=self.extra_model_paths,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
    )


# -- validation (execution.py validate_prompt / validate_inputs) ----------------------------


@dataclass
class Validation:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any]


_Validated = tuple[bool, list[dict[str, Any]], str]


def _error(type_: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


def _types_match(received: Any, expected: Any) -> bool:
    """``validate_node_input``: equal, ``*`` on either side, or comma lists that overlap."""
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    if "*" in got or "*" in want:
        return True
    return bool(got & want)


def _input_info(types: dict[str, dict[str, Any]], name: str) -> tuple[Any, str, dict[str, Any]]:
    for category in ("required", "optional"):
        spec = types.get(category, {}).get(name)
        if spec is not None:
            return spec[0], category, (spec[1] if len(spec) > 1 else {})
    raise KeyError(name)


class _Validator:
    def __init__(self, prompt: dict[str, Any], nodes: dict[str, Node], folders: Folders):
        self.prompt = prompt
        self.nodes = nodes
        self.folders = folders
        self.validated: dict[str, _Validated] = {}
        self._visiting: set[str] = set()

    def inputs(self, unique_id: str) -> _Validated:
        if unique_id in self.validated:
            return self.validated[unique_id]
        if unique_id in self._visiting:
            raise RuntimeError(f"Dependency cycle detected at node {unique_id}")
        self._visiting.add(unique_id)
        inputs = self.prompt[unique_id]["inputs"]
        node = self.nodes[self.prompt[unique_id]["class_type"]]
        types = node.input_types(self.folders)
        valid_inputs = [*types.get("required", {}), *types.get("optional", {})]
        errors: list[dict[str, Any]] = []
        valid = True
        for x in valid_inputs:
            input_type, category, extra = _input_info(types, x)
            if x not in inputs:
                if category == "required":
                    errors.append(
                        _error(
                            "required_input_missing",
                            "Required input is missing",
                            x,
                            input_name=x,
                        )
                    )
                continue
            val = inputs[x]
            info = [input_type, extra]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            x,
                            input_name=x,
                            input_config=info,
                            received_value=val,
                        )
                    )
                    continue
                o_id = val[0]
                o_class_type = self.prompt[o_id]["class_type"]
                received_type = self.nodes[o_class_type].return_types[val[1]]
                if not _types_match(received_type, input_type):
                    errors.append(
                        _error(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            f"{x}, received_type({received_type}) mismatch"
                            f" input_type({input_type})",
                            input_name=x,
                            input_config=info,
                            received_type=received_type,
                            linked_node=val,
                        )
                    )
                    continue
                try:
                    inner = self.inputs(o_id)
                except Exception as ex:
                    valid = False
                    self.validated[o_id] = (
                        False,
                        [
                            _error(
                                "exception_during_inner_validation",
                                "Exception when validating inner node",
                                str(ex),
                                input_name=x,
                                input_config=info,
                                exception_message=str(ex),
                                exception_type=full_type_name(ex),
                                traceback=traceback.format_tb(ex.__traceback__),
                                linked_node=val,
                            )
                        ],
                        o_id,
                    )
                    continue
                if inner[0] is False:
                    valid = False
                continue
            try:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                if input_type == "INT":
                    val = int(val)
                elif input_type == "FLOAT":
                    val = float(val)
                elif input_type == "STRING":
                    val = str(val)
                elif input_type == "BOOLEAN":
                    val = bool(val)
                inputs[x] = val
            except Exception as ex:
                errors.append(
                    _error(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {input_type} value",
                        f"{x}, {val}, {ex}",
                        input_name=x,
                        input_config=info,
                        received_value=val,
                        exception_message=str(ex),
                    )
                )
                continue
            if x in node.validated_inputs:
                continue
            if "min" in extra and val < extra["min"]:
                errors.append(
                    _error(
                        "value_smaller_than_min",
                        f"Value {val} smaller than min of {extra['min']}",
                        x,
                        input_name=x,
                        input_config=info,
                        received_value=val,
                    )
                )
                continue
            if "max" in extra and val > extra["max"]:
                errors.append(
                    _error(
                        "value_bigger_than_max",
                        f"Value {val} bigger than max of {extra['max']}",
                        x,
                        input_name=x,
                        input_config=info,
                        received_value=val,
                    )
                )
                continue
            if isinstance(input_type, list) and val not in input_type:
                # ComfyUI does not send back long lists (scanned model paths).
                if len(input_type) > 20:
                    list_info, config = f"(list of length {len(input_type)})", None
                else:
                    list_info, config = str(input_type), info
                errors.append(
                    _error(
                        "value_not_in_list",
                        "Value not in list",
                        f"{x}: '{val}' not in {list_info}",
                        input_name=x,
                        input_config=config,
                        received_value=val,
                    )
                )
                continue
        checked = {x: inputs[x] for x in node.validated_inputs if x in inputs}
        if checked:
            result = node.validate_inputs(self.folders, checked)
            if result is not True:
                for x in checked:
                    details = x if result is False else f"{x} - {result}"
                    errors.append(
                        _error(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            details,
                            input_name=x,
                        )
                    )
        self._visiting.discard(unique_id)
        ret: _Validated = (
            (False, errors, unique_id) if errors or valid is not True else (True, [], unique_id)
        )
        self.validated[unique_id] = ret
        return ret


def validate_prompt(
    prompt: dict[str, Any],
    nodes: dict[str, Node],
    folders: Folders,
    partial_execution_targets: list[str] | None = None,
) -> Validation:
    """ComfyUI's ``validate_prompt``; converts literal inputs in ``prompt`` in place."""
    outputs: list[str] = []
    for x, node in prompt.items():
        if "class_type" not in node:
            return Validation(
                False,
                _error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{x}'",
                ),
                [],
                {},
            )
        class_type = node["class_type"]
        cls = nodes.get(class_type) if isinstance(class_type, str) else None
        if cls is None:
            return Validation(
                False,
                _error(
                    "invalid_prompt",
                    f"Cannot execute because node {class_type} does not exist.",
                    f"Node ID '#{x}'",
                ),
                [],
                {},
            )
        if cls.output_node and (
            partial_execution_targets is None or x in partial_execution_targets
        ):
            outputs.append(x)
    if not outputs:
        return Validation(False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {})

    validator = _Validator(prompt, nodes, folders)
    good_outputs: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for o in outputs:
        try:
            valid, reasons, _ = validator.inputs(o)
        except Exception as ex:
            valid = False
            reasons = [
                _error(
                    "exception_during_validation",
                    "Exception when validating node",
                    str(ex),
                    exception_type=full_type_name(ex),
                    traceback=traceback.format_tb(ex.__traceback__),
                )
            ]
            validator.validated[o] = (False, reasons, o)
        if valid is True:
            good_outputs.append(o)
            continue
        failed.append((o, reasons))
        for node_id, (node_valid, node_reasons, _) in validator.validated.items():
            # Nodes downstream of an error are invalid without reasons of their own:
            # ComfyUI reports only the nodes that carry reasons.
            if node_valid is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(o)
    if not good_outputs:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        return Validation(
            False,
            _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
            [],
            node_errors,
        )
    return Validation(True, None, good_outputs, node_errors)


# -- queue, cache, progress ---------------------------------------------------------------


@dataclass
class QueueItem:
    """One queued prompt: ComfyUI's 5-tuple ``[number, prompt_id, prompt, extra_data, outputs]``."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]

    @property
    def client_id(self) -> str | None:
        cid = self.extra_data.get("client_id")
        return cid if isinstance(cid, str) else None


@dataclass
class _CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


@dataclass
class _Running:
    item: QueueItem
    last_node: str | None = None


class _ProgressState:
    """``comfy_execution.progress``: the per-prompt snapshot sent as ``progress_state``."""

    def __init__(self, prompt_id: str):
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        if node_id not in self.nodes:
            self.nodes[node_id] = {
                "value": 0,
                "max": 1,
                "state": "pending",
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
        return self.nodes[node_id]

    def start(self, node_id: str) -> None:
        self._entry(node_id).update(value=0.0, max=1.0, state="running")

    def update(self, node_id: str, value: float, total: float) -> None:
        self._entry(node_id).update(value=value, max=total, state="running")

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])

    def snapshot(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "nodes": {k: dict(v) for k, v in self.nodes.items() if v["state"] != "pending"},
        }


def _signatures(
    prompt: dict[str, Any], node_ids: Iterable[str], nodes: dict[str, Node], folders: Folders
) -> dict[str, str]:
    """Cache keys: class, IS_CHANGED and inputs, with linked inputs by their source's key."""
    memo: dict[str, str] = {}

    def sig(node_id: str) -> str:
        if node_id in memo:
            return memo[node_id]
        memo[node_id] = f"cycle:{uuid.uuid4()}"
        spec = prompt[node_id]
        node = nodes[spec["class_type"]]
        inputs = spec.get("inputs", {})
        changed = uuid.uuid4().hex if node.always_execute else node.changed_key(folders, inputs)
        parts: list[Any] = []
        for name in sorted(inputs):
            value = inputs[name]
            if _is_link(value) and value[0] in prompt:
                parts.append([name, "link", sig(value[0]), value[1]])
            else:
                parts.append([name, value])
        key = json.dumps([spec["class_type"], changed, parts], sort_keys=True, default=str)
        memo[node_id] = hashlib.sha256(key.encode()).hexdigest()
        return memo[node_id]

    return {n: sig(n) for n in node_ids}


def _reachable(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
    seen: list[str] = []
    stack = list(outputs)
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.append(node_id)
        for value in prompt[node_id].get("inputs", {}).values():
            if _is_link(value):
                stack.append(value[0])
    return seen


def _execution_order(
    prompt: dict[str, Any], outputs: list[str], cached: Callable[[str], bool]
) -> list[str]:
    """Dependencies first, output by output; cached dependencies are not staged."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in prompt[node_id].get("inputs", {}).values():
            if _is_link(value) and value[0] in prompt and not cached(value[0]):
                visit(value[0])
        order.append(node_id)

    for o in outputs:
        visit(o)
    return order


# -- the server -------------------------------------------------------------------------------


@dataclass
class _Client:
    sid: str
    ws: web.WebSocketResponse
    outbox: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    preview_metadata: bool = False


class ComfySim:
    """The state of one simulated ComfyUI: queue, history, cache, sockets; and its routes."""

    def __init__(self, config: ComfySimConfig):
        self.config = config
        self.folders = config.folders()
        self.nodes = node_registry(config.missing_nodes)
        self.settings = NodeSettings(
            step_seconds=config.step_seconds,
            previews=config.preview_method != "none",
            disable_metadata=config.disable_metadata,
        )
        self._number = 0
        self._seq = itertools.count()
        self._heap: list[tuple[float, str, int, QueueItem]] = []
        self._running: _Running | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, _CacheEntry] = {}
        self._sockets: dict[str, _Client] = {}
        self._interrupt = threading.Event()
        self._free_pending = False
        self._queue_changed: asyncio.Event | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self.prompts_executed = 0

    # lifecycle ----------------------------------------------------------------------------

    def prepare_folders(self) -> None:
        """Create input/output/user and start with an empty temp/, as ComfyUI does."""
        shutil.rmtree(self.folders.temp, ignore_errors=True)
        self.folders.ensure()

    async def start(self) -> None:
        self._queue_changed = asyncio.Event()
        if self._heap:
            self._queue_changed.set()
        self._worker_task = asyncio.create_task(self._worker(), name="comfy-sim-worker")

    async def stop(self) -> None:
        self._interrupt.set()
        if self._worker_task is not None:
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
        await self.close_sockets()
        shutil.rmtree(self.folders.temp, ignore_errors=True)

    def is_running(self) -> bool:
        """Whether a prompt is executing now."""
        return self._running is not None

    async def close_sockets(self) -> int:
        """Close every open ``/ws`` connection; returns how many there were."""
        clients = list(self._sockets.values())
        for client in clients:
            with contextlib.suppress(Exception):
                await client.ws.close(code=WSCloseCode.GOING_AWAY)
        return len(clients)

    # sending --------------------------------------------------------------------------------

    def _targets(self, sid: str | None) -> list[_Client]:
        if sid is None:
            return list(self._sockets.values())
        client = self._sockets.get(sid)
        return [client] if client is not None else []

    def _send(self, event: str, data: Any, sid: str | None) -> None:
        """Queue a JSON message for ``sid``, or for every socket when ``sid`` is None."""
        text = json.dumps({"type": event, "data": data})
        for client in self._targets(sid):
            client.outbox.put_nowait(text)

    def _queue_info(self) -> dict[str, Any]:
        remaining = len(self._heap) + (1 if self._running is not None else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    def _status_changed(self) -> None:
        self._send("status", {"status": self._queue_info()}, None)

    def _send_preview(
        self, preview: Preview, running: _Running, node_id: str, metadata: bool
    ) -> None:
        for client in self._targets(running.item.client_id):
            if client.preview_metadata != metadata:
                continue
            if metadata:
                meta = json.dumps(
                    {
                        "node_id": node_id,
                        "prompt_id": running.item.prompt_id,
                        "display_node_id": node_id,
                        "parent_node_id": None,
                        "real_node_id": node_id,
                        "image_type": "image/jpeg" if preview.fmt == "JPEG" else "image/png",
                    }
                ).encode()
                frame = struct.pack(">II", 4, len(meta)) + meta + preview.data
            else:
                frame = struct.pack(">II", 1, 1 if preview.fmt == "JPEG" else 2) + preview.data
            client.outbox.put_nowait(frame)

    # the queue --------------------------------------------------------------------------------

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, (item.number, item.prompt_id, next(self._seq), item))
        if self._queue_changed is not None:
            self._queue_changed.set()
        self._status_changed()

    def queue_snapshot(self) -> dict[str, list[Any]]:
        return {
            "queue_running": [self._running.item.as_list()] if self._running else [],
            "queue_pending": [entry[3].as_list() for entry in self._heap],
        }

    def delete_pending(self, prompt_id: str) -> bool:
        kept = [e for e in self._heap if e[1] != prompt_id]
        if len(kept) == len(self._heap):
            return False
        self._heap = kept
        heapq.heapify(self._heap)
        self._status_changed()
        return True

    def clear_pending(self) -> None:
        self._heap = []
        self._status_changed()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (any, or only ``prompt_id``); True if one was."""
        running = self._running
        if prompt_id and (running is None or running.item.prompt_id != prompt_id):
            log.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
            return False
        self._interrupt.set()
        return running is not None

    def history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        if prompt_id is not None:
            item = self._history.get(prompt_id)
            return {prompt_id: copy.deepcopy(item)} if item is not None else {}
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        out: dict[str, Any] = {}
        for i, (key, value) in enumerate(self._history.items()):
            if i >= offset:
                out[key] = value
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    async def _worker(self) -> None:
        assert self._queue_changed is not None
        while True:
            while not self._heap:
                self._apply_free()
                self._queue_changed.clear()
                await self._queue_changed.wait()
            item = heapq.heappop(self._heap)[3]
            running = _Running(item)
            self._running = running
            self._interrupt.clear()
            self._status_changed()
            started = time.perf_counter()
            try:
                entry = await self._execute(running)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a fault of the simulator itself: keep serving
                log.exception("the simulator failed to execute prompt %s", item.prompt_id)
                entry = self._history_entry(
                    item, {}, {}, "error", [["execution_error", {"exception_message": str(exc)}]]
                )
            self._history[item.prompt_id] = entry
            while len(self._history) > MAXIMUM_HISTORY_SIZE:
                self._history.pop(next(iter(self._history)))
            self._running = None
            self.prompts_executed += 1
            self._apply_free()
            self._status_changed()
            if item.client_id is not None:
                self._send("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)
            log.info("Prompt executed in %.2f seconds", time.perf_counter() - started)

    def _apply_free(self) -> None:
        if self._free_pending:
            self._free_pending = False
            self._cache = {}

    @staticmethod
    def _history_entry(
        item: QueueItem,
        outputs: dict[str, Any],
        meta: dict[str, Any],
        status: str,
        messages: list[list[Any]],
    ) -> dict[str, Any]:
        return {
            "prompt": item.as_list(),
            "outputs": outputs,
            "status": {
                "status_str": "success" if status == "success" else "error",
                "completed": status == "success",
                "messages": messages,
            },
            "meta": meta,
        }

    async def _execute(self, running: _Running) -> dict[str, Any]:
        item = running.item
        prompt, prompt_id, client_id = item.prompt, item.prompt_id, item.client_id
        messages: list[list[Any]] = []

        def add_message(event: str, data: dict[str, Any], broadcast: bool) -> None:
            messages.append([event, data])
            if client_id is not None or broadcast:
                self._send(event, data, client_id)

        add_message("execution_start", {"prompt_id": prompt_id, "timestamp": _now_ms()}, False)
        reachable = _reachable(prompt, item.outputs_to_execute)
        sigs = await asyncio.to_thread(_signatures, prompt, reachable, self.nodes, self.folders)
        use_cache = self.config.cache != "none"
        cached = {
            n: self._cache[sigs[n]]
            for n in prompt
            if n in sigs and use_cache and sigs[n] in self._cache
        }
        add_message(
            "execution_cached",
            {"nodes": list(cached), "prompt_id": prompt_id, "timestamp": _now_ms()},
            False,
        )
        progress = _ProgressState(prompt_id)
        results: dict[str, _CacheEntry] = dict(cached)
        ui_outputs: dict[str, Any] = {}
        executed: list[str] = []
        status = "success"
        loop = asyncio.get_running_loop()

        def send_progress_state() -> None:
            self._send("progress_state", progress.snapshot(), client_id)

        for node_id in _execution_order(prompt, item.outputs_to_execute, cached.__contains__):
            class_type = prompt[node_id]["class_type"]
            node = self.nodes[class_type]
            if node_id in cached:
                entry = cached[node_id]
                if entry.ui is not None:
                    ui_outputs[node_id] = entry.ui
                    if client_id is not None:
                        self._send(
                            "executed", self._executed(node_id, entry.ui, prompt_id), client_id
                        )
                progress.finish(node_id)
                send_progress_state()
                executed.append(node_id)
                continue
            progress.start(node_id)
            send_progress_state()
            running.last_node = node_id
            if client_id is not None:
                self._send(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                    client_id,
                )
            inputs: dict[str, Any] = {}
            try:
                inputs = self._gather_inputs(node_id, node, results, item)

                def on_progress(
                    value: float, total: float, preview: Preview | None, node_id: str = node_id
                ) -> None:
                    loop.call_soon_threadsafe(
                        self._on_progress, running, progress, node_id, value, total, preview
                    )

                ctx = ExecContext(
                    folders=self.folders,
                    settings=self.settings,
                    node_id=node_id,
                    prompt=prompt,
                    extra_pnginfo=item.extra_data.get("extra_pnginfo"),
                    interrupt=self._interrupt,
                    on_progress=on_progress,
                )
                result = await asyncio.to_thread(self._run_node, node, ctx, inputs)
            except Interrupted:
                log.info("Processing interrupted")
                add_message(
                    "execution_interrupted",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": class_type,
                        "executed": list(executed),
                        "timestamp": _now_ms(),
                    },
                    True,
                )
                status = "interrupted"
                break
            except Exception as exc:
                tb = traceback.format_tb(exc.__traceback__)
                log.error("!!! Exception during processing !!! %s", exc)
                log.error("%s", "".join(traceback.format_exception(exc)))
                add_message(
                    "execution_error",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": class_type,
                        "executed": list(executed),
                        "exception_message": f"{exc}\n",
                        "exception_type": full_type_name(exc),
                        "traceback": tb,
                        "current_inputs": {k: [format_value(v)] for k, v in inputs.items()},
                        "current_outputs": list(prompt),
                        "timestamp": _now_ms(),
                    },
                    False,
                )
                status = "error"
                break
            results[node_id] = _CacheEntry(result.outputs, result.ui)
            executed.append(node_id)
            if result.ui is not None:
                ui_outputs[node_id] = result.ui
                if client_id is not None:
                    self._send("executed", self._executed(node_id, result.ui, prompt_id), client_id)
            progress.finish(node_id)
            send_progress_state()
        if status == "success":
            add_message(
                "execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()}, False
            )
        if use_cache:
            # The classic cache keeps what this prompt computed and nothing older.
            self._cache = {sigs[n]: results[n] for n in results if n in sigs}
        meta = {
            n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
            for n in ui_outputs
        }
        return self._history_entry(item, ui_outputs, meta, status, messages)

    @staticmethod
    def _executed(node_id: str, ui: dict[str, Any], prompt_id: str) -> dict[str, Any]:
        return {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id}

    @staticmethod
    def _run_node(node: Node, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        ctx.check_interrupted()  # before_node_execution
        return node.run(ctx, inputs)

    def _gather_inputs(
        self, node_id: str, node: Node, results: dict[str, _CacheEntry], item: QueueItem
    ) -> dict[str, Any]:
        types = node.input_types(self.folders)
        declared = [*types.get("required", {}), *types.get("optional", {})]
        given = item.prompt[node_id].get("inputs", {})
        inputs: dict[str, Any] = {}
        for name in declared:
            if name not in given:
                continue
            value = given[name]
            if _is_link(value):
                inputs[name] = results[value[0]].outputs[int(value[1])]
            else:
                inputs[name] = value
        return inputs

    def _on_progress(
        self,
        running: _Running,
        progress: _ProgressState,
        node_id: str,
        value: float,
        total: float,
        preview: Preview | None,
    ) -> None:
        client_id = running.item.client_id
        progress.update(node_id, value, total)
        self._send("progress_state", progress.snapshot(), client_id)
        if preview is not None:
            self._send_preview(preview, running, node_id, metadata=True)
        self._send(
            "progress",
            {"value": value, "max": total, "prompt_id": running.item.prompt_id, "node": node_id},
            client_id,
        )
        if preview is not None:
            self._send_preview(preview, running, node_id, metadata=False)

    # information ------------------------------------------------------------------------------

    def system_stats(self) -> dict[str, Any]:
        page = os.sysconf("SC_PAGE_SIZE")
        ram_total = page * os.sysconf("SC_PHYS_PAGES")
        ram_free = page * os.sysconf("SC_AVPHYS_PAGES")
        device: dict[str, Any]
        if self.config.cpu:
            device = {"name": "cpu", "type": "cpu", "index": None}
            total = ram_total
        else:
            device = {
                "name": f"cuda:0 {self.config.gpu_name} : cudaMallocAsync",
                "type": "cuda",
                "index": 0,
            }
            total = self.config.vram_total_bytes
        used = int(total * self.config.vram_used_fraction)
        device.update(
            vram_total=total, vram_free=total - used, torch_vram_total=used, torch_vram_free=0
        )
        return {
            "system": {
                "os": os.name,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": COMFYUI_VERSION,
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95",
                "required_templates_version": "0.1.95",
                "python_version": sys.version,
                "pytorch_version": "2.14.1+cu130",
                "embedded_python": False,
                "argv": ["main.py", *self.config.argv],
            },
            "devices": [device],
        }

    def object_info(self, name: str | None = None) -> dict[str, Any]:
        if name is not None:
            node = self.nodes.get(name)
            return {name: node.info(self.folders)} if node is not None else {}
        return {n: node.info(self.folders) for n, node in self.nodes.items()}

    @property
    def max_upload_size(self) -> int:
        return int(self.config.max_upload_size_mb * 1024 * 1024)

    # HTTP handlers ---------------------------------------------------------------------------

    async def h_index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="<!doctype html><title>ComfyUI (comfyfleet simulator)</title>"
            "<p>ComfyUI-compatible API simulator. There is no frontend.</p>",
            content_type="text/html",
        )

    async def h_system_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.system_stats())

    async def h_features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"supports_preview_metadata": True, "max_upload_size": self.max_upload_size}
        )

    async def h_object_info(self, request: web.Request) -> web.StreamResponse:
        info = await asyncio.to_thread(self.object_info, request.match_info.get("node_class"))
        return web.json_response(info)

    async def h_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(list(MODEL_FOLDERS))

    async def h_models_folder(self, request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response(await asyncio.to_thread(self.folders.model_files, folder))

    async def h_embeddings(self, request: web.Request) -> web.StreamResponse:
        names = await asyncio.to_thread(self.folders.model_files, "embeddings")
        return web.json_response([os.path.splitext(n)[0] for n in names])

    async def h_get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._queue_info())

    async def h_post_prompt(self, request: web.Request) -> web.StreamResponse:
        log.info("got prompt")
        data = await request.json()  # malformed JSON: 500, as ComfyUI
        number: float
        if "number" in data:
            number = float(data["number"])
        else:
            number = self._number
            if data.get("front"):
                number = -number
            self._number += 1
        if "prompt" not in data:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        if not isinstance(data["prompt"], dict):
            raise TypeError("prompt must be an object")  # ComfyUI fails the same way: 500
        prompt = copy.deepcopy(data["prompt"])
        prompt_id = str(data.get("prompt_id", uuid.uuid4()))
        partial = data.get("partial_execution_targets")
        valid = await asyncio.to_thread(validate_prompt, prompt, self.nodes, self.folders, partial)
        extra_data = dict(data.get("extra_data", {}))
        if "client_id" in data:
            extra_data["client_id"] = data["client_id"]
        if not valid.ok:
            log.warning("invalid prompt: %s", valid.error)
            return web.json_response(
                {"error": valid.error, "node_errors": valid.node_errors}, status=400
            )
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            extra_data.pop(key, None)
        self.put(QueueItem(number, prompt_id, prompt, extra_data, valid.outputs))
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors}
        )

    async def h_get_queue(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.queue_snapshot())

    async def h_post_queue(self, request: web.Request) -> web.StreamResponse:
        data = await request.json()
        if data.get("clear"):
            self.clear_pending()
        for prompt_id in data.get("delete", []):
            self.delete_pending(prompt_id)
        return web.Response()

    async def h_get_history(self, request: web.Request) -> web.StreamResponse:
        max_items = request.query.get("max_items")
        offset = request.query.get("offset")
        return web.json_response(
            self.history(
                max_items=int(max_items) if max_items is not None else None,
                offset=int(offset) if offset is not None else -1,
            )
        )

    async def h_get_history_item(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.history(request.match_info["prompt_id"]))

    async def h_post_history(self, request: web.Request) -> web.StreamResponse:
        data = await request.json()
        if data.get("clear"):
            self._history.clear()
        for prompt_id in data.get("delete", []):
            self._history.pop(prompt_id, None)
        return web.Response()

    async def h_interrupt(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await request.json()
        except ValueError:
            data = {}
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        self.interrupt(str(prompt_id) if prompt_id else None)
        return web.Response()

    async def h_free(self, request: web.Request) -> web.StreamResponse:
        data = await request.json()
        if data.get("free_memory") or data.get("unload_models"):
            # Applied after the running prompt, or at once when idle (main.py's worker).
            self._free_pending = bool(data.get("free_memory")) or self._free_pending
            if self._running is None:
                self._apply_free()
        return web.Response()

    async def h_view(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        target = await asyncio.to_thread(_view_target, self.folders, query)
        if isinstance(target, int):
            return web.Response(status=target)
        path, filename = target
        headers = {"Content-Disposition": f'filename="{filename}"'}
        channel = query.get("channel", "")
        if "preview" in query or channel in ("rgb", "a"):
            body, content_type = await asyncio.to_thread(
                _converted_image, path, query.get("preview"), channel
            )
            return web.Response(body=body, content_type=content_type, headers=headers)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in _FORCE_DOWNLOAD_TYPES:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={**headers, "Content-Type": content_type})

    async def h_upload_image(self, request: web.Request) -> web.StreamResponse:
        post = await request.post()
        image = post.get("image")
        type_field = post.get("type")
        upload_type = type_field if isinstance(type_field, str) else "input"
        upload_dir = self.folders.directory_by_type(upload_type)
        if upload_dir is None or not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        subfolder_field = post.get("subfolder", "")
        subfolder = subfolder_field if isinstance(subfolder_field, str) else ""
        overwrite = post.get("overwrite") in ("true", "1")
        name = await asyncio.to_thread(
            _store_upload, image.file.read, str(upload_dir), subfolder, image.filename, overwrite
        )
        if name is None:
            return web.Response(status=400)
        return web.json_response({"name": name, "subfolder": subfolder, "type": upload_type})

    async def h_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_upload_size)
        await ws.prepare(request)
        sid = request.query.get("clientId", "") or uuid.uuid4().hex
        client = _Client(sid, ws)
        self._sockets[sid] = client  # a second socket with this id replaces the first
        client.outbox.put_nowait(
            json.dumps({"type": "status", "data": {"status": self._queue_info(), "sid": sid}})
        )
        running = self._running
        if running is not None and running.item.client_id == sid and running.last_node:
            client.outbox.put_nowait(
                json.dumps({"type": "executing", "data": {"node": running.last_node}})
            )
        writer = asyncio.create_task(self._ws_writer(client))
        try:
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    data = None
                if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                    flags = data.get("data")
                    client.preview_metadata = isinstance(flags, dict) and bool(
                        flags.get("supports_preview_metadata")
                    )
                    client.outbox.put_nowait(
                        json.dumps(
                            {
                                "type": "feature_flags",
                                "data": {
                                    "supports_preview_metadata": True,
                                    "max_upload_size": self.max_upload_size,
                                },
                            }
                        )
                    )
                first = False
        finally:
            if self._sockets.get(sid) is client:
                del self._sockets[sid]
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    @staticmethod
    async def _ws_writer(client: _Client) -> None:
        while True:
            message = await client.outbox.get()
            try:
                if isinstance(message, str):
                    await client.ws.send_str(message)
                else:
                    await client.ws.send_bytes(message)
            except (ConnectionError, RuntimeError):
                return


def _converted_image(path: str, preview: str | None, channel: str) -> tuple[bytes, str]:
    """``/view``'s re-encodings: ``preview=webp|jpeg[;quality]`` and ``channel=rgb|a``."""
    buf = io.BytesIO()
    with Image.open(path) as img:
        if preview is not None:
            parts = preview.split(";")
            fmt = parts[0]
            if fmt not in ("webp", "jpeg") or "a" in channel:
                fmt = "webp"
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            out = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img
            out.save(buf, format=fmt, quality=quality)
            return buf.getvalue(), f"image/{fmt}"
        if channel == "rgb":
            if img.mode == "RGBA":
                r, g, b, _ = img.split()
                out = Image.merge("RGB", (r, g, b))
            else:
                out = img.convert("RGB")
            out.save(buf, format="PNG")
        else:
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
            out.save(buf, format="PNG")
    return buf.getvalue(), "image/png"


def _view_target(folders: Folders, query: dict[str, str]) -> int | tuple[str, str]:
    """``/view``'s checks: the file's path and name, or the HTTP status to answer."""
    if "filename" not in query:
        return 404
    filename, base = folders.annotated(query["filename"])
    if not filename:
        return 400
    if filename[0] == "/" or ".." in filename:
        return 400
    if base is None:
        base = folders.directory_by_type(query.get("type", "output"))
    if base is None:
        return 400
    directory = str(base)
    if "subfolder" in query:
        full = os.path.join(directory, query["subfolder"])
        if os.path.commonpath((os.path.abspath(full), directory)) != directory:
            return 403
        directory = full
    filename = os.path.basename(filename)
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        return 404
    return path, filename


def _store_upload(
    read: Callable[[], bytes], upload_dir: str, subfolder: str, filename: str, overwrite: bool
) -> str | None:
    """Write an upload and return its stored name; None for a name outside ``upload_dir``.

    Without ``overwrite`` an existing name gets `` (1)``, `` (2)``..., unless its bytes are
    identical, in which case the existing file is the answer.
    """
    folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    path = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((upload_dir, path)) != upload_dir:
        return None
    data = read()
    os.makedirs(folder, exist_ok=True)
    if not overwrite:
        stem, ext = os.path.splitext(filename)
        digest = hashlib.sha256(data).digest()
        i = 1
        while os.path.exists(path):
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).digest() == digest:
                    return filename
            filename = f"{stem} ({i}){ext}"
            path = os.path.join(folder, filename)
            i += 1
    with open(path, "wb") as f:
        f.write(data)
    return filename


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _origin_only_middleware() -> Any:
    """ComfyUI's guard against browsers posting to loopback: Host and Origin must match."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host is not None and origin is not None:
            host_domain = host.lower()
            parsed = urllib.parse.urlparse(origin)
            origin_domain: str | None = parsed.netloc.lower()
            host_parsed = urllib.parse.urlsplit("//" + host_domain)
            loopback = host_parsed.hostname in _LOOPBACK_HOSTS
            host_cmp: str | None = host_domain
            if parsed.port is None:
                host_cmp = host_parsed.hostname
            if host_parsed.port is None:
                origin_domain = parsed.hostname
            if loopback and host_cmp and origin_domain and host_cmp != origin_domain:
                log.warning(
                    "WARNING: request with non matching host and origin %s != %s, returning 403",
                    host_cmp,
                    origin_domain,
                )
                return web.Response(status=403)
        if request.method == "OPTIONS":
            return web.Response()
        return await handler(request)

    return middleware


def _cors_middleware(allowed_origin: str) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        if not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = allowed_origin
            response.headers["Access-Control-Allow-Methods"] = (
                "POST, GET, DELETE, PUT, OPTIONS, PATCH"
            )
            response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
            response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    return middleware


def build_app(sim: ComfySim) -> web.Application:
    """The aiohttp application: every route at ``/path`` and ``/api/path``, as ComfyUI."""
    middleware = (
        _cors_middleware(sim.config.enable_cors_header)
        if sim.config.enable_cors_header
        else _origin_only_middleware()
    )
    app = web.Application(client_max_size=sim.max_upload_size, middlewares=[middleware])
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/ws", sim.h_ws),
        ("GET", "/system_stats", sim.h_system_stats),
        ("GET", "/features", sim.h_features),
        ("GET", "/object_info", sim.h_object_info),
        ("GET", "/object_info/{node_class}", sim.h_object_info),
        ("GET", "/models", sim.h_models),
        ("GET", "/models/{folder}", sim.h_models_folder),
        ("GET", "/embeddings", sim.h_embeddings),
        ("GET", "/prompt", sim.h_get_prompt),
        ("POST", "/prompt", sim.h_post_prompt),
        ("GET", "/queue", sim.h_get_queue),
        ("POST", "/queue", sim.h_post_queue),
        ("GET", "/history", sim.h_get_history),
        ("GET", "/history/{prompt_id}", sim.h_get_history_item),
        ("POST", "/history", sim.h_post_history),
        ("POST", "/interrupt", sim.h_interrupt),
        ("POST", "/free", sim.h_free),
        ("GET", "/view", sim.h_view),
        ("POST", "/upload/image", sim.h_upload_image),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    app.router.add_get("/", sim.h_index)

    async def on_startup(app: web.Application) -> None:
        await asyncio.to_thread(sim.prepare_folders)
        await sim.start()

    async def on_shutdown(app: web.Application) -> None:
        await sim.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app


# -- in-process runner ----------------------------------------------------------------------------


class RunningComfySim:
    """``ComfySim`` served from a background thread on 127.0.0.1; a context manager.

    ``url`` is ``http://127.0.0.1:PORT``; ``ws_url(client_id)`` the socket's address;
    ``sim`` the server's state (its ``folders``, its counters).
    """

    def __init__(self, config: ComfySimConfig, *, port: int = 0) -> None:
        self.sim = ComfySim(config)
        self._port = port
        self._server = BackgroundApp(
            lambda: build_app(self.sim), name="sim-comfy", what="the ComfyUI simulator"
        )
        self.url = ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1]) if self.url else 0

    @property
    def folders(self) -> Folders:
        return self.sim.folders

    def drop_websockets(self) -> int:
        """Close every open ``/ws`` connection now (a network blip); returns how many."""
        loop = self._server.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the ComfyUI simulator is not running")
        return asyncio.run_coroutine_threadsafe(self.sim.close_sockets(), loop).result(10)

    def ws_url(self, client_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?clientId={urllib.parse.quote(client_id)}"

    def __enter__(self) -> RunningComfySim:
        sock = bind_loopback(self._port)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server.start([sock])
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop()


# -- the process -------------------------------------------------------------------------

# ComfyUI flags that change nothing in a simulator, accepted so real command lines work.
_IGNORED_SWITCHES = (
    "--disable-auto-launch", "--auto-launch", "--dont-print-server", "--use-sage-attention",
    "--use-flash-attention", "--use-pytorch-cross-attention", "--use-split-cross-attention",
    "--use-quad-cross-attention", "--disable-xformers", "--force-fp16", "--force-fp32",
    "--fp16-vae", "--fp32-vae", "--bf16-vae", "--cpu-vae", "--fp16-unet", "--bf16-unet",
    "--fp32-unet", "--fp64-unet", "--fp8_e4m3fn-unet", "--fp8_e5m2-unet", "--fp8_e8m0fnu-unet",
    "--fp8_e4m3fn-text-enc", "--fp8_e5m2-text-enc", "--fp16-text-enc", "--fp32-text-enc",
    "--bf16-text-enc", "--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram",
    "--disable-smart-memory", "--deterministic", "--disable-all-custom-nodes",
    "--disable-api-nodes", "--multi-user", "--log-stdout", "--windows-standalone-build",
    "--disable-cuda-malloc", "--cuda-malloc", "--force-channels-last", "--disable-ipex-optimize",
    "--dont-upcast-attention", "--force-upcast-attention", "--supports-fp8-compute",
    "--async-offload", "--disable-mmap", "--mmap-torch-files", "--force-non-blocking",
    "--enable-compress-response-body", "--disable-async-offload",
)  # fmt: skip
_IGNORED_OPTIONS = (
    "--database-url", "--front-end-version", "--front-end-root",
    "--reserve-vram", "--cuda-device", "--default-device", "--directml",
    "--oneapi-device-selector", "--preview-size", "--cache-lru", "--default-hashing-function",
    "--tls-keyfile", "--tls-certfile", "--comfy-api-base",
)  # fmt: skip


_SIM_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--startup-delay", {"type": float, "default": 0.0, "metavar": "S",
                         "help": "sleep S seconds before listening"}),
    ("--crash-after", {"type": float, "default": None, "metavar": "S",
                       "help": "exit with code 1, abruptly, S seconds after listening"}),
    ("--fail-start", {"action": "store_true",
                      "help": "print a traceback to stderr and exit 1 at once"}),
    ("--vram-used-fraction", {"type": float, "default": 0.1, "metavar": "F",
                              "help": "fraction of VRAM reported in use (default 0.1)"}),
    ("--vram-total-gb", {"type": float, "default": 24.0, "metavar": "GB",
                         "help": "VRAM of the simulated GPU (default 24)"}),
    ("--missing-nodes", {"default": "", "metavar": "A,B",
                         "help": "node classes to leave out, as if their custom nodes failed"}),
    ("--step-seconds", {"type": float, "default": 0.0, "metavar": "S",
                        "help": "seconds per step of the stand-in KSampler"}),
    ("--drop-websockets-every", {"type": float, "default": None, "metavar": "S",
                                 "help": "close every open /ws connection each S seconds "
                                         "while a prompt runs (a flaky network)"}),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="comfyfleet sim comfy",
        description="A ComfyUI-compatible server (API of ComfyUI 0.3.64) for tests.",
    )
    p.add_argument("--listen", nargs="?", const="0.0.0.0,::", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--base-directory", type=Path, default=None)
    p.add_argument("--output-directory", type=Path, default=None)
    p.add_argument("--input-directory", type=Path, default=None)
    p.add_argument("--temp-directory", type=Path, default=None)
    p.add_argument("--user-directory", type=Path, default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument(
        "--preview-method", default="none", choices=["none", "auto", "latent2rgb", "taesd"]
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-classic", action="store_true")
    cache.add_argument("--cache-none", action="store_true")
    p.add_argument("--max-upload-size", type=float, default=100.0, metavar="MB")
    p.add_argument("--enable-cors-header", nargs="?", const="*", default=None, metavar="ORIGIN")
    p.add_argument("--disable-metadata", action="store_true")
    p.add_argument("--quick-test-for-ci", action="store_true")
    p.add_argument("--extra-model-paths-config", nargs="+", action="append", default=None)
    p.add_argument("--verbose", nargs="?", const="DEBUG", default="INFO")
    p.add_argument("--fast", nargs="*", default=None)
    p.add_argument("--whitelist-custom-nodes", nargs="*", default=None)
    for flag in _IGNORED_SWITCHES:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in _IGNORED_OPTIONS:
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    sim = p.add_argument_group("simulator")
    for flag, kwargs in _SIM_OPTIONS:
        sim.add_argument(flag, **kwargs)
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> ComfySimConfig:
    if not 0.0 <= args.vram_used_fraction <= 1.0:
        raise ValueError("--vram-used-fraction must be between 0 and 1")
    extra: list[ExtraModelPath] = []
    for group in args.extra_model_paths_config or []:
        for yaml_file in group:
            extra.extend(load_extra_model_paths(Path(yaml_file)))
    return ComfySimConfig(
        base_directory=args.base_directory or Path.cwd(),
        input_directory=args.input_directory,
        output_directory=args.output_directory,
        temp_directory=args.temp_directory,
        user_directory=args.user_directory,
        vram_total_bytes=int(args.vram_total_gb * GiB),
        vram_used_fraction=args.vram_used_fraction,
        cpu=args.cpu,
        missing_nodes=frozenset(n.strip() for n in args.missing_nodes.split(",") if n.strip()),
        step_seconds=args.step_seconds,
        preview_method=args.preview_method,
        cache="none" if args.cache_none else "classic",
        max_upload_size_mb=args.max_upload_size,
        enable_cors_header=args.enable_cors_header,
        disable_metadata=args.disable_metadata,
        extra_model_paths=tuple(extra),
        argv=tuple(argv),
    )


def _setup_logging() -> None:
    """INFO lines on stdout (``got prompt``...), warnings and errors on stderr."""
    logger = logging.getLogger("comfyfleet.sim.comfy")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _crash(seconds: float) -> None:
    sys.stdout.flush()
    sys.stderr.write(
        "Traceback (most recent call last):\n"
        '  File "main.py", line 1, in <module>\n'
        f"RuntimeError: simulated crash (--crash-after {seconds})\n"
    )
    sys.stderr.flush()
    os._exit(1)


async def _serve(
    config: ComfySimConfig,
    hosts: list[str],
    port: int,
    *,
    startup_delay: float,
    crash_after: float | None,
    quick_test: bool,
    drop_websockets_every: float | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if startup_delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), startup_delay)
        if stop.is_set():
            return 0
    sim = ComfySim(config)
    runner = web.AppRunner(build_app(sim), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        for host in hosts:
            site = web.TCPSite(runner, host, port)
            await site.start()
            port = port or int(runner.addresses[-1][1])
        print("Starting server\n", flush=True)
        for host in hosts:
            shown = f"[{host}]" if ":" in host else host
            print(f"To see the GUI go to: http://{shown}:{port}", flush=True)
        if quick_test:
            return 0
        if crash_after is not None:
            loop.call_later(crash_after, _crash, crash_after)
        dropper = None
        if drop_websockets_every is not None and drop_websockets_every > 0:
            dropper = asyncio.create_task(_drop_websockets(sim, drop_websockets_every, stop))
        await stop.wait()
        if dropper is not None:
            dropper.cancel()
        print("\nStopped server", flush=True)
        return 0
    finally:
        await runner.cleanup()


async def _drop_websockets(sim: ComfySim, every_s: float, stop: asyncio.Event) -> None:
    """Close the open sockets every ``every_s`` while a prompt runs; say so on stdout."""
    while not stop.is_set():
        await asyncio.sleep(every_s)
        if not sim.is_running():
            continue
        dropped = await sim.close_sockets()
        if dropped:
            print(f"[sim] dropped {dropped} websocket(s) (--drop-websockets-every)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator as ComfyUI's ``main.py`` would run; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.fail_start:
        sys.stderr.write(
            "Traceback (most recent call last):\n"
            '  File "main.py", line 1, in <module>\n'
            "RuntimeError: simulated start failure (--fail-start)\n"
        )
        sys.stderr.flush()
        return 1
    hosts = [h.strip() for h in args.listen.split(",") if h.strip()] or ["127.0.0.1"]
    refused = [h for h in hosts if h not in _LOOPBACK_HOSTS and not h.startswith("127.")]
    if refused:
        listed = ", ".join(refused)
        print(f"error: the simulator listens on loopback only, not {listed}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args, argv)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _setup_logging()
    return asyncio.run(
        _serve(
            config,
            hosts,
            args.port,
            startup_delay=args.startup_delay,
            crash_after=args.crash_after,
            quick_test=args.quick_test_for_ci,
            drop_websockets_every=args.drop_websockets_every,
        )
    )


__all__ = [
    "ComfySim",
    "ComfySimConfig",
    "QueueItem",
    "RunningComfySim",
    "Validation",
    "build_app",
    "build_parser",
    "main",
    "validate_prompt",
]

if __name__ == "__main__":
    sys.exit(main())

"""The nodes of the ComfyUI simulator (``sim/comfy.py``), and the workspace folders they read.

Each node publishes what ComfyUI's ``/object_info`` publishes for it (inputs with their
options, outputs, names, category) and runs synchronously in a worker thread, reporting
progress and honouring interrupts through an ``ExecContext``. Images travel as batches of
RGB Pillow images; the model types are small frozen records, because the stand-in sampler
only has to be deterministic (the same seed, prompt and model give the same pixels), not to
denoise anything. Shapes and behaviours follow ComfyUI 0.3.64 as recorded in
``shared/reference/comfyui-api.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mimetypes
import os
import random
import re
import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from PIL import Image, ImageDraw, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

MAX_RESOLUTION = 16384

MODEL_EXTENSIONS = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
)

# ComfyUI's model folder names, in its order, with the sub-folders of models/ that hold them
# (folder_paths.py): the legacy names clip and unet feed text_encoders and diffusion_models.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "configs": ("configs",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "embeddings": ("embeddings",),
    "diffusers": ("diffusers",),
    "vae_approx": ("vae_approx",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "gligen": ("gligen",),
    "upscale_models": ("upscale_models",),
    "custom_nodes": (),
    "hypernetworks": ("hypernetworks",),
    "photomaker": ("photomaker",),
    "classifiers": ("classifiers",),
    "model_patches": ("model_patches",),
    "audio_encoders": ("audio_encoders",),
}
_FOLDER_EXTENSIONS: dict[str, frozenset[str] | None] = {
    "configs": frozenset({".yaml"}),
    "custom_nodes": None,  # any file
    "classifiers": frozenset({""}),
    "diffusers": None,
}
# --output-directory also registers these output sub-folders as model folders (main.py).
_OUTPUT_MODEL_FOLDERS = {
    "checkpoints": "checkpoints",
    "text_encoders": "clip",
    "vae": "vae",
    "diffusion_models": "diffusion_models",
    "loras": "loras",
}


# Legacy folder names that ComfyUI maps when paths are added (folder_paths.map_legacy).
_LEGACY_FOLDER_NAMES = {"clip": "text_encoders", "unet": "diffusion_models"}


@dataclass(frozen=True)
class ExtraModelPath:
    """One folder from an ``extra_model_paths.yaml``; ``is_default`` ones are searched first."""

    folder: str
    path: Path
    is_default: bool = False


def load_extra_model_paths(yaml_file: Path) -> list[ExtraModelPath]:
    """Read ComfyUI's ``extra_model_paths.yaml`` format (``utils/extra_config.py``).

    Top-level keys are group names; each group has an optional ``base_path`` (relative to
    the YAML file's folder, with ``~`` and ``$VARS`` expanded), an optional ``is_default``,
    and ``folder_name: path`` entries, one path per line.
    """
    config = yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}
    yaml_dir = yaml_file.resolve().parent
    found: list[ExtraModelPath] = []
    for group in config.values():
        if not isinstance(group, dict):
            continue
        conf = dict(group)
        base_path: str | None = None
        if "base_path" in conf:
            base_path = os.path.expandvars(os.path.expanduser(str(conf.pop("base_path"))))
            if not os.path.isabs(base_path):
                base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
        is_default = bool(conf.pop("is_default", False))
        for folder, paths in conf.items():
            for line in str(paths).split("\n"):
                if not line:
                    continue
                if base_path:
                    full = os.path.join(base_path, line)
                elif not os.path.isabs(line):
                    full = os.path.abspath(os.path.join(yaml_dir, line))
                else:
                    full = line
                name = _LEGACY_FOLDER_NAMES.get(folder, folder)
                found.append(ExtraModelPath(name, Path(os.path.normpath(full)), is_default))
    return found


@dataclass(frozen=True)
class Folders:
    """The directories of one simulated ComfyUI: models/, input/, output/, temp/, user/."""

    base: Path
    input: Path
    output: Path
    temp: Path
    user: Path
    models_in_output: bool = False
    extra_model_paths: tuple[ExtraModelPath, ...] = ()

    @classmethod
    def create(
        cls,
        base: Path,
        *,
        input: Path | None = None,
        output: Path | None = None,
        temp: Path | None = None,
        user: Path | None = None,
        extra_model_paths: tuple[ExtraModelPath, ...] = (),
    ) -> Folders:
        base = base.resolve()
        return cls(
            base=base,
            input=(input or base / "input").resolve(),
            output=(output or base / "output").resolve(),
            # ComfyUI uses <--temp-directory>/temp, and <base>/temp by default.
            temp=((temp / "temp") if temp else base / "temp").resolve(),
            user=(user or base / "user").resolve(),
            models_in_output=output is not None,
            extra_model_paths=extra_model_paths,
        )

    def model_paths(self, folder: str) -> list[Path]:
        if folder == "custom_nodes":
            paths = [self.base / "custom_nodes"]
        else:
            paths = [self.base / "models" / sub for sub in MODEL_FOLDERS.get(folder, ())]
        if self.models_in_output and folder in _OUTPUT_MODEL_FOLDERS:
            paths.append(self.output / _OUTPUT_MODEL_FOLDERS[folder])
        extra = [e for e in self.extra_model_paths if e.folder == folder]
        first = [e.path for e in extra if e.is_default]
        return first + paths + [e.path for e in extra if not e.is_default]

    def model_files(self, folder: str) -> list[str]:
        """Relative file names in ``folder`` (all its directories, recursively), sorted."""
        extensions = _FOLDER_EXTENSIONS.get(folder, MODEL_EXTENSIONS)
        names: set[str] = set()
        for root in self.model_paths(folder):
            if not root.is_dir():
                continue
            for dirpath, _dirs, files in os.walk(root, followlinks=True):
                for f in files:
                    if extensions is not None and os.path.splitext(f)[1].lower() not in extensions:
                        continue
                    rel = os.path.relpath(os.path.join(dirpath, f), root)
                    names.add(rel.replace(os.sep, "/"))
        return sorted(names)

    def model_path(self, folder: str, name: str) -> Path:
        """The file behind a combo value, as ``get_full_path_or_raise`` finds it."""
        for root in self.model_paths(folder):
            candidate = (root / name).resolve()
            if candidate.is_relative_to(root.resolve()) and candidate.is_file():
                return candidate
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")

    def directory_by_type(self, type_name: str) -> Path | None:
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(type_name)

    def annotated(self, name: str) -> tuple[str, Path | None]:
        """Split a ``"file.png [output]"`` annotation off a file name (folder_paths.py)."""
        for suffix, directory in (
            ("[output]", self.output),
            ("[input]", self.input),
            ("[temp]", self.temp),
        ):
            if name.endswith(suffix):
                return name[: -len(suffix) - 1], directory
        return name, None

    def annotated_path(self, name: str) -> Path:
        name, directory = self.annotated(name)
        return (directory or self.input) / name

    def input_images(self) -> list[str]:
        """LoadImage's combo: image files directly in input/, sorted."""
        if not self.input.is_dir():
            return []
        names = []
        for entry in os.scandir(self.input):
            if entry.is_file():
                kind = mimetypes.guess_type(entry.name)[0] or ""
                if kind.startswith("image/"):
                    names.append(entry.name)
        return sorted(names)

    def ensure(self) -> None:
        for d in (self.input, self.output, self.temp, self.user):
            d.mkdir(parents=True, exist_ok=True)


# -- values that travel between nodes ---------------------------------------------------


@dataclass
class ImageBatch:
    """IMAGE: a batch of RGB images of one size."""

    images: list[Image.Image]

    def __str__(self) -> str:
        w, h = self.images[0].size if self.images else (0, 0)
        return f"IMAGE batch of {len(self.images)}, {w}x{h}"


@dataclass
class MaskBatch:
    """MASK: a batch of single-channel images, 255 where masked."""

    masks: list[Image.Image]

    def __str__(self) -> str:
        w, h = self.masks[0].size if self.masks else (0, 0)
        return f"MASK batch of {len(self.masks)}, {w}x{h}"


@dataclass(frozen=True)
class ModelRef:
    """MODEL: the diffusion model a loader named, with the LoRAs applied to it."""

    name: str
    loras: tuple[tuple[str, float], ...] = ()

    def key(self) -> str:
        return json.dumps([self.name, self.loras])


@dataclass(frozen=True)
class ClipRef:
    """CLIP: a text encoder, with the LoRAs applied to it."""

    name: str
    kind: str = "stable_diffusion"
    loras: tuple[tuple[str, float], ...] = ()

    def key(self) -> str:
        return json.dumps([self.name, self.kind, self.loras])


@dataclass(frozen=True)
class VaeRef:
    """VAE."""

    name: str


@dataclass(frozen=True)
class ControlNetRef:
    """CONTROL_NET."""

    name: str


@dataclass(frozen=True)
class Conditioning:
    """CONDITIONING: an encoded prompt."""

    text: str
    clip: str


@dataclass
class Latent:
    """LATENT: pixel size and batch, and the pixels a sampler or VAEEncode put in it."""

    width: int
    height: int
    batch_size: int
    images: list[Image.Image] | None = None

    def __str__(self) -> str:
        return f"LATENT {self.batch_size}x{self.width}x{self.height}"


# -- execution context ---------------------------------------------------------------------


class Interrupted(Exception):
    """ComfyUI's ``InterruptProcessingException``: the running prompt was interrupted."""


@dataclass(frozen=True)
class Preview:
    """A preview image already encoded (ComfyUI's ``("JPEG", image, max_size)``)."""

    fmt: str  # "JPEG" or "PNG"
    data: bytes


@dataclass(frozen=True)
class NodeSettings:
    """Server-wide options the nodes read."""

    step_seconds: float = 0.0  # stand-in KSampler: seconds per step
    previews: bool = False  # --preview-method other than none: sampler previews
    disable_metadata: bool = False  # --disable-metadata


ProgressSink = Callable[[float, float, Preview | None], None]


@dataclass
class ExecContext:
    """What a running node may use: folders, its prompt, progress, interrupt checks."""

    folders: Folders
    settings: NodeSettings
    node_id: str
    prompt: dict[str, Any]
    extra_pnginfo: Any
    interrupt: threading.Event
    on_progress: ProgressSink

    def check_interrupted(self) -> None:
        if self.interrupt.is_set():
            raise Interrupted("Processing interrupted")

    def progress(
        self, value: float, total: float, preview: Image.Image | None = None, max_size: int = 512
    ) -> None:
        """``ProgressBar.update_absolute``: raise if interrupted, else report the step."""
        self.check_interrupted()
        encoded = None
        if preview is not None:
            img = ImageOps.contain(preview.convert("RGB"), (max_size, max_size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            encoded = Preview("JPEG", buf.getvalue())
        self.on_progress(value, total, encoded)

    def sleep(self, seconds: float) -> None:
        """Wait, waking at once when the prompt is interrupted."""
        if seconds > 0 and self.interrupt.wait(seconds):
            raise Interrupted("Processing interrupted")
        self.check_interrupted()


@dataclass
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, list[Any]] | None = None


InputTypes = dict[str, dict[str, Any]]


class Node:
    """One node class: its ``/object_info`` entry, its validation and its function."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    category: ClassVar[str]
    description: ClassVar[str] = ""
    python_module: ClassVar[str] = "nodes"
    return_types: ClassVar[tuple[str, ...]] = ()
    return_names: ClassVar[tuple[str, ...] | None] = None
    output_tooltips: ClassVar[tuple[str, ...] | None] = None
    output_node: ClassVar[bool] = False
    # The inputs VALIDATE_INPUTS takes: they skip the min/max/combo checks (execution.py).
    validated_inputs: ClassVar[tuple[str, ...]] = ()
    # IS_CHANGED returns NaN: never served from the cache.
    always_execute: ClassVar[bool] = False

    def input_types(self, folders: Folders) -> InputTypes:
        raise NotImplementedError

    def validate_inputs(self, folders: Folders, inputs: dict[str, Any]) -> bool | str:
        return True

    def changed_key(self, folders: Folders, inputs: dict[str, Any]) -> str:
        """IS_CHANGED: extra cache key (LoadImage hashes its file)."""
        return ""

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        raise NotImplementedError

    def info(self, folders: Folders) -> dict[str, Any]:
        """The node's ``/object_info`` entry, in ComfyUI's key order."""
        types = self.input_types(folders)
        out: dict[str, Any] = {
            "input": types,
            "input_order": {section: list(spec) for section, spec in types.items()},
            "output": list(self.return_types),
            "output_is_list": [False] * len(self.return_types),
            "output_name": list(self.return_names or self.return_types),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.output_tooltips is not None:
            out["output_tooltips"] = list(self.output_tooltips)
        return out


# -- helpers ---------------------------------------------------------------------------------


def save_image_path(
    filename_prefix: str, output_dir: Path, width: int, height: int
) -> tuple[Path, str, int, str]:
    """``folder_paths.get_save_image_path``: folder, base name, next counter, subfolder."""
    now = time.localtime()
    for var, value in (
        ("%width%", str(width)),
        ("%height%", str(height)),
        ("%year%", str(now.tm_year)),
        ("%month%", f"{now.tm_mon:02}"),
        ("%day%", f"{now.tm_mday:02}"),
        ("%hour%", f"{now.tm_hour:02}"),
        ("%minute%", f"{now.tm_min:02}"),
        ("%second%", f"{now.tm_sec:02}"),
    ):
        filename_prefix = filename_prefix.replace(var, value)
    norm = os.path.normpath(filename_prefix)
    subfolder = os.path.dirname(norm)
    filename = os.path.basename(norm)
    full_output_folder = Path(os.path.abspath(os.path.join(output_dir, subfolder)))
    if os.path.commonpath((str(output_dir), str(full_output_folder))) != str(output_dir):
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {full_output_folder}\n         output_dir: {output_dir}"
        )
    counter = 1
    prefix_len = len(filename)
    if full_output_folder.is_dir():
        for existing in os.listdir(full_output_folder):
            head = existing[: prefix_len + 1]
            if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
                continue
            try:
                digits = int(existing[prefix_len + 1 :].split("_")[0])
            except ValueError:
                digits = 0
            counter = max(counter, digits + 1)
    else:
        full_output_folder.mkdir(parents=True, exist_ok=True)
    return full_output_folder, filename, counter, subfolder


def _png_metadata(ctx: ExecContext) -> PngInfo | None:
    if ctx.settings.disable_metadata:
        return None
    meta = PngInfo()
    meta.add_text("prompt", json.dumps(ctx.prompt))
    if isinstance(ctx.extra_pnginfo, dict):
        for key, value in ctx.extra_pnginfo.items():
            meta.add_text(key, json.dumps(value))
    return meta


def _require_images(value: Any, input_name: str) -> ImageBatch:
    if not isinstance(value, ImageBatch) or not value.images:
        raise TypeError(f"{input_name} must be an IMAGE, got {type(value).__name__}")
    return value


def render_sample(width: int, height: int, key: str) -> Image.Image:
    """The stand-in sampler's picture: a gradient and shapes drawn from ``key``'s hash."""
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    c1 = tuple(rng.randrange(256) for _ in range(3))
    c2 = tuple(rng.randrange(256) for _ in range(3))
    gradient = Image.linear_gradient("L").rotate(rng.randrange(360)).resize((width, height))
    img = ImageOps.colorize(gradient, c1, c2).convert("RGB")
    draw = ImageDraw.Draw(img)
    smallest = max(2, min(width, height))
    for _ in range(rng.randint(3, 9)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(1, max(2, smallest // 3))
        fill = tuple(rng.randrange(256) for _ in range(3))
        box = (x - r, y - r, x + r, y + r)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    return img


_UPSCALE_METHODS = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """``comfy.utils.common_upscale``'s "center" crop to the target aspect."""
    old_w, old_h = img.size
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return img.crop((x, y, old_w - x, old_h - y))


# -- image nodes (Pillow) ------------------------------------------------------------------


class LoadImage(Node):
    name = "LoadImage"
    display_name = "Load Image"
    category = "image"
    return_types = ("IMAGE", "MASK")
    validated_inputs = ("image",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {"required": {"image": [folders.input_images(), {"image_upload": True}]}}

    def validate_inputs(self, folders: Folders, inputs: dict[str, Any]) -> bool | str:
        image = inputs.get("image")
        if not isinstance(image, str) or not folders.annotated_path(image).is_file():
            return f"Invalid image file: {image}"
        return True

    def changed_key(self, folders: Folders, inputs: dict[str, Any]) -> str:
        path = folders.annotated_path(str(inputs.get("image")))
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        path = ctx.folders.annotated_path(str(inputs["image"]))
        images: list[Image.Image] = []
        masks: list[Image.Image] = []
        with Image.open(path) as img:
            for frame in ImageSequence.Iterator(img):
                frame = ImageOps.exif_transpose(frame)
                rgb = frame.convert("RGB")
                if images and rgb.size != images[0].size:
                    continue
                if "A" in frame.getbands():
                    mask = ImageOps.invert(frame.getchannel("A"))
                elif frame.mode == "P" and "transparency" in frame.info:
                    mask = ImageOps.invert(frame.convert("RGBA").getchannel("A"))
                else:
                    mask = Image.new("L", (64, 64), 0)
                images.append(rgb)
                masks.append(mask)
            if len(images) > 1 and img.format == "MPO":
                images, masks = images[:1], masks[:1]
        return NodeResult((ImageBatch(images), MaskBatch(masks)))


class ImageInvert(Node):
    name = "ImageInvert"
    display_name = "Invert Image"
    category = "image"
    return_types = ("IMAGE",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {"required": {"image": ["IMAGE"]}}

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        batch = _require_images(inputs["image"], "image")
        return NodeResult((ImageBatch([ImageOps.invert(i) for i in batch.images]),))


class ImageScale(Node):
    name = "ImageScale"
    display_name = "Upscale Image"
    category = "image/upscaling"
    return_types = ("IMAGE",)

    def input_types(self, folders: Folders) -> InputTypes:
        size = {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {
            "required": {
                "image": ["IMAGE"],
                "upscale_method": [list(_UPSCALE_METHODS)],
                "width": ["INT", dict(size)],
                "height": ["INT", dict(size)],
                "crop": [["disabled", "center"]],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        batch = _require_images(inputs["image"], "image")
        width, height = int(inputs["width"]), int(inputs["height"])
        if width == 0 and height == 0:
            return NodeResult((batch,))
        src_w, src_h = batch.images[0].size
        if width == 0:
            width = max(1, round(src_w * height / src_h))
        elif height == 0:
            height = max(1, round(src_h * width / src_w))
        method = _UPSCALE_METHODS[str(inputs["upscale_method"])]
        out = []
        for img in batch.images:
            if inputs["crop"] == "center":
                img = _center_crop(img, width, height)
            out.append(img.resize((width, height), method))
        return NodeResult((ImageBatch(out),))


class EmptyImage(Node):
    name = "EmptyImage"
    display_name = "EmptyImage"
    category = "image"
    return_types = ("IMAGE",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "width": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
                "height": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
                "color": [
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"},
                ],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        color = int(inputs["color"])
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        size = (int(inputs["width"]), int(inputs["height"]))
        return NodeResult(
            (ImageBatch([Image.new("RGB", size, rgb) for _ in range(int(inputs["batch_size"]))]),)
        )


class SaveImage(Node):
    name = "SaveImage"
    display_name = "Save Image"
    category = "image"
    description = "Saves the input images to your ComfyUI output directory."
    output_node = True
    folder_type: ClassVar[str] = "output"
    compress_level: ClassVar[int] = 4

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "images": ["IMAGE", {"tooltip": "The images to save."}],
                "filename_prefix": [
                    "STRING",
                    {
                        "default": "ComfyUI",
                        "tooltip": "The prefix for the file to save. This may include formatting"
                        " information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to"
                        " include values from nodes.",
                    },
                ],
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def _prefix(self, inputs: dict[str, Any]) -> str:
        return str(inputs["filename_prefix"])

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        batch = _require_images(inputs["images"], "images")
        out_dir = ctx.folders.directory_by_type(self.folder_type)
        assert out_dir is not None
        width, height = batch.images[0].size
        folder, filename, counter, subfolder = save_image_path(
            self._prefix(inputs), out_dir, width, height
        )
        meta = _png_metadata(ctx)
        results = []
        for number, img in enumerate(batch.images):
            name = f"{filename.replace('%batch_num%', str(number))}_{counter:05}_.png"
            img.save(folder / name, pnginfo=meta, compress_level=self.compress_level)
            results.append({"filename": name, "subfolder": subfolder, "type": self.folder_type})
            counter += 1
        return NodeResult((), {"images": results})


class PreviewImage(SaveImage):
    name = "PreviewImage"
    display_name = "Preview Image"
    folder_type = "temp"
    compress_level = 1

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {"images": ["IMAGE"]},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def _prefix(self, inputs: dict[str, Any]) -> str:
        suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
        return f"ComfyUI_temp_{suffix}"


class SaveAnimatedWEBP(Node):
    name = "SaveAnimatedWEBP"
    display_name = "SaveAnimatedWEBP"
    category = "image/animation"
    python_module = "comfy_extras.nodes_images"
    output_node = True
    methods: ClassVar[dict[str, int]] = {"default": 4, "fastest": 0, "slowest": 6}

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "images": ["IMAGE"],
                "filename_prefix": ["STRING", {"default": "ComfyUI"}],
                "fps": ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
                "lossless": ["BOOLEAN", {"default": True}],
                "quality": ["INT", {"default": 80, "min": 0, "max": 100}],
                "method": [list(self.methods)],
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        batch = _require_images(inputs["images"], "images")
        width, height = batch.images[0].size
        folder, filename, counter, subfolder = save_image_path(
            str(inputs["filename_prefix"]), ctx.folders.output, width, height
        )
        first = batch.images[0]
        exif = first.getexif()
        if not ctx.settings.disable_metadata:
            exif[0x0110] = f"prompt:{json.dumps(ctx.prompt)}"
            if isinstance(ctx.extra_pnginfo, dict):
                tag = 0x010F
                for key, value in ctx.extra_pnginfo.items():
                    exif[tag] = f"{key}:{json.dumps(value)}"
                    tag -= 1
        name = f"{filename}_{counter:05}_.webp"
        first.save(
            folder / name,
            save_all=True,
            duration=int(1000.0 / float(inputs["fps"])),
            append_images=batch.images[1:],
            exif=exif,
            lossless=bool(inputs["lossless"]),
            quality=int(inputs["quality"]),
            method=self.methods[str(inputs["method"])],
        )
        animated = len(batch.images) != 1
        return NodeResult(
            (),
            {
                "images": [{"filename": name, "subfolder": subfolder, "type": "output"}],
                "animated": [animated],
            },
        )


class VideoCombine(Node):
    """VHS_VideoCombine (Video Helper Suite): frames to an animation, reported under ``gifs``.

    Only the formats Pillow writes (GIF, WebP); the ffmpeg video formats are not offered.
    """

    name = "VHS_VideoCombine"
    display_name = "Video Combine 🎥🅥🅗🅢"
    category = "Video Helper Suite 🎥🅥🅗🅢"
    python_module = "custom_nodes.comfyui-videohelpersuite"
    return_types = ("VHS_FILENAMES",)
    return_names = ("Filenames",)
    output_node = True
    formats: ClassVar[dict[str, str]] = {"image/gif": "GIF", "image/webp": "WEBP"}

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "images": ["IMAGE"],
                "frame_rate": ["FLOAT", {"default": 8, "min": 1, "step": 1}],
                "loop_count": ["INT", {"default": 0, "min": 0, "max": 100, "step": 1}],
                "filename_prefix": ["STRING", {"default": "AnimateDiff"}],
                "format": [list(self.formats)],
                "pingpong": ["BOOLEAN", {"default": False}],
                "save_output": ["BOOLEAN", {"default": True}],
            },
            "optional": {"vae": ["VAE"]},
            "hidden": {
                "prompt": "PROMPT",
                "extra_pnginfo": "EXTRA_PNGINFO",
                "unique_id": "UNIQUE_ID",
            },
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        batch = _require_images(inputs["images"], "images")
        frames = list(batch.images)
        if inputs["pingpong"]:
            frames += frames[-2:0:-1]
        save_output = bool(inputs["save_output"])
        out_dir = ctx.folders.output if save_output else ctx.folders.temp
        width, height = frames[0].size
        folder, filename, _, subfolder = save_image_path(
            str(inputs["filename_prefix"]), out_dir, width, height
        )
        # VHS numbers its files itself: highest "<name>_<digits>.*" plus one.
        matcher = re.compile(rf"{re.escape(filename)}_(\d+)\D*\..+", re.IGNORECASE)
        counter = 1 + max(
            (int(m.group(1)) for f in os.listdir(folder) if (m := matcher.fullmatch(f))),
            default=0,
        )
        first_png = f"{filename}_{counter:05}.png"
        frames[0].save(folder / first_png, pnginfo=_png_metadata(ctx), compress_level=4)
        fmt = str(inputs["format"])
        name = f"{filename}_{counter:05}.{fmt.split('/')[1]}"
        frame_rate = float(inputs["frame_rate"])
        frames[0].save(
            folder / name,
            format=self.formats[fmt],
            save_all=True,
            append_images=frames[1:],
            duration=round(1000 / frame_rate),
            loop=int(inputs["loop_count"]),
        )
        preview = {
            "filename": name,
            "subfolder": subfolder,
            "type": "output" if save_output else "temp",
            "format": fmt,
            "frame_rate": frame_rate,
            "workflow": first_png,
            "fullpath": str(folder / name),
        }
        files = [str(folder / first_png), str(folder / name)]
        return NodeResult(((save_output, files),), {"gifs": [preview]})


class PreviewAny(Node):
    name = "PreviewAny"
    display_name = "Preview Any"
    category = "utils"
    python_module = "comfy_extras.nodes_preview_any"
    output_node = True

    def input_types(self, folders: Folders) -> InputTypes:
        return {"required": {"source": ["*", {}]}}

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        source = inputs.get("source")
        value = "None"
        if isinstance(source, str):
            value = source
        elif isinstance(source, int | float | bool):
            value = str(source)
        elif source is not None:
            try:
                value = json.dumps(source)
            except (TypeError, ValueError):
                value = str(source)
        return NodeResult((), {"text": [value]})


class PrimitiveString(Node):
    name = "PrimitiveString"
    display_name = "String"
    category = "utils/primitive"
    python_module = "comfy_extras.nodes_primitive"
    return_types = ("STRING",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {"required": {"value": ["STRING", {}]}}

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        return NodeResult((str(inputs["value"]),))


# -- stand-in model nodes ----------------------------------------------------------------------

KSAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis",
    "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
SCHEDULER_NAMES = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
]  # fmt: skip
CLIP_TYPES = [
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart",
    "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image",
    "hunyuan_image",
]  # fmt: skip


class CheckpointLoaderSimple(Node):
    name = "CheckpointLoaderSimple"
    display_name = "Load Checkpoint"
    category = "loaders"
    description = (
        "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    )
    return_types = ("MODEL", "CLIP", "VAE")
    output_tooltips = (
        "The model used for denoising latents.",
        "The CLIP model used for encoding text prompts.",
        "The VAE model used for encoding and decoding images to and from latent space.",
    )

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "ckpt_name": [
                    folders.model_files("checkpoints"),
                    {"tooltip": "The name of the checkpoint (model) to load."},
                ]
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        name = str(inputs["ckpt_name"])
        ctx.folders.model_path("checkpoints", name)
        return NodeResult((ModelRef(name), ClipRef(name), VaeRef(name)))


class LoraLoader(Node):
    name = "LoraLoader"
    display_name = "Load LoRA"
    category = "loaders"
    description = (
        "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents"
        " are denoised such as applying styles. Multiple LoRA nodes can be linked together."
    )
    return_types = ("MODEL", "CLIP")
    output_tooltips = ("The modified diffusion model.", "The modified CLIP model.")

    def input_types(self, folders: Folders) -> InputTypes:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ["MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}],
                "clip": ["CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}],
                "lora_name": [
                    folders.model_files("loras"),
                    {"tooltip": "The name of the LoRA."},
                ],
                "strength_model": [
                    "FLOAT",
                    {**strength, "tooltip": "How strongly to modify the diffusion model."},
                ],
                "strength_clip": [
                    "FLOAT",
                    {**strength, "tooltip": "How strongly to modify the CLIP model."},
                ],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        model, clip = inputs["model"], inputs["clip"]
        name = str(inputs["lora_name"])
        sm, sc = float(inputs["strength_model"]), float(inputs["strength_clip"])
        if sm == 0 and sc == 0:
            return NodeResult((model, clip))
        ctx.folders.model_path("loras", name)
        if not isinstance(model, ModelRef) or not isinstance(clip, ClipRef):
            raise TypeError("LoraLoader needs a MODEL and a CLIP")
        return NodeResult(
            (
                ModelRef(model.name, (*model.loras, (name, sm))),
                ClipRef(clip.name, clip.kind, (*clip.loras, (name, sc))),
            )
        )


class VAELoader(Node):
    name = "VAELoader"
    display_name = "Load VAE"
    category = "loaders"
    return_types = ("VAE",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {"required": {"vae_name": [folders.model_files("vae")]}}

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        name = str(inputs["vae_name"])
        ctx.folders.model_path("vae", name)
        return NodeResult((VaeRef(name),))


class CLIPLoader(Node):
    name = "CLIPLoader"
    display_name = "Load CLIP"
    category = "advanced/loaders"
    description = (
        "[Recipes]\n\nstable_diffusion: clip-l\nstable_cascade: clip-g\nsd3: t5 xxl/ clip-g /"
        " clip-l\nstable_audio: t5 base\nmochi: t5 xxl\ncosmos: old t5 xxl\nlumina2: gemma 2 2B"
        "\nwan: umt5 xxl\n hidream: llama-3.1 (Recommend) or t5"
    )
    return_types = ("CLIP",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "clip_name": [folders.model_files("text_encoders")],
                "type": [list(CLIP_TYPES)],
            },
            "optional": {"device": [["default", "cpu"], {"advanced": True}]},
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        name = str(inputs["clip_name"])
        ctx.folders.model_path("text_encoders", name)
        return NodeResult((ClipRef(name, str(inputs["type"])),))


class UNETLoader(Node):
    name = "UNETLoader"
    display_name = "Load Diffusion Model"
    category = "advanced/loaders"
    return_types = ("MODEL",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "unet_name": [folders.model_files("diffusion_models")],
                "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        name = str(inputs["unet_name"])
        ctx.folders.model_path("diffusion_models", name)
        return NodeResult((ModelRef(name),))


class ControlNetLoader(Node):
    name = "ControlNetLoader"
    display_name = "Load ControlNet Model"
    category = "loaders"
    return_types = ("CONTROL_NET",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {"required": {"control_net_name": [folders.model_files("controlnet")]}}

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        name = str(inputs["control_net_name"])
        ctx.folders.model_path("controlnet", name)
        return NodeResult((ControlNetRef(name),))


class CLIPTextEncode(Node):
    name = "CLIPTextEncode"
    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    description = (
        "Encodes a text prompt using a CLIP model into an embedding that can be used to guide"
        " the diffusion model towards generating specific images."
    )
    return_types = ("CONDITIONING",)
    output_tooltips = (
        "A conditioning containing the embedded text used to guide the diffusion model.",
    )

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "text": [
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The text to be encoded.",
                    },
                ],
                "clip": ["CLIP", {"tooltip": "The CLIP model used for encoding the text."}],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        clip = inputs["clip"]
        if not isinstance(clip, ClipRef):
            raise RuntimeError(
                f"ERROR: clip input is invalid: {clip}\n\nIf the clip is from a checkpoint"
                " loader node your checkpoint does not contain a valid clip or text encoder model."
            )
        return NodeResult((Conditioning(str(inputs["text"]), clip.key()),))


class EmptyLatentImage(Node):
    name = "EmptyLatentImage"
    display_name = "Empty Latent Image"
    category = "latent"
    description = "Create a new batch of empty latent images to be denoised via sampling."
    return_types = ("LATENT",)
    output_tooltips = ("The empty latent image batch.",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "width": [
                    "INT",
                    {
                        "default": 512,
                        "min": 16,
                        "max": MAX_RESOLUTION,
                        "step": 8,
                        "tooltip": "The width of the latent images in pixels.",
                    },
                ],
                "height": [
                    "INT",
                    {
                        "default": 512,
                        "min": 16,
                        "max": MAX_RESOLUTION,
                        "step": 8,
                        "tooltip": "The height of the latent images in pixels.",
                    },
                ],
                "batch_size": [
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 4096,
                        "tooltip": "The number of latent images in the batch.",
                    },
                ],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        return NodeResult(
            (Latent(int(inputs["width"]), int(inputs["height"]), int(inputs["batch_size"])),)
        )


class KSampler(Node):
    """The stand-in sampler: a deterministic picture from the seed, prompts and model.

    It reports one progress step per sampling step (sleeping ``--step-seconds`` each), with
    a preview per step when ``--preview-method`` is not ``none``.
    """

    name = "KSampler"
    display_name = "KSampler"
    category = "sampling"
    description = (
        "Uses the provided model, positive and negative conditioning to denoise the latent image."
    )
    return_types = ("LATENT",)
    output_tooltips = ("The denoised latent.",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "model": ["MODEL", {"tooltip": "The model used for denoising the input latent."}],
                "seed": [
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ],
                "steps": [
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "The number of steps used in the denoising process.",
                    },
                ],
                "cfg": [
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "The Classifier-Free Guidance scale balances creativity and"
                        " adherence to the prompt. Higher values result in images more closely"
                        " matching the prompt however too high values will negatively impact"
                        " quality.",
                    },
                ],
                "sampler_name": [
                    list(KSAMPLER_NAMES),
                    {
                        "tooltip": "The algorithm used when sampling, this can affect the quality,"
                        " speed, and style of the generated output."
                    },
                ],
                "scheduler": [
                    list(SCHEDULER_NAMES),
                    {
                        "tooltip": "The scheduler controls how noise is gradually removed to form"
                        " the image."
                    },
                ],
                "positive": [
                    "CONDITIONING",
                    {
                        "tooltip": "The conditioning describing the attributes you want to"
                        " include in the image."
                    },
                ],
                "negative": [
                    "CONDITIONING",
                    {
                        "tooltip": "The conditioning describing the attributes you want to"
                        " exclude from the image."
                    },
                ],
                "latent_image": ["LATENT", {"tooltip": "The latent image to denoise."}],
                "denoise": [
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The amount of denoising applied, lower values will maintain"
                        " the structure of the initial image allowing for image to image"
                        " sampling.",
                    },
                ],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        model, positive, negative = inputs["model"], inputs["positive"], inputs["negative"]
        latent = inputs["latent_image"]
        if not isinstance(model, ModelRef):
            raise TypeError(f"model must be a MODEL, got {type(model).__name__}")
        if not isinstance(positive, Conditioning) or not isinstance(negative, Conditioning):
            raise TypeError("positive and negative must be CONDITIONING")
        if not isinstance(latent, Latent):
            raise TypeError(f"latent_image must be a LATENT, got {type(latent).__name__}")
        steps, seed, denoise = int(inputs["steps"]), int(inputs["seed"]), float(inputs["denoise"])
        base = [
            model.key(),
            positive.text,
            positive.clip,
            negative.text,
            steps,
            float(inputs["cfg"]),
            str(inputs["sampler_name"]),
            str(inputs["scheduler"]),
            denoise,
        ]

        def sample(index: int) -> Image.Image:
            img = render_sample(latent.width, latent.height, json.dumps([*base, seed + index]))
            if latent.images is not None and denoise < 1.0:
                src = latent.images[index % len(latent.images)].resize(img.size)
                img = Image.blend(src, img, denoise)
            return img

        for step in range(steps):
            ctx.sleep(ctx.settings.step_seconds)
            preview = None
            if ctx.settings.previews:
                noise = Image.effect_noise((latent.width, latent.height), 64).convert("RGB")
                preview = Image.blend(noise, sample(0), (step + 1) / steps)
            ctx.progress(step + 1, steps, preview)
        images = [sample(i) for i in range(latent.batch_size)]
        return NodeResult((Latent(latent.width, latent.height, latent.batch_size, images),))


class VAEDecode(Node):
    name = "VAEDecode"
    display_name = "VAE Decode"
    category = "latent"
    description = "Decodes latent images back into pixel space images."
    return_types = ("IMAGE",)
    output_tooltips = ("The decoded image.",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "samples": ["LATENT", {"tooltip": "The latent to be decoded."}],
                "vae": ["VAE", {"tooltip": "The VAE model used for decoding the latent."}],
            }
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        latent = inputs["samples"]
        if not isinstance(latent, Latent):
            raise TypeError(f"samples must be a LATENT, got {type(latent).__name__}")
        if latent.images is not None:
            return NodeResult((ImageBatch([i.copy() for i in latent.images]),))
        size = (latent.width, latent.height)
        return NodeResult(
            (ImageBatch([Image.new("RGB", size, (128, 128, 128))] * latent.batch_size),)
        )


class VAEEncode(Node):
    name = "VAEEncode"
    display_name = "VAE Encode"
    category = "latent"
    return_types = ("LATENT",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}}

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        batch = _require_images(inputs["pixels"], "pixels")
        w, h = batch.images[0].size
        return NodeResult((Latent(w, h, len(batch.images), [i.copy() for i in batch.images]),))


# -- test nodes ------------------------------------------------------------------------------------


class SimSleep(Node):
    """Sleeps ``seconds`` in ``steps`` progress steps; interruptible within one step.

    It always executes (its IS_CHANGED is NaN), so a slow workflow stays slow when it is
    submitted again. Images pass through; without images it outputs one 64x64 grey image.
    """

    name = "SimSleep"
    display_name = "Sleep (simulator)"
    category = "testing"
    python_module = "custom_nodes.comfyfleet_sim"
    return_types = ("IMAGE",)
    always_execute = True

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {
                "seconds": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 86400.0, "step": 0.01}],
                "steps": ["INT", {"default": 10, "min": 1, "max": 10000}],
            },
            "optional": {
                "images": ["IMAGE"],
                "send_preview": ["BOOLEAN", {"default": False}],
            },
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        images = inputs.get("images")
        batch = (
            images
            if isinstance(images, ImageBatch) and images.images
            else ImageBatch([Image.new("RGB", (64, 64), (128, 128, 128))])
        )
        steps = int(inputs["steps"])
        per_step = float(inputs["seconds"]) / steps
        for step in range(steps):
            ctx.sleep(per_step)
            preview = batch.images[0] if inputs.get("send_preview") else None
            ctx.progress(step + 1, steps, preview, max_size=64)
        return NodeResult((batch,))


class SimFail(Node):
    """Fails at execution with ``RuntimeError(message)``."""

    name = "SimFail"
    display_name = "Fail (simulator)"
    category = "testing"
    python_module = "custom_nodes.comfyfleet_sim"
    return_types = ("IMAGE",)

    def input_types(self, folders: Folders) -> InputTypes:
        return {
            "required": {"message": ["STRING", {"default": "boom"}]},
            "optional": {"images": ["IMAGE"]},
        }

    def run(self, ctx: ExecContext, inputs: dict[str, Any]) -> NodeResult:
        raise RuntimeError(str(inputs["message"]))


ALL_NODES: tuple[Node, ...] = (
    CheckpointLoaderSimple(),
    VAELoader(),
    LoraLoader(),
    CLIPLoader(),
    UNETLoader(),
    ControlNetLoader(),
    CLIPTextEncode(),
    EmptyLatentImage(),
    KSampler(),
    VAEDecode(),
    VAEEncode(),
    LoadImage(),
    ImageInvert(),
    ImageScale(),
    EmptyImage(),
    SaveImage(),
    PreviewImage(),
    SaveAnimatedWEBP(),
    VideoCombine(),
    PreviewAny(),
    PrimitiveString(),
    SimSleep(),
    SimFail(),
)


def node_registry(missing: frozenset[str] = frozenset()) -> dict[str, Node]:
    """The node classes by name, minus ``missing`` (as if their custom nodes failed to load)."""
    return {n.name: n for n in ALL_NODES if n.name not in missing}


def full_type_name(exc: BaseException) -> str:
    """``execution.full_type_name``: ``module.QualName``, builtins bare."""
    cls = type(exc)
    module = cls.__module__
    if module in (None, "builtins", "__builtin__"):
        return cls.__qualname__
    # PIL's errors report as PIL.UnidentifiedImageError, not PIL.Image.UnidentifiedImageError.
    if module.startswith("PIL.") and hasattr(__import__("PIL"), cls.__qualname__):
        module = "PIL"
    return f"{module}.{cls.__qualname__}"


def format_value(value: Any) -> Any:
    """How an input value appears in ``execution_error.current_inputs``."""
    if value is None or isinstance(value, int | float | bool | str):
        return value
    if isinstance(value, dict):
        with contextlib.suppress(TypeError, ValueError):
            json.dumps(value)
            return value
    return str(value)


__all__ = [
    "ALL_NODES",
    "ExecContext",
    "Folders",
    "ImageBatch",
    "Interrupted",
    "Latent",
    "MaskBatch",
    "Node",
    "NodeResult",
    "NodeSettings",
    "Preview",
    "full_type_name",
    "node_registry",
]

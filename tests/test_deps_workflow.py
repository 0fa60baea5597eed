"""A job's dependencies derived from its workflow's loader nodes: the references found,
how each matches the catalog, and what is reported when none or several match."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from comfyfleet.deps import (
    AmbiguousReference,
    DependencyCatalog,
    LoaderReference,
    dependencies_of,
    load_catalog,
    loader_references,
    parse_catalog,
)
from comfyfleet.workflow import WorkflowError
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "deps.yaml"


def sdxl_lora_controlnet() -> dict[str, Any]:
    """An SDXL txt2img workflow with two LoRAs, a separate VAE and a ControlNet on a pose
    image, as ComfyUI's "Export (API)" writes it; the first LoRA was picked on a Windows
    machine (``detail\\add-detail-xl.safetensors``), and the second is not in the catalog."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 42,
                "steps": 30,
                "cfg": 6.5,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "denoise": 1,
                "model": ["11", 0],
                "positive": ["15", 0],
                "negative": ["15", 1],
                "latent_image": ["5", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
            "_meta": {"title": "Load Checkpoint"},
        },
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 1024, "height": 1024, "batch_size": 1},
        },
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a dancer on a rooftop at dusk", "clip": ["11", 1]},
            "_meta": {"title": "Positive"},
        },
        "7": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "blurry, watermark", "clip": ["11", 1]},
            "_meta": {"title": "Negative"},
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["12", 0]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "dancer", "images": ["8", 0]},
        },
        "10": {
            "class_type": "LoraLoader",
            "inputs": {
                "lora_name": "detail\\add-detail-xl.safetensors",
                "strength_model": 0.8,
                "strength_clip": 0.8,
                "model": ["4", 0],
                "clip": ["4", 1],
            },
            "_meta": {"title": "Detail LoRA"},
        },
        "11": {
            "class_type": "LoraLoader",
            "inputs": {
                "lora_name": "pixel-art-xl.safetensors",
                "strength_model": 0.6,
                "strength_clip": 0.6,
                "model": ["10", 0],
                "clip": ["10", 1],
            },
        },
        "12": {
            "class_type": "VAELoader",
            "inputs": {"vae_name": "sdxl_vae.safetensors"},
        },
        "13": {
            "class_type": "ControlNetLoader",
            "inputs": {"control_net_name": "controlnet-union-sdxl-promax.safetensors"},
        },
        "14": {"class_type": "LoadImage", "inputs": {"image": "pose.png"}},
        "15": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "strength": 0.7,
                "start_percent": 0,
                "end_percent": 0.8,
                "positive": ["6", 0],
                "negative": ["7", 0],
                "control_net": ["13", 0],
                "image": ["14", 0],
                "vae": ["12", 0],
            },
        },
    }


def flux_workflow() -> dict[str, Any]:
    """FLUX.1-dev from split files: UNet, two text encoders, VAE (ComfyUI's own template)."""
    return {
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "flux_ae.safetensors"}},
        "11": {
            "class_type": "DualCLIPLoader",
            "inputs": {
                "clip_name1": "t5xxl_fp8_e4m3fn.safetensors",
                "clip_name2": "clip_l.safetensors",
                "type": "flux",
            },
        },
        "12": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"},
        },
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a red fox in snow", "clip": ["11", 0]},
        },
    }


def catalog_of(*entries: tuple[str, str]) -> DependencyCatalog:
    """A catalog of models ``(id, destination)``, all from Civitai."""
    return DependencyCatalog.model_validate(
        {
            "entries": [
                {"id": i, "kind": "model", "source": f"civitai://{n}", "destination": d, "size": 1}
                for n, (i, d) in enumerate(entries, start=1)
            ]
        }
    )


# -- the references ---------------------------------------------------------------


def test_loader_references_are_every_loader_inputs_literal_in_node_order() -> None:
    assert loader_references(sdxl_lora_controlnet()) == [
        ("4", "CheckpointLoaderSimple", "ckpt_name", "sd_xl_base_1.0.safetensors"),
        ("10", "LoraLoader", "lora_name", "detail\\add-detail-xl.safetensors"),
        ("11", "LoraLoader", "lora_name", "pixel-art-xl.safetensors"),
        ("12", "VAELoader", "vae_name", "sdxl_vae.safetensors"),
        ("13", "ControlNetLoader", "control_net_name", "controlnet-union-sdxl-promax.safetensors"),
    ]
    refs = loader_references(flux_workflow())
    assert [(r.node_id, r.input_name) for r in refs] == [
        ("10", "vae_name"),
        ("11", "clip_name1"),
        ("11", "clip_name2"),
        ("12", "unet_name"),
    ]
    assert refs[0] == LoaderReference("10", "VAELoader", "vae_name", "flux_ae.safetensors")


def test_a_loader_input_linked_to_another_node_is_skipped() -> None:
    workflow = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ["1", 0]}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors"}},
        "4": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name3": "t5xxl.safetensors"}},
    }
    assert loader_references(workflow) == [
        ("3", "CLIPLoader", "clip_name", "clip_l.safetensors"),
        ("4", "TripleCLIPLoader", "clip_name3", "t5xxl.safetensors"),
    ]


def test_a_post_prompt_body_is_read_like_its_graph() -> None:
    body = {"prompt": flux_workflow(), "client_id": "abc"}
    assert loader_references(body) == loader_references(flux_workflow())


def test_a_ui_format_workflow_is_refused_with_how_to_export_the_api_format() -> None:
    ui = {"nodes": [{"id": 4, "type": "CheckpointLoaderSimple"}], "links": [], "version": 0.4}
    with pytest.raises(WorkflowError, match=r"UI-format workflow.*Export \(API\)"):
        loader_references(ui)
    with pytest.raises(WorkflowError, match=r"UI-format"):
        dependencies_of(ui, load_catalog(EXAMPLE))


def test_the_workflow_given_is_left_untouched() -> None:
    workflow = sdxl_lora_controlnet()
    before = copy.deepcopy(workflow)
    dependencies_of(workflow, load_catalog(EXAMPLE))
    assert workflow == before


# -- matching against the catalog ---------------------------------------------------


def test_an_sdxl_lora_controlnet_workflow_needs_its_catalog_entries() -> None:
    found = dependencies_of(sdxl_lora_controlnet(), load_catalog(EXAMPLE))
    assert found.matched == (
        "sdxl-base",
        "add-detail-xl",  # loras/detail/add-detail-xl.safetensors, named with a backslash
        "sdxl-vae-fp16-fix",
        "controlnet-union-sdxl",
    )
    assert found.unmatched == (
        LoaderReference("11", "LoraLoader", "lora_name", "pixel-art-xl.safetensors"),
    )
    assert found.ambiguous == ()
    assert dict((ref.node_id, dep) for ref, dep in found.resolved) == {
        "4": "sdxl-base",
        "10": "add-detail-xl",
        "12": "sdxl-vae-fp16-fix",
        "13": "controlnet-union-sdxl",
    }
    assert found.describe(sdxl_lora_controlnet()) == [
        "node 11 (LoraLoader) input 'lora_name': no catalog entry for 'pixel-art-xl.safetensors'"
    ]


def test_a_flux_workflow_needs_the_flux_server_types_statics() -> None:
    catalog = load_catalog(EXAMPLE)
    found = dependencies_of(flux_workflow(), catalog)
    assert set(found.matched) == set(catalog.profile("flux").static_ids)
    assert not found.unmatched and not found.ambiguous


def test_a_file_named_twice_is_one_dependency() -> None:
    workflow = flux_workflow()
    workflow["20"] = copy.deepcopy(workflow["10"])
    found = dependencies_of(workflow, load_catalog(EXAMPLE))
    assert found.matched.count("flux-ae") == 1
    assert [ref.node_id for ref, dep in found.resolved if dep == "flux-ae"] == ["10", "20"]


def test_a_reference_matches_by_path_in_its_folder_or_by_file_name() -> None:
    catalog = catalog_of(("style", "loras/styles/ink.safetensors"))
    for value in ("styles/ink.safetensors", "styles\\ink.safetensors", "ink.safetensors"):
        workflow = {"1": {"class_type": "LoraLoader", "inputs": {"lora_name": value}}}
        assert dependencies_of(workflow, catalog).matched == ("style",), value
    # The folder is the loader's, not part of the name it is given.
    workflow = {"1": {"class_type": "LoraLoader", "inputs": {"lora_name": "loras/ink.safetensors"}}}
    assert dependencies_of(workflow, catalog).matched == ()


def test_the_loaders_own_folder_wins_over_a_file_of_the_same_name_elsewhere() -> None:
    catalog = catalog_of(
        ("lora", "loras/model.safetensors"),
        ("checkpoint", "checkpoints/model.safetensors"),
        ("unet", "unet/model.safetensors"),
    )
    for input_name, expected in (
        ("ckpt_name", "checkpoint"),
        ("lora_name", "lora"),
        ("unet_name", "unet"),  # unet/ is one of diffusion_models' folders in ComfyUI
    ):
        workflow = {"1": {"class_type": "Loader", "inputs": {input_name: "model.safetensors"}}}
        assert dependencies_of(workflow, catalog).matched == (expected,), input_name


def test_an_exact_path_wins_over_a_bare_file_name() -> None:
    catalog = catalog_of(("top", "loras/ink.safetensors"), ("nested", "loras/old/ink.safetensors"))
    workflow = {"1": {"class_type": "LoraLoader", "inputs": {"lora_name": "ink.safetensors"}}}
    assert dependencies_of(workflow, catalog).matched == ("top",)


def test_a_name_several_entries_match_equally_is_reported_not_guessed() -> None:
    catalog = catalog_of(
        ("ink-v1", "loras/v1/ink.safetensors"), ("ink-v2", "loras/v2/ink.safetensors")
    )
    workflow = {
        "7": {
            "class_type": "LoraLoader",
            "inputs": {"lora_name": "ink.safetensors"},
            "_meta": {"title": "Ink style"},
        },
        "8": {"class_type": "LoraLoader", "inputs": {"lora_name": "v2/ink.safetensors"}},
    }
    found = dependencies_of(workflow, catalog)
    assert found.matched == ("ink-v2",)
    assert found.ambiguous == (
        AmbiguousReference(
            LoaderReference("7", "LoraLoader", "lora_name", "ink.safetensors"),
            ("ink-v1", "ink-v2"),
        ),
    )
    assert found.describe(workflow) == [
        "node 7 (LoraLoader, \"Ink style\") input 'lora_name': 'ink.safetensors' matches "
        "several catalog entries (ink-v1, ink-v2); give the path inside its folder, or name "
        "the dependency the job needs"
    ]


def test_a_name_found_only_in_another_folder_still_matches() -> None:
    # A custom loader may read another folder than ComfyUI's own loader of that input.
    catalog = catalog_of(("ipa", "ipadapter/ip-adapter-plus_sdxl.safetensors"))
    workflow = {
        "1": {"class_type": "X", "inputs": {"clip_name": "ip-adapter-plus_sdxl.safetensors"}}
    }
    assert dependencies_of(workflow, catalog).matched == ("ipa",)


def test_custom_nodes_are_never_matched_by_a_loader() -> None:
    catalog = parse_catalog(
        "entries:\n"
        "  - id: node\n"
        "    kind: custom_node\n"
        "    source: https://github.com/acme/ink.safetensors\n"
        "    destination: ink.safetensors\n"
        f"    commit: {'a' * 40}\n"
    )
    workflow = {"1": {"class_type": "LoraLoader", "inputs": {"lora_name": "ink.safetensors"}}}
    found = dependencies_of(workflow, catalog)
    assert found.matched == () and len(found.unmatched) == 1


def test_the_example_txt2img_workflow_names_a_checkpoint_the_example_catalog_lacks() -> None:
    workflow = json.loads((REPO / "examples" / "workflows" / "txt2img.json").read_text())
    found = dependencies_of(workflow, load_catalog(EXAMPLE))
    assert found.matched == ()
    assert [ref.value for ref in found.unmatched] == ["v1-5-pruned-emaonly.safetensors"]

"""Workflow parameters and outputs (``comfyfleet.workflow``): plain-data specifications over
realistic API-format workflows (SDXL, img2img with ControlNet, Flux, combined conditioning),
and the simulator (``python -m comfyfleet.sim.comfy``) refusing a bad ``--set`` with
ComfyUI's own validation, made readable.

Validation bodies are copied from ``shared/reference/comfyui-api.md`` (observed on ComfyUI
0.3.64).
"""

from __future__ import annotations

import copy
import io
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from comfyfleet.agent.comfy import ComfyClient, OutputFile, UploadedFile
from comfyfleet.errors import ComfyfleetError, ComfyValidationError, ConfigError
from comfyfleet.workflow import (
    SEED_MAX,
    ImageArg,
    OutputText,
    Override,
    SeedChange,
    TextTarget,
    Workflow,
    WorkflowError,
    apply_overrides,
    apply_parameters,
    collect_outputs,
    describe_validation,
    find_prompt,
    is_link,
    load_api_workflow,
    parse_image_arg,
    parse_value,
    randomize_seeds,
    resolve_node,
    set_image,
    set_prompt,
)

REPO = Path(__file__).resolve().parent.parent
TXT2IMG = REPO / "examples" / "workflows" / "txt2img.json"
LOOPBACK = "127.0.0.1"


def node(class_type: str, title: str | None = None, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}


# -- realistic API-format workflows ------------------------------------------------------------

SDXL_TXT2IMG: Workflow = {
    "3": node(
        "KSampler",
        seed=156680208700286,
        steps=25,
        cfg=7.0,
        sampler_name="dpmpp_2m",
        scheduler="karras",
        denoise=1.0,
        model=["4", 0],
        positive=["6", 0],
        negative=["7", 0],
        latent_image=["5", 0],
    ),
    "4": node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name="sd_xl_base_1.0.safetensors"),
    "5": node("EmptyLatentImage", "Empty Latent Image", width=1024, height=1024, batch_size=1),
    "6": node(
        "CLIPTextEncodeSDXL",
        "Positive prompt",
        width=4096,
        height=4096,
        crop_w=0,
        crop_h=0,
        target_width=4096,
        target_height=4096,
        text_g="a lighthouse on a cliff, golden hour",
        text_l="a lighthouse on a cliff, golden hour",
        clip=["4", 1],
    ),
    "7": node("CLIPTextEncode", "Negative prompt", text="blurry, watermark", clip=["4", 1]),
    "8": node("VAEDecode", "VAE Decode", samples=["3", 0], vae=["4", 2]),
    "9": node("SaveImage", "Save Image", filename_prefix="sdxl", images=["8", 0]),
}

# SDXL base + refiner: two KSamplerAdvanced, each with its own positive encoder.
SDXL_REFINER: Workflow = {
    "4": node("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors"),
    "5": node("EmptyLatentImage", width=1024, height=1024, batch_size=1),
    "6": node("CLIPTextEncode", "Base positive", text="a red fox in snow", clip=["4", 1]),
    "7": node("CLIPTextEncode", "Base negative", text="text", clip=["4", 1]),
    "10": node(
        "KSamplerAdvanced",
        "Base sampler",
        add_noise="enable",
        noise_seed=721897303308196,
        steps=25,
        cfg=8.0,
        sampler_name="euler",
        scheduler="normal",
        start_at_step=0,
        end_at_step=20,
        return_with_leftover_noise="enable",
        model=["4", 0],
        positive=["6", 0],
        negative=["7", 0],
        latent_image=["5", 0],
    ),
    "12": node("CheckpointLoaderSimple", ckpt_name="sd_xl_refiner_1.0.safetensors"),
    "15": node(
        "CLIPTextEncodeSDXLRefiner",
        "Refiner positive",
        ascore=6.0,
        width=1024,
        height=1024,
        text="a red fox in snow",
        clip=["12", 1],
    ),
    "16": node(
        "CLIPTextEncodeSDXLRefiner",
        "Refiner negative",
        ascore=2.5,
        width=1024,
        height=1024,
        text="text",
        clip=["12", 1],
    ),
    "11": node(
        "KSamplerAdvanced",
        "Refiner sampler",
        add_noise="disable",
        noise_seed=0,
        steps=25,
        cfg=8.0,
        sampler_name="euler",
        scheduler="normal",
        start_at_step=20,
        end_at_step=10000,
        return_with_leftover_noise="disable",
        model=["12", 0],
        positive=["15", 0],
        negative=["16", 0],
        latent_image=["10", 0],
    ),
    "17": node("VAEDecode", samples=["11", 0], vae=["12", 2]),
    "19": node("SaveImage", filename_prefix="refined", images=["17", 0]),
}

# img2img with a ControlNet: two LoadImage nodes, conditioning through ControlNetApplyAdvanced.
IMG2IMG_CONTROLNET: Workflow = {
    "3": node(
        "KSampler",
        seed=42,
        steps=20,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=0.6,
        model=["4", 0],
        positive=["14", 0],
        negative=["14", 1],
        latent_image=["11", 0],
    ),
    "4": node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors"),
    "6": node("CLIPTextEncode", "Positive", text="oil painting of a harbour", clip=["4", 1]),
    "7": node("CLIPTextEncode", "Negative", text="lowres", clip=["4", 1]),
    "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
    "9": node("SaveImage", filename_prefix="img2img", images=["8", 0]),
    "10": node("LoadImage", "Init image", image="example.png", upload="image"),
    "11": node("VAEEncode", pixels=["10", 0], vae=["4", 2]),
    "12": node("LoadImage", "Control image", image="pose.png", upload="image"),
    "13": node("ControlNetLoader", control_net_name="control_v11p_sd15_openpose.pth"),
    "14": node(
        "ControlNetApplyAdvanced",
        strength=0.8,
        start_percent=0.0,
        end_percent=1.0,
        positive=["6", 0],
        negative=["7", 0],
        control_net=["13", 0],
        image=["12", 0],
    ),
}

# Flux dev: SamplerCustomAdvanced with a BasicGuider, FluxGuidance between it and the prompt.
FLUX_BASIC: Workflow = {
    "6": node("CLIPTextEncode", "CLIP Text Encode (Positive Prompt)", text="a cat", clip=["11", 0]),
    "8": node("VAEDecode", samples=["13", 0], vae=["10", 0]),
    "9": node("SaveImage", filename_prefix="flux", images=["8", 0]),
    "10": node("VAELoader", vae_name="ae.safetensors"),
    "11": node(
        "DualCLIPLoader",
        clip_name1="t5xxl_fp16.safetensors",
        clip_name2="clip_l.safetensors",
        type="flux",
    ),
    "12": node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
    "13": node(
        "SamplerCustomAdvanced",
        noise=["25", 0],
        guider=["22", 0],
        sampler=["16", 0],
        sigmas=["17", 0],
        latent_image=["27", 0],
    ),
    "16": node("KSamplerSelect", sampler_name="euler"),
    "17": node("BasicScheduler", scheduler="simple", steps=20, denoise=1.0, model=["12", 0]),
    "22": node("BasicGuider", model=["12", 0], conditioning=["26", 0]),
    "25": node("RandomNoise", noise_seed=219670278747233),
    "26": node("FluxGuidance", guidance=3.5, conditioning=["6", 0]),
    "27": node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1),
}


def flux_cfg(negative: str) -> Workflow:
    """Flux with a CFGGuider: a real negative prompt, or one zeroed out from the positive."""
    workflow = copy.deepcopy(FLUX_BASIC)
    workflow["22"] = node(
        "CFGGuider", model=["12", 0], positive=["26", 0], negative=["30", 0], cfg=1.0
    )
    if negative == "zero":
        workflow["30"] = node("ConditioningZeroOut", conditioning=["6", 0])
    else:
        workflow["30"] = node("CLIPTextEncode", "Negative", text=negative, clip=["11", 0])
    return workflow


# Regional prompting: the main prompt combined with an area-limited one.
COMBINED: Workflow = {
    "3": node(
        "KSampler",
        seed=5,
        steps=20,
        cfg=8.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
        model=["4", 0],
        positive=["22", 0],
        negative=["7", 0],
        latent_image=["5", 0],
    ),
    "4": node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors"),
    "5": node("EmptyLatentImage", width=704, height=512, batch_size=1),
    "6": node("CLIPTextEncode", "Main prompt", text="a castle on a hill", clip=["4", 1]),
    "7": node("CLIPTextEncode", "Negative", text="bad hands", clip=["4", 1]),
    "20": node("CLIPTextEncode", "Sky prompt", text="sunset sky", clip=["4", 1]),
    "21": node(
        "ConditioningSetArea",
        width=704,
        height=192,
        x=0,
        y=0,
        strength=1.0,
        conditioning=["20", 0],
    ),
    "22": node("ConditioningCombine", conditioning_1=["6", 0], conditioning_2=["21", 0]),
    "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
    "9": node("SaveImage", filename_prefix="regions", images=["8", 0]),
}


def ui_format() -> dict[str, Any]:
    return {
        "last_node_id": 9,
        "last_link_id": 9,
        "nodes": [{"id": 3, "type": "KSampler", "widgets_values": [1, "randomize", 20]}],
        "links": [[1, 4, 0, 3, 0, "MODEL"]],
        "version": 0.4,
    }


# -- loading -----------------------------------------------------------------------------------


def test_an_api_workflow_loads_from_a_file_json_text_bytes_a_mapping_or_a_prompt_body(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sdxl.json"
    path.write_text(json.dumps(SDXL_TXT2IMG))
    text = json.dumps(SDXL_TXT2IMG)
    for source in (path, text, text.encode(), SDXL_TXT2IMG, {"prompt": SDXL_TXT2IMG}):
        assert load_api_workflow(source) == SDXL_TXT2IMG
    assert load_api_workflow(TXT2IMG)["3"]["class_type"] == "KSampler"


def test_a_loaded_workflow_is_a_copy_that_the_caller_can_change() -> None:
    original = copy.deepcopy(SDXL_TXT2IMG)
    loaded = load_api_workflow(original)
    loaded["3"]["inputs"]["steps"] = 1
    loaded["3"]["inputs"]["positive"][0] = "7"
    assert original == SDXL_TXT2IMG


def test_a_ui_format_workflow_is_refused_with_how_to_export_the_api_format(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(ui_format()))
    for source in (path, ui_format(), {"prompt": ui_format()}):
        with pytest.raises(WorkflowError) as caught:
            load_api_workflow(source)
        message = str(caught.value)
        assert "UI-format" in message
        assert "Export (API)" in message
        assert "Save (API Format)" in message
        assert "Dev mode" in message
    assert isinstance(caught.value, ComfyfleetError)
    assert isinstance(caught.value, ConfigError)


def test_text_that_is_not_json_is_refused_with_where_it_breaks(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "3": {"class_type": "KSampler",\n  }\n}')
    with pytest.raises(WorkflowError, match=r"broken\.json: the workflow is not JSON: .* line 3"):
        load_api_workflow(path)
    with pytest.raises(WorkflowError, match="not UTF-8"):
        load_api_workflow(b"\xff\xfe{")
    with pytest.raises(WorkflowError, match="cannot read the workflow"):
        load_api_workflow(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("[1, 2]", "must be a JSON object, not a list"),
        ('"KSampler"', "must be a JSON object, not a string"),
        ("{}", "has no nodes"),
        ('{"3": {"inputs": {"steps": 20}}}', "node '3' has no class_type"),
        ('{"3": {"class_type": "KSampler", "inputs": [1]}}', "'inputs' that are not an object"),
    ],
)
def test_a_workflow_that_is_not_an_api_graph_is_refused(data: str, expected: str) -> None:
    with pytest.raises(WorkflowError, match=expected):
        load_api_workflow(data)


def test_a_link_to_a_missing_node_is_refused_with_the_node_and_input() -> None:
    broken = copy.deepcopy(SDXL_TXT2IMG)
    broken["8"]["inputs"]["samples"] = ["12", 0]
    with pytest.raises(WorkflowError) as caught:
        load_api_workflow(broken)
    assert "node 8 (VAEDecode, \"VAE Decode\") input 'samples' links to node '12'" in str(
        caught.value
    )


def test_a_bare_list_input_is_refused_with_the_value_wrapper_hint() -> None:
    broken = copy.deepcopy(SDXL_TXT2IMG)
    broken["5"]["inputs"]["width"] = [1024, 768, 512]
    with pytest.raises(WorkflowError, match=r'\{"__value__": \[\.\.\.\]\}'):
        load_api_workflow(broken)


def test_numeric_link_ids_become_strings_and_missing_inputs_become_empty() -> None:
    loaded = load_api_workflow(
        {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
            "2": {"class_type": "SaveImage", "inputs": {"images": [1, 0]}},
            "3": {"class_type": "Note"},
        }
    )
    assert loaded["2"]["inputs"]["images"] == ["1", 0]
    assert loaded["3"]["inputs"] == {}


def test_a_link_is_a_node_id_and_an_output_index() -> None:
    assert is_link(["4", 0]) and is_link([4, 1])
    for value in (["4"], ["4", 0, 1], ["4", "0"], [True, 0], ["4", False], "4", {"4": 0}):
        assert not is_link(value)


# -- --set -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "node", "input_name", "value"),
    [
        ("3.seed=42", "3", "seed", 42),
        ("KSampler.cfg=7.5", "KSampler", "cfg", 7.5),
        ("KSampler.sampler_name=dpmpp_2m", "KSampler", "sampler_name", "dpmpp_2m"),
        ('KSampler.sampler_name="euler"', "KSampler", "sampler_name", "euler"),
        ('6.text="42"', "6", "text", "42"),
        ("Positive prompt.text=a cat, 4k", "Positive prompt", "text", "a cat, 4k"),
        ("My v1.5 model.ckpt_name=x.safetensors", "My v1.5 model", "ckpt_name", "x.safetensors"),
        ("6.text=a = b", "6", "text", "a = b"),
        ("6.text=", "6", "text", ""),
        ("3.denoise=true", "3", "denoise", True),
        ("3.denoise=null", "3", "denoise", None),
        ('3.positive=["6", 0]', "3", "positive", ["6", 0]),
        ("3.cfg=NaN", "3", "cfg", "NaN"),
        ("5.width=[1,2", "5", "width", "[1,2"),
        (" KSampler . steps =30", "KSampler", "steps", 30),
        ('"a=b.c".steps=30', "a=b.c", "steps", 30),
        ("'Sampler \"x\"'.steps=30", 'Sampler "x"', "steps", 30),
    ],
)
def test_set_parses_node_input_and_a_json_or_text_value(
    text: str, node: str, input_name: str, value: Any
) -> None:
    assert Override.parse(text) == Override(node, input_name, value)


@pytest.mark.parametrize(
    "text", ["steps=30", "KSampler.steps", ".steps=30", "KSampler.=30", '"KSampler.steps=30']
)
def test_set_without_node_input_and_value_says_the_expected_form(text: str) -> None:
    with pytest.raises(WorkflowError, match=r"expected NODE\.INPUT=VALUE"):
        Override.parse(text)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
titles = st.text(
    st.characters(exclude_characters="=\"'", exclude_categories=["Cs"]), min_size=1
).filter(lambda t: t.strip() == t and t.strip())
input_names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)


@given(title=titles, input_name=input_names, value=json_values)
def test_any_title_and_any_json_value_round_trip_through_set(
    title: str, input_name: str, value: Any
) -> None:
    parsed = Override.parse(f"{title}.{input_name}={json.dumps(value)}")
    assert (parsed.node, parsed.input, parsed.value) == (title, input_name, value)
    assert Override.parse(str(parsed)) == parsed


@given(
    st.text()
    | json_values.map(json.dumps)
    | st.sampled_from(["NaN", "-Infinity", "[1, NaN]", '{"a": Infinity}'])
)
def test_a_value_is_json_when_it_parses_to_plain_json_else_text(text: str) -> None:
    value = parse_value(text)
    try:
        parsed = json.loads(text)
    except ValueError:
        assert value == text
        return
    try:
        json.dumps(parsed, allow_nan=False)
    except ValueError:
        assert value == text  # NaN and Infinity stay text
    else:
        assert value == parsed


def test_a_node_is_addressed_by_id_class_type_or_title() -> None:
    workflow = load_api_workflow(SDXL_TXT2IMG)
    assert resolve_node(workflow, "3") == "3"
    assert resolve_node(workflow, "#3") == "3"
    assert resolve_node(workflow, "KSampler") == "3"
    assert resolve_node(workflow, "Positive prompt") == "6"
    assert resolve_node(workflow, "CLIPTextEncode") == "7"
    out, fixed = apply_overrides(
        workflow,
        [
            Override.parse("3.seed=42"),
            Override.parse("KSampler.steps=30"),
            Override.parse("Positive prompt.text_g=a ship"),
        ],
    )
    assert out["3"]["inputs"]["seed"] == 42
    assert out["3"]["inputs"]["steps"] == 30
    assert out["6"]["inputs"]["text_g"] == "a ship"
    assert fixed == {("3", "seed"), ("3", "steps"), ("6", "text_g")}
    assert workflow == SDXL_TXT2IMG


def test_an_ambiguous_address_lists_the_candidate_ids_with_their_titles() -> None:
    workflow = load_api_workflow(SDXL_REFINER)
    with pytest.raises(WorkflowError) as caught:
        apply_overrides(workflow, [Override.parse("KSamplerAdvanced.steps=30")])
    message = str(caught.value)
    assert "'KSamplerAdvanced' matches 2 nodes" in message
    assert '10 (KSamplerAdvanced, "Base sampler")' in message
    assert '11 (KSamplerAdvanced, "Refiner sampler")' in message
    assert "by its id" in message
    out, _ = apply_overrides(workflow, [Override.parse("Refiner sampler.steps=30")])
    assert out["11"]["inputs"]["steps"] == 30


def test_an_unknown_node_or_input_suggests_close_names() -> None:
    workflow = load_api_workflow(SDXL_TXT2IMG)
    with pytest.raises(WorkflowError, match=r"no node 'KSamplr'.*did you mean 'KSampler'"):
        apply_overrides(workflow, [Override.parse("KSamplr.steps=30")])
    with pytest.raises(WorkflowError, match="did you mean 'Positive prompt'"):
        apply_overrides(workflow, [Override.parse("positive prompt.text_g=x")])
    with pytest.raises(WorkflowError, match="its nodes: 3 \\(KSampler\\), 4 \\(Checkpoint"):
        apply_overrides(workflow, [Override.parse("FaceDetailer.guide_size=512")])
    with pytest.raises(WorkflowError) as caught:
        apply_overrides(workflow, [Override.parse("KSampler.step=30")])
    assert "node 3 (KSampler) has no input 'step'; did you mean 'steps'?" in str(caught.value)
    assert "its inputs: cfg, denoise, latent_image" in str(caught.value)


def test_a_linked_input_is_replaced_only_by_another_link() -> None:
    workflow = load_api_workflow(SDXL_TXT2IMG)
    with pytest.raises(WorkflowError, match=r"'positive' is connected to node 6 output 0"):
        apply_overrides(workflow, [Override.parse("3.positive=a cat")])
    out, _ = apply_overrides(workflow, [Override.parse('3.positive=["7", 0]')])
    assert out["3"]["inputs"]["positive"] == ["7", 0]
    with pytest.raises(WorkflowError, match="links to node '99'"):
        apply_overrides(workflow, [Override.parse('3.positive=["99", 0]')])
    with pytest.raises(WorkflowError, match="__value__"):
        apply_overrides(workflow, [Override.parse("5.width=[1, 2, 3]")])
    out, _ = apply_overrides(workflow, [Override.parse('5.width={"__value__": [1, 2]}')])
    assert out["5"]["inputs"]["width"] == {"__value__": [1, 2]}


# -- --prompt ----------------------------------------------------------------------------------


def test_the_prompt_goes_to_every_text_input_of_the_sdxl_encoder() -> None:
    workflow = load_api_workflow(SDXL_TXT2IMG)
    assert find_prompt(workflow) == TextTarget("6", ("text_g", "text_l"))
    out = set_prompt(workflow, "a paper boat")
    assert out["6"]["inputs"]["text_g"] == out["6"]["inputs"]["text_l"] == "a paper boat"
    assert out["7"]["inputs"]["text"] == "blurry, watermark"
    assert workflow == SDXL_TXT2IMG
    negative = set_prompt(workflow, "jpeg artifacts", negative=True)
    assert negative["7"]["inputs"]["text"] == "jpeg artifacts"


def test_the_prompt_is_found_through_a_controlnet_apply_on_the_positive_side() -> None:
    workflow = load_api_workflow(IMG2IMG_CONTROLNET)
    assert find_prompt(workflow) == TextTarget("6", ("text",))
    assert find_prompt(workflow, negative=True) == TextTarget("7", ("text",))


def test_the_prompt_is_found_through_a_flux_guider_and_flux_guidance() -> None:
    assert find_prompt(load_api_workflow(FLUX_BASIC)) == TextTarget("6", ("text",))
    with_cfg = load_api_workflow(flux_cfg("ugly"))
    assert find_prompt(with_cfg) == TextTarget("6", ("text",))
    assert find_prompt(with_cfg, negative=True) == TextTarget("30", ("text",))
    out = set_prompt(with_cfg, "a neon city")
    assert out["6"]["inputs"]["text"] == "a neon city"
    assert out["30"]["inputs"]["text"] == "ugly"


def test_a_zeroed_out_negative_is_not_a_prompt_to_set() -> None:
    workflow = load_api_workflow(flux_cfg("zero"))
    with pytest.raises(WorkflowError, match=r"stops at 30 \(ConditioningZeroOut\)"):
        set_prompt(workflow, "x", negative=True)
    with pytest.raises(WorkflowError, match="no text encoder feeds the negative input"):
        find_prompt(load_api_workflow(FLUX_BASIC), negative=True)


def test_through_conditioning_combine_the_prompt_is_the_first_conditioning() -> None:
    workflow = load_api_workflow(COMBINED)
    assert find_prompt(workflow) == TextTarget("6", ("text",))
    out = set_prompt(workflow, "a lighthouse")
    assert out["6"]["inputs"]["text"] == "a lighthouse"
    assert out["20"]["inputs"]["text"] == "sunset sky"


def test_a_prompt_that_comes_from_a_string_node_is_set_there() -> None:
    workflow = load_api_workflow(FLUX_BASIC)
    workflow["6"]["inputs"]["text"] = ["40", 0]
    workflow["40"] = node("PrimitiveStringMultiline", "Prompt", value="a cat")
    assert find_prompt(workflow) == TextTarget("40", ("value",))
    assert set_prompt(workflow, "a dog")["40"]["inputs"]["value"] == "a dog"
    workflow["40"] = node("SDXLPromptStyler", text_positive=["41", 0], style="cinematic")
    with pytest.raises(WorkflowError, match=r"comes from node 40 \(SDXLPromptStyler\)"):
        find_prompt(workflow)


def test_samplers_that_take_different_prompts_are_listed() -> None:
    workflow = load_api_workflow(SDXL_REFINER)
    with pytest.raises(WorkflowError) as caught:
        set_prompt(workflow, "a fox")
    message = str(caught.value)
    assert 'node 6 (CLIPTextEncode, "Base positive") feeds 10 (KSamplerAdvanced' in message
    assert 'node 15 (CLIPTextEncodeSDXLRefiner, "Refiner positive") feeds 11' in message
    assert "--set 6.text=" in message and "--set 15.text=" in message
    # Named explicitly, any text node takes the prompt.
    out = set_prompt(workflow, "a fox", node="Refiner positive")
    assert out["15"]["inputs"]["text"] == "a fox"


def test_samplers_that_share_a_prompt_are_not_ambiguous() -> None:
    workflow = load_api_workflow(SDXL_TXT2IMG)
    workflow["30"] = node(
        "KSampler",
        "Hires fix",
        **{**workflow["3"]["inputs"], "latent_image": ["31", 0], "denoise": 0.5},
    )
    workflow["31"] = node(
        "LatentUpscaleBy", upscale_method="nearest-exact", scale_by=1.5, samples=["3", 0]
    )
    assert find_prompt(workflow) == TextTarget("6", ("text_g", "text_l"))


def test_no_sampler_or_no_encoder_is_a_clear_error() -> None:
    invert = load_api_workflow(
        {
            "1": node("LoadImage", image="in.png"),
            "2": node("ImageInvert", image=["1", 0]),
            "3": node("SaveImage", images=["2", 0], filename_prefix="inv"),
        }
    )
    with pytest.raises(WorkflowError, match=r"no sampler .*KSampler.*--set NODE\.text"):
        set_prompt(invert, "x")
    custom = load_api_workflow(SDXL_TXT2IMG)
    custom["3"]["inputs"]["positive"] = ["50", 0]
    custom["50"] = node("IPAdapterEmbedsConditioning", embeds=["51", 0])
    custom["51"] = node("IPAdapterEncoder", weight=1.0)
    with pytest.raises(WorkflowError, match=r"stops at 50 \(IPAdapterEmbedsConditioning\)"):
        set_prompt(custom, "x")
    with pytest.raises(WorkflowError, match="has no text input"):
        set_prompt(custom, "x", node="KSampler")


# -- --image -----------------------------------------------------------------------------------


def img2img() -> Workflow:
    workflow = load_api_workflow(IMG2IMG_CONTROLNET)
    workflow["3"]["inputs"]["positive"] = ["6", 0]
    workflow["3"]["inputs"]["negative"] = ["7", 0]
    for unused in ("12", "13", "14"):
        del workflow[unused]
    return workflow


def test_an_uploaded_image_goes_into_the_only_load_image() -> None:
    workflow = img2img()
    assert set_image(workflow, "in (1).png")["10"]["inputs"]["image"] == "in (1).png"
    uploaded = UploadedFile(name="in.png", subfolder="jobs/7", type="input")
    assert set_image(workflow, uploaded)["10"]["inputs"]["image"] == "jobs/7/in.png"
    temp = UploadedFile(name="in.png", subfolder="", type="temp")
    assert set_image(workflow, temp)["10"]["inputs"]["image"] == "in.png [temp]"
    assert workflow["10"]["inputs"]["image"] == "example.png"


def test_with_several_load_images_the_image_needs_an_address() -> None:
    workflow = load_api_workflow(IMG2IMG_CONTROLNET)
    with pytest.raises(WorkflowError) as caught:
        set_image(workflow, "in.png")
    message = str(caught.value)
    assert '2 LoadImage nodes: 10 (LoadImage, "Init image"), 12 (LoadImage, "Control image")' in (
        message
    )
    assert "--image 10=PATH" in message
    assert set_image(workflow, "pose2.png", node="Control image")["12"]["inputs"]["image"] == (
        "pose2.png"
    )
    assert set_image(workflow, "in.png", node="10")["10"]["inputs"]["image"] == "in.png"
    with pytest.raises(WorkflowError, match="has no 'image' input"):
        set_image(workflow, "in.png", node="KSampler")
    with pytest.raises(WorkflowError, match="no LoadImage node"):
        set_image(load_api_workflow(SDXL_TXT2IMG), "in.png")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("in.png", ImageArg(None, Path("in.png"))),
        ("10=in.png", ImageArg("10", Path("in.png"))),
        ("Control image=poses/a.png", ImageArg("Control image", Path("poses/a.png"))),
        ("./a=b.png", ImageArg(None, Path("./a=b.png"))),
        ("/data/x=1.png", ImageArg(None, Path("/data/x=1.png"))),
    ],
)
def test_image_argument_is_a_path_or_node_equals_path(text: str, expected: ImageArg) -> None:
    assert parse_image_arg(text) == expected == ImageArg.parse(text)


@pytest.mark.parametrize("text", ["=in.png", "10=", ""])
def test_image_argument_without_a_path_is_refused(text: str) -> None:
    with pytest.raises(WorkflowError, match="expected PATH or NODE=PATH"):
        parse_image_arg(text)


# -- seeds -------------------------------------------------------------------------------------


def test_every_literal_seed_not_fixed_gets_a_random_64_bit_value() -> None:
    workflow = load_api_workflow(SDXL_REFINER)
    workflow["11"]["inputs"]["noise_seed"] = ["60", 0]
    workflow["60"] = node("Seed (rgthree)", seed=-1)
    out, changes = randomize_seeds(workflow, random.Random(7), {("60", "seed")})
    assert [(c.node_id, c.input) for c in changes] == [("10", "noise_seed")]
    assert changes[0].old == 721897303308196
    assert out["10"]["inputs"]["noise_seed"] == changes[0].seed != changes[0].old
    assert 0 <= changes[0].seed <= SEED_MAX == 0xFFFFFFFFFFFFFFFF
    assert out["11"]["inputs"]["noise_seed"] == ["60", 0]
    assert out["60"]["inputs"]["seed"] == -1
    _, same = randomize_seeds(workflow, random.Random(7))
    assert same[0] == changes[0]
    assert [c.node_id for c in same] == ["10", "60"]


def test_object_info_narrows_a_custom_nodes_seed_range() -> None:
    workflow = load_api_workflow(FLUX_BASIC)
    info = {"RandomNoise": {"input": {"required": {"noise_seed": ["INT", {"min": 0, "max": 9}]}}}}
    for seed in range(30):
        _, changes = randomize_seeds(workflow, random.Random(seed), object_info=info)
        assert 0 <= changes[0].seed <= 9


@given(seed=st.integers(), fixed_seed=st.booleans())
def test_randomizing_changes_only_unfixed_seeds_within_range(seed: int, fixed_seed: bool) -> None:
    workflow = load_api_workflow(SDXL_TXT2IMG)
    fixed = {("3", "seed")} if fixed_seed else set()
    out, changes = randomize_seeds(workflow, random.Random(seed), fixed)
    assert [c.node_id for c in changes] == ([] if fixed_seed else ["3"])
    for change in changes:
        assert 0 <= change.seed <= SEED_MAX
        out["3"]["inputs"]["seed"] = change.old
    assert out == SDXL_TXT2IMG


# -- parameters together -----------------------------------------------------------------------


def test_parameters_apply_prompt_then_image_then_overrides_then_seeds() -> None:
    prepared = apply_parameters(
        img2img(),
        prompt="a harbour at night",
        images=[(None, "night.png")],
        overrides=[Override.parse("Negative.text=daylight"), Override.parse("3.steps=12")],
        rng=random.Random(1),
    )
    inputs = {i: n["inputs"] for i, n in prepared.workflow.items()}
    assert inputs["6"]["text"] == "a harbour at night"
    assert inputs["7"]["text"] == "daylight"
    assert inputs["10"]["image"] == "night.png"
    assert inputs["3"]["steps"] == 12
    assert prepared.seeds == (SeedChange("3", "seed", 42, inputs["3"]["seed"]),)
    assert prepared.fixed == {("7", "text"), ("3", "steps")}


def test_an_override_wins_over_the_prompt_and_keeps_its_seed() -> None:
    prepared = apply_parameters(
        load_api_workflow(TXT2IMG),
        prompt="from --prompt",
        overrides=[Override.parse("6.text=from --set"), Override.parse("KSampler.seed=42")],
    )
    assert prepared.workflow["6"]["inputs"]["text"] == "from --set"
    assert prepared.workflow["3"]["inputs"]["seed"] == 42
    assert prepared.seeds == ()
    unrandomized = apply_parameters(load_api_workflow(TXT2IMG), randomize=False)
    assert unrandomized.workflow == load_api_workflow(TXT2IMG)


def test_two_images_for_one_load_image_are_refused() -> None:
    with pytest.raises(WorkflowError, match="two images go to node 12"):
        apply_parameters(
            load_api_workflow(IMG2IMG_CONTROLNET),
            images=[("Control image", "a.png"), ("12", "b.png")],
        )


# -- outputs -----------------------------------------------------------------------------------

HISTORY_ITEM: dict[str, Any] = {
    "prompt": [3, "c87d86d9", {}, {}, ["9", "20", "21", "22", "23", "24", "25"]],
    "outputs": {
        "9": {"images": [{"filename": "sdxl_00001_.png", "subfolder": "", "type": "output"}]},
        "20": {
            "images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}],
            "animated": [True],
        },
        "21": {
            "gifs": [
                {
                    "filename": "AnimateDiff_00001.mp4",
                    "subfolder": "",
                    "type": "output",
                    "format": "video/h264-mp4",
                    "frame_rate": 8.0,
                    "workflow": "AnimateDiff_00001.png",
                    "fullpath": "/comfy/output/AnimateDiff_00001.mp4",
                }
            ]
        },
        "22": {
            "audio": [{"filename": "audio_00001_.flac", "subfolder": "audio", "type": "output"}]
        },
        "23": {"text": ["a caption", "second line"]},
        "24": {
            "images": [
                {"filename": "ComfyUI_temp_abcde_00001_.png", "subfolder": "", "type": "temp"}
            ]
        },
        "25": {
            "videos": [{"filename": "clip_00001.mp4", "subfolder": "video", "type": "output"}],
            "string": ["one string"],
        },
        "26": {
            "latents": [{"filename": "x_00001_.latent", "subfolder": "latents", "type": "output"}]
        },
        "27": {"images": [{"filename": "sdxl_00001_.png", "subfolder": "", "type": "output"}]},
    },
    "status": {"status_str": "success", "completed": True, "messages": []},
}


def test_every_output_kind_is_collected_in_node_order() -> None:
    outputs = collect_outputs(HISTORY_ITEM)
    assert outputs == [
        OutputFile("9", "images", "sdxl_00001_.png", "", "output"),
        OutputFile("20", "images", "anim_00001_.webp", "", "output"),
        OutputFile("21", "gifs", "AnimateDiff_00001.mp4", "", "output"),
        OutputFile("22", "audio", "audio_00001_.flac", "audio", "output"),
        OutputText("23", "text", 0, "a caption"),
        OutputText("23", "text", 1, "second line"),
        OutputFile("24", "images", "ComfyUI_temp_abcde_00001_.png", "", "temp"),
        OutputFile("25", "videos", "clip_00001.mp4", "video", "output"),
        OutputText("25", "string", 0, "one string"),
        OutputFile("26", "latents", "x_00001_.latent", "latents", "output"),
    ]
    assert [o.filename for o in outputs if isinstance(o, OutputText)] == [
        "node23_text_1.txt",
        "node23_text_2.txt",
        "node25_string_1.txt",
    ]
    assert collect_outputs({"c87d86d9": HISTORY_ITEM}) == outputs


def test_a_history_without_outputs_has_none() -> None:
    assert collect_outputs({}) == []
    assert collect_outputs({"outputs": {}}) == []
    assert collect_outputs({"outputs": {"9": "junk", "10": {"images": "junk"}}}) == []
    assert OutputText("12:5", "text", 0, "x").filename == "node12_5_text_1.txt"


# -- validation --------------------------------------------------------------------------------


def refused(node_errors: dict[str, Any], details: str = "") -> dict[str, Any]:
    return {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details,
            "extra_info": {},
        },
        "node_errors": node_errors,
    }


def one_error(node_id: str, class_type: str, **error: Any) -> dict[str, Any]:
    return {node_id: {"errors": [error], "dependent_outputs": ["3"], "class_type": class_type}}


# Observed on ComfyUI 0.3.64 (comfyui-api.md §5.1, v3 to v11).
OBSERVED_NODE_ERRORS: list[tuple[dict[str, Any], str]] = [
    (
        one_error(
            "2",
            "ImageInvert",
            type="required_input_missing",
            message="Required input is missing",
            details="image",
            extra_info={"input_name": "image"},
        ),
        "node 2 (ImageInvert) input 'image': a required input is missing: "
        "connect it or give it a value",
    ),
    (
        one_error(
            "2",
            "ImageScale",
            type="value_not_in_list",
            message="Value not in list",
            details="upscale_method: 'bogus' not in ['nearest-exact', 'bilinear', 'area', "
            "'bicubic', 'lanczos']",
            extra_info={
                "input_name": "upscale_method",
                "input_config": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}],
                "received_value": "bogus",
            },
        ),
        "node 2 (ImageScale) input 'upscale_method': 'bogus' is not an allowed value; "
        "expected one of: nearest-exact, bilinear, area, bicubic, lanczos",
    ),
    (
        one_error(
            "1",
            "EmptyImage",
            type="value_bigger_than_max",
            message="Value 100000 bigger than max of 16384",
            details="width",
            extra_info={
                "input_name": "width",
                "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
                "received_value": 100000,
            },
        ),
        "node 1 (EmptyImage) input 'width': 100000 is above the maximum 16384",
    ),
    (
        one_error(
            "1",
            "EmptyImage",
            type="invalid_input_type",
            message="Failed to convert an input value to a INT value",
            details="width, abc, invalid literal for int() with base 10: 'abc'",
            extra_info={
                "input_name": "width",
                "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
                "received_value": "abc",
                "exception_message": "invalid literal for int() with base 10: 'abc'",
            },
        ),
        "node 1 (EmptyImage) input 'width': 'abc' is not a valid INT "
        "(invalid literal for int() with base 10: 'abc')",
    ),
    (
        one_error(
            "2",
            "SaveImage",
            type="return_type_mismatch",
            message="Return type mismatch between linked nodes",
            details="images, received_type(MASK) mismatch input_type(IMAGE)",
            extra_info={
                "input_name": "images",
                "input_config": ["IMAGE", {"tooltip": "The images to save."}],
                "received_type": "MASK",
                "linked_node": ["1", 1],
            },
        ),
        "node 2 (SaveImage) input 'images': is linked to node 1 output 1, which gives MASK; "
        "expected IMAGE",
    ),
    (
        one_error(
            "2",
            "SaveImage",
            type="bad_linked_input",
            message="Bad linked input, must be a length-2 list of [node_id, slot_index]",
            details="images",
            extra_info={
                "input_name": "images",
                "input_config": ["IMAGE", {"tooltip": "The images to save."}],
                "received_value": ["1"],
            },
        ),
        "node 2 (SaveImage) input 'images': [\"1\"] is not a link [node_id, output_index]",
    ),
    (
        one_error(
            "1",
            "LoadImage",
            type="custom_validation_failed",
            message="Custom validation failed for node",
            details="image - Invalid image file: does_not_exist.png",
            extra_info={"input_name": "image"},
        ),
        "node 1 (LoadImage) input 'image': Invalid image file: does_not_exist.png",
    ),
    (
        one_error(
            "2",
            "SaveImage",
            type="exception_during_validation",
            message="Exception when validating node",
            details="'99'",
            extra_info={"exception_type": "KeyError", "traceback": ["..."]},
        ),
        "node 2 (SaveImage): links to node '99', which is not in the workflow",
    ),
    (
        one_error(
            "2",
            "SomeNode",
            type="something_new",
            message="Something new went wrong",
            details="x",
            extra_info={"input_name": "y"},
        ),
        "node 2 (SomeNode) input 'y': Something new went wrong: x",
    ),
]


@pytest.mark.parametrize(("node_errors", "line"), OBSERVED_NODE_ERRORS)
def test_each_observed_validation_error_reads_as_node_input_and_expectation(
    node_errors: dict[str, Any], line: str
) -> None:
    lines = describe_validation(refused(node_errors))
    assert lines[0] == "ComfyUI refused the workflow: Prompt outputs failed validation"
    assert lines[1].startswith(line)
    assert len(lines) == 2


def test_a_long_list_left_out_by_comfyui_is_filled_in_from_object_info() -> None:
    body = refused(
        one_error(
            "3",
            "KSampler",
            type="value_not_in_list",
            message="Value not in list",
            details="sampler_name: 'eulr' not in (list of length 42)",
            extra_info={
                "input_name": "sampler_name",
                "input_config": None,
                "received_value": "eulr",
            },
        )
    )
    assert describe_validation(body)[1] == (
        "node 3 (KSampler) input 'sampler_name': 'eulr' is not an allowed value; "
        "expected one of the 42 values /object_info lists for it"
    )
    names = ["euler", "euler_ancestral", "heun", *(f"s{i}" for i in range(39))]
    info = {"KSampler": {"input": {"required": {"sampler_name": [names, {}]}}}}
    workflow = load_api_workflow(TXT2IMG)
    workflow["3"]["_meta"]["title"] = "Main sampler"
    line = describe_validation(body, workflow=workflow, object_info=info)[1]
    assert line.startswith(
        "node 3 (KSampler, \"Main sampler\") input 'sampler_name': 'eulr' is not an allowed "
        "value (did you mean 'euler'"
    )
    assert "expected one of: euler, euler_ancestral, heun, s0," in line
    assert line.endswith(", ... (42 in all)")


def test_errors_without_nodes_and_dropped_parts_are_described_too() -> None:
    unknown = {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because node NoSuchNode does not exist.",
            "details": "Node ID '#1'",
            "extra_info": {},
        },
        "node_errors": {},
    }
    assert describe_validation(unknown) == [
        "ComfyUI refused the workflow: Cannot execute because node NoSuchNode does not exist. "
        "(Node ID '#1')",
        "install the custom node that provides it, or fix the class_type",
    ]
    dropped = {
        "prompt_id": "c6725c39",
        "number": 23,
        "node_errors": one_error(
            "3",
            "ImageInvert",
            type="required_input_missing",
            message="Required input is missing",
            details="image",
            extra_info={"input_name": "image"},
        ),
    }
    lines = describe_validation(dropped)
    assert lines[0] == "ComfyUI queued the workflow without the parts that failed validation:"
    assert lines[1].startswith("node 3 (ImageInvert) input 'image': a required input is missing")


def test_the_agents_validation_error_is_described_from_its_node_errors() -> None:
    node_errors, line = OBSERVED_NODE_ERRORS[2]
    error = ComfyValidationError(
        "ComfyUI refused the workflow: ...",
        error_type="prompt_outputs_failed_validation",
        node_errors=node_errors,
    )
    assert describe_validation(error) == [
        "ComfyUI refused the workflow: Prompt outputs failed validation",
        line,
    ]
    bare = ComfyValidationError(
        "ComfyUI refused the workflow: Prompt has no outputs",
        error_type="prompt_no_outputs",
        node_errors={},
    )
    assert describe_validation(bare) == ["ComfyUI refused the workflow: Prompt has no outputs"]


# -- against the simulator ---------------------------------------------------------------------


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/system_stats", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture
def comfy_url(tmp_path: Path) -> Iterator[str]:
    """``python -m comfyfleet.sim.comfy`` on loopback, with the txt2img example's checkpoint."""
    base = tmp_path / "comfy"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"\0" * 16)
    port = free_port()
    command = [sys.executable, "-m", "comfyfleet.sim.comfy", "--listen", LOOPBACK]
    command += ["--port", str(port), "--base-directory", str(base)]
    with (tmp_path / "sim.log").open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "sim.log").read_text())
            time.sleep(0.05)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
async def comfy(comfy_url: str) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(comfy_url, timeout_s=10) as client:
        yield client


async def test_a_bad_set_gets_comfyuis_own_validation_error_made_readable(
    comfy: ComfyClient,
) -> None:
    prepared = apply_parameters(
        load_api_workflow(TXT2IMG),
        prompt="a glass bottle",
        overrides=[Override.parse("KSampler.sampler_name=eulr"), Override.parse("3.steps=0")],
    )
    with pytest.raises(ComfyValidationError) as caught:
        await comfy.queue_prompt(prepared.workflow)
    object_info = await comfy.object_info("KSampler")
    lines = describe_validation(caught.value, workflow=prepared.workflow, object_info=object_info)
    assert lines[0] == "ComfyUI refused the workflow: Prompt outputs failed validation"
    assert lines[1] == "node 3 (KSampler) input 'steps': 0 is below the minimum 1"
    assert lines[2].startswith(
        "node 3 (KSampler) input 'sampler_name': 'eulr' is not an allowed value "
        "(did you mean 'euler'"
    )
    assert "expected one of: euler, euler_cfg_pp, euler_ancestral," in lines[2]

    # The raw 400 body reads the same; without /object_info the long list stays a count.
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{comfy.url}/prompt", json={"prompt": prepared.workflow}) as response,
    ):
        assert response.status == 400
        body = await response.json()
    assert describe_validation(body, workflow=prepared.workflow)[1:] == [
        lines[1],
        "node 3 (KSampler) input 'sampler_name': 'eulr' is not an allowed value; "
        "expected one of the 42 values /object_info lists for it",
    ]


async def test_an_img2img_job_runs_with_its_parameters_and_every_output_comes_back(
    comfy: ComfyClient,
) -> None:
    workflow = load_api_workflow(TXT2IMG)
    workflow["10"] = node("LoadImage", "Init image", image="example.png")
    workflow["11"] = node("VAEEncode", pixels=["10", 0], vae=["4", 2])
    workflow["3"]["inputs"]["latent_image"] = ["11", 0]
    workflow["12"] = node("PrimitiveString", value="caption")
    workflow["13"] = node("PreviewAny", source=["12", 0])
    uploaded = await comfy.upload_image(png_bytes(), name="in.png", subfolder="job1")
    prepared = apply_parameters(
        workflow,
        prompt="a red square",
        images=[(None, uploaded)],
        overrides=[Override.parse("KSampler.steps=3"), Override.parse("12.value=hello")],
        rng=random.Random(3),
    )
    assert prepared.workflow["10"]["inputs"]["image"] == "job1/in.png"
    assert [(c.node_id, c.input) for c in prepared.seeds] == [("3", "seed")]
    result = await comfy.run(prepared.workflow, timeout_s=30)
    history = await comfy.history(result.prompt_id)
    outputs = collect_outputs(history)
    assert [type(o).__name__ for o in outputs] == ["OutputFile", "OutputText"]
    image, text = outputs
    assert isinstance(image, OutputFile) and isinstance(text, OutputText)
    assert (image.node_id, image.kind, image.type) == ("9", "images", "output")
    assert text == OutputText("13", "text", 0, "hello")
    data = await comfy.view(image.filename, subfolder=image.subfolder, type=image.type)
    assert Image.open(io.BytesIO(data)).size == (64, 48)  # the init image's size
